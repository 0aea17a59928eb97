"""Each output moved with its frame's own rigid jitter: the last step of a file's final pass
(`follow_jitter`) and of a live stream's outputs (`LiveJitter`).

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
shift is at most `MAX_SHIFT_PX` along each axis. Each output a file's final pass moved faces the
referee's rule, as the blend's and the restoration's do: where it lies farther from its noisy frame
than its window's blind mean, it stays as it was. A live stream measures the motion as it goes, on
the frames before each output (`LiveJitter`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from umvd_live.engine.amplitude import CHUNK, LIVE_CHUNKS, LIVE_FRAME_HORIZON, significant
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
#: Live streams: the measured frames the field's motion is measured over (as the live restoration's
#: sums, about 68 s at 30 Hz); older ones are forgotten.
LIVE_FRAMES = LIVE_CHUNKS * CHUNK
#: `FrameSpline` pads by as many pixels as `ndimage` does for its spline (``npad`` = 12).
SHIFT_PAD_PX = 12
#: Live streams follow the jitter of frames of at most this many pixels: measuring and moving an
#: output costs the frame loop about 0.1 ms per 1000 pixels on a 2-core CPU (docs/benchmarks.md,
#: "Jitter followed live"), 8 ms a 256² frame, which the loop holds at 30 Hz; at 512² it has no
#: such margin left ("512² at 30 fps" there). Files follow it at any size.
LIVE_MAX_PIXELS = 256 * 256


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
    shifts: dict[int, tuple[float, float]] = field(default_factory=dict)  # frame (of the movie) -> (y, x) applied


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


def measure_shifts(noisy: np.ndarray, output: np.ndarray, spline: FrameSpline | None = None) -> FrameShifts | None:
    """The shift that brings ``output`` closest to ``noisy`` (``output(p - s)``), in the least
    squares with the frame's level fitted alongside, on the whole frame (two Gauss-Newton steps:
    one linear step falls short of a larger shift, 3 % of 0.3 px) and on its upper and lower halves
    (each a step of its own after the whole frame's first); None where the frame is too small, a
    half has too little structure to measure it on, no weighing keeps every pixel's leverage within
    `MAX_LEVERAGE`, or a number is not finite.
    ``spline``: ``output``'s, where the caller has it (to move the output by it afterwards)."""
    frame = np.asarray(noisy, np.float64)
    if min(frame.shape) < MIN_SIDE_PX or not (np.isfinite(output).all() and np.isfinite(frame).all()):
        return None
    spline = spline if spline is not None else FrameSpline(output)
    gy, gx = spline.gradient()
    first = _fit(gy, gx, frame - np.asarray(output, np.float64), max_leverage=MAX_LEVERAGE)
    if first is None or not np.abs(first.step).max() <= SHIFT_PAD_PX - 2:  # slopes of rounding errors alone
        return None
    moved = spline.shifted(first.step)
    gy, gx = FrameSpline(moved).gradient()
    residual = frame - moved
    # the second step's weights decide how much each pixel moves the result (the first step's
    # dependence on the frame cancels in it): they start from the first's, which mostly hold
    second = _fit(gy, gx, residual, max_leverage=MAX_LEVERAGE, weights=first.weights)
    if second is None:
        return None
    # each half's step from there: each lands near its own least squares, and the one step's
    # shortfall on a larger shift, which differs between the halves, does not count as noise
    half = frame.shape[0] // 2
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


class FrameSpline:
    """An image's cubic B-spline, its coefficients computed once: what an output is moved by
    (`shifted`, `ndimage.shift`'s order-3 interpolation with mode "nearest": the image padded by its
    edge values as ``ndimage`` pads it) and the slopes its shift is measured on (`gradient`).
    Separable: a shift of the whole frame is two 4-tap passes over the coefficients, where
    ``ndimage.shift`` evaluates 16 taps per pixel and filters the image again each call."""

    def __init__(self, image: np.ndarray):
        self.shape = image.shape
        coefficients = np.pad(np.asarray(image, np.float64), SHIFT_PAD_PX, mode="edge")
        for axis in (0, 1):
            coefficients = ndimage.spline_filter1d(coefficients, 3, axis=axis, mode="mirror")
        self.coefficients = coefficients

    def shifted(self, shift: Sequence[float] | np.ndarray) -> np.ndarray:
        """The image moved by ``shift`` (y, x) pixels, at most ``SHIFT_PAD_PX - 2`` each, float64:
        ``output(p) = image(p - shift)``."""
        if max(abs(float(v)) for v in shift) > SHIFT_PAD_PX - 2:
            raise ValueError(f"a shift of at most {SHIFT_PAD_PX - 2} px per axis, got {tuple(shift)}")
        moved = self.coefficients
        for axis, s in enumerate(shift):
            position = -float(s)
            whole = int(np.floor(position))
            f = position - whole
            # the cubic B-spline's weights of the four coefficients around the position
            taps = ((1 - f) ** 3 / 6, (4 - 6 * f * f + 3 * f ** 3) / 6,
                    (1 + 3 * f + 3 * f * f - 3 * f ** 3) / 6, f ** 3 / 6)
            parts = [moved[(slice(None),) * axis + (slice(start, start + self.shape[axis]),)]
                     for start in range(SHIFT_PAD_PX + whole - 1, SHIFT_PAD_PX + whole + 3)]
            total = parts[0] * taps[0]
            for part, tap in zip(parts[1:], taps[1:]):
                total += part * tap
            moved = total
        return moved

    def gradient(self) -> tuple[np.ndarray, np.ndarray]:
        """The spline's (y, x) derivative at each pixel: the slopes `shifted` moves the image along.
        Central differences of the pixels underestimate the slopes of a thin process, and a shift
        measured with them came out a quarter too long."""
        c, pad = self.coefficients, SHIFT_PAD_PX
        height, width = self.shape
        # along an axis the derivative's taps (-1/2, 0, 1/2); across it the spline's (1/6, 4/6, 1/6)
        dy = np.subtract(c[pad + 1:pad + height + 1, pad - 1:pad + width + 1],
                         c[pad - 1:pad + height - 1, pad - 1:pad + width + 1])
        dx = np.subtract(c[pad - 1:pad + height + 1, pad + 1:pad + width + 1],
                         c[pad - 1:pad + height + 1, pad - 1:pad + width - 1])
        gy = np.add(dy[:, :-2], dy[:, 2:])
        gy += 4.0 * dy[:, 1:-1]
        gy *= 1.0 / 12.0
        gx = np.add(dx[:-2], dx[2:])
        gx += 4.0 * dx[1:-1]
        gx *= 1.0 / 12.0
        return gy, gx


def shift_image(image: np.ndarray, shift: Sequence[float] | np.ndarray) -> np.ndarray:
    """A float ``image`` moved by ``shift`` (y, x) pixels, at most ``SHIFT_PAD_PX - 2`` each, in its
    own dtype: ``ndimage.shift(image, shift, order=3, mode="nearest")`` (float32 bit for bit,
    tested), in a third of its time (`FrameSpline`)."""
    return FrameSpline(image).shifted(shift).astype(image.dtype, copy=False)


def _fit(gy: np.ndarray, gx: np.ndarray, residual: np.ndarray, max_leverage: float | None = None,
         weights: np.ndarray | None = None) -> _Fit | None:
    """One Gauss-Newton step, its normal matrix and the pixels' weights: the shift s with
    ``output(p - s) - output(p) ~ -s . gradient`` nearest ``residual``, a level fitted alongside (the
    frame's level is the restoration's business); with ``max_leverage``, the pixels that would move
    their own output by more than that share of their residual are weighed down (from ``weights``
    on, 1 each by default) until none does (a few pixels of a frame, on the simulated and the real
    outputs). None where the gradients do not fix both axes, or the weighing does not settle in
    `MAX_ROUNDS`."""
    gy, gx, r = gy.ravel(), gx.ravel(), residual.ravel()
    weights = np.ones(r.size) if weights is None else weights.copy()
    steepness = gy * gy + gx * gx if max_leverage is not None else None  # |gradient|^2, for the bound below
    # sums of products in einsum's own loops, no frame-sized temporaries (fresh memory costs more
    # than the arithmetic here) and no BLAS (its threads spun against a busy machine's other work)
    for _ in range(MAX_ROUNDS):
        total = weights.sum()
        mean = np.array([np.einsum("n,n->", gy, weights), np.einsum("n,n->", gx, weights)]) / total
        yx = np.einsum("n,n,n->", gy, gx, weights)
        normal = np.array([[np.einsum("n,n,n->", gy, gy, weights), yx],
                           [yx, np.einsum("n,n,n->", gx, gx, weights)]]) - total * np.outer(mean, mean)
        if np.linalg.det(normal) <= 1e-6 * np.trace(normal) ** 2:
            return None
        if max_leverage is None or steepness is None:
            break
        # each pixel's leverage, how much of its own residual reaches its own output through s, is
        # w (g - mean)' N^-1 (g - mean), at most w (|g| + |mean|)^2 / (N's smaller eigenvalue): only
        # the few pixels whose bound reaches the level they are weighed down from are computed
        inverse = np.linalg.inv(normal)
        reach = np.sqrt(0.8 * max_leverage / np.linalg.eigvalsh(inverse)[-1]) - np.hypot(*mean)
        steep = np.flatnonzero(weights * steepness >= reach * reach) if reach > 0 else np.arange(r.size)
        centred = np.stack([gy[steep], gx[steep]]) - mean[:, None]
        leverage = weights[steep] * np.einsum("in,ij,jn->n", centred, inverse, centred)
        if not leverage.size or leverage.max() <= max_leverage:
            break
        # aimed a fifth under the bound: the others' leverages rise as the steepest are weighed down
        weights[steep] *= np.minimum(1.0, 0.8 * max_leverage / np.maximum(leverage, 1e-300))
    else:
        return None
    # the level fitted alongside: the gradient about its weighted mean against the residual
    level_sum = float(np.einsum("n,n->", weights, r))
    correlation = np.array([np.einsum("n,n,n->", gy, weights, r), np.einsum("n,n,n->", gx, weights, r)])
    step = -np.linalg.solve(normal, correlation - mean * level_sum)
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
    motion = measure_motion(list(shifts.values()))
    if motion is None:
        return JitterFollowed(first, n, reason="too little structure to measure a shift on", unmeasured=unmeasured)
    record = JitterFollowed(first, n, _pair(motion.weight), _pair(motion.shared_px), _pair(motion.noise_px),
                            unmeasured=unmeasured)
    if not motion.weight.any():
        return replace(record, reason="no motion shared by the field")
    unmoved, applied_shifts = [], {}
    for t, m in shifts.items():
        applied = motion.applied(m.whole)
        moved = shift_image(outputs[t], applied)
        if mean_is_nearer(moved, neighbours(t) if neighbours is not None else None, noisy[t]):
            unmoved.append(first + t)
            continue
        outputs[t][...] = moved
        applied_shifts[first + t] = _pair(applied)
    lengths = [float(np.hypot(*s)) for s in applied_shifts.values()]
    return replace(record, moved_px=float(np.mean(lengths)) if lengths else 0.0, unmoved=tuple(unmoved),
                   shifts=applied_shifts)


@dataclass(frozen=True)
class FieldMotion:
    """The motion the whole field shares over a run of frames, measured on their `FrameShifts`
    (arrays per axis, y and x), and how much of each frame's measured shift to apply."""

    weight: np.ndarray  # the Wiener weight of each axis's jitter; 0 where no shared motion stands out
    placement: np.ndarray  # the outputs' mean placement, pixels: applied whole
    shared_px: np.ndarray  # RMS of the motion both halves share, about its mean
    noise_px: np.ndarray  # RMS of the whole frame's estimate's noise

    def applied(self, whole: np.ndarray) -> np.ndarray:
        """The shift to move an output by, for its frame's measured ``whole`` shift: the mean
        placement, then the jitter about it by its weight, at most `MAX_SHIFT_PX` per axis."""
        return np.clip(self.placement + self.weight * (whole - self.placement), -MAX_SHIFT_PX, MAX_SHIFT_PX)


def measure_motion(shifts: Sequence[FrameShifts]) -> FieldMotion | None:
    """The field's shared motion over ``shifts`` (module docstring); None under `MIN_FRAMES`."""
    if len(shifts) < MIN_FRAMES:
        return None
    whole = np.stack([m.whole for m in shifts])
    upper = np.stack([m.upper for m in shifts])
    lower = np.stack([m.lower for m in shifts])
    energy = np.stack([m.energy for m in shifts])  # (frames, half, axis)
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
    # the segment's mean placement of its outputs, measured over all its frames (to a few
    # hundredths of a pixel), is applied whole; the jitter about it by its weight (the Wiener estimate)
    return FieldMotion(weight, whole.mean(0), np.sqrt(shared), np.sqrt(noise))


class LiveJitter:
    """The same following for a live stream, causal and running (one per stream; `reset` at each
    segment).

    Each network output is measured against its own noisy frame as it is made, exactly as a file's
    (`measure_shifts`); the field's motion is measured again every `CHUNK` measured frames over
    the last `LIVE_FRAMES` of them (`measure_motion`), so an output is moved by weights measured
    on earlier frames only. Until `MIN_FRAMES` are measured, and after each change of the
    acquisition, nothing is moved. The referee's rule of a file is not applied: a live output has
    no window mean beside it once the referee trusts the network (as the live restoration). Frames
    over `LIVE_MAX_PIXELS` are not followed (`off` says so), nor, as in the live restoration, an
    output made more than `LIVE_FRAME_HORIZON` frames after its own (`push_many` of more frames at once:
    the daemon infers only the newest of a run); these are counted (`unmatched`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new segment: the old one's motion says nothing about it."""
        self._noisy: deque[tuple[int, np.ndarray]] = deque()  # frames awaiting their outputs, oldest first
        self._shifts: deque[FrameShifts] = deque(maxlen=LIVE_FRAMES)
        self._since = 0  # frames measured since the motion was last measured
        self.motion: FieldMotion | None = None
        self.moved = 0  # outputs moved
        self.unmeasured = 0  # network outputs whose shift could not be measured
        self.unmatched = 0  # network outputs whose frame was no longer kept
        self.off: str | None = None  # why this stream's outputs are not followed, where they are not

    def follows(self, frame: np.ndarray) -> bool:
        """Whether outputs of frames like ``frame`` are followed (its size: `LIVE_MAX_PIXELS`)."""
        if frame.size <= LIVE_MAX_PIXELS:
            return True
        self.off = f"frames of {frame.shape[0]}x{frame.shape[1]} px: over {LIVE_MAX_PIXELS} px live"
        return False

    def observe(self, index: int, frame: np.ndarray, *, copy: bool = False) -> None:
        """A noisy frame as it arrives, in its outputs' units, kept until its output: handed over,
        or copied where ``copy`` (the caller changes its own later)."""
        if self.follows(frame):
            self._noisy.append((index, frame.copy() if copy else frame))
        while self._noisy and self._noisy[0][0] < index - LIVE_FRAME_HORIZON:  # outputs that never came
            self._noisy.popleft()

    def follow(self, index: int, image: np.ndarray | None, network: bool) -> tuple[float, float] | None:
        """Output ``index`` (``image``, moved in place where ``network`` says it is the network's
        own): the shift applied, (y, x) pixels, or None where it stays as it was."""
        frame = None
        while self._noisy and self._noisy[0][0] <= index:
            i, f = self._noisy.popleft()
            frame = f if i == index else None
        if image is None or not network:
            return None
        if frame is None:
            self.unmatched += self.off is None
            return None
        spline = FrameSpline(image)  # measured on and moved by
        shifts = measure_shifts(frame, image, spline)
        if shifts is None:
            self.unmeasured += 1
            return None
        if self._since >= CHUNK or (self.motion is None and len(self._shifts) >= MIN_FRAMES):
            self._since = 0
            self.motion = measure_motion(self._shifts)  # of the frames before this one
        self._shifts.append(shifts)
        self._since += 1
        if self.motion is None or not self.motion.weight.any():
            return None
        applied = self.motion.applied(shifts.whole)
        image[...] = spline.shifted(applied)
        self.moved += 1
        return _pair(applied)

    def to_dict(self) -> dict:
        m = self.motion
        return {"weight": None if m is None else [round(w, 3) for w in _pair(m.weight)],
                "motion_px": None if m is None else [round(v, 3) for v in _pair(m.shared_px)],
                "noise_px": None if m is None else [round(v, 3) for v in _pair(m.noise_px)],
                "moved": self.moved, "unmeasured": self.unmeasured, "unmatched": self.unmatched, "off": self.off}


def _chunks(values: np.ndarray) -> list[np.ndarray]:
    """``values`` in consecutive chunks of `CHUNK`; a last piece of up to `CHUNK` / 2 joins the
    chunk before it, a longer one is a chunk of its own."""
    cuts = list(range(CHUNK, len(values) - CHUNK // 2, CHUNK))
    return np.split(values, cuts)


def _pair(values: np.ndarray) -> tuple[float, float]:
    return float(values[0]), float(values[1])
