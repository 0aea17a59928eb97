"""Live noise figures from the raw stream: a Poisson-Gaussian fit and a region's SNR. No Qt.

Why: while tuning the acquisition (laser power, PMT gain, frame rate, averaging) the operator needs
a number that answers "how many photons am I collecting?" within seconds, from the frames alone.

A photon-counting detector (PMT or camera) followed by a digitiser has a noise variance that grows
linearly with the mean: ``var = gain * (mean - offset) + read_var``. Over the last ~30 frames each
pixel gives one (mean, variance) point; the variance comes from temporal differences of consecutive
frames, which remove the (slow) signal, with each difference image's own mean removed so that a
global intensity change (the laser power being turned) is not counted as noise. Pixels are binned
by intensity and a line is fitted through the bins.

Binning by a noisy mean biases the slope low (the high bins collect pixels whose noise happened
to be high: regression dilution). The frames are therefore split in two halves: pixels are binned
by the mean of one half and measured (mean and variance) on the other, whose noise is independent,
and the other way round.

The line gives ``gain`` (the *apparent* ADU per photon: a PMT's excess noise factor F makes it
F times the mean ADU per photon) and an intercept ``read_var - gain * offset``, which cannot
separate the offset from the read noise. Given the detector's offset (from a dark frame) the read
noise follows; without it the offset is taken where the line reaches zero variance (read noise 0):
that point lies ``read_var / gain`` below the true offset, so the photon count it gives is high by
``read_var / gain**2`` (0.01 photons for a PMT whose read noise is a tenth of one photon's
signal). Photons per pixel per frame = ``(mean - offset) / gain``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Frames of history the estimates use by default (1 s at 30 Hz).
DEFAULT_HISTORY = 30
#: Fewest frames a fit is attempted on (two halves of at least 3 frames: 2 differences each).
MIN_FRAMES = 6
#: Pixels per frame the live figures use at most (a regular stride over the frame or region): the
#: statistics are per-pixel averages, which a regular sample of 65536 pixels estimates as well as
#: a megapixel does, in a fraction of the time (1024x1024 at 30 Hz would not keep up otherwise).
STATS_PIXELS = 256 * 256


def sample_stride(shape: tuple[int, ...], max_pixels: int | None = STATS_PIXELS) -> int:
    """The stride (rows and columns) that leaves at most ``max_pixels`` of a ``shape[-2:]`` frame."""
    if max_pixels is None:
        return 1
    h, w = shape[-2:]
    stride = max(1, math.ceil(math.sqrt(h * w / max_pixels)))
    while math.ceil(h / stride) * math.ceil(w / stride) > max_pixels:
        stride += 1
    return stride


@dataclass(frozen=True)
class NoiseFit:
    """A Poisson-Gaussian fit of the recent raw frames, in the frames' units (ADU)."""

    gain: float  # apparent ADU per photon: slope of the noise variance against the mean
    offset: float  # given, or where the fitted line reaches zero variance (a lower bound)
    offset_given: bool
    read_noise: float  # sqrt of the line's variance at the offset
    photons: float  # apparent photons per pixel per frame, mean over the frame
    mean: float  # mean pixel value over the frames
    r2: float  # quality of the line through the bins (1 = perfect)
    frames: int

    @property
    def valid(self) -> bool:
        return self.gain > 0 and math.isfinite(self.photons)


class RecentFrames:
    """The last ``capacity`` frames of one stream, oldest first; a new frame shape starts afresh."""

    def __init__(self, capacity: int = DEFAULT_HISTORY):
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2, got {capacity}")
        self.capacity = capacity
        self._buf: np.ndarray | None = None
        self._count = 0  # frames pushed since the last clear
        self.clip_range: tuple[float, float] | None = None  # the integer input dtype's range

    def clear(self) -> None:
        self._buf = None
        self._count = 0

    def push(self, frame: np.ndarray) -> None:
        frame = np.asarray(frame)
        if frame.ndim != 2:
            raise ValueError(f"a frame is 2-D, got shape {frame.shape}")
        if self._buf is None or self._buf.shape[1:] != frame.shape:
            self._buf = np.empty((self.capacity, *frame.shape), np.float32)
            self._count = 0
        if frame.dtype.kind in "ui":
            info = np.iinfo(frame.dtype)
            self.clip_range = (float(info.min), float(info.max))
        else:
            self.clip_range = None
        self._buf[self._count % self.capacity] = frame
        self._count += 1

    def __len__(self) -> int:
        return min(self._count, self.capacity)

    @property
    def pushed(self) -> int:
        """Frames pushed since the last clear (or change of shape)."""
        return self._count

    def mean(self) -> np.ndarray | None:
        """The temporal mean of the stored frames (order does not matter: no reordering copy)."""
        if self._buf is None or not len(self):
            return None
        return self._buf[: len(self)].mean(axis=0)

    def frames(self, region: Region | None = None, max_pixels: int | None = None) -> np.ndarray:
        """The stored frames in time order, as a new (T, H, W) float32 array: of ``region`` only
        (None: the whole frame), every ``sample_stride``-th row and column of it so that at most
        ``max_pixels`` remain (None: all)."""
        if self._buf is None:
            return np.empty((0, 0, 0), np.float32)
        n = len(self)
        r0, r1, c0, c1 = clip_region(region, self._buf.shape[1:]) if region is not None else (
            0, self._buf.shape[1], 0, self._buf.shape[2])
        s = sample_stride((r1 - r0, c1 - c0), max_pixels)
        view = self._buf[:, r0:r1:s, c0:c1:s]
        if self._count <= self.capacity:
            return view[:n].copy()
        start = self._count % self.capacity
        return np.concatenate([view[start:], view[:start]])


def temporal_noise_variance(frames: np.ndarray) -> np.ndarray:
    """Per-pixel noise variance from consecutive-frame differences, global changes removed."""
    d = np.diff(np.asarray(frames, np.float32), axis=0)
    d -= d.mean(axis=(1, 2), keepdims=True)
    return np.einsum("tij,tij->ij", d, d, dtype=np.float64) / (2.0 * d.shape[0])


def _binned_points(bin_by: np.ndarray, mean: np.ndarray, var: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin pixels by ``bin_by`` (quantile bins); each bin's average ``mean`` and ``var``.

    The two extreme bins are left out: they collect clipped (at 0) and saturating pixels.
    """
    edges = np.quantile(bin_by, np.linspace(0.0, 1.0, bins + 1))
    idx = np.clip(np.searchsorted(edges, bin_by, side="right") - 1, 0, bins - 1).ravel()
    count = np.bincount(idx, minlength=bins)
    used = count > 0
    mu = np.bincount(idx, weights=mean.ravel(), minlength=bins)[used] / count[used]
    va = np.bincount(idx, weights=var.ravel(), minlength=bins)[used] / count[used]
    if len(mu) > 4:
        mu, va = mu[1:-1], va[1:-1]
    return mu, va


def fit_poisson_gaussian(
    frames: np.ndarray,
    offset: float | None = None,
    bins: int = 32,
    clip_range: tuple[float, float] | None = None,
    max_pixels: int | None = STATS_PIXELS,
) -> NoiseFit:
    """Fit ``var = gain * (mean - offset) + read_var`` to a (T, H, W) stack of raw frames.

    Frames of more than ``max_pixels`` pixels are sampled with a regular stride (`sample_stride`;
    None: every pixel): each pixel gives one (mean, variance) point, and a regular sample of them
    fits the same line.

    Pixels that touch ``clip_range`` (the digitiser's limits; by default the integer dtype's range)
    in any frame are left out: clipping hides their noise. Raises ValueError for fewer than
    `MIN_FRAMES` frames or too few pixels to bin. A flat or noiseless stack gives a fit whose
    ``valid`` is False rather than an exception.
    """
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.shape[0] < MIN_FRAMES:
        raise ValueError(f"need a (T, H, W) stack with T >= {MIN_FRAMES}, got shape {frames.shape}")
    stride = sample_stride(frames.shape, max_pixels)
    frames = frames[:, ::stride, ::stride]
    if frames.shape[1] * frames.shape[2] < 4 * bins:
        raise ValueError(f"need at least {4 * bins} pixels per frame, got {frames.shape[1:]}")
    if clip_range is None and frames.dtype.kind in "ui":
        info = np.iinfo(frames.dtype)
        clip_range = (float(info.min), float(info.max))
    x = frames.astype(np.float32, copy=False)
    unclipped = None
    if clip_range is not None:
        unclipped = (x.min(axis=0) > clip_range[0]) & (x.max(axis=0) < clip_range[1])
        if unclipped.sum() < 4 * bins:
            unclipped = None  # nearly everything clipped: fit what there is rather than nothing
    half = x.shape[0] // 2
    a, b = x[:half], x[half:]
    mean_a, mean_b = a.mean(axis=0, dtype=np.float64), b.mean(axis=0, dtype=np.float64)
    var_a, var_b = temporal_noise_variance(a), temporal_noise_variance(b)
    if unclipped is not None:
        mean_a, mean_b, var_a, var_b = (v[unclipped] for v in (mean_a, mean_b, var_a, var_b))
    mu1, v1 = _binned_points(mean_a, mean_b, var_b, bins)
    mu2, v2 = _binned_points(mean_b, mean_a, var_a, bins)
    mu, var = np.concatenate([mu1, mu2]), np.concatenate([v1, v2])
    overall = float(x.mean(dtype=np.float64))
    if np.ptp(mu) <= 0:
        return NoiseFit(float("nan"), float("nan"), offset is not None, float("nan"), float("nan"),
                        overall, float("nan"), x.shape[0])
    slope, intercept = np.polyfit(mu, var, 1)
    resid = var - (slope * mu + intercept)
    spread = float(((var - var.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / spread if spread > 0 else float("nan")
    given = offset is not None
    if slope <= 0:
        return NoiseFit(float(slope), float(offset) if offset is not None else float("nan"), given, float("nan"),
                        float("nan"), overall, r2, x.shape[0])
    if offset is None:
        offset = -intercept / slope
    read = math.sqrt(max(intercept + slope * offset, 0.0))
    return NoiseFit(
        gain=float(slope),
        offset=float(offset),
        offset_given=given,
        read_noise=read,
        photons=(overall - float(offset)) / float(slope),
        mean=overall,
        r2=r2,
        frames=x.shape[0],
    )


Region = tuple[int, int, int, int]  # (row0, row1, col0, col1), half-open, in pixels


def clip_region(region: Region | None, shape: tuple[int, int]) -> Region:
    """The region inside a frame of ``shape``; the whole frame for None or an empty overlap."""
    h, w = shape
    if region is None:
        return (0, h, 0, w)
    r0, r1, c0, c1 = region
    r0, r1 = max(0, min(r0, h)), max(0, min(r1, h))
    c0, c1 = max(0, min(c0, w)), max(0, min(c1, w))
    if r1 <= r0 or c1 <= c0:
        return (0, h, 0, w)
    return (r0, r1, c0, c1)


def region_snr(frames: np.ndarray, offset: float, region: Region | None = None,
               max_pixels: int | None = STATS_PIXELS) -> float:
    """Signal-to-noise ratio of one pixel in ``region`` over a (T, H, W) stack (a region of more
    than ``max_pixels`` pixels: a regular sample of them, `sample_stride`; None: all).

    Signal: the region's mean above the detector offset; noise: the RMS over the region of each
    pixel's temporal noise (consecutive-frame differences). For raw frames this is the per-pixel
    SNR the detector delivers; for denoised frames the same figure after denoising (residual noise
    and any temporal flicker the denoiser leaves count as noise). NaN when it cannot be measured.
    """
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.shape[0] < 3 or not math.isfinite(offset):
        return float("nan")
    r0, r1, c0, c1 = clip_region(region, frames.shape[1:])
    stride = sample_stride((r1 - r0, c1 - c0), max_pixels)
    part = frames[:, r0:r1:stride, c0:c1:stride].astype(np.float32)
    noise = math.sqrt(float(temporal_noise_variance(part).mean()))
    signal = float(part.mean(dtype=np.float64)) - offset
    return signal / noise if noise > 0 else float("nan")


def region_mean(frame: np.ndarray, region: Region | None = None) -> float:
    """Mean of one frame over ``region`` (the whole frame for None)."""
    r0, r1, c0, c1 = clip_region(region, frame.shape)
    return float(frame[r0:r1, c0:c1].mean(dtype=np.float64))
