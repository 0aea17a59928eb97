"""StreamDenoiser: ordering, states, weights files, divergence guard, input hygiene."""

import importlib
import pickle
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from tool_modules import load_tool

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
from umvd_live.engine import EngineConfig, RoundFailed, StreamDenoiser, cpu_cores
from umvd_live.engine.checkpoint import (
    CheckpointError,
    SavedWeights,
    load_checkpoint,
    save_checkpoint,
    weights_hash,
)
from umvd_live.engine.device import cpu_has_native_bf16, default_workers, lists_native_bf16
from umvd_live.engine.normalization import (
    IMPULSE_RANGES,
    MAX_RANGES,
    ImpulseScreen,
    Normalizer,
    bad_pixels,
    remove_impulses,
    sanitize,
)
from umvd_live.engine.trainer import OnlineTrainer, ReplayBuffer, TrainerConfig

# From scratch (no prior): these tests follow a warm start (tests/test_prior.py has the prior's).
FAST = EngineConfig(
    preset="lite", warmup_frames=12, warmup_steps=6, min_train_frames=8, steps_per_frame=0.5,
    trainer=TrainerConfig(batch=2, patch=16), sync_every=2, prior="none",
)


def noisy_movie(t=30, h=24, w=20, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    clean = np.stack([3 + 2 * np.sin(xx / 4 + i / 5) * np.cos(yy / 5) for i in range(t)])
    return (rng.poisson(clean) * 50 + 400).astype(np.uint16)


def run_stream(config, movie):
    den = StreamDenoiser(config)
    outs = []
    for frame in movie:
        outs += den.push(frame)
    outs += den.flush()
    return den, outs


#: Training on its own thread, as live streams do; warm after 10 frames and 4 steps.
BACKGROUND = EngineConfig(
    preset="lite", warmup_frames=10, warmup_steps=4, min_train_frames=8, train_mode="background",
    trainer=TrainerConfig(batch=2, patch=16), sync_every=2,
)


def trained_in_background(den, movie, steps):
    """Push ``movie``, then wait (30 s at most) until the trainer has made ``steps`` steps."""
    for frame in movie:
        den.push(frame)
    deadline = time.monotonic() + 30
    while den.model_step < steps and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("frames", [1, 2, 3, 7, 30])
def test_one_output_per_input_in_order(frames):
    den, outs = run_stream(FAST, noisy_movie(frames))
    assert [o.index for o in outs] == list(range(frames))
    assert all(o.image.shape == (24, 20) and o.image.dtype == np.float32 for o in outs)
    assert den.frames_in == den.frames_out == frames


def test_outputs_are_centred_and_marked_until_warm():
    den = StreamDenoiser(FAST)
    movie = noisy_movie(30)
    ready_at = {}
    for i, frame in enumerate(movie):
        for out in den.push(frame):
            ready_at[out.index] = (i, out.state)
    # The output for frame t is ready when frame t + N//2 has arrived.
    assert all(arrived == t + 3 for t, (arrived, _) in ready_at.items())
    states = [s for _, s in ready_at.values()]
    assert states[0] == "warmup" and states[-1] == "live"
    assert states == sorted(states, key=["warmup", "live"].index), "warm-up comes first, then live"
    assert den.frames_out == 27


def test_warmup_output_is_the_temporal_mean_in_input_units():
    movie = noisy_movie(12)
    _, outs = run_stream(EngineConfig(preset="lite", warmup_frames=1000, prior="none"), movie)
    assert all(o.state == "warmup" for o in outs)
    np.testing.assert_allclose(outs[5].image, movie[2:9].mean(0), rtol=1e-4)
    # At the first frame the missing neighbours are mirrored: frames 3, 2, 1, 0, 1, 2, 3.
    np.testing.assert_allclose(outs[0].image, movie[[3, 2, 1, 0, 1, 2, 3]].mean(0), rtol=1e-4)


def test_infer_false_skips_only_the_image():
    den = StreamDenoiser(FAST)
    outs = []
    for i, frame in enumerate(noisy_movie(12)):
        outs += den.push(frame, infer=i % 2 == 0)
    assert [o.index for o in outs] == list(range(9))
    assert [o.image is None for o in outs] == [i % 2 == 1 for i in range(3, 12)]


def test_each_output_carries_its_input_frames_tag():
    """The tag given with frame t comes back on frame t's output, the same object: through warm-up,
    probed and live windows, skipped images, batched pushes, a change of segment and the flush."""
    from umvd_live.adapters.simulation import SimConfig, SimEvent, TwoPhotonSimulator

    config = SimConfig(height=32, width=32, photons=2.0, seed=4, events=(SimEvent.laser(1.0, 3.0),))
    movie = TwoPhotonSimulator(config).movie(60)[0]
    tags = [None if i % 9 == 4 else {"frame": i} for i in range(len(movie))]
    den = StreamDenoiser(FAST)
    outs = []
    for i in range(20):
        outs += den.push(movie[i], infer=i % 5 != 2, tag=tags[i])
    start = 20
    for size in [3, 11, 1, 25]:
        outs += den.push_many(list(movie[start:start + size]), [True] * size, tags[start:start + size])
        start += size
    outs += den.flush()
    assert [o.index for o in outs] == list(range(len(movie)))
    assert all(o.tag is tags[o.index] for o in outs)
    # after the change the referee judges every window (probed), before it some are plain live
    assert {o.state for o in outs} == {"warmup", "live"} and den.segment == 1
    assert any(o.image is None for o in outs)
    with pytest.raises(ValueError, match="tags"):
        StreamDenoiser(FAST).push_many(list(movie[:2]), tags=[1])


def test_push_many_equals_pushing_one_frame_at_a_time(tmp_path):
    """Batched inference (push_many, in chunks of max_batch) gives the outputs of single pushes:
    same frames, same order, same images, also across the context blocks' running sums."""
    den, _ = run_stream(FAST, noisy_movie(20))
    den.save_weights(tmp_path / "w.pt")
    frozen = EngineConfig(preset="lite", init=str(tmp_path / "w.pt"), steps_per_frame=0, max_batch=3)
    movie = noisy_movie(130, seed=4)
    infer = [i % 11 != 5 for i in range(len(movie))]
    single, singles = StreamDenoiser(frozen), []
    for frame, wanted in zip(movie, infer):
        singles += single.push(frame, infer=wanted)
    singles += single.flush()
    batched, outs, start = StreamDenoiser(frozen), [], 0
    for size in [1, 4, 7, 2, 13, 1, 30, 8, 64]:  # 130 frames in uneven runs
        outs += batched.push_many(movie[start:start + size], infer[start:start + size])
        start += size
    outs += batched.flush()
    assert [(o.index, o.state) for o in outs] == [(o.index, o.state) for o in singles]
    assert all(o.state == "live" for o in outs)
    for got, want in zip(outs, singles):
        if want.image is None:
            assert got.image is None
        else:
            np.testing.assert_allclose(got.image, want.image, rtol=1e-4, atol=1e-2)
    assert batched.frames_in == batched.frames_out == 130


def test_workers_run_forward_passes_side_by_side(tmp_path):
    """With workers=2 the ready windows' passes of D run two at a time on two threads (a barrier
    inside D that both must reach, or it breaks after 10 s), and give the images of one worker."""
    den, _ = run_stream(FAST, noisy_movie(20))
    den.save_weights(tmp_path / "w.pt")
    frozen = EngineConfig(preset="lite", init=str(tmp_path / "w.pt"), steps_per_frame=0, max_batch=1, cpu_threads=1)
    movie = noisy_movie(41, seed=2)

    def outputs(workers: int, meet: threading.Barrier | None) -> tuple[list, set[int]]:
        den = StreamDenoiser(replace(frozen, workers=workers))
        outs = den.push_many(movie[:1])  # builds the network (and prepares its kernels: one pass)
        threads: set[int] = set()

        def pre_hook(module, args):
            threads.add(threading.get_ident())
            if meet is not None:
                meet.wait()

        hook = den._net.D.register_forward_pre_hook(pre_hook)
        try:
            for start in range(1, len(movie), 8):  # 8 frames a call: 6, then 8 windows; pairs of passes
                outs += den.push_many(movie[start:start + 8])
        finally:
            hook.remove()
            den.close()
        return outs, threads

    side_by_side, threads = outputs(2, threading.Barrier(2, timeout=10))
    one_by_one, one_thread = outputs(1, None)
    assert len(threads) == 2 and len(one_thread) == 1
    assert [o.index for o in side_by_side] == [o.index for o in one_by_one] == list(range(38))
    for got, want in zip(side_by_side, one_by_one):
        np.testing.assert_allclose(got.image, want.image, rtol=1e-5, atol=1e-3)


def test_passes_left_running_give_the_outputs_of_waiting_pushes():
    """push_many(wait=False) leaves a round's passes running on the workers and hands its outputs
    back with the next call: the same outputs as pushes that wait (order, states, segments, tags,
    weights' step, live gains, images), through a laser step, skipped previews, the live gain
    changing and inline training whose new weights arrive while a round runs."""
    from umvd_live.adapters.simulation import SimConfig, SimEvent, TwoPhotonSimulator

    # on the shipped prior, the referee judging every output (the warm start never ends here)
    config = EngineConfig(preset="lite", steps_per_frame=0.5, sync_every=2, trainer=TrainerConfig(batch=2, patch=16),
                          workers=2, max_batch=1, cpu_threads=1)
    sim = SimConfig(height=48, width=48, photons=2.0, seed=4, events=(SimEvent.laser(170 / 30.0, 3.0),))
    movie = list(TwoPhotonSimulator(sim).movie(300)[0])
    infer = [i % 9 != 4 for i in range(len(movie))]
    sizes = [1, 2, 2, 5, 2, 2, 30, 2, 2, 2, 40, 2, 2, 2, 34, 2, 2, 60, 2, 2, 2, 50, 2, 2, 2, 36, 2, 2, 2, 2]
    assert sum(sizes) == len(movie)  # in uneven runs

    def stream(wait: bool) -> tuple[list, list[int]]:
        outs, returned, start = [], [], 0
        with StreamDenoiser(config) as den:
            for size in sizes:
                got = den.push_many(movie[start:start + size], infer[start:start + size],
                                    list(range(start, start + size)), wait=wait)
                returned.append(len(got))
                outs += got
                start += size
            outs += den.flush()
            assert [c.index for c in den.changes] == [170]
        return outs, returned

    waited, returned_waiting = stream(True)
    running, returned_running = stream(False)
    assert returned_running != returned_waiting  # outputs did come a call later
    assert [o.index for o in running] == list(range(300))
    # (a skipped preview's state, with no image, is the referee's verdict as its push began: one
    # round older where the round before was still running)
    key = lambda o: (o.index, o.image is None or o.state, o.segment, o.tag, o.model_step, o.amplitude_gain)  # noqa: E731
    assert [key(o) for o in running] == [key(o) for o in waited]
    assert len({o.model_step for o in running}) > 3 and {o.segment for o in running} == {0, 1}
    assert len({o.amplitude_gain for o in running if o.segment == 0}) > 2  # the gain moved in the stream
    for got, want in zip(running, waited):
        if want.image is not None:
            np.testing.assert_array_equal(got.image, want.image)


@pytest.mark.parametrize("wait", [True, False])
def test_a_lone_windows_pass_cut_in_row_bands_gives_the_same_outputs(wait, tmp_path):
    """Frames tall enough (here `fast`'s 320 rows) have a lone window's pass of D, and G, cut in
    row bands that run side by side on the workers: the outputs are those of one pass on one
    thread, to the last bit, pushed one frame at a time, waited for or left running."""
    sim = SimConfig(height=320, width=24, photons=2.0, seed=7)
    movie = list(TwoPhotonSimulator(sim).movie(14)[0])
    config = EngineConfig(preset="fast", device="cpu", train_mode="inline", steps_per_frame=0, max_batch=1,
                          cpu_threads=1)
    with StreamDenoiser(config) as den:  # the shipped prior, loaded: live from the first output
        den.push(movie[0], infer=False)
        den.save_weights(tmp_path / "w.pt")
    config = replace(config, init=str(tmp_path / "w.pt"))

    def stream(workers: int) -> list:
        outs = []
        with StreamDenoiser(replace(config, workers=workers)) as den:
            for frame in movie:
                outs += den.push_many([frame], wait=wait)
            outs += den.flush()
            assert len(den._bands) == (2 if workers == 2 else 0)
        return outs

    banded, whole = stream(2), stream(1)
    assert [o.index for o in banded] == list(range(len(movie)))
    assert sum(o.state == "live" for o in banded) >= len(movie) - 1  # the network's own outputs
    for got, want in zip(banded, whole):
        assert (got.index, got.state) == (want.index, want.state)
        np.testing.assert_array_equal(got.image, want.image)


def test_each_thread_warms_up_the_passes_it_runs(monkeypatch):
    """The stream's start runs on a blank window what each thread will run (`_submit`), side by
    side and nothing twice, since frames arriving meanwhile wait: the pushing thread the first band
    of a lone window; each worker one band of each band shape (both bands of 320 rows have one)
    and a whole window (rounds of several windows)."""
    frame = TwoPhotonSimulator(SimConfig(height=320, width=24, photons=2.0, seed=7)).movie(1)[0][0]
    ran: list[tuple[str, tuple[int, int] | None]] = []
    real = StreamDenoiser._denoise_chunk

    def recorded(self, chunk, band=None):
        ran.append((threading.current_thread().name, None if band is None else (band.start, band.stop)))
        return real(self, chunk, band)

    monkeypatch.setattr(StreamDenoiser, "_denoise_chunk", recorded)
    config = EngineConfig(preset="fast", device="cpu", train_mode="inline", steps_per_frame=0, max_batch=1,
                          cpu_threads=1, workers=2)
    with StreamDenoiser(config) as den:
        assert den.push(frame, infer=False) == []  # the start alone: no window is ready yet
        bands = [(band.start, band.stop) for band in den._bands]
    me = threading.current_thread().name
    assert len(bands) == 2 and bands[0][1] - bands[0][0] == bands[1][1] - bands[1][0]
    assert [band for name, band in ran if name == me] == [bands[0]]
    by_worker: dict[str, list] = {}
    for name, band in ran:
        if name != me:
            by_worker.setdefault(name, []).append(band)
    assert len(by_worker) == 2
    for passes in by_worker.values():
        assert len(passes) == 2 and None in passes and any(band in bands for band in passes)


def fail_the_pass_of(den: StreamDenoiser, t: int) -> None:
    """Make the pass that denoises frame t's window raise, once: by the window, not by counting
    passes, whose order on two workers is the scheduler's."""
    real = den._denoise_chunk

    def denoise_chunk(chunk, band=None):
        if any(index == t for _, index, _, _ in chunk) and not failed:
            failed.append(t)
            raise RuntimeError("a pass failed")
        return real(chunk, band)

    failed: list[int] = []
    den._denoise_chunk = denoise_chunk


@pytest.mark.parametrize("waited", [False, True], ids=["left-running", "waited"])
def test_a_failed_pass_loses_only_its_own_round(tmp_path, waited):
    """A pass that raises on a worker surfaces from the push that completes its round and loses
    that round only (a round per push of 3 frames: t = 0, 1-3, 4-6, ...). Left running, it
    surfaces from the next push, whose own round is kept. Waited for, it surfaces from its own
    push, which had first completed the round left running before it: those outputs come from
    the next call. Every other output still comes, in order."""
    den, _ = run_stream(FAST, noisy_movie(20))
    den.save_weights(tmp_path / "w.pt")
    config = EngineConfig(preset="lite", init=str(tmp_path / "w.pt"), steps_per_frame=0, workers=2, max_batch=1,
                          cpu_threads=1)
    movie = noisy_movie(40, seed=5)
    outs, failures = [], 0
    with StreamDenoiser(config) as den:
        outs += den.push_many(movie[:1])  # builds the network: its blank passes come first
        fail_the_pass_of(den, 5)
        for start in range(1, 40, 3):
            try:
                outs += den.push_many(movie[start:start + 3], wait=waited and start == 7)
            except RoundFailed as exc:
                assert exc.lost == 3 and "a pass failed" in str(exc)
                failures += 1
        outs += den.flush()
    assert failures == 1
    assert [o.index for o in outs] == [t for t in range(40) if t not in {4, 5, 6}]


def test_a_failed_round_at_a_change_or_in_the_flush_loses_only_itself():
    """A pass that fails in the old segment's last round, as a change begins a new segment, loses
    that round only: the push still takes all its frames and begins the new segment, and the
    outputs it made come from the next call. A flush whose last round fails, likewise: the
    outputs it made come from the next `flush`."""
    from umvd_live.adapters.simulation import SimConfig, SimEvent, TwoPhotonSimulator

    sim = SimConfig(height=48, width=48, photons=2.0, seed=4, events=(SimEvent.laser(30 / 30.0, 3.0),))
    movie = list(TwoPhotonSimulator(sim).movie(60)[0])
    # on the shipped prior: the referee judges every output, so every output has a pass
    config = EngineConfig(preset="lite", steps_per_frame=0, workers=2, max_batch=1, cpu_threads=1)
    outs, lost = [], []
    with StreamDenoiser(config) as den:
        outs += den.push_many(movie[:1], tags=[0])
        fail_the_pass_of(den, 28)  # the old segment's last round: t = 27-29, made as frame 30 begins the new one
        for start in range(1, 60, 4):
            try:
                outs += den.push_many(movie[start:start + 4], tags=list(range(start, min(start + 4, 60))), wait=False)
            except RoundFailed as exc:
                lost.append(exc.lost)
                assert den.frames_in == min(start + 4, 60) and den.segment == 1  # every frame taken, the segment begun
        fail_the_pass_of(den, 58)  # the flush's round: t = 57-59
        with pytest.raises(RoundFailed) as failed:
            den.flush()
        outs += den.flush()  # what the failed flush had made
        assert [c.index for c in den.changes] == [30]
    assert lost == [3] and failed.value.lost == 3
    assert [o.index for o in outs] == [t for t in range(60) if t not in {27, 28, 29, 57, 58, 59}]
    assert all(o.tag == o.index for o in outs) and {o.segment for o in outs if o.index >= 30} == {1}


def test_auto_preset_of_a_live_512_stream_on_a_cpu_is_fast_and_of_a_file_lite():
    frame = np.zeros((512, 512), np.uint16)
    with StreamDenoiser(EngineConfig(device="cpu", train_mode="background")) as live:
        live.push(frame)
        assert live.preset == "fast" and live.stats()["preset"] == "fast"
    with StreamDenoiser(EngineConfig(device="cpu", train_mode="inline", steps_per_frame=0)) as file:
        file.push(frame)
        assert file.preset == "lite"


def test_default_workers():
    cpu = torch.device("cpu")
    assert default_workers(cpu, "inline") == 1
    assert default_workers(cpu, "background") == (2 if cpu_cores() >= 2 else 1)
    assert default_workers(torch.device("cuda"), "background") == 1  # a GPU batches instead


@pytest.mark.parametrize("bad, message", [
    ({"window": 6}, "window must be odd"), ({"window": 1}, "window must be odd"),
    ({"preset": "tiny"}, "unknown preset"), ({"device": "gpu"}, "unknown device"),
    ({"precision": "fp16"}, "unknown precision"), ({"context_sides": "future"}, "unknown context_sides"),
    ({"train_mode": "online"}, "unknown train_mode"), ({"context": (8, 0)}, "context blocks"),
    ({"max_batch": 0}, "max_batch must be >= 1"), ({"workers": 0}, "workers must be >= 1"),
    ({"cpu_threads": 0}, "cpu_threads must be >= 1"), ({"sync_every": 0}, "sync_every must be >= 1"),
    ({"warmup_frames": -1}, "warmup_frames must be >= 0"), ({"steps_per_frame": -0.5}, "steps_per_frame"),
    ({"live_train_duty": 0.0}, "live_train_duty"), ({"adapt_train_duty": 1.5}, "adapt_train_duty"),
])
def test_engine_config_refuses_bad_values_when_made(bad, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**bad)
    with pytest.raises(ValueError, match=message):
        replace(FAST, **bad)


def test_engine_config_takes_block_lengths_as_any_sequence():
    assert EngineConfig(context=[8, 24]).context == (8, 24)
    assert EngineConfig(device="cuda:1").device == "cuda:1" and EngineConfig().window == 7


def test_push_many_checks_every_frame_before_taking_any():
    den = StreamDenoiser(FAST)
    movie = noisy_movie(4)
    den.push_many(movie[:2])
    with pytest.raises(ValueError, match="new StreamDenoiser"):
        den.push_many([movie[2], np.zeros((10, 10), np.uint16)])
    assert den.frames_in == 2
    with pytest.raises(ValueError, match="infer flags"):
        den.push_many(movie[2:4], [True])


def test_auto_precision_is_bf16_only_where_the_hardware_has_it():
    assert EngineConfig().precision == "auto"
    assert StreamDenoiser(EngineConfig(device="cpu")).bf16 is cpu_has_native_bf16()
    try:  # torch's probes (every system) agree with the flags /proc/cpuinfo lists (Linux)
        with open("/proc/cpuinfo") as f:
            assert cpu_has_native_bf16() is lists_native_bf16(f.read()) or not torch.backends.mkldnn.is_available()
    except FileNotFoundError:
        pass
    assert lists_native_bf16("flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni")
    assert lists_native_bf16("flags\t\t: fpu avx512f amx_bf16 amx_tile")
    assert not lists_native_bf16("flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni")
    assert StreamDenoiser(EngineConfig(device="cpu", precision="fp32")).bf16 is False
    with pytest.raises(ValueError, match="precision"):
        StreamDenoiser(EngineConfig(precision="fp16"))


def test_the_bf16_path_trains_and_denoises_like_fp32(tmp_path):
    """bf16 autocast around float32 weights (the default on a GPU, and on a CPU with bf16
    arithmetic): training steps stay finite and the outputs match float32 inference with the
    same weights to within bf16's precision."""
    bf16 = replace(FAST, precision="bf16")
    den, _ = run_stream(bf16, noisy_movie(30))
    assert den.bf16 and den.trainer.bf16 and den.stats()["precision"] == "bf16"
    assert den.model_step > 0 and np.isfinite(den.last_loss)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in den.trainer.model.parameters())
    den.save_weights(tmp_path / "w.pt")
    movie = noisy_movie(41, seed=2)
    outputs = {}
    for precision in ("bf16", "fp32"):
        _, outs = run_stream(EngineConfig(preset="lite", init=str(tmp_path / "w.pt"), steps_per_frame=0,
                                          precision=precision), movie)
        outputs[precision] = np.stack([o.image for o in outs])
    assert outputs["bf16"].dtype == np.float32
    error = np.abs(outputs["bf16"] - outputs["fp32"]).mean()
    # bf16 keeps 8 significant bits: the outputs differ (so bf16 did run), by under 1% of the
    # data's own spread.
    assert 0 < error < 0.01 * movie.std(), (error, movie.std())


def test_shape_change_is_refused():
    den = StreamDenoiser(FAST)
    den.push(noisy_movie(1)[0])
    with pytest.raises(ValueError, match="new StreamDenoiser"):
        den.push(np.zeros((10, 10), np.uint16))


def test_nan_frames_are_denoised_but_never_trained_on():
    movie = noisy_movie(20).astype(np.float32)
    movie[5, 3:6, 3:6] = np.nan
    movie[6, 0, 0] = np.inf
    den, outs = run_stream(FAST, movie)
    assert len(outs) == 20 and all(np.isfinite(o.image).all() for o in outs)
    assert all(torch.isfinite(p).all() for p in den.trainer.model.parameters())
    assert 5 not in den.training.replay._frames and 6 not in den.training.replay._frames


@pytest.fixture(scope="module")
def two_photon():
    """(noisy, clean) 64x64 simulated two-photon movie of 150 frames, the noisy one as float32."""
    noisy, clean = TwoPhotonSimulator(SimConfig(height=64, width=64, seed=0)).movie(150)
    return noisy.astype(np.float32), clean


@pytest.mark.parametrize("bad", ["pixel 1e30", "pixel 3e38", "frame 1e30"])
def test_a_huge_finite_pixel_is_a_bad_pixel_and_training_goes_on(two_photon, bad):
    """A finite pixel of 1e30 (a flat-field division by a dead pixel) or float32's largest, or a
    whole frame of them, is no measurement: replaced like NaN, never trained on nor taken for a
    change. Taken as data it was drawn into most batches (its block's activity is huge), each
    loss was inf, and every rollback halved the rate: 1e-6 for good, with outputs of 1e29."""
    noisy, clean = two_photon
    movie, at = noisy.copy(), 60
    where, value = bad.split()
    if where == "pixel":
        movie[at, 20, 30] = float(value)
    else:
        movie[at] = float(value)
    config = EngineConfig(preset="lite", device="cpu", warmup_frames=40, warmup_steps=40, min_train_frames=16,
                          sync_every=4, trainer=TrainerConfig(batch=4, patch=32), cpu_threads=1, workers=1)
    den, outs = run_stream(config, movie)
    images = np.stack([o.image for o in outs])
    assert len(outs) == len(movie) and np.isfinite(images).all()
    trainer = den.trainer
    assert trainer.rollbacks == 0 and trainer.skipped_batches == 0 and trainer.lr == config.trainer.lr
    assert trainer.steps >= len(movie) - 20  # a step a frame from the 16th frame on
    assert den.changes == [] and at not in den.training.replay._frames
    # nothing of the value in the outputs around it: all in the range of the movie's own
    top = float(np.abs(clean).max())
    assert np.abs(images[at - 4:at + 5]).max() < 3 * top
    # and the model goes on learning: the last frames' outputs far closer to the truth than the input
    late = slice(len(movie) - 40, len(movie) - 4)
    error = np.sqrt(np.mean((images[late] - clean[late]) ** 2))
    assert error < 0.4 * np.sqrt(np.mean((noisy[late] - clean[late]) ** 2))


def test_bad_pixels_are_what_no_measurement_gives():
    rng = np.random.default_rng(0)
    dark = (100 + 2 * rng.standard_normal((64, 64))).astype(np.float32)  # a range of ~10 ADU
    assert bad_pixels(dark) is None and sanitize(dark)[0] is dark
    hot = dark.copy()
    hot[5, 5] = 65535  # a saturated pixel: thousands of ranges up, still a measurement
    assert bad_pixels(hot) is None
    for value in (np.nan, np.inf, -np.inf, 1e30, -3e38, 1e12):  # 1e12: 1e11 ranges away
        frame = dark.copy()
        frame[5, 5] = value
        clean, ok = sanitize(frame)
        assert not ok and bad_pixels(frame).sum() == 1
        assert clean[5, 5] == np.median(np.delete(frame.ravel(), 5 * 64 + 5))
    # A frame all of one huge value has no range to be far from: float32's tells (a square that
    # overflows is no value the engine can work with); below it, a whole frame is a change of the
    # acquisition for the change detector, whatever the stream's range was.
    assert bad_pixels(np.full((8, 8), 1e30, np.float32)).all()
    assert bad_pixels(np.full((8, 8), 1e12, np.float32)) is None
    # a sparse frame: real spots far above a near-constant background are measurements
    sparse = np.zeros((512, 512), np.float32)
    sparse[::13, ::11] = 1e-6
    sparse[100, 100] = 100.0
    assert bad_pixels(sparse) is None
    half = np.float16(100) + np.zeros((8, 8), np.float16)
    half[0, 0] = np.inf
    assert bad_pixels(half).sum() == 1
    assert Normalizer.fit(np.where(rng.random((64, 64)) < 0.1, np.float32(3e38), dark)).scale < 20


def test_an_isolated_impulse_is_replaced_and_real_sources_are_not():
    """One pixel of one frame far above all 26 of its neighbours in space and time is no image
    of the sample, nor is a run of up to 3 along a row (a readout spike along the fast axis); a
    source has a neighbour near its value in space or time, however bright."""
    rng = np.random.default_rng(0)
    before, frame, after = rng.poisson(20, (3, 32, 32)).astype(np.uint16)
    spiked = frame.copy()
    spiked[5, 7] = spiked[0, 31] = 65535  # one inside, one at the frame's corner
    cleaned, count = remove_impulses(spiked, before, after, threshold=IMPULSE_RANGES * 20)
    assert count == 2 and cleaned.dtype == np.uint16 and spiked[5, 7] == 65535  # (a copy)
    ring = np.delete(spiked[4:7, 6:9].ravel(), 4)
    assert cleaned[5, 7] == np.rint(np.median(ring)) and cleaned[0, 31] < 100
    assert np.array_equal(np.delete(cleaned.ravel(), [5 * 32 + 7, 31]), np.delete(frame.ravel(), [5 * 32 + 7, 31]))
    assert remove_impulses(spiked, None, after, 120)[1] == 2  # one side is enough (a movie's ends)
    assert remove_impulses(spiked, None, None, 120) == (spiked, 0)  # none: nothing to tell it by
    assert remove_impulses(frame, before, after, 120) == (frame, 0)  # Poisson noise: nothing
    # sources far brighter than the threshold, each with a neighbour near it:
    yy, xx = np.mgrid[0:32, 0:32]

    def spot(y: float, x: float, sigma: float = 1.0) -> np.ndarray:
        return 20 + 3000 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))

    for name, (b, f, a) in {
        "a spot that persists": (spot(10, 10), spot(10, 10), spot(10, 10)),
        "a spot moving a pixel a frame": (spot(10, 9), spot(10, 10), spot(10, 11)),
        "a transient that rises in a frame and decays": (0 * spot(10, 10) + 20, spot(10, 10), 0.7 * spot(10, 10) + 6),
        "a spot in one frame, sampled at its width (FWHM 2.4 px)": (before, spot(10, 10), after),
        "the same spot between two pixels of a row": (before, spot(10, 10.5), after),
        "a spike two pixels tall (across the fast axis)":
            (before, np.where((abs(yy - 5.5) < 1) & (xx == 7), 65535, 20), after),
        "a 2x2 spike": (before, np.where((abs(yy - 5.5) < 1) & (abs(xx - 7.5) < 1), 65535, 20), after),
        "a spike four pixels long": (before, np.where((yy == 5) & (abs(xx - 8.5) < 2), 65535, 20), after),
    }.items():
        assert remove_impulses(f.astype(np.float32), b, a, 120)[1] == 0, name
    # a readout spike along the fast axis, 2 and 3 pixels long, one at the frame's edge:
    runs = frame.copy()
    runs[5, 7:9] = 65535
    runs[20, 29:32] = [40000, 65535, 50000]
    cleaned, count = remove_impulses(runs, before, after, 120)
    assert count == 5 and cleaned[5, 7:9].max() < 100 and cleaned[20, 29:32].max() < 100
    ring = np.r_[runs[4, 6:10], runs[6, 6:10], runs[5, 6], runs[5, 9]]
    assert (cleaned[5, 7:9] == np.rint(np.median(ring))).all()
    assert np.array_equal(np.delete(cleaned, [5, 20], 0), np.delete(frame, [5, 20], 0))


def test_an_impulse_is_never_trained_on_nor_spread_in_a_file(two_photon):
    """A dim movie without offset and one pixel of 65535 in one frame: drawn again and again by
    the search for activity, its loss looked like divergence, and 23 rollbacks took the rate to
    its floor; the outputs of the frames around it showed it (docs/benchmarks.md, "One pixel of
    one frame"). `pretrain` (`ImpulseScreen`) and a file's final pass replace it."""
    noisy, clean = two_photon
    movie = np.clip(noisy[:60] / 200.0, 0, None).astype(np.uint16)  # counts of tens, range ~40
    at, y, x = 30, 20, 30
    movie[at, y, x] = 65535
    config = EngineConfig(preset="lite", device="cpu", warmup_frames=20, warmup_steps=60, min_train_frames=16,
                          trainer=TrainerConfig(batch=4, patch=32), cpu_threads=1, workers=1, context=())
    den = StreamDenoiser(config)
    den.pretrain(movie, 60)
    assert den.stats()["impulses"] == 1
    assert den.trainer.rollbacks == 0 and den.trainer.lr == config.trainer.lr
    images = np.stack([o.image for o in den.denoise_frames(movie, list(range(len(movie))))])
    assert images[at - 4:at + 5, y, x].max() < 2 * np.percentile(movie, 99.9)  # the window's mean: 65535 / 7


def test_no_live_output_shows_an_impulse_and_a_source_that_stays_is_kept(two_photon, tmp_path):
    """The frame loop tests each frame as it comes, against the frame before it, and for good once
    the next has come (`ImpulseScreen`), holding each test's copy in the window and the context
    history: before, the outputs of every window that held the impulse showed it, and so did the
    outputs whose context blocks held it (a block's mean: 65535 over its span). The replay buffer
    gets the frame tested for good. A one-pixel source that switches on and stays, which the first
    test alone takes for an impulse, is back in the window with the next frame and trained on."""
    noisy, _ = two_photon
    movie = np.clip(noisy[:70] / 200.0, 0, None).astype(np.uint16)  # counts of tens, range ~40
    at, y, x = 30, 20, 30
    config = EngineConfig(preset="lite", device="cpu", train_mode="inline", steps_per_frame=0, cpu_threads=1,
                          workers=1, max_batch=1)
    with StreamDenoiser(config) as den:  # the shipped prior: live from the first output
        den.push(movie[0], infer=False)
        den.save_weights(tmp_path / "w.pt")
    config = replace(config, init=str(tmp_path / "w.pt"))
    spiked = movie.copy()
    spiked[at, y, x] = 65535
    den, outs = run_stream(config, spiked)
    assert den.stats()["impulses"] == 1
    assert den.training.replay._frames[at][0][0, y, x] < 100  # the trainer draws the cleaned copy
    assert max(den.spec.context) > 1  # (the context blocks are exercised)
    images = np.stack([o.image for o in outs])
    assert images[:, y, x].max() < 2 * np.percentile(movie, 99.9), images[:, y, x].max()

    staying = movie.copy()
    staying[at:, y, x] += 3000  # a source of one pixel, on from frame 30
    den, outs = run_stream(config, staying)
    assert den.stats()["impulses"] == 0
    held = den.training.replay._frames[at][0][0, y, x]
    assert held == pytest.approx(den.normalizer.forward(staying[at, y, x]), rel=1e-5)  # trained on as it is
    unscreened = StreamDenoiser(config)
    unscreened._screen.threshold = np.inf  # (what the frame loop showed before it tested frames)
    images, before = (np.stack([o.image for o in run]) for run in
                      (outs, [o for f in staying for o in unscreened.push(f)] + unscreened.flush()))
    k = den.k
    assert np.array_equal(images[at - k + 1:], before[at - k + 1:])  # every output after the first test's one
    assert images[at - k, y, x] < before[at - k, y, x]  # (which took the source's first frame for an impulse)


def test_the_impulse_screen_shows_a_frame_as_each_test_gives_it():
    """`ImpulseScreen` returns each frame twice: as it comes (against the frame before it), then
    for good once the next has come; ``reshow`` says the window must take the second copy. A
    recorded movie's frames (`add_recorded`) are tested for good alone, to the same copies."""
    rng = np.random.default_rng(2)
    frames = rng.poisson(20, (6, 16, 16)).astype(np.float32)
    frames[2, 5, 5] = 1e4  # an impulse: gone in frame 3
    frames[4:, 9, 9] = 1e4  # a source that switches on at frame 4 and stays
    screen: ImpulseScreen[str] = ImpulseScreen(threshold=120)
    results = [screen.add(i, f, f"frame {i}") for i, f in enumerate(frames)]
    assert results[0][0] is None and all(not newest.reshow for _, newest in results[:2])
    impulse_now, impulse_for_good = results[2][1], results[3][0]
    assert impulse_now.reshow and impulse_now.frame[5, 5] < 100  # taken out as it comes
    assert impulse_for_good is not None and impulse_for_good.replaced == 1 and not impulse_for_good.reshow
    assert impulse_for_good.held == "frame 2"
    source_now, source_for_good = results[4][1], results[5][0]
    assert source_now.reshow and source_now.frame[9, 9] < 100  # taken for one as it comes...
    assert source_for_good is not None and source_for_good.reshow  # ...and given back with the next frame
    assert source_for_good.replaced == 0 and source_for_good.frame[9, 9] == 1e4
    last = screen.end()
    assert last is not None and last.index == 5 and not last.reshow and screen.impulses == 1

    recorded: ImpulseScreen[str] = ImpulseScreen(threshold=120, where=None)  # a file's frames: tested for good alone
    for_good = [recorded.add_recorded(i, f, f"frame {i}") for i, f in enumerate(frames)] + [recorded.end()]
    assert for_good[0] is None and recorded.impulses == 1
    expected = [tested for tested, _ in results[1:]] + [last]
    assert all(a is not None and b is not None and a.index == b.index and a.replaced == b.replaced
               and np.array_equal(a.frame, b.frame) for a, b in zip(for_good[1:], expected, strict=True))


def test_a_live_streams_impulses_leave_its_amplitude_gain_as_it_was(tmp_path):
    """The live amplitude sums each frame's lag products: one pixel of 65535 swamped a chunk's,
    and three of them left this stream without its gain (1.000 against 1.309; docs/benchmarks.md,
    "The frame loop tests each frame for an impulse"). It now sums the tested frames."""
    noisy, _ = TwoPhotonSimulator(SimConfig(height=64, width=64, seed=0)).movie(300)
    movie = np.clip(noisy.astype(np.float32) / 200.0, 0, None).astype(np.uint16)
    config = EngineConfig(preset="lite", device="cpu", train_mode="inline", steps_per_frame=0, cpu_threads=1,
                          workers=1, max_batch=1)
    with StreamDenoiser(config) as den:
        den.push(movie[0], infer=False)
        den.save_weights(tmp_path / "w.pt")
    config = replace(config, init=str(tmp_path / "w.pt"))
    spiked = movie.copy()
    spiked[[60, 150, 240], 20, 30] = 65535
    gains = []
    for m in (movie, spiked):
        den, _ = run_stream(config, m)
        gains.append(den.stats()["amplitude"]["gain"])
    assert gains[0] > 1.1  # (a gain to keep)
    assert gains[1] == pytest.approx(gains[0], abs=0.03), gains


def test_a_stream_whose_first_frame_is_constant_fits_its_range_on_the_frames_after_it(two_photon):
    """A camera's first frame before the shutter opens is all one value: fitted on it, the range
    was the fallback of 1 unit, the segment ran in raw units (every batch beyond the network's
    range: never trained on), and judged against that range every later frame was replaced by a
    constant, for good. The normaliser waits for a frame with a range, and pixels are judged by
    their own frame's."""
    noisy, _ = two_photon
    movie = np.concatenate([np.zeros((1, 64, 64), np.float32), 2e7 + 100 * noisy[:30]])
    config = EngineConfig(preset="lite", device="cpu", warmup_frames=40, warmup_steps=4, min_train_frames=16,
                          trainer=TrainerConfig(batch=2, patch=32), cpu_threads=1, workers=1)
    den, outs = run_stream(config, movie)
    assert Normalizer.fit(movie[1]) == den.normalizer
    assert den.trainer.steps > 0 and den.trainer.skipped_batches == 0
    late = np.stack([o.image for o in outs[8:]])
    assert late.std(axis=(1, 2)).min() > 10 and np.abs(late.mean() - movie[8:].mean()) < 0.01 * movie[8:].mean()


def test_a_batch_beyond_the_networks_range_is_skipped_not_a_divergence():
    """Frames the stream sanitised never hold such values, but anything added to a replay buffer
    is drawn: a batch that does says nothing of the weights, so no rollback, no lower rate."""
    den = _trained()
    trainer, replay = den.trainer, den.training.replay
    lr, steps, rollbacks = trainer.lr, trainer.steps, trainer.rollbacks
    good = dict(replay._frames)
    for index, (frame, segment) in good.items():
        replay.add(index, torch.full_like(frame, 2 * MAX_RANGES), segment)  # (whatever patch is drawn)
    assert trainer.step(replay) is None
    assert (trainer.skipped_batches, trainer.rollbacks, trainer.lr, trainer.steps) == (1, rollbacks, lr, steps)
    for index, (frame, segment) in good.items():
        replay.add(index, frame, segment)
    assert trainer.step(replay) is not None and trainer.lr == lr


def test_a_dropped_first_frame_leaves_the_normaliser_to_the_first_frame_with_pixels():
    """Fitted on an all-NaN frame the normaliser would be (0, 1): the segment in raw units."""
    movie = noisy_movie(12).astype(np.float32)
    movie[0] = np.nan
    fitted = Normalizer.fit(movie[1])
    den, outs = run_stream(FAST, movie)
    assert den._normalizers[0] == fitted and all(np.isfinite(o.image).all() for o in outs)
    den = StreamDenoiser(FAST)
    den.pretrain(movie, 2)
    assert den._normalizers[0] == fitted


def test_a_constant_frame_at_the_int16_minimum_gets_a_positive_scale():
    """A constant frame has no range: its scale is its magnitude, which int16 -32768 must not wrap."""
    assert Normalizer.fit(np.full((4, 4), -32768, np.int16)) == Normalizer(-32768.0, 32768.0)


def test_pretraining_keeps_the_replay_byte_limit(monkeypatch):
    """`pretrain` holds the whole movie only where the bytes allow, and leaves the stream's bound."""
    movie = noisy_movie(150)
    config = replace(FAST, trainer=replace(FAST.trainer, replay_bytes=120 * movie[0].size * 4))
    den = StreamDenoiser(config)
    held = []
    run = den.training.run
    monkeypatch.setattr(den.training, "run", lambda steps: (held.append(len(den.training.replay)), run(steps)))
    den.pretrain(movie, 1)
    assert held == [120] and den.training.replay.capacity == 120


def test_checkpoint_round_trip(tmp_path):
    den, _ = run_stream(FAST, noisy_movie(20))
    path = tmp_path / "w.pt"
    den.save_weights(path)
    assert not list(tmp_path.glob(".*")), "no temporary file left behind"
    again = StreamDenoiser(EngineConfig(preset="lite", init=str(path)))
    outs = again.push(noisy_movie(1)[0])
    assert again.state == "live", "loaded weights skip the warm start"
    assert again.weights_hash() == den.weights_hash()
    assert again.model_step == den.model_step and outs == []


class Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_checkpoints_never_unpickle_objects(tmp_path):
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump(Payload(), fh)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    torch.save({"format": "umvd-live-weights/1", "info": {}, "state_dict": {"x": Payload()}}, tmp_path / "e2.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "e2.pt")


def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path):
    den, _ = run_stream(FAST, noisy_movie(20))
    good = tmp_path / "w.pt"
    den.save_weights(good)
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"some": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a umvd-live model"):
        load_checkpoint(tmp_path / "other.pt")
    paper = StreamDenoiser(EngineConfig(preset="paper", init=str(good)))
    with pytest.raises(CheckpointError, match="preset"):
        paper.push(noisy_movie(1)[0])


def _trained(steps=30):
    den = StreamDenoiser(FAST)
    for frame in noisy_movie(16):
        den.push(frame)
    den.train_for(steps)
    return den


def test_divergence_guard_rolls_back_non_finite_weights():
    den = _trained()
    trainer = den.trainer
    lr, rollbacks = trainer.lr, trainer.rollbacks
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    assert trainer.step(den.training.replay) is None
    assert trainer.rollbacks == rollbacks + 1
    assert trainer.lr == pytest.approx(lr / 2)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.step(den.training.replay) is not None, "training goes on after the rollback"


def test_divergence_guard_catches_a_collapsed_output():
    den = _trained(60)
    trainer = den.trainer
    with torch.no_grad():
        head = trainer.model.D.head[-1]
        head.weight.zero_()
        head.bias.fill_(0.3)  # a constant image
    rollbacks = trainer.rollbacks
    assert trainer.step(den.training.replay) is None
    assert trainer.rollbacks == rollbacks + 1
    assert float(trainer.model.D.head[-1].weight.abs().sum()) > 0


def test_divergence_guard_catches_an_exploding_loss():
    den = _trained(60)
    trainer = den.trainer
    with torch.no_grad():
        trainer.model.D.head[-1].weight.mul_(1e4)
    rollbacks = trainer.rollbacks
    assert trainer.step(den.training.replay) is None
    assert trainer.rollbacks == rollbacks + 1


def test_a_model_file_that_does_not_fit_leaves_the_stream_its_own_weights(tmp_path):
    """`load_state_dict` copies the tensors that fit before refusing the rest: a file with one
    tensor missing, one too many or one of another shape is refused before any is copied."""
    den = _trained(4)
    den.save_weights(tmp_path / "w.pt")
    state, info = load_checkpoint(tmp_path / "w.pt")
    own = den.weights_hash()
    first = sorted(state)[0]
    other = {k: v + 0.01 for k, v in state.items()}
    for name, broken in [("missing", {k: v for k, v in other.items() if k != first}),
                         ("unexpected", {**other, "extra": torch.zeros(3)}),
                         ("other shapes", {**other, first: other[first][..., :1]})]:
        save_checkpoint(tmp_path / "b.pt", broken, info)
        with pytest.raises(CheckpointError, match=name):
            den.load_weights(tmp_path / "b.pt")
        assert den.weights_hash() == own and den.training.take_published() is None


def test_a_rollback_after_loading_weights_returns_to_the_loaded_ones(tmp_path):
    """The guard's last good weights, Adam's moments and the running means start afresh with
    weights loaded mid-stream: a rollback must not bring back the weights they replaced."""
    den = _trained(4)
    den.save_weights(tmp_path / "w.pt")
    state, info = load_checkpoint(tmp_path / "w.pt")
    loaded = {k: v + 0.05 for k, v in state.items()}
    save_checkpoint(tmp_path / "other.pt", loaded, {**info, "step": 1234})
    den.load_weights(tmp_path / "other.pt")
    trainer = den.trainer
    assert trainer.steps == 1234 and not trainer.optimizer.state
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    assert trainer.step(den.training.replay) is None and trainer.rollbacks == 1
    assert weights_hash(trainer.model.state_dict()) == weights_hash(loaded)


def test_load_weights_adopts_weights_already_read_without_reading_the_file_again(tmp_path):
    """Given the file's weights already read (the daemon's `load_model` reads, checks and hashes
    them first), `load_weights` adopts those and never reads the file: mid-stream, and before the
    first frame, which then builds the network from them."""
    den = _trained(4)
    den.save_weights(tmp_path / "w.pt")
    state, info = load_checkpoint(tmp_path / "w.pt")
    given = SavedWeights({k: v + 0.05 for k, v in state.items()}, {**info, "step": 77})
    (tmp_path / "w.pt").unlink()  # nothing left to read
    den.load_weights(tmp_path / "w.pt", given)
    assert den.trainer.steps == 77 and den.weights_hash() == weights_hash(given.state_dict)
    fresh = StreamDenoiser(FAST)
    fresh.load_weights(tmp_path / "w.pt", given)
    fresh.push(noisy_movie(1)[0])
    assert fresh.trainer.steps == 77 and fresh.start_hash == weights_hash(given.state_dict)


def test_an_idle_trainer_does_not_publish_the_same_weights_again():
    """With nothing to train on the step count stays put: publishing (and adopting) the same
    weights again would only take time from the frame loop. A rollback's weights are published."""
    movie = noisy_movie(12).astype(np.float32)
    movie[:, 0, 0] = np.nan  # never trained on
    den = StreamDenoiser(FAST)
    den.push(movie[0])
    den.training.run(1)
    assert den.training.take_published() is not None  # the first weights
    den.training.run(3)
    assert den.trainer.steps == 0 and den.training.take_published() is None
    den = _trained(4)
    steps = den.trainer.steps
    assert steps % FAST.sync_every == 0 and den.training.take_published() is None  # (adopted)
    with torch.no_grad():
        next(den.trainer.model.parameters()).fill_(float("nan"))
    den.training.run(1)  # a rollback: the same step count, other weights
    published = den.training.take_published()
    assert (den.trainer.steps, den.trainer.rollbacks) == (steps, 1) and published is not None
    assert all(torch.isfinite(t).all() for t in published[1].values())


@pytest.mark.parametrize("huge", ["pixel", "block"])
def test_a_huge_finite_pixel_leaves_the_search_for_activity_drawing(huge):
    """A pixel of 1e30 (a flat-field division by a dead pixel) squares to inf in float32, and a
    block of float32's largest values has an infinite mean: no NaN draw, still a full batch."""
    replay = ReplayBuffer(3, 20)
    frames = torch.from_numpy(np.random.default_rng(0).random((10, 1, 24, 24), np.float32))
    if huge == "pixel":
        frames[4, 0, 5, 5] = 1e30
    else:
        frames[4, 0, :8, :8] = 3e38
    for i, frame in enumerate(frames):
        replay.add(i, frame)
    batch = replay.sample(np.random.default_rng(0), 8, 16, active_share=1.0)
    assert batch is not None and batch.shape == (8, 3, 1, 16, 16)


def test_adam_is_fused_only_where_torch_has_the_kernel(monkeypatch):
    """torch fuses Adam on a CPU from 2.4 on (this one: fused); before, on CUDA only, and
    asking for it on a CPU fails: the trainer then takes the default Adam."""
    assert _trained(2).trainer.optimizer.param_groups[0]["fused"]
    for where in ("torch.utils._foreach_utils", "torch.optim.optimizer"):  # as torch 2.2 answers
        monkeypatch.setattr(importlib.import_module(where), "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    trainer = _trained(2).trainer
    assert trainer.steps >= 2 and not trainer.optimizer.param_groups[0]["fused"]


def test_background_training_runs_beside_push():
    with StreamDenoiser(BACKGROUND) as den:
        movie = noisy_movie(12)
        trained_in_background(den, movie, 6)
        den.pause_training()
        outs = den.push(movie[0])
        assert den.model_step >= 6 and outs[0].state == "live"
        steps = den.model_step
        time.sleep(0.3)
        assert den.model_step <= steps + 1, "paused training stays paused"


def test_saved_weights_are_described_by_what_was_written_while_training_goes_on(tmp_path):
    """`save_weights` returns the step and hash of the file it wrote, not of the trainer's weights
    a moment later (the daemon's save_model reply says them)."""
    with StreamDenoiser(BACKGROUND) as den:
        trained_in_background(den, noisy_movie(12), 4)
        for i in range(3):  # the trainer steps on meanwhile
            step, digest = den.save_weights(tmp_path / f"w{i}.pt")
            state, info = load_checkpoint(tmp_path / f"w{i}.pt")
            assert (info["step"], weights_hash(state)) == (step, digest)
            assert isinstance(den.weights_hash(), str)


def test_a_failing_background_step_does_not_end_training(monkeypatch):
    """A step that raises is logged and counted; the trainer thread goes on stepping."""
    step, failures = OnlineTrainer.step, []

    def fails_twice(self, *args, **kwargs):
        if len(failures) < 2:
            failures.append(self.steps)
            raise RuntimeError("a step that fails")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(OnlineTrainer, "step", fails_twice)
    with StreamDenoiser(BACKGROUND) as den:
        trained_in_background(den, noisy_movie(12), 6)
        assert len(failures) == 2 and den.model_step >= 6
        assert den.stats()["failed_steps"] == 2 and den.training._thread.is_alive()


def test_context_blocks_are_configurable_and_checked_against_weights(tmp_path):

    assert StreamDenoiser(FAST).config.context is None  # the preset's: lite has blocks
    den, outs = run_stream(replace(FAST, context=(2, 5)), noisy_movie(40))
    assert den.spec.context == (2, 5) and [o.index for o in outs] == list(range(40))
    assert outs[-1].state == "live" and np.isfinite(outs[-1].image).all()
    bare, _ = run_stream(replace(FAST, context=()), noisy_movie(20))
    assert bare.spec.context == () and bare.trainer.model.D.enc1[0][0].in_channels == 7 * bare.spec.g_channels
    path = tmp_path / "w.pt"
    den.save_weights(path)
    assert StreamDenoiser(EngineConfig(init=str(path))).push(noisy_movie(1)[0]) == []  # the file's blocks
    with pytest.raises(CheckpointError, match="context blocks"):
        StreamDenoiser(EngineConfig(init=str(path), context=(8,))).push(noisy_movie(1)[0])


def test_context_option_parses_block_lengths_or_none():
    import argparse

    from umvd_live.apps.cli import build_parser, parse_context

    assert parse_context("8,24,64") == (8, 24, 64) and parse_context("none") == ()
    for bad in ("8,x", "0,4"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_context(bad)
    args = build_parser().parse_args(["denoise", "in.tif", "out.tif", "--context", "4,8"])
    assert args.context == (4, 8)


@pytest.mark.parametrize("seed", [0, 2])
def test_the_first_training_steps_from_a_prior_keep_its_output_level(seed):
    """Adam's first steps move every weight by about lr whatever its gradient: without a ramp of
    the learning rate, 8 steps from the shipped prior moved the output level of a simulated movie
    by 7-12 % of its signal (the preview darkened by that much at the first new weights). With the
    default ramp, by -1.4 to +3.2 % (seeds 0 and 2, eight draws of the trainer's batches each;
    tools/first_steps_level.py): the draws' spread, which a bound of 3 % met only by chance."""
    tool = load_tool("first_steps_level")
    assert abs(tool.level_change(128, seed, 8, "lite", None)) < 0.04


def test_the_learning_rate_ramps_up_whenever_adam_starts_afresh(tmp_path):
    config = replace(FAST, warmup_frames=1000, steps_per_frame=0, trainer=replace(FAST.trainer, lr_warmup_steps=4))
    den = StreamDenoiser(config)
    for frame in noisy_movie(16):
        den.push(frame)
    trainer = den.trainer
    applied = []
    for _ in range(6):
        den.train_for(1)
        applied.append(trainer.optimizer.param_groups[0]["lr"])
    lr = config.trainer.lr
    assert applied == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr, lr, lr]) and trainer.lr == lr
    den.save_weights(tmp_path / "w.pt")
    den.load_weights(tmp_path / "w.pt")  # Adam's moments start afresh: so does the ramp
    den.train_for(1)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr / 4)


def test_inference_gets_the_running_average_whose_level_holds_between_steps():
    """From one training step to the next the output level moves by a few percent (the batch's
    noise), and the preview shows each published step's level; inference gets the running average
    of the weights, whose level moves far less (live 256²: rms 2.8 % -> 0.6 %)."""
    import copy

    from umvd_live.adapters.simulation import TwoPhotonSimulator
    from umvd_live.apps.harness import sim_config

    config = sim_config(128, 128, 30.0, 2.0, 0)
    noisy, _ = TwoPhotonSimulator(config).movie(40)
    den = StreamDenoiser(EngineConfig(preset="lite", device="cpu", train_mode="inline", steps_per_frame=0, seed=0))
    for frame in noisy:
        den.push(frame)
    trainer = den.trainer
    n = trainer.model.spec.window
    windows = torch.stack([torch.from_numpy(den.normalizer.forward(noisy[i - n // 2:i + n // 2 + 1]))
                           for i in range(10, 30, 4)])[:, :, None]
    averaged = copy.deepcopy(trainer.model).eval()

    def level(model) -> float:
        with torch.no_grad():
            return float(model.eval()(windows).mean())

    own, average = [], []
    for _ in range(10):
        den.train_for(8)
        own.append(level(trainer.model))
        averaged.load_state_dict(trainer.inference_weights())
        average.append(level(averaged))
    assert np.std(np.diff(average)) < 0.5 * np.std(np.diff(own)), (own, average)
    den.training.publish()
    published = den.training.take_published()  # what the stream adopts is the average
    assert published is not None and all(torch.equal(published[1][k], v)
                                         for k, v in trainer.inference_weights().items())
    trainer.restart_average()  # (a change: the stream adapts) the trainer's own weights then
    assert all(torch.equal(trainer.inference_weights()[k], v) for k, v in trainer.model.state_dict().items())
