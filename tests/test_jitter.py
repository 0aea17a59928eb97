"""`engine.jitter`: each output moved with its own frame's rigid jitter, where the field measurably
moves as one, and left as it is where it does not (a still field, cells that move on their own)."""

import numpy as np
import pytest
from scipy import ndimage

from umvd_live.apps.denoise import describe_jitter
from umvd_live.engine.jitter import (
    MAX_LEVERAGE,
    MAX_SHIFT_PX,
    MIN_FRAMES,
    FrameSpline,
    LiveJitter,
    follow_jitter,
    measure_shifts,
    shift_image,
)

FRAMES, SIZE, NOISE = 128, 64, 4.0


def field(rng: np.random.Generator) -> np.ndarray:
    """Blobs of a cell's size and a few thin lines, on a level of 100: something to register."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    image = np.full((SIZE, SIZE), 100.0)
    for _ in range(14):
        y, x, r = rng.uniform(6, SIZE - 6, 2).tolist() + [rng.uniform(1.5, 3.0)]
        image += rng.uniform(40, 120) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * r * r))
    for _ in range(3):
        angle, offset = rng.uniform(0, np.pi), rng.uniform(-20, 20)
        distance = (yy - SIZE / 2) * np.cos(angle) - (xx - SIZE / 2) * np.sin(angle) - offset
        image += 60.0 * np.exp(-distance**2 / (2 * 0.7**2))
    return image


def moved(image: np.ndarray, shift) -> np.ndarray:
    return ndimage.shift(image, shift, order=3, mode="nearest")


def movie(jitter_px: float, seed: int = 0, halves_apart: bool = False):
    """(noisy, truth, blind outputs): the truth moves by a white jitter (drift left out: the outputs
    follow it); a blind output knows the field but not the frame's jitter. ``halves_apart``: the
    upper and lower halves jitter independently (no motion shared by the field)."""
    rng = np.random.default_rng(seed)
    base = field(rng)
    shifts = rng.normal(0, jitter_px, (FRAMES, 2))
    other = rng.normal(0, jitter_px, (FRAMES, 2))
    truth = np.stack([moved(base, s) for s in shifts])
    if halves_apart:
        truth[:, SIZE // 2:] = np.stack([moved(base, s) for s in other])[:, SIZE // 2:]
    noisy = (truth + rng.normal(0, NOISE, truth.shape)).astype(np.float32)
    outputs = [base.astype(np.float32).copy() for _ in range(FRAMES)]
    return noisy, truth, outputs


def error(outputs, truth) -> float:
    return float(np.mean((np.stack(outputs) - truth) ** 2))


def test_outputs_follow_a_jitter_the_whole_field_shares():
    noisy, truth, outputs = movie(0.3)
    before = error(outputs, truth)
    done = follow_jitter(noisy, outputs, scored=np.ones(FRAMES, bool), first=10)
    assert done.first == 10 and done.frames == FRAMES and done.reason == ""
    assert min(done.weight) > 0.9, done
    assert done.jitter_px == pytest.approx((0.3, 0.3), abs=0.06)
    assert max(done.noise_px) < 0.05
    assert error(outputs, truth) < 0.1 * before  # the jitter was most of each output's error


@pytest.mark.parametrize("halves_apart", [False, True], ids=["still", "halves-apart"])
def test_a_field_that_does_not_move_as_one_is_left_as_it_is(halves_apart):
    noisy, truth, outputs = movie(0.0 if not halves_apart else 0.3, seed=1, halves_apart=halves_apart)
    as_made = [o.copy() for o in outputs]
    done = follow_jitter(noisy, outputs, scored=np.ones(FRAMES, bool))
    assert done.weight == (0.0, 0.0) and done.reason == "no motion shared by the field", done
    for o, m in zip(outputs, as_made):
        np.testing.assert_array_equal(o, m)


def test_the_referees_rule_and_the_scored_frames():
    """Where the window's blind mean lies nearer the noisy frame, an output stays as it was; the
    referee's own means (not scored) are never moved; too few frames are not measured."""
    noisy, truth, outputs = movie(0.3, seed=2)
    scored = np.ones(FRAMES, bool)
    scored[5] = False
    outputs[10][3, 3] = np.nan  # an output that cannot be measured: counted, left as it is
    as_made = [o.copy() for o in outputs]
    done = follow_jitter(noisy, outputs, scored=scored, first=100,
                         neighbours=lambda t: noisy[t] if t % 2 else truth[t] + 100.0)
    assert done.unmoved == tuple(100 + t for t in range(1, FRAMES, 2) if t != 5)
    assert done.unmeasured == 1
    assert set(done.shifts) == {100 + t for t in range(0, FRAMES, 2) if t != 10}  # each moved frame's shift
    assert describe_jitter([done]).endswith("frames left unmoved by the referee, 1 frames not measured)")
    for t in range(FRAMES):
        if t % 2 or t in (5, 10):
            np.testing.assert_array_equal(outputs[t], as_made[t])
        else:
            assert not np.array_equal(outputs[t], as_made[t]), t
    few = follow_jitter(noisy[:40], [o.copy() for o in as_made[:40]], scored=np.ones(40, bool))
    assert few.weight == (0.0, 0.0) and "too few frames" in few.reason


def test_shifts_are_measured_in_pixels_and_capped():
    rng = np.random.default_rng(3)
    base = field(rng)
    shifts = measure_shifts(moved(base, (0.25, -0.4)), base)
    assert shifts is not None
    np.testing.assert_allclose(shifts.whole, [0.25, -0.4], atol=0.005)  # the whole frame, two steps
    np.testing.assert_allclose([shifts.upper, shifts.lower], [[0.25, -0.4]] * 2, atol=0.04)  # each half, a step
    assert measure_shifts(base, np.full_like(base, 7.0)) is None  # a flat output tells nothing
    spoilt = base.copy()
    spoilt[3, 3] = np.nan
    assert measure_shifts(base, spoilt) is None  # nor one that is not a number
    empty_half = base.copy()
    empty_half[SIZE // 2:] = 100.0
    assert measure_shifts(empty_half, empty_half) is None  # nothing to test the motion against
    noisy, truth, outputs = movie(0.3, seed=4)
    noisy[7] = moved(truth[7], (3.0, 0.0)).astype(np.float32)  # a jump, not a jitter
    before = outputs[7].copy()
    follow_jitter(noisy, outputs, scored=np.ones(FRAMES, bool))
    # moved by at most MAX_SHIFT_PX: the output's new centre of mass
    shift = ndimage.center_of_mass(outputs[7] - 100.0)[0] - ndimage.center_of_mass(before - 100.0)[0]
    assert 0.5 < shift <= MAX_SHIFT_PX + 0.05


def test_a_level_ramp_and_small_frames():
    """The frame's level is fitted alongside the shift, so a ramp of brightness across the field
    (vignetting: its gradient is a level, not an edge) does not shorten the shift; frames too small
    to halve are not measured, and raise nothing."""
    rng = np.random.default_rng(6)
    base = field(rng) + 5.0 * np.mgrid[:SIZE, :SIZE][0]  # 5 grey levels per row
    shifts = measure_shifts(moved(base, (0.3, 0.0)), base)
    np.testing.assert_allclose(shifts.whole, [0.3, 0.0], atol=0.005)
    np.testing.assert_allclose([shifts.upper, shifts.lower], [[0.3, 0.0]] * 2, atol=0.02)
    for shape in ((1, SIZE), (SIZE, 1), (3, SIZE), (2, 2)):
        assert measure_shifts(np.ones(shape), np.arange(np.prod(shape), dtype=float).reshape(shape)) is None


def test_the_noise_of_halves_that_hold_unequal_structure():
    """Where one half holds far less to register on, the whole frame's estimate rests on the other:
    its noise is the halves' difference's scaled by their shares of the gradient energy (not a
    quarter of it, which would read it several times too large and weigh the shifts down)."""
    rng = np.random.default_rng(7)
    base = field(rng)
    base[SIZE // 2:] = 100.0 + 0.35 * (base[SIZE // 2:] - 100.0)  # an eighth of the energy
    shifts = rng.normal(0, 0.3, (FRAMES, 2))
    noisy = np.stack([moved(base, s) for s in shifts]) + rng.normal(0, 3 * NOISE, (FRAMES, SIZE, SIZE))
    outputs = [base.astype(np.float32) for _ in range(FRAMES)]
    errors = np.array([measure_shifts(n, o).whole for n, o in zip(noisy, outputs)]) - shifts
    done = follow_jitter(noisy.astype(np.float32), outputs, scored=np.ones(FRAMES, bool))
    truth = np.sqrt(((errors - errors.mean(0)) ** 2).mean(0))
    np.testing.assert_allclose(done.noise_px, truth, rtol=0.3)


def test_a_constant_offset_is_placed_and_the_jitter_about_it_weighed():
    """The weights are measured about the segment's mean placement of its outputs, and applied
    about it: a constant offset of the outputs from their frames (measured over all of them) is
    taken out whole, the jitter about it by its weight."""
    noisy, truth, outputs = movie(0.3, seed=8)
    outputs = [moved(o, (-0.4, 0.0)).astype(np.float32) for o in outputs]
    before = np.array([measure_shifts(n, o).whole for n, o in zip(noisy, outputs)])
    done = follow_jitter(noisy, outputs, scored=np.ones(FRAMES, bool))
    after = np.array([measure_shifts(n, o).whole for n, o in zip(noisy, outputs)])
    assert min(done.weight) > 0.9
    np.testing.assert_allclose(before.mean(0), [0.4, 0.0], atol=0.05)
    np.testing.assert_allclose(after.mean(0), [0.0, 0.0], atol=0.02)
    assert (after.std(0) < 0.2 * before.std(0)).all()


def test_no_pixel_moves_its_own_output_by_more_than_its_leverage():
    """A pixel's noise reaches its own output through the frame's shift by its leverage; on a
    field of a few sharp cells the steepest pixels are weighed down to `MAX_LEVERAGE`, and a field
    too sparse for any weighing (two small cells) is not measured at all."""
    rng = np.random.default_rng(9)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float64)

    def cells(n: int) -> np.ndarray:
        centres = rng.uniform(8, SIZE - 8, (n, 2))
        return 100.0 + sum(200.0 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 0.8**2)) for y, x in centres)

    sparse = cells(16)
    noisy = moved(sparse, (0.2, 0.1)) + rng.normal(0, NOISE, sparse.shape)
    gy, gx = FrameSpline(sparse).gradient()
    g = np.stack([gy.ravel(), gx.ravel()])
    g -= g.mean(axis=1, keepdims=True)
    unweighed = np.einsum("in,in->n", g, np.linalg.solve(g @ g.T, g))
    assert unweighed.max() > 3 * MAX_LEVERAGE  # without the weighing, a pixel would move its own output more
    steepest = np.unravel_index(np.argmax(np.hypot(gy, gx)), gy.shape)
    jolt = 7.0 * NOISE
    jolted = noisy.copy()
    jolted[steepest] += jolt
    first, second = measure_shifts(noisy, sparse), measure_shifts(jolted, sparse)
    # the output moved by s draws sparse(p - s): its change at the pixel, per unit of the jolt
    own = [moved(sparse, s.whole)[steepest] for s in (first, second)]
    assert abs(own[1] - own[0]) <= 1.05 * MAX_LEVERAGE * jolt, abs(own[1] - own[0]) / jolt
    two = cells(2)
    assert measure_shifts(moved(two, (0.2, 0.1)) + rng.normal(0, NOISE, two.shape), two) is None


def test_one_pixel_of_a_frame_hardly_moves_its_output():
    """The output reads its frame through two numbers measured on all its pixels: a jolt of 7x the
    noise in one pixel (where the output's gradient is steepest) moves it by well under 1 % of the
    jolt anywhere, as the restoration's gains move it (a filter reading the pixel would move it by
    its weight, tens of percent)."""
    noisy, truth, outputs = movie(0.3, seed=5)
    t = 60
    first = [o.copy() for o in outputs]
    follow_jitter(noisy, first, scored=np.ones(FRAMES, bool))
    gy, gx = np.gradient(outputs[t])
    steepest = np.unravel_index(np.argmax(np.hypot(gy, gx)), gy.shape)
    jolt = 7.0 * NOISE
    jolted = noisy.copy()
    jolted[t][steepest] += jolt
    second = [o.copy() for o in outputs]
    follow_jitter(jolted, second, scored=np.ones(FRAMES, bool))
    change = np.abs(second[t] - first[t])
    assert change.max() < 0.01 * jolt, change.max() / jolt
    assert change.max() > 0  # it does read the frame: through its shift


def test_a_files_final_pass_follows_the_jitter_of_each_segment_and_says_so(tmp_path):
    """Through `denoise`: each segment's record (engine, summary, provenance); a segment too short
    to measure is left as it is; `--no-follow-jitter` turns it off, and only the moved frames differ."""
    from dataclasses import replace

    import tifffile

    from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
    from umvd_live.apps.cli import build_parser, engine_config_from_args
    from umvd_live.apps.denoise import denoise_movie, denoise_provenance
    from umvd_live.engine import EngineConfig
    from umvd_live.recording.movie import MovieFrames

    noisy, _ = TwoPhotonSimulator(SimConfig(height=48, width=48, photons=2.0, seed=1, jitter_px=0.4)).movie(240)
    noisy[160:] = np.clip(noisy[160:].astype(np.float32) * 3, 0, 65535).astype(noisy.dtype)  # laser x3
    config = EngineConfig(device="cpu", preset="lite", steps_per_frame=0.0, warmup_frames=8, warmup_steps=0, seed=0)
    assert config.follow_jitter is True
    results = {on: denoise_movie(noisy, replace(config, follow_jitter=on)) for on in (True, False)}
    follows = results[True].engine.jitter_follows
    assert [f.first for f in follows] == [0, 160] == [g.first for g in results[True].engine.amplitude_gains]
    assert min(follows[0].weight) > 0.5 and follows[0].moved_px > 0.1, follows[0]
    assert "too few frames" in follows[1].reason and follows[1].weight == (0.0, 0.0)  # 80 frames
    assert all(f.reason == "off" for f in results[False].engine.jitter_follows)
    changed = [not np.array_equal(o.image, p.image) for o, p in zip(results[True].outputs, results[False].outputs)]
    moved = [o.state == "live" and o.index + follows[0].first not in follows[0].unmoved
             for o in results[True].outputs[:160]]
    assert changed[:160] == moved and sum(moved) > 100 and not any(changed[160:])
    described = describe_jitter(follows)
    assert described.startswith("0:") and "weight" in described and ", 160:0 (too few frames" in described
    src = tmp_path / "in.ome.tif"
    tifffile.imwrite(src, noisy, ome=True, metadata={"axes": "TYX"})
    with MovieFrames(src) as movie:
        assert denoise_provenance(results[True].engine, movie, offline=False).extra["jitter"] == described
    with pytest.raises(TypeError, match="follow_jitter"):
        EngineConfig(follow_jitter="yes")  # type: ignore[arg-type]
    for flags, expected in (([], True), (["--no-follow-jitter"], False), (["--follow-jitter"], True)):
        args = build_parser().parse_args(["denoise", "in.tif", "out.ome.tif", *flags])
        assert engine_config_from_args(args).follow_jitter is expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shift_image_is_ndimages_cubic_shift(dtype):
    """The separable shift gives what `ndimage.shift` (order 3, "nearest") gives, borders included:
    bit for bit in float32, to float64's rounding in float64; a shift beyond its padding is refused."""
    image = np.random.default_rng(8).normal(100, 20, (37, 52)).astype(dtype)
    for shift in [(0.3, -0.2), (-1.0, 1.0), (0.0, 0.7), (-0.999, 0.5), (2.5, -3.2), (0.0, 0.0)]:
        got = shift_image(image, shift)
        assert got.dtype == dtype and got.shape == image.shape
        expected = ndimage.shift(image, shift, order=3, mode="nearest")
        if dtype == np.float32:
            np.testing.assert_array_equal(got, expected)
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="at most 10 px"):
        shift_image(image, (0.0, 10.5))


def test_the_splines_slopes_are_the_derivative_of_its_shift():
    """`FrameSpline.gradient` is the slope along which `shifted` moves the image, borders included:
    the measured shift and the applied one are of the same spline."""
    spline = FrameSpline(field(np.random.default_rng(13)))
    eps = 1e-4
    for axis, slope in enumerate(spline.gradient()):
        step = np.zeros(2)
        step[axis] = eps
        numeric = (spline.shifted(-step) - spline.shifted(step)) / (2 * eps)  # image(p + s) - image(p - s)
        np.testing.assert_allclose(slope, numeric, atol=1e-5 * np.abs(slope).max())


def _live(jitter: LiveJitter, noisy, outputs, network=lambda t: True):
    """Each frame observed as it arrives and its output followed 3 frames later, as a stream does."""
    applied = {}
    for t in range(len(noisy) + 3):
        if t < len(noisy):
            jitter.observe(t, noisy[t].copy())
        if t >= 3:
            applied[t - 3] = jitter.follow(t - 3, outputs[t - 3], network=network(t - 3))
    return applied


def test_a_live_stream_follows_the_jitter_once_it_is_measured():
    """Live: nothing moves until `MIN_FRAMES` frames are measured; then each network output is moved
    by its frame's shift with weights measured on earlier frames only, and the outputs come nearer
    the truth; a reset (a change of the acquisition) starts the measuring again."""
    frames = 3 * FRAMES
    rng = np.random.default_rng(11)
    base = field(rng)
    shifts = rng.normal(0, 0.3, (frames, 2))
    truth = np.stack([moved(base, s) for s in shifts])
    noisy = (truth + rng.normal(0, NOISE, truth.shape)).astype(np.float32)
    outputs = [base.astype(np.float32).copy() for _ in range(frames)]
    before = [o.copy() for o in outputs]
    jitter = LiveJitter()
    applied = _live(jitter, noisy, outputs, network=lambda t: t % 50 != 7)
    network = [t for t in range(frames) if t % 50 != 7]
    first = network[MIN_FRAMES]  # the first output after MIN_FRAMES measured ones
    assert all(applied[t] is None for t in range(first)), "moved before the motion was measured"
    later = range(first, frames)
    for t in later:
        if t % 50 == 7:  # the referee's mean, not the network's: never moved
            assert applied[t] is None
            np.testing.assert_array_equal(outputs[t], before[t])
        else:
            assert applied[t] is not None
            np.testing.assert_array_equal(outputs[t], shift_image(before[t], applied[t]))
    status = jitter.to_dict()
    assert min(status["weight"]) > 0.9 and status["motion_px"] == pytest.approx([0.3, 0.3], abs=0.06), status
    assert status["moved"] == sum(a is not None for a in applied.values()) and status["unmeasured"] == 0
    scored = [t for t in later if t % 50 != 7]
    assert error([outputs[t] for t in scored], truth[scored]) < 0.1 * error([before[t] for t in scored], truth[scored])
    jitter.reset()
    again = _live(jitter, noisy[:MIN_FRAMES], [b.copy() for b in before[:MIN_FRAMES]])
    assert all(a is None for a in again.values()) and jitter.to_dict()["weight"] is None


def test_a_live_stream_leaves_a_field_that_does_not_move_as_one():
    """Live, halves that jitter apart (no motion shared by the field): measured, never moved; an
    output whose frame never came is not measured."""
    noisy, truth, outputs = movie(0.3, seed=12, halves_apart=True)
    as_made = [o.copy() for o in outputs]
    jitter = LiveJitter()
    applied = _live(jitter, noisy, outputs)
    assert all(a is None for a in applied.values())
    for o, m in zip(outputs, as_made):
        np.testing.assert_array_equal(o, m)
    assert jitter.to_dict()["weight"] == [0.0, 0.0]
    assert jitter.follow(10_000, outputs[0], network=True) is None


def test_a_stream_moves_its_live_outputs_and_starts_again_at_a_change():
    """Through the engine: with the jitter followed, each live output is the one made without it,
    moved by the shift it carries (`jitter_shift_px`), or the same where it carries none: none
    before 96 frames are measured, none in the 60 frames after a change (a laser step) starts the
    measuring again; the stream's status says what was done."""
    from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
    from umvd_live.engine import EngineConfig, StreamDenoiser

    noisy, _ = TwoPhotonSimulator(SimConfig(height=48, width=48, photons=2.0, jitter_px=0.4, seed=1)).movie(420)
    noisy[360:] = np.clip(noisy[360:].astype(np.float32) * 3, 0, 65535).astype(noisy.dtype)  # laser x3
    base = dict(device="cpu", preset="lite", steps_per_frame=0.0, warmup_frames=8, warmup_steps=0, seed=0)
    runs = {}
    for follow in (False, True):
        with StreamDenoiser(EngineConfig(follow_jitter=follow, **base)) as den:
            runs[follow] = {o.index: o for f in noisy for o in den.push(f)} | {o.index: o for o in den.flush()}
            status = den.stats()["jitter"]
            assert [c.index for c in den.changes] == [360]
        if not follow:
            assert status is None
    assert sorted(runs[True]) == list(range(420))
    moved = [t for t, o in runs[True].items() if o.jitter_shift_px is not None]
    for t, o in runs[True].items():
        made = runs[False][t]
        assert made.jitter_shift_px is None
        if o.jitter_shift_px is None:
            np.testing.assert_array_equal(o.image, made.image)
        else:
            assert o.state != "warmup" and max(abs(v) for v in o.jitter_shift_px) <= MAX_SHIFT_PX
            np.testing.assert_array_equal(o.image, shift_image(made.image, o.jitter_shift_px))
    assert min(moved) >= MIN_FRAMES and max(moved) < 360, (min(moved), max(moved))
    assert len(moved) > 200  # followed from frame 96 or so to the change
    assert status["moved"] == 0 and status["weight"] is None  # measuring again after the change


def test_a_live_stream_of_frames_over_the_limit_is_not_followed(monkeypatch):
    """Live, frames over `LIVE_MAX_PIXELS` are not followed (the frame loop has no margin for it):
    the frames of a jittering field that is followed at its size are not, once over the limit, and
    the status says why."""
    from umvd_live.engine import jitter

    noisy, _, outputs = movie(0.3, seed=14)
    monkeypatch.setattr(jitter, "LIVE_MAX_PIXELS", SIZE * SIZE - 1)
    live = LiveJitter()
    as_made = [o.copy() for o in outputs]
    assert all(a is None for a in _live(live, noisy, outputs).values())
    for o, m in zip(outputs, as_made):
        np.testing.assert_array_equal(o, m)
    status = live.to_dict()
    assert status["off"] == f"frames of {SIZE}x{SIZE} px: over {SIZE * SIZE - 1} px live", status
    assert status["moved"] == status["unmatched"] == 0
    monkeypatch.setattr(jitter, "LIVE_MAX_PIXELS", SIZE * SIZE)  # at the limit: followed
    live = LiveJitter()
    assert sum(a is not None for a in _live(live, noisy, outputs).values()) == FRAMES - MIN_FRAMES
    assert live.to_dict()["off"] is None


def _fit_every_pixel(gy, gx, residual, max_leverage):
    """Session 40's weighing, each pixel's leverage computed every round: the reference of `_fit`."""
    g = np.stack([gy.ravel(), gx.ravel()])
    weights = np.ones(g.shape[1])
    for _ in range(12):
        centred = g - (g @ weights / weights.sum())[:, None]
        normal = (centred * weights) @ centred.T
        leverage = weights * np.einsum("in,ij,jn->n", centred, np.linalg.inv(normal), centred)
        if leverage.max() <= max_leverage:
            return weights, leverage
        weights *= np.minimum(1.0, 0.8 * max_leverage / np.maximum(leverage, 1e-300))
    return None, None


@pytest.mark.parametrize("cells", [6, 16, 40])
def test_the_weighing_checks_every_pixel_though_it_computes_few(cells):
    """`_fit` computes the leverage only of the pixels a bound does not clear: the same weights as
    computing every pixel's each round, and no pixel's leverage above `MAX_LEVERAGE` after it."""
    from umvd_live.engine.jitter import _fit

    rng = np.random.default_rng(cells)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    image = 100.0 + sum(rng.uniform(50, 250) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * rng.uniform(0.6, 2) ** 2))
                        for y, x in rng.uniform(4, SIZE - 4, (cells, 2)))
    gy, gx = FrameSpline(image).gradient()
    residual = rng.normal(0, NOISE, image.shape)
    expected, leverage = _fit_every_pixel(gy, gx, residual, MAX_LEVERAGE)
    fitted = _fit(gy, gx, residual, max_leverage=MAX_LEVERAGE)
    if expected is None:
        assert fitted is None
        return
    assert fitted is not None and (expected < 1).any()  # the weighing had work to do
    np.testing.assert_allclose(fitted.weights, expected, rtol=1e-9)
    assert leverage.max() <= MAX_LEVERAGE


def test_a_files_frames_carry_the_shift_they_were_moved_by(tmp_path):
    """A file's final pass (`denoise_movie`): each output the jitter moved carries its shift, and is
    the output made without following, moved by it; the others carry None and are unchanged; the
    file `denoise` writes records each frame's shift."""
    from dataclasses import replace

    from file_output import written_infos

    from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
    from umvd_live.apps.denoise import denoise_movie
    from umvd_live.engine import EngineConfig

    noisy, _ = TwoPhotonSimulator(SimConfig(height=48, width=48, photons=2.0, jitter_px=0.4, seed=2)).movie(200)
    config = EngineConfig(device="cpu", preset="lite", steps_per_frame=0.0, warmup_frames=8, warmup_steps=0, seed=0)
    config = replace(config, changes=replace(config.changes, enabled=False))  # one segment
    plain, followed = (denoise_movie(noisy, replace(config, follow_jitter=follow)) for follow in (False, True))
    (segment,) = followed.engine.jitter_follows
    assert segment.reason == "" and len(segment.shifts) > 150, segment
    for o, made in zip(followed.outputs, plain.outputs):
        assert o.index == made.index and made.jitter_shift_px is None
        assert o.jitter_shift_px == segment.shifts.get(o.index)
        if o.jitter_shift_px is None:
            np.testing.assert_array_equal(o.image, made.image)
        else:
            np.testing.assert_array_equal(o.image, shift_image(made.image, o.jitter_shift_px))
    infos = written_infos(tmp_path, noisy, followed)
    assert [i.jitter_shift_px for i in infos] == [o.jitter_shift_px for o in followed.outputs]
