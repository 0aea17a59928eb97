"""The sliding window: the last N frames of a stream with their cached G features.

Each frame's G features are computed once, when it arrives, and reused by the N windows it
belongs to. The edge rule decides which frames stand in for neighbours that do not exist (the
first and last N//2 frames of a stream) without ever letting the target frame into its own
window, which the reference implementation does by clamping.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch


def window_indices(t: int, first: int, last: int, k: int) -> list[int]:
    """Frame indices for the 2k+1 positions of the window centred on t, within [first, last].

    A missing neighbour t+d is replaced by its mirror t-d, and if that is missing too, by the
    nearest available frame other than t. Position 0 (the centre) is t itself; its weight in the
    network is 0. The centre never appears at another position unless t is the only frame.
    """
    others = [j for j in range(first, last + 1) if j != t]
    out = []
    for d in range(-k, k + 1):
        i = t + d
        if d != 0 and not first <= i <= last:
            i = t - d
            if not first <= i <= last:
                i = min(others, key=lambda j: (abs(j - (t + d)), j)) if others else t
        out.append(i)
    return out


@dataclass
class WindowEntry:
    index: int
    frame: torch.Tensor  # (C, H, W), normalised, on the compute device
    features: torch.Tensor  # (F, H, W), G of `frame` under the current inference weights


class SlidingWindow:
    """Holds the last `size` frames; `features(t)` stacks the window centred on frame t."""

    def __init__(self, size: int):
        self.size = size
        self.k = size // 2
        self._entries: deque[WindowEntry] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def first(self) -> int:
        return self._entries[0].index

    @property
    def last(self) -> int:
        return self._entries[-1].index

    def append(self, index: int, frame: torch.Tensor, features: torch.Tensor) -> None:
        if self._entries and index != self.last + 1:
            raise ValueError(f"frame {index} does not follow {self.last}")
        self._entries.append(WindowEntry(index, frame, features))

    def _entry(self, index: int) -> WindowEntry:
        return self._entries[index - self.first]

    def indices(self, t: int) -> list[int]:
        return window_indices(t, self.first, self.last, self.k)

    def features(self, t: int) -> torch.Tensor:
        """(1, N, F, H, W) features of the window centred on t."""
        return torch.stack([self._entry(i).features for i in self.indices(t)])[None]

    def frames(self, t: int) -> torch.Tensor:
        """(N, C, H, W) frames of the window centred on t."""
        return torch.stack([self._entry(i).frame for i in self.indices(t)])

    def refresh(self, compute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Recompute every cached feature map, after the inference weights changed."""
        if not self._entries:
            return
        frames = torch.stack([e.frame for e in self._entries])
        feats = compute(frames)
        for entry, f in zip(self._entries, feats):
            entry.features = f

    def clear(self) -> None:
        self._entries.clear()
