"""Amplitude restoration for recorded movies: undo the network's measured shrinkage of the activity.

Why: trained on noisy frames alone, the network outputs the expected clean frame given its inputs
(the MMSE estimate). Where the inputs leave a transient uncertain (a faint cell, its first frames)
that estimate hedges towards the still field, so calcium transients come out smaller than they
are (0.75-0.8 of their amplitude at 2 photons/pixel, docs/benchmarks.md): a biased dF/F.

The shrinkage can be measured on the movie itself, without a truth:

* the network never sees the noise of the frame it outputs (blindness), so the covariance of its
  output with the noisy frames equals the covariance of its output with the truth;
* noise that is independent from frame to frame (shot, PMT and read noise, whatever their
  distribution or spatial correlation) adds to the noisy frames' variance but not to their
  covariance at lags 1 and 2, and a slowly varying truth's variance is that autocovariance
  extrapolated to lag 0, 2 C(1) - C(2).

Both are taken about each frame's blind baseline (`slow_baselines`), the slow level the gain
stretches the activity away from: a Gaussian-weighted mean of the segment's *other* noisy frames
(`BASELINE_SIGMA`), and for the outputs that plus the outputs' mean offset from their noisy frames
over the blocks beyond the network's reach. Each baseline holds its neighbours' noise with a weight
w (about 1/430 to 1/250 in a 600-frame movie), so every lag product comes out off by the noise
variance times w and the squared weights, which is taken back out (without it the truth's variance
came out 6 % low at 2 photons/pixel and 27 % at 0.5, three simulated movies each; with it within
3 % and 8 %). The outputs' covariance is not corrected: there the baseline's noise enters both
factors and mostly cancels, leaving about 0.0004 of the noise variance either way (a slope 1-5 %
off at a noise-to-signal ratio of 30-100).

Their ratio, pooled over pixels, is the slope of the output on the truth (1 keeps amplitudes).
In a file each output D is then moved away from its baseline B by a gain map, ``keep`` over
the local slope (the same ratio of sums smoothed over about a soma's radius and, where a region
has little activity of its own, pulled towards the slope of regions like it; never below 1), at
the scale of cells and processes: ``D + (gain - 1) * smooth(D - B)`` (`SMOOTH_PX`; in a file,
wider or narrower as its noise is larger or smaller against its signal: `smoothing_px`). A live
stream keeps one running gain for the field (`LiveAmplitude`). `keep` is
`EngineConfig.keep_amplitude`: 1 restores the amplitude in full, 0 leaves the network's output as
it is. Undoing a shrinkage costs whole-movie PSNR (an unbiased estimate has more variance than
the MMSE one); docs/engine.md has the measured trade.

Blindness is kept: B of frame t holds no noisy frame t and no output within the network's reach of
it (the outputs' offset is measured on the blocks beyond), so neither D nor B depends on frame t's
noise, and B follows drifts slower than the activity (bleaching), which the network keeps and the
gain must not stretch. A baseline of the outputs alone (the outputs beyond reach) was blind too,
but it left out the activity within reach of each frame, so it sank under every burst, and the
gain added a slow copy of the burst to the traces: trace correlation 0.0003-0.0020 lower on
eleven simulated movies, whole-movie PSNR 0.19 dB lower to 0.10 dB higher (docs/benchmarks.md,
"A baseline that does not sink under the bursts").
Only the gains and the correction's smoothing width depend on a frame's noise, through sums over
all the segment's frames and a few hundred pixels (the width: all of them), a weight of about
1 / (frames x pixels) each; and, after the cell-scale blend, the outputs' offsets, through the
blend's guides: the outputs of the other half of a segment are smoothed within the sources that
a mean of this half's outputs draws (`cellblend._parts`), some of which read frame t (a weight of
about 2 / frames in that mean, then the guided filter's).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from umvd_live.engine.outputs import mean_is_nearer

#: A frame's baselines weigh the other frames by a Gaussian of their distance with this sigma
#: (frames): they follow what is slower than the activity (bleaching, a slow drift of the focus or
#: the light) instead of leaving it to the gain. A median over the whole segment made the restored
#: movies bleach 1.3-1.7x as fast as their truth (docs/benchmarks.md, "Slow drifts"); 400 frames
#: or more changed the trace correlation by less than 0.001 on four 600-frame movies and lowered
#: their slopes by up to 0.04.
BASELINE_SIGMA = 200.0
#: The weights reach this many sigmas.
BASELINE_TRUNCATE = 3.0
#: Frames per block, summed once and sharing the weights of their baselines; fewer, longer blocks
#: where the block means of the noisy frames would take more than `BLOCK_BYTES` (and the
#: outputs' offsets as much again): at 512², blocks of 10 up to 1,280 frames, and a segment
#: restores up to about 38,000 frames (longer blocks leave none beyond reach within 3 sigma).
BLOCK_FRAMES = 10
BLOCK_BYTES = 128 * 2**20

#: The largest gain applied: a slope measured below 1 / MAX_GAIN means outputs too uncertain to
#: stretch further without stretching mostly their errors.
MAX_GAIN = 2.0
#: The correction is smoothed over this many pixels (Gaussian sigma) in a live stream, and in a
#: file whose noise-to-signal ratio is `NOISE_TO_SIGNAL`: it restores the amplitude of what a
#: cell's or a process's trace averages, not the residual noise of single pixels, which the gain
#: would amplify as well (whole-movie PSNR +0.1 to +1.1 dB for a slope 0.01-0.06 lower than
#: unsmoothed, on the simulated movies of docs/benchmarks.md).
SMOOTH_PX = 1.0
#: A file's correction is smoothed over an area in proportion to its noise-to-signal ratio (of the
#: noise to the activity about the baselines; `smoothing_px`): `SMOOTH_PX` at this ratio, the
#: highest of the 2-photon simulated movies (13-30), where 1 px was chosen.
NOISE_TO_SIGNAL = 30.0
#: The narrowest smoothing: half a pixel, under which a Gaussian hardly mixes a pixel with the
#: pixels beside it.
MIN_SMOOTH_PX = 0.5
#: The widest smoothing: the scale of the gain map itself (`LOCAL_PX`, about a soma's radius).
MAX_SMOOTH_PX = 4.0
#: The local gain: both maps of `Shrinkage` are smoothed over this many pixels (Gaussian sigma,
#: about a soma's radius), each pulled towards a prior slope by `LOCAL_PRIOR` times the field's
#: mean signal. One gain for the field fits its average cell, stretching the bright cells that the
#: network shrinks little and leaving the faint ones short (docs/benchmarks.md, "One gain per region").
LOCAL_PX = 4.0
LOCAL_PRIOR = 2.0
#: Frames per chunk of the sums; the chunks' spread gives the measurement's standard error.
CHUNK = 32
#: Fewer frames beyond reach than this give a block no baseline (its segment is left as it is): the
#: outputs' offset from their noisy frames, measured on a handful of outputs, is mostly their own
#: errors and activity, and would be subtracted, times the gain, from every frame of the block.
BASELINE_MIN_FRAMES = 2 * CHUNK
#: Standard errors above 0 that the truth's variance and the outputs' covariance with it must
#: lie for a slope to be measured (noise alone passes one such test about once in 650 movies of
#: 10 chunks, Student's t, and once in 31,000 of many chunks; a slope needs both).
SIGNIFICANCE = 4.0


@dataclass(frozen=True)
class AmplitudeGain:
    """What the restoration did to one segment of a movie."""

    first: int  # the segment's first frame
    frames: int
    slope: float | None  # the measured slope of the outputs on the truth; None: not measurable
    gain: float  # the mean over the field of the gains applied to deviations from the baseline (1: none)
    reason: str = ""  # why no gain was applied, where none was
    gain_range: tuple[float, float] = (1.0, 1.0)  # the smallest and largest gain of the field's map
    # frames (of the movie) whose restored output the blind referee found worse than their window's
    # mean: they keep the network's output
    unrestored: tuple[int, ...] = ()
    smooth_px: float = SMOOTH_PX  # the sigma the correction was smoothed over (`smoothing_px`)


@dataclass(frozen=True)
class Shrinkage:
    """A segment's measured shrinkage: per pixel, the outputs' covariance with the noisy frames
    (= with the truth) and the truth's variance, about their baselines, each a mean over the
    chunks of its frames."""

    slope: float  # pooled over pixels: covariance.mean() / signal.mean()
    covariance: np.ndarray  # (H, W) float64
    signal: np.ndarray  # (H, W) float64
    noise_to_signal: float  # the noise variance over the truth's variance, both about the baselines (pooled)

    def gains(self, keep: float) -> np.ndarray:
        """The (H, W) gain map that restores slope ``keep``: ``keep`` over the local slope, in
        [1, `MAX_GAIN`]. The local slope is the ratio of both maps smoothed over `LOCAL_PX`,
        each pulled towards a prior slope by `LOCAL_PRIOR` times the mean signal, so a region
        with little activity of its own gets its kind of region's gain rather than its own noise's.

        The prior slope is pooled where the prior weighs (each region by 1 / (its signal + the
        prior's)), not over the field: the field's pooled slope is the brightest regions', which
        the network shrinks least (on a simulated 2-photon movie 0.95 in the brightest twentieth
        of the field, 0.76-0.81 in its middle three fifths), and pulled towards it the faint cells
        and processes kept part of the network's shrinkage (docs/benchmarks.md, "A prior slope
        from the regions it is used in")."""
        prior = LOCAL_PRIOR * float(self.signal.mean())
        cov = np.maximum(ndimage.gaussian_filter(self.covariance, LOCAL_PX, mode="nearest"), 0.0)
        signal = np.maximum(ndimage.gaussian_filter(self.signal, LOCAL_PX, mode="nearest"), 0.0)
        weight = 1.0 / (signal + prior)
        slope = float((weight * cov).sum() / (weight * signal).sum())
        local = (cov + prior * slope) / (signal + prior)
        return np.clip(keep / np.maximum(local, 1e-6), 1.0, MAX_GAIN).astype(np.float32)


def measure_shrinkage(noisy: Sequence[np.ndarray], denoised: Sequence[np.ndarray], baselines: SlowBaselines,
                      scored: np.ndarray | None = None) -> Shrinkage | None:
    """The shrinkage of ``denoised`` on the (unknown) truth of ``noisy`` (module docstring), both
    taken about their blind baselines (``baselines``, `slow_baselines`): the part of the activity
    the gain is applied to; both are sequences of (H, W) frames in the same units. ``scored``: the
    frames whose outputs count (default: all).

    None unless both the truth's variance and the outputs' covariance with it, pooled over
    pixels, stand out from their chance values: each is summed per chunk of frames, and their
    mean must be `SIGNIFICANCE` standard errors above 0 (the chunks' spread). A field whose only
    variance is noise has nothing to restore, and noise alone would give any slope."""
    n = len(noisy)
    mask = np.ones(n, bool) if scored is None else np.asarray(scored, bool)
    if n < 3 * CHUNK or mask.sum() < 2 * CHUNK:
        return None
    shape = np.shape(noisy[0])
    covs, signals, noises = [], [], []  # per chunk, means per pixel and frame (pooled)
    cov_map, signal_map = np.zeros(shape), np.zeros(shape)  # sums over the chunks' (H, W) means
    for start in range(0, n - CHUNK // 2, CHUNK):  # a last short piece joins the chunk before it
        stop = n if n - (start + CHUNK) <= CHUNK // 2 else start + CHUNK
        lo = max(0, start - 2)  # with the two frames before: the lags' partners
        about, outputs = [], []  # in frame order: `baselines` makes each block's maps once
        for t in range(lo, stop):
            base = baselines.noisy(t, noisy[t])
            about.append(noisy[t] - base)
            if t >= start and mask[t]:
                outputs.append(denoised[t] - (base + baselines.offset(t)))  # `output`, without a second `noisy`
        y = np.stack(about).astype(np.float64)
        head = start - lo
        lag0 = np.einsum("tij,tij->ij", y[head:], y[head:]) / (len(y) - head)
        lag1 = np.einsum("tij,tij->ij", y[max(head, 1):], y[max(head, 1) - 1:-1]) / (len(y) - max(head, 1))
        lag2 = np.einsum("tij,tij->ij", y[max(head, 2):], y[max(head, 2) - 2:-2]) / (len(y) - max(head, 2))
        signal = 2 * lag1 - lag2
        # each baseline holds its neighbours' noise (weight `own`, the squares summing to `spread`),
        # which biases the lag products (module docstring): taken back out
        own, spread = baselines.weights(start, stop)
        noise = (lag0 - signal) / (1 + 2 * own)
        signal += (2 * own - spread) * noise
        signals.append(float(signal.mean()))
        noises.append(float(noise.mean()))
        signal_map += signal
        keep = mask[start:stop]
        if keep.any():
            d = np.stack(outputs).astype(np.float64)
            cov = np.einsum("tij,tij->ij", d, y[head:][keep]) / keep.sum()
            covs.append(float(cov.mean()))
            cov_map += cov
    if not (significant(signals) and significant(covs)):
        return None
    return Shrinkage(float(np.mean(covs) / np.mean(signals)), cov_map / len(covs), signal_map / len(signals),
                     float(np.mean(noises) / np.mean(signals)))


def smoothing_px(noise_to_signal: float) -> float:
    """The Gaussian sigma a file's correction is smoothed over: an area in proportion to the noise-
    to-signal ratio (`SMOOTH_PX` at `NOISE_TO_SIGNAL`), so that the residual noise the gain
    amplifies stays as it is there, from `MIN_SMOOTH_PX` to `MAX_SMOOTH_PX`. Wider where the noise
    is larger (1.4-1.9 px at 0.5 photons/pixel on three simulated movies); narrower where it is
    smaller (0.5-1 px at 2 and 8 photons), where a wider smoothing spreads a small source's
    correction beyond it and restores less of its amplitude (docs/benchmarks.md, "The
    restoration's smoothing widens with the noise" and "... narrows where the noise is smaller")."""
    ratio = max(noise_to_signal, 0.0) / NOISE_TO_SIGNAL
    return float(min(MAX_SMOOTH_PX, max(MIN_SMOOTH_PX, SMOOTH_PX * np.sqrt(ratio))))


def significant(values: list[float]) -> bool:
    """Whether the mean of ``values`` is `SIGNIFICANCE` standard errors above 0."""
    v = np.asarray(values, np.float64)
    if len(v) < 3:
        return False
    error = v.std(ddof=1) / np.sqrt(len(v))
    return bool(v.mean() > SIGNIFICANCE * error)


class SlowBaselines:
    """A segment's blind baselines, per block of frames: frame t's noisy baseline is the
    Gaussian-weighted mean of the segment's other noisy frames (`BASELINE_SIGMA`), its output's
    that plus the outputs' mean offset from their noisy frames over the blocks beyond the
    network's reach of every frame of t's block (module docstring). Built by `slow_baselines`
    from the block means; a block's two maps are made when a frame of it is first asked for and
    kept until another block's are (frames are asked for in order), so a long movie holds its
    block means and no more."""

    def __init__(self, starts: np.ndarray, stops: np.ndarray, reach: int, noisy_means: list[np.ndarray],
                 offsets: list[np.ndarray]):
        self.starts, self.stops, self.reach = starts, stops, reach
        self._counts, self._centres = stops - starts, (starts + stops - 1) / 2
        self._noisy_means, self._offsets = noisy_means, offsets  # per block, (H, W) float32
        own, spread = [], []  # per block: a neighbouring frame's weight, the sum of the squared weights
        for k in range(len(starts)):
            closeness = self._closeness(k)
            total = self._total(k, closeness)
            own.append(closeness[k] / total)
            spread.append(float((self._counts * closeness ** 2).sum() - closeness[k] ** 2) / total ** 2)
        self.own, self.spread = np.array(own), np.array(spread)
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None  # (k, level, offset) of the last block asked for

    def far(self, k: int) -> np.ndarray:
        """The blocks beyond the reach of every frame of block k, within the weights' reach."""
        start, stop = self.starts[k], self.stops[k]
        return (self._closeness(k) > 0) & ((self.stops <= start - self.reach) | (self.starts >= stop + self.reach))

    def far_frames(self, k: int) -> int:
        return int(self._counts[self.far(k)].sum())

    def noisy(self, t: int, frame: np.ndarray) -> np.ndarray:
        """Frame t's baseline, of the noisy frames (``frame``: frame t, which it leaves out)."""
        k, level, _ = self._maps(t)
        return level - np.float32(self.own[k]) * np.asarray(frame, np.float32)

    def output(self, t: int, frame: np.ndarray) -> np.ndarray:
        """Output t's baseline (``frame``: noisy frame t)."""
        return self.noisy(t, frame) + self.offset(t)

    def offset(self, t: int) -> np.ndarray:
        """The outputs' offset from their noisy frames that output t's baseline adds to frame t's."""
        return self._maps(t)[2]

    def weights(self, start: int, stop: int) -> tuple[float, float]:
        """`own` and `spread`, averaged over frames ``start`` to ``stop``."""
        blocks = np.searchsorted(self.starts, np.arange(start, stop), side="right") - 1
        return float(self.own[blocks].mean()), float(self.spread[blocks].mean())

    def _closeness(self, k: int) -> np.ndarray:
        distance = np.abs(self._centres - self._centres[k])
        near = distance <= BASELINE_TRUNCATE * BASELINE_SIGMA
        return np.where(near, np.exp(-0.5 * (distance / BASELINE_SIGMA) ** 2), 0.0)

    def _total(self, k: int, closeness: np.ndarray) -> float:
        """The weights of a frame's baseline summed, its own frame left out."""
        return float((self._counts * closeness).sum() - closeness[k])

    def _maps(self, t: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Frame t's block, its level (the weighted mean of all the noisy frames, the block's own in;
        `noisy` takes frame t back out) and the outputs' offset beyond reach."""
        k = int(np.searchsorted(self.starts, t, side="right")) - 1
        if self._block is None or self._block[0] != k:
            closeness = self._closeness(k)
            level = _weighted(self._noisy_means, self._counts * closeness / self._total(k, closeness))
            far = np.where(self.far(k), self._counts * closeness, 0.0)
            self._block = (k, level, _weighted(self._offsets, far / far.sum()))
        return self._block


def slow_baselines(noisy: Sequence[np.ndarray], denoised: Sequence[np.ndarray], reach: int) -> SlowBaselines | None:
    """The blind baselines of a segment's frames and outputs (`SlowBaselines`), in blocks of
    `BLOCK_FRAMES` (longer where the block means would pass `BLOCK_BYTES`); ``reach``: the frames
    on either side of a frame that its output depends on. None where some block has fewer than
    `BASELINE_MIN_FRAMES` outputs beyond reach within the weights' reach to measure their offset on."""
    n = len(denoised)
    frame_bytes = 4 * np.asarray(denoised[0]).size
    block = max(BLOCK_FRAMES, -(-n * frame_bytes // BLOCK_BYTES))
    starts = np.arange(0, n, block)
    stops = np.minimum(starts + block, n)
    blocks = list(zip(starts.tolist(), stops.tolist()))
    noisy_means = [mean_frames(noisy[start:stop]).astype(np.float32) for start, stop in blocks]
    offsets = [(mean_frames(denoised[start:stop]) - mean).astype(np.float32)
               for (start, stop), mean in zip(blocks, noisy_means)]
    baselines = SlowBaselines(starts, stops, reach, noisy_means, offsets)
    if min(baselines.far_frames(k) for k in range(len(blocks))) < BASELINE_MIN_FRAMES:
        return None
    return baselines


def _weighted(maps: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The sum of ``maps`` times ``weights`` (those not 0), float32."""
    out = np.zeros(np.shape(maps[0]), np.float32)
    for j in np.flatnonzero(weights).tolist():
        out += np.float32(weights[j]) * maps[j]
    return out


def restore_amplitude(noisy: Sequence[np.ndarray], denoised: Sequence[np.ndarray], *, reach: int, keep: float,
                      scored: np.ndarray | None = None, first: int = 0,
                      neighbours: Callable[[int], np.ndarray] | None = None) -> AmplitudeGain:
    """Undo the shrinkage of one segment's outputs (module docstring), in place, and say what was done.

    ``noisy`` and ``denoised`` are the segment's (H, W) frames in order, in the same units, the
    outputs float arrays that are changed in place; ``reach`` the frames on either side of a frame
    that its output depends on; ``scored`` the frames whose outputs are the network's (the others,
    e.g. the referee's window means, are neither measured nor changed, though they enter the
    baselines' means); ``first`` the segment's first frame in the movie, for the record.
    ``neighbours(t)``: the blind mean of frame t's window without t (the referee's, `outputs`);
    where given, a restored output farther from its noisy frame than that mean is (as the referee
    judges the network's) is left as the network made it."""
    n = len(denoised)
    if keep <= 0:
        return AmplitudeGain(first, n, None, 1.0, "off")
    if n < 3 * CHUNK:
        return AmplitudeGain(first, n, None, 1.0, f"too few frames to measure ({n} < {3 * CHUNK})")
    baselines = slow_baselines(noisy, denoised, reach)  # before any output changes
    if baselines is None:
        return AmplitudeGain(first, n, None, 1.0, f"no blind baseline: a block has fewer than {BASELINE_MIN_FRAMES} "
                             f"frames beyond reach {reach} within {BASELINE_TRUNCATE * BASELINE_SIGMA:g} ({n} frames)")
    shrinkage = measure_shrinkage(noisy, denoised, baselines, scored)
    if shrinkage is None:
        return AmplitudeGain(first, n, None, 1.0, "no activity measured")
    gains = shrinkage.gains(keep)
    if float(gains.max()) == 1.0:
        return AmplitudeGain(first, n, shrinkage.slope, 1.0)
    mask = np.ones(n, bool) if scored is None else np.asarray(scored, bool)
    px = smoothing_px(shrinkage.noise_to_signal)
    unrestored = []
    for t in np.flatnonzero(mask).tolist():
        frame = denoised[t]
        restored = frame + (gains - 1.0) * smooth(frame - baselines.output(t, noisy[t]), px=px)
        # the referee's rule: left as made where the window's blind mean is nearer the noisy frame
        if mean_is_nearer(restored, neighbours(t) if neighbours is not None else None, noisy[t]):
            unrestored.append(first + t)
            continue
        frame[...] = restored
    return AmplitudeGain(first, n, shrinkage.slope, float(gains.mean()), "",
                         (float(gains.min()), float(gains.max())), tuple(unrestored), px)


def smooth(image: np.ndarray, pool: Executor | None = None, px: float = SMOOTH_PX) -> np.ndarray:
    """``image`` smoothed over ``px`` (the restoration's correction); with ``pool``, its lower
    half on the pool beside the upper half here, each from its own rows and the rows around them
    that the filter reads (the same numbers: scipy's filter reaches 4 sigma and no further), as
    D's passes are cut in bands: at 512² the filter took 3.4 ms of the frame loop's time a frame."""
    height, reach = image.shape[0], int(4.0 * px + 0.5)
    if pool is None or height < 4 * reach:
        return ndimage.gaussian_filter(image, px, mode="nearest")
    cut = height // 2
    lower = pool.submit(ndimage.gaussian_filter, image[cut - reach:], px, mode="nearest")
    out = np.empty_like(image)
    out[:cut] = ndimage.gaussian_filter(image[:cut + reach], px, mode="nearest")[:cut]
    out[cut:] = lower.result()[reach:]
    return out


def mean_frames(frames: Sequence[np.ndarray], mask: np.ndarray | None = None) -> np.ndarray:
    """The per-pixel mean of the frames (of those ``mask`` selects), in float64, summed one by one: a
    long movie's frames are never stacked."""
    picked = range(len(frames)) if mask is None else np.flatnonzero(mask).tolist()
    total = np.zeros(np.asarray(frames[0]).shape, np.float64)
    for i in picked:
        total += frames[i]
    return total / len(picked)


#: Live streams: the chunks of the running sums kept (about 68 s at 30 Hz); older ones are forgotten.
LIVE_CHUNKS = 64
#: Live streams: a noisy frame kept for its output is dropped once this many newer frames came (its
#: output never came, or comes from a `push_many` of more frames at once); the jitter's too.
LIVE_FRAME_HORIZON = 4 * CHUNK
#: Live streams: frames over which the running means (of the noisy frames, of the outputs, and of
#: the outputs' deviations from the baseline) average.
LIVE_MEAN_FRAMES = 300
#: Live baseline: a running median, each output moving it by this share of the pixel's mean absolute
#: deviation towards itself (a transient of 30 frames lifts it by at most 0.6 of a deviation), after
#: a plain mean of the first outputs.
MEDIAN_STEP = 0.02
MEDIAN_START = 32


class LiveAmplitude:
    """The same restoration for a live stream, causal and running (one per stream; `reset` at
    each segment).

    Nothing later than an output's frame exists live, so the sums run along the stream: the lag
    products of the noisy frames as they arrive, and each output's product with its own noisy
    frame. Each factor is taken about a running mean that holds neither its own frame nor the
    other factor's, nor any frame the other mean holds (means of the even and of the odd frames,
    each frame joining its mean two frames after it came): a mean's own noise then adds nothing
    to the lag products. It does add a little to the outputs' product: an output depends on the
    recent frames that the means also hold, which biases the covariance up by about the noise
    variance / `LIVE_MEAN_FRAMES` (a slope a few percent high at 2 photons, so the live gain errs
    low).
    They are summed per chunk of `CHUNK` frames and the last `LIVE_CHUNKS` chunks
    give the slope, with the same significance rule as a file's; until then, and after each
    change of the acquisition, the gain is 1. The baseline is a running median of the outputs at
    least N//2 + 2 frames before (whose windows end before the output's frame): blind, as a
    file's, and robust, so a burst moves it little (a running mean followed the bursts and took
    them out of the traces: trace correlation 0.820 against 0.847 unrestored, docs/benchmarks.md).
    """

    def __init__(self, keep: float, k: int):
        self.keep, self.k = keep, k
        self.reset()

    def reset(self) -> None:
        """A new segment: the old one's sums say nothing about it."""
        self.gain: float = 1.0
        self.slope: float | None = None
        self._means: list[np.ndarray | None] = [None, None]  # of the even and the odd frames, two behind
        self._counts = [0, 0]
        self._recent: deque[tuple[int, np.ndarray]] = deque(maxlen=3)  # the newest noisy frames, oldest first
        self._centred: dict[int, np.ndarray] = {}  # by index: a noisy frame about a mean, until its output
        self._lags = [0.0, 0.0, 0]  # this chunk's lag-1 and lag-2 sums, frames
        self._cov = [0.0, 0]  # this chunk's covariance sum, outputs
        self._signals: deque[float] = deque(maxlen=LIVE_CHUNKS)
        self._covs: deque[float] = deque(maxlen=LIVE_CHUNKS)
        self._waiting: deque[np.ndarray] = deque()  # outputs not yet old enough for the baseline
        self._base: np.ndarray | None = None
        self._spread: np.ndarray | None = None  # a running mean absolute deviation from the baseline
        self._mean_d: np.ndarray | None = None  # a running mean of the same outputs, for the covariance
        self._seen_base = 0

    def observe(self, index: int, frame: np.ndarray) -> None:
        """A noisy frame as it arrives, in the units of its outputs, handed over: where it is
        float32 it is kept and later changed in place, so the caller passes a copy of its own
        (the stream does; a second copy here cost its frame loop a frame-sized copy a frame)."""
        y = np.asarray(frame, np.float32)
        own, other = self._means[index % 2], self._means[1 - index % 2]
        if own is not None and other is not None:
            centred = y - other
            self._centred[index] = centred
            partners = {j: f for j, f in self._recent}
            if index - 1 in partners and index - 2 in partners:
                pixels = y.size
                self._lags[0] += float(np.vdot(centred, partners[index - 1] - own)) / pixels
                self._lags[1] += float(np.vdot(centred, partners[index - 2] - own)) / pixels
                self._lags[2] += 1
                if self._lags[2] == CHUNK:
                    lag1, lag2, n = self._lags
                    self._signals.append((2 * lag1 - lag2) / n)
                    self._lags = [0.0, 0.0, 0]
                    self._update_gain()
        for old in [i for i in self._centred if i < index - LIVE_FRAME_HORIZON]:  # outputs that never came
            del self._centred[old]
        self._recent.append((index, y))
        first, oldest = self._recent[0]
        if first == index - 2:  # the frame two before joins its parity's mean
            side = first % 2
            self._counts[side] = min(self._counts[side] + 1, LIVE_MEAN_FRAMES // 2)
            mean = self._means[side]
            if mean is None:
                self._means[side] = oldest.copy()
            else:  # in place: no later frame takes it as a partner
                step = np.subtract(oldest, mean, out=oldest)
                step *= 1.0 / self._counts[side]
                mean += step

    def restore(self, index: int, image: np.ndarray | None, network: bool, pool: Executor | None = None) -> float:
        """Output ``index`` (``image``, changed in place): measured and restored where
        ``network`` says it is the network's own (not the referee's window mean). Returns the
        gain its deviation from the baseline was multiplied by (1.0 where none was applied).
        ``pool``: idle workers that smooth half of the correction (`smooth`)."""
        centred = self._centred.pop(index, None)
        if image is None or not network:
            return 1.0
        if self._base is not None and self._mean_d is not None:
            if centred is not None:  # about the outputs' running mean, as the noisy frame is about its own
                self._cov[0] += float(np.vdot(image - self._mean_d, centred)) / image.size
                self._cov[1] += 1
                if self._cov[1] == CHUNK:
                    self._covs.append(self._cov[0] / CHUNK)
                    self._cov = [0.0, 0]
                    self._update_gain()
            if self.gain > 1.0:
                before = image.copy()
                correction = smooth(np.subtract(before, self._base), pool)
                correction *= self.gain - 1.0
                image += correction
                self._wait(before)
                return self.gain
        self._wait(image.copy())
        return 1.0

    def to_dict(self) -> dict:
        return {"gain": round(self.gain, 3), "slope": None if self.slope is None else round(self.slope, 3)}

    def _wait(self, output: np.ndarray) -> None:
        """An output (as the network made it) joins the baseline once N//2 + 1 newer ones came."""
        self._waiting.append(output)
        while len(self._waiting) > self.k + 1:
            old = self._waiting.popleft()
            self._seen_base += 1
            if self._base is None or self._mean_d is None or self._spread is None:
                self._base, self._mean_d, self._spread = old.copy(), old.copy(), np.zeros_like(old)
                continue
            # in place, `old` itself as the scratch (it leaves the queue here): five fewer
            # frame-sized temporaries on the frame loop, a few ms a frame at 512²
            step = np.subtract(old, self._mean_d)
            step *= 1.0 / min(self._seen_base, LIVE_MEAN_FRAMES)
            self._mean_d += step
            away = np.subtract(old, self._base, out=old)
            np.abs(away, out=step)
            step -= self._spread
            if self._seen_base <= MEDIAN_START:  # a mean first, then the running median from there
                step *= 1.0 / self._seen_base
                self._spread += step
                away *= 1.0 / self._seen_base
            else:
                step *= 1.0 / LIVE_MEAN_FRAMES
                self._spread += step
                np.sign(away, out=away)
                away *= self._spread
                away *= MEDIAN_STEP
            self._base += away

    def _update_gain(self) -> None:
        if significant(list(self._signals)) and significant(list(self._covs)):
            self.slope = float(np.mean(self._covs) / np.mean(self._signals))
            self.gain = float(min(MAX_GAIN, max(1.0, self.keep / self.slope)))
