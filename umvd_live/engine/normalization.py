"""Per-stream intensity normalisation: a robust offset and scale, fixed once per stream.

The network sees roughly [0, 1] whatever the camera's units, so one learning rate fits every
detector; outputs are mapped back so users get their own units (ADU). The scale is fixed after
the first frame: a moving scale would shift what the online model has learned under it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Normalizer:
    offset: float
    scale: float

    @classmethod
    def fit(cls, frame: np.ndarray, low: float = 0.5, high: float = 99.5) -> Normalizer:
        finite = frame[np.isfinite(frame)] if frame.dtype.kind == "f" else frame
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


def sanitize(frame: np.ndarray) -> tuple[np.ndarray, bool]:
    """Replace NaN/Inf pixels by the frame's finite median. Returns (frame, was_clean).

    A frame that needed this is still denoised (so every input has its output) but is never
    trained on: one poisoned frame must not poison the model.
    """
    if frame.dtype.kind != "f":
        return frame, True
    bad = ~np.isfinite(frame)
    if not bad.any():
        return frame, True
    clean = frame.copy()
    good = frame[~bad]
    clean[bad] = np.median(good) if good.size else 0.0
    return clean, False
