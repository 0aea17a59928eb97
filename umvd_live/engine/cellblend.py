"""Cell-scale blend for recorded movies: the outputs' coarse part stacked with a blind temporal mean.

Why: at the scale of a cell the network's residual is spatially correlated (a footprint hardly
averages it away), and it keeps less of the activity's fast part (rises, single transients) than
a plain temporal Gaussian of the noisy frames does, whose noise a footprint averages away. So the
least squared error at that scale lies between the two: each output D_t becomes
``D_t + weight * S(G_t - D_t)``, with S a spatial Gaussian of `blend_px` (about a soma's radius:
the pixels' own detail stays the network's) and G_t the Gaussian-weighted mean of the segment's
*other* noisy frames (temporal sigma in frames). On simulated two-photon movies this raised the
trace correlation by 0.001-0.015 and the amplitude slope by 0.003-0.046 at the same whole-movie
PSNR (docs/benchmarks.md, "Cell-scale blend").

Both the weight and the temporal sigma are measured on the movie, blindly: G_t never contains frame
t and the network's output never sees it, so their difference is independent of frame t's noise,
and the squared distance of ``S(D_t + weight * (G_t - D_t))`` to ``S(noisy_t)`` is its distance to
the (unknown) truth plus a constant (the noise). The weight is that distance's least-squares
minimum, clipped to [0, 1], and the sigma the one of `SIGMAS` whose minimum is lowest: longer at
low photon counts, shorter at high ones or slow frame rates where a long mean would blur the
activity. Blindness is kept as in `amplitude`: the blend of frame t reads frame t only through
the two sums over every frame and pixel of the segment (a weight of about 1 / (frames x pixels)).
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

from umvd_live.engine.outputs import mean_is_nearer

#: Temporal sigmas tried (frames).
SIGMAS = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
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
    sigma_t: float | None  # the blind mean's temporal sigma (frames); None: no blend
    weight: float = 0.0  # the share of the coarse part taken from the blind mean (0: as made)
    reason: str = ""  # why none was applied, where none was
    # frames (of the movie) whose blended output the blind referee found worse than their window's
    # mean: they keep the output as it was
    unblended: tuple[int, ...] = ()

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
                     scored: np.ndarray | None = None, first: int = 0, offset: int = 0,
                     neighbours: Callable[[int], np.ndarray] | None = None) -> CellBlend:
    """Blend one segment's outputs with the blind temporal mean of its noisy frames at scale
    ``scale_px`` (module docstring), in place, and say what was done.

    ``noisy`` holds the segment's (H, W) frames in order and ``denoised`` the outputs of
    ``noisy[offset:offset + len(denoised)]`` (a chunk of a longer segment reads the frames around
    it too), float arrays in the same units that are changed in place; ``scored`` the outputs that
    are the network's (the others, e.g. the referee's window means, are neither measured nor
    changed); ``first`` the first output's frame in the movie, for the record. ``neighbours(j)``:
    the blind mean of output j's window without its frame (the referee's, `outputs`); where given,
    a blended output farther from its noisy frame than that mean is left as it was."""
    n = len(denoised)
    if scale_px <= 0:
        return CellBlend(first, n, None, reason="off")
    if offset < 0 or offset + n > len(noisy):
        raise ValueError(f"outputs {offset}..{offset + n} lie outside the {len(noisy)} noisy frames")
    mask = np.ones(n, bool) if scored is None else np.asarray(scored, bool)
    if mask.shape != (n,):
        raise ValueError(f"scored must hold one flag per output, got shape {mask.shape} for {n}")
    if mask.sum() < MIN_FRAMES:
        return CellBlend(first, n, None, reason=f"too few frames to measure ({int(mask.sum())} < {MIN_FRAMES})")
    best = _fit(noisy, denoised, scale_px, mask, offset)
    if best is None:
        return CellBlend(first, n, None, reason="the blind mean brought the outputs no closer")
    sigma, weight = best
    unblended = _apply(noisy, denoised, scale_px, mask, offset, sigma, weight, neighbours)
    return CellBlend(first, n, sigma, weight, "", tuple(first + j for j in unblended))


def _fit(noisy: Sequence[np.ndarray], denoised: Sequence[np.ndarray], scale_px: float, mask: np.ndarray,
         offset: int) -> tuple[float, float] | None:
    """(sigma, weight) whose blend lies nearest the smoothed noisy frames, or None if none nears them."""
    height, width = np.shape(noisy[0])
    # a grid of the coarse maps, which hold nothing finer than the scale; coarser for long or large movies
    points = len(noisy) * height * width
    step = max(1, int(scale_px // 1.5), math.ceil(math.sqrt(FIT_BYTES_PER_POINT * points / FIT_BYTES)))
    fit_noisy = np.stack([_smooth(f, scale_px)[::step, ::step] for f in noisy])
    fit_out = np.stack([_smooth(denoised[j], scale_px)[::step, ::step] for j in np.flatnonzero(mask).tolist()])
    target = (fit_noisy[offset:offset + len(denoised)][mask] - fit_out).astype(np.float64)
    best: tuple[float, float, float] | None = None  # (the fit's remaining squared distance, sigma, weight)
    for sigma in SIGMAS:
        towards = (blind_temporal_mean(fit_noisy, sigma)[offset:offset + len(denoised)][mask] - fit_out)
        towards = towards.astype(np.float64)
        size, along = float(np.vdot(towards, towards)), float(np.vdot(towards, target))
        if not (math.isfinite(size) and math.isfinite(along)) or size <= 0 or along <= 0:
            continue
        weight = min(along / size, 1.0)
        remaining = -2 * weight * along + weight**2 * size  # plus the constant |target|²
        if best is None or remaining < best[0]:
            best = (remaining, sigma, weight)
    return None if best is None else (best[1], best[2])


def _apply(noisy: Sequence[np.ndarray], denoised: Sequence[np.ndarray], scale_px: float, mask: np.ndarray,
           offset: int, sigma: float, weight: float, neighbours: Callable[[int], np.ndarray] | None) -> list[int]:
    """Blend the scored outputs in order, each from the smoothed noisy frames within the kernel's
    reach (each frame smoothed once, kept while in reach); returns the outputs the referee left as
    they were."""
    kernel, radius = blind_kernel(sigma), kernel_radius(sigma)
    smoothed: dict[int, np.ndarray] = {}
    left = []
    for j in np.flatnonzero(mask).tolist():
        centre = offset + j
        lo, hi = max(0, centre - radius), min(len(noisy), centre + radius + 1)
        for i in [i for i in smoothed if i < lo]:
            del smoothed[i]
        total, norm = None, 0.0
        for i in range(lo, hi):
            share = float(kernel[i - centre + radius])
            if share == 0.0:
                continue
            if i not in smoothed:
                smoothed[i] = _smooth(noisy[i], scale_px)
            if total is None:
                total = share * smoothed[i]
            else:
                total += share * smoothed[i]
            norm += share
        if total is None:  # a segment of one frame
            continue
        frame = denoised[j]
        blended = frame + weight * (total / norm - _smooth(frame, scale_px))
        # the referee's rule: left as it was where the window's blind mean is nearer the noisy frame
        if mean_is_nearer(blended, neighbours(j) if neighbours is not None else None, noisy[centre]):
            left.append(j)
            continue
        frame[...] = blended
    return left


def _smooth(frame: np.ndarray, scale_px: float) -> np.ndarray:
    return ndimage.gaussian_filter(np.asarray(frame, np.float32), scale_px, mode="nearest")
