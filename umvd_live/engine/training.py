"""`TrainingLoop`: when a stream's network trains, and how its new weights reach inference.

Two schedules, one loop. Inline (files): `steps_per_frame` steps after each pushed frame, on the
pushing thread, so a run is reproducible. Background (live streams): a trainer thread steps
flat out through the warm start, then rests between steps so that it works `live_train_duty` of
the time (more while adapting to a change), in turns with the other engines' trainers on a CPU
(`budget.CpuBudget`), and less whenever the pushing thread is near its limit (`budget.PushLoad`):
`push` then only does inference and keeps the acquisition's pace.

Inference runs on its own copy of the network (`stream.StreamDenoiser`). Every `sync_every`
steps the loop *publishes* a copy of the trainer's running average of its weights
(`OnlineTrainer.average`) into a one-slot double buffer, and the pushing thread *adopts* the
newest between frames, so inference never sees a half-updated model and never waits for a step.
`lock` is held by every step and every read or write of the trainer's weights (saving, loading).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Protocol

from umvd_live.engine.budget import train_duty_cap

if TYPE_CHECKING:
    from umvd_live.engine.config import EngineConfig
    from umvd_live.engine.device import CpuSeat
    from umvd_live.engine.trainer import OnlineTrainer, ReplayBuffer

log = logging.getLogger(__name__)

#: Weights as published: (the trainer's step count, a copy of its state dict).
Published = tuple[int, dict]
#: A failing background step is logged the first time and then once in this many.
FAILED_STEPS_LOGGED_EVERY = 100


class TrainedStream(Protocol):
    """What the loop reads of the stream it trains for (`stream.StreamDenoiser`)."""

    frames_in: int
    segment: int

    @property
    def warm(self) -> bool: ...

    @property
    def adapting(self) -> bool: ...


class TrainingLoop:
    """Trains one stream's network, inline or on a background thread, and publishes its weights.

    Made with the stream; `begin` hands it the trainer and the replay buffer once the stream's
    first frame has built the network."""

    def __init__(self, config: EngineConfig, seat: CpuSeat, stream: TrainedStream):
        self.config = config
        self.seat = seat
        self.stream = stream
        self.trainer: OnlineTrainer | None = None
        self.replay: ReplayBuffer | None = None
        self.paused = False
        self.lock = threading.Lock()
        self._published: Published | None = None
        self._published_at: tuple[int, int] | None = None  # (steps, rollbacks) last published
        self._publish_lock = threading.Lock()
        self._step_credit = 0.0  # inline: steps owed, as steps_per_frame need not be whole
        self._started: float | None = None  # when the first step began
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failed_steps = 0  # background steps that raised (logged, then training went on)

    def begin(self, trainer: OnlineTrainer, replay: ReplayBuffer) -> None:
        """Train ``trainer`` on ``replay``: from now on inline, or on a thread in background mode."""
        self.trainer, self.replay = trainer, replay
        if self.config.train_mode == "background":
            self._thread = threading.Thread(target=self._run_background, name="umvd-trainer", daemon=True)
            self._thread.start()

    def _begun(self) -> tuple[OnlineTrainer, ReplayBuffer]:
        """The trainer and its replay buffer, which `begin` hands over."""
        if self.trainer is None or self.replay is None:
            raise RuntimeError("training has not begun: the stream's first frame begins it")
        return self.trainer, self.replay

    @property
    def steps_per_s(self) -> float:
        elapsed = time.monotonic() - self._started if self._started else 0.0
        return self.trainer.steps / elapsed if self.trainer and elapsed > 0 else 0.0

    def can_train(self) -> bool:
        c = self.config
        return not self.paused and self.stream.frames_in >= min(c.min_train_frames, c.warmup_frames)

    def run(self, n: int) -> int:
        """Run ``n`` steps now (fewer may succeed: none without a full window, or after a rollback);
        publish every `sync_every` steps. Returns the steps that trained."""
        done = 0
        trainer, replay = self._begun()
        with self.lock:
            if self._started is None:
                self._started = time.monotonic()
            for _ in range(n):
                if trainer.step(replay, self.stream.segment if self.stream.adapting else None) is not None:
                    done += 1
                # never the same weights again (nothing to train on): each adoption costs the frame loop
                changed = (trainer.steps, trainer.rollbacks) != self._published_at
                if changed and trainer.steps % self.config.sync_every == 0:
                    self.publish()
        return done

    def after_push(self) -> bool:
        """Inline mode, after each pushed frame: its steps. Returns True when that ended the warm
        start, whose weights the stream adopts at once (`warmup_steps` on the initial burst)."""
        if not self.can_train():
            return False
        c = self.config
        trainer, _ = self._begun()
        if not self.stream.warm and self.stream.frames_in >= c.warmup_frames and trainer.steps < c.warmup_steps:
            # The initial burst is in: finish the warm start before going on.
            self.run(c.warmup_steps - trainer.steps)
            self.publish()
            return True
        self._step_credit += c.steps_per_frame * (2.0 if self.stream.adapting else 1.0)
        n = int(self._step_credit)
        self._step_credit -= n
        if n:
            self.run(n)
        return False

    def _run_background(self) -> None:
        shared = self.seat.device.type == "cpu"  # on a CPU trainers take turns in the budget's slots
        while not self._stop.is_set():
            self.seat.set_threads("train")
            if not self.can_train():
                self._stop.wait(0.01)
                continue
            if shared and not self.seat.acquire(self._stop):
                break
            try:
                started = time.monotonic()
                done = self.run(1)
                busy = time.monotonic() - started
            except Exception:  # a step that fails must not end the stream's training for good
                self.failed_steps += 1
                if self.failed_steps == 1 or self.failed_steps % FAILED_STEPS_LOGGED_EVERY == 0:
                    log.exception("a training step failed (%d so far); training goes on", self.failed_steps)
                done = 0
            finally:
                if shared:
                    self.seat.release()
            if done == 0:
                self._stop.wait(0.005)
            else:
                self._stop.wait(self.rest_after(busy))

    def rest_after(self, busy: float) -> float:
        """Seconds a background trainer rests after a step that took ``busy`` seconds.

        The training budget: once live, leave the rest of the time to inference and to the
        acquisition's other work on the machine (`live_train_duty`, with more active trainers
        than slots each one's share of it; more while adapting to a change); the warm start runs
        flat out. Either way the trainer yields to a frame loop near its limit (`budget.PushLoad`)."""
        c = self.config
        if not self.stream.warm:
            duty = 1.0
        else:
            duty = self.seat.share().train_duty if self.seat.device.type == "cpu" else c.live_train_duty
            if self.stream.adapting:  # catch up with a change: a larger share for a few seconds
                duty = max(duty, min(1.0, duty * c.adapt_train_duty / max(c.live_train_duty, 0.01)))
        duty = min(duty, train_duty_cap(self.seat.budget.push_load.utilisation()))
        return busy * (1.0 / max(duty, 0.01) - 1.0)

    # -- the weight double-buffer ---------------------------------------------------------------
    def publish(self) -> None:
        """Put a copy of the weights inference should use in the slot (replacing any not yet
        adopted): the trainer's running average (`OnlineTrainer.inference_weights`), restarted
        while the stream adapts to a change, so that the new weights are not held back."""
        trainer, _ = self._begun()
        if self.stream.adapting:
            trainer.restart_average()
        published = (trainer.steps, trainer.inference_weights())
        self._published_at = (published[0], self._begun()[0].rollbacks)
        with self._publish_lock:
            self._published = published

    def take_published(self) -> Published | None:
        """The newest published weights not yet taken, if any; the slot is empty afterwards."""
        with self._publish_lock:
            published, self._published = self._published, None
        return published

    # -- the trainer's weights ------------------------------------------------------------------
    def snapshot(self) -> Published:
        """(step, a copy of the weights inference uses: the running average), taken between
        steps: a file is then written from the copy without holding up training. What is saved,
        hashed and kept is the model the outputs come from, and the better start for later."""
        with self.lock:
            trainer, _ = self._begun()
            return trainer.steps, trainer.inference_weights()

    def load(self, state: dict, step: int) -> None:
        """Replace the trainer's weights between steps (`OnlineTrainer.load`), and publish them."""
        trainer, _ = self._begun()
        with self.lock:
            trainer.load(state, step)
            self.publish()

    def close(self) -> None:
        """Stop the background thread (it finishes its step)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
