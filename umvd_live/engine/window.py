"""The sliding window: the last N frames of a stream with their cached G features.

Each frame's G features are computed once, when it arrives, and reused by the N windows it
belongs to. The edge rule decides which frames stand in for neighbours that do not exist (the
first and last N//2 frames of a stream) without ever letting the target frame into its own
window, which the reference implementation does by clamping.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def context_blocks(t: int, k: int, spans: Sequence[int], have: Callable[[int], bool],
                   both_sides: bool = False) -> list[list[int]]:
    """Frame indices of each long-range context block of the window centred on t.

    Block i holds the `spans[i]` frames before block i-1 (block 0 ends just before the window:
    t-k-1). Frames that `have` denies are left out. A block with none left is mirrored to the
    frames after the window (a recorded movie's first frames; a live stream has no such frames
    yet), and failing that stands in as the centre's window neighbours. The centre frame t is never
    in a block, unless it is the stream's only frame (then the window holds nothing else either).

    ``both_sides`` (recorded movies, whose later frames exist): block i takes half its frames from
    before the window and half from after it, at the same distance, so its mean is centred on t.
    A mean of the past alone trails the activity: the network learned to keep a transient up
    while the past block still held it, and outputs lagged the truth by 1.5 frames
    (docs/engine.md, "Context from both sides"). Where one side is missing (a movie's ends) the
    block is the other side's frames.
    """
    neighbours = [t + d for d in range(-k, k + 1) if d and have(t + d)] or [t]
    blocks, reach = [], k
    for span in spans:
        if both_sides:
            before, after = span // 2, span - span // 2
            past = [j for j in range(t - reach - before, t - reach) if have(j)]
            later = [j for j in range(t + reach + 1, t + reach + after + 1) if have(j)]
            blocks.append(past + later or neighbours)
            reach += after
            continue
        past = [j for j in range(t - reach - span, t - reach) if have(j)]
        future = [] if past else [j for j in range(t + reach + 1, t + reach + span + 1) if have(j)]
        blocks.append(past or future or neighbours)
        reach += span
    return blocks


def context_reach(k: int, spans: Sequence[int], both_sides: bool = False) -> int:
    """How many frames on either side of t the window and context blocks of `context_blocks` span:
    the frames a final output at t may depend on."""
    return k + sum(span - span // 2 if both_sides else span for span in spans)


def block_means(blocks: list[list[int]], frame: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """(M, C, H, W): the mean of each block's frames, `frame(j)` giving frame j."""
    return torch.stack([torch.stack([frame(j) for j in block]).mean(0) for block in blocks])


class ContextHistory:
    """The recent normalised frames of a stream, by index: the source of the context blocks.

    A live stream asks for the blocks of t, t+1, t+2, ... in turn, and each block then gains one
    frame and loses one: the block sums are kept and updated by those frames instead of being
    summed afresh (up to 96 frames with `lite`), from the stream's first frames on, while the
    blocks still fill (a block holds the past frames of its span that the stream has: at 512² a
    fresh sum then cost 13-14 ms an output for the first 3 s, and skipped previews). A
    preview that skips a few outputs asks for t, t+3, ...: the sums step over the skipped centres
    the same way (up to `CATCH_UP` of them). A block is summed afresh after a longer jump, and
    every `RESUM_EVERY` frames so float32 rounding cannot accumulate: one block at a time, each at
    its own phase, frame by frame (all three at once, stacked first, stalled the frame loop for
    55-65 ms at 512², a burst of late previews every 8.5 s). A block with no past frame yet (the
    first frames) is `context_blocks`' stand-in, its mean taken afresh.
    """

    RESUM_EVERY = 256
    CATCH_UP = 8

    def __init__(self, k: int, spans: Sequence[int]):
        self.k = k
        self.spans = tuple(spans)
        # The window, the blocks, and the frames that left the oldest block since the last sums.
        self._frames: deque[tuple[int, torch.Tensor]] = deque(maxlen=2 * k + 1 + sum(self.spans) + self.CATCH_UP)
        self._first_seen: int | None = None
        self._sums = torch.empty(0)  # (M, C, H, W): each block's sum of the frames `_held` names
        self._held: list[tuple[int, int] | None] = [None] * len(self.spans)  # per block: frames [lo, hi) in its sum
        self._counts = torch.empty(0)  # (M, 1, 1, 1): the frames in each block's sum, to divide by
        self._counts_of: list[int] = []  # the same as numbers
        self._sums_for: int | None = None  # the t the sums were last made for
        self.resums = 0  # blocks summed afresh (each reads every frame of its block)

    def append(self, index: int, frame: torch.Tensor) -> None:
        if self._frames and index != self._frames[-1][0] + 1:
            raise ValueError(f"frame {index} does not follow {self._frames[-1][0]}")
        if self._first_seen is None:
            self._first_seen = index
        self._frames.append((index, frame))

    def has(self, index: int) -> bool:
        return bool(self._frames) and self._frames[0][0] <= index <= self._frames[-1][0]

    def replace(self, index: int, frame: torch.Tensor) -> None:
        """Hold ``frame`` as frame ``index`` from now on (the copy `normalization.ImpulseScreen`
        gave), in the sums too."""
        old = self._frame(index)
        self._frames[index - self._frames[0][0]] = (index, frame)
        for block, held in enumerate(self._held):
            if held is not None and held[0] <= index < held[1]:
                self._sums[block].add_(frame - old)

    def _frame(self, index: int) -> torch.Tensor:
        return self._frames[index - self._frames[0][0]][1]

    def block_means(self, t: int) -> torch.Tensor:
        """(1, M, C, H, W) means of the context blocks of the window centred on t."""
        if self._first_seen is None:
            raise ValueError("no frame appended yet")
        last = self._sums_for
        resum = last is None or not 0 < t - last <= self.CATCH_UP
        newest = self._frames[-1][1]
        if self._sums.shape[1:] != newest.shape or self._sums.dtype != newest.dtype:
            self._sums = newest.new_zeros((len(self.spans), *newest.shape))
            resum = True
        counts, stand_ins, reach = [], {}, self.k
        for i, span in enumerate(self.spans):
            lo, hi = max(t - reach - span, self._first_seen), t - reach  # the past frames the stream has
            reach += span
            if lo >= hi:  # none yet: the stand-in of `context_blocks`, its mean taken afresh
                self._held[i] = None
                stand_in = context_blocks(t, self.k, self.spans[: i + 1], self.has)[i]
                stand_ins[i] = torch.stack([self._frame(j) for j in stand_in]).mean(0)
                counts.append(1)
                continue
            phase = i * self.RESUM_EVERY // len(self.spans)  # the blocks' turns, spread
            due = last is not None and (last + phase) // self.RESUM_EVERY != (t + phase) // self.RESUM_EVERY
            self._update(i, lo, hi, resum or due)
            counts.append(hi - lo)
        if counts != self._counts_of:  # (M, 1, 1, 1): the means are then one division, not M and a stack
            self._counts = torch.tensor(counts, dtype=self._sums.dtype, device=self._sums.device).view(-1, 1, 1, 1)
            self._counts_of = counts
        means = self._sums / self._counts
        for i, mean in stand_ins.items():
            means[i] = mean
        self._sums_for = t
        return means[None]

    def _update(self, block: int, lo: int, hi: int, afresh: bool) -> None:
        """Make block ``block``'s sum that of frames [lo, hi), from the frames it holds where it can."""
        total, held = self._sums[block], self._held[block]
        if afresh or held is None or lo < held[0] or hi < held[1] or lo - held[0] > self.CATCH_UP:
            total.copy_(self._frame(lo))  # frame by frame: stacking them first copied them all
            for j in range(lo + 1, hi):
                total.add_(self._frame(j))
            self.resums += 1
        else:
            for j in range(held[1], hi):
                total.add_(self._frame(j))
            for j in range(held[0], lo):
                total.sub_(self._frame(j))
        self._held[block] = (lo, hi)

    def clear(self) -> None:
        self._frames.clear()
        self._first_seen = None
        self._sums_for = None
        self._held = [None] * len(self.spans)


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

    def replace(self, index: int, frame: torch.Tensor, features: torch.Tensor) -> None:
        """Hold ``frame`` and its features as frame ``index`` from now on (the copy
        `normalization.ImpulseScreen` gave)."""
        entry = self._entry(index)
        entry.frame, entry.features = frame, features

    def indices(self, t: int) -> list[int]:
        return window_indices(t, self.first, self.last, self.k)

    def features(self, t: int) -> list[torch.Tensor]:
        """The N feature maps (1, F, H, W) of the window centred on t, in order; not copied."""
        return [self._entry(i).features[None] for i in self.indices(t)]

    def frame_list(self, t: int) -> list[torch.Tensor]:
        """The N frames (C, H, W) of the window centred on t, in order; not copied."""
        return [self._entry(i).frame for i in self.indices(t)]

    def frames(self, t: int) -> torch.Tensor:
        """(N, C, H, W) frames of the window centred on t."""
        return torch.stack(self.frame_list(t))

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
