"""Each output moved with its frame's own rigid jitter: the last step of a file's final pass.

Why: an output blind to its frame cannot know where the field sat in that frame. The network reads
the frames around it, so it draws the sample where they place it on average (the slow drift),
not where this frame's jitter (heartbeat, breathing: fractions of a pixel from one frame to the
next) put it. What the jitter moves across a cell's footprint is then missing from the output's
trace: on the independent simulator (white jitter of 0.25 px RMS per axis) an output right about
everything but the jitter keeps 0.915-0.947 of the transients' amplitude (docs/benchmarks.md, "What
a blind output can keep under jitter"), and `denoise` lost what that ceiling lost.

Where the frame sat is two numbers, and all of its pixels tell them: the shift that brings the
output closest to its noisy frame, in the least squares (one Gauss-Newton step on the output's
gradient, the frame's mean level taken out). A pixel of frame t moves that shift, and so the output,
by about its share of the output's gradient energy over the frame: as the restoration's gains
depend on frame t through their sums over the segment, not as a filter that reads the pixel
(`tests/test_jitter.py`: a jolt of 7x the noise in one pixel moves the output by under 1 % of the
jolt). The network stays blind; only its output is placed.

Measured, not assumed. Each frame's shift is measured on its upper and lower halves as well,
whose noise is independent: over a segment, the covariance of the two halves' shifts is the
variance of a motion the whole field shares, and a quarter of their difference's variance the
noise of the whole frame's estimate. Each axis's shifts are scaled by variance / (variance +
noise), the Wiener weight: a field that does not move as one (cells that move on their own, a
still field) gets a weight near 0 and is left as it is; a frame's shift is at most
`MAX_SHIFT_PX`. Each moved output faces the referee's rule, as the blend's and the restoration's
do: where it lies farther from its noisy frame than its window's blind mean, it stays as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from umvd_live.engine.amplitude import CHUNK, significant
from umvd_live.engine.outputs import mean_is_nearer

#: The largest shift applied, pixels per axis: a jitter, not a jump (a jump of the field is a
#: change of the acquisition, `changes`); beyond a pixel one linear step no longer measures it.
MAX_SHIFT_PX = 1.0
#: Fewer scored frames than this: the weights cannot be measured, and the segment is left as it is
#: (as the blend and the restoration leave it: `amplitude`'s significance test takes 3 chunks).
MIN_FRAMES = 3 * CHUNK
#: A half of the frame whose gradient energy is under this share of the other half's tells too little
#: to test the motion against (an empty half): the segment is left as it is.
MIN_HALF_SHARE = 0.05


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


def measure_shifts(noisy: np.ndarray, output: np.ndarray) -> np.ndarray | None:
    """(3, 2): the (y, x) shift that brings ``output`` closest to ``noisy`` (``output(p - s)``), in
    the least squares, measured on the whole frame (two Gauss-Newton steps: one linear step falls
    short of a larger shift), its upper half and its lower half (one step each); None where the
    output has too little structure in a half to measure it, or is not a number."""
    out = np.asarray(output, np.float64)
    frame = np.asarray(noisy, np.float64)
    gy, gx = _gradient(out)
    half = out.shape[0] // 2
    shifts, energy = np.zeros((3, 2)), []
    for row, part in enumerate((slice(None), slice(None, half), slice(half, None))):
        step = _step(gy[part], gx[part], frame[part] - out[part])
        if step is None:
            return None
        shifts[row] = step
        energy.append(float((gy[part] ** 2).sum() + (gx[part] ** 2).sum()))
    if min(energy[1], energy[2]) < MIN_HALF_SHARE * max(energy[1], energy[2]):
        return None
    if not np.isfinite(shifts).all():  # an output or a frame that holds no number here
        return None
    moved = ndimage.shift(out, shifts[0], order=3, mode="nearest")
    step = _step(*_gradient(moved), frame - moved)
    if step is not None and np.isfinite(step).all():
        shifts[0] += step
    return shifts


def _gradient(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image's (y, x) derivative at each pixel as the cubic spline that `ndimage.shift` moves it
    by draws it: central differences of the spline's coefficients along each axis. Central
    differences of the pixels underestimate the slopes of a thin process, and a shift measured with
    them came out a quarter too long."""
    return tuple(np.gradient(ndimage.spline_filter1d(image, 3, axis=axis, mode="nearest"), axis=axis)
                 for axis in (0, 1))


def _step(gy: np.ndarray, gx: np.ndarray, residual: np.ndarray) -> np.ndarray | None:
    """One Gauss-Newton step: the shift s with ``output(p - s) - output(p) ~ -s . gradient`` nearest
    ``residual`` (its mean taken out: the frame's level is the restoration's business); None where
    the gradients do not fix both axes."""
    g = np.stack([gy.ravel(), gx.ravel()])
    r = residual.ravel() - residual.mean()
    # einsum's own loops, not BLAS: its threads spun against a busy machine's other work (20 ms a step)
    normal = np.einsum("in,jn->ij", g, g)
    if np.linalg.det(normal) <= 1e-12 * np.trace(normal) ** 2:
        return None
    return -np.linalg.solve(normal, np.einsum("in,n->i", g, r))


def follow_jitter(noisy: Sequence[np.ndarray], outputs: list[np.ndarray], *, scored: np.ndarray, first: int = 0,
                  neighbours: Callable[[int], np.ndarray] | None = None) -> JitterFollowed:
    """Move each scored output (in place) by its frame's measured shift, each axis scaled by its
    Wiener weight (module docstring), and say what was done. ``noisy``: the outputs' own frames, in
    order and in the same units; ``scored``: the outputs that are the network's (the referee's window
    means are not moved); ``first``: the segment's first frame in the movie, for the record;
    ``neighbours(t)``: the blind mean of frame t's window without t, for the referee's rule."""
    n = len(outputs)
    picked = np.flatnonzero(np.asarray(scored, bool)).tolist()
    if len(picked) < MIN_FRAMES:
        return JitterFollowed(first, n, reason=f"too few frames to measure ({len(picked)} < {MIN_FRAMES})")
    measured = {t: measure_shifts(noisy[t], outputs[t]) for t in picked}
    shifts = {t: s for t, s in measured.items() if s is not None}
    if len(shifts) < MIN_FRAMES:
        return JitterFollowed(first, n, reason="too little structure to measure a shift on")
    whole, upper, lower = np.stack(list(shifts.values()), axis=1)
    upper, lower = upper - upper.mean(0), lower - lower.mean(0)
    products = upper * lower  # per frame and axis: their mean is the variance of the motion both halves see
    shared = np.maximum(products.mean(0), 0.0)
    noise = ((upper - lower) ** 2).mean(0) / 4.0  # the whole frame's estimate's
    weight = shared / np.maximum(shared + noise, 1e-30)
    # a motion shared by chance (noise alone) is no motion: its mean over chunks of frames (a jitter
    # may swing over a few frames) must stand `amplitude.SIGNIFICANCE` standard errors above 0
    for axis in range(2):
        if not significant([float(c.mean()) for c in _chunks(products[:, axis])]):
            weight[axis] = 0.0
    record = JitterFollowed(first, n, _pair(weight), _pair(np.sqrt(shared)), _pair(np.sqrt(noise)))
    if not weight.any():
        return replace(record, reason="no motion shared by the field")
    unmoved, lengths = [], []
    for t, s in zip(shifts, whole):
        applied = np.clip(weight * s, -MAX_SHIFT_PX, MAX_SHIFT_PX)
        moved = ndimage.shift(outputs[t], applied, order=3, mode="nearest").astype(outputs[t].dtype, copy=False)
        if mean_is_nearer(moved, neighbours(t) if neighbours is not None else None, noisy[t]):
            unmoved.append(first + t)
            continue
        outputs[t][...] = moved
        lengths.append(float(np.hypot(*applied)))
    return replace(record, moved_px=float(np.mean(lengths)) if lengths else 0.0, unmoved=tuple(unmoved))


def _chunks(values: np.ndarray) -> list[np.ndarray]:
    """``values`` in consecutive chunks of `CHUNK` (a last short piece joins the chunk before it)."""
    cuts = list(range(CHUNK, len(values) - CHUNK // 2, CHUNK))
    return np.split(values, cuts)


def _pair(values: np.ndarray) -> tuple[float, float]:
    return float(values[0]), float(values[1])
