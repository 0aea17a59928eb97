#!/usr/bin/env python
"""Measure the noise statistics of a movie: Poisson-Gaussian fit, temporal whiteness, spatial correlation.

Why: the simulator's defaults must be calibrated on real data, and a denoiser's assumptions
(temporally white, pixel-independent noise) must be checked on each new microscope. Real movies
have no ground truth, so every figure here comes from the noise itself:

* Temporal differences ``d_t = x_t - x_{t-1}`` remove the (slow) signal; for temporally white
  noise ``var(d)/2`` is the per-pixel noise variance.
* Poisson-Gaussian fit: the noise variance grows linearly with the mean,
  ``var = a * (mean - offset) + read_noise**2``. ``a`` is the *apparent* gain in ADU per photon
  (a detector with PMT excess noise factor F and mean gain g per photon shows ``a = F * g``), and
  ``(mean - offset) / a`` the apparent photons per pixel per frame (``F`` times fewer than the
  detected photons). The line alone cannot separate the offset from the read noise: give the
  detector's offset with ``--offset`` (from a dark frame) and the read noise follows from the
  intercept; without it the offset is taken where the line reaches zero variance (read noise 0),
  an upper bound on the offset. (Real movies that were interpolated by motion correction have no
  zero-photon peak left to read the offset from.)
* Temporal whiteness: for white noise the lag-1 correlation of ``d`` is exactly -0.5; the noise's
  own lag-1 autocorrelation is ``rho1 = (2c + 1) / (2c + 2)`` where ``c`` is the measured one
  (assuming the lag-2 autocorrelation is negligible).
* Spatial correlation: the correlation of ``d`` between neighbouring pixels in x and in y (equal
  to the noise's own when the noise is temporally white).

Usage: python tools/noise_stats.py MOVIE.tif [--frames N] [--offset ADU] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class NoiseStats:
    frames: int
    height: int
    width: int
    mean_adu: float
    gain_adu: float  # apparent ADU per photon: slope of the noise variance vs the mean
    intercept_adu2: float  # the fitted line's variance at mean 0
    offset_adu: float  # given, or where the line reaches zero variance (read noise 0)
    offset_given: bool
    read_noise_adu: float  # sqrt(variance of the line at the offset)
    photons: float  # apparent photons per pixel per frame, mean over the movie
    fit_r2: float  # quality of the linear variance-vs-mean fit over the bins
    temporal_rho1: float  # lag-1 autocorrelation of the noise (0 = white)
    spatial_corr_x: float  # neighbour correlation of temporal residuals along x (columns)
    spatial_corr_y: float  # neighbour correlation along y (rows)
    clipped_low: float  # fraction of pixels at 0 (unsigned integer movies)
    clipped_high: float  # fraction at the dtype's maximum (unsigned integer movies)


def _neighbour_corr(d: np.ndarray, axis: int) -> float:
    a = np.moveaxis(d, axis, -1)
    x, y = a[..., :-1], a[..., 1:]
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def variance_line(pixel_mean: np.ndarray, pixel_var: np.ndarray, bins: int = 40) -> tuple[float, float, float]:
    """Fit ``var = slope * mean + intercept`` over quantile bins of the pixel mean: (slope, intercept, R^2).

    The two extreme bins are left out: they hold the clipped and the saturating pixels.
    """
    edges = np.quantile(pixel_mean, np.linspace(0, 1, bins + 1))
    idx = np.clip(np.searchsorted(edges, pixel_mean, side="right") - 1, 0, bins - 1)
    used = [b for b in range(bins) if np.any(idx == b)]
    mu = np.array([pixel_mean[idx == b].mean() for b in used])
    var = np.array([pixel_var[idx == b].mean() for b in used])
    keep = slice(1, len(mu) - 1) if len(mu) > 4 else slice(None)
    slope, intercept = np.polyfit(mu[keep], var[keep], 1)
    resid = var[keep] - (slope * mu[keep] + intercept)
    spread = ((var[keep] - var[keep].mean()) ** 2).sum()
    r2 = 1.0 - float((resid**2).sum() / spread) if spread > 0 else float("nan")
    return float(slope), float(intercept), r2


def noise_statistics(movie: np.ndarray, offset: float | None = None, bins: int = 40) -> NoiseStats:
    """Estimate the noise statistics of a (T, H, W) movie (any real dtype)."""
    if movie.ndim != 3 or movie.shape[0] < 8:
        raise ValueError(f"need a (T, H, W) movie with T >= 8, got shape {movie.shape}")
    t, h, w = movie.shape
    x = movie.astype(np.float32)
    d = np.diff(x, axis=0)
    d -= d.mean(axis=(1, 2), keepdims=True)  # global flicker (laser power) is not pixel noise
    pixel_mean = x.mean(axis=0, dtype=np.float64)
    pixel_var = (d.astype(np.float64) ** 2).mean(axis=0) / 2.0
    slope, intercept, r2 = variance_line(pixel_mean, pixel_var, bins)

    given = offset is not None
    if offset is None:
        offset = -intercept / slope if slope > 0 else float("nan")
    read = float(np.sqrt(max(intercept + slope * offset, 0.0)))

    c = float((d[1:] * d[:-1]).sum() / np.sqrt((d[1:] ** 2).sum() * (d[:-1] ** 2).sum()))
    rho1 = (2 * c + 1) / (2 * c + 2)

    high = np.iinfo(movie.dtype).max if movie.dtype.kind == "u" else None
    return NoiseStats(
        frames=t,
        height=h,
        width=w,
        mean_adu=float(pixel_mean.mean()),
        gain_adu=slope,
        intercept_adu2=intercept,
        offset_adu=float(offset),
        offset_given=given,
        read_noise_adu=read,
        photons=float((pixel_mean.mean() - offset) / slope) if slope > 0 else float("nan"),
        fit_r2=r2,
        temporal_rho1=float(rho1),
        spatial_corr_x=_neighbour_corr(d, 2),
        spatial_corr_y=_neighbour_corr(d, 1),
        clipped_low=float((movie == 0).mean()) if high is not None else 0.0,
        clipped_high=float((movie == high).mean()) if high is not None else 0.0,
    )


def format_stats(name: str, s: NoiseStats) -> str:
    return "\n".join(
        [
            f"{name}: {s.frames} x {s.height} x {s.width}, mean {s.mean_adu:.1f} ADU",
            f"  apparent gain      {s.gain_adu:10.2f} ADU/photon   (fit R^2 {s.fit_r2:.3f})",
            f"  offset             {s.offset_adu:10.1f} ADU          "
            f"({'given' if s.offset_given else 'zero-variance point of the line'})",
            f"  variance line      var = {s.gain_adu:.1f} * mean {s.intercept_adu2:+.4g} ADU^2",
            f"  read noise         {s.read_noise_adu:10.1f} ADU",
            f"  photons            {s.photons:10.3f} per pixel per frame (apparent)",
            f"  temporal lag-1     {s.temporal_rho1:10.3f}              (0 = white)",
            f"  spatial corr x / y {s.spatial_corr_x:10.3f} / {s.spatial_corr_y:.3f}",
            f"  clipped low / high {s.clipped_low:10.4%} / {s.clipped_high:.4%}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    import tifffile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("movie", help="T x H x W TIFF")
    p.add_argument("--frames", type=int, help="use only the first N frames")
    p.add_argument("--offset", type=float, help="the detector's known offset in ADU (from a dark frame)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    movie = tifffile.imread(args.movie)
    if args.frames:
        movie = movie[: args.frames]
    if movie.ndim != 3:
        print(f"error: {args.movie} has shape {movie.shape}; need T x H x W", file=sys.stderr)
        return 2
    stats = noise_statistics(movie, offset=args.offset)
    print(format_stats(args.movie, stats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(stats), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
