"""Cell-scale blend (`engine.cellblend`): the blind temporal mean never holds its own frame, the blend
is measured without the truth, takes what brings the outputs closer to it and nothing that does
not, and the blended output stays blind to its own frame's noise."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from calcium import calcium_movie
from scipy import ndimage

from umvd_live.engine.cellblend import (
    CellBlend,
    GuidedSmoothing,
    _fit,
    _parts,
    blend_blind_mean,
    blind_temporal_mean,
)

FRAMES, SIZE = 300, 32


def _truth(rng: np.random.Generator) -> np.ndarray:
    """Cells (Gaussian blobs, radius ~3 px) with calcium-like transients (instant rise, 10-frame
    decay) on a still background."""
    return calcium_movie(rng, FRAMES, SIZE, cells=8, radius=3.0, margin=4, spike_rate=0.04, spike_range=(60, 160),
                         decay=10)


def _noisy(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """White in time, correlated along x (the fast scan axis), as a two-photon movie's."""
    white = rng.normal(0, 25, truth.shape)
    return (truth + white + np.roll(white, 1, axis=2)).astype(np.float32)


def _blind_estimate(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A network-like estimate: its fast part shrunk (a 6-frame temporal smoothing of the truth),
    with a spatially smooth error of its own that is not any frame's noise."""
    slow = ndimage.gaussian_filter1d(truth, 6, axis=0, mode="nearest")
    error = ndimage.gaussian_filter(rng.normal(0, 30, truth.shape), (0, 3, 3))
    return (slow + error).astype(np.float32)


def _coarse_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(ndimage.gaussian_filter(estimate - truth, (0, 3, 3)) ** 2))


def test_the_blind_temporal_mean_never_holds_its_own_frame():
    movie = np.zeros((40, 4, 4), np.float32)
    movie[20] = 1.0
    mean = blind_temporal_mean(movie, 3.0)
    assert mean[20].max() == 0.0 and mean[19].min() > 0 and mean[21].min() > 0
    # renormalised at the ends: a still movie stays as it is, to the first and last frame
    np.testing.assert_allclose(blind_temporal_mean(np.full((40, 4, 4), 7.0, np.float32), 4.0), 7.0, rtol=1e-6)
    np.testing.assert_allclose(blind_temporal_mean(np.full((5, 4, 4), 7.0, np.float32), 16.0), 7.0, rtol=1e-6)


def test_the_smoothing_stays_within_the_sources_of_its_guide():
    """A cell's value is not spread onto its surroundings where the guide draws the cell (a plain
    Gaussian spreads it); a constant stays as it is, and a flat guide gives a plain smoothing."""
    yy, xx = np.mgrid[:48, :48]
    cell = ((yy - 24) ** 2 + (xx - 20) ** 2 <= 16).astype(np.float32)  # a soma of radius 4
    guide = 100 + 50 * cell
    frame = 10 * cell  # the cell's activity on a dark field
    smooth = GuidedSmoothing(guide, 2.0)
    within, gaussian = smooth(frame), ndimage.gaussian_filter(frame, 2.0 * np.sqrt(2), mode="nearest")
    ring = ((yy - 24) ** 2 + (xx - 20) ** 2 > 25) & ((yy - 24) ** 2 + (xx - 20) ** 2 <= 49)  # just outside it
    assert within[ring].mean() < 0.1 * gaussian[ring].mean()
    assert within[cell > 0].mean() > 0.95 * 10 > gaussian[cell > 0].mean()
    np.testing.assert_allclose(smooth(np.full((48, 48), 7.0, np.float32)), 7.0, rtol=1e-5)
    flat = GuidedSmoothing(np.full((48, 48), 3.0, np.float32), 2.0)
    np.testing.assert_allclose(flat(frame), ndimage.gaussian_filter(ndimage.gaussian_filter(frame, 2.0, mode="nearest"),
                                                                     2.0, mode="nearest"), atol=1e-5)


def test_the_blend_brings_shrunk_outputs_closer_to_the_truth_at_the_scale_of_cells():
    rng = np.random.default_rng(1)
    truth = _truth(rng)
    noisy, estimate = _noisy(truth, rng), _blind_estimate(truth, rng)
    blended = estimate.copy()
    blend = blend_blind_mean(noisy, blended, scale_px=3.0, first=5)
    assert blend.first == 5 and blend.frames == FRAMES and blend.reason == ""
    assert 0.1 < blend.weight <= 1.0 and blend.sigma_t is not None
    assert blend.reach == int(4 * blend.sigma_t + 0.5)
    assert _coarse_error(blended, truth) < 0.8 * _coarse_error(estimate, truth)
    assert np.mean((blended - truth) ** 2) < np.mean((estimate - truth) ** 2)
    # the change is coarse: finer than the scale it holds only the sources' edges (0.11 of its energy)
    change = blended - estimate
    fine = change - ndimage.gaussian_filter(change, (0, 3, 3), mode="nearest")
    assert np.sum(fine ** 2) < 0.25 * np.sum(change ** 2)


def test_outputs_the_blind_mean_cannot_improve_are_left_nearly_as_they_are():
    """An estimate that is the truth itself: any blend would move it away, and the measured
    weight says so."""
    rng = np.random.default_rng(2)
    truth = _truth(rng).astype(np.float32)
    noisy = _noisy(truth, rng)
    blended = truth.copy()
    blend = blend_blind_mean(noisy, blended, scale_px=3.0)
    assert 0.0 <= blend.weight < 0.1  # chance alone: 0.02-0.05 of the field on average over three seeds
    assert np.mean((blended - truth) ** 2) < 0.001 * np.mean((noisy - truth) ** 2)  # 4e-5


def test_off_too_short_or_not_the_networks_frames_are_left_alone():
    rng = np.random.default_rng(3)
    truth = _truth(rng)
    noisy, estimate = _noisy(truth, rng), _blind_estimate(truth, rng)
    kept = estimate.copy()
    assert blend_blind_mean(noisy, kept, scale_px=0.0) == CellBlend(0, FRAMES, reason="off")
    short = blend_blind_mean(noisy[:40], kept[:40], scale_px=3.0)
    assert short.sigma_t is None and short.reach == 0 and "too few frames" in short.reason
    np.testing.assert_array_equal(kept, estimate)
    scored = np.ones(FRAMES, bool)
    scored[100:120] = False  # e.g. the referee's window means
    blended = estimate.copy()
    assert blend_blind_mean(noisy, blended, scale_px=3.0, scored=scored).weight > 0
    np.testing.assert_array_equal(blended[100:120], estimate[100:120])
    assert not np.array_equal(blended[:100], estimate[:100])


@pytest.mark.parametrize("scale_px", [2.0, 3.0])
def test_a_blended_output_is_blind_to_its_own_frame(scale_px):
    """A jolt of frame t's noise (7x its standard deviation) moves the blended output of frame t by
    a negligible share of it (through the two sums over every frame), while a filter that saw the
    frame would move by its own weight of it."""
    rng = np.random.default_rng(4)
    truth = _truth(rng)
    noisy, estimate = _noisy(truth, rng), _blind_estimate(truth, rng)
    t = FRAMES // 2
    jolted = noisy.copy()
    jolted[t] += rng.normal(0, 250, noisy[t].shape).astype(np.float32)
    a, b = estimate.copy(), estimate.copy()
    blend_a = blend_blind_mean(noisy, a, scale_px=scale_px)
    blend_b = blend_blind_mean(jolted, b, scale_px=scale_px)
    assert blend_a.sigma_t == blend_b.sigma_t and blend_a.weight > 0.1
    moved = np.abs(b[t] - a[t]).max() / np.abs(jolted[t] - noisy[t]).max()
    assert moved < 2e-3  # 1.4e-3 at 2 px, 0.8e-3 at 3
    # its neighbours do see frame t (through the blind mean), as their own reach says
    assert np.abs(b[t + 1] - a[t + 1]).max() > 10 * np.abs(b[t] - a[t]).max()


def test_a_blended_output_is_blind_to_its_own_frame_when_the_outputs_see_their_neighbours():
    """Outputs that read the frames around theirs (as the network's do, within ``reach``): a jolt of
    frame t still moves output t only through the fit's sums, since no output that saw frame t
    guides output t's smoothing; t lies by the middle, where the two halves' guides meet."""
    rng = np.random.default_rng(4)
    truth = _truth(rng)
    noisy, own = _noisy(truth, rng), _blind_estimate(truth, rng)

    def estimate(frames: np.ndarray) -> np.ndarray:  # output t reads frames t-8..t+8, never t
        return (0.5 * own + 0.5 * blind_temporal_mean(frames, 2.0)).astype(np.float32)

    t = FRAMES // 2 - 2
    jolted = noisy.copy()
    jolted[t] += rng.normal(0, 250, noisy[t].shape).astype(np.float32)
    a, b = estimate(noisy), estimate(jolted)
    assert blend_blind_mean(noisy, a, scale_px=2.0, reach=8).weight > 0.1
    blend_blind_mean(jolted, b, scale_px=2.0, reach=8)
    assert np.abs(b[t] - a[t]).max() < 2e-3 * np.abs(jolted[t] - noisy[t]).max()  # 1.0e-3


def test_the_guide_of_each_half_never_holds_outputs_within_reach():
    rng = np.random.default_rng(8)
    outputs = rng.normal(100, 10, (FRAMES, 16, 16)).astype(np.float32)
    scored = np.ones(FRAMES, bool)
    probe = rng.normal(0, 1, (16, 16)).astype(np.float32)
    before = [part.smooth(probe) for part in _parts(outputs, scored, 2.0, 20)]
    for k, part in enumerate(_parts(outputs, scored, 2.0, 20)):
        changed = outputs.copy()
        changed[max(0, part.start - 20):part.stop + 20] += rng.normal(0, 100, (16, 16)).astype(np.float32)
        np.testing.assert_array_equal(_parts(changed, scored, 2.0, 20)[k].smooth(probe), before[k])
        changed[part.stop + 20:] += 1000 * probe  # beyond the reach: the guide's
        changed[:max(0, part.start - 20)] += 1000 * probe
        assert not np.allclose(_parts(changed, scored, 2.0, 20)[k].smooth(probe), before[k])


def test_outputs_of_a_longer_segment_blend_with_its_frames_around_them():
    """A chunk of a segment (``offset``): the fit is the one the whole segment gives for those
    outputs, and each blind mean reads the frames beyond the chunk too, as the whole movie's would."""
    rng = np.random.default_rng(5)
    truth = _truth(rng)
    noisy = _noisy(truth, rng)
    estimate = (0.8 * _blind_estimate(truth, rng) + 0.2 * truth).astype(np.float32)  # a fit inside (0, 1)
    chunk = estimate[50:250].copy()
    blend = blend_blind_mean(noisy, chunk, scale_px=3.0, offset=50, first=50)
    assert blend.first == 50 and blend.frames == 200 and 0.05 < blend.weight < 1.0 and blend.sigma_t is not None
    whole = estimate.copy()
    scored = np.zeros(FRAMES, bool)
    scored[50:250] = True
    assert blend_blind_mean(noisy, whole, scale_px=3.0, scored=scored) == replace(blend, first=0, frames=FRAMES)
    np.testing.assert_allclose(chunk, whole[50:250], rtol=1e-6, atol=1e-3)
    # output by output, as the whole movie's formula: each pixel its region's weight and sigma
    parts = _parts(estimate[50:250], np.ones(200, bool), 3.0, 0)
    fit = _fit(noisy, estimate[50:250], parts, np.ones(200, bool), 50)
    assert fit is not None and fit.sigmas == blend.sigmas and max(fit.sigmas) == blend.sigma_t
    assert len(fit.sigmas) > 1  # the regions differ
    expected = estimate[50:250].copy()
    for part in parts:  # each half smoothed within the sources the other half's mean output draws
        smooth = np.stack([part.smooth(frame) for frame in noisy])
        own = np.stack([part.smooth(frame) for frame in estimate[50 + part.start:50 + part.stop]])
        means = np.stack([blind_temporal_mean(smooth, sigma)[50 + part.start:50 + part.stop] for sigma in fit.sigmas])
        towards = np.take_along_axis(means, np.broadcast_to(fit.pick, means.shape[1:])[None], 0)[0]
        expected[part.start:part.stop] += fit.weight * (towards - own)
    np.testing.assert_allclose(chunk, expected, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="outside"):
        blend_blind_mean(noisy[:100], chunk, scale_px=3.0, offset=50)


def test_a_blended_output_farther_from_its_frame_than_the_windows_mean_is_left_as_it_was():
    """The referee's rule, as for a restored output: given a window mean that is the truth itself
    on some frames, those frames keep the output they had and are recorded."""
    rng = np.random.default_rng(6)
    truth = _truth(rng)
    noisy, estimate = _noisy(truth, rng), _blind_estimate(truth, rng)
    blended = estimate[20:].copy()  # the outputs of frames 20 onwards: the referee's frames are theirs
    perfect = set(range(100, 110))  # outputs (of frames 120-129)

    def neighbours(j: int) -> np.ndarray:
        return truth[20 + j].astype(np.float32) if j in perfect else noisy[20 + j] + 1e4

    blend = blend_blind_mean(noisy, blended, scale_px=3.0, first=27, offset=20, neighbours=neighbours)
    assert blend.unblended == tuple(27 + j for j in sorted(perfect))
    np.testing.assert_array_equal(blended[100:110], estimate[120:130])
    assert not np.array_equal(blended[90:100], estimate[110:120])


def test_an_output_that_is_not_a_number_changes_nothing():
    rng = np.random.default_rng(7)
    truth = _truth(rng)
    noisy, estimate = _noisy(truth, rng), _blind_estimate(truth, rng)
    estimate[10, 5, 5] = np.nan
    blended = estimate.copy()
    blend = blend_blind_mean(noisy, blended, scale_px=3.0)
    assert blend.sigma_t is None and blend.weight == 0 and "no closer" in blend.reason
    np.testing.assert_array_equal(blended, estimate)


def test_a_files_final_pass_blends_each_segment_and_says_so(tmp_path):
    """Through `denoise`: each segment's blend is recorded (engine, summary, provenance); 0 is off
    and leaves the outputs as the network and the restoration made them; `--blend-px` sets it."""
    from dataclasses import replace

    import tifffile

    from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
    from umvd_live.apps.cli import build_parser, engine_config_from_args
    from umvd_live.apps.denoise import denoise_movie, denoise_provenance, describe_blends
    from umvd_live.engine import EngineConfig
    from umvd_live.recording.movie import MovieFrames

    noisy, _ = TwoPhotonSimulator(SimConfig(height=48, width=48, photons=2.0, seed=1)).movie(240)
    noisy[160:] = np.clip(noisy[160:].astype(np.float32) * 3, 0, 65535).astype(noisy.dtype)  # laser x3
    config = EngineConfig(device="cpu", preset="lite", steps_per_frame=0.0, warmup_frames=8, warmup_steps=0, seed=0)
    assert config.blend_px == 2.0
    results = {px: denoise_movie(noisy, replace(config, blend_px=px)) for px in (3.0, 0.0)}
    for px, result in results.items():
        blends = result.engine.cell_blends
        assert [b.first for b in blends] == [0, 160] == [g.first for g in result.engine.amplitude_gains]
        if px == 0:
            assert all(b.reason == "off" and b.weight == 0 for b in blends)
    blends = results[3.0].engine.cell_blends
    assert blends[0].weight > 0 and blends[0].sigma_t is not None
    assert "too few frames" in blends[1].reason  # 80 frames
    changed = [not np.array_equal(o.image, p.image) for o, p in zip(results[3.0].outputs, results[0.0].outputs)]
    assert sum(changed[:160]) > 100 and not any(changed[160:])
    described = describe_blends(blends)
    assert described.startswith("0:") and ", 160:0.000 (too few frames" in described
    src = tmp_path / "in.ome.tif"
    tifffile.imwrite(src, noisy, ome=True, metadata={"axes": "TYX"})
    with MovieFrames(src) as movie:
        assert denoise_provenance(results[3.0].engine, movie, offline=False).extra["cell_blend"] == described
    with pytest.raises(ValueError, match="blend_px"):
        EngineConfig(blend_px=-1.0)
    args = build_parser().parse_args(["denoise", "in.tif", "out.ome.tif", "--blend-px", "0"])
    assert engine_config_from_args(args).blend_px == 0.0
    args = build_parser().parse_args(["denoise", "in.tif", "out.ome.tif"])
    assert engine_config_from_args(args).blend_px == 2.0
