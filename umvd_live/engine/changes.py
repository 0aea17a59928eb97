"""Abrupt changes in a stream: the laser, the gain, the stage, the focus, the region of interest.

When the user changes the acquisition, the frames before the change describe another scene (or
the same one in other units): a window or a context block that mixes the two shows a ghost of the
old field, and a normaliser fitted before shows the old brightness. `ChangeDetector` tells, from
cheap per-frame statistics of a coarse copy of each frame, that frame t starts a new *segment*; the
engine then treats t like the first frame of a new stream (`engine.StreamDenoiser`).

Two tests, each against a reference taken from the segment's own recent frames, so a slow drift
(bleaching, focus drift, motion) moves the reference along and raises nothing:
- **intensity**: the robust level (median of the coarse frame) or spread (its 10-90 % range)
  jumped by more than `level_jump` in log units: laser power, PMT gain or offset;
- **content**: the coarse frame's correlation with the reference's mean coarse frame fell far below
  the correlations of the recent frames: a stage move, a focus jump, a new region of interest.

Both thresholds are floors raised by the recent frames' own scatter (`spread_factor` robust
standard deviations), so a noisy stream does not raise false changes: docs/engine.md has the
measurements behind the defaults. A frame is tested as it arrives, before it is normalised, so a
change is acted on at the frame that shows it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from umvd_live.engine.normalization import IMPULSE_RUN

Reason = str  # "intensity" | "content"


@dataclass(frozen=True)
class ChangeConfig:
    enabled: bool = True
    block: int = 8  # side of the coarse grid's blocks, in pixels: insensitive to noise and to motion of a pixel or two
    reference_frames: int = 30  # the recent frames whose statistics are the reference (1 s at 30 Hz)
    min_frames: int = 4  # a segment this young is not tested yet: its reference is not settled
    level_jump: float = 0.2  # |log| change of the level that is a change (x1.22 or /1.22)
    spread_jump: float = 0.5  # |log| change of the spread that is a change (x1.65 or /1.65): the noisier statistic
    decorrelation: float = 4.0  # 1 - r this many times the reference's typical 1 - r is a change
    min_decorrelation: float = 0.15  # ... and at least this much below the typical r
    spread_factor: float = 8.0  # robust standard deviations of the recent values a change must exceed

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Change:
    """Frame `index` starts a new segment, for `reason`; `level_ratio` is its level over the old."""

    index: int
    reason: Reason
    level_ratio: float
    correlation: float

    def to_dict(self) -> dict:
        return asdict(self)


def coarse(frame: np.ndarray, block: int) -> np.ndarray:
    """Block means of a frame (cropped to whole blocks); a small frame gets smaller blocks, so the
    grid keeps 16 a side where it can (percentiles of fewer blocks scatter too much).

    A block above the grid's 99th percentile by more than its 1-99 % range is the mean of its
    pixels but the brightest `IMPULSE_RUN` (the longest spike `normalization.remove_impulses`
    takes): one hot pixel (a PMT spike: 65535 among counts of 20), or a readout spike of two or
    three along a row, lifted its block far above every other and alone made a dim field
    decorrelate from the reference as a stage move does, while a source (a cell, a bead: a spot of
    several pixels) keeps its block bright. Other blocks are as they were (docs/engine.md: the
    same changes on every movie)."""
    h, w = frame.shape
    block = max(1, min(block, h // 16, w // 16))
    h, w = h - h % block, w - w % block
    blocks = np.asarray(frame[:h, :w], dtype=np.float32).reshape(h // block, block, w // block, block)
    grid = blocks.mean(axis=(1, 3))
    floor, top = np.percentile(grid, [1, 99])
    rows, cols = np.nonzero(grid > top + (top - floor))
    if rows.size and block > 1:
        pixels = blocks[rows, :, cols, :].reshape(rows.size, -1)
        drop = min(IMPULSE_RUN, pixels.shape[1] - 1)
        brightest = np.partition(pixels, -drop, axis=1)[:, -drop:]
        grid[rows, cols] = (pixels.sum(axis=1) - brightest.sum(axis=1)) / (pixels.shape[1] - drop)
    return grid


def _robust_sd(values: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denominator if denominator > 0 else 1.0


class ChangeDetector:
    """Tests each frame of one stream against its segment's recent frames (see the module doc)."""

    def __init__(self, config: ChangeConfig | None = None):
        self.config = config or ChangeConfig()
        n = self.config.reference_frames
        self._grids: deque[np.ndarray] = deque(maxlen=n)
        self._levels: deque[float] = deque(maxlen=n)
        self._spreads: deque[float] = deque(maxlen=n)
        self._corrs: deque[float] = deque(maxlen=n)
        self._sum: np.ndarray | None = None  # sum of `_grids`
        self.index = 0
        self.changes: list[Change] = []

    def restart(self) -> None:
        """Forget the reference: the next frame starts a segment (a stream's end, a reset)."""
        self._grids.clear()
        self._levels.clear()
        self._spreads.clear()
        self._corrs.clear()
        self._sum = None

    def observe(self, frame: np.ndarray) -> Change | None:
        """Test the next frame; returns the change it starts, if it starts one."""
        c = self.config
        if not c.enabled:
            self.index += 1
            return None
        grid = coarse(frame, c.block)
        low, level, high = np.percentile(grid, [10, 50, 90])
        level, spread = float(level), float(high - low)
        index, self.index = self.index, self.index + 1
        change = None
        if self._sum is not None and len(self._grids) >= c.min_frames:
            corr = correlation(grid, self._sum / len(self._grids))
            change = self._test(index, level, spread, corr)
        else:
            corr = None
        if change is not None:
            self.restart()
            self.changes.append(change)
        self._remember(grid, level, spread, None if change else corr)
        return change

    def _test(self, index: int, level: float, spread: float, corr: float) -> Change | None:
        c = self.config
        levels, spreads = np.log(np.maximum(self._levels, 1e-12)), np.log(np.maximum(self._spreads, 1e-12))
        ref_level, ref_spread = float(np.median(levels)), float(np.median(spreads))
        jump_level = abs(np.log(max(level, 1e-12)) - ref_level)
        jump_spread = abs(np.log(max(spread, 1e-12)) - ref_spread)
        ratio = float(np.exp(np.log(max(level, 1e-12)) - ref_level))
        # The level's log is a ratio only for data well above zero (raw counts with their offset);
        # about zero (background-subtracted, dF/F, int16 around 0) only the spread speaks of scale.
        positive = float(np.median(self._levels)) > float(np.median(self._spreads)) > 0
        if (positive and jump_level > max(c.level_jump, c.spread_factor * _robust_sd(levels))) or \
                jump_spread > max(c.spread_jump, c.spread_factor * _robust_sd(spreads)):
            return Change(index, "intensity", ratio, corr)
        if len(self._corrs) >= 2:
            corrs = np.asarray(self._corrs)
            typical = float(np.median(corrs))
            drop = max(c.min_decorrelation, (c.decorrelation - 1.0) * (1.0 - typical),
                       c.spread_factor * _robust_sd(corrs))
            if corr < typical - drop:
                return Change(index, "content", ratio, corr)
        return None

    def _remember(self, grid: np.ndarray, level: float, spread: float, corr: float | None) -> None:
        if len(self._grids) == self._grids.maxlen:
            self._sum -= self._grids[0]
        self._grids.append(grid)
        self._sum = grid.copy() if self._sum is None else self._sum + grid
        self._levels.append(level)
        self._spreads.append(spread)
        if corr is not None:
            self._corrs.append(corr)
