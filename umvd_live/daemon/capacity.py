"""What the daemon infers when it cannot infer everything, and how it knows it is over capacity.

`plan_inference` decides, for one batch of frames drained from the inbox, which frames' outputs
the preview infers and which it skips (their windows and the trainer still see them). The rule,
across all streams of the batch at once (issue #16: several channels, planes and positions of
one acquisition are streams of their own):

1. Every frame of a stream that a sink owes (a recording) is inferred: recordings stay lossless.
   The time that backlog takes is spent first.
2. Every stream's newest round of frames (`run_length`: the windows its engine denoises side by
   side) is inferred: no stream ever starves.
3. The older rounds of the preview streams come next, in turn across the streams, the nearest to
   the present first and each stream in proportion to its frames in the batch (so every stream
   shows the same fraction of its frames; with equal rates this is round-robin), while their
   estimated time, with the owed backlog of rule 1, stays within the catch-up budget
   (``--catchup-ms``). Ties go to the streams in turn (``rotate``), not always to the first.

One stream alone is inferred exactly as by the per-stream rule before: its newest round, then
older rounds while their cost stays within the budget.

`CapacityMonitor` turns what each batch took into the daemon's load: (time spent processing +
estimated time of the skipped outputs) / elapsed time, over the last few seconds. Above 1 the
streams ask for more than the machine does; the lag (how long the oldest waiting frame had
waited when it was taken) catches the case where nothing may be skipped (recorded streams) and
the inbox grows instead. Over capacity is entered at load >= 1 with outputs skipped in the
window (busy all the time without skipping is at capacity, not past it: everything still comes
out), or at lag >= 1 s, and left at load < 0.9 and lag < 0.5 s (hysteresis: one warning when it
goes over, one when it recovers).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

#: Seconds of batches the load is measured over.
CAPACITY_WINDOW_S = 5.0
#: Measured seconds needed before the daemon may call itself over capacity (start-up noise).
MIN_SPAN_S = 1.0
#: Load and lag at which the daemon goes over capacity, and below which it is back within.
OVER_LOAD = 1.0
RECOVER_LOAD = 0.9
OVER_LAG_S = 1.0
RECOVER_LAG_S = 0.5


@dataclass(frozen=True)
class Plan:
    infer: list[bool]  # per frame of the batch, in arrival order
    skipped_cost_s: float  # estimated time of the skipped outputs (what the preview gave up)
    skipped: dict[str, int]  # skipped outputs per stream


def plan_inference(streams: Sequence[str], round_cost_s: Mapping[str, float | None],
                   owed: Callable[[str], bool], run_length: int, budget_s: float, rotate: int = 0) -> Plan:
    """Which frames of a drained batch to infer. ``streams[i]`` is the stream of frame i (arrival
    order); ``round_cost_s[s]`` the measured time of one round of ``run_length`` windows of stream
    s (None: not measured yet, e.g. in its warm start: all of its frames are inferred)."""
    run_length = max(1, run_length)
    positions: dict[str, list[int]] = {}
    for i, stream in enumerate(streams):
        positions.setdefault(stream, []).append(i)
    infer = [True] * len(streams)
    spent = 0.0
    order = list(positions)
    if order:
        rotate %= len(order)
        order = order[rotate:] + order[:rotate]
    candidates: list[tuple[float, int, int, str]] = []  # (fraction, round, turn, stream)
    for turn, stream in enumerate(order):
        cost = round_cost_s.get(stream)
        n = len(positions[stream])
        rounds = -(-n // run_length)
        if cost is None or rounds <= 1:
            continue
        if owed(stream):
            spent += (rounds - 1) * cost
            continue
        idx = positions[stream]
        for rank in range(run_length, n):  # rank 0: the newest frame
            infer[idx[n - 1 - rank]] = False
        candidates.extend((r / rounds, r, turn, stream) for r in range(1, rounds))
    candidates.sort()
    for _, r, _, stream in candidates:
        cost = round_cost_s[stream]
        assert cost is not None
        if spent + cost > budget_s + 1e-9:  # sums of costs: not one rounding error from the budget
            break
        spent += cost
        idx = positions[stream]
        n = len(idx)
        for rank in range(r * run_length, min((r + 1) * run_length, n)):
            infer[idx[n - 1 - rank]] = True
    skipped: dict[str, int] = {}
    skipped_cost = 0.0
    for stream, idx in positions.items():
        count = sum(not infer[i] for i in idx)
        if count:
            skipped[stream] = count
            skipped_cost += count / run_length * (round_cost_s[stream] or 0.0)
    return Plan(infer, skipped_cost, skipped)


@dataclass(frozen=True)
class Transition:
    over: bool  # True: just went over capacity; False: just came back within it
    load: float
    lag_s: float
    duration_s: float  # how long the episode that just ended lasted (recoveries)
    skipped: dict[str, int]  # preview outputs skipped per stream during that episode (recoveries)


class CapacityMonitor:
    """The daemon's load over the last `CAPACITY_WINDOW_S`, and whether it is over capacity."""

    def __init__(self, window_s: float = CAPACITY_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._batches: deque[tuple[float, float, float]] = deque()  # (end, busy s, skipped cost s)
        self._first: float | None = None
        self._open: float | None = None  # when the batch being processed began (`begin_batch`)
        self.lag_s = 0.0  # the oldest frame's wait when the last batch was taken from the inbox
        self._lag_at = 0.0
        self.over = False
        self.since: float | None = None  # clock time the current episode began
        self.since_wall: float | None = None  # and as Unix time
        self.episodes = 0
        self.over_s_total = 0.0  # seconds over capacity, finished episodes
        self._skipped_episode: dict[str, int] = {}

    def begin_batch(self, started: float) -> None:
        """A batch is being processed from ``started`` on: a load read before it ends (a status
        answered mid-batch) counts its time so far as busy, not as idle."""
        self._open = started

    def note_batch(self, started: float, ended: float, skipped_cost_s: float, lag_s: float,
                   skipped: Mapping[str, int] | None = None, count_busy: bool = True) -> None:
        """One processed batch: it took ``ended - started`` (not counted when ``count_busy`` is
        False: a stream's network was being built), skipped outputs whose inference would have
        taken ``skipped_cost_s``, and its oldest frame had waited ``lag_s`` in the inbox."""
        self._open = None
        if self._first is None:
            self._first = started
        self._batches.append((ended, (ended - started) if count_busy else 0.0, skipped_cost_s))
        self.lag_s, self._lag_at = lag_s, ended
        if self.over:
            for stream, n in (skipped or {}).items():
                self._skipped_episode[stream] = self._skipped_episode.get(stream, 0) + n
        self._trim(ended)

    def note_idle(self) -> None:
        """Nothing is waiting in the inbox now: no lag, whatever the last batch had."""
        self.lag_s = 0.0

    def _trim(self, now: float) -> None:
        while self._batches and self._batches[0][0] < now - self.window_s:
            self._batches.popleft()

    def _span(self, now: float) -> float:
        first = self._first if self._first is not None else self._open
        return 0.0 if first is None else min(self.window_s, now - first)

    def skipping(self, now: float | None = None) -> bool:
        """Whether outputs were skipped within the window."""
        now = self._clock() if now is None else now
        self._trim(now)
        return any(skipped > 0 for *_, skipped in self._batches)

    def load(self, now: float | None = None) -> float:
        now = self._clock() if now is None else now
        self._trim(now)
        span = self._span(now)
        if span <= 0:
            return 0.0
        busy = sum(busy + skipped for _, busy, skipped in self._batches)
        if self._open is not None:
            busy += min(now - self._open, self.window_s)
        return busy / span

    def lag(self, now: float | None = None) -> float:
        """The last batch's lag; once nothing has come for a while, nothing waits: 0."""
        now = self._clock() if now is None else now
        return self.lag_s if now - self._lag_at <= self.window_s else 0.0

    def update(self, now: float | None = None) -> Transition | None:
        """Re-evaluate; a `Transition` when the daemon just went over capacity or came back."""
        now = self._clock() if now is None else now
        load, lag = self.load(now), self.lag(now)
        if not self.over:
            if self._span(now) >= MIN_SPAN_S and ((load >= OVER_LOAD and self.skipping(now)) or lag >= OVER_LAG_S):
                self.over = True
                self.since, self.since_wall = now, time.time()
                self.episodes += 1
                self._skipped_episode = {}
                return Transition(True, load, lag, 0.0, {})
            return None
        if load < RECOVER_LOAD and lag < RECOVER_LAG_S:
            assert self.since is not None
            duration = now - self.since
            self.over, self.since, self.since_wall = False, None, None
            self.over_s_total += duration
            return Transition(False, load, lag, duration, dict(self._skipped_episode))
        return None

    def snapshot(self, now: float | None = None) -> dict:
        now = self._clock() if now is None else now
        return {
            "over": self.over,
            "load": round(self.load(now), 3),
            "lag_ms": round(1000.0 * self.lag(now), 1),
            "since": self.since_wall,
            "over_s": round(now - self.since, 3) if self.since is not None else 0.0,
            "episodes": self.episodes,
            "over_s_total": round(self.over_s_total + (now - self.since if self.since is not None else 0.0), 3),
            "skipped_while_over": dict(self._skipped_episode) if self.over else {},
        }
