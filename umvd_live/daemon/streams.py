"""One live stream inside the daemon: its denoiser, its counters, the numbers `status` reports.

The router (`router.py`) hands each run of a stream's decoded frames to the `LiveStream` of its
topic. A `LiveStream` knows nothing about sockets: it pushes the frames to its engine, each with
its header and receipt time as the engine's opaque per-frame tag, so every engine output comes
back as a `DenoisedOutput` that already knows the input frame it denoises.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from umvd_live.engine.normalization import bad_pixels
from umvd_live.engine.outputs import RoundFailed
from umvd_live.wire.protocol import Frame, FrameHeader
from umvd_live.wire.schema import ChangeStatus, EngineStats, LatencyStatus, StreamAxes, StreamStatus, latency_summary

if TYPE_CHECKING:
    from umvd_live.daemon.statestore import StateStore
    from umvd_live.engine import Change, DenoisedFrame
    from umvd_live.engine.checkpoint import SavedWeights

log = logging.getLogger("umvd_live.daemon")

#: Latencies kept for the percentiles: recent enough to react, long enough for a stable p99.
LATENCY_WINDOW = 1000
#: Seconds of events a rate meter averages over.
RATE_WINDOW_S = 5.0
#: A forward jump of ``seq`` larger than this is a renumbering, not frames lost upstream.
MAX_SEQ_GAP = 1_000_000
#: Frames with NaN/Inf pixels logged in full before only every Nth is.
NONFINITE_LOG_FIRST = 3
NONFINITE_LOG_EVERY = 1000


class StreamEngine(Protocol):
    """The part of `umvd_live.engine.stream.StreamDenoiser` the daemon uses."""

    @property
    def state(self) -> str: ...
    @property
    def model_step(self) -> int: ...
    @property
    def last_loss(self) -> float | None: ...
    @property
    def warmup_progress(self) -> float: ...
    @property
    def training_paused(self) -> bool: ...
    @property
    def round_ended(self) -> bool: ...  # a round left running by `push_many(wait=False)` is done
    on_pass_end: Callable[[], None] | None  # called as a pass of such a round ends (any thread)
    @property
    def changes(self) -> list[Change]: ...  # seen, each starting a segment
    @property
    def warm(self) -> bool: ...  # the warm start is done (or weights were loaded)
    @property
    def frames_in(self) -> int: ...

    def push_many(self, frames: Sequence[np.ndarray], infer: Sequence[bool] | None = None,
                  tags: Sequence[object] | None = None, wait: bool = True) -> list[DenoisedFrame]: ...
    def flush(self) -> list[DenoisedFrame]: ...
    def pause_training(self) -> None: ...
    def resume_training(self) -> None: ...
    def save_weights(self, path: str, info: Mapping[str, Any] | None = None) -> tuple[int, str]: ...  # (step, hash)
    def weights_copy(self) -> SavedWeights | None: ...  # kept when the engine closes (`LiveStream.final_weights`)
    def load_weights(self, path: str, weights: SavedWeights | None = None) -> None: ...  # weights: path's, read already
    def weights_hash(self) -> str | None: ...
    def stats(self) -> dict[str, Any]: ...  # `wire.schema.EngineStats`, with numpy/torch scalars
    def close(self) -> None: ...


#: Builds a fresh denoiser; ``init`` is a weights file to start from, or None.
StreamEngineFactory = Callable[[str | None], StreamEngine]


@dataclass(frozen=True)
class DenoisedOutput:
    """One engine output, with the input frame it denoises.

    ``image`` is None when the preview skipped this frame's inference (compute fell behind)."""

    stream: str
    header: FrameHeader
    image: np.ndarray | None
    state: str
    model_step: int
    received: float  # monotonic() when the input frame was taken from the socket
    latency_ms: float = 0.0  # receipt -> hand-over to the sinks (set by the router as it hands over)
    amplitude_gain: float = 1.0  # the factor its amplitude was restored by (`engine.outputs.DenoisedFrame`)
    jitter_shift_px: tuple[float, float] | None = None  # (y, x) it was moved by with its jitter; None: not
    #: The weights of the engine that made it (a recording's weights hash, `sinks.WeightsHashes`).
    weights: EngineWeights | None = field(default=None, compare=False, repr=False)


class EngineWeights:
    """The weights of one engine of a stream, for whoever must name those its outputs came from
    (a recording's weights hash): the engine's own, copied when asked, while it runs; the copy
    `LiveStream` keeps as it closes the engine afterwards. The outputs an engine flushes as it
    closes reach the sinks only after that: with no engine left (the stream's end), or with the
    next one started and holding other weights (a shape change, a reset)."""

    def __init__(self, engine: StreamEngine):
        self._engine: StreamEngine | None = engine
        self._kept: SavedWeights | None = None

    def copy(self) -> SavedWeights | None:
        """The weights on the CPU, to read, not to change (None: no network built yet, or none kept)."""
        return self._engine.weights_copy() if self._engine is not None else self._kept

    def closed(self, kept: SavedWeights | None) -> None:
        """The engine closed; ``kept``: the copy of its weights taken just before."""
        self._engine, self._kept = None, kept


@dataclass(frozen=True)
class Arrival:
    """A valid frame as the daemon hands it to its stream and its sinks."""

    frame: Frame
    received: float  # monotonic() when it was taken from the socket
    infer: bool  # False: the preview skips this frame's output (compute fell behind)
    message: Sequence[bytes] = ()  # the message as it came (topic, header, pixels), for republishing


#: What a stream gives its engine with each frame, and gets back on that frame's output.
_Tag = tuple[FrameHeader, float]  # (header, received)


@dataclass(frozen=True)
class StreamStarted:
    """A stream got a new denoiser: its first frame, a shape/dtype change, a reset."""

    stream: str
    shape: tuple[int, int]
    dtype: str
    reason: str  # "first_frame" | "shape_change" | "reset" | "init_refused"
    init: str | None  # the weights file it started from, if any


class LatencyStats:
    """Percentiles of the recent receipt -> publication latencies, in milliseconds."""

    def __init__(self, size: int = LATENCY_WINDOW):
        self._values: deque[float] = deque(maxlen=size)

    def add(self, ms: float) -> None:
        self._values.append(ms)

    def clear(self) -> None:
        self._values.clear()

    def summary(self) -> LatencyStatus:
        return latency_summary(self._values)


class RateMeter:
    """Events per second over the last few seconds; decays to 0 once events stop."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._first: float | None = None

    def tick(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._times.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()

    def rate(self, now: float) -> float:
        self._trim(now)
        if self._first is None or len(self._times) < 2:
            return 0.0
        # Over the whole window once it is full; over the time since the first event before.
        return len(self._times) / min(self.window_s, max(now - self._first, 1e-3))


@dataclass
class StreamCounters:
    frames_in: int = 0  # valid frames received
    frames_out: int = 0  # denoised frames published
    skipped: int = 0  # preview outputs skipped because compute fell behind
    drops: int = 0  # frames lost upstream, from gaps in seq
    seq_restarts: int = 0  # seq went backwards (producer restart)
    seq_jumps: int = 0  # seq jumped forward by more than MAX_SEQ_GAP (renumbered, not drops)
    nonfinite_frames: int = 0  # float frames with NaN/Inf pixels (denoised, never trained on)
    nonfinite_pixels: int = 0  # their NaN/Inf pixels
    pauses: int = 0  # times the stream came back after being idle
    resumed: int = 0  # denoisers started from a --state-dir checkpoint
    restarts: int = 0  # new denoiser after a shape/dtype change
    ends: int = 0  # the producer ended the stream (its acquisition finished)
    resets: int = 0  # new denoiser on request (`reset`)
    rejected: Counter[str] = field(default_factory=Counter)


def _smoothed(estimate: float | None, sample: float) -> float:
    return sample if estimate is None else 0.9 * estimate + 0.1 * sample


class LiveStream:
    """A stream's denoiser plus the headers of the frames it still owes an output for."""

    def __init__(self, name: str, make_denoiser: StreamEngineFactory, *, idle_after_s: float,
                 init: str | None = None, store: StateStore | None = None, run_length: int = 1,
                 wake: Callable[[], None] | None = None):
        self.name = name
        #: Called (any thread) as a pass its denoiser left running ends: the frame loop's cue to
        #: `collect` that round's outputs (the daemon's `Inbox.wake`).
        self._wake = wake
        self.run_length = run_length  # windows the engine denoises in one round (batch × workers)
        self._make_denoiser = make_denoiser
        self.init = init  # weights every new denoiser of this stream starts from
        self.init_explicit = False  # `load_model` named them: they win over a state checkpoint
        self.store = store
        self.idle_after_s = idle_after_s
        self.started_from: str | None = None  # the weights the current denoiser started from
        self.last_received: float | None = None
        self.idle = False  # no frame for idle_after_s: training paused, latency figures dropped
        self._latency_since = float("-inf")  # outputs of frames received before a pause are not counted
        self.counters = StreamCounters()
        self.latency = LatencyStats()
        self.fps_in = RateMeter()
        self.fps_out = RateMeter()
        self.denoiser: StreamEngine | None = None
        self._engine_weights: EngineWeights | None = None  # the denoiser's, for its outputs
        #: The weights of the last denoiser, kept when it closed (the stream's end): `save_model`'s.
        self.final_weights: SavedWeights | None = None
        self.shape: tuple[int, int] | None = None
        self.dtype: str | None = None
        self.training_paused = False
        self.last_seq: int | None = None
        self._numbering_ended = False  # the producer ended the stream: its next seq starts anew
        self.axes: StreamAxes | None = None  # group, channel, non-time index (`_track_axes`)
        self.pending = 0  # frames pushed to the current engine whose output has not come yet
        #: Running estimate of the time one inferred output costs (its push, in a batch its share).
        self.infer_cost_s: float | None = None
        #: Running estimate of one round: a push's time per `run_length` inferred windows (their
        #: passes run side by side), for deciding how much backlog to work through.
        self.round_cost_s: float | None = None
        #: Time of the push that left its round running and got no output back: billed to the next
        #: push if that one's outputs are measured, so that a chain of such pushes is measured whole.
        self._unbilled_s = 0.0

    # ---- frames -------------------------------------------------------------------------------
    def admit(self, run: Sequence[Arrival]) -> tuple[list[DenoisedOutput], StreamStarted | None]:
        """Count a run of valid frames, all of one shape and dtype, in arrival order, and make
        sure a denoiser for their format is there. Returns the outputs a shape change flushed
        from the old denoiser and, when a new denoiser was started, its description. `push`
        then hands the run to the denoiser."""
        self._track_axes(run[-1].frame.header.meta)
        for arrival in run:
            self._track_seq(arrival.frame.header.seq)
            self._track_activity(arrival.received)
            self._track_nonfinite(arrival.frame)
            self.counters.frames_in += 1
            self.fps_in.tick(arrival.received)
        header = run[0].frame.header
        outputs: list[DenoisedOutput] = []
        started: StreamStarted | None = None
        if self.denoiser is None or (header.shape, header.dtype) != (self.shape, self.dtype):
            reason = "first_frame"
            if self.denoiser is not None:
                assert self.shape is not None  # set with the denoiser
                reason = "shape_change"
                log.info(
                    "stream %s: %sx%s %s -> %sx%s %s; restarting its window and warm start",
                    self.name, *self.shape, self.dtype, *header.shape, header.dtype,
                )
                outputs.extend(self._close_denoiser())
                self.counters.restarts += 1
            started = self._start_denoiser(header.shape, header.dtype, reason)
        return outputs, started

    def reset(self, init: str | None) -> tuple[list[DenoisedOutput], StreamStarted | None]:
        """Forget the model (new field of view): its checkpoints of every frame format go, what
        is owed is flushed, a fresh denoiser starts (that of a stream that ended: at its next
        frame). The checkpoints go first, so a flush that fails cannot leave them to resume."""
        self.init = init
        self.init_explicit = False
        self.counters.resets += 1
        if self.store is not None:
            self.store.forget_later(self.name)
        if self.denoiser is None:
            return [], None
        outputs = self._close_denoiser(checkpoint=False)
        assert self.shape is not None and self.dtype is not None
        return outputs, self._start_denoiser(self.shape, self.dtype, "reset")

    def finish(self, seq: int) -> list[DenoisedOutput]:
        """The producer ended the stream (`protocol.StreamEnd`; ``seq``: its next frame's number):
        hand out the outputs still owed, keep what the model learned (``--state-dir``), and let
        the next frame start a new window and warm start with ``seq`` from 0."""
        if self.last_seq is not None:  # ``seq`` as its next frame's would count
            self._count_gap(self.last_seq, seq)
        self._numbering_ended = True
        self.counters.ends += 1
        log.info("stream %s: ended by its producer after seq %s", self.name, seq - 1)
        return self._close_denoiser() if self.denoiser is not None else []

    @property
    def ended(self) -> bool:
        """The producer ended the stream and no frame came since: no denoiser, nothing owed."""
        return self._numbering_ended and self.denoiser is None and self.pending == 0

    def close(self) -> list[DenoisedOutput]:
        """Flush and stop the denoiser (its trainer thread)."""
        return self._close_denoiser() if self.denoiser is not None else []

    def note_published(self, latency_ms: float, now: float, received: float) -> None:
        self.counters.frames_out += 1
        if received >= self._latency_since:  # not an output that waited out a pause
            self.latency.add(latency_ms)
        self.fps_out.tick(now)

    def check_idle(self, now: float) -> bool:
        """Called periodically: a stream without frames for ``idle_after_s`` stops training (a
        stopped acquisition must not keep a core busy, nor over-fit the last frames) and drops
        its latency figures. Returns True when it just became idle."""
        if self.idle or self.last_received is None or now - self.last_received < self.idle_after_s:
            return False
        self.idle = True
        self._apply_training()
        log.info("stream %s: no frame for %.0f s: idle, training paused until frames come again",
                 self.name, now - self.last_received)
        return True

    def checkpoint(self) -> None:
        """Queue a save of this stream's weights to the state directory (if any, and if it is live)."""
        if self.store is not None:
            self.store.save_later(self.name, self.denoiser, self.shape, self.dtype)

    def note_skipped(self) -> None:
        self.counters.skipped += 1

    def note_rejected(self, reason: str, count: int = 1) -> None:
        self.counters.rejected[reason] += count

    # ---- training -----------------------------------------------------------------------------
    def set_training_paused(self, paused: bool) -> None:
        self.training_paused = paused
        self._apply_training()

    def _apply_training(self) -> None:
        """Train unless the operator paused training or the stream is idle."""
        if self.denoiser is not None:
            halt = self.training_paused or self.idle
            (self.denoiser.pause_training if halt else self.denoiser.resume_training)()

    # ---- status -------------------------------------------------------------------------------
    def snapshot(self, now: float) -> StreamStatus:
        """Plain values only (msgpack-able): what `status` replies and the status table shows."""
        c = self.counters
        den = self.denoiser
        snap: StreamStatus = {
            "frames_in": c.frames_in,
            "frames_out": c.frames_out,
            "skipped": c.skipped,
            "drops": c.drops,
            "rejected": dict(c.rejected),
            "rejected_total": sum(c.rejected.values()),
            "seq_restarts": c.seq_restarts,
            "seq_jumps": c.seq_jumps,
            "nonfinite_frames": c.nonfinite_frames,
            "nonfinite_pixels": c.nonfinite_pixels,
            "pauses": c.pauses,
            "resumed": c.resumed,
            "started_from": self.started_from,
            "idle": self.idle,
            "idle_s": None if self.last_received is None else round(now - self.last_received, 3),
            "restarts": c.restarts,
            "resets": c.resets,
            "ends": c.ends,
            "axes": self.axes,
            "last_seq": self.last_seq,
            "fps_in": round(self.fps_in.rate(now), 2),
            "fps_out": round(self.fps_out.rate(now), 2),
            # an idle stream has no current latency: old figures would read as today's
            "latency_ms": LatencyStats(0).summary() if self.idle else self.latency.summary(),
            "shape": list(self.shape) if self.shape else None,
            "dtype": self.dtype,
            "pending": self.pending,
            "infer_ms": None if self.infer_cost_s is None else round(1000 * self.infer_cost_s, 2),
            "training_paused": self.training_paused,
            "state": den.state if den is not None else "idle",
            "model_step": int(den.model_step) if den is not None else
            self.final_weights.step if self.final_weights is not None else 0,
            "loss": _plain(den.last_loss) if den is not None else None,
            "warmup_progress": _plain(den.warmup_progress) if den is not None else 0.0,
            # abrupt changes of the acquisition this stream's engine saw (`changes`), the last one
            "changes": len(den.changes) if den is not None else 0,
            "last_change": cast("ChangeStatus", den.changes[-1].to_dict()) if den is not None and den.changes else None,
        }
        if den is not None:
            try:
                snap["engine"] = _plain(den.stats())
            except Exception as exc:  # a status request must never take the daemon down
                snap["engine"] = EngineStats(error=repr(exc))
        return snap

    def push(self, run: Sequence[Arrival], wait: bool = True) -> list[DenoisedOutput]:
        """Hand a run `admit` took to the denoiser; returns the outputs that became ready
        (``wait=False``: the run's own may come with the next run's, `StreamDenoiser.push_many`)."""
        den = self.denoiser
        assert den is not None
        first = den.frames_in  # the engine's index of the run's first frame
        try:
            started = monotonic()
            tags: list[_Tag] = [(a.frame.header, a.received) for a in run]
            self.pending += len(run)
            outputs = self._outputs(den.push_many([a.frame.pixels for a in run], [a.infer for a in run], tags, wait))
            # Only the network's outputs measure its cost: the warm start's temporal means are
            # nearly free, and an estimate made of them let a backlog build up when it went live.
            if first > 0:  # the first push also builds the network
                self._bill(monotonic() - started, outputs, deferred=not wait)
            return outputs
        except Exception as exc:
            if isinstance(exc, RoundFailed):  # the engine took the frames; a round of outputs is lost
                self._lose(exc)
                raise
            if den.frames_in == first:  # the engine did not take the frames
                self.pending -= len(run)
            if first == 0 and self.started_from is not None:
                # The first push builds the network from the weights file: weights that do not
                # fit this stream must not wedge it. Start from scratch instead, and say so.
                log.exception("stream %s: cannot start from weights %s; starting from scratch",
                              self.name, self.started_from)
                if self.started_from == self.init:  # nor do they win over a checkpoint any more
                    self.init, self.init_explicit = None, False
                den.close()
                header = run[0].frame.header
                self._start_denoiser(header.shape, header.dtype, "init_refused", use_state=False)
                return self.push(run, wait)
            raise

    def collect(self) -> list[DenoisedOutput]:
        """The outputs of the round the denoiser left running, once its passes have ended (none
        before: nothing here waits). The daemon calls it whenever a pass ends, so an output goes
        out as soon as it is made rather than with the stream's next frame."""
        den = self.denoiser
        if den is None or not den.round_ended:
            return []
        started = monotonic()
        outputs = self._take_running(den, "failed")
        self._bill(monotonic() - started, outputs, deferred=False)
        return outputs

    def _bill(self, took: float, outputs: Sequence[DenoisedOutput], deferred: bool) -> None:
        """The running estimates of what an output and a round cost the frame loop: ``took`` s of
        a push or `collect` that gave ``outputs``. Only the network's outputs measure its cost: the
        warm start's temporal means are nearly free, and an estimate made of them let a backlog
        build up when it went live. A push that left its round running and got no output back is
        billed with the call that brings its outputs, so that such a chain is measured whole."""
        inferred = sum(out.image is not None and out.state != "warmup" for out in outputs)
        carried, self._unbilled_s = self._unbilled_s, 0.0
        if not outputs and deferred:
            self._unbilled_s = carried + took
        elif inferred:  # (a warm start's means carry nothing: dropped with them)
            took += carried
            self.infer_cost_s = _smoothed(self.infer_cost_s, took / inferred)
            self.round_cost_s = _smoothed(self.round_cost_s, took / -(-inferred // self.run_length))

    def settle(self) -> list[DenoisedOutput]:
        """After a failed push: the outputs of a round the engine still has running, now rather
        than with the stream's next frame (a recording stopped meanwhile would miss them)."""
        den = self.denoiser
        if den is None:
            return []
        try:
            return self._take_running(den, "failed as well")
        except Exception:
            log.exception("stream %s: the round left running failed as well", self.name)
            return []

    def _take_running(self, den: StreamEngine, failed: str) -> list[DenoisedOutput]:
        """The outputs of the round ``den`` left running (`collect`, `settle`): a round that
        failed is counted lost (`_lose`), and what the engine had made before it still comes."""
        try:
            return self._outputs(den.push_many([]))
        except RoundFailed as exc:
            self._lose(exc)
            log.warning("stream %s: the round left running %s: %s", self.name, failed, exc)
            return self._outputs(den.push_many([]))  # what the engine had made before it

    def _lose(self, exc: RoundFailed) -> None:
        """A round of outputs the engine will never make: counted as `engine_error`, owed no more."""
        self.pending -= exc.lost
        self.note_rejected("engine_error", exc.lost)

    # ---- internals ----------------------------------------------------------------------------
    def _track_axes(self, meta: dict[str, Any]) -> None:
        """Where the stream sits in its acquisition, from its frames' ``meta`` (docs/protocol.md),
        for the status and the viewer; None for producers that do not say."""
        group, index = meta.get("group"), meta.get("index")
        if not isinstance(group, str) or not isinstance(index, dict):
            self.axes = None
            return
        channel = meta.get("channel")
        self.axes = {"group": group, "channel": channel if isinstance(channel, str) else None,
                     "index": {str(k): v for k, v in index.items() if k != "t" and isinstance(v, int)}}

    def _track_activity(self, received: float) -> None:
        """A frame after an idle spell: training resumes, latency figures start afresh."""
        last, self.last_received = self.last_received, received
        if last is None or not (self.idle or received - last >= self.idle_after_s):
            return
        self.counters.pauses += 1
        self.idle = False
        self.latency.clear()
        self._latency_since = received
        self._apply_training()
        log.info("stream %s: frames again after %.1f s without; training resumed", self.name, received - last)

    def _track_nonfinite(self, frame: Frame) -> None:
        """Count the pixels that are no measurement (NaN, ±Inf, a finite value such as 1e30:
        `normalization.bad_pixels` by the frame's own range, the rule the engine applies before
        it replaces them); the engine never trains on such a frame."""
        mask = bad_pixels(frame.pixels)
        if mask is None:
            return
        bad = int(np.count_nonzero(mask))
        c = self.counters
        c.nonfinite_frames += 1
        c.nonfinite_pixels += bad
        if c.nonfinite_frames <= NONFINITE_LOG_FIRST or c.nonfinite_frames % NONFINITE_LOG_EVERY == 0:
            log.warning("stream %s: frame seq %d has %d NaN, Inf or out-of-range pixels: denoised with them "
                        "replaced, not trained on [%d such frames so far]", self.name, frame.header.seq, bad,
                        c.nonfinite_frames)

    def _track_seq(self, seq: int) -> None:
        last = None if self._numbering_ended else self.last_seq
        self._numbering_ended = False
        if last is not None:
            if seq <= last:
                self.counters.seq_restarts += 1
                log.warning("stream %s: seq went back from %d to %d (producer restart?); going on",
                            self.name, last, seq)
            else:
                self._count_gap(last, seq)
        self.last_seq = seq

    def _count_gap(self, last: int, seq: int) -> None:
        """``seq`` after ``last``: a gap counts the frames lost upstream as drops, a jump past
        `MAX_SEQ_GAP` counts one renumbering (`seq_jumps`)."""
        if seq > last + MAX_SEQ_GAP:
            self.counters.seq_jumps += 1
            log.warning("stream %s: seq jumped from %d to %d; not counted as drops", self.name, last, seq)
        elif seq > last + 1:
            self.counters.drops += seq - last - 1

    def _start_denoiser(self, shape: tuple[int, int], dtype: str, reason: str,
                        use_state: bool = True) -> StreamStarted:
        """A new denoiser: from this stream's --state-dir checkpoint for this frame format if
        there is a valid one (unless `load_model` named weights), else from ``init``."""
        start = self.init
        if use_state and self.store is not None and reason in ("first_frame", "shape_change") \
                and not self.init_explicit:
            resumed = self.store.find(self.name, shape, dtype)
            if resumed is not None:
                start = resumed
                self.counters.resumed += 1
        self.denoiser = self._make_denoiser(start)
        self.denoiser.on_pass_end = self._wake
        self._engine_weights = EngineWeights(self.denoiser)
        self.final_weights = None  # the new denoiser's are the model now (the old one's outputs keep theirs)
        self.started_from = start
        self.shape, self.dtype = shape, dtype
        self.pending = 0
        self.infer_cost_s = self.round_cost_s = None  # another network or frame size: measured anew
        self._unbilled_s = 0.0
        self._apply_training()
        log.info("stream %s: new denoiser for %dx%d %s (%s%s)", self.name, *shape, dtype, reason,
                 f", from {start}" if start else "")
        return StreamStarted(self.name, shape, dtype, reason, start)

    def _close_denoiser(self, checkpoint: bool = True) -> list[DenoisedOutput]:
        den = self.denoiser
        assert den is not None
        outputs: list[DenoisedOutput] = []
        try:
            try:
                outputs = self._outputs(den.flush())
            except RoundFailed as exc:  # a round of its last outputs is lost, not the others
                self._lose(exc)
                log.warning("stream %s: %s", self.name, exc)
                outputs = self._outputs(den.flush())  # (an ended engine hands over what its flush made)
            if checkpoint:  # shutdown, shape change: keep what this model learned (on the worker)
                self.checkpoint()
        finally:  # also after a failed flush: nothing is owed by a closed denoiser (`ended`)
            # Its weights, copied before it closes (a few hundred kB): a stream that ended keeps its
            # model for `save_model` (a reset forgets it), and the outputs just flushed, which reach
            # the sinks after this, name the weights that made them (`EngineWeights`).
            kept = None
            try:
                kept = den.weights_copy() if checkpoint or outputs else None
            except Exception:
                log.exception("stream %s: its weights could not be kept at its end", self.name)
            self.final_weights = kept if checkpoint else None
            if self._engine_weights is not None:
                self._engine_weights.closed(kept)
            den.close()
            self.denoiser = None
            if self.pending:  # the engine owes one output per input: say so if it did not
                log.error("stream %s: %d frames got no output before the denoiser closed", self.name, self.pending)
                self.pending = 0
        return outputs

    def _outputs(self, frames: Sequence[DenoisedFrame]) -> list[DenoisedOutput]:
        """The current engine's outputs, each with the header and receipt time it was tagged with,
        and that engine's weights."""
        self.pending -= len(frames)
        outputs = []
        for out in frames:
            header, received = cast(_Tag, out.tag)
            outputs.append(DenoisedOutput(self.name, header, out.image, out.state, int(out.model_step), received,
                                          amplitude_gain=float(out.amplitude_gain),
                                          jitter_shift_px=out.jitter_shift_px, weights=self._engine_weights))
        return outputs


def _plain(value: Any) -> Any:
    """numpy/torch scalars and containers → plain Python, so a reply always packs."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        try:
            return value.item()
        except Exception:
            pass
    return repr(value)


def monotonic() -> float:
    """The one clock of receipt and publication times."""
    return time.perf_counter()
