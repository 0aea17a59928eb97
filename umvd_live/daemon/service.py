"""`umvd-live serve`: receive frames over ZeroMQ, denoise each stream online, publish the results.

Three units, each on its own socket:
- `InputReceiver` (a thread) owns the SUB socket. It takes every message off the socket the moment
  it arrives, stamps its receipt time and appends it to a byte-bounded `Inbox`, so the producer's
  PUB never meets a full queue because the daemon was busy computing.
- `Daemon` (the main thread) drains the inbox, validates each message, routes it to the stream's
  `LiveStream` (`streams.py`) and publishes raw and denoised frames on the PUB socket. When the
  streams' backlog would take longer than the catch-up budget to infer, older frames are pushed
  with ``infer=False`` (the window and the trainer's replay buffer still see them) and only the
  newest windows are inferred: the preview skips to the present instead of drifting behind, evenly
  across the streams (`capacity.plan_inference`). Streams that a sink owes (a recording,
  `sinks.py`) are never skipped. Training runs in each engine's own background thread and never
  holds this path up; the engines share one CPU budget (`budget.CpuBudget`, ``--cpu-budget``).
  Past capacity the status says so (``capacity``) and the log once (`capacity.CapacityMonitor`).
- The REP control socket is answered between batches by `ControlHandler` (`control.py`).
- Between batches, housekeeping: streams without frames for ``--idle-s`` go idle (training
  paused), and with ``--state-dir`` every live stream is checkpointed every
  ``--checkpoint-interval`` s and at shutdown (`statestore.py`), so a restarted daemon resumes.
Sockets bind loopback only unless ``--allow-remote`` with CURVE keys (`wire/security.py`).
The terminal status is `status.py`. Wire format: `wire/protocol.py` and docs/protocol.md;
failure behaviour: docs/reliability.md; remote set-up: docs/security.md.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import zmq

from umvd_live import __version__
from umvd_live.apps.logs import configure as configure_logs
from umvd_live.daemon.capacity import CapacityMonitor, Plan, plan_inference
from umvd_live.daemon.control import ControlError, ControlHandler
from umvd_live.daemon.runtime import enabled as runtime_enabled
from umvd_live.daemon.sinks import FrameSink, RecordingSink
from umvd_live.daemon.statestore import WEIGHTS_CHECKPOINT_INTERVAL_S, StateStore
from umvd_live.daemon.status import StatusDisplay
from umvd_live.daemon.streams import (
    IDLE_AFTER_S,
    DenoisedOutput,
    StreamEngine,
    StreamEngineFactory,
    Arrival,
    LiveStream,
    StreamStarted,
    monotonic,
)
from umvd_live.engine.budget import CpuBudget
from umvd_live.engine.checkpoint import CheckpointError, load_checkpoint
from umvd_live.wire.protocol import (
    MAX_PIXELS,
    RAW_SUFFIX,
    STREAM_NAME,
    Frame,
    ProtocolError,
    StreamEnd,
    decode_message,
    decode_stream_name,
    encode_denoised,
)
from umvd_live.wire.security import (
    CurveServer,
    CurveServerConfig,
    PathNotAllowed,
    SecurityError,
    check_bind,
    confine_path,
    is_loopback,
)

log = logging.getLogger("umvd_live.daemon")

#: ZeroMQ queue lengths (messages). The receiver thread keeps the input side short; the output
#: side drops for a viewer that stopped reading rather than growing without bound.
INPUT_RCVHWM = 1000
OUTPUT_SNDHWM = 1000
#: Longest a closing output socket keeps trying to deliver what it still holds.
OUTPUT_LINGER_MS = 2000
#: Largest message part accepted off the wire; ZeroMQ drops a peer that sends more.
MAX_PART_BYTES = MAX_PIXELS * 4 + 64 * 1024
#: How long the main loop waits for frames before it looks at the control socket again.
IDLE_WAIT_S = 0.02
#: Rejections logged in full per reason before only every Nth is.
REJECTION_LOG_FIRST = 5
REJECTION_LOG_EVERY = 1000
#: Seconds between housekeeping passes (idle streams, periodic checkpoints).
HOUSEKEEPING_S = 0.5
#: Seconds between evaluations of the load while frames come (`capacity.CapacityMonitor`).
CAPACITY_CHECK_S = 0.25
#: A run of one stream's frames holds at most this many times `run_length` frames: skipped ones
#: ride along with the windows to denoise, but a long backlog is not taken through G at once.
RUN_CAP = 4


# ---- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DaemonConfig:
    input_bind: str | None = "tcp://127.0.0.1:5555"
    input_connect: tuple[str, ...] = ()
    output: str = "tcp://127.0.0.1:5556"
    control: str = "tcp://127.0.0.1:5557"
    preset: str = "auto"
    device: str = "auto"
    window: int = 7
    context: tuple[int, ...] | None = None  # the preset's when None
    warmup_frames: int = 300
    init: str | None = None
    prior: str = "auto"  # engine.EngineConfig.prior
    seed: int = 0
    record: str | None = None
    output_dir: Path = Path(".")
    state_dir: Path | None = None
    max_streams: int = 16
    inbox_bytes: int = 1 << 30
    status_interval_s: float = 5.0
    catchup_s: float = 0.1  # backlog (in estimated inference time) worked through before skipping
    batch: int | None = None  # windows per forward pass; None: the engine's default for the device
    workers: int | None = None  # forward passes at once; None: the engine's default (background training)
    precision: str = "auto"  # engine.EngineConfig.precision
    cpu_budget: int | None = None  # cores the engines share (`budget.CpuBudget`); None: the cores it may use
    warmup_steps: int | None = None  # engine default when None
    checkpoint_interval_s: float = WEIGHTS_CHECKPOINT_INTERVAL_S  # with state_dir
    idle_after_s: float = IDLE_AFTER_S  # no frame for this long: the stream is idle
    allow_remote: bool = False  # bind beyond loopback (needs curve)
    curve: CurveServerConfig | None = None

    @property
    def model_dir(self) -> Path:
        """Where `save_model`/`load_model` paths live: the state directory, else the output one."""
        return self.state_dir if self.state_dir is not None else self.output_dir

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DaemonConfig":
        connect = tuple(args.input_connect or ())
        input_bind = args.input if args.input is not None else (None if connect else cls.input_bind)
        return cls(
            input_bind=input_bind, input_connect=connect, output=args.output, control=args.control,
            preset=args.preset, device=args.device, window=args.window, context=args.context,
            warmup_frames=args.warmup_frames, init=args.init, prior=args.prior, seed=args.seed, record=args.record,
            output_dir=Path(args.output_dir), state_dir=Path(args.state_dir) if args.state_dir else None,
            max_streams=args.max_streams, inbox_bytes=int(args.inbox_mb * 2**20),
            status_interval_s=args.status_interval, catchup_s=args.catchup_ms / 1000.0,
            warmup_steps=args.warmup_steps, batch=args.batch, workers=args.workers,
            precision=args.precision, cpu_budget=args.cpu_budget,
            checkpoint_interval_s=args.checkpoint_interval, idle_after_s=args.idle_s,
            allow_remote=args.allow_remote, curve=_curve_config(args),
        )


def _curve_config(args: argparse.Namespace) -> CurveServerConfig | None:
    key, clients = args.curve_server_key, args.curve_clients
    if key is None and clients is None:
        return None
    if key is None or clients is None:
        raise SecurityError("CURVE needs both --curve-server-key and --curve-clients")
    return CurveServerConfig(Path(key), Path(clients))


def _same_run(first: Frame, frame: Frame) -> bool:
    """Whether `frame` can join the run `first` began: the same stream, shape and dtype."""
    h, f = first.header, frame.header
    return (first.stream, h.shape, h.dtype) == (frame.stream, f.shape, f.dtype)


def inference_layout(config: DaemonConfig) -> tuple[int, int]:
    """(windows per forward pass, passes at once) of the daemon's engines, which train in the
    background: ``--batch`` and ``--workers``, else the engine's defaults for the device
    (`engine.inference_layout`). Checked here, so a bad flag stops start-up, not the first frame."""
    from umvd_live.engine.stream import inference_layout as engine_layout, pick_device

    for flag, value in (("--batch", config.batch), ("--workers", config.workers), ("--cpu-budget", config.cpu_budget)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    return engine_layout(pick_device(config.device), "background", config.batch, config.workers, config.cpu_budget)


def check_loopback(endpoint: str) -> None:
    """Refuse to bind a TCP endpoint beyond this machine (no --allow-remote, no CURVE)."""
    check_bind(endpoint, allow_remote=False, curve=False)


class EngineFactory:
    """Makes the daemon's engines (`engine.StreamDenoiser`, training in the background): one per
    stream, all sharing one CPU budget (`budget.CpuBudget`, ``--cpu-budget``), which re-divides
    its cores as engines are made and closed. ``budget``: the daemon's status reports it."""

    def __init__(self, config: DaemonConfig, budget: CpuBudget | None = None):
        self.config = config
        self.budget = budget if budget is not None else CpuBudget(config.cpu_budget)
        #: `UMVD_LIVE_SHARED_BUDGET=off`: every engine sizes its threads as if it were alone, as
        #: before the budget (to measure what sharing does: docs/benchmarks.md).
        self.shared = runtime_enabled("SHARED_BUDGET")

    def __call__(self, init: str | None) -> StreamEngine:
        from umvd_live.engine.stream import EngineConfig, StreamDenoiser

        config = self.config
        extra = {} if config.warmup_steps is None else {"warmup_steps": config.warmup_steps}
        return StreamDenoiser(EngineConfig(
            preset=config.preset, device=config.device, window=config.window, context=config.context,
            warmup_frames=config.warmup_frames, train_mode="background", seed=config.seed, init=init,
            prior=config.prior, max_batch=config.batch, workers=config.workers, precision=config.precision,
            **extra,
        ), budget=self.budget if self.shared else CpuBudget(config.cpu_budget))


def engine_factory(config: DaemonConfig) -> EngineFactory:
    """The daemon's engine factory: StreamDenoisers training in the background (inference first),
    sharing one CPU budget."""
    return EngineFactory(config)


# ---- input --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Received:
    parts: list[bytes]
    received: float  # monotonic() when taken from the socket
    nbytes: int


class Inbox:
    """A FIFO between the receiver thread and the main loop, bounded in bytes, never blocking."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.overflow = 0  # messages refused because the budget was spent
        self._items: deque[Received] = deque()
        self._cond = threading.Condition()

    def put(self, item: Received) -> bool:
        with self._cond:
            if self.nbytes + item.nbytes > self.max_bytes:
                self.overflow += 1
                return False
            self._items.append(item)
            self.nbytes += item.nbytes
            self._cond.notify()
            return True

    def drain(self, timeout: float) -> list[Received]:
        """Everything waiting, after waiting up to ``timeout`` s for something to arrive."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            items = list(self._items)
            self._items.clear()
            self.nbytes = 0
            return items

    def __len__(self) -> int:
        return len(self._items)


class InputReceiver(threading.Thread):
    """Owns the SUB socket: drains it into the inbox as fast as messages come."""

    def __init__(self, ctx: zmq.Context, config: DaemonConfig, inbox: Inbox,
                 secure: Callable[[zmq.Socket], None] = lambda sock: None):
        super().__init__(name="umvd-input", daemon=True)
        self.inbox = inbox
        self._stop_event = threading.Event()
        self.socket = ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, INPUT_RCVHWM)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_PART_BYTES)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.endpoints: list[str] = []
        if config.input_bind is not None:
            secure(self.socket)  # a CURVE server for the producers that connect
            self.socket.bind(config.input_bind)
            self.endpoints.append(self.socket.getsockopt_string(zmq.LAST_ENDPOINT))
        for endpoint in config.input_connect:
            self.socket.connect(endpoint)
            self.endpoints.append(f"{endpoint} (connected)")

    def run(self) -> None:
        sock = self.socket
        try:
            while not self._stop_event.is_set():
                if not sock.poll(50, zmq.POLLIN):
                    continue
                while True:  # drain everything that is there before polling again
                    try:
                        parts = sock.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.inbox.put(Received(parts, monotonic(), sum(len(p) for p in parts)))
        finally:
            sock.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


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


# ---- the daemon ---------------------------------------------------------------------------------
@dataclass
class _Stop:
    requested: bool = False
    reason: str = ""


class Daemon:
    """Routes frames from the input to per-stream denoisers and their outputs to the viewers."""

    def __init__(self, config: DaemonConfig, make_denoiser: StreamEngineFactory, sinks: Sequence[FrameSink] = ()):
        self.config = config
        self.make_denoiser = make_denoiser
        self.batch, self.workers = inference_layout(config)
        #: Frames of one stream handed to its engine at once: enough for every worker's pass.
        self.run_length = self.batch * self.workers
        self.sinks: list[FrameSink] = list(sinks)
        self.streams: dict[str, LiveStream] = {}
        #: The cores the engines share (the factory's, when it has one: `EngineFactory`).
        self.budget: CpuBudget | None = getattr(make_denoiser, "budget", None)
        self.capacity = CapacityMonitor(clock=monotonic)
        self._stream_starts = 0  # denoisers started (building a network is not load)
        self._turn = 0  # which stream the preview's ties go to first (`plan_inference`)
        self._next_capacity_check = 0.0
        self.store = StateStore(config.state_dir, config.checkpoint_interval_s) if config.state_dir else None
        self.curve: CurveServer | None = None
        self._next_housekeeping = 0.0
        self._next_checkpoint = time.monotonic() + config.checkpoint_interval_s
        self.rejected_unattributed: Counter[str] = Counter()
        self.training_paused = False
        self.control = ControlHandler(self, config.model_dir)
        self._log_rejection = RejectionLog()
        self._stop = _Stop()
        self._finished = False
        self._started = time.monotonic()
        self._ctx = zmq.Context()
        self.inbox = Inbox(config.inbox_bytes)
        self.receiver: InputReceiver | None = None
        self.output: zmq.Socket | None = None
        self.control_socket: zmq.Socket | None = None
        self.endpoints: dict[str, str] = {}
        self.recording: RecordingSink | None = None
        self._stopped_recordings: list[RecordingSink] = []  # still writing their backlog

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the sockets and start receiving. Raises on a bad or busy endpoint."""
        cfg = self.config
        for endpoint in filter(None, (cfg.input_bind, cfg.output, cfg.control)):
            check_bind(endpoint, allow_remote=cfg.allow_remote, curve=cfg.curve is not None)
        for endpoint in cfg.input_connect:  # a remote producer connects to us, under CURVE
            if not is_loopback(endpoint):
                raise SecurityError(f"--input-connect {endpoint}: only loopback producers can be "
                                    "connected to; a remote producer connects to --input (docs/security.md)")
        if cfg.curve is not None:
            self.curve = CurveServer(cfg.curve)  # SecurityError: bad keys, before anything binds
            self.curve.start(self._ctx)
        self.output = self._ctx.socket(zmq.PUB)
        self.output.setsockopt(zmq.SNDHWM, OUTPUT_SNDHWM)
        self.output.setsockopt(zmq.LINGER, OUTPUT_LINGER_MS)
        self._secure(self.output)
        self.output.bind(cfg.output)
        self.control_socket = self._ctx.socket(zmq.REP)
        self.control_socket.setsockopt(zmq.LINGER, 500)
        self._secure(self.control_socket)
        self.control_socket.bind(cfg.control)
        self.receiver = InputReceiver(self._ctx, cfg, self.inbox, self._secure)
        self.endpoints = {
            "input": ", ".join(self.receiver.endpoints),
            "output": self.output.getsockopt_string(zmq.LAST_ENDPOINT),
            "control": self.control_socket.getsockopt_string(zmq.LAST_ENDPOINT),
        }
        self.receiver.start()
        if self.store is not None:
            log.info("state directory %s: checkpoints every %.0f s and at shutdown",
                     self.store.directory, self.store.interval_s)
        log.info("ready: input=%s output=%s control=%s", *self.endpoints.values())

    def _secure(self, sock: zmq.Socket) -> None:
        if self.curve is not None:
            self.curve.apply(sock)

    def request_stop(self, reason: str) -> None:
        """Safe from a signal handler: the loop notices within IDLE_WAIT_S."""
        self._stop.requested, self._stop.reason = True, reason

    def serve(self, display: StatusDisplay | None = None) -> None:
        """The main loop, until `shutdown` or a signal; then everything owed is flushed."""
        while not self._stop.requested:
            items = self.inbox.drain(IDLE_WAIT_S)
            if items:
                self.process(items)
            self._answer_control()
            self._housekeeping()
            if display is not None and display.due():
                display.show(self.status())
        log.info("stopping (%s)", self._stop.reason)
        self.finish()
        if display is not None:
            display.show(self.status())

    def finish(self) -> int:
        """Stop receiving, process what was received, flush every stream. Idempotent."""
        if self._finished:
            return 0
        self._finished = True
        if self.receiver is not None:
            self.receiver.stop()
        leftover = self.inbox.drain(0)
        if leftover:
            self.process(leftover, allow_skip=False)
        flushed = 0
        for live in self.streams.values():
            outputs = live.close()
            flushed += len(outputs)
            self._publish(outputs)
        for sink in self.sinks + self._stopped_recordings:
            try:
                sink.close()
            except Exception:
                log.exception("closing sink %r failed", sink)
        return flushed

    def close(self) -> None:
        self.finish()
        for sock in (self.output, self.control_socket):
            if sock is not None:
                sock.close()
        if self.curve is not None:
            self.curve.stop()
        self._ctx.term()

    def _housekeeping(self) -> None:
        """Idle streams stop training; live streams are checkpointed every interval."""
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + HOUSEKEEPING_S
        clock = monotonic()
        for live in self.streams.values():
            live.check_idle(clock)
        self._check_capacity(clock)
        if self.store is not None and now >= self._next_checkpoint:
            self._next_checkpoint = now + self.store.interval_s
            for live in self.streams.values():
                live.checkpoint()

    # ---- frames -------------------------------------------------------------------------------
    def process(self, items: Sequence[Received], allow_skip: bool = True) -> None:
        """Validate, route and denoise one batch taken from the inbox, in arrival order.

        Consecutive frames of one stream (and one shape) go to its engine together, with up to
        `run_length` windows to denoise, so they are denoised in batched passes side by side;
        frames of several streams (channels, planes) arrive interleaved, so each stream's frames
        of the batch are taken together, in their order. Which frames the preview infers when it
        is behind: `_plan`. The raw input is published first, as it came."""
        began, starts = monotonic(), self._stream_starts
        frames: list[tuple[Frame | StreamEnd, Received]] = []
        for item in items:
            message = self._decode(item)
            if isinstance(message, StreamEnd):
                if message.stream in self.streams:  # the end of a stream never seen ends nothing
                    frames.append((message, item))
            # A stream exists from its first valid frame on, so a malformed message after that
            # frame counts on the stream, as it would in a batch of its own.
            elif message is not None and (message.stream in self.streams
                                          or self._new_stream(message.stream, self.config.init)):
                frames.append((message, item))
        plan = self._plan([m.stream for m, _ in frames if isinstance(m, Frame)], allow_skip)
        flags = iter(plan.infer)
        tagged = [(m, item, next(flags) if isinstance(m, Frame) else True) for m, item in frames]
        for message, item, _ in tagged:
            if isinstance(message, Frame):
                self._publish_raw(item)
        # One stream after the other (a stable sort: each stream's own order is kept), so a
        # stream that is behind gives its engine runs of several windows to denoise side by side
        # (`--workers`) instead of one window per run between the other streams' frames.
        first_seen: dict[str, int] = {}
        tagged.sort(key=lambda t: first_seen.setdefault(t[0].stream, len(first_seen)))
        run: list[Arrival] = []
        for frame, item, infer in tagged:
            live = self.streams[frame.stream]
            if isinstance(frame, StreamEnd):
                if run and run[0].frame.stream == frame.stream:
                    self._accept(run)
                    run = []
                self._publish(live.finish(frame.seq))
                continue
            if run and not _same_run(run[0].frame, frame):
                self._accept(run)
                run = []
            run.append(Arrival(frame, item.received, infer))
            # Skipped frames ride along (G only): a run ends when it holds a round of windows to
            # denoise, or when it grows long.
            if sum(a.infer for a in run) >= self.run_length or len(run) >= RUN_CAP * self.run_length:
                self._accept(run)
                run = []
        if run:
            self._accept(run)
        if items:
            # Building a stream's network is a one-off, not load.
            self.capacity.note_batch(began, monotonic(), plan.skipped_cost_s, began - items[0].received,
                                     plan.skipped, count_busy=self._stream_starts == starts)
            self._check_capacity(monotonic(), every_s=CAPACITY_CHECK_S)

    def _accept(self, run: list[Arrival]) -> None:
        """Hand a run of one stream's frames to its `LiveStream`; publish what became ready."""
        live = self.streams[run[0].frame.stream]
        try:
            outputs, started = live.accept(run)
        except Exception as exc:  # an engine failure must not end the session
            live.note_rejected("engine_error", len(run))
            self._log_rejection(live.name, ProtocolError("engine_error", repr(exc)))
            return
        if started is not None:
            self._notify_started(live, started)
        self._publish(outputs)
        for arrival in run:  # after the push, so a new stream's model exists for provenance
            for sink in self.sinks:
                sink.on_raw(arrival.frame, arrival.received)

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

    def _new_stream(self, name: str, init: str | None) -> LiveStream | None:
        if len(self.streams) >= self.config.max_streams:
            self.rejected_unattributed["too_many_streams"] += 1
            self._log_rejection(name, ProtocolError(
                "too_many_streams", f"{name!r}: already {len(self.streams)} streams (--max-streams)"))
            return None
        live = LiveStream(name, self.make_denoiser, init=init, store=self.store,
                          idle_after_s=self.config.idle_after_s, run_length=self.run_length)
        live.training_paused = self.training_paused
        self.streams[name] = live
        log.info("stream %s: first message", name)
        return live

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
        return plan_inference(streams, costs, self._owed, self.run_length, self.config.catchup_s, rotate=self._turn)

    def _check_capacity(self, now: float, every_s: float = 0.0) -> None:
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
            owed = [name for name in self.streams if self._owed(name)]
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

    def _owed(self, stream: str) -> bool:
        return any(sink.owes(stream) for sink in self.sinks)

    def _notify_started(self, live: LiveStream, started: StreamStarted) -> None:
        self._stream_starts += 1
        if not self.sinks or live.denoiser is None:
            return
        weights = live.denoiser.weights_hash()
        for sink in self.sinks:
            sink.on_stream_started(started, weights)

    def _publish_raw(self, item: Received) -> None:
        """The input as received, under ``<stream>/raw``, for side-by-side views."""
        assert self.output is not None
        topic = bytes(item.parts[0]) + RAW_SUFFIX.encode()
        self.output.send_multipart([topic, item.parts[1], item.parts[2]], flags=zmq.NOBLOCK, copy=False)

    def _publish(self, outputs: Iterable[DenoisedOutput]) -> None:
        assert self.output is not None
        for out in outputs:
            live = self.streams[out.stream]
            for sink in self.sinks:
                sink.on_denoised(out)
            if out.image is None:
                live.note_skipped()
                continue
            now = monotonic()
            latency_ms = (now - out.received) * 1000.0
            parts = encode_denoised(out.stream, out.header, out.image, state=out.state,
                                    latency_ms=latency_ms, model_step=out.model_step)
            self.output.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            live.note_published(latency_ms, now, out.received)

    # ---- control ------------------------------------------------------------------------------
    def _answer_control(self) -> None:
        sock = self.control_socket
        assert sock is not None
        while not self._stop.requested and sock.poll(0, zmq.POLLIN):
            request = sock.recv()
            sock.send(self.control.handle_bytes(request))

    def status(self) -> dict[str, Any]:
        now = monotonic()
        cfg = self.config
        return {
            "version": __version__,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "endpoints": self.endpoints,
            "engine": {"preset": cfg.preset, "device": cfg.device, "window": cfg.window,
                       "context": cfg.context, "warmup_frames": cfg.warmup_frames, "warmup_steps": cfg.warmup_steps,
                       "init": cfg.init, "prior": cfg.prior},
            "catchup_ms": 1000 * cfg.catchup_s,
            "model_dir": str(cfg.model_dir.resolve()),
            "training_paused": self.training_paused,
            "state_dir": self.store.summary() if self.store is not None else None,
            "curve": self.curve is not None,
            "streams": {name: live.snapshot(now) for name, live in self.streams.items()},
            "capacity": self.capacity.snapshot(now) | {
                "skipped": {name: live.counters.skipped for name, live in self.streams.items()},
                "budget": self.budget.summary() if self.budget is not None else None,
            },
            "rejected_unattributed": dict(self.rejected_unattributed),
            "inbox": {"depth": len(self.inbox), "bytes": self.inbox.nbytes, "overflow": self.inbox.overflow},
            "recording": self.recording.session.status().to_dict() if self.recording else None,
            "commands": self.control.commands,
        }

    def stream_names(self) -> list[str]:
        return list(self.streams)

    def set_training_paused(self, stream: str | None, paused: bool) -> list[str]:
        if stream is None:
            self.training_paused = paused
        names = [stream] if stream is not None else list(self.streams)
        for name in names:
            self.streams[name].set_training_paused(paused)
        log.info("training %s: %s", "paused" if paused else "resumed", ", ".join(names) or "(no stream yet)")
        return names

    def reset_streams(self, stream: str | None) -> list[str]:
        names = [stream] if stream is not None else list(self.streams)
        for name in names:
            live = self.streams[name]
            outputs, started = live.reset(self.config.init)
            self._publish(outputs)
            if started is not None:
                self._notify_started(live, started)
            log.info("stream %s: model reset", name)
        return names

    def save_model(self, stream: str, path: Path) -> dict[str, Any]:
        den = self.streams[stream].denoiser
        if den is None:
            raise ControlError(f"stream {stream!r} has no model yet (no valid frame so far)")
        path.parent.mkdir(parents=True, exist_ok=True)
        den.save_weights(str(path))
        log.info("stream %s: weights saved to %s", stream, path)
        return {"stream": stream, "path": str(path), "weights_hash": den.weights_hash(),
                "model_step": int(den.model_step)}

    def load_model(self, stream: str, path: Path) -> dict[str, Any]:
        try:
            load_checkpoint(path)  # refuse a corrupt or foreign file now, not at the first frame
        except CheckpointError as exc:
            raise ControlError(str(exc)) from None
        live = self.streams.get(stream)
        if live is None:
            if not STREAM_NAME.match(stream):
                raise ControlError(f"stream name {stream!r} must match {STREAM_NAME.pattern}")
            live = self._new_stream(stream, str(path))
            if live is None:
                raise ControlError(f"already {len(self.streams)} streams (--max-streams)")
            live.init_explicit = True
            log.info("stream %s: will start from %s", stream, path)
            return {"stream": stream, "path": str(path), "applied": "at_first_frame"}
        live.init = str(path)  # a later shape change starts from these weights as well
        live.init_explicit = True
        if live.denoiser is None:
            return {"stream": stream, "path": str(path), "applied": "at_first_frame"}
        live.denoiser.load_weights(str(path))
        log.info("stream %s: weights loaded from %s", stream, path)
        return {"stream": stream, "path": str(path), "applied": "now",
                "weights_hash": live.denoiser.weights_hash()}

    # ---- recording (umvd_live.recording.session) -------------------------------------------------------
    def start_recording(self, path: str | Path, streams: list[str] | None, raw: bool,
                        confine: bool = True) -> dict[str, Any]:
        """Record every denoised frame (and the raw input with ``raw``) of the streams named, or
        of every stream. Control-socket paths are confined to the output directory."""
        from umvd_live.recording.session import RecordingError, RecordingRequest, RecordingSession

        if self.recording is not None:
            raise ControlError("a recording is running; record_stop first")
        try:
            target = confine_path(str(path), self.config.output_dir) if confine else Path(path)
            request = RecordingRequest(path=target, streams=frozenset(streams) if streams else None, raw=raw)
            session = RecordingSession(request, provenance=self._provenance, on_error=self._recording_failed)
        except (PathNotAllowed, RecordingError) as exc:
            raise ControlError(str(exc)) from None
        self.recording = RecordingSink(session)
        self.sinks.append(self.recording)
        log.info("recording to %s (%s%s)", target, ", ".join(streams) if streams else "every stream",
                 ", with raw" if raw else "")
        return {"path": str(target), "streams": streams, "raw": raw}

    def stop_recording(self) -> dict[str, Any]:
        """Stop taking frames; the recorder finishes writing its backlog in the background."""
        if self.recording is None:
            raise ControlError("no recording is running")
        sink, self.recording = self.recording, None
        self.sinks.remove(sink)
        sink.session.stop(wait=False)
        self._stopped_recordings.append(sink)
        log.info("recording stopped")
        return {"recording": sink.session.status().to_dict()}

    def _provenance(self, stream: str) -> Any:
        from umvd_live.recording.ometiff import Provenance

        den = self.streams[stream].denoiser if stream in self.streams else None
        spec = getattr(den, "spec", None)
        return Provenance(
            stream=stream, preset=getattr(den, "preset", None) or self.config.preset,
            window=self.config.window, weights_sha256=den.weights_hash() if den is not None else None,
            device=str(getattr(den, "device", self.config.device)), source=self.endpoints.get("input"),
            extra=_engine_provenance(den) if den is not None and spec is not None else {},
        )

    def _recording_failed(self, message: str) -> None:
        log.error("recording failed, live output goes on: %s", message)

    def shutdown(self) -> dict[str, Any]:
        """Flush everything owed before replying, so the reply means: all outputs are published."""
        flushed = self.finish()
        self.request_stop("shutdown command")
        return {"flushed": flushed}


# ---- command line -------------------------------------------------------------------------------
def _setup_logging(display: StatusDisplay, level: str) -> None:
    """The shared format and levels (`logs.configure`); on a terminal the lines go through the live
    status display's console instead, so they do not tear its table, in the same format."""
    configure_logs(level)
    if display.interactive:
        from rich.logging import RichHandler

        root = logging.getLogger()
        for plain in list(root.handlers):
            rich = RichHandler(console=display.console, show_path=False, show_time=False, show_level=False)
            rich.setFormatter(plain.formatter)
            for kept in plain.filters:
                rich.addFilter(kept)
            root.removeHandler(plain)
            root.addHandler(rich)


def run(args: argparse.Namespace) -> int:
    try:
        config = DaemonConfig.from_args(args)
    except SecurityError as exc:
        print(f"umvd-live serve: {exc}", file=sys.stderr)
        return 2
    # A bad model file is refused now, not at each stream's first frame.
    for flag, path in (("--init", config.init), ("--prior", None if config.prior in ("auto", "none") else config.prior)):
        if path is None:
            continue
        try:
            load_checkpoint(path)
        except CheckpointError as exc:
            print(f"umvd-live serve: {flag}: {exc}", file=sys.stderr)
            return 2
    display = StatusDisplay(interval_s=config.status_interval_s)
    _setup_logging(display, getattr(args, "log_level", "info"))
    try:
        daemon = Daemon(config, engine_factory(config))
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    try:
        daemon.start()
        if config.record is not None:  # the operator's own path: not confined
            daemon.start_recording(config.record, None, raw=False, confine=False)
    except (zmq.ZMQError, ValueError, ControlError, OSError) as exc:  # SecurityError is a ValueError
        log.error("cannot start: %s", exc)
        daemon.close()
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: daemon.request_stop(signal.Signals(signum).name))
    try:
        with display:
            daemon.serve(display)
    finally:
        daemon.close()
    log.info("exited cleanly")
    return 0


def _engine_provenance(den: Any) -> dict[str, str]:
    """What a recording says of the network that made it: its context blocks and the prior it
    started on (name and weights sha256)."""
    extra = {"context_blocks": ",".join(map(str, den.spec.context)) or "none"}
    prior = getattr(den, "prior", None)
    if prior is not None:
        extra.update(prior=prior.name, prior_sha256=prior.sha256)
    return extra
