"""Amplitude restoration (`engine.amplitude`): the shrinkage is measured without the truth, undone
as asked, and the restored output stays blind to its own frame's noise."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from calcium import calcium_movie
from scipy import ndimage

from umvd_live.engine import amplitude as amplitude_module
from umvd_live.engine.amplitude import (
    MAX_SMOOTH_PX,
    MIN_SMOOTH_PX,
    NOISE_TO_SIGNAL,
    SMOOTH_PX,
    LiveAmplitude,
    measure_shrinkage,
    restore_amplitude,
    slow_baselines,
    smooth,
    smoothing_px,
)

FRAMES, SIZE, REACH = 400, 24, 20


def _truth(rng: np.random.Generator, frames: int = FRAMES) -> np.ndarray:
    """Blobs with calcium-like transients (instant rise, 20-frame decay) on a still background."""
    return calcium_movie(rng, frames, SIZE, cells=6, radius=2.5, margin=3, spike_rate=0.02, spike_range=(50, 150),
                         decay=20)


def _shrunk(truth: np.ndarray, slope: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A noisy movie of ``truth`` (white in time, correlated along x) and an estimate that keeps
    ``slope`` of every deviation from the mean, with errors of its own (not the frame's noise)."""
    white = rng.normal(0, 20, truth.shape)
    noisy = truth + white + np.roll(white, 1, axis=2)
    mean = truth.mean(axis=0)
    estimate = mean + slope * (truth - mean) + rng.normal(0, 3, truth.shape)
    return noisy.astype(np.float32), estimate.astype(np.float32)


def _measure(noisy: np.ndarray, estimate: np.ndarray, reach: int = REACH):
    """`measure_shrinkage` about the segment's blind baselines, as `restore_amplitude` measures."""
    baselines = slow_baselines(noisy, estimate, reach)
    assert baselines is not None
    return measure_shrinkage(noisy, estimate, baselines)


def _slope_on(truth: np.ndarray, estimate: np.ndarray) -> float:
    g = truth - truth.mean(axis=0)
    return float((g * (estimate - estimate.mean(axis=0))).sum() / (g * g).sum())


@pytest.mark.parametrize("slope", [0.6, 0.8, 1.0])
def test_the_slope_is_measured_without_the_truth(slope):
    rng = np.random.default_rng(1)
    truth = _truth(rng)
    noisy, estimate = _shrunk(truth, slope, rng)
    measured = _measure(noisy, estimate)
    assert measured is not None and measured.slope == pytest.approx(slope, abs=0.04)


def test_the_truths_variance_is_not_biased_by_the_baselines_own_noise():
    """Few frames and much noise: each lag product about the baselines (each the mean of the other
    frames) comes out low by about the noise variance / frames (here 0.3 of the truth's variance),
    which the measurement takes back out."""
    from scipy import ndimage

    ratios = []
    for seed in range(3):
        rng = np.random.default_rng(10 + seed)
        frames, size = 100, 96
        slow = ndimage.gaussian_filter1d(rng.normal(0, 1, (frames, size, size)), 8, axis=0)
        truth = 100 + slow * (10 / slow.std())  # a slow truth of variance 100 per pixel
        noise_sd = np.sqrt(0.3 * frames * 100)  # noise variance / frames = 0.3 x the truth's variance
        noisy = (truth + rng.normal(0, noise_sd, truth.shape)).astype(np.float32)
        measured = _measure(noisy, truth.astype(np.float32), reach=0)  # the truth as the estimate: slope 1
        assert measured is not None
        ratios.append(measured.signal.mean() / (truth - truth.mean(axis=0)).var(axis=0).mean())
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.12), ratios  # not 0.7


@pytest.mark.parametrize("noise_sd", [60.0, 130.0])
def test_a_noisier_movie_has_its_correction_smoothed_wider(noise_sd, monkeypatch):
    """The noise-to-signal ratio is measured without the truth (within 20 %), and the correction is
    smoothed over an area in proportion to it: `SMOOTH_PX` at `NOISE_TO_SIGNAL`, wider above it,
    narrower below, from `MIN_SMOOTH_PX` to `MAX_SMOOTH_PX`."""
    rng = np.random.default_rng(3)
    truth = _truth(rng)
    noisy = (truth + rng.normal(0, noise_sd, truth.shape)).astype(np.float32)
    mean = truth.mean(axis=0)
    estimate = (mean + 0.7 * (truth - mean) + rng.normal(0, 3, truth.shape)).astype(np.float32)
    measured = _measure(noisy, estimate)
    true_ratio = noise_sd ** 2 / (truth - mean).var(axis=0).mean()
    assert measured is not None and measured.noise_to_signal == pytest.approx(true_ratio, rel=0.2)
    restored = estimate.copy()
    gain = restore_amplitude(noisy, restored, reach=REACH, keep=1.0)
    assert gain.smooth_px == smoothing_px(measured.noise_to_signal)
    assert (gain.smooth_px > SMOOTH_PX) == (measured.noise_to_signal > NOISE_TO_SIGNAL)
    assert smoothing_px(NOISE_TO_SIGNAL) == SMOOTH_PX
    assert smoothing_px(4 * NOISE_TO_SIGNAL) == pytest.approx(2 * SMOOTH_PX)
    assert smoothing_px(NOISE_TO_SIGNAL / 2) == pytest.approx(SMOOTH_PX / np.sqrt(2))
    assert smoothing_px(0.1) == MIN_SMOOTH_PX == smoothing_px(-1.0)
    assert smoothing_px(1e6) == MAX_SMOOTH_PX
    monkeypatch.setattr(amplitude_module, "MIN_SMOOTH_PX", SMOOTH_PX)  # always 1 px:
    monkeypatch.setattr(amplitude_module, "NOISE_TO_SIGNAL", float("inf"))
    one_px = estimate.copy()
    restore_amplitude(noisy, one_px, reach=REACH, keep=1.0)
    assert np.array_equal(one_px, restored) == (gain.smooth_px == SMOOTH_PX)  # the width is used


def test_nothing_is_measured_where_only_noise_varies():
    rng = np.random.default_rng(2)
    noisy = rng.normal(100, 10, (FRAMES, SIZE, SIZE)).astype(np.float32)
    still = np.full_like(noisy, 100.0)
    assert _measure(noisy, still + rng.normal(0, 1, noisy.shape).astype(np.float32)) is None
    gain = restore_amplitude(noisy, still.copy(), reach=REACH, keep=1.0)
    assert gain.gain == 1.0 and gain.slope is None


@pytest.mark.parametrize("keep", [1.0, 0.9])
def test_restoring_keeps_the_asked_share_of_the_amplitude(keep):
    rng = np.random.default_rng(3)
    truth = _truth(rng)
    noisy, estimate = _shrunk(truth, 0.7, rng)
    assert _slope_on(truth, estimate) == pytest.approx(0.7, abs=0.01)
    restored = estimate.copy()
    gain = restore_amplitude(noisy, restored, reach=REACH, keep=keep)
    assert gain.gain == pytest.approx(keep / gain.slope, abs=0.05)  # the map's mean: one shrinkage everywhere
    assert _slope_on(truth, restored) == pytest.approx(keep, abs=0.05)
    # closer to the truth where it is active, as unbiased as asked
    active = truth - np.median(truth, axis=0) > 30
    assert np.abs((restored - truth)[active].mean()) < np.abs((estimate - truth)[active].mean())


def test_each_region_gets_the_gain_of_its_own_shrinkage():
    """Cells the network shrinks more (the faint ones) get a larger gain than those it shrinks
    less: one gain for the field would leave the first short and stretch the second."""
    rng = np.random.default_rng(12)
    truth = np.concatenate([_truth(rng), _truth(rng)], axis=2)  # two fields side by side, 24 x 48
    white = rng.normal(0, 20, truth.shape)
    noisy = (truth + white + np.roll(white, 1, axis=2)).astype(np.float32)
    mean = truth.mean(axis=0)
    slope = np.where(np.arange(2 * SIZE) < SIZE, 0.6, 0.9)  # the left field shrunk more
    estimate = (mean + slope * (truth - mean) + rng.normal(0, 3, truth.shape)).astype(np.float32)
    shrinkage = _measure(noisy, estimate)
    assert shrinkage is not None
    gains = shrinkage.gains(1.0)
    left, right = np.s_[:, :, :SIZE // 2], np.s_[:, :, -SIZE // 2:]  # away from the seam, where the maps blend
    assert gains[left[1:]].mean() > gains[right[1:]].mean() + 0.1
    restored = estimate.copy()
    restore_amplitude(noisy, restored, reach=REACH, keep=1.0)
    one = estimate.copy()
    one_gain = 1.0 / shrinkage.slope  # what a single gain for the field would do
    one += (one_gain - 1.0) * (one - np.median(one, axis=0))
    for side in (left, right):
        local, single = _slope_on(truth[side], restored[side]), _slope_on(truth[side], one[side])
        assert abs(local - 1.0) < abs(single - 1.0)


def test_a_faint_region_is_pulled_towards_the_faint_regions_slope_not_the_bright_ones():
    """The prior a region with little activity of its own is pulled towards: the slope pooled where
    the prior weighs. The field's pooled slope is its brightest regions' (a few bright cells the
    network shrinks little), and pulled towards it the faint field kept most of its shrinkage."""
    signal = np.ones((64, 64))  # a faint field the network keeps 0.7 of...
    covariance = 0.7 * signal
    for y, x in ((8, 8), (40, 40)):  # ...and two bright cells it keeps 0.95 of, most of the variance
        signal[y:y + 8, x:x + 8] = 40.0
        covariance[y:y + 8, x:x + 8] = 0.95 * 40.0
    pooled = float(covariance.mean() / signal.mean())
    assert pooled > 0.83  # the bright cells' slope, nearly
    gains = amplitude_module.Shrinkage(pooled, covariance, signal, 1.0).gains(1.0)
    faint, bright = gains[56:, :24], gains[10:14, 10:14]  # away from the cells / inside one
    # 1 / 0.7 = 1.43 on its own; pulled towards the faint field and the cells' smoothed rims 1.29,
    # towards the field's pooled slope 1.23
    assert faint.mean() > 1.26
    assert bright.mean() < 1.15  # 1 / 0.95 = 1.05, plus the pull (1.09)


def test_a_restored_output_worse_than_its_window_mean_is_left_as_made():
    """The referee's rule holds after the restoration too: an output whose restored copy is
    farther from its noisy frame than the window's blind mean keeps the network's output."""
    rng = np.random.default_rng(13)
    truth = _truth(rng)
    noisy, estimate = _shrunk(truth, 0.7, rng)
    t0 = FRAMES // 3

    def neighbours(t: int) -> np.ndarray:  # the mean of the window's noisy frames; for t0 a perfect one
        return truth[t0] if t == t0 else noisy[[i for i in (t - 2, t - 1, t + 1, t + 2) if 0 <= i < FRAMES]].mean(0)

    restored = estimate.copy()
    gain = restore_amplitude(noisy, restored, reach=REACH, keep=1.0, neighbours=neighbours)
    assert gain.gain > 1.2 and gain.unrestored == (t0,)
    np.testing.assert_array_equal(restored[t0], estimate[t0])
    changed = [t for t in range(FRAMES) if not np.array_equal(restored[t], estimate[t])]
    assert len(changed) == FRAMES - 1


def test_off_or_unshrunk_outputs_are_left_as_they_are():
    rng = np.random.default_rng(4)
    truth = _truth(rng)
    noisy, estimate = _shrunk(truth, 0.8, rng)
    for keep, slope in ((0.0, 0.8), (0.5, 0.8)):
        _, estimate = _shrunk(truth, slope, rng)
        restored = estimate.copy()
        gain = restore_amplitude(noisy, restored, reach=REACH, keep=keep)
        assert gain.gain == 1.0
        np.testing.assert_array_equal(restored, estimate)


def test_frames_the_network_did_not_make_are_left_alone():
    rng = np.random.default_rng(5)
    truth = _truth(rng)
    noisy, estimate = _shrunk(truth, 0.7, rng)
    scored = np.ones(FRAMES, bool)
    scored[::7] = False  # e.g. the referee's neighbour means
    restored = estimate.copy()
    gain = restore_amplitude(noisy, restored, reach=REACH, keep=1.0, scored=scored)
    assert gain.gain > 1.2
    np.testing.assert_array_equal(restored[~scored], estimate[~scored])
    assert not np.array_equal(restored[scored], estimate[scored])


def test_a_segment_too_short_for_a_blind_baseline_is_left_alone():
    rng = np.random.default_rng(6)
    truth = _truth(rng)
    noisy, estimate = _shrunk(truth, 0.7, rng)
    restored = estimate.copy()
    gain = restore_amplitude(noisy, restored, reach=FRAMES - 40, keep=1.0)  # no frame that far from the first block
    assert gain.gain == 1.0 and gain.slope is None and "no blind baseline" in gain.reason
    np.testing.assert_array_equal(restored, estimate)
    gain = restore_amplitude(noisy[:60], restored[:60], reach=10, keep=1.0)
    assert gain.gain == 1.0 and gain.slope is None and "too few frames" in gain.reason


def test_a_block_with_few_frames_beyond_reach_gives_no_baselines():
    """The outputs' offset from their noisy frames is measured on the blocks beyond reach: where a
    block has fewer than 2 chunks of them, a few outputs' offset would be mostly their own noise
    and activity, so the segment is left alone."""
    rng = np.random.default_rng(6)
    noisy, estimate = _shrunk(_truth(rng, 420), 0.7, rng)
    # a middle block has all but 350 frames beyond reach 170: 70 of 420, 50 of 400 (e.g. 190-199: 0-19, 370-399)
    assert slow_baselines(noisy, estimate, 170) is not None
    noisy, estimate = noisy[:400], estimate[:400]
    assert slow_baselines(noisy, estimate, 170) is None
    restored = estimate.copy()
    gain = restore_amplitude(noisy, restored, reach=170, keep=1.0)
    assert gain.gain == 1.0 and "no blind baseline" in gain.reason
    np.testing.assert_array_equal(restored, estimate)


@pytest.mark.parametrize(("frames", "reach"), [(FRAMES, REACH), (FRAMES, REACH + 1), (FRAMES, REACH + 9),
                                               (FRAMES + 5, REACH)])  # on and off the blocks' edges; a short last block
def test_a_frames_baselines_never_use_its_noise_nor_outputs_within_reach(frames, reach):
    """Output t's baseline reads the other noisy frames and the outputs beyond reach: jolting
    frame t and every output within reach of t's block leaves it as it was (to float32 rounding),
    jolting a neighbouring frame moves it."""
    rng = np.random.default_rng(7)
    noisy = rng.normal(100, 10, (frames, 8, 8)).astype(np.float32)
    outputs = rng.normal(100, 1, (frames, 8, 8)).astype(np.float32)
    before = slow_baselines(noisy, outputs, reach)
    still = slow_baselines(np.full_like(noisy, 100.0), np.full_like(outputs, 103.0), reach)
    assert before is not None and still is not None
    jolt = 1000.0
    for t in (0, 57, frames // 2, frames - 1):
        # weights that sum to 1: a still field is its own baseline, and an offset is kept whole
        np.testing.assert_allclose(still.noisy(t, np.full((8, 8), 100.0)), 100.0, rtol=1e-6)
        np.testing.assert_allclose(still.output(t, np.full((8, 8), 100.0)), 103.0, rtol=1e-6)
        k = int(np.searchsorted(before.starts, t, side="right")) - 1
        start, stop = int(before.starts[k]), int(before.stops[k])
        changed_noisy, changed_outputs = noisy.copy(), outputs.copy()
        changed_noisy[t] += jolt
        changed_outputs[max(0, start - reach):stop + reach] += jolt  # all that the block's outputs may depend on
        after = slow_baselines(changed_noisy, changed_outputs, reach)
        assert after is not None
        np.testing.assert_allclose(after.output(t, changed_noisy[t]), before.output(t, noisy[t]), atol=1e-6 * jolt)
        np.testing.assert_allclose(after.noisy(t, changed_noisy[t]), before.noisy(t, noisy[t]), atol=1e-6 * jolt)
        other = t + 1 if t + 1 < frames else t - 1  # a neighbour: in the baseline with a weight of about 1 / 300
        changed_noisy = noisy.copy()
        changed_noisy[other] += jolt
        moved = slow_baselines(changed_noisy, outputs, reach)
        assert moved is not None
        assert np.abs(moved.noisy(t, noisy[t]) - before.noisy(t, noisy[t])).min() > 1e-3 * jolt


def test_a_restored_output_reads_its_frame_only_through_the_gains(monkeypatch):
    """With the gains held, a jolt of frame t leaves its restored output as it was (to float32
    rounding), though the outputs around it read frame t (a blind mean of their neighbours, as a
    network's do): neither its output nor its baseline holds frame t's noise."""
    rng = np.random.default_rng(8)
    truth = _truth(rng)
    noisy, _ = _shrunk(truth, 0.7, rng)

    still = truth.mean(axis=0)

    def blind_means(frames: np.ndarray) -> np.ndarray:  # frames t - 1 and t + 1's mean, shrunk towards the still field
        padded = np.concatenate([frames[1:2], frames, frames[-2:-1]])
        return (still + 0.6 * (0.5 * (padded[:-2] + padded[2:]) - still)).astype(np.float32)

    estimate = blind_means(noisy)
    baselines = slow_baselines(noisy, estimate, REACH)
    assert baselines is not None
    held = measure_shrinkage(noisy, estimate, baselines)
    assert held is not None
    monkeypatch.setattr(amplitude_module, "measure_shrinkage", lambda *args, **kwargs: held)
    first = estimate.copy()
    gain = restore_amplitude(noisy, first, reach=REACH, keep=1.0)
    assert gain.gain > 1.3
    jolt = 2000.0
    for t in (5, FRAMES // 2):
        jolted = noisy.copy()
        jolted[t] += jolt
        second = blind_means(jolted)
        assert np.abs(second[t + 1] - estimate[t + 1]).min() == pytest.approx(0.3 * jolt)  # its neighbours read it
        restore_amplitude(jolted, second, reach=REACH, keep=1.0)
        np.testing.assert_allclose(second[t], first[t], atol=1e-6 * jolt)


def test_a_slow_drift_the_network_kept_is_not_stretched():
    """Bleaching that the outputs already follow stays as it is: the baseline follows it, and
    only the transients above it are stretched (with a median over the whole segment the
    restored field faded 1.2x as fast as the outputs did)."""
    rng = np.random.default_rng(9)
    frames = 1200
    t = np.arange(frames)
    background = 100.0 * np.exp(-t / 1200.0)[:, None, None]
    truth = _truth(rng, frames) - 100.0 + background
    white = rng.normal(0, 20, truth.shape)
    noisy = (truth + white + np.roll(white, 1, axis=2)).astype(np.float32)
    estimate = (background + 0.7 * (truth - background) + rng.normal(0, 3, truth.shape)).astype(np.float32)
    restored = estimate.copy()
    gain = restore_amplitude(noisy, restored, reach=REACH, keep=1.0)

    def fading(movie: np.ndarray) -> float:
        return float(np.polyfit(t, movie.reshape(frames, -1).mean(axis=1), 1)[0])

    assert gain.gain > 1.1
    assert fading(restored) / fading(estimate) == pytest.approx(1.0, abs=0.1)  # 1.04 (segment-wide median: 1.21)
    assert _slope_on(truth - background, restored - background) > 0.8  # the transients: 0.7 -> 0.85


def test_a_restored_output_is_blind_to_its_own_frame():
    """The network's output of frame t never sees frame t's noise, nor does its baseline; only
    the gain map does, through sums over every frame and a few hundred pixels."""
    rng = np.random.default_rng(8)
    truth = _truth(rng)
    noisy, estimate = _shrunk(truth, 0.7, rng)
    t = FRAMES // 2
    first = estimate.copy()
    restore_amplitude(noisy, first, reach=REACH, keep=1.0)
    jolted = noisy.copy()
    jolted[t] += rng.normal(0, 200, jolted[t].shape).astype(np.float32)  # frame t's noise, 10x larger
    second = estimate.copy()
    restore_amplitude(jolted, second, reach=REACH, keep=1.0)
    change = np.abs(second[t] - first[t]).max()
    assert change < 2e-3 * np.abs(jolted[t] - noisy[t]).max()  # 1.0e-3 (one gain for the field: 0.3e-3)


def _live(noisy: np.ndarray, estimate: np.ndarray, keep: float = 1.0, k: int = 3,
          reset_at: int | None = None) -> tuple[np.ndarray, LiveAmplitude]:
    """``estimate`` restored as a live stream gives it: each output k frames after its input."""
    live = LiveAmplitude(keep, k)
    out = estimate.copy()
    for t in range(len(noisy) + k):
        if t == reset_at:
            live.reset()
        if t < len(noisy):
            live.observe(t, noisy[t].copy())  # handed over, as the stream hands over its own copy
        if t >= k:
            live.restore(t - k, out[t - k], network=True)
    return out, live


def test_a_live_stream_measures_and_restores_as_it_goes():
    rng = np.random.default_rng(9)
    truth = np.concatenate([_truth(rng), _truth(rng)])  # 800 frames
    noisy, estimate = _shrunk(truth, 0.7, rng)
    restored, live = _live(noisy, estimate)
    assert live.slope == pytest.approx(0.7, abs=0.05)
    assert live.gain == pytest.approx(1 / live.slope)
    assert live.to_dict() == {"gain": round(live.gain, 3), "slope": round(live.slope, 3)}
    np.testing.assert_array_equal(restored[:3 * 32], estimate[:3 * 32])  # nothing measured yet: as made
    later = slice(400, None)
    assert _slope_on(truth[later], restored[later]) == pytest.approx(1.0, abs=0.08)


def test_a_live_stream_starts_again_at_a_change():
    rng = np.random.default_rng(10)
    truth = np.concatenate([_truth(rng), _truth(rng)])
    noisy, estimate = _shrunk(truth, 0.7, rng)
    restored, live = _live(noisy, estimate, reset_at=700)
    assert live.gain == 1.0 and live.slope is None  # 100 frames: not measured again yet
    np.testing.assert_array_equal(restored[700:], estimate[700:])


def test_a_live_stream_of_noise_is_left_alone():
    rng = np.random.default_rng(11)
    noisy = rng.normal(100, 10, (FRAMES, SIZE, SIZE)).astype(np.float32)
    estimate = (100 + rng.normal(0, 1, noisy.shape)).astype(np.float32)
    restored, live = _live(noisy, estimate)
    assert live.gain == 1.0 and live.slope is None
    np.testing.assert_array_equal(restored, estimate)


def test_a_stream_restores_its_live_outputs_and_starts_again_at_a_change():
    """Through the engine: the live outputs are the network's until the slope is measured, then
    stretched about their baseline; a laser step (a change) sets the gain back to 1; a file's
    final pass is not touched by the live restorer."""
    from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
    from umvd_live.engine import EngineConfig, StreamDenoiser

    noisy, _ = TwoPhotonSimulator(SimConfig(height=48, width=48, photons=2.0, seed=1)).movie(420)
    noisy[360:] = np.clip(noisy[360:].astype(np.float32) * 3, 0, 65535).astype(noisy.dtype)  # laser x3
    base = dict(device="cpu", preset="lite", steps_per_frame=0.0, warmup_frames=8, warmup_steps=0, seed=0)
    outputs = {}
    for keep in (0.0, 1.0):
        with StreamDenoiser(EngineConfig(keep_amplitude=keep, **base)) as den:
            got = [o for f in noisy for o in den.push(f)] + den.flush()
            outputs[keep] = {o.index: (o.image, o.state, o.amplitude_gain) for o in got}
            if keep:
                at_end = den.stats()["amplitude"]
                assert [c.index for c in den.changes] == [360]
            else:
                assert den.stats()["amplitude"] is None
    same = [t for t in outputs[0.0] if np.array_equal(outputs[0.0][t][0], outputs[1.0][t][0])]
    assert set(range(3 * 32)) <= set(same)  # nothing measured yet: the network's own outputs
    assert len(same) < 360  # then restored (the prior's outputs shrink this movie's activity)
    assert at_end == {"gain": 1.0, "slope": None}  # 60 frames after the change: not measured again yet
    assert all(t in same for t in range(363, 420))
    # each output says whether it was restored: a gain above 1 exactly where its image changed
    assert all(gain == 1.0 for _, _, gain in outputs[0.0].values())
    assert {t for t, (_, _, gain) in outputs[1.0].items() if gain != 1.0} == set(outputs[1.0]) - set(same)
    assert all(gain > 1.0 for _, _, gain in outputs[1.0].values() if gain != 1.0)


def _stream_movie() -> np.ndarray:
    """The movie of the engine's tests: 420 frames, the laser tripled at frame 360 (a change)."""
    from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator

    noisy, _ = TwoPhotonSimulator(SimConfig(height=48, width=48, photons=2.0, seed=1)).movie(420)
    noisy[360:] = np.clip(noisy[360:].astype(np.float32) * 3, 0, 65535).astype(noisy.dtype)  # laser x3
    return noisy


def test_each_live_output_carries_the_gain_it_was_restored_with():
    """Through the engine, push by push: an output's `amplitude_gain` is 1.0 until the stream's
    gain is measured, then the gain the stream's status gives (above 1) on every network output;
    the referee's means and the outputs after a change (gain not measured again) keep 1.0."""
    from umvd_live.engine import EngineConfig, StreamDenoiser

    noisy = _stream_movie()
    config = EngineConfig(device="cpu", preset="lite", steps_per_frame=0.0, warmup_frames=8, warmup_steps=0,
                          seed=0, keep_amplitude=1.0)
    pushes = []  # (the push's outputs, the status gain after it)
    with StreamDenoiser(config) as den:
        for frame in noisy:
            got = den.push(frame)
            pushes.append((got, den.stats()["amplitude"]["gain"]))
        pushes.append((den.flush(), den.stats()["amplitude"]["gain"]))
        assert [c.index for c in den.changes] == [360]
    measured = next(i for i, (_, gain) in enumerate(pushes) if gain > 1.0)
    before = [o for got, _ in pushes[:measured] for o in got]
    assert len(before) >= 3 * 32 and all(o.amplitude_gain == 1.0 for o in before)
    checked = 0
    for got, gain in pushes[measured:]:
        if gain > 1.0:
            assert len(got) <= 1  # one output per push: the status gain is the one it got
            for o in got:
                assert o.amplitude_gain == (1.0 if o.state == "warmup" else pytest.approx(gain, abs=1e-3))
                checked += o.state != "warmup"
    assert checked >= 100
    outputs = [o for got, _ in pushes for o in got]
    assert [o.index for o in outputs] == list(range(len(noisy)))
    assert all(o.amplitude_gain == 1.0 for o in outputs if o.state == "warmup" or o.index >= 360)


def test_a_files_frames_carry_their_segments_gain_and_the_referees_means_none(tmp_path):
    """A file's final pass (`denoise_frames`): the network's outputs carry the segment's gain,
    the frames the referee gave the window's mean (here: frames made noiseless, which the
    neighbours' mean matches better than the network's shrunk output) keep 1.0 and their image;
    the file `denoise` writes records each frame's gain."""
    from dataclasses import replace

    from file_output import written_infos

    from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
    from umvd_live.apps.denoise import denoise_movie
    from umvd_live.engine import EngineConfig

    noisy, clean = TwoPhotonSimulator(SimConfig(height=48, width=48, photons=2.0, seed=1)).movie(240)
    noisy[150:160] = np.round(clean[150:160]).astype(noisy.dtype)
    config = EngineConfig(device="cpu", preset="lite", steps_per_frame=0.0, warmup_frames=8, warmup_steps=0, seed=0)
    config = replace(config, changes=replace(config.changes, enabled=False))  # one segment
    results = {keep: denoise_movie(noisy, replace(config, keep_amplitude=keep)) for keep in (0.0, 1.0)}
    assert all(o.amplitude_gain == 1.0 for o in results[0.0].outputs)
    result = results[1.0]
    (segment,) = result.engine.amplitude_gains
    assert segment.gain > 1.0
    referee = [o.index for o in result.outputs if o.state == "warmup"]
    assert referee and set(referee) <= set(range(150, 160))
    for o, plain in zip(result.outputs, results[0.0].outputs):
        assert o.index == plain.index and o.state == plain.state
        if o.state == "warmup" or o.index in segment.unrestored:
            assert o.amplitude_gain == 1.0
            np.testing.assert_array_equal(o.image, plain.image)
        else:
            assert o.amplitude_gain == segment.gain
            assert not np.array_equal(o.image, plain.image)
    infos = written_infos(tmp_path, noisy, result)
    assert [i.amplitude_gain for i in infos] == [o.amplitude_gain for o in result.outputs]


def test_the_smoothing_in_halves_gives_the_whole_frames_numbers():
    """The live restoration smooths half of each correction on an idle worker: the same numbers as
    one filter over the frame, at the frame's edges and by the cut (odd, short and tall frames)."""
    rng = np.random.default_rng(6)
    with ThreadPoolExecutor(1) as pool:
        for shape in ((512, 512), (17, 40), (33, 9), (511, 30)):
            image = rng.random(shape, dtype=np.float32)
            whole = ndimage.gaussian_filter(image, 1.0, mode="nearest")
            assert np.array_equal(smooth(image, pool), whole) and np.array_equal(smooth(image), whole)
