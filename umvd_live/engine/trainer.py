"""Online, unsupervised training of the UMVD network on the stream itself.

Training windows are drawn from a replay buffer of recent frames: random windows, random patches,
random flips. The target is the noisy centre frame, which the blind network never sees. A
divergence guard keeps the last good weights and rolls back to them, at a lower learning rate,
when the loss turns NaN or explodes or the output collapses to a constant (the reference's
all-ReLU network sometimes falls into an all-black state). A batch that holds values no
measurement has (`normalization.MAX_RANGES`) is skipped instead: it says nothing of the weights.
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

from umvd_live.engine.checkpoint import check_fits
from umvd_live.engine.model import UMVDNet
from umvd_live.engine.normalization import MAX_RANGES
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
    # Steps over which the learning rate ramps up from lr / lr_warmup_steps whenever Adam starts
    # afresh (a new network, a prior, loaded weights): Adam's first steps move every weight by
    # about lr whatever its gradient, which shifted a prior's output level by ~10 % within 8 steps
    # (docs/benchmarks.md, "The first steps from a prior"). 0: no ramp.
    lr_warmup_steps: int = 50
    # Per-step decay of the running average of the weights that inference is given (`average`):
    # from one step to the next the output level moves by a few percent (the batch's noise), and
    # the preview shows each published step's level; the average carries about the last
    # 1 / (1 - decay) steps. 0: inference gets the trainer's own weights.
    average_decay: float = 0.95
    # Share of training windows cut as if their segment began just before them (mirrored window
    # edge, short or no context): what the network sees at a stream's start and after a change
    # (`changes`), so it is trained for those moments too, not only for full windows.
    fresh_start: float = 0.1
    favour_recent: float = 0.5  # share of each batch from the newest segment while it is adapting
    # Share of each batch drawn where the window's neighbours rise above their segment's median
    # (`ReplayBuffer.sample`): activity is a fraction of a percent of a calcium movie's pixels and
    # frames, so uniform patches teach the network little about transients. Each patch still
    # holds 64 blocks of its frame, and quiet blocks are drawn in proportion to their noise, so 1.0
    # leaves no part of a movie untrained (docs/benchmarks.md, "Training where the activity is").
    active_share: float = 1.0


#: Side of the blocks over which `ReplayBuffer` keeps each frame's mean, to find activity cheaply.
ACTIVITY_BLOCK = 8
#: Centres looked at per batch to find activity, and frames of a segment its median is taken over.
ACTIVITY_CANDIDATES = 64
ACTIVITY_MEDIAN_FRAMES = 16
#: A batch out of range (`OnlineTrainer.skipped_batches`) is logged the first time, then once in this many.
SKIPPED_LOGGED_EVERY = 100


class ReplayBuffer:
    """The most recent trainable frames, by index, each with its segment; bounded in count and bytes.

    A segment is a run of frames between abrupt changes of the acquisition (`changes`): a training
    window and its context never take frames from two segments, as inference never does. Frames
    come tested for isolated impulses (`normalization.ImpulseScreen`: a live stream's on the frame
    loop, a recorded movie's in `offline.pretrain`)."""

    def __init__(self, window: int, capacity: int, context: tuple[int, ...] = (), both_sides: bool = False):
        self.k = window // 2
        self.context = context
        self.both_sides = both_sides  # context blocks from both sides of the window (recorded movies)
        self.reach = self.k + sum(context)  # the farthest frame before a centre its sample uses
        self.capacity = max(capacity, window + sum(context))
        self._frames: OrderedDict[int, tuple[torch.Tensor, int]] = OrderedDict()
        # Each frame's means over ACTIVITY_BLOCK² blocks, in rows of one tensor (a row per frame
        # held), so that a batch's search for activity indexes it instead of stacking frames.
        self._block_means: torch.Tensor | None = None
        self._row: dict[int, int] = {}  # frame index -> its row
        self._free_rows: list[int] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, index: int, frame: torch.Tensor, segment: int = 0) -> None:
        blocks = F.avg_pool2d(frame[None].float(), ACTIVITY_BLOCK, ceil_mode=True)[0, 0]
        with self._lock:
            self._frames[index] = (frame, segment)
            while len(self._frames) > self.capacity:
                self._forget(next(iter(self._frames)))
            if self._block_means is None:  # a stream's frames keep one shape (`StreamDenoiser` checks)
                self._block_means = torch.empty((self.capacity, *blocks.shape))
                self._free_rows = list(range(self.capacity - 1, -1, -1))
            row = self._row.get(index)  # a frame added again keeps its row
            if row is None:
                row = self._row[index] = self._free_rows.pop()
            self._block_means[row] = blocks

    def _forget(self, index: int) -> None:
        del self._frames[index]
        row = self._row.pop(index, None)
        if row is not None:
            self._free_rows.append(row)

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()
            self._block_means, self._row, self._free_rows = None, {}, []

    def _centres(self, segment: int | None = None) -> list[int]:
        have = self._frames
        return [t for t, (_, seg) in have.items() if (segment is None or seg == segment) and all(
            (t + d) in have and have[t + d][1] == seg for d in range(-self.k, self.k + 1) if d)]

    def centres(self, segment: int | None = None) -> list[int]:
        """Indices whose whole window (t-k .. t+k) is in the buffer and in one segment (that
        `segment`, if given)."""
        with self._lock:
            return self._centres(segment)

    def _activity_rows(self, rng: np.random.Generator, centres: list[int]) -> tuple[list[int], list[list[int]],
                                                                                     list[list[int]]]:
        """For `ACTIVITY_CANDIDATES` random centres (so a step costs the same whatever the buffer
        holds): the centres, the rows of their window's neighbours and the rows of about
        `ACTIVITY_MEDIAN_FRAMES` frames spread over their segment, in `_block_means`. Taken with
        the lock held; the rows are read after it is let go, when `add` may have given a few of
        them to newer frames: that only shifts a draw's weights, never what a sample holds."""
        chosen = rng.choice(len(centres), min(len(centres), ACTIVITY_CANDIDATES), replace=False)
        candidates = [centres[i] for i in chosen]
        row = self._row
        offsets = [d for d in range(-self.k, self.k + 1) if d]
        segment_rows: dict[int, list[int]] = {}
        for j, (_, seg) in self._frames.items():
            segment_rows.setdefault(seg, []).append(row[j])
        for seg, rows in segment_rows.items():
            segment_rows[seg] = rows[:: max(1, len(rows) // ACTIVITY_MEDIAN_FRAMES)]
        return (candidates, [[row[t + d] for d in offsets] for t in candidates],
                [segment_rows[self._frames[t][1]] for t in candidates])

    @staticmethod
    def _active_picks(rng: np.random.Generator, means: torch.Tensor, candidates: list[int], near_rows: list[list[int]],
                      segment_rows: list[list[int]], n: int, size: tuple[int, int],
                      patch: tuple[int, int]) -> list[tuple[int, int, int]]:
        """``n`` (centre, y, x) patch corners drawn where the window's neighbours are above their
        segment's median, in proportion to the square of that excess, block by block
        (`_activity_rows` gives the rows of ``means``). A few tensor calls, not one per frame:
        the trainer's Python holds up the frame loop (the GIL).

        Only the neighbours are looked at, never the centre: weighting by a function of the
        network's inputs leaves the best answer for each input as it was (the mean of the centre
        given the inputs, so no bias towards bright outputs) and only spends more of the training
        where the answer is hard."""
        near = means[torch.tensor(near_rows)].mean(1)  # (candidates, by, bx)
        medians: dict[tuple[int, ...], torch.Tensor] = {}
        for rows in map(tuple, segment_rows):
            if rows not in medians:
                medians[rows] = means[list(rows)].median(0).values
        base = torch.stack([medians[tuple(rows)] for rows in segment_rows])
        # squared in float64: one huge pixel (say 1e30 after a flat-field division) overflows
        # float32, and inf / inf would make the draw's probabilities NaN
        excess = (near - base).clamp_min(0.0).flatten(1).double().numpy() ** 2  # (candidates, blocks)
        excess[~np.isfinite(excess)] = 0.0
        totals = excess.sum(1)
        total = totals.sum()
        if not (np.isfinite(total) and total > 0):
            return []  # the batch is drawn uniformly
        (h, w), (ph, pw), nbx, b = size, patch, near.shape[2], ACTIVITY_BLOCK
        picks = []
        for c in rng.choice(len(candidates), size=n, p=totals / total):  # a centre, then a block in it
            by, bx = divmod(int(rng.choice(excess.shape[1], p=excess[c] / totals[c])), nbx)
            # a patch corner that puts the block inside the patch, as far as the frame allows
            ylo, yhi = max(0, min(by * b + b, h) - ph), max(0, min(h - ph, by * b))
            xlo, xhi = max(0, min(bx * b + b, w) - pw), max(0, min(w - pw, bx * b))
            picks.append((candidates[c], int(rng.integers(ylo, yhi + 1)), int(rng.integers(xlo, xhi + 1))))
        return picks

    def sample(self, rng: np.random.Generator, batch: int, patch: int, fresh_start: float = 0.0,
               favour: int | None = None, favour_share: float = 0.0,
               active_share: float = 0.0) -> torch.Tensor | None:
        """(B, N + M, C, P, P) random windows and patches: the window's N frames, then the means
        of its M context blocks (`window.context_blocks`); None if no full window exists yet.

        ``fresh_start``: the share of samples whose segment is cut at a random frame before the
        centre, with the live edge rule (`window.window_indices`, mirrored context). ``favour``: a
        segment from which ``favour_share`` of the batch is drawn (the newest, after a change).
        ``active_share``: the share of samples drawn where activity is (`_active_picks`)."""
        with self._lock:  # only references are taken here: `add` on the pushing thread must not wait
            centres = self._centres()
            if not centres:
                return None
            favoured = self._centres(favour) if favour is not None and favour_share > 0 else []
            _, h, w = next(iter(self._frames.values()))[0].shape
            ph, pw = min(patch, h), min(patch, w)
            active = int(rng.binomial(batch, active_share)) if active_share > 0 else 0
            searches = []  # the favoured segment keeps its share of the active samples too
            if active and self._block_means is not None:
                in_favoured = int(rng.binomial(active, favour_share)) if favoured else 0
                searches = [(self._activity_rows(rng, pool), n)
                            for pool, n in ((favoured, in_favoured), (centres, active - in_favoured)) if n]
            means = self._block_means
        hot = [pick for rows, n in searches if means is not None
               for pick in self._active_picks(rng, means, *rows, n, (h, w), (ph, pw))]
        with self._lock:
            # `add` may have dropped the oldest frames meanwhile (the lock was let go): a centre
            # still held keeps its later frames, and a window cut at its start is mirrored
            centres = [t for t in centres if t in self._frames]
            favoured = [t for t in favoured if t in self._frames]
            if not centres:
                return None
            picks = []
            for i in range(batch):
                if i < len(hot) and hot[i][0] in self._frames:  # (not dropped from the buffer meanwhile)
                    t, y, x = hot[i]
                else:
                    pool = favoured if favoured and rng.random() < favour_share else centres
                    t = int(pool[int(rng.integers(len(pool)))])
                    y = int(rng.integers(0, h - ph + 1))
                    x = int(rng.integers(0, w - pw + 1))
                seg = self._frames[t][1]
                first = t - self.reach
                if fresh_start > 0 and rng.random() < fresh_start:
                    first = t - int(rng.integers(0, self.reach + 1))
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
                # Past blocks only (live): no frame after the window, as live inference has none
                # (`ContextHistory`), so an empty block falls back to the neighbours, never to
                # later frames. Both sides (a recorded movie): every frame of the segment is there.
                present = near if self.both_sides else {j for j in near if j <= t + self.k}
                blocks = context_blocks(t, self.k, self.context, present.__contains__, self.both_sides)
                window = torch.cat([window, block_means(blocks, crop)])
            out.append(window)
        return torch.stack(out)


def fused_adam(device: torch.device) -> bool:
    """Whether this torch has a fused Adam for ``device`` (on a CPU only from torch 2.4; Adam
    itself asks the same function)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a private helper: a torch without it gets the default implementation
        return False
    return device.type in _get_fused_kernels_supported_devices()


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
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=fused_adam(device))
        self.steps = 0
        self._lr = config.lr  # the rate once ramped up (halved by each rollback)
        self._fresh_steps = 0  # steps since Adam started afresh: where the ramp is
        #: The running average of the weights since the last `restart_average` (None: none yet).
        self.average: dict[str, torch.Tensor] | None = None
        self.rollbacks = 0
        #: Batches not trained on because they held NaN, inf or values beyond `MAX_RANGES` in the
        #: network's units: frames the stream sanitised never do (`normalization.sanitize`), but
        #: anything added to a replay buffer is drawn.
        self.skipped_batches = 0
        self.last_loss: float | None = None
        self._loss_ema: float | None = None
        self._out_std_ema: float | None = None
        self._good: tuple[dict, dict] | None = None
        self._snapshot()

    @property
    def lr(self) -> float:
        """The learning rate once ramped up (`TrainerConfig.lr_warmup_steps`)."""
        return self._lr

    def _ramp_lr(self) -> None:
        ramp = self.config.lr_warmup_steps
        lr = self._lr * min(1.0, (self._fresh_steps + 1) / ramp) if ramp else self._lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def load(self, state: dict, step: int) -> None:
        """Replace the weights (CheckpointError, and nothing changed, unless ``state`` fits the
        network) and start the guard and Adam afresh on them: the last good snapshot, the moments
        and the running means were the old weights', and a rollback would bring those back."""
        check_fits(state, self.model.state_dict())
        self.model.load_state_dict(state)
        self.steps = step
        self.optimizer.state.clear()
        self._fresh_steps = 0
        self.restart_average()
        self._loss_ema = self._out_std_ema = None
        self._snapshot()

    def restart_average(self) -> None:
        """Start the running average afresh at the next step: after new weights (loaded, rolled
        back), and while the stream adapts to a change, whose weights must not lag."""
        self.average = None

    @torch.no_grad()
    def _update_average(self) -> None:
        decay = self.config.average_decay
        if decay <= 0:
            return
        state = self.model.state_dict()
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in state.items()}
            return
        floats = [k for k, v in state.items() if v.is_floating_point()]
        torch._foreach_lerp_([self.average[k] for k in floats], [state[k] for k in floats], 1.0 - decay)

    def inference_weights(self) -> dict[str, torch.Tensor]:
        """A copy of what inference should use: the running average of the weights, or the
        trainer's own before there is one (or with `TrainerConfig.average_decay` 0)."""
        source = self.average if self.average is not None else self.model.state_dict()
        return {k: v.detach().clone() for k, v in source.items()}

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
        self._lr = lr = max(self._lr * 0.5, self.config.min_lr)
        self.restart_average()  # (it may hold the weights that diverged)
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
        batch = replay.sample(self.rng, c.batch, c.patch, c.fresh_start, favour, c.favour_recent, c.active_share)
        if batch is None:
            return None
        batch = self._augment(batch).to(self.device, non_blocking=True)
        in_range = batch.abs().amax() <= MAX_RANGES  # (read with the loss: one wait for the device)
        n = self.model.spec.window
        windows, context = batch[:, :n], (batch[:, n:] if self.model.spec.context else None)
        target = windows[:, n // 2]
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(windows, context)
        loss = F.mse_loss(out.float(), target)
        loss_value = float(loss.detach())
        if not bool(in_range):  # (NaN too) the data's fault, not the weights': no rollback, no lower rate
            self.skipped_batches += 1
            if self.skipped_batches == 1 or self.skipped_batches % SKIPPED_LOGGED_EVERY == 0:
                log.warning("a training batch held NaN, inf or values beyond %.3g in normalised units: "
                            "skipped (%d so far)", MAX_RANGES, self.skipped_batches)
            return None
        problem = self._diagnose(loss_value, out, target)
        if problem:
            self._rollback(problem)
            return None
        if self.steps % self.config.snapshot_every == 0:
            self._snapshot()  # these weights just produced a healthy output
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._ramp_lr()
        self.optimizer.step()
        self.steps += 1
        self._fresh_steps += 1
        self._update_average()
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
