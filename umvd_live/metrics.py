"""Quality figures against a simulation's ground truth, and the classical baselines we must beat.

Whole-movie PSNR alone rewards a denoiser that learns that the field is still: most pixels of a
two-photon movie are at rest most of the time, so flattening the calcium transients costs little
there. The figures here therefore also score the activity (issue 14):

* ``psnr``: whole-movie PSNR, with the ground truth's own range (max - min, in ADU) as the peak, so
  figures do not depend on the camera offset or the integer type;
* ``active_psnr``: the same, over the *active set* only: the pixels and frames where the truth is
  at least ``threshold`` (10 %) of its range above that pixel's temporal median (the transients;
  a truth without activity is refused, not scored as all active);
* ``trace_scores``: per cell, the footprint-weighted trace of the estimate against that of the
  truth, both taken about their temporal median: Pearson correlation, amplitude slope (the
  least-squares slope of the estimate's trace on the truth's, through 0: 1 keeps transient
  amplitudes, 0.66 cuts them to two thirds), the peak ratio (the estimate's trace over the truth's,
  summed over the frames within 2 of the truth's largest transient: unbiased by noise, unlike a
  maximum), and the lag (frames by which the estimate's trace trails the truth's, from the peak of
  their normalised cross-correlation); both in real frames when some are unscored (a live stream
  skips some): the window and the frame pairs correlated leave those out, not close the gaps up,
  and each lag is normalised over its own pairs. A
  flat or NaN estimate trace has no correlation or lag (NaN), and the means over cells skip NaN;
  ``TraceScores.by_kind`` gives the same means per kind of source
  (somata, puncta, processes), which the means over every source hide;
* ``score_movie``/``MovieScorer``: all of them for one movie;
* ``oracle_gaussians``: the 3-D Gaussian filters whose sigma the ground truth picks, *separately
  for each metric* (sigma_t up to 32 frames): an oracle no user could tune without clean data;
* ``activity_report``: all of it for one estimate beside the raw frames, a 5-frame mean and the
  oracles: the one quality report of `umvd-live bench`, `umvd-live demo` and
  tools/bench_denoise.py; ``SessionFrames`` keeps what it needs of a live session, by seq.

Cells are scored if their truth trace rises at least ``min_dff`` (10 %) above its median, in dF/F
over the dark level ``offset`` (pass the camera offset: with 0 the dF/F is underestimated and
fewer cells qualify).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse
from scipy.ndimage import gaussian_filter, gaussian_filter1d, uniform_filter1d
from skimage.metrics import peak_signal_noise_ratio

#: The oracle's grid: sigma_t in frames (up to 32, issue 14), sigma_xy in pixels.
SIGMAS_T: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
SIGMAS_XY: tuple[float, ...] = (0.0, 0.5, 0.75, 1.0, 1.2, 1.5, 2.0, 2.5)
#: A coarser grid for live sessions, whose oracle runs after the stream on its scored frames: 40
#: filters instead of 104, without the sigmas the full grid never picked on the simulator (sigma_t
#: 0.5, 1.5, 12; sigma_xy above 1: docs/benchmarks.md has the comparison).
SIGMAS_T_REDUCED: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 24.0, 32.0)
SIGMAS_XY_REDUCED: tuple[float, ...] = (0.0, 0.5, 0.75, 1.0)
ORACLE_GRIDS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "full": (SIGMAS_T, SIGMAS_XY), "reduced": (SIGMAS_T_REDUCED, SIGMAS_XY_REDUCED)}
#: The metrics the oracle maximises, each with its own sigma.
ORACLE_METRICS: tuple[str, ...] = ("psnr", "active_psnr", "trace_corr")
ACTIVE_THRESHOLD = 0.1
MIN_CELL_DFF = 0.1
MAX_LAG = 5  # frames searched either way for the trace lag
PEAK_WINDOW = 2  # frames either side of the truth's largest peak that the peak ratio sums over


def psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Whole-movie (or frame) PSNR in dB, with the truth's range as the peak."""
    truth = np.asarray(truth, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    return float(peak_signal_noise_ratio(truth, estimate, data_range=float(truth.max() - truth.min())))


def active_set(truth: np.ndarray, threshold: float = ACTIVE_THRESHOLD) -> np.ndarray:
    """Boolean (T, H, W): where the truth is at least ``threshold`` x its range above that pixel's
    temporal median (issue 14): the calcium transients (and, in a moving field, the edges that
    move). A truth without activity (range 0) has none, rather than every pixel (each is 0 above
    its median, which is at least 0 x 0)."""
    truth = np.asarray(truth, dtype=np.float32)
    peak = float(truth.max()) - float(truth.min())
    if not peak > 0:
        return np.zeros(truth.shape, bool)
    return (truth - np.median(truth, axis=0)) >= threshold * peak


def active_psnr(estimate: np.ndarray, truth: np.ndarray, threshold: float = ACTIVE_THRESHOLD) -> float:
    """PSNR over the active set (``active_set``), with the whole movie's range as the peak."""
    truth = np.asarray(truth, dtype=np.float64)
    active = active_set(truth, threshold)
    if not active.any():
        raise ValueError("the truth has no activity above the threshold")
    peak = float(truth.max() - truth.min())
    error = np.asarray(estimate, dtype=np.float64)[active] - truth[active]
    return 10.0 * float(np.log10(peak * peak / np.mean(error * error)))


def activity_fidelity(estimate: np.ndarray, truth: np.ndarray, threshold: float = 0.1) -> tuple[float, float]:
    """(PSNR over the active set, slope of the estimate's activity on the truth's there).

    Activity is each pixel's departure from its temporal median; the active set is where the
    truth's activity is at least `threshold` x the truth's range (as `active_set`, in float64; none
    for a truth of range 0). The slope regresses the estimate's activity on the truth's over the
    active set (1 keeps transient amplitudes, < 1 flattens them,
    as heavy temporal smoothing does). The per-cell ``trace_scores`` are the sharper measure.
    """
    truth = np.asarray(truth, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    activity = truth - np.median(truth, axis=0)
    peak = float(truth.max() - truth.min())
    active = activity >= threshold * peak if peak > 0 else np.zeros(truth.shape, bool)
    if not active.any():
        raise ValueError("the truth has no activity above the threshold")
    error = (estimate - truth)[active]
    est_activity = (estimate - np.median(estimate, axis=0))[active]
    slope = float(est_activity @ activity[active] / (activity[active] @ activity[active]))
    return 10.0 * float(np.log10(peak * peak / np.mean(error * error))), slope


# ------------------------------------------------------------------------------------ cell traces


def _footprint_weights(footprints: Any, frame_shape: tuple[int, int]) -> sparse.csr_matrix:
    """(cells, H*W) sparse weights, each row summing to 1 (cells without a pixel in the frame: 0)."""
    if sparse.issparse(footprints):
        w = sparse.csr_matrix(footprints, dtype=np.float64)
    else:
        fp = np.asarray(footprints, dtype=np.float64)
        if fp.ndim == 2 and fp.shape[1:] != frame_shape:
            fp = fp[None]
        w = sparse.csr_matrix(fp.reshape(fp.shape[0], -1))
    if w.shape[1] != frame_shape[0] * frame_shape[1]:
        raise ValueError(f"footprints cover {w.shape[1]} pixels, the frames {frame_shape[0] * frame_shape[1]}")
    if w.nnz and w.data.min() < 0:
        raise ValueError("footprints must be non-negative")
    total = np.asarray(w.sum(axis=1)).ravel()
    scale = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
    return sparse.diags(scale) @ w


def cell_traces(movie: np.ndarray, footprints: Any) -> np.ndarray:
    """(T, cells): each frame's footprint-weighted mean over each cell.

    ``footprints``: (cells, H, W) non-negative weights (e.g. ``TwoPhotonSimulator.footprints()``)
    or a sparse (cells, H*W) matrix.
    """
    movie = np.asarray(movie)
    weights = _footprint_weights(footprints, movie.shape[1:])
    return _traces(movie, weights)


def _traces(movie: np.ndarray, weights: sparse.csr_matrix) -> np.ndarray:
    flat = np.asarray(movie, dtype=np.float64).reshape(movie.shape[0], -1)
    return np.asarray(weights @ flat.T).T


@dataclass
class TraceScores:
    """Per scored cell (``cells``: their indices in the footprints)."""

    cells: np.ndarray
    correlation: np.ndarray
    slope: np.ndarray
    peak_ratio: np.ndarray
    lag_frames: np.ndarray

    def summary(self) -> dict[str, float]:
        """Means over the scored cells, skipping a cell's NaN (a flat estimate trace has no
        correlation or lag); NaN when no cell has a value."""

        def mean(values: np.ndarray) -> float:
            known = values[~np.isnan(values)]
            return float(np.mean(known)) if known.size else float("nan")

        return {"trace_corr": mean(self.correlation), "trace_slope": mean(self.slope),
                "peak_ratio": mean(self.peak_ratio), "lag_frames": mean(self.lag_frames),
                "cells": int(len(self.cells))}

    def by_kind(self, kinds: Any) -> dict[str, dict[str, float]]:
        """`summary` per kind of source (``kinds``: one label per footprint, e.g. the simulator's
        ``scene.kinds``: soma, punctum, process), in order of first appearance. Why: the means
        over every source hide which ones fall short; a soma is what most users trace, and a
        punctum a few pixels across is shrunk most (docs/benchmarks.md, "Which sources fall short")."""
        kinds = np.asarray(kinds)
        if kinds.ndim != 1 or (len(self.cells) and len(kinds) <= int(self.cells.max())):
            raise ValueError(f"kinds must hold one label per footprint, got shape {kinds.shape}")
        labels = kinds[self.cells]
        out: dict[str, dict[str, float]] = {}
        for kind in dict.fromkeys(labels.tolist()):
            pick = labels == kind
            out[str(kind)] = TraceScores(self.cells[pick], self.correlation[pick], self.slope[pick],
                                         self.peak_ratio[pick], self.lag_frames[pick]).summary()
        return out


class _TruthTraces:
    """What the trace scores need from the truth, computed once. ``frames``: the frame number of
    each row (increasing; default 0, 1, ...), so that the peak window and the lag are in real frames
    when some frames are missing."""

    def __init__(self, truth: np.ndarray, weights: sparse.csr_matrix, offset: float, min_dff: float,
                 frames: np.ndarray | None = None):
        self.weights = weights
        self.frames = np.arange(len(truth)) if frames is None else np.asarray(frames)
        traces = _traces(truth, weights)
        median = np.median(traces, axis=0)
        centred = traces - median
        baseline = median - offset
        rise = centred.max(axis=0)
        has_pixels = np.asarray(weights.sum(axis=1)).ravel() > 0
        self.cells = np.flatnonzero(has_pixels & (baseline > 0) & (rise >= min_dff * np.maximum(baseline, 1e-12)))
        self.cell_weights = weights[self.cells]
        self.centred = centred[:, self.cells]
        self.energy = (self.centred**2).sum(axis=0)
        self.peak_at = self.centred.argmax(axis=0)

    def score(self, estimate: np.ndarray) -> TraceScores:
        g = self.centred
        if len(self.cells) == 0:
            empty = np.zeros(0)
            return TraceScores(self.cells, empty, empty, empty, empty)
        est = _traces(estimate, self.cell_weights)
        e = est - np.median(est, axis=0)
        slope = (e * g).sum(axis=0) / self.energy
        ec = e - e.mean(axis=0)
        gc = g - g.mean(axis=0)
        denom = np.sqrt((ec**2).sum(axis=0) * (gc**2).sum(axis=0))
        # A flat (or NaN) estimate trace correlates with nothing and has no lag: NaN, not 0 and -MAX_LAG.
        flat = ~(denom > 0)
        corr = np.where(flat, np.nan, (ec * gc).sum(axis=0) / np.where(flat, 1.0, denom))
        # Each frame within PEAK_WINDOW of the peak once, in real frames: none twice at the movie's
        # edges, none from beyond a gap of unscored frames.
        near = np.abs(self.frames[:, None] - self.frames[self.peak_at][None, :]) <= PEAK_WINDOW
        peak_ratio = (e * near).sum(axis=0) / (g * near).sum(axis=0)
        lag = np.where(flat, np.nan, self._lag(self._in_frames(g), self._in_frames(e), self._present()))
        return TraceScores(self.cells, corr, slope, peak_ratio, lag)

    def _present(self) -> np.ndarray:
        """Boolean over every frame of the span: whether it is one of the rows (scored)."""
        present = np.zeros(int(self.frames[-1] - self.frames[0]) + 1, bool)
        present[self.frames - self.frames[0]] = True
        return present

    def _in_frames(self, traces: np.ndarray) -> np.ndarray:
        """``traces`` (rows, cells) on every frame of their span, 0 on the missing ones (which
        `_lag` leaves out of every pair)."""
        if self.frames[-1] - self.frames[0] + 1 == len(self.frames):
            return traces
        full = np.zeros((int(self.frames[-1] - self.frames[0]) + 1, traces.shape[1]))
        full[self.frames - self.frames[0]] = traces
        return full

    @staticmethod
    def _lag(g: np.ndarray, e: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Frames by which ``e`` trails ``g`` (rows: every frame of the span; both about their
        medians): the peak over lags k of the normalised cross-correlation over the pairs
        (g[t], e[t + k]) whose frames are both ``present``, sum(g e) / sqrt(sum(g^2) sum(e^2)) (the
        correlation coefficient about the medians), with a parabolic sub-frame estimate through the
        nearest lags that have pairs.

        Why normalised per lag, not a sum of products: with frames missing (a live stream skips
        some) each lag has its own number of pairs, periodic in the skip pattern, and a sum is
        largest where the most pairs are, not where the traces line up. About the medians rather
        than each lag's own means, as the other trace scores: those means move with the pairs and
        bias the sub-frame estimate. A lag without two pairs (every other frame missing: the odd
        lags) is not measured, and the parabola spans it."""
        n, cells = g.shape
        lags = np.arange(-MAX_LAG, MAX_LAG + 1)
        xc = np.full((len(lags), cells), -np.inf)
        for i, k in enumerate(lags):  # over the pairs (g[t], e[t + k]) of present frames in the overlap
            a, b = (slice(0, n - k), slice(k, n)) if k >= 0 else (slice(-k, n), slice(0, n + k))
            pairs = present[a] & present[b]
            if pairs.sum() < 2:
                continue
            x, y = g[a][pairs], e[b][pairs]
            norm = np.sqrt((x * x).sum(axis=0) * (y * y).sum(axis=0))
            xc[i] = np.divide((x * y).sum(axis=0), norm, out=np.zeros(cells), where=norm > 0)
        measured = np.flatnonzero(np.isfinite(xc[:, 0]))  # the same lags for every cell
        if len(measured) == 0:
            return np.full(cells, np.nan)
        best = measured[xc[measured].argmax(axis=0)]
        # The nearest measured lag on each side of the best (itself where there is none).
        where = np.searchsorted(measured, best)
        below = measured[np.maximum(where - 1, 0)]
        above = measured[np.minimum(where + 1, len(measured) - 1)]
        inner = (below < best) & (above > best)
        cols = np.arange(cells)
        x0, x2 = (lags[below] - lags[best]).astype(float), (lags[above] - lags[best]).astype(float)
        d0, d2 = xc[below, cols] - xc[best, cols], xc[above, cols] - xc[best, cols]
        x0, x2 = np.where(inner, x0, -1.0), np.where(inner, x2, 1.0)
        d0, d2 = np.where(inner, d0, 0.0), np.where(inner, d2, 0.0)
        # The parabola through (x0, d0), (0, 0), (x2, d2): d = q x^2 + r x, its vertex at -r / 2q.
        q = (d0 / x0 - d2 / x2) / (x0 - x2)
        r = d0 / x0 - q * x0
        frac = np.divide(-r, 2 * q, out=np.zeros(cells), where=q < 0)
        frac = np.where(inner, np.clip(frac, x0 / 2, x2 / 2), 0.0)
        return lags[best] + frac


def trace_scores(
    estimate: np.ndarray, truth: np.ndarray, footprints: Any, offset: float = 0.0, min_dff: float = MIN_CELL_DFF
) -> TraceScores:
    """Per-cell correlation, amplitude slope, peak ratio and lag of the footprint-weighted traces."""
    truth = np.asarray(truth)
    weights = _footprint_weights(footprints, truth.shape[1:])
    return _TruthTraces(truth, weights, offset, min_dff).score(np.asarray(estimate))


def trace_correlation(estimate: np.ndarray, truth: np.ndarray, footprints: Any, offset: float = 0.0,
                      min_dff: float = MIN_CELL_DFF) -> float:
    """Mean over the active cells of the Pearson correlation of estimate and truth traces."""
    return trace_scores(estimate, truth, footprints, offset, min_dff).summary()["trace_corr"]


def trace_slope(estimate: np.ndarray, truth: np.ndarray, footprints: Any, offset: float = 0.0,
                min_dff: float = MIN_CELL_DFF) -> float:
    """Mean over the active cells of the amplitude slope (estimate trace on truth trace, about medians)."""
    return trace_scores(estimate, truth, footprints, offset, min_dff).summary()["trace_slope"]


# ------------------------------------------------------------------------------------ all at once


class MovieScorer:
    """Scores estimates of one truth with every metric; the truth's part is computed once.

    ``score(estimate)`` returns ``{"psnr", "active_psnr", "active_fraction"}`` and, with
    footprints, ``{"trace_corr", "trace_slope", "peak_ratio", "lag_frames", "cells"}``; with
    ``kinds`` as well (one label per footprint), ``"by_kind"``: those trace means per kind of
    source (`TraceScores.by_kind`). ``frames``: the frame number of each of the truth's frames, when
    it holds only some of a span's (`activity_report`'s scored ones): the trace lag and peak window
    are then counted in real frames.
    """

    CHUNK = 64  # frames per chunk of the float64 error sums

    def __init__(self, truth: np.ndarray, footprints: Any = None, *, offset: float = 0.0,
                 threshold: float = ACTIVE_THRESHOLD, min_dff: float = MIN_CELL_DFF, kinds: Any = None,
                 frames: np.ndarray | None = None):
        self.truth = np.asarray(truth)
        if not np.issubdtype(self.truth.dtype, np.floating):
            self.truth = self.truth.astype(np.float32)
        if self.truth.ndim != 3:
            raise ValueError(f"expected a (T, H, W) movie, got shape {self.truth.shape}")
        self.peak = float(self.truth.max()) - float(self.truth.min())
        active = active_set(self.truth, threshold)
        self.active_index = np.flatnonzero(active)
        if len(self.active_index) == 0:
            raise ValueError("the truth has no activity above the threshold")
        self.active_truth = self.truth.reshape(-1)[self.active_index].astype(np.float64)
        self.active_fraction = float(len(self.active_index) / active.size)
        self.traces = None
        self.kinds: np.ndarray | None = None
        if kinds is not None and footprints is None:
            raise ValueError("kinds label footprints: pass the footprints too")
        if footprints is not None:
            weights = _footprint_weights(footprints, self.truth.shape[1:])
            self.traces = _TruthTraces(self.truth, weights, offset, min_dff, frames)
            if kinds is not None:
                self.kinds = np.asarray(kinds)
                if self.kinds.shape != (weights.shape[0],):
                    raise ValueError(f"kinds must hold one label per footprint ({weights.shape[0]}), "
                                     f"got shape {self.kinds.shape}")

    def _db(self, mse: float) -> float:
        return float("inf") if mse == 0 else 10.0 * float(np.log10(self.peak * self.peak / mse))

    def score(self, estimate: np.ndarray) -> dict[str, Any]:
        estimate = np.asarray(estimate)
        if estimate.shape != self.truth.shape:
            raise ValueError(f"estimate {estimate.shape} and truth {self.truth.shape} differ in shape")
        total = 0.0
        for start in range(0, len(estimate), self.CHUNK):
            chunk = slice(start, start + self.CHUNK)
            d = estimate[chunk].astype(np.float64) - self.truth[chunk].astype(np.float64)
            d = d.ravel()
            total += float(np.einsum("i,i->", d, d))
        err = estimate.reshape(-1)[self.active_index].astype(np.float64) - self.active_truth
        out: dict[str, Any] = {
            "psnr": self._db(total / estimate.size),
            "active_psnr": self._db(float(np.mean(err * err))),
            "active_fraction": self.active_fraction,
        }
        if self.traces is not None:
            traces = self.traces.score(estimate)
            out.update(traces.summary())
            if self.kinds is not None:
                out["by_kind"] = traces.by_kind(self.kinds)
        return out


def score_movie(estimate: np.ndarray, truth: np.ndarray, footprints: Any = None, *, offset: float = 0.0,
                threshold: float = ACTIVE_THRESHOLD, min_dff: float = MIN_CELL_DFF) -> dict[str, float]:
    """Every metric for one estimate: see ``MovieScorer.score``."""
    return MovieScorer(truth, footprints, offset=offset, threshold=threshold, min_dff=min_dff).score(estimate)


# ------------------------------------------------------------------------------------ baselines


def temporal_mean(movie: np.ndarray, frames: int = 5) -> np.ndarray:
    """A centred running mean over `frames` frames (edges reflected)."""
    return uniform_filter1d(np.asarray(movie, dtype=np.float32), size=frames, axis=0, mode="reflect")


def gaussian_3d(movie: np.ndarray, sigma_t: float, sigma_xy: float) -> np.ndarray:
    """The separable 3-D Gaussian filter (edges reflected), float32."""
    out = np.asarray(movie, dtype=np.float32)
    if sigma_t > 0:
        out = gaussian_filter1d(out, sigma_t, axis=0, mode="reflect")
    if sigma_xy > 0:
        out = gaussian_filter(out, sigma=(0, sigma_xy, sigma_xy), mode="reflect")
    return out


@dataclass
class Oracle:
    """The Gaussian the truth picks for one metric, and what it scores on every metric."""

    metric: str
    sigma_t: float
    sigma_xy: float
    scores: dict[str, Any]


@dataclass
class OracleSearch:
    """``best[metric]``: the oracle for each maximised metric; ``grid``: every (sigma_t, sigma_xy, scores)."""

    best: dict[str, Oracle]
    grid: list[tuple[float, float, dict[str, Any]]] = field(default_factory=list)


def oracle_gaussians(
    noisy: np.ndarray,
    truth: np.ndarray,
    footprints: Any = None,
    *,
    offset: float = 0.0,
    sigmas_t: tuple[float, ...] = SIGMAS_T,
    sigmas_xy: tuple[float, ...] = SIGMAS_XY,
    scorer: MovieScorer | None = None,
) -> OracleSearch:
    """The 3-D Gaussian filter that the ground truth says is best, separately for each metric.

    Every (sigma_t, sigma_xy) of the grid is scored on every metric; for each of ``psnr``,
    ``active_psnr`` and (with footprints) ``trace_corr`` the best is kept, with all its scores.
    The amplitude slope, peak ratio and lag are reported at those sigmas, not maximised (no
    filtering at all would win them). Cost: one temporal filter per sigma_t and one spatial filter
    per grid point (~40 s for 600 x 128 x 128 on one core).
    """
    scorer = scorer or MovieScorer(truth, footprints, offset=offset)
    metrics = [m for m in ORACLE_METRICS if m != "trace_corr" or scorer.traces is not None]
    noisy = np.asarray(noisy, dtype=np.float32)
    best: dict[str, Oracle] = {}
    grid: list[tuple[float, float, dict[str, float]]] = []
    for st in sigmas_t:
        temporal = gaussian_3d(noisy, st, 0.0)
        for sxy in sigmas_xy:
            scores = scorer.score(gaussian_3d(temporal, 0.0, sxy))
            grid.append((st, sxy, scores))
            for m in metrics:
                value = scores[m]
                if np.isfinite(value) and (m not in best or value > best[m].scores[m]):
                    best[m] = Oracle(m, st, sxy, scores)
    return OracleSearch(best, grid)


def best_gaussian(
    movie: np.ndarray,
    truth: np.ndarray,
    sigmas_t: tuple[float, ...] = SIGMAS_T,
    sigmas_xy: tuple[float, ...] = SIGMAS_XY,
) -> tuple[np.ndarray, tuple[float, float], float]:
    """The 3-D Gaussian filter whose whole-movie PSNR the ground truth says is best: an oracle,
    stronger than any filter a user could tune without clean data. Returns (filtered,
    (sigma_t, sigma_xy), psnr). ``oracle_gaussians`` picks one per metric."""
    movie = np.asarray(movie, dtype=np.float32)
    best: tuple[np.ndarray | None, tuple[float, float], float] = (None, (0.0, 0.0), -np.inf)
    for st, sxy in itertools.product(sigmas_t, sigmas_xy):
        filtered = gaussian_3d(movie, st, sxy)
        score = psnr(filtered, truth)
        if score > best[2]:
            best = (filtered, (st, sxy), score)
    best_filtered, best_sigmas, best_score = best
    if best_filtered is None:
        raise ValueError(f"no filter scored: sigmas_t {sigmas_t}, sigmas_xy {sigmas_xy}")
    return best_filtered, best_sigmas, best_score


# ------------------------------------------------------------------------------------ reports

#: The rows of an activity report, in order (`activity_report`).
RAW, TMEAN, DENOISED = "raw", "temporal mean, 5 frames", "denoised"
#: Fewest scored frames an activity report is made of: below it, medians and traces mean little.
MIN_REPORT_FRAMES = 30


def activity_report(
    noisy: np.ndarray,
    truth: np.ndarray,
    estimate: np.ndarray,
    footprints: Any,
    *,
    offset: float = 0.0,
    scored: np.ndarray | None = None,
    oracle: str = "reduced",
    kinds: Any = None,
) -> dict[str, Any]:
    """Every activity metric of ``estimate`` beside the raw frames, a 5-frame temporal mean and
    the oracle Gaussians (one per metric, on ``ORACLE_GRIDS[oracle]``; ``"none"``: no oracle).

    ``noisy``, ``truth`` and ``estimate`` are (T, H, W) over a contiguous span of frames;
    ``scored`` (T,) selects the frames that have an estimate (a live stream skips some): the
    baselines filter the whole span, as an offline filter would, and every row is scored on the
    same selected frames, the trace lag and peak window in real frames. ``kinds``: one label per
    footprint (the simulator's ``scene.kinds``), to score each row per kind of source as well
    (``"by_kind"``). Returns ``{"frames", "cells",
    "active_fraction", "rows": {RAW, TMEAN, DENOISED: scores}, "oracle": {"grid", "sigmas_t",
    "sigmas_xy", "best": {metric: {"sigma_t", "sigma_xy", **scores}}} or None, "seconds"}``;
    raises ValueError when the scored truth has no activity or too few frames.
    """
    import time

    started = time.perf_counter()
    if oracle != "none" and oracle not in ORACLE_GRIDS:
        raise ValueError(f"oracle grid must be none or one of {sorted(ORACLE_GRIDS)}, got {oracle!r}")
    noisy = np.asarray(noisy)
    truth = np.asarray(truth)
    if not noisy.shape == truth.shape == np.shape(estimate):
        raise ValueError(f"noisy {noisy.shape}, truth {truth.shape} and estimate {np.shape(estimate)} differ")
    scored = np.ones(len(truth), bool) if scored is None else np.asarray(scored, bool)
    if scored.shape != (len(truth),):
        raise ValueError(f"scored must be one flag per frame ({len(truth)}), got shape {scored.shape}")
    if scored.sum() < MIN_REPORT_FRAMES:
        raise ValueError(f"{int(scored.sum())} scored frames: an activity report needs {MIN_REPORT_FRAMES}")
    every = bool(scored.all())

    def pick(movie: np.ndarray) -> np.ndarray:
        return movie if every else movie[scored]

    scorer = MovieScorer(pick(truth), footprints, offset=offset, kinds=kinds, frames=np.flatnonzero(scored))
    rows = {RAW: scorer.score(pick(noisy)), TMEAN: scorer.score(pick(temporal_mean(noisy, 5))),
            DENOISED: scorer.score(pick(np.asarray(estimate)))}
    found = None
    if oracle != "none":
        sigmas_t, sigmas_xy = ORACLE_GRIDS[oracle]
        best = _oracle_on(noisy, scored, scorer, sigmas_t, sigmas_xy)
        found = {"grid": oracle, "sigmas_t": list(sigmas_t), "sigmas_xy": list(sigmas_xy),
                 "best": {m: {"sigma_t": o.sigma_t, "sigma_xy": o.sigma_xy, **o.scores} for m, o in best.items()}}
    first = rows[RAW]
    return {"frames": int(scored.sum()), "cells": first.get("cells"), "active_fraction": first["active_fraction"],
            "rows": rows, "oracle": found, "seconds": round(time.perf_counter() - started, 2)}


def _oracle_on(noisy: np.ndarray, scored: np.ndarray, scorer: MovieScorer, sigmas_t: tuple[float, ...],
               sigmas_xy: tuple[float, ...]) -> dict[str, Oracle]:
    """``oracle_gaussians`` filtering the whole span and scoring the selected frames."""
    if scored.all():
        return oracle_gaussians(noisy, scorer.truth, scorer=scorer, sigmas_t=sigmas_t, sigmas_xy=sigmas_xy).best
    metrics = [m for m in ORACLE_METRICS if m != "trace_corr" or scorer.traces is not None]
    best: dict[str, Oracle] = {}
    for st in sigmas_t:
        temporal = gaussian_3d(noisy, st, 0.0)[scored]
        for sxy in sigmas_xy:
            scores = scorer.score(gaussian_3d(temporal, 0.0, sxy))
            for m in metrics:
                if np.isfinite(scores[m]) and (m not in best or scores[m] > best[m].scores[m]):
                    best[m] = Oracle(m, st, sxy, scores)
    return best


class SessionFrames:
    """What a live session's activity report needs, by seq: each input's noisy frame and truth,
    each output's image and state. Arrays are kept by reference (no copy). With ``max_frames``
    only the latest inputs and outputs are kept, so memory stays bounded on a long session."""

    def __init__(self, max_frames: int | None = None):
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.max_frames = max_frames
        self.inputs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.outputs: dict[int, tuple[np.ndarray, str]] = {}

    def add_input(self, seq: int, noisy: np.ndarray, truth: np.ndarray) -> None:
        self.inputs[seq] = (noisy, truth)
        self._bound(self.inputs)

    def add_output(self, seq: int, image: np.ndarray, state: str) -> None:
        self.outputs[seq] = (image, state)
        self._bound(self.outputs)

    def _bound(self, frames: dict) -> None:
        if self.max_frames is not None:
            while len(frames) > self.max_frames:
                del frames[next(iter(frames))]  # dicts keep insertion order: the oldest first

    def first_seq(self, state: str) -> int | None:
        """The first kept output in ``state``."""
        return min((seq for seq, (_, st) in self.outputs.items() if st == state), default=None)

    def report(self, footprints: Any, *, offset: float = 0.0, oracle: str = "reduced",
               start: int | None = None, stop: int | None = None, kinds: Any = None) -> dict[str, Any]:
        """`activity_report` over the kept inputs in [``start``, ``stop``) (default: from the first
        live output to the last input), each output in it scored whatever its state (the frames a
        user saw). The span must be contiguous in the inputs; adds ``"span": [first, last]`` seqs."""
        if start is None:
            start = self.first_seq("live")
            if start is None:
                raise ValueError("no live output to score")
        seqs = sorted(seq for seq in self.inputs if seq >= start and (stop is None or seq < stop))
        if not seqs:
            raise ValueError("no frames to score")
        if seqs[-1] - seqs[0] + 1 != len(seqs):
            raise ValueError(f"the frames {seqs[0]}..{seqs[-1]} to score have gaps")
        noisy = np.stack([self.inputs[seq][0] for seq in seqs])
        truth = np.stack([self.inputs[seq][1] for seq in seqs])
        estimate = np.zeros(truth.shape, np.float32)
        scored = np.zeros(len(seqs), bool)
        for i, seq in enumerate(seqs):
            if seq in self.outputs:
                estimate[i] = self.outputs[seq][0]
                scored[i] = True
        report = activity_report(noisy, truth, estimate, footprints, offset=offset, scored=scored, oracle=oracle,
                                 kinds=kinds)
        return {"span": [seqs[0], seqs[-1]], **report}


#: Column order and headers of an activity report's table (bench, demo, tools/bench_denoise.py).
REPORT_METRICS: tuple[str, ...] = ("psnr", "active_psnr", "trace_corr", "trace_slope", "peak_ratio", "lag_frames")
REPORT_HEADERS: tuple[str, ...] = ("PSNR (dB)", "active-set PSNR (dB)", "trace corr", "amplitude slope",
                                   "peak ratio", "lag (frames)")
ORACLE_LABELS = {"psnr": "whole-movie PSNR", "active_psnr": "active-set PSNR", "trace_corr": "trace correlation"}


def report_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, scores) of an `activity_report`, in table order: raw, 5-frame mean, the oracle of
    each metric with its sigma, denoised."""
    rows = [(RAW, report["rows"][RAW]), (TMEAN, report["rows"][TMEAN])]
    oracle = report.get("oracle")
    for metric, found in (oracle["best"] if oracle else {}).items():
        label = f"Gaussian oracle for {ORACLE_LABELS[metric]} (σt {found['sigma_t']:g}, σxy {found['sigma_xy']:g})"
        rows.append((label, found))
    rows.append((DENOISED, report["rows"][DENOISED]))
    return rows


def format_kind(scores: dict[str, Any] | None) -> str:
    """One kind of source's trace means (`TraceScores.by_kind`) as the reports print them:
    amplitude slope / trace correlation."""
    scores = scores or {}
    slope, corr = scores.get("trace_slope"), scores.get("trace_corr")
    return f"{format_score('trace_slope', slope)} / {format_score('trace_corr', corr)}"


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (a NaN mean over no cell, an infinite PSNR of an exact
    estimate) replaced by None, in dicts, lists and tuples too: what `json.dumps(...,
    allow_nan=False)` writes as strict JSON (bare NaN/Infinity are not JSON: jq, JSON.parse refuse
    them). The --json writers of `umvd-live bench` and `umvd-live demo` use it."""
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def format_score(metric: str, value: float | None) -> str:
    """A metric's value as the reports print it."""
    if value is None or not np.isfinite(value):
        return "—"
    if metric == "trace_corr":
        return f"{value:.3f}"
    if metric == "lag_frames":
        return f"{value:+.2f}"
    return f"{value:.2f}"
