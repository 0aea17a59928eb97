"""Cell-scale blend for recorded movies: the outputs' coarse part stacked with a blind temporal mean.

Why: at the scale of a cell the network's residual is spatially correlated (it averages away over
a footprint no better than over one pixel), and it keeps less of the activity's fast part (rises,
single transients) than a plain temporal Gaussian of the noisy frames does, whose noise a
footprint averages away. So the least squared error at that scale lies between the two: each
output D_t becomes ``D_t + weight * S(G_t - D_t)``, with S a spatial Gaussian of `blend_px`
(about a soma's radius: the pixels' own detail stays the network's) and G_t the Gaussian-weighted
mean of the segment's *other* noisy frames (temporal sigma in frames). On simulated two-photon
movies this raised the trace correlation by 0.001-0.015 and the amplitude slope by 0.003-0.046 at
the same whole-movie PSNR (docs/benchmarks.md, "Cell-scale blend").

Both the weight and the temporal sigma are measured on the movie, blindly: G_t never contains frame
t and the network's output never sees it, so their difference is independent of frame t's noise,
and the squared distance of ``S(D_t + weight * (G_t - D_t))`` to ``S(noisy_t)`` is its distance to
the (unknown) truth plus a constant (the noise). The weight is that distance's least-squares
minimum, clipped to [0, 1], and the sigma the one of `SIGMAS` whose minimum is lowest: longer at
low photon counts, shorter at high ones or slow frame rates where a long mean would blur the
activity. Blindness is kept as in `amplitude`: the blend of frame t reads frame t only through
the two sums over every frame and pixel of the segment (a weight of about 1 / (frames x pixels)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Temporal sigmas tried (frames).
SIGMAS = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
#: A kernel reaches this many sigmas on either side of its frame.
TRUNCATE = 4.0
#: The fewest of a segment's scored frames the weights are measured on (the restoration's too:
#: `amplitude.CHUNK` x 3).
MIN_FRAMES = 96


@dataclass(frozen=True)
class CellBlend:
    """What the blend did to one segment of a movie."""

    first: int  # the segment's first frame
    frames: int
    sigma_t: float | None  # the blind mean's temporal sigma (frames); None: no blend
    weight: float = 0.0  # the share of the coarse part taken from the blind mean (0: as made)
    reason: str = ""  # why none was applied, where none was

    @property
    def reach(self) -> int:
        """Frames on either side of a frame that its blended output depends on (0: none)."""
        return 0 if self.sigma_t is None or self.weight == 0 else kernel_radius(self.sigma_t)


def kernel_radius(sigma: float) -> int:
    return int(TRUNCATE * sigma + 0.5)


def blind_temporal_mean(frames: np.ndarray, sigma: float) -> np.ndarray:
    """(T, H, W) -> each frame's Gaussian-weighted mean of the other frames (never itself),
    renormalised where the kernel passes the ends of ``frames``."""
    radius = kernel_radius(sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    kernel[radius] = 0.0
    total = ndimage.convolve1d(frames, kernel, axis=0, mode="constant")
    weights = ndimage.convolve1d(np.ones(len(frames), np.float32), kernel, mode="constant")
    return total / weights[:, None, None]


def blend_blind_mean(noisy: Sequence[np.ndarray], denoised: Sequence[np.ndarray], *, scale_px: float,
                     scored: np.ndarray | None = None, first: int = 0) -> CellBlend:
    """Blend one segment's outputs with the blind temporal mean of its noisy frames at scale
    ``scale_px`` (module docstring), in place, and say what was done.

    ``noisy`` and ``denoised`` are the segment's (H, W) frames in order, in the same units, the
    outputs float arrays that are changed in place; ``scored`` the frames whose outputs are the
    network's (the others, e.g. the referee's window means, are neither measured nor changed);
    ``first`` the segment's first frame in the movie, for the record."""
    n = len(denoised)
    if scale_px <= 0:
        return CellBlend(first, n, None, reason="off")
    mask = np.ones(n, bool) if scored is None else np.asarray(scored, bool)
    if mask.sum() < MIN_FRAMES:
        return CellBlend(first, n, None, reason=f"too few frames to measure ({int(mask.sum())} < {MIN_FRAMES})")
    smooth_noisy = _smoothed(noisy, scale_px)
    smooth_out = _smoothed(denoised, scale_px)
    # The fit on every other pixel of the coarse maps: they hold nothing finer than the scale.
    step = max(1, int(scale_px // 1.5))
    fit_noisy, fit_out = smooth_noisy[:, ::step, ::step], smooth_out[:, ::step, ::step]
    target = (fit_noisy - fit_out)[mask].astype(np.float64)
    best: tuple[float, float, float] | None = None  # (the fit's remaining squared distance, sigma, weight)
    for sigma in SIGMAS:
        towards = (blind_temporal_mean(fit_noisy, sigma) - fit_out)[mask].astype(np.float64)
        size = float(np.vdot(towards, towards))
        if size <= 0:
            continue
        along = float(np.vdot(towards, target))
        weight = min(along / size, 1.0)
        if weight <= 0:
            continue
        remaining = -2 * weight * along + weight**2 * size  # plus the constant |target|²
        if best is None or remaining < best[0]:
            best = (remaining, sigma, weight)
    if best is None:
        return CellBlend(first, n, None, reason="the blind mean brought the outputs no closer")
    _, sigma, weight = best
    towards = blind_temporal_mean(smooth_noisy, sigma) - smooth_out
    for t in np.flatnonzero(mask).tolist():
        frame = denoised[t]
        frame += weight * towards[t]  # float arrays, changed in place
    return CellBlend(first, n, sigma, weight)


def _smoothed(frames: Sequence[np.ndarray], scale_px: float) -> np.ndarray:
    return np.stack([ndimage.gaussian_filter(np.asarray(f, np.float32), scale_px, mode="nearest") for f in frames])
