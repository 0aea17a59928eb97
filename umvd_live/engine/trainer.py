"""Online, unsupervised training of the UMVD network on the stream itself.

Training windows are drawn from a replay buffer of recent frames: random windows, random patches,
random flips. The target is the noisy centre frame, which the blind network never sees. A
divergence guard keeps the last good weights and rolls back to them, at a lower learning rate,
when the loss turns NaN or explodes or the output collapses to a constant (the reference's
all-ReLU network sometimes falls into an all-black state).
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from umvd_live.engine.model import UMVDNet
from umvd_live.engine.window import block_means, context_blocks, window_indices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerConfig:
    lr: float = 5e-4
    batch: int = 8
    patch: int = 64
    replay_frames: int = 600
    replay_bytes: int = 512 * 2**20
    flips: bool = True
    explode_factor: float = 20.0  # a loss this many times its running mean is an explosion
    collapse_std: float = 1e-4  # output std (normalised units) under which it has collapsed
    snapshot_every: int = 50
    min_lr: float = 1e-6
    # Share of training windows cut as if their segment began just before them (mirrored window
    # edge, short or no context): what the network sees at a stream's start and after a change
    # (`changes`), so it is trained for those moments too, not only for full windows.
    fresh_start: float = 0.1
    favour_recent: float = 0.5  # share of each batch from the newest segment while it is adapting


class ReplayBuffer:
    """The most recent trainable frames, by index, each with its segment; bounded in count and bytes.

    A segment is a run of frames between abrupt changes of the acquisition (`changes`): a training
    window and its context never take frames from two segments, as inference never does."""

    def __init__(self, window: int, capacity: int, context: tuple[int, ...] = (), both_sides: bool = False):
        self.k = window // 2
        self.context = context
        self.both_sides = both_sides  # context blocks from both sides of the window (recorded movies)
        self.reach = self.k + sum(context)  # the farthest frame before a centre its sample uses
        self.capacity = max(capacity, window + sum(context))
        self._frames: OrderedDict[int, tuple[torch.Tensor, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, index: int, frame: torch.Tensor, segment: int = 0) -> None:
        with self._lock:
            self._frames[index] = (frame, segment)
            while len(self._frames) > self.capacity:
                self._frames.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()

    def _centres(self, segment: int | None = None) -> list[int]:
        have = self._frames
        return [t for t, (_, seg) in have.items() if (segment is None or seg == segment) and all(
            (t + d) in have and have[t + d][1] == seg for d in range(-self.k, self.k + 1) if d)]

    def centres(self, segment: int | None = None) -> list[int]:
        """Indices whose whole window (t-k .. t+k) is in the buffer and in one segment (that
        `segment`, if given)."""
        with self._lock:
            return self._centres(segment)

    def sample(self, rng: np.random.Generator, batch: int, patch: int, fresh_start: float = 0.0,
               favour: int | None = None, favour_share: float = 0.0) -> torch.Tensor | None:
        """(B, N + M, C, P, P) random windows and patches: the window's N frames, then the means
        of its M context blocks (`window.context_blocks`); None if no full window exists yet.

        ``fresh_start``: the share of samples whose segment is cut at a random frame before the
        centre, with the live edge rule (`window.window_indices`, mirrored context). ``favour``: a
        segment from which ``favour_share`` of the batch is drawn (the newest, after a change)."""
        with self._lock:  # only references are taken here: `add` on the pushing thread must not wait
            centres = self._centres()
            if not centres:
                return None
            favoured = self._centres(favour) if favour is not None and favour_share > 0 else []
            _, h, w = next(iter(self._frames.values()))[0].shape
            ph, pw = min(patch, h), min(patch, w)
            picks = []
            for _ in range(batch):
                pool = favoured if favoured and rng.random() < favour_share else centres
                t = int(pool[int(rng.integers(len(pool)))])
                seg = self._frames[t][1]
                first = t - self.reach
                if fresh_start > 0 and rng.random() < fresh_start:
                    first = t - int(rng.integers(0, self.reach + 1))
                y = int(rng.integers(0, h - ph + 1))
                x = int(rng.integers(0, w - pw + 1))
                near = {j: self._frames[j][0] for j in range(first, t + self.reach + 1)
                        if j in self._frames and self._frames[j][1] == seg}
                picks.append((t, first, y, x, near))
        out = []
        for t, first, y, x, near in picks:

            def crop(j: int, near: dict = near, y: int = y, x: int = x) -> torch.Tensor:
                return near[j][..., y : y + ph, x : x + pw]

            indices = window_indices(t, max(first, min(near)), t + self.k, self.k)
            window = torch.stack([crop(i) for i in indices])
            if self.context:
                # A cut segment has no frames after the window yet, as live: the context's
                # empty blocks fall back to the neighbours, never to later frames. A recorded
                # movie's segment start (both sides) has its later frames.
                cut = first > t - self.reach and not self.both_sides
                present = {j for j in near if j <= t + self.k} if cut else near
                blocks = context_blocks(t, self.k, self.context, present.__contains__, self.both_sides)
                window = torch.cat([window, block_means(blocks, crop)])
            out.append(window)
        return torch.stack(out)


class OnlineTrainer:
    """Adam on random replay windows, with a rollback guard against divergence."""

    def __init__(self, model: UMVDNet, config: TrainerConfig, device: torch.device, seed: int = 0,
                 bf16: bool = False):
        self.model = model
        self.config = config
        self.device = device
        self.bf16 = bf16  # forward under bfloat16 autocast (weights, gradients and Adam stay float32)
        self.rng = np.random.default_rng(seed)
        # fused: one kernel, not a Python loop over the parameters: the trainer shares the GIL with the frame loop
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
        self.steps = 0
        self.rollbacks = 0
        self.last_loss: float | None = None
        self._loss_ema: float | None = None
        self._out_std_ema: float | None = None
        self._good: tuple[dict, dict] | None = None
        self._snapshot()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _snapshot(self) -> None:
        self._good = (
            {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            copy.deepcopy(self.optimizer.state_dict()),
        )

    def _rollback(self, why: str) -> None:
        assert self._good is not None
        weights, opt_state = self._good
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(opt_state)
        lr = max(self.lr * 0.5, self.config.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.rollbacks += 1
        self._loss_ema = None
        self._out_std_ema = None
        log.warning("training diverged (%s): rolled back to the last good weights, lr now %.2g", why, lr)

    def _augment(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.config.flips:
            return batch
        if self.rng.random() < 0.5:
            batch = batch.flip(-1)
        if self.rng.random() < 0.5:
            batch = batch.flip(-2)
        return batch

    def step(self, replay: ReplayBuffer, favour: int | None = None) -> float | None:
        """One optimisation step; returns the loss, or None if there is nothing to train on.
        ``favour``: a segment to draw `favour_recent` of the batch from (one that is adapting)."""
        c = self.config
        batch = replay.sample(self.rng, c.batch, c.patch, c.fresh_start, favour, c.favour_recent)
        if batch is None:
            return None
        batch = self._augment(batch).to(self.device, non_blocking=True)
        n = self.model.spec.window
        windows, context = batch[:, :n], (batch[:, n:] if self.model.spec.context else None)
        target = windows[:, n // 2]
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(windows, context)
        loss = F.mse_loss(out.float(), target)
        loss_value = float(loss.detach())
        problem = self._diagnose(loss_value, out, target)
        if problem:
            self._rollback(problem)
            return None
        if self.steps % self.config.snapshot_every == 0:
            self._snapshot()  # these weights just produced a healthy output
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        self.last_loss = loss_value
        self._loss_ema = loss_value if self._loss_ema is None else 0.95 * self._loss_ema + 0.05 * loss_value
        return loss_value

    def _diagnose(self, loss: float, out: torch.Tensor, target: torch.Tensor) -> str | None:
        if not math.isfinite(loss):
            return "non-finite loss"
        if self._loss_ema is not None and self.steps > 20 and loss > self.config.explode_factor * self._loss_ema:
            return f"loss {loss:.3g} exploded from {self._loss_ema:.3g}"
        std = float(out.detach().float().std())
        # A fresh network's output is nearly constant too: only an output that had structure
        # and lost it has collapsed.
        if self._out_std_ema is not None and self._out_std_ema > 10 * self.config.collapse_std:
            if std < self.config.collapse_std:
                return "output collapsed to a constant"
        self._out_std_ema = std if self._out_std_ema is None else 0.9 * self._out_std_ema + 0.1 * std
        return None
