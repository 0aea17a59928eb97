"""The CPU budget of a daemon, divided among the engines of its live streams (issue #16).

Each `StreamDenoiser` uses three kinds of threads: the thread that pushes frames (G, the window,
the bookkeeping), its inference workers (D's passes side by side, `EngineConfig.workers`) and, in
background mode, a trainer. Before the budget, every engine sized these from the machine's cores
on its own, as if it were alone: on 2 cores, three streams warming up meant three trainers flat out
beside the inference.

What runs at once, and so what the budget divides:

- **Inference is time-shared, not divided.** The daemon pushes every stream's frames from its one
  processing thread, one engine at a time, so at any moment only one engine's pushing thread and
  workers compute. Each engine therefore gets the inference layout a single stream gets:
  half of the budget's cores per thread (all of them without a background trainer) and two
  workers from 2 cores on. Dividing it by the number of streams would only make every push slower.
- **Training is divided.** Trainers run in their own threads, all at once. The budget's training
  half (``cores // 2``, at least 1) is cut into *slots*: a trainer steps only while it holds one
  (`CpuBudget.acquire`, first come first served, so trainers take turns), each slot with
  ``train_threads`` torch threads. One stream: one slot with all of the training half, as before.
  On 2 cores: one slot of one thread, whatever the number of streams.
- **The live duty is shared.** Once live, a trainer rests between its steps so that it works
  ``live_train_duty`` (0.3) of the time. With more active trainers than slots each one's duty is
  scaled by ``slots / active``, so the live training of all streams together stays at
  ``live_train_duty`` of each slot. The warm start still runs flat out, but only in its slot.

`divide` is the rule, as a pure function (unit-tested); `CpuBudget` applies it to the engines that
joined it and re-divides when they come and go (threads are applied by each thread itself at its
next step, since torch's thread count is per OS thread). Every live trainer also yields
to the pushing thread: past a load of `LOAD_EASY` its duty falls (`PushLoad`, `train_duty_cap`),
so that training never makes the previews fall behind. The budget counts threads, it does not
pin them: ``--cpu-budget 1`` on a 2-core machine leaves the other core to the acquisition.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

#: The pushing thread's load (`PushLoad`) up to which a background trainer keeps its whole duty,
#: and from which it keeps only `LOADED_TRAIN_DUTY`: between the two its duty falls linearly.
#: Measured at 256², 30 Hz on 2 cores (docs/benchmarks.md, "Training that yields to the frame
#: loop"): lite's pushes fill 0.45-0.6 of the frame interval once the trainer rests.
LOAD_EASY = 0.6
LOAD_FULL = 0.9
LOADED_TRAIN_DUTY = 0.1


class PushLoad:
    """The share of the last `span_s` seconds that the pushing thread spent in pushes, or their
    passes ran on the workers after the push returned (`StreamDenoiser.push_many` with
    ``wait=False``): how near the frame loop is to falling behind. One per budget, since a daemon
    pushes every stream from one thread; every engine of the budget records its pushes here. A trainer that runs beside
    inference on a small CPU slows every push; past `LOAD_EASY` the trainers give the frame loop
    the time it needs (`train_duty_cap`): a preview that falls behind is worse than a model that
    adapts a little later. A push that brings a backlog (several frames, or previews to skip)
    counts as a full load. Thread-safe. The daemon's `CapacityMonitor` reports a load too, over
    5 s and with the skipped outputs' cost, for its status; this one is the engine's own (an
    engine also runs without a daemon) and short, so that a trainer yields within a second."""

    def __init__(self, span_s: float = 1.0):
        self.span_s = span_s
        self._busy: deque[tuple[float, float]] = deque()  # (start, end) of recent pushes
        self._lock = threading.Lock()

    def record(self, start: float, end: float, behind: bool = False) -> None:
        """A push ran from ``start`` to ``end`` (monotonic s); ``behind``: it brought a backlog."""
        with self._lock:
            self._busy.append((start - self.span_s if behind else start, end))
            while self._busy and self._busy[0][1] < end - self.span_s:
                self._busy.popleft()

    def utilisation(self, now: float | None = None) -> float:
        """The share of the last `span_s` covered by pushes and their passes (overlaps once)."""
        now = time.monotonic() if now is None else now
        since = now - self.span_s
        with self._lock:
            spans = sorted((max(start, since), end) for start, end in self._busy if end > since)
        busy, covered = 0.0, since
        for start, end in spans:
            if end > covered:
                busy += end - max(start, covered)
                covered = end
        return min(1.0, busy / self.span_s)


def train_duty_cap(load: float) -> float:
    """A background trainer's largest duty when the pushing thread is ``load`` busy (`PushLoad`)."""
    if load <= LOAD_EASY:
        return 1.0
    if load >= LOAD_FULL:
        return LOADED_TRAIN_DUTY
    return 1.0 - (1.0 - LOADED_TRAIN_DUTY) * (load - LOAD_EASY) / (LOAD_FULL - LOAD_EASY)


#: A trainer that used a slot within this many seconds counts as active for the shared duty.
ACTIVE_TRAINER_S = 2.0
#: Longest single wait for a slot before the waiting trainer checks whether it should stop.
SLOT_POLL_S = 0.1


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class CpuShare:
    """What one engine may use, out of a budget of ``cores``."""

    cores: int  # the budget
    engines: int  # engines sharing it
    infer_threads: int  # torch threads of the pushing thread and of each inference worker
    workers: int  # D's passes side by side (the default; EngineConfig.workers overrides)
    train_threads: int  # torch threads of a trainer
    train_slots: int  # trainers that step at once, all engines together
    train_duty: float  # a live trainer's share of its time (its steps, not its rests)

    def to_dict(self) -> dict:
        return asdict(self)


def divide(cores: int, engines: int = 1, active_trainers: int | None = None, *, background: bool = True,
           live_train_duty: float = 0.3) -> CpuShare:
    """The share of each of ``engines`` engines in a budget of ``cores``, with ``active_trainers``
    of them training now (default: all). One engine gets exactly the layout engines had before
    the budget: in background mode half of the cores per inference thread, two workers from
    2 cores on, a trainer with the other half at ``live_train_duty`` once live; inline (files,
    no trainer thread) every core, one worker."""
    if cores < 1:
        raise ValueError(f"the CPU budget must be >= 1 core, got {cores}")
    engines = max(1, engines)
    active = engines if active_trainers is None else max(1, active_trainers)
    if not background:
        return CpuShare(cores, engines, cores, 1, cores, 1, 1.0)
    half = max(1, cores // 2)
    train_threads = max(1, half // min(engines, half))
    slots = max(1, half // train_threads)
    duty = live_train_duty * min(1.0, slots / active)
    return CpuShare(cores, engines, half, 2 if cores >= 2 else 1, train_threads, slots, duty)


class CpuBudget:
    """A budget of CPU cores shared by engines (one per live stream of a daemon).

    An engine `join`s when it is made and `leave`s when it closes; `share` is its current share.
    Its trainer steps between `acquire` and `release` of a training slot, and rests afterwards
    for `train_duty`. Thread-safe."""

    def __init__(self, cores: int | None = None):
        self.cores = cpu_cores() if cores is None else int(cores)
        if self.cores < 1:
            raise ValueError(f"the CPU budget must be >= 1 core, got {self.cores}")
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._members: dict[int, str] = {}  # member id -> name (for status)
        self._last_slot: dict[int, float] = {}  # member id -> when it last held a slot
        self._waiting: deque[int] = deque()  # member ids in the order they asked for a slot
        self._holders: set[int] = set()
        self.push_load = PushLoad()  # the pushing thread's (every engine's pushes)
        self.slot_waits = 0  # times a trainer found every slot taken
        self.slot_wait_s = 0.0  # and waited this long in all

    # ---- membership -------------------------------------------------------------------------
    def join(self, name: str = "") -> int:
        with self._cond:
            member = next(self._ids)
            self._members[member] = name
            self._cond.notify_all()
            return member

    def leave(self, member: int) -> None:
        with self._cond:
            self._members.pop(member, None)
            self._last_slot.pop(member, None)
            if member in self._waiting:
                self._waiting.remove(member)
            self._holders.discard(member)
            self._cond.notify_all()

    @property
    def engines(self) -> int:
        return len(self._members)

    def active_trainers(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._cond:
            return sum(1 for t in self._last_slot.values() if now - t <= ACTIVE_TRAINER_S)

    def share(self, background: bool = True, live_train_duty: float = 0.3, member: int | None = None) -> CpuShare:
        """The current share of each engine; ``member`` counts as an active trainer."""
        now = time.monotonic()
        with self._cond:
            active = {m for m, t in self._last_slot.items() if now - t <= ACTIVE_TRAINER_S}
            if member is not None:
                active.add(member)
            return divide(self.cores, len(self._members), len(active), background=background,
                          live_train_duty=live_train_duty)

    # ---- training slots ---------------------------------------------------------------------
    def acquire(self, member: int, stop: threading.Event | None = None) -> bool:
        """Wait for a training slot, first come first served; False if ``stop`` was set first."""
        started = time.monotonic()
        waited = False
        with self._cond:
            self._waiting.append(member)
            try:
                while True:
                    if stop is not None and stop.is_set():
                        return False
                    if self._waiting[0] == member and len(self._holders) < self._slots():
                        break
                    waited = True
                    self._cond.wait(SLOT_POLL_S)
            finally:
                self._waiting.remove(member)
                self._cond.notify_all()  # the next in line may take another free slot
            self._holders.add(member)
            self._last_slot[member] = time.monotonic()
            if waited:
                self.slot_waits += 1
                self.slot_wait_s += time.monotonic() - started
            return True

    def release(self, member: int) -> None:
        with self._cond:
            self._holders.discard(member)
            if member in self._members:
                self._last_slot[member] = time.monotonic()
            self._cond.notify_all()

    def _slots(self) -> int:
        return divide(self.cores, len(self._members)).train_slots

    # ---- status -----------------------------------------------------------------------------
    def summary(self) -> dict:
        share = self.share()
        with self._cond:
            return {
                "cores": self.cores,
                "engines": len(self._members),
                "active_trainers": self.active_trainers(),
                "infer_threads": share.infer_threads,
                "workers": share.workers,
                "train_threads": share.train_threads,
                "train_slots": share.train_slots,
                "train_slots_busy": len(self._holders),
                "trainers_waiting": len(self._waiting),
                "train_duty": round(share.train_duty, 4),
                "push_load": round(self.push_load.utilisation(), 3),
                "slot_waits": self.slot_waits,
                "slot_wait_s": round(self.slot_wait_s, 3),
            }
