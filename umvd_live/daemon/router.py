"""From received messages to every sink: decode, validate, route each frame to its stream, plan what
the preview infers, hand each stream its runs, and fan what comes out to every sink in one loop.

No sockets and no threads here: the service (`service.py`) drains the inbox and gives the router
each batch; the sinks (`sinks.py`) are the only way out, the viewers' socket one of them.

- Each message is decoded and validated (`wire.protocol`); a rejected one is counted on its stream
  when its topic names one that exists, else globally, and logged without flooding the log.
- When the streams' backlog would take longer than the catch-up budget to infer, older frames are
  pushed with ``infer=False`` (the window and the trainer's replay buffer still see them) and only
  the newest windows are inferred: the preview skips to the present instead of drifting behind,
  evenly across the streams (`capacity.plan_inference`). Streams a sink owes (a recording) are
  never skipped. Past capacity the status says so and the log says so once
  (`capacity.CapacityMonitor`).
- Each stream's frames of a batch go to its engine in runs of up to `run_length` windows to
  denoise (``--batch`` × ``--workers``), so a backlog is denoised in passes side by side.
- Between bounded pieces of work (every `DECODE_SLICE` messages, every run) the router calls
  ``between``: the service answers ``status`` there, so a flood of input never keeps the control
  socket waiting for the whole batch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

from umvd_live.daemon.capacity import CapacityMonitor, Plan, plan_inference
from umvd_live.daemon.config import DaemonConfig
from umvd_live.daemon.sinks import FrameSink
from umvd_live.daemon.statestore import StateStore
from umvd_live.daemon.streams import (
    Arrival,
    DenoisedOutput,
    LiveStream,
    StreamEngineFactory,
    StreamStarted,
    monotonic,
)
from umvd_live.daemon.transport import Inbox, Received
from umvd_live.engine import CpuBudget, RoundFailed
from umvd_live.wire.protocol import Frame, ProtocolError, StreamEnd, decode_message, decode_stream_name

log = logging.getLogger("umvd_live.daemon")

#: Rejections logged in full per reason before only every Nth is.
REJECTION_LOG_FIRST = 5
REJECTION_LOG_EVERY = 1000
#: Seconds between evaluations of the load while frames come (`capacity.CapacityMonitor`).
CAPACITY_CHECK_S = 0.25
#: A run of one stream's frames holds at most this many times `run_length` frames: skipped ones
#: ride along with the windows to denoise, but a long backlog is not taken through G at once.
RUN_CAP = 4
#: Messages decoded between two calls of ``between``.
DECODE_SLICE = 256


class RejectionLog:
    """Logs why messages were rejected without letting a flood of bad input flood the log."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def __call__(self, stream: str | None, error: ProtocolError) -> None:
        self.seen[error.reason] += 1
        n = self.seen[error.reason]
        if n <= REJECTION_LOG_FIRST or n % REJECTION_LOG_EVERY == 0:
            log.warning("rejected a message%s: %s (%s) [%d so far]",
                        f" on stream {stream}" if stream else "", error.reason, error.detail, n)


def _same_run(first: Frame, frame: Frame) -> bool:
    """Whether `frame` can join the run `first` began: the same stream, shape and dtype."""
    h, f = first.header, frame.header
    return (first.stream, h.shape, h.dtype) == (frame.stream, f.shape, f.dtype)


class Router:
    """Routes frames from the inbox to per-stream denoisers, and their outputs to every sink."""

    def __init__(self, config: DaemonConfig, make_denoiser: StreamEngineFactory, run_length: int,
                 inbox: Inbox, *, store: StateStore | None = None, budget: CpuBudget | None = None,
                 between: Callable[[], None] = lambda: None):
        self.config = config
        self.make_denoiser = make_denoiser
        #: Frames of one stream handed to its engine at once: enough for every worker's pass.
        self.run_length = run_length
        self.inbox = inbox  # read for the capacity figures only; the service drains it
        self.store = store
        self.budget = budget  # the cores the engines share, for the capacity warning
        self.between = between
        #: Every output, in the order they get each event; the service adds and removes recordings.
        self.sinks: list[FrameSink] = []
        self.streams: dict[str, LiveStream] = {}
        #: Weights `load_model` named for streams not seen yet, taken by their first frame: kept
        #: apart, so a misspelt name takes no stream slot (and replaced by a later `load_model`).
        self.starting_weights: dict[str, str] = {}
        self.capacity = CapacityMonitor(clock=monotonic)
        self.rejected_unattributed: Counter[str] = Counter()
        self.training_paused = False  # new streams start paused (the control socket's pause)
        self._log_rejection = RejectionLog()
        self._stream_starts = 0  # denoisers started (building a network is not load)
        self._turn = 0  # which stream the preview's ties go to first (`plan_inference`)
        self._next_capacity_check = 0.0

    # ---- a batch ------------------------------------------------------------------------------
    def process(self, items: Sequence[Received], allow_skip: bool = True) -> None:
        """Validate, route and denoise one batch taken from the inbox, in arrival order.

        Consecutive frames of one stream (and one shape) go to its engine together, with up to
        `run_length` windows to denoise, so they are denoised in batched passes side by side;
        frames of several streams (channels, planes) arrive interleaved, so each stream's frames
        of the batch are taken together, in their order. Which frames the preview infers when it
        is behind: `_plan`. Past ``--max-streams``, an end frees its stream's slot for a new
        stream later in the batch: the messages before the new stream's are routed first."""
        began, starts = monotonic(), self._stream_starts
        if items:
            self.capacity.begin_batch(began)  # a status answered mid-batch counts it as busy
        plans: list[Plan] = []
        messages: list[tuple[Frame | StreamEnd, Received]] = []
        named: set[str] = set()  # the streams of `messages`: their slots are not given away
        ends = False  # an end among `messages`: once applied, its stream's slot may go to a new one
        for n, item in enumerate(items, 1):
            message = self._decode(item)
            if isinstance(message, StreamEnd):
                if message.stream in self.streams:  # the end of a stream never seen ends nothing
                    messages.append((message, item))
                    named.add(message.stream)
                    ends = True
            elif message is not None:
                if ends and message.stream not in self.streams and len(self.streams) >= self.config.max_streams \
                        and not self._ended_streams(named):
                    # No slot, but an end earlier in the batch frees one once applied (one plane
                    # or position after the other): route what came so far first.
                    plans.append(self._route(messages, allow_skip))
                    messages, named, ends = [], set(), False
                # A stream exists from its first valid frame on, so a malformed message after that
                # frame counts on the stream, as it would in a batch of its own.
                if message.stream in self.streams or self.new_stream(message.stream, named):
                    messages.append((message, item))
                    named.add(message.stream)
            if n % DECODE_SLICE == 0:
                self.between()
        plans.append(self._route(messages, allow_skip))
        if items:
            skipped: Counter[str] = Counter()
            for plan in plans:
                skipped.update(plan.skipped)
            # Building a stream's network is a one-off, not load.
            self.capacity.note_batch(began, monotonic(), sum(plan.skipped_cost_s for plan in plans),
                                     began - items[0].received, skipped, count_busy=self._stream_starts == starts)
            self.check_capacity(monotonic(), every_s=CAPACITY_CHECK_S)

    def _route(self, messages: list[tuple[Frame | StreamEnd, Received]], allow_skip: bool) -> Plan:
        """Plan which frames the preview infers, then hand each stream its runs and apply its end,
        one stream after the other; returns the plan."""
        plan = self._plan([m.stream for m, _ in messages if isinstance(m, Frame)], allow_skip)
        flags = iter(plan.infer)
        tagged = [(m, item, next(flags) if isinstance(m, Frame) else True) for m, item in messages]
        # One stream after the other (a stable sort: each stream's own order is kept), so a
        # stream that is behind gives its engine runs of several windows to denoise side by side
        # (`--workers`) instead of one window per run between the other streams' frames.
        first_seen: dict[str, int] = {}
        tagged.sort(key=lambda t: first_seen.setdefault(t[0].stream, len(first_seen)))
        run: list[Arrival] = []
        for message, item, infer in tagged:
            if isinstance(message, StreamEnd):
                if run and run[0].frame.stream == message.stream:
                    self._accept(run)
                    run = []
                self._end(self.streams[message.stream], message.seq)
                continue
            if run and not _same_run(run[0].frame, message):
                self._accept(run)
                run = []
            run.append(Arrival(message, item.received, infer, item.parts))
            # Skipped frames ride along (G only): a run ends when it holds a round of windows to
            # denoise, or when it grows long.
            if sum(a.infer for a in run) >= self.run_length or len(run) >= RUN_CAP * self.run_length:
                self._accept(run)
                run = []
        if run:
            self._accept(run)
        return plan

    def collect(self) -> None:
        """Hand out the outputs of every round an engine left running whose passes have ended
        (the service calls it after each batch, and when a pass's end wakes it)."""
        for live in list(self.streams.values()):
            try:
                outputs = live.collect()
            except Exception as exc:
                self._engine_failed(live, 0, exc)
                continue
            self._fan_out(outputs=outputs)

    def _accept(self, run: list[Arrival]) -> None:
        """Hand a run of one stream's frames to its `LiveStream`, and every sink what comes of it:
        the outputs a shape change flushed, the new denoiser, the input frames, their outputs.
        The run's passes are left running on the engine's workers (`StreamDenoiser.push_many`
        with ``wait=False``): the frame loop takes the next frames, of this stream or another,
        meanwhile, and the outputs go out when the passes end (`collect`) or with the stream's
        next run, whichever comes first (docs/engine.md, "Passes left running")."""
        live = self.streams[run[0].frame.stream]
        try:
            flushed, started = live.admit(run)
        except Exception as exc:  # an engine failure must not end the session
            self._engine_failed(live, len(run), exc)
            self._fan_out(raw=run)  # the raw input never depends on the denoiser
            return
        if started is not None:
            self._stream_starts += 1
        self._fan_out(outputs=flushed, started=started)
        self._fan_out(raw=run)  # after the denoiser exists, so a recording's provenance names it
        try:
            outputs = live.push(run, wait=False)
        except Exception as exc:
            # (a lost round of outputs is counted by its stream: `LiveStream.push`)
            self._engine_failed(live, 0 if isinstance(exc, RoundFailed) else len(run), exc)
            self._fan_out(outputs=live.settle())
            return
        self._fan_out(outputs=outputs)
        self.between()

    def _end(self, live: LiveStream, seq: int) -> None:
        """The producer's end of a stream: its last outputs go out. A flush that fails loses
        the outputs still owed (counted as `engine_error`), not the other streams' batch."""
        owed = live.pending
        try:
            outputs = live.finish(seq)
        except Exception as exc:
            self._engine_failed(live, owed, exc)
            return
        self._fan_out(outputs=outputs)

    def _engine_failed(self, live: LiveStream, frames: int, exc: Exception) -> None:
        """``frames`` valid frames lost to an engine failure: counted on their stream, logged."""
        if frames:
            live.note_rejected("engine_error", frames)
        self._log_rejection(live.name, ProtocolError("engine_error", repr(exc)))

    def _fan_out(self, *, outputs: Sequence[DenoisedOutput] = (), raw: Sequence[Arrival] = (),
                 started: StreamStarted | None = None) -> None:
        """Every sink, in its turn, gets the events: the one place frames leave the daemon.
        Then each output counts on its stream (published, or skipped by the preview)."""
        if not (outputs or raw or started):
            return
        now = monotonic()
        outputs = [replace(out, latency_ms=(now - out.received) * 1000.0) for out in outputs]
        for sink in self.sinks:
            for out in outputs:
                sink.on_denoised(out)
            if started is not None:
                sink.on_stream_started(started)
            for arrival in raw:
                sink.on_raw(arrival)
        for out in outputs:
            live = self.streams[out.stream]
            if out.image is None:
                live.note_skipped()
            else:
                live.note_published(out.latency_ms, now, out.received)

    def _decode(self, item: Received) -> Frame | StreamEnd | None:
        try:
            return decode_message(item.parts)
        except ProtocolError as error:
            self._reject(item.parts, error)
            return None

    def _reject(self, parts: Sequence[bytes], error: ProtocolError) -> None:
        """Count a rejection on its stream when the topic names one we know, else globally."""
        stream = None
        if error.reason != "bad_topic" and parts:
            try:
                stream = decode_stream_name(parts[0])
            except ProtocolError:
                stream = None
        # Only a stream that exists gets the count: junk under made-up names must not use up
        # --max-streams and lock real streams out.
        live = self.streams.get(stream) if stream else None
        if live is not None:
            live.note_rejected(error.reason)
        else:
            self.rejected_unattributed[error.reason] += 1
        self._log_rejection(stream, error)

    def _plan(self, streams: list[str], allow_skip: bool) -> Plan:
        """Which frames of a batch (``streams``: each frame's stream, in arrival order) the
        preview infers (`capacity.plan_inference`): every frame of a recorded stream; every
        stream's newest round (`run_length` windows, denoised side by side); older rounds in
        turn across the streams, in proportion to their frames, while their estimated time
        stays within the catch-up budget. The rest is skipped towards the present."""
        if not allow_skip:
            return Plan([True] * len(streams), 0.0, {})
        costs = {name: self.streams[name].round_cost_s for name in set(streams)}
        self._turn += 1
        return plan_inference(streams, costs, self.owed, self.run_length, self.config.catchup_s, rotate=self._turn)

    def owed(self, stream: str) -> bool:
        return any(sink.owes(stream) for sink in self.sinks)

    def check_capacity(self, now: float, every_s: float = 0.0) -> None:
        """Over capacity, or back within it: say so once in the log (`capacity.CapacityMonitor`)."""
        if now < self._next_capacity_check:
            return
        self._next_capacity_check = now + every_s
        if len(self.inbox) == 0:
            self.capacity.note_idle()
        change = self.capacity.update(now)
        if change is None:
            return
        if change.over:
            owed = [name for name in self.streams if self.owed(name)]
            log.warning(
                "over capacity: load %.2f, lag %.2f s, %d stream%s on %s; the preview skips outputs "
                "evenly across the streams%s (status: capacity)", change.load, change.lag_s, len(self.streams),
                "" if len(self.streams) == 1 else "s",
                f"a {self.budget.cores}-core budget" if self.budget is not None else "this machine",
                f"; recorded streams ({', '.join(owed)}) still get every frame, and frames wait in the "
                f"inbox ({self.inbox.nbytes / 2**20:.0f} of {self.inbox.max_bytes / 2**20:.0f} MB)" if owed else "")
        else:
            skipped = ", ".join(f"{name} {n}" for name, n in sorted(change.skipped.items())) or "none"
            log.warning("back within capacity after %.1f s (load %.2f, lag %.2f s); preview outputs skipped "
                        "meanwhile: %s", change.duration_s, change.load, change.lag_s, skipped)

    # ---- streams ------------------------------------------------------------------------------
    def new_stream(self, name: str, keep: set[str]) -> LiveStream | None:
        """A stream by that name (not seen yet), or None past ``max_streams`` (counted, logged).
        A stream that ended (its outputs all handed out) holds its slot, and stays in the status,
        only until a new stream needs it: the one idle longest gives it up, unless ``keep`` names
        it (messages of it wait in this batch). A recording of it goes on, in its own files, if
        frames of that name come again: the name then starts as a new stream."""
        if len(self.streams) >= self.config.max_streams:
            ended = self._ended_streams(keep)
            if not ended:
                self.rejected_unattributed["too_many_streams"] += 1
                self._log_rejection(name, ProtocolError(
                    "too_many_streams", f"{name!r}: already {len(self.streams)} streams (--max-streams)"))
                return None
            gone = min(ended, key=lambda live: live.last_received or 0.0)
            if gone.init_explicit and gone.init is not None:  # `load_model` named them: kept for its return
                self.starting_weights[gone.name] = gone.init
            del self.streams[gone.name]
            log.info("stream %s: ended; its slot goes to the new stream %s (--max-streams)", gone.name, name)
        init = self.starting_weights.pop(name, None)
        live = LiveStream(name, self.make_denoiser, init=init or self.config.engine.init, store=self.store,
                          idle_after_s=self.config.idle_after_s, run_length=self.run_length, wake=self.inbox.wake)
        live.init_explicit = init is not None
        live.training_paused = self.training_paused
        self.streams[name] = live
        log.info("stream %s: first message", name)
        return live

    def _ended_streams(self, keep: set[str]) -> list[LiveStream]:
        """The streams that ended and may give up their slot: those ``keep`` does not name."""
        return [live for live in self.streams.values() if live.ended and live.name not in keep]

    def reset(self, name: str) -> None:
        """A fresh model for a stream (new field of view): what the old one owed goes out first."""
        outputs, started = self.streams[name].reset(self.config.engine.init)
        if started is not None:
            self._stream_starts += 1
        self._fan_out(outputs=outputs, started=started)

    def close_streams(self) -> int:
        """Flush every stream (their last outputs go out) and stop their denoisers; returns how
        many outputs the flushes handed out."""
        flushed = 0
        for live in self.streams.values():
            try:  # one stream's failed flush must not keep the others' last outputs from going out
                outputs = live.close()
            except Exception:
                log.exception("stream %s: flushing it at the end failed; its denoiser is closed", live.name)
                continue
            flushed += len(outputs)
            self._fan_out(outputs=outputs)
        return flushed
