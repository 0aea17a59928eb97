"""Quality figures against a simulation's ground truth, and the classical baselines we must beat.

PSNR uses the ground truth's own range (max - min, in ADU) as the peak, so figures do not depend
on the camera offset or the integer type.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.ndimage import gaussian_filter, uniform_filter1d
from skimage.metrics import peak_signal_noise_ratio


def psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    truth = np.asarray(truth, dtype=np.float64)
    return float(
        peak_signal_noise_ratio(truth, np.asarray(estimate, dtype=np.float64), data_range=float(truth.max() - truth.min()))
    )


def activity_fidelity(estimate: np.ndarray, truth: np.ndarray, threshold: float = 0.1) -> tuple[float, float]:
    """How well the *changes* survive, which whole-movie PSNR hides in a mostly static field.

    Activity is each pixel's departure from its temporal median; the active set is where the
    truth's activity exceeds `threshold` x the truth's range (calcium transients, in the
    simulator). Returns (PSNR over the active set, with the whole movie's peak; the slope of the
    estimate's activity regressed on the truth's there: 1 keeps transient amplitudes, < 1 flattens
    them, as heavy temporal smoothing does).
    """
    truth = np.asarray(truth, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    activity = truth - np.median(truth, axis=0)
    peak = float(truth.max() - truth.min())
    active = activity > threshold * peak
    if not active.any():
        raise ValueError("the truth has no activity above the threshold")
    error = (estimate - truth)[active]
    est_activity = (estimate - np.median(estimate, axis=0))[active]
    slope = float(est_activity @ activity[active] / (activity[active] @ activity[active]))
    return 10.0 * float(np.log10(peak * peak / np.mean(error * error))), slope


def temporal_mean(movie: np.ndarray, frames: int = 5) -> np.ndarray:
    """A centred running mean over `frames` frames (edges reflected)."""
    return uniform_filter1d(np.asarray(movie, dtype=np.float32), size=frames, axis=0, mode="reflect")


def best_gaussian(
    movie: np.ndarray,
    truth: np.ndarray,
    sigmas_t: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0),
    sigmas_xy: tuple[float, ...] = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5),
) -> tuple[np.ndarray, tuple[float, float], float]:
    """The 3-D Gaussian filter that the ground truth says is best: an oracle, stronger than any
    filter a user could tune without clean data. Returns (filtered, (sigma_t, sigma_xy), psnr)."""
    movie = np.asarray(movie, dtype=np.float32)
    best = (None, (0.0, 0.0), -np.inf)
    for st, sxy in itertools.product(sigmas_t, sigmas_xy):
        filtered = gaussian_filter(movie, sigma=(st, sxy, sxy), mode="reflect")
        score = psnr(filtered, truth)
        if score > best[2]:
            best = (filtered, (st, sxy), score)
    return best
