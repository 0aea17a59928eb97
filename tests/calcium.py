"""A small synthetic calcium movie for the final pass's tests (`test_amplitude`, `test_cellblend`):
Gaussian cells with instant rises and exponential decays on a still background of 100."""

from __future__ import annotations

import numpy as np


def calcium_movie(rng: np.random.Generator, frames: int, size: int, *, cells: int, radius: float,
                  margin: float, spike_rate: float, spike_range: tuple[float, float], decay: float) -> np.ndarray:
    """(frames, size, size) float64: ``cells`` blobs of Gaussian ``radius`` at least ``margin`` from
    the edges, each spiking with probability ``spike_rate`` per frame by a height drawn from
    ``spike_range``, decaying with time constant ``decay`` frames."""
    yy, xx = np.mgrid[:size, :size]
    movie = np.full((frames, size, size), 100.0)
    for _ in range(cells):
        cy, cx = rng.uniform(margin, size - margin, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        spikes = (rng.random(frames) < spike_rate) * rng.uniform(*spike_range, frames)
        trace = np.zeros(frames)
        for t in range(frames):
            trace[t] = (trace[t - 1] if t else 0.0) * np.exp(-1 / decay) + spikes[t]
        movie += trace[:, None, None] * blob
    return movie
