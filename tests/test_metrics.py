"""Quality figures: the activity measure that whole-movie PSNR hides."""

import numpy as np
import pytest
from scipy.ndimage import uniform_filter1d

from umvd_live.metrics import activity_fidelity, psnr, temporal_mean


def transient_movie(frames=200, size=16):
    """A flat field with one square that lights up for 10 frames, twice."""
    truth = np.full((frames, size, size), 100.0)
    for start in (50, 140):
        truth[start : start + 10, 4:8, 4:8] += 80.0
    return truth


def test_activity_fidelity_is_perfect_for_the_truth_and_flags_smoothing():
    truth = transient_movie()
    psnr_active, slope = activity_fidelity(truth + 1e-3, truth)
    assert slope == pytest.approx(1.0) and psnr_active > 80
    # A 31-frame running mean keeps the static field but flattens each transient to a third.
    smoothed = uniform_filter1d(truth, 31, axis=0, mode="reflect")
    psnr_active, slope = activity_fidelity(smoothed, truth)
    assert slope < 0.5 and psnr_active < psnr(smoothed, truth) - 10


def test_activity_fidelity_needs_activity():
    with pytest.raises(ValueError, match="no activity"):
        activity_fidelity(np.ones((5, 4, 4)), np.ones((5, 4, 4)))


# ---- issue 14: the activity metrics, one function each, and the per-metric oracle --------------

from scipy import sparse  # noqa: E402
from tool_modules import load_tool  # noqa: E402

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator  # noqa: E402
from umvd_live.metrics import (  # noqa: E402
    MovieScorer,
    active_psnr,
    active_set,
    best_gaussian,
    cell_traces,
    oracle_gaussians,
    score_movie,
    trace_correlation,
    trace_scores,
    trace_slope,
)

OFFSET = 50.0


def cells_movie(frames=240, size=24):
    """Two square cells over a dim background (dark level OFFSET): cell 0 fires three transients
    (instant rise, 1 s decay at 30 Hz), cell 1 never fires."""
    truth = np.full((frames, size, size), OFFSET + 100.0)
    footprints = np.zeros((2, size, size))
    footprints[0, 4:10, 4:10] = 1.0
    footprints[1, 14:20, 14:20] = 1.0
    kernel = np.exp(-np.arange(frames) / 30.0)
    activity = np.zeros(frames)
    for start, amplitude in ((40, 1.0), (110, 2.0), (170, 0.6)):
        activity[start:] += amplitude * kernel[: frames - start]
    truth[:, 4:10, 4:10] += 100.0 * (1.0 + activity)[:, None, None]
    truth[:, 14:20, 14:20] += 80.0
    return truth, footprints


def test_the_truth_scores_perfectly():
    truth, footprints = cells_movie()
    scores = score_movie(truth, truth, footprints, offset=OFFSET)
    assert scores["psnr"] == np.inf and scores["active_psnr"] == np.inf
    assert scores["cells"] == 1  # the silent cell is not scored
    assert scores["trace_corr"] == pytest.approx(1.0)
    assert scores["trace_slope"] == pytest.approx(1.0)
    assert scores["peak_ratio"] == pytest.approx(1.0)
    assert scores["lag_frames"] == pytest.approx(0.0, abs=1e-9)
    assert 0 < scores["active_fraction"] < 0.1
    # The one-metric functions agree with the scorer.
    noisy = truth + np.random.default_rng(0).normal(0, 5, truth.shape)
    both = score_movie(noisy, truth, footprints, offset=OFFSET)
    assert psnr(noisy, truth) == pytest.approx(both["psnr"], abs=1e-9)
    assert active_psnr(noisy, truth) == pytest.approx(both["active_psnr"], abs=1e-9)
    assert trace_correlation(noisy, truth, footprints, OFFSET) == pytest.approx(both["trace_corr"], abs=1e-12)
    assert trace_slope(noisy, truth, footprints, OFFSET) == pytest.approx(both["trace_slope"], abs=1e-12)


def test_a_known_attenuation_gives_the_known_slope():
    truth, footprints = cells_movie()
    median = np.median(truth, axis=0)
    attenuated = median + 0.6 * (truth - median)  # every transient cut to 60 %
    scores = score_movie(attenuated, truth, footprints, offset=OFFSET)
    assert scores["trace_slope"] == pytest.approx(0.6)
    assert scores["peak_ratio"] == pytest.approx(0.6)
    assert scores["trace_corr"] == pytest.approx(1.0)  # correlation alone would miss it
    assert scores["psnr"] < 80 and scores["active_psnr"] < scores["psnr"]
    # A 31-frame running mean flattens the transients and is late on none (it is centred) ...
    smoothed = score_movie(temporal_mean(truth, 31), truth, footprints, offset=OFFSET)
    assert smoothed["peak_ratio"] < 0.8 and smoothed["trace_slope"] < 0.9
    assert abs(smoothed["lag_frames"]) < 0.5


def test_a_late_estimate_has_a_positive_lag():
    truth, footprints = cells_movie()
    late = np.roll(truth, 2, axis=0)  # every change two frames late
    scores = trace_scores(late, truth, footprints, offset=OFFSET)
    assert scores.lag_frames == pytest.approx([2.0], abs=0.3)
    assert scores.correlation[0] < 0.99
    early = trace_scores(np.roll(truth, -1, axis=0), truth, footprints, offset=OFFSET)
    assert early.lag_frames == pytest.approx([-1.0], abs=0.3)


def test_scores_per_kind_of_source_split_the_means():
    """Three sources of three kinds, the middle one silent (not scored), the others attenuated
    differently: each kind gets its own cells' slope, where the mean over cells gives their
    average, and the silent one's kind none (labels follow the scored cells' indices)."""
    truth, footprints = cells_movie()  # cell 0 fires, cell 1 never does
    footprints = np.concatenate([footprints, np.zeros_like(footprints[:1])])
    footprints[2, 14:20, 4:10] = 1.0
    truth[:, 14:20, 4:10] = truth[:, 4:10, 4:10] - 20.0  # a third cell, firing as cell 0 does
    median = np.median(truth, axis=0)
    estimate = np.repeat(median[None], len(truth), axis=0)
    estimate[:, 4:10, 4:10] += 0.9 * (truth - median)[:, 4:10, 4:10]
    estimate[:, 14:20, 4:10] += 0.5 * (truth - median)[:, 14:20, 4:10]
    scores = trace_scores(estimate, truth, footprints, offset=OFFSET)
    assert scores.cells.tolist() == [0, 2]
    assert scores.summary()["trace_slope"] == pytest.approx(0.7)
    kinds = scores.by_kind(np.array(["soma", "punctum", "process"]))
    assert list(kinds) == ["soma", "process"]
    assert kinds["soma"]["trace_slope"] == pytest.approx(0.9) and kinds["soma"]["cells"] == 1
    assert kinds["process"]["trace_slope"] == pytest.approx(0.5)
    assert scores.by_kind(["soma", "soma", "soma"])["soma"]["cells"] == 2
    with pytest.raises(ValueError, match="one label per footprint"):
        scores.by_kind(np.array(["soma", "punctum"]))


def test_cell_traces_are_footprint_weighted_means_and_take_sparse_footprints():
    truth, footprints = cells_movie(frames=20)
    weights = footprints.copy()
    weights[0, 4, 4] = 3.0
    traces = cell_traces(truth, weights)
    expected = (truth * weights[0]).sum(axis=(1, 2)) / weights[0].sum()
    np.testing.assert_allclose(traces[:, 0], expected)
    np.testing.assert_allclose(cell_traces(truth, sparse.csr_matrix(weights.reshape(2, -1))), traces)
    with pytest.raises(ValueError, match="pixels"):
        cell_traces(truth, np.ones((2, 5, 5)))


def test_active_set_is_ten_percent_of_the_range_above_the_pixel_median():
    truth = transient_movie()
    active = active_set(truth)
    assert active.sum() == 2 * 10 * 16  # both 10-frame transients of the 4x4 square
    assert not active_set(truth, threshold=1.1).any()


@pytest.fixture(scope="module")
def simulated():
    sim = TwoPhotonSimulator(SimConfig(height=48, width=48, photons=2.0, seed=0))
    noisy, clean = sim.movie(300)
    return noisy, clean, sim.footprints(), sim.config


def test_oracle_picks_a_longer_sigma_t_for_whole_movie_psnr_than_for_the_transients(simulated):
    noisy, clean, footprints, config = simulated
    search = oracle_gaussians(noisy, clean, footprints, offset=config.offset_adu)
    best = search.best
    assert set(best) == {"psnr", "active_psnr", "trace_corr"}
    assert len(search.grid) == 13 * 8 and max(st for st, _, _ in search.grid) == 32
    # Each oracle is the best of the grid for its own metric, and beats the raw movie on it.
    raw = MovieScorer(clean, footprints, offset=config.offset_adu).score(noisy)
    for metric, oracle in best.items():
        assert oracle.scores[metric] == max(scores[metric] for _, _, scores in search.grid)
        assert oracle.scores[metric] > raw[metric]
    # Whole-movie PSNR wants long temporal averaging, which the transients cannot afford.
    assert best["psnr"].sigma_t > best["active_psnr"].sigma_t
    assert best["psnr"].scores["active_psnr"] < best["active_psnr"].scores["active_psnr"]
    assert best["psnr"].scores["trace_slope"] < best["active_psnr"].scores["trace_slope"]


def test_best_gaussian_is_the_psnr_oracle(simulated):
    noisy, clean, _, _ = simulated
    filtered, (st, sxy), score = best_gaussian(noisy, clean, sigmas_t=(1.0, 4.0, 16.0), sigmas_xy=(0.0, 1.0))
    assert score == pytest.approx(psnr(filtered, clean))
    search = oracle_gaussians(noisy, clean, sigmas_t=(1.0, 4.0, 16.0), sigmas_xy=(0.0, 1.0))
    assert (search.best["psnr"].sigma_t, search.best["psnr"].sigma_xy) == (st, sxy)
    assert search.best["psnr"].scores["psnr"] == pytest.approx(score, abs=1e-6)
    assert "trace_corr" not in search.best  # no footprints, no trace metrics


# ---- the one quality report of bench, demo and tools/bench_denoise.py ---------------------------

from umvd_live.metrics import (  # noqa: E402
    DENOISED,
    RAW,
    TMEAN,
    SessionFrames,
    activity_report,
    gaussian_3d,
    report_rows,
)


def test_activity_report_scores_every_row_on_the_same_frames_and_finds_the_oracles(simulated):
    noisy, clean, footprints, config = simulated
    estimate = gaussian_3d(noisy, 4.0, 0.5)
    report = activity_report(noisy, clean, estimate, footprints, offset=config.offset_adu,
                             oracle="reduced")
    scorer = MovieScorer(clean, footprints, offset=config.offset_adu)
    assert report["rows"][RAW] == scorer.score(noisy)
    assert report["rows"][TMEAN] == scorer.score(temporal_mean(noisy, 5))
    assert report["rows"][DENOISED] == scorer.score(estimate)
    assert report["frames"] == len(clean) and report["cells"] == scorer.traces.cells.size
    # The reduced grid's oracles are those of oracle_gaussians on the same grid.
    search = oracle_gaussians(noisy, clean, footprints, offset=config.offset_adu,
                              sigmas_t=report["oracle"]["sigmas_t"], sigmas_xy=report["oracle"]["sigmas_xy"])
    for metric, found in report["oracle"]["best"].items():
        assert (found["sigma_t"], found["sigma_xy"]) == (search.best[metric].sigma_t, search.best[metric].sigma_xy)
        assert found[metric] == search.best[metric].scores[metric]
    labels = [label for label, _ in report_rows(report)]
    assert labels[:2] == [RAW, TMEAN] and labels[-1] == DENOISED and len(labels) == 6
    report = activity_report(noisy, clean, estimate, footprints, offset=config.offset_adu, oracle="none")
    assert report["oracle"] is None


def test_activity_report_scores_each_kind_of_source_when_told_the_kinds(simulated):
    """bench and demo pass the simulator's kinds: every row, the oracles' included, then holds
    the trace means per kind, equal to `TraceScores.by_kind`; the report's table shows them."""
    from rich.console import Console

    from umvd_live.apps.harness import activity_table

    noisy, clean, footprints, config = simulated
    kinds = TwoPhotonSimulator(config).scene.kinds
    estimate = gaussian_3d(noisy, 4.0, 0.5)
    report = activity_report(noisy, clean, estimate, footprints, offset=config.offset_adu, oracle="reduced",
                             kinds=kinds)
    traces = trace_scores(estimate, clean, footprints, offset=config.offset_adu)
    expected = traces.by_kind(kinds)
    assert report["rows"][DENOISED]["by_kind"] == expected
    for kind, scores in expected.items():  # each kind's cells, as the scene labels the scored sources
        assert scores["cells"] == int((kinds[traces.cells] == kind).sum())
        assert scores["trace_slope"] == pytest.approx(float(traces.slope[kinds[traces.cells] == kind].mean()))
    for _, scores in report_rows(report):
        assert set(scores["by_kind"]) == set(expected)
    console = Console(width=200, record=True)
    console.print(activity_table(report, "activity"))
    text = console.export_text()
    assert "per kind of source" in text and f"soma ({expected['soma']['cells']})" in text
    assert f"{expected['soma']['trace_slope']:.2f} / {expected['soma']['trace_corr']:.3f}" in text
    # without the kinds, no such table; and kinds that do not match the footprints are refused
    assert "by_kind" not in activity_report(noisy, clean, estimate, footprints, oracle="none")["rows"][DENOISED]
    with pytest.raises(ValueError, match="one label per footprint"):
        MovieScorer(clean, footprints, kinds=kinds[:-1])
    with pytest.raises(ValueError, match="footprints"):
        MovieScorer(clean, kinds=kinds)


def test_activity_report_scores_only_the_frames_that_have_an_estimate(simulated):
    noisy, clean, footprints, config = simulated
    scored = np.ones(len(clean), bool)
    scored[100:110] = False  # skipped by a live stream: no estimate there
    estimate = gaussian_3d(noisy, 2.0, 0.5)
    broken = estimate.copy()
    broken[~scored] = 0.0
    report = activity_report(noisy, clean, broken, footprints, offset=config.offset_adu, scored=scored,
                             oracle="none")
    # Scored on the frames that have one, the trace lag and peak window in real frames (across the gap).
    scorer = MovieScorer(clean[scored], footprints, offset=config.offset_adu, frames=np.flatnonzero(scored))
    assert report["frames"] == scored.sum()
    assert report["rows"][DENOISED] == scorer.score(estimate[scored])
    # The baselines filter the whole span (as an offline filter would) and are scored on the same frames.
    assert report["rows"][TMEAN] == scorer.score(temporal_mean(noisy, 5)[scored])


@pytest.mark.parametrize("kwargs, message", [
    ({"oracle": "huge"}, "oracle grid"),
    ({"scored": np.zeros(300, bool)}, "30"),
    ({"scored": np.ones(7, bool)}, "one flag per frame"),
])
def test_activity_report_refuses_bad_input(simulated, kwargs, message):
    noisy, clean, footprints, _ = simulated
    with pytest.raises(ValueError, match=message):
        activity_report(noisy, clean, clean, footprints, **kwargs)


def test_session_frames_score_from_the_first_live_output_and_stay_bounded(simulated):
    noisy, clean, footprints, config = simulated
    frames = SessionFrames()
    estimate = gaussian_3d(noisy, 3.0, 0.5)
    for seq in range(len(clean)):
        frames.add_input(seq, noisy[seq], clean[seq])
        if seq != 150:  # one output skipped
            frames.add_output(seq, estimate[seq], "warmup" if seq < 40 else "live")
    report = frames.report(footprints, offset=config.offset_adu, oracle="none")
    assert report["span"] == [40, len(clean) - 1] and report["frames"] == len(clean) - 40 - 1
    direct = activity_report(noisy[40:], clean[40:], estimate[40:], footprints, offset=config.offset_adu,
                             scored=np.arange(40, len(clean)) != 150, oracle="none")
    assert report["rows"] == direct["rows"]
    # Bounded: only the latest frames are kept, and the span starts where they do.
    bounded = SessionFrames(max_frames=100)
    for seq in range(len(clean)):
        bounded.add_input(seq, noisy[seq], clean[seq])
        bounded.add_output(seq, estimate[seq], "live")
    assert len(bounded.inputs) == len(bounded.outputs) == 100
    assert bounded.report(footprints, offset=config.offset_adu, oracle="none")["span"] == [200, 299]
    with pytest.raises(ValueError, match="no live output"):
        SessionFrames().report(footprints)


def test_bench_denoise_sets_the_simulator_physics_it_is_asked_for(capsys):
    """tools/bench_denoise.py --sim: the movies unlike those the engine was tuned on (docs/benchmarks.md)."""
    import argparse

    from umvd_live.apps.harness import movie_config, sim_overrides

    tool = load_tool("bench_denoise")
    args = argparse.Namespace(size=(64, 96), sim=["rate_hz=10", "n_cells=40", "drift_px=3"])
    config = tool.sim_config(args, 8.0, 5)
    assert (config.rate_hz, config.n_cells, config.drift_px) == (10.0, 40, 3.0)
    assert isinstance(config.n_cells, int)
    # the options the tool sets itself stay its own: size, photons (and the gain that follows), seed
    assert (config.height, config.width, config.photons, config.seed) == (64, 96, 8.0, 5)
    assert config.gain_adu == pytest.approx(tool.SimConfig().gain_adu / 4)
    for bad in (["seed=3"], ["rate_hz"], ["rate_hz=fast"], ["colour=1"]):
        with pytest.raises(ValueError, match="--sim"):
            sim_overrides(bad)
        with pytest.raises(SystemExit, match="--sim"):
            tool.sim_config(argparse.Namespace(size=(64, 96), sim=bad), 2.0, 0)
    # tools/figure_real.py draws the same movie (`harness.movie_config`), and says so where it
    # would draw none: the real movie and the live bench take no --sim
    assert movie_config(64, 96, 8.0, 5, ["rate_hz=10", "n_cells=40", "drift_px=3"]) == config
    figure = load_tool("figure_real")
    for movie in ("real", "live"):  # (inputs that are not there: no movie is read or made)
        for option in (["--sim", "rate_hz=10"], ["--simulator", "independent"]):
            with pytest.raises(SystemExit):
                figure.main([movie, *option, "--input", "absent.tif", "--denoised", "absent.npz"])
            assert "takes none" in capsys.readouterr().err


def test_bench_denoise_tables_each_kind_of_source_over_the_seeds():
    """Means over the seeds per kind; a kind one seed lacks is left out of that mean, and a row
    one seed lacks (an oracle with no cell to score) is left out of the table."""
    tool = load_tool("bench_denoise")

    def run(seed, slopes, oracle_corr=True):
        kinds = {k: {"trace_slope": v, "trace_corr": 0.5, "cells": 2} for k, v in slopes.items()}
        rows = {"noisy input": {"by_kind": kinds}, "oracle:psnr": {"by_kind": kinds, "sigma_t": 8.0, "sigma_xy": 0.5}}
        if oracle_corr:
            rows["oracle:trace_corr"] = {"by_kind": kinds, "sigma_t": 6.0, "sigma_xy": 0.0}
        return {"config": {"seed": seed}, "rows": rows}
    text = tool.kind_table(2.0, [run(0, {"soma": 0.8, "punctum": 0.6}), run(1, {"soma": 0.9}, oracle_corr=False)])
    assert "| soma (2/2 cells) | punctum (2/0 cells) |" in text
    assert "| noisy input | 0.85 / 0.500 | 0.60 / 0.500 |" in text
    assert "| Gaussian oracle for whole-movie PSNR (σt 8, σxy 0.5) | 0.85 / 0.500 | 0.60 / 0.500 |" in text
    assert "trace correlation" not in text


def _trace_movie(trace, size=4):
    """A field of 100 ADU whose every pixel follows ``trace`` above it: one cell, all the frame."""
    return 100.0 + np.asarray(trace, float)[:, None, None] * np.ones((1, size, size))


def test_non_finite_figures_become_null_for_strict_json():
    import json

    from umvd_live.metrics import finite_json

    figures = {"corr": np.nan, "psnr": np.float32("inf"), "rows": [{"lag": -np.inf, "n": 3}], "load": (1.5, np.nan)}
    assert finite_json(figures) == {"corr": None, "psnr": None, "rows": [{"lag": None, "n": 3}], "load": [1.5, None]}
    json.dumps(finite_json(figures), allow_nan=False)  # raises on any NaN or Infinity left


def test_a_truth_without_activity_is_refused_not_all_active():
    from umvd_live.metrics import MovieScorer, active_psnr, active_set

    truth = np.full((30, 8, 8), 100.0)
    assert not active_set(truth).any()
    with pytest.raises(ValueError, match="no activity"):
        active_psnr(truth + 1, truth)
    with pytest.raises(ValueError, match="no activity"):
        MovieScorer(truth)


def test_peak_window_at_the_movie_edge_counts_each_frame_once():
    from umvd_live.metrics import trace_scores

    g, e = np.zeros(40), np.zeros(40)
    g[:3], e[:3] = (10.0, 6.0, 3.0), (5.0, 6.0, 3.0)  # the largest transient at frame 0
    scores = trace_scores(_trace_movie(e), _trace_movie(g), np.ones((1, 4, 4)))
    assert scores.peak_ratio[0] == pytest.approx(14.0 / 19.0)


def test_a_flat_or_nan_estimate_has_no_correlation_or_lag_and_the_means_skip_it():
    from umvd_live.metrics import TraceScores, trace_scores

    t = np.arange(40)
    truth = _trace_movie(40 * np.exp(-np.clip(t - 10, 0, None) / 4.0) * (t >= 10))
    for estimate in (np.full_like(truth, 100.0), np.where(t[:, None, None] == 5, np.nan, truth)):
        scores = trace_scores(estimate, truth, np.ones((1, 4, 4)))
        assert np.isnan(scores.correlation[0]) and np.isnan(scores.lag_frames[0])
    two = TraceScores(np.array([0, 1]), np.array([0.5, np.nan]), np.array([1.0, 0.0]), np.array([1.0, 0.0]),
                      np.array([2.0, np.nan])).summary()
    assert two["trace_corr"] == 0.5 and two["lag_frames"] == 2.0 and two["cells"] == 2


def test_lag_and_peak_ratio_count_real_frames_when_some_are_unscored():
    """Every other frame unscored: a 2-frame lag is still 2 frames, not 1 (the gaps are not closed up)."""
    from umvd_live.metrics import DENOISED, activity_report

    t = np.arange(80)
    truth = _trace_movie(sum(40 * np.exp(-np.clip(t - t0, 0, None) / 4.0) * (t >= t0) for t0 in (10, 35, 60)), 6)
    late = np.roll(truth, 2, axis=0)
    late[:2] = 100.0
    fp = np.ones((1, 6, 6))
    every, halves = np.ones(80, bool), t % 2 == 0
    full = activity_report(truth, truth, late, fp, scored=every, oracle="none")["rows"][DENOISED]
    half = activity_report(truth, truth, late, fp, scored=halves, oracle="none")["rows"][DENOISED]
    assert full["lag_frames"] == pytest.approx(2.0, abs=0.01) and half["lag_frames"] == pytest.approx(2.0, abs=0.01)
    # The peak window: the scored frames within 2 frames of the truth's peak, not 5 scored ones.
    g, e = truth[halves, 0, 0], late[halves, 0, 0]
    g, e = g - np.median(g), e - np.median(e)
    frames = t[halves]
    window = np.abs(frames - frames[np.argmax(g)]) <= 2
    assert window.sum() == 3
    assert half["peak_ratio"] == pytest.approx(e[window].sum() / g[window].sum())


def test_lag_is_right_whatever_the_pattern_of_unscored_frames():
    """Each lag's cross-correlation is normalised over its own pairs of scored frames: with every
    3rd frame unscored the lags with most pairs (multiples of 3) drew the peak (a 1-frame lag read
    0.02, a 2-frame one 2.98); with every other frame unscored the odd lags have no pair and the
    parabola through the even ones still finds a 1-frame lag. Without gaps nothing changes."""
    from umvd_live.metrics import DENOISED, activity_report

    t = np.arange(120, dtype=float)
    fp = np.zeros((1, 4, 4))
    fp[0, 1:3, 1:3] = 1.0

    def movie(shift: float) -> np.ndarray:  # one Gaussian transient at frame 60 + shift
        return 200.0 + (50.0 * np.exp(-0.5 * ((t - 60 - shift) / 4) ** 2))[:, None, None] * fp[0]

    truth = movie(0.0)
    for keep in (np.ones(120, bool), t % 3 != 0, t % 2 == 0, (t % 5 != 1) & (t % 7 != 3)):
        for lag in (0.0, 1.0, 2.0, 1.5, -1.0):
            row = activity_report(truth, truth, movie(lag), fp, scored=keep, oracle="none")["rows"][DENOISED]
            assert row["lag_frames"] == pytest.approx(lag, abs=0.05), (keep.sum(), lag)


def test_the_active_set_is_at_least_ten_percent_of_the_range():
    """Issue 14: active where the truth is *at least* 10 % of its range above the pixel's median:
    a transient of exactly 10 % is in it, and a truth whose only activity is 10 % is scored,
    not refused; a truth of range 0 still has none."""
    from umvd_live.metrics import MovieScorer, active_psnr, active_set

    truth = np.zeros((20, 4, 4), np.uint16)
    truth[5:8, 2, 2] = 10  # exactly 10 % of the range above that pixel's median (0)
    truth[:, 3, 3] = 100  # range 100, a static bright pixel
    assert np.flatnonzero(active_set(truth).reshape(20, -1).any(axis=1)).tolist() == [5, 6, 7]
    assert active_set(truth).sum() == 3
    assert MovieScorer(truth).score(truth + 1.0)["active_fraction"] == pytest.approx(3 / truth.size)
    assert active_psnr(truth + 1.0, truth) == pytest.approx(20 * np.log10(100))
    assert activity_fidelity(truth.astype(float) + 1.0, truth)[1] == pytest.approx(1.0)
    assert not active_set(np.full((5, 2, 2), 7.0)).any()


def test_bench_denoise_lowers_the_gain_by_the_rule_of_bench_and_demo():
    """tools/bench_denoise.py and `umvd-live bench`/`demo` share one rule (`harness.fit_gain`): the
    same gain at every brightness, where `bench`/`demo` kept the full gain (and clipped) above 2
    photons without --events."""
    import argparse

    from umvd_live.apps.harness import sim_config

    tool = load_tool("bench_denoise")
    args = argparse.Namespace(size=(32, 32), sim=[])
    for photons in (0.5, 2.0, 3.0, 8.0):
        assert tool.sim_config(args, photons, 0).gain_adu == sim_config(32, 32, 30.0, photons, 0).gain_adu
