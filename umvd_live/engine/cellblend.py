"""Cell-scale blend for recorded movies: the outputs' coarse part stacked with a blind temporal mean.

Why: at the scale of a cell the network's residual is spatially correlated (a footprint hardly
averages it away), and it keeps less of the activity's fast part (rises, single transients) than
a plain temporal Gaussian of the noisy frames does, whose noise a footprint averages away. So the
least squared error at that scale lies between the two: each output D_t becomes
``D_t + weight * S(G_t - D_t)``, with S a smoothing over `blend_px` that stays within the sources
a mean output draws (`GuidedSmoothing`; about a soma's radius: the pixels' own detail stays the
network's) and G_t the Gaussian-weighted mean of the segment's
*other* noisy frames (temporal sigma in frames). On simulated two-photon movies this raised the
trace correlation by 0.001-0.015 and the amplitude slope by 0.003-0.046 at the same whole-movie
PSNR (docs/benchmarks.md, "Cell-scale blend").

Both the weight and the temporal sigma are measured on the movie, blindly, **for each region of
the field** (`FIT_PX`): G_t never contains frame t and the network's output never sees it, so
their difference is independent of frame t's noise, and the squared distance of
``S(D_t + weight * (G_t - D_t))`` to ``S(noisy_t)`` is its distance to the (unknown) truth plus a
constant (the noise). Summed over the segment's frames and a region around each pixel, the weight
is that distance's least-squares minimum, clipped to [0, 1], and the sigma the one of `SIGMAS`
whose minimum is lowest: longer for faint sources and at low photon counts, shorter for bright
ones, fast transients or slow frame rates, where a long mean would blur the activity. One weight
and sigma for the whole field fitted its average source: fitted per region, the trace correlation
rose by 0.002-0.005 and the PSNR by 0.12-0.17 dB on the same network outputs (docs/benchmarks.md,
"Cell-scale blend, fitted per region"). Blindness is kept as in `amplitude`: the blend of frame
t reads frame t only through sums over every frame of the segment and the pixels of a region (a
weight of about 1 / (frames x region's pixels)), and the guide of its smoothing holds no output
within the network's reach of it (`_parts`).
Each blended output then faces the referee's rule, as a restored one does: where it lies farther
from its noisy frame than the window's blind mean, the output is left as it was.

Memory: the fit runs on a grid of the coarse maps (`FIT_BYTES` at most) and the blend is applied
output by output from the smoothed frames within the kernel's reach, so a long movie needs little
more than its outputs and frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from umvd_live.engine.amplitude import mean_frames
from umvd_live.engine.outputs import mean_is_nearer

#: Temporal sigmas tried (frames). Up to 12: a blend then reads no further than 48 frames either
#: side, within a file's network and context (51), so the restoration's baselines need no more
#: frames for it (`blend.reach`); fitted per region, some region of nearly every movie took the
#: longest, and 16 made every segment of fewer than 242 frames too short to restore, for nothing
#: (the scores with 12 the same within 0.0005 of trace correlation and 0.02 dB).
SIGMAS = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
#: The region each pixel's weight and sigma are fitted over (Gaussian sigma, pixels of the frame):
#: about a soma's radius, so neighbouring sources of other brightness or kinetics fit their own;
#: the segment's frames make the sums steady. On the simulated movies 1, 2, 3 and 4 px gave the
#: same scores within 0.0015 of trace correlation, 16 px little more than one fit for the field;
#: below 3 px an output's dependence on its own frame through the sums passed 2e-3 (tested).
FIT_PX = 3.0
#: The guided smoothing's regulariser (`GuidedSmoothing`), a share of its guide's variance over
#: the field: local contrast of the guide below it counts as flat and is smoothed across, above it
#: as a source's edge. On a simulated movie 0.001 and 0.01 gave the same scores, 0.1 a trace
#: correlation 0.0002 lower, 1 (nearly a plain Gaussian) 0.0018 lower.
GUIDE_EPS = 0.01
#: A kernel reaches this many sigmas on either side of its frame.
TRUNCATE = 4.0
#: The fewest of a segment's scored frames the weights are measured on (as many as the
#: restoration needs in all, `amplitude`'s 3 x `CHUNK`).
MIN_FRAMES = 96
#: The bytes the fit may take (the grid of its coarse maps coarsens for long or large movies).
FIT_BYTES = 512 * 2**20
#: Bytes per point of that grid the fit holds at once: the noisy and output maps (float32), a
#: blind mean with its convolution's temporaries, and the two float64 differences.
FIT_BYTES_PER_POINT = 36


@dataclass(frozen=True)
class CellBlend:
    """What the blend did to one segment of a movie."""

    first: int  # the segment's first output frame (of the movie)
    frames: int
    sigmas: tuple[float, ...] = ()  # the temporal sigmas (frames) the regions' blind means took; (): no blend
    weight: float = 0.0  # the share of the coarse part taken from the blind means, mean over the field (0: as made)
    reason: str = ""  # why none was applied, where none was
    # frames (of the movie) whose blended output the blind referee found worse than their window's
    # mean: they keep the output as it was
    unblended: tuple[int, ...] = ()

    @property
    def sigma_t(self) -> float | None:
        """The longest temporal sigma a region's blind mean took (None: no blend)."""
        return max(self.sigmas) if self.sigmas else None

    @property
    def reach(self) -> int:
        """Frames on either side of a frame that its blended output depends on (0: none)."""
        return 0 if self.sigma_t is None or self.weight == 0 else kernel_radius(self.sigma_t)


def kernel_radius(sigma: float) -> int:
    return int(TRUNCATE * sigma + 0.5)


def blind_kernel(sigma: float) -> np.ndarray:
    """The temporal Gaussian over frames -radius..radius, its centre (the frame itself) 0."""
    radius = kernel_radius(sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    kernel[radius] = 0.0
    return kernel


def blind_temporal_mean(frames: np.ndarray, sigma: float) -> np.ndarray:
    """(T, H, W) -> each frame's Gaussian-weighted mean of the other frames (never itself),
    renormalised where the kernel passes the ends of ``frames``."""
    kernel = blind_kernel(sigma)
    total = ndimage.convolve1d(frames, kernel, axis=0, mode="constant")
    weights = ndimage.convolve1d(np.ones(len(frames), np.float32), kernel, mode="constant")
    total /= np.maximum(weights, np.finfo(np.float32).tiny)[:, None, None]
    return total


def blend_blind_mean(noisy: Sequence[np.ndarray], denoised: Sequence[np.ndarray], *, scale_px: float,
                     reach: int = 0, scored: np.ndarray | None = None, first: int = 0, offset: int = 0,
                     neighbours: Callable[[int], np.ndarray] | None = None) -> CellBlend:
    """Blend one segment's outputs with the blind temporal mean of its noisy frames at scale
    ``scale_px`` (module docstring), in place, and say what was done.

    ``noisy`` holds the segment's (H, W) frames in order and ``denoised`` the outputs of
    ``noisy[offset:offset + len(denoised)]`` (a chunk of a longer segment reads the frames around
    it too), float arrays in the same units that are changed in place; ``reach`` the frames on
    either side of a frame that its output depends on (the smoothing's guides stay beyond it,
    `_parts`); ``scored`` the outputs that are the network's (the others, e.g. the referee's
    window means, are neither measured nor changed); ``first`` the first output's frame in the
    movie, for the record. ``neighbours(j)``: the blind mean of output j's window without its
    frame (the referee's, `outputs`); where given, a blended output farther from its noisy frame
    than that mean is left as it was."""
    n = len(denoised)
    if scale_px <= 0:
        return CellBlend(first, n, reason="off")
    if offset < 0 or offset + n > len(noisy):
        raise ValueError(f"outputs {offset}..{offset + n} lie outside the {len(noisy)} noisy frames")
    mask = np.ones(n, bool) if scored is None else np.asarray(scored, bool)
    if mask.shape != (n,):
        raise ValueError(f"scored must hold one flag per output, got shape {mask.shape} for {n}")
    if mask.sum() < MIN_FRAMES:
        return CellBlend(first, n, reason=f"too few frames to measure ({int(mask.sum())} < {MIN_FRAMES})")
    parts = _parts(denoised, mask, scale_px, reach)
    fit = _fit(noisy, denoised, parts, mask, offset)
    if fit is None:
        return CellBlend(first, n, reason="the blind mean brought the outputs no closer")
    unblended = _apply(noisy, denoised, parts, mask, offset, fit, neighbours)
    return CellBlend(first, n, fit.sigmas, float(fit.weight.mean()), unblended=tuple(first + j for j in unblended))


@dataclass(frozen=True)
class _Fit:
    """Each pixel's blend: its weight and the index in `sigmas` of its blind mean's sigma."""

    sigmas: tuple[float, ...]  # those some region took
    pick: np.ndarray  # (H, W) int
    weight: np.ndarray  # (H, W) float32, 0 where no blind mean brought the outputs closer


def _fit(noisy: Sequence[np.ndarray], denoised: Sequence[np.ndarray], parts: list[_Part], mask: np.ndarray,
         offset: int) -> _Fit | None:
    """Each region's (sigma, weight) whose blend lies nearest the smoothed noisy frames there, or
    None if none nears them anywhere."""
    height, width = np.shape(noisy[0])
    # a grid of the coarse maps (their sums over regions need no finer one); coarser for long or
    # large movies
    radius = kernel_radius(max(SIGMAS))
    points = max(min(len(noisy), part.stop - part.start + 2 * radius) for part in parts) * height * width
    step = max(1, int(parts[0].smooth.scale_px), math.ceil(math.sqrt(FIT_BYTES_PER_POINT * points / FIT_BYTES)))
    along = np.zeros((len(SIGMAS), -(-height // step), -(-width // step)))
    size = np.zeros_like(along)
    for part in parts:  # each with its own smoothing, over the noisy frames its outputs' blind means read
        low, high = max(0, offset + part.start - radius), min(len(noisy), offset + part.stop + radius)
        outputs = [j for j in range(part.start, part.stop) if mask[j]]
        if not outputs:
            continue
        fit_noisy = np.stack([part.smooth(noisy[i])[::step, ::step] for i in range(low, high)])
        fit_out = np.stack([part.smooth(denoised[j])[::step, ::step] for j in outputs])
        rows = np.asarray(outputs) + offset - low
        target = (fit_noisy[rows] - fit_out).astype(np.float64)
        if not np.isfinite(target).all():  # an output not a number: no sum says anything
            return None
        for k, sigma in enumerate(SIGMAS):
            towards = (blind_temporal_mean(fit_noisy, sigma)[rows] - fit_out).astype(np.float64)
            along[k] += np.einsum("tij,tij->ij", towards, target)  # the sums over the frames
            size[k] += np.einsum("tij,tij->ij", towards, towards)
    gains, weights = [], []
    for k in range(len(SIGMAS)):  # then over each point's region
        region_along = ndimage.gaussian_filter(along[k], FIT_PX / step, mode="nearest")
        region_size = ndimage.gaussian_filter(size[k], FIT_PX / step, mode="nearest")
        usable = (region_size > 0) & (region_along > 0)
        weight = np.where(usable, np.minimum(region_along / np.where(usable, region_size, 1.0), 1.0), 0.0)
        gains.append(weight * (2 * region_along - weight * region_size))  # how much nearer: the constant |target|² less
        weights.append(weight)
    pick = np.argmax(np.stack(gains), 0)
    weight = np.take_along_axis(np.stack(weights), pick[None], 0)[0]
    if not np.any(weight > 0):
        return None
    # back to the frame's pixels: each pixel takes its grid point's fit
    rows, cols = np.arange(height) // step, np.arange(width) // step
    pick, weight = pick[np.ix_(rows, cols)], weight[np.ix_(rows, cols)].astype(np.float32)
    taken = sorted(set(pick[weight > 0].tolist()))
    index = np.zeros(len(SIGMAS), np.intp)
    index[taken] = np.arange(len(taken))
    return _Fit(tuple(SIGMAS[i] for i in taken), index[pick], weight)


def _apply(noisy: Sequence[np.ndarray], denoised: Sequence[np.ndarray], parts: list[_Part], mask: np.ndarray,
           offset: int, fit: _Fit, neighbours: Callable[[int], np.ndarray] | None) -> list[int]:
    """Blend the scored outputs in order, each region from its sigma's blind mean of the smoothed
    noisy frames within that kernel's reach (each frame smoothed once per part and kept, while in
    reach, as the pixels of each region: a region's mean sums its own pixels, not the frame's);
    returns the outputs the referee left as they were."""
    kernels = [blind_kernel(sigma) for sigma in fit.sigmas]
    regions = [fit.pick == i for i in range(len(fit.sigmas))]
    reach = max(kernel_radius(sigma) for sigma in fit.sigmas)
    left = []
    for part in parts:
        smoothed: dict[int, list[np.ndarray]] = {}  # frame -> its smoothed pixels, region by region
        for j in [j for j in range(part.start, part.stop) if mask[j]]:
            centre = offset + j
            for i in [i for i in smoothed if i < centre - reach]:
                del smoothed[i]
            towards = np.empty(np.shape(denoised[j]), np.float32)
            for k, (kernel, region) in enumerate(zip(kernels, regions)):
                radius = len(kernel) // 2
                total, norm = None, 0.0
                for i in range(max(0, centre - radius), min(len(noisy), centre + radius + 1)):
                    share = float(kernel[i - centre + radius])
                    if share == 0.0:
                        continue
                    if i not in smoothed:
                        smoothed_frame = part.smooth(noisy[i])
                        smoothed[i] = [smoothed_frame[pixels] for pixels in regions]
                    if total is None:
                        total = share * smoothed[i][k]
                    else:
                        total += share * smoothed[i][k]
                    norm += share
                if total is None:  # a segment of one frame
                    break
                towards[region] = total / norm
            else:
                frame = denoised[j]
                blended = frame + fit.weight * (towards - part.smooth(frame))
                # the referee's rule: left as it was where the window's blind mean is nearer the noisy frame
                if mean_is_nearer(blended, neighbours(j) if neighbours is not None else None, noisy[centre]):
                    left.append(j)
                    continue
                frame[...] = blended
    return left


@dataclass(frozen=True)
class _Part:
    """Outputs ``start`` to ``stop`` (excluded) and the smoothing they are blended with."""

    start: int
    stop: int
    smooth: GuidedSmoothing


def _parts(denoised: Sequence[np.ndarray], mask: np.ndarray, scale_px: float, reach: int) -> list[_Part]:
    """The segment's first and second half, each smoothed within the sources its guide draws: the
    mean of the other half's scored outputs beyond ``reach`` frames of every output of its own
    (none: a plain smoothing), so that no output's guide holds an output that saw its frame."""
    n = len(denoised)
    middle = n // 2
    parts = []
    for start, stop, others in ((0, middle, range(middle + reach, n)), (middle, n, range(0, max(0, middle - reach)))):
        guiding = np.zeros(n, bool)
        guiding[others] = True
        guiding &= mask
        guide = mean_frames(denoised, guiding) if guiding.any() else np.zeros(np.shape(denoised[0]))
        parts.append(_Part(start, stop, GuidedSmoothing(guide, scale_px)))
    return parts


class GuidedSmoothing:
    """Frames smoothed over ``scale_px`` within the sources a guide image draws, not across their
    edges: the guided filter of He, Sun & Tang (2013, IEEE TPAMI 35:1397) with Gaussian windows,
    the guide a mean of outputs (`_parts`: of the other half of the segment, beyond the network's
    reach, so that it holds no output that saw the frames it smooths for).

    Why: a plain Gaussian mixed each cell's blind mean with its neighbours' and the neuropil's,
    so a cell's trace took part of theirs. Within the sources (and 2 px instead of a Gaussian's
    3), on the same network outputs of nine simulated movies, the trace correlation changed by
    -0.0007 to +0.0035 and the whole-movie PSNR by 0 to +0.08 dB (docs/benchmarks.md,
    "Cell-scale blend within the sources, and a smooth baseline"). A constant stays as it is;
    where the guide is flat (its local variance under `GUIDE_EPS` of its variance over the field)
    the filter is a plain Gaussian of about ``scale_px * sqrt(2)``. Hand-written (four scipy
    Gaussian filters a frame): no library of the stack has one (OpenCV's is in the opencv-contrib
    build)."""

    def __init__(self, guide: np.ndarray, scale_px: float):
        guide = np.asarray(guide, np.float32)
        spread = float(guide.std())
        self.scale_px = scale_px
        self._guide = (guide - guide.mean()) / spread if spread > 0 else np.zeros_like(guide)
        self._mean = self._gaussian(self._guide)
        self._variance = self._gaussian(self._guide * self._guide) - self._mean ** 2 + GUIDE_EPS

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame, np.float32)
        mean = self._gaussian(frame)
        slope = (self._gaussian(self._guide * frame) - self._mean * mean) / self._variance
        return self._gaussian(slope) * self._guide + self._gaussian(mean - slope * self._mean)

    def _gaussian(self, image: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(image, self.scale_px, mode="nearest")
