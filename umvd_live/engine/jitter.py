"""Each output moved with its frame's own rigid jitter: the last step of a file's final pass.

Why: an output blind to its frame cannot know where the field sat in that frame. The network reads
the frames around it, so it draws the sample where they place it on average (the slow drift),
not where this frame's jitter (heartbeat, breathing: fractions of a pixel from one frame to the
next) put it. What the jitter moves across a cell's footprint is then missing from the output's
trace: on the independent simulator (white jitter of 0.25 px RMS per axis) an output right about
everything but the jitter keeps 0.915-0.947 of the transients' amplitude (docs/benchmarks.md, "What
a blind output can keep under jitter"), and `denoise` lost what that ceiling lost.

Where the frame sat is two numbers, and all of its pixels tell them: the shift that brings the
output closest to its noisy frame, in the least squares (two Gauss-Newton steps on the output's
gradient, the frame's mean level fitted alongside). A pixel of frame t moves that shift by its
leverage, its share of the output's gradient energy over the frame, and so moves its own output
pixel by that share of its noise: no pixel may take more than `MAX_LEVERAGE` of it (the steepest
pixels of a sparse field are weighed down until none does), so a frame's noise reaches its output
through two numbers and at most 1 % of any pixel's own noise, as the restoration's gains depend on
frame t through their sums over the segment, not as a filter that reads the pixel
(`tests/test_jitter.py`). The network stays blind; only its output is placed.

Measured, not assumed. Each frame's shift is measured on its upper and lower halves as well,
whose noise is independent: over a segment, the covariance of the two halves' shifts is the
variance of a motion the whole field shares, and their difference's variance, scaled by the
halves' shares of the gradient energy (a quarter where the halves hold as much), the noise of the
whole frame's estimate. Each axis's shifts about the segment's mean placement of its outputs are
scaled by variance / (variance + noise), the Wiener weight, and the mean placement, measured over
all the segment's frames, is kept whole (on the simulated movies it is within 0.03 px of 0; on the
real one the outputs sat 0.1 px from their frames along y). A field that does not move as one
(cells that move on their own, a still field) gets a weight near 0 and is left as it is; a frame's
shift is at most `MAX_SHIFT_PX` along each axis. Each moved output faces the referee's rule, as
the blend's and the restoration's do: where it lies farther from its noisy frame than its window's
blind mean, it stays as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from umvd_live.engine.amplitude import CHUNK, significant
from umvd_live.engine.outputs import mean_is_nearer

#: The largest shift applied, pixels per axis: a jitter, not a jump (a jump of the field is a
#: change of the acquisition, `changes`); beyond a pixel one linear step no longer measures it.
MAX_SHIFT_PX = 1.0
#: The largest share of its own noise a pixel may move its own output by, through the frame's shift
#: (its leverage on the least squares). Unweighed, the steepest pixel of a frame has 0.004-0.012
#: (median; at most 0.02) on the outputs of the simulated movies and the real one (docs/benchmarks.md,
#: "Jitter followed, reviewed"), 0.05 in a field of 16 small cells in 64², 0.12 in one of two.
MAX_LEVERAGE = 0.01
#: Rounds of weighing a frame's steepest pixels down before it is left unmeasured: the outputs of
#: the simulated and real movies settle in one to three; a field of a dozen small cells in 64² in
#: nine; two small cells, whose few steep pixels must carry the shift, never.
MAX_ROUNDS = 12
#: Fewer scored frames than this: the weights cannot be measured, and the segment is left as it is
#: (as the blend and the restoration leave it: `amplitude`'s significance test takes 3 chunks).
MIN_FRAMES = 3 * CHUNK
#: A half of a frame whose gradient energy is under this share of the other half's tells too
#: little to test the motion against (an empty half): that frame is not measured.
MIN_HALF_SHARE = 0.05
#: Frames with fewer rows or columns than this are not measured (each half needs two rows).
MIN_SIDE_PX = 4


@dataclass(frozen=True)
class JitterFollowed:
    """What following the jitter did to one segment of a movie (axes: y, x)."""

    first: int  # the segment's first frame
    frames: int
    weight: tuple[float, float] = (0.0, 0.0)  # the Wiener weight each axis's shifts were scaled by; 0: none
    jitter_px: tuple[float, float] = (0.0, 0.0)  # RMS of the motion both halves share (about its mean)
    noise_px: tuple[float, float] = (0.0, 0.0)  # RMS of the whole frame's estimate's noise
    reason: str = ""  # why nothing was moved, where nothing was
    moved_px: float = 0.0  # the mean length of the shifts applied
    unmoved: tuple[int, ...] = ()  # frames (of the movie) the referee's rule left where they were
    unmeasured: int = 0  # scored frames whose shift could not be measured (left as they were)


@dataclass(frozen=True)
class FrameShifts:
    """One frame's measured shifts, (y, x) pixels, and what its halves hold to measure them on."""

    whole: np.ndarray  # the whole frame's, two Gauss-Newton steps, no pixel above `MAX_LEVERAGE`
    upper: np.ndarray  # the upper half's, one step on from the whole frame's first
    lower: np.ndarray  # the lower half's, likewise
    energy: np.ndarray  # (2, 2): each half's (upper, lower) gradient energy along each axis


class _Fit(NamedTuple):
    """One Gauss-Newton step of `_fit`."""

    step: np.ndarray  # (y, x) pixels
    normal: np.ndarray  # (2, 2): the weighted normal matrix, its diagonal the gradient energy per axis
    weights: np.ndarray  # each pixel's weight after the leverage's weighing


def measure_shifts(noisy: np.ndarray, output: np.ndarray) -> FrameShifts | None:
    """The shift that brings ``output`` closest to ``noisy`` (``output(p - s)``), in the least
    squares with the frame's level fitted alongside, on the whole frame (two Gauss-Newton steps:
    one linear step falls short of a larger shift) and on its upper and lower halves (each a step
    of its own after the whole frame's first); None where the frame is too small, a half has too
    little structure to measure it on, no weighing keeps every pixel's leverage within
    `MAX_LEVERAGE`, or a number is not finite."""
    out = np.asarray(output, np.float64)
    frame = np.asarray(noisy, np.float64)
    if min(out.shape) < MIN_SIDE_PX or not (np.isfinite(out).all() and np.isfinite(frame).all()):
        return None
    first = _fit(*_gradient(out), frame - out, max_leverage=MAX_LEVERAGE)
    if first is None:
        return None
    moved = ndimage.shift(out, first.step, order=3, mode="nearest")
    gy, gx = _gradient(moved)
    residual = frame - moved
    # the second step's weights decide how much each pixel moves the result (the first step's
    # dependence on the frame cancels in it): they start from the first's, which mostly hold
    second = _fit(gy, gx, residual, max_leverage=MAX_LEVERAGE, weights=first.weights)
    if second is None:
        return None
    # each half's step from there: each lands near its own least squares, and the one step's
    # shortfall on a larger shift, which differs between the halves, does not count as noise
    half = out.shape[0] // 2
    steps, energy = [], []
    for part in (slice(None, half), slice(half, None)):
        fitted = _fit(gy[part], gx[part], residual[part])
        if fitted is None:
            return None
        steps.append(first.step + fitted.step)
        energy.append(np.diag(fitted.normal))
    if min(energy[0].sum(), energy[1].sum()) < MIN_HALF_SHARE * max(energy[0].sum(), energy[1].sum()):
        return None
    return FrameShifts(first.step + second.step, steps[0], steps[1], np.stack(energy))


def _gradient(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image's (y, x) derivative at each pixel as the cubic spline that `ndimage.shift` moves it
    by draws it: central differences of the spline's coefficients along each axis. Central
    differences of the pixels underestimate the slopes of a thin process, and a shift measured with
    them came out a quarter too long."""
    return tuple(np.gradient(ndimage.spline_filter1d(image, 3, axis=axis, mode="nearest"), axis=axis)
                 for axis in (0, 1))


def _fit(gy: np.ndarray, gx: np.ndarray, residual: np.ndarray, max_leverage: float | None = None,
         weights: np.ndarray | None = None) -> _Fit | None:
    """One Gauss-Newton step, its normal matrix and the pixels' weights: the shift s with
    ``output(p - s) - output(p) ~ -s . gradient`` nearest ``residual``, a level fitted alongside (the
    frame's level is the restoration's business); with ``max_leverage``, the pixels that would move
    their own output by more than that share of their residual are weighed down (from ``weights``
    on, 1 each by default) until none does (a few pixels of a frame, on the simulated and the real
    outputs). None where the gradients do not fix both axes, or the weighing does not settle in
    `MAX_ROUNDS`."""
    g = np.stack([gy.ravel(), gx.ravel()])
    r = residual.ravel()
    weights = np.ones(r.size) if weights is None else weights.copy()
    # einsum's own loops, not BLAS: its threads spun against a busy machine's other work (20 ms a step)
    for _ in range(MAX_ROUNDS):
        total = weights.sum()
        centred = g - (np.einsum("in,n->i", g, weights) / total)[:, None]
        normal = np.einsum("in,jn,n->ij", centred, centred, weights)
        if np.linalg.det(normal) <= 1e-6 * np.trace(normal) ** 2:
            return None
        if max_leverage is None:
            break
        # each pixel's leverage: how much of its own residual reaches its own output through s
        (a, b), (_, c) = np.linalg.inv(normal)
        cy, cx = centred
        leverage = weights * (a * cy * cy + 2.0 * b * cy * cx + c * cx * cx)
        if leverage.max() <= max_leverage:
            break
        # aimed a fifth under the bound: the others' leverages rise as the steepest are weighed down
        weights *= np.minimum(1.0, 0.8 * max_leverage / np.maximum(leverage, 1e-300))
    else:
        return None
    level = float(np.einsum("n,n->", weights, r)) / total
    step = -np.linalg.solve(normal, np.einsum("in,n->i", centred, weights * (r - level)))
    return _Fit(step, normal, weights)


def follow_jitter(noisy: Sequence[np.ndarray], outputs: list[np.ndarray], *, scored: np.ndarray, first: int = 0,
                  neighbours: Callable[[int], np.ndarray] | None = None) -> JitterFollowed:
    """Move each scored output (in place) by its frame's measured shift, each axis's jitter about
    the segment's mean placement scaled by its Wiener weight (module docstring), and say what was
    done. ``noisy``: the outputs' own frames, in order and in the same units; ``scored``: the
    outputs that are the network's (the referee's window means are not moved); ``first``: the
    segment's first frame in the movie, for the record; ``neighbours(t)``: the blind mean of frame
    t's window without t, for the referee's rule."""
    n = len(outputs)
    scored_frames = np.flatnonzero(np.asarray(scored, bool)).tolist()
    if len(scored_frames) < MIN_FRAMES:
        return JitterFollowed(first, n, reason=f"too few frames to measure ({len(scored_frames)} < {MIN_FRAMES})")
    measured = {t: measure_shifts(noisy[t], outputs[t]) for t in scored_frames}
    shifts = {t: m for t, m in measured.items() if m is not None}
    unmeasured = len(measured) - len(shifts)
    if len(shifts) < MIN_FRAMES:
        return JitterFollowed(first, n, reason="too little structure to measure a shift on", unmeasured=unmeasured)
    whole = np.stack([m.whole for m in shifts.values()])
    upper = np.stack([m.upper for m in shifts.values()])
    lower = np.stack([m.lower for m in shifts.values()])
    energy = np.stack([m.energy for m in shifts.values()])  # (frames, half, axis)
    upper, lower = upper - upper.mean(0), lower - lower.mean(0)
    products = upper * lower  # per frame and axis: their mean is the variance of the motion both halves see
    shared = np.maximum(products.mean(0), 0.0)
    # the whole frame's estimate's noise: the halves' difference's, by their shares of the energy
    # (the whole frame weighs each half by its energy; a quarter where the halves hold as much)
    share = energy[:, 0] * energy[:, 1] / (energy[:, 0] + energy[:, 1]) ** 2
    noise = ((upper - lower) ** 2 * share).mean(0)
    weight = shared / np.maximum(shared + noise, 1e-30)
    # a motion shared by chance (noise alone) is no motion: its mean over chunks of frames (a jitter
    # may swing over a few frames) must stand `amplitude.SIGNIFICANCE` standard errors above 0
    for axis in range(2):
        if not significant([float(c.mean()) for c in _chunks(products[:, axis])]):
            weight[axis] = 0.0
    record = JitterFollowed(first, n, _pair(weight), _pair(np.sqrt(shared)), _pair(np.sqrt(noise)),
                            unmeasured=unmeasured)
    if not weight.any():
        return replace(record, reason="no motion shared by the field")
    # the Wiener estimate of each frame's shift: the segment's mean placement of its outputs
    # (measured over all its frames, to a few hundredths of a pixel), then the jitter about it, weighed
    placement = whole.mean(0)
    unmoved, lengths = [], []
    for t, s in zip(shifts, whole):
        applied = np.clip(placement + weight * (s - placement), -MAX_SHIFT_PX, MAX_SHIFT_PX)
        moved = ndimage.shift(outputs[t], applied, order=3, mode="nearest")
        if mean_is_nearer(moved, neighbours(t) if neighbours is not None else None, noisy[t]):
            unmoved.append(first + t)
            continue
        outputs[t][...] = moved
        lengths.append(float(np.hypot(*applied)))
    return replace(record, moved_px=float(np.mean(lengths)) if lengths else 0.0, unmoved=tuple(unmoved))


def _chunks(values: np.ndarray) -> list[np.ndarray]:
    """``values`` in consecutive chunks of `CHUNK`; a last piece of up to `CHUNK` / 2 joins the
    chunk before it, a longer one is a chunk of its own."""
    cuts = list(range(CHUNK, len(values) - CHUNK // 2, CHUNK))
    return np.split(values, cuts)


def _pair(values: np.ndarray) -> tuple[float, float]:
    return float(values[0]), float(values[1])
