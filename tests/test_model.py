"""The network itself: gamma, size, and blindness to the centre frame."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from umvd_live.engine import model as model_module
from umvd_live.engine.model import (
    PRESETS,
    UMVDNet,
    build_model,
    count_parameters,
    fast_spec,
    first_conv,
    gamma_weights,
    lite_spec,
    max_pool2,
    paper_spec,
    reach_rows,
    resolve_preset,
    row_bands,
)
from umvd_live.engine.window import ContextHistory, context_blocks, window_indices


def test_gamma_values():
    # l = 1: a linear ramp d / k; the centre's weight is exactly 0.
    g = gamma_weights(7, power=1.0)
    np.testing.assert_allclose(g.numpy(), [1, 2 / 3, 1 / 3, 0, 1 / 3, 2 / 3, 1], rtol=1e-6)
    # l = 64 (the training script): every frame but the centre weighs ~1.
    g = gamma_weights(5, power=64.0)
    assert g[2].item() == 0.0
    np.testing.assert_allclose(g.numpy()[[0, 1, 3, 4]], [1, 1 - 0.5**64, 1 - 0.5**64, 1], rtol=1e-6)
    # m > 0 lifts the floor, and then the centre weighs m.
    g = gamma_weights(7, power=2.0, floor=0.25)
    assert g[3].item() == pytest.approx(0.25)
    assert g[0].item() == pytest.approx(1.0)


def test_paper_preset_has_the_published_size():
    assert count_parameters(build_model("paper", 7)) == 1_786_191


def test_auto_preset_by_device_frame_size_and_mode():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_preset("auto", cuda, 512, 512, live=True) == "paper"
    assert resolve_preset("auto", cuda, 2048, 2048) == "lite"
    assert resolve_preset("auto", cpu, 256, 256, live=True) == "lite"
    assert resolve_preset("auto", cpu, 512, 512, live=True) == "fast"  # lite cannot keep up there
    assert resolve_preset("auto", cpu, 512, 512, live=False) == "lite"  # a file need not keep pace
    assert resolve_preset("lite", cpu, 1024, 1024, live=True) == "lite"
    with pytest.raises(ValueError, match="choose auto, paper, lite, fast"):
        resolve_preset("tiny", cpu, 64, 64)
    lite, fast = build_model("lite"), build_model("fast")
    assert count_parameters(fast) < count_parameters(lite) // 2
    assert fast.spec.enc1 == lite.spec.enc1 and fast.spec.dec1 == lite.spec.dec1  # full resolution as lite


def test_windows_batch():
    net = build_model("lite", 5)
    out = net(torch.rand(3, 5, 1, 20, 28))  # sides not divisible by 4 are padded and cropped
    assert out.shape == (3, 1, 20, 28)


@pytest.mark.parametrize("spec", [lite_spec(7), fast_spec(7), paper_spec(5)], ids=["lite", "fast", "paper"])
def test_output_is_blind_to_the_centre_frame_also_at_the_stream_edges(spec):
    torch.manual_seed(0)
    net = UMVDNet(spec)
    movie = torch.rand(9, 1, 16, 16, requires_grad=True)
    k = spec.window // 2
    for t in (0, 1, 4, 7, 8):  # first frames, middle, last frames
        idx = window_indices(t, 0, len(movie) - 1, k)
        assert idx[k] == t and idx.count(t) == 1, idx
        out = net(movie[idx][None])
        (grad,) = torch.autograd.grad(out.sum(), movie)
        assert torch.count_nonzero(grad[t]) == 0, f"frame {t} leaks into its own output"
        others = [i for i in set(idx) if i != t]
        assert all(torch.count_nonzero(grad[i]) > 0 for i in others)


def test_edge_rule_never_puts_the_target_in_its_own_window():
    for last in range(1, 12):
        for t in range(last + 1):
            idx = window_indices(t, 0, last, 3)
            assert idx[3] == t
            assert t not in idx[:3] + idx[4:]
            assert all(0 <= i <= last for i in idx)


def _with_context(spec, context):
    from dataclasses import replace

    return replace(spec, context=context)


@pytest.mark.parametrize("live,both_sides", [(True, False), (False, False), (False, True)],
                         ids=["live stream", "recorded movie, past blocks", "recorded movie, both sides"])
def test_context_blocks_keep_the_output_blind_and_are_used(live, both_sides):
    torch.manual_seed(0)
    spec = _with_context(lite_spec(5), (2, 3))
    net = UMVDNet(spec)
    k, frames = 2, 16
    movie = torch.rand(frames, 1, 16, 16, requires_grad=True)
    for t in (0, 1, 2, 7, 8, 14, 15):
        last = min(t + k, frames - 1) if live else frames - 1  # a live stream has nothing after t + k
        idx = window_indices(t, 0, last, k)
        blocks = context_blocks(t, k, spec.context, lambda j: 0 <= j <= last, both_sides)
        assert all(b and t not in b and all(0 <= j <= last for j in b) for b in blocks), (t, blocks)
        context = torch.stack([movie[b].mean(0) for b in blocks])[None]
        out = net(movie[idx][None], context)
        (grad,) = torch.autograd.grad(out.sum(), movie)
        assert torch.count_nonzero(grad[t]) == 0, f"frame {t} leaks into its own output"
        assert all(torch.count_nonzero(grad[j]) > 0 for b in blocks for j in b)


def test_context_blocks_cover_the_frames_before_the_window():
    have = lambda j: j >= 0  # noqa: E731
    assert context_blocks(40, 3, (8, 24), have) == [list(range(29, 37)), list(range(5, 29))]
    # Partly before the stream: what exists; nothing: mirrored after the window, else neighbours.
    assert context_blocks(10, 3, (8, 24), have) == [list(range(0, 7)), list(range(22, 46))]
    assert context_blocks(10, 3, (8, 24), lambda j: 0 <= j <= 13) == [list(range(0, 7)), [7, 8, 9, 11, 12, 13]]
    assert context_blocks(0, 3, (4,), lambda j: j == 0) == [[0]]  # a one-frame stream


def test_context_blocks_from_both_sides_are_centred_on_the_window():
    """A recorded movie's blocks take half their frames before the window and half after, at the
    same distance (their mean centred on t); at a movie's ends, the side that exists."""
    have = lambda j: 0 <= j < 200  # noqa: E731
    assert context_blocks(100, 3, (8, 24), have, both_sides=True) == [
        [*range(93, 97), *range(104, 108)], [*range(81, 93), *range(108, 120)]]
    assert context_blocks(2, 3, (8,), have, both_sides=True) == [[*range(6, 10)]]  # nothing before the window
    assert context_blocks(198, 3, (8,), have, both_sides=True) == [[*range(191, 195)]]  # nothing after it
    assert context_blocks(0, 3, (4,), lambda j: j == 0, both_sides=True) == [[0]]  # a one-frame movie


def test_history_block_sums_stay_exact_over_a_long_stream_with_skips_and_a_jump():
    """A preview that falls behind asks for every few centres: the sums step over the skipped
    ones (no re-summing of all 96 frames), and a longer jump sums afresh; so do the blocks while
    they fill at the stream's start. All stay exact."""
    torch.manual_seed(1)
    k, spans = 3, (8, 24, 64)
    history = ContextHistory(k, spans)
    frames = [torch.rand(1, 8, 8) for _ in range(700)]
    skipped = {*range(200, 203), *range(300, 307), *range(400, 420), 555}  # 3, 7, 20 and 1 centres
    worst = 0.0
    for i, f in enumerate(frames):
        history.append(i, f)
        t = i - k
        if t < 0 or t in skipped:
            continue
        blocks = context_blocks(t, k, spans, lambda j: 0 <= j <= i)
        exact = torch.stack([torch.stack([frames[j] for j in b]).mean(0) for b in blocks])[None]
        worst = max(worst, float((history.block_means(t) - exact).abs().max()))
    assert worst < 1e-5
    # Each of the 3 blocks summed afresh once as its first past frame came (then kept as the
    # blocks filled) and after the 20-centre jump; then every RESUM_EVERY (256) frames, one block
    # at a time, at its own phase: the 8-frame block at t = 256 and 512, the 24-frame one at 171,
    # 427 and 683, the 64-frame one at 86, 342 and 598. The skips of 1, 3 and 7 centres were
    # stepped over.
    assert history.resums == 3 + 3 + 2 + 3 + 3


def _random_net(preset: str) -> UMVDNet:
    torch.manual_seed(3)
    net = build_model(preset).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def _plain(net: UMVDNet, windows: torch.Tensor, context: torch.Tensor | None, monkeypatch) -> torch.Tensor:
    """The output with every convolution and ReLU run apart and torch's own pooling."""
    with monkeypatch.context() as m:
        m.setattr(model_module, "_FUSED_WORKS", False)
        m.setattr(model_module, "max_pool2", lambda x: F.max_pool2d(x, 2))
        return net(windows, context)


@pytest.mark.parametrize("preset", ["fast", "lite", "paper"])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_inference_runs_fused_and_gives_the_plain_modules_numbers(preset, bf16, threads, monkeypatch):
    """On the CPU outside autograd each convolution + ReLU is one oneDNN call and the pooling
    takes the maximum of four quarters: the same numbers as the modules run apart, in float32
    and under bf16 autocast (the live engine's arithmetic on CPUs that have it), to the last bit
    of the arithmetic's rounding: oneDNN may sum a fused call in another order (at one thread
    `paper`'s float32 outputs differed by 5e-7 of their largest; a full CI run left one thread)."""
    net = _random_net(preset)
    torch.manual_seed(4)
    windows = torch.rand(2, 7, 1, 36, 44)
    context = torch.rand(2, len(net.spec.context), 1, 36, 44) if net.spec.context else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fused = net(windows, context)
            plain = _plain(net, windows, context, monkeypatch)
    finally:
        torch.set_num_threads(before)
    rounding = 2.0 ** -6 if bf16 else 2.0 ** -20  # 4 / 8 units of bf16's / float32's last place
    torch.testing.assert_close(fused, plain, rtol=0, atol=rounding * float(plain.abs().max()))
    if torch.backends.mkldnn.is_available():
        assert model_module._FUSED_WORKS is True  # the fused kernel really ran


def _zero_weighted_input(net: UMVDNet, windows: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """D's output on its whole input, every frame's features times its gamma (the centre's times
    0) beside the context, as the reference builds it."""
    b, n, c, h, w = windows.shape
    feats = net.features(windows.reshape(b * n, c, h, w)).reshape(b, n, -1, h, w)
    parts = [feats[:, i] * g for i, g in enumerate(net.gamma.tolist())]
    if context is not None:
        parts += [context[:, j].to(parts[0].dtype) for j in range(context.shape[1])]
    return net.D(torch.cat(parts, 1).contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("preset", ["fast", "lite", "paper"])
@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_a_centre_weighted_zero_is_left_out_with_the_same_numbers(preset, floor, monkeypatch):
    """At gamma_floor 0 the centre's features are left out of D's input (not multiplied by 0
    and convolved): the same outputs, fused or apart, in float32 and bf16, and the same gradients;
    a floor above 0 keeps them in."""
    torch.manual_seed(3)
    net = UMVDNet(replace(PRESETS[preset](), gamma_floor=floor))
    with torch.no_grad():  # scaled by fan-in: activations of order 1 through paper's 20 layers,
        for p in net.parameters():  # so that its skip features count in dec1 (they would round away)
            p.normal_(0.0, (2.0 / p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1)
    net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    g, m = net.spec.g_channels, len(net.spec.context)
    inputs = first_conv(net.D.enc1).in_channels
    assert (len(net._held) if net._held is not None else inputs) == inputs - (g if floor == 0.0 else 0)
    windows = torch.rand(2, 7, 1, 20, 28)
    context = torch.rand(2, m, 1, 20, 28) if m else None
    for bf16, tolerance in ((False, 1e-5), (True, 0.03)):  # bf16: the layers round apart
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            want = _zero_weighted_input(net, windows, context).float()
            for got in (net(windows, context), _plain(net, windows, context, monkeypatch)):
                assert float((got.float() - want).abs().max()) <= tolerance * float(want.abs().max())
    grads = []
    for forward in (lambda: net(windows, context), lambda: _zero_weighted_input(net, windows, context)):
        net.zero_grad()
        forward().square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for got, want in zip(*grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_training_and_a_torch_without_the_fused_kernel_run_the_modules_apart(monkeypatch):
    net = _random_net("lite")
    windows, context = torch.rand(1, 7, 1, 32, 32), torch.rand(1, 3, 1, 32, 32)

    def missing(*args, **kwargs):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(model_module, "_FUSED_WORKS", None)  # not tried yet; restored after the test
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", missing)
    with torch.enable_grad():  # training: autograd needs the modules; the kernel is never asked
        net(windows, context).sum().backward()
    assert model_module._FUSED_WORKS is not False
    with torch.inference_mode():
        out = net(windows, context)
        assert model_module._FUSED_WORKS is False  # tried once, then the modules apart
        assert torch.equal(out, _plain(net, windows, context, monkeypatch))


def test_max_pool2_is_torchs_pooling_on_even_and_odd_sides():
    x = torch.randn(2, 3, 10, 14).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.equal(max_pool2(x), F.max_pool2d(x, 2))
        assert torch.equal(max_pool2(x[..., :9, :13]), F.max_pool2d(x[..., :9, :13], 2))


@pytest.mark.parametrize("preset", ["fast", "lite", "paper"])
@pytest.mark.parametrize("bf16", [False, True])
def test_row_bands_give_the_whole_pass_numbers(preset, bf16):
    """A pass of D cut into row bands, each from its own rows and `reach_rows` around them, gives
    the whole pass's numbers to the last bit (the live engine runs a lone window's bands side by
    side); with a reach of 4 rows the rows by the cuts differ."""
    net = _random_net(preset)
    spec = net.spec
    reach = reach_rows(spec)
    height, width = 16 * reach + 6, 24  # the smallest frame cut in two, plus rows the pass pads
    torch.manual_seed(5)
    feats = [torch.rand(1, spec.g_channels, height, width).contiguous(memory_format=torch.channels_last)
             for _ in range(spec.window)]
    context = torch.rand(1, len(spec.context), 1, height, width) if spec.context else None

    def band_pass(start: int, stop: int) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net.denoise_features([f[..., start:stop, :] for f in feats],
                                        None if context is None else context[..., start:stop, :])

    whole = band_pass(0, height)
    bands = row_bands(spec, height, 2)
    assert len(bands) == 2 and [(b.lo, b.hi) for b in bands] == [(0, bands[1].lo), (bands[0].hi, height)]
    assert all(b.start % 4 == 0 for b in bands)  # on the pooling's grid
    cut = torch.cat([b.crop(band_pass(b.start, b.stop)) for b in bands], -2)
    assert torch.equal(cut, whole)
    short = [type(b).around(b.lo, b.hi, 4, height) for b in bands]
    assert not torch.equal(torch.cat([b.crop(band_pass(b.start, b.stop)) for b in short], -2), whole)


def test_row_bands_only_where_the_overlap_costs_little():
    spec = fast_spec()
    reach = reach_rows(spec)
    assert (reach, reach_rows(lite_spec()), reach_rows(paper_spec())) == (20, 28, 60)
    assert len(row_bands(spec, 512, 2)) == 2 and len(row_bands(spec, 512, 1)) == 1
    assert len(row_bands(spec, 16 * reach - 4, 2)) == 1  # the overlap would add more than 1/8
    assert len(row_bands(paper_spec(), 512, 2)) == 1
    three = row_bands(spec, 1024, 3)
    assert [b.lo for b in three] == [0, 340, 684] and three[-1].hi == 1024
