"""Per-stream intensity normalisation: a robust offset and scale, fixed once per stream.

The network sees roughly [0, 1] whatever the camera's units, so one learning rate fits every
detector; outputs are mapped back so users get their own units (ADU). The scale is fixed after
the first frame: a moving scale would shift what the online model has learned under it.

A float pixel can be no measurement at all: NaN, ±inf, or a finite value no detector gives (a
flat-field division by a dead pixel gives 1e30, a garbled buffer float32's largest values).
`bad_pixels` tells them by one rule, and `sanitize` replaces them before anything else sees the
frame; `Normalizer.fit` fits on the other pixels only. A measurement can be no image of the sample
either: one pixel of one frame far above everything around it in space and time (a cosmic ray, a
detector or readout spike, a glitched 65535), which `remove_impulses` replaces in a live stream's
window (`ImpulseScreen`), wherever the engine trains, and in a file's final pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

log = logging.getLogger(__name__)
H = TypeVar("H")

#: The largest magnitude a pixel may have: the square of a larger value overflows float32, and
#: the engine squares pixel values (the loss, the change detector's correlations, the search for
#: activity), so such a value is treated as NaN and ±inf are.
MAX_MAGNITUDE = math.sqrt(float(np.finfo(np.float32).max))  # 1.8e19
#: How far a float pixel may lie from a robust range (`Normalizer`: 0.5-99.5 %), in widths of that
#: range, i.e. in the normalised units the network works in: 2**24, where float32's spacing exceeds
#: the range itself, so the value and the frame's other pixels can no longer share a float32
#: computation (a convolution over both keeps only the value). No detector comes near it: a 16-bit
#: camera's whole scale is 2**16 levels, and a frame's range spans several (its noise alone). The
#: trainer skips a batch beyond it (`trainer.OnlineTrainer.skipped_batches`).
MAX_RANGES = float(2**24)
#: About this many pixels, evenly spread, give a frame's robust range in `bad_pixels` (~0.1 ms).
RANGE_SAMPLE = 4096
#: How far above each of its neighbours in space and time (for one pixel, the 3×3 pixels of its own
#: frame and of the frames before and after it) a pixel, or a short run along a row, lies, in widths
#: of the normaliser's range, to be an isolated impulse (`remove_impulses`). Twice the threshold at
#: which no pixel of the movies at hand is one: the real two-photon and Cell Tracking Challenge
#: movies, the simulator's at 0.5-8 photons/pixel, Poisson fields of 0.05-3 photons (at 1.5 ranges
#: the dimmest give a few: 442 in 300 frames of 64² at 0.05 photons; docs/benchmarks.md, "One pixel
#: of one frame"). A 65535 among counts of a hundred lies hundreds of ranges above.
IMPULSE_RANGES = 6.0
#: The longest run of pixels along a row (the fast axis) that `remove_impulses` takes for one
#: impulse: a readout spike that outlasts a pixel's dwell time. A source's point-spread function is
#: as tall as it is wide, so a run one row tall that its rows above and below do not hold is none
#: (the smallest spot kept is the one pixel rule's: 0.85 px σ; docs/benchmarks.md, "Spikes along
#: the fast axis").
IMPULSE_RUN = 3
#: The logs say a screen's first replaced impulse and then every this many (`ImpulseScreen`).
IMPULSES_LOGGED_EVERY = 100


def _cap(dtype: np.dtype) -> float:
    """`MAX_MAGNITUDE`, or the largest finite value of a float dtype that holds less (float16)."""
    return min(MAX_MAGNITUDE, float(np.finfo(dtype).max))


def measurable(values: np.ndarray) -> np.ndarray:
    """Which pixels can be measurements at all: finite and within `MAX_MAGNITUDE` (every integer)."""
    values = np.asarray(values)
    if values.dtype.kind != "f":
        return np.ones(values.shape, bool)
    with np.errstate(invalid="ignore"):
        return np.abs(values) <= _cap(values.dtype)  # (NaN compares false)


@dataclass(frozen=True)
class Normalizer:
    offset: float
    scale: float

    @classmethod
    def fit(cls, frame: np.ndarray, low: float = 0.5, high: float = 99.5) -> Normalizer:
        """The 0.5-99.5 % range of the frame's measurable pixels (`measurable`): (0, 1) if none."""
        finite = frame[measurable(frame)] if frame.dtype.kind == "f" else frame
        if finite.size == 0:
            return cls(0.0, 1.0)
        lo, hi = np.percentile(finite, [low, high])
        scale = float(hi - lo)
        if not np.isfinite(scale) or scale <= 0:
            scale = float(np.abs(finite.astype(np.float64)).max()) or 1.0  # (int16 -32768 wraps)
        return cls(float(lo), scale)

    def forward(self, frame: np.ndarray) -> np.ndarray:
        return (np.asarray(frame, dtype=np.float32) - np.float32(self.offset)) / np.float32(self.scale)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        return (values * np.float32(self.scale) + np.float32(self.offset)).astype(np.float32, copy=False)

    def bounds(self) -> tuple[float, float]:
        """The values within `MAX_RANGES` widths of this range: ±MAX_RANGES in normalised units."""
        return self.offset - MAX_RANGES * self.scale, self.offset + MAX_RANGES * self.scale


def _bounds(frame: np.ndarray) -> tuple[float, float]:
    """The values a pixel of the float ``frame`` may take: within `MAX_RANGES` widths of the
    frame's own robust range (`Normalizer.fit` on `RANGE_SAMPLE` of its pixels), or within
    ±`MAX_RANGES` itself, and within `MAX_MAGNITUDE` and what the dtype holds (±inf out).

    The frame's own range only: a whole frame far from the stream's range is a change of the
    acquisition for the change detector to judge (judged bad against the stream's range, a stream
    whose first frame was constant replaced every later frame, for good). And never inside
    ±`MAX_RANGES` (1.7e7): no 16-bit count or flat-fielded value comes near it, while a sparse
    frame's real spot can lie 2**24 widths above a near-constant background."""
    cap = _cap(frame.dtype)
    step = max(1, math.ceil((frame.size / RANGE_SAMPLE) ** (1 / max(frame.ndim, 1))))
    sample = frame[(slice(None, None, step),) * frame.ndim]
    sample = sample[measurable(sample)]
    if sample.size == 0 and step > 1:  # (the sample fell on bad pixels only: the whole frame)
        sample = frame[measurable(frame)]
    if sample.size == 0:
        return -cap, cap  # nothing measurable: every pixel is out anyway
    own_lo, own_hi = Normalizer.fit(sample).bounds()
    return max(-cap, min(own_lo, -MAX_RANGES)), min(cap, max(own_hi, MAX_RANGES))


def bad_pixels(frame: np.ndarray) -> np.ndarray | None:
    """The pixels of ``frame`` that are no measurement, as a mask, or None if it has none: in a
    float frame NaN, ±inf, a magnitude over `MAX_MAGNITUDE`, or one over `MAX_RANGES` that lies
    more than `MAX_RANGES` widths of the frame's own robust range away (one pixel of 1e12 among
    hundreds of ADU; a saturated 65535 or a brighter acquisition is in)."""
    frame = np.asarray(frame)
    if frame.dtype.kind != "f" or frame.size == 0:
        return None
    lo, hi = _bounds(frame)
    if lo <= frame.min() and frame.max() <= hi:  # (a NaN makes both NaN: the comparison false)
        return None
    with np.errstate(invalid="ignore"):
        return ~((frame >= lo) & (frame <= hi))


def sanitize(frame: np.ndarray) -> tuple[np.ndarray, bool]:
    """Replace the pixels that are no measurement (`bad_pixels`: NaN, ±inf, absurdly large or far
    from the frame's range) by the median of the others. Returns (frame, was_clean).

    A frame that needed this is still denoised (so every input has its output) but is never
    trained on, nor tested for a change of the acquisition: one poisoned frame must not poison
    the model, and a value such as 1e30 must not reach the network's windows and context either,
    where it would spill into the outputs of the frames around it.
    """
    bad = bad_pixels(frame)
    if bad is None:
        return frame, True
    clean = frame.copy()
    good = frame[~bad]
    clean[bad] = np.median(good) if good.size else 0.0
    return clean, False


def remove_impulses(frame: np.ndarray, before: np.ndarray | None, after: np.ndarray | None,
                    threshold: float) -> tuple[np.ndarray, int]:
    """``frame`` with its isolated impulses replaced by the median of the pixels around each, and
    how many pixels: a pixel, or a run of up to `IMPULSE_RUN` pixels along a row (the fast axis),
    more than ``threshold`` above each of its neighbours in space and time (the pixels around it in
    its frame, and the 3-row box over it in ``before`` and ``after``, the frames beside it, either
    None where there is none; with neither, nothing is tested), whose brightest neighbour holds
    under half its height above the neighbours' median. ``frame`` itself is returned where there
    are none.

    Why: a pixel hundreds of ranges above its field is drawn again and again by the trainer's
    search for activity, its loss looks like divergence (rolled back, the learning rate halved,
    each time), and it swamps the final pass's sums. A real source, however bright, has a
    neighbour holding more than half its height, in space (its point-spread function, about as
    tall as it is wide, sampled by the pixels) or in time (it persists, decays over several
    frames, or moves by under a pixel a frame), so it is left alone. A readout or detector spike
    can outlast a pixel's dwell time and light a few pixels along the scan line, one row tall:
    no point-spread function. The replacement comes from the frame itself, so an output that
    reads this frame learns nothing of the frames beside it."""
    near = [np.asarray(f, np.float32) for f in (before, after) if f is not None]
    values = np.asarray(frame, np.float32)
    if not near or values.size < 2:  # (a lone pixel has no ring to be replaced from)
        return frame, 0
    candidates = values - (np.maximum(near[0], near[1]) if len(near) > 1 else near[0]) > threshold
    if not candidates.any():  # the usual case: three array operations (`nonzero` alone costs 5 times more)
        return frame, 0
    rows, cols = np.nonzero(candidates)
    padded = [np.pad(f, 1, constant_values=np.nan) for f in (values, *near)]  # (NaN: beyond the edge)
    # the candidates' runs along their rows (np.nonzero gives them row by row, left to right),
    # longest first: each candidate is also tested alone, last, as the pixel it is
    starts = np.flatnonzero(np.r_[True, (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1)])
    lengths = np.diff(np.r_[starts, rows.size])
    tests = [(rows[starts[lengths == n]], cols[starts[lengths == n]], n) for n in range(IMPULSE_RUN, 1, -1)]
    cleaned: np.ndarray | None = None
    for run_rows, run_cols, length in [*tests, (rows, cols, 1)]:
        if run_rows.size == 0:
            continue
        replacement = _isolated_runs(padded, run_rows + 1, run_cols + 1, length, threshold)
        if replacement is None:
            continue
        if cleaned is None:
            cleaned, replaced = np.array(frame, copy=True), np.zeros(values.shape, bool)
        isolated, median = replacement
        median = (np.rint(median) if cleaned.dtype.kind in "iu" else median).astype(cleaned.dtype)
        for dx in range(length):
            cleaned[run_rows[isolated], run_cols[isolated] + dx] = median
            replaced[run_rows[isolated], run_cols[isolated] + dx] = True
    return (frame, 0) if cleaned is None else (cleaned, int(replaced.sum()))


def _isolated_runs(padded: list[np.ndarray], rows: np.ndarray, cols: np.ndarray, length: int,
                   threshold: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Of the runs of ``length`` pixels starting at (rows, cols) of ``padded[0]`` (padded frames:
    the frame, then those beside it), which are isolated impulses (`remove_impulses`), and the
    median of the pixels around each in its frame, its replacement; None where none is."""
    box = [(dy, dx) for dy in (-1, 0, 1) for dx in range(-1, length + 1)]
    ring = [(dy, dx) for dy, dx in box if dy or not 0 <= dx < length]
    own = np.stack([padded[0][rows + dy, cols + dx] for dy, dx in ring])
    beside = np.stack([f[rows + dy, cols + dx] for f in padded[1:] for dy, dx in box])
    around = np.concatenate([own, beside])
    lowest = np.min([padded[0][rows, cols + dx] for dx in range(length)], axis=0)
    highest = np.fmax.reduce(around, axis=0)  # (fmax: NaN, beyond the edge, left out)
    height = lowest - np.nanmedian(around, axis=0)
    isolated = lowest - highest > np.maximum(threshold, height / 2)
    if not isolated.any():
        return None
    return isolated, np.nanmedian(own[:, isolated], axis=0)


@dataclass(frozen=True)
class Screened(Generic[H]):
    """A frame tested by `ImpulseScreen`: itself or its cleaned copy, and what came with it."""

    index: int
    frame: np.ndarray
    replaced: int  # pixels replaced
    held: H
    reshow: bool  # the window holds another copy of this frame: from now on it is to hold ``frame``


class ImpulseScreen(Generic[H]):
    """A stream's frames, each tested for isolated impulses (`remove_impulses`) as it comes,
    against the frame before it alone, then again, for good, against the frames before and after
    it once the next has come. The frame loop holds the copy each test gives in the window and
    the context history: the first for the one output made while the frame is the newest (the
    output whose window ends on it), the second for every output after, and it hands the second
    to the replay buffer and the live amplitude. So no output shows an impulse, and a source that
    rises in one frame and stays (which the first test alone could take for one, where it is
    undersampled) is back in the window with the next frame. The last frame of a segment is
    tested for good against the frame before it alone, by `end`. A recorded movie's frames are
    tested for good alone (`add_recorded`: `offline.pretrain` for its replay buffer, and a file's
    final pass the same way, in the movie's units). ``where`` names, in the logs, what the frames
    are replaced in; None logs nothing (frames screened, and logged, once before)."""

    def __init__(self, threshold: float = IMPULSE_RANGES, where: str | None = "in the live window"):
        self.threshold = threshold
        self.where = where
        self.impulses = 0  # pixels replaced for good, over every frame tested
        self._before: np.ndarray | None = None  # the frame before the untested one, as tested
        self._untested: tuple[int, np.ndarray, H, np.ndarray] | None = None  # ..., and the copy shown

    def add(self, index: int, frame: np.ndarray, held: H) -> tuple[Screened[H] | None, Screened[H]]:
        """Take frame ``index`` (normalised; never written to) and what the caller wants back with
        it; return the frame before it, tested for good (None for a segment's first frame), and
        this frame as tested against the frame before it alone."""
        tested = self._test(frame)
        shown, replaced = remove_impulses(frame, self._before, None, self.threshold)
        self._untested = (index, frame, held, shown)
        return tested, Screened(index, shown, replaced, held, reshow=replaced > 0)

    def add_recorded(self, index: int, frame: np.ndarray, held: H) -> Screened[H] | None:
        """Take frame ``index`` of a recorded movie as `add` does, without the test as it comes (no
        output is made before the next frame is read); return the frame before it, tested for good."""
        tested = self._test(frame)
        self._untested = (index, frame, held, frame)
        return tested

    def end(self) -> Screened[H] | None:
        """The untested frame, tested for good against the frame before it alone (no frame will
        follow it in its segment); the next frame starts afresh."""
        tested = self._test(None)
        self._before = self._untested = None
        return tested

    def _test(self, after: np.ndarray | None) -> Screened[H] | None:
        if self._untested is None:
            return None
        index, frame, held, shown = self._untested
        cleaned, count = remove_impulses(frame, self._before, after, self.threshold)
        every, before = IMPULSES_LOGGED_EVERY, self.impulses
        if count and self.where is not None and (before == 0 or (before + count) // every > before // every):
            log.warning("frame %d: %d isolated impulses (pixels far above all their neighbours in space and time) "
                        "replaced %s (%d so far)", index, count, self.where, before + count)
        self.impulses += count
        self._before = cleaned
        if cleaned is shown:
            reshow = False
        elif cleaned is not frame and shown is not frame:  # (both copies: the same pixels replaced?)
            reshow = not np.array_equal(cleaned, shown)
        else:
            reshow = True
        return Screened(index, cleaned, count, held, reshow)
