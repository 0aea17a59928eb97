"""`umvd-live serve`: the daemon's life cycle, its frame loop, housekeeping and control.

The rooms of the daemon, and who does what:
- `transport.py` binds the sockets. Its threads keep the input (``umvd-input``: every message
  into the inbox the moment it arrives) and the control socket (``umvd-control``) answered.
- `router.py` turns a batch drained from the inbox into runs of frames for each stream's engine
  (`streams.LiveStream`) and fans everything out to the sinks (`sinks.py`: the viewers' socket, a
  recording). Training runs in each engine's own background thread; the engines share one CPU
  budget (`engine.budget.CpuBudget`, ``--cpu-budget``).
- `Daemon` (here) runs the frame loop on the thread that calls `serve` (or `run_once`, one pass):
  drain the inbox, route the batch, answer control, housekeeping.
- Control: ``status`` is answered at the loop's next safe point (the router calls back between
  bounded pieces of work: every few hundred messages decoded, every run handed to an engine), so
  it comes within a run's time even while the input is flooded; should the loop still be late
  (a network being built), the control thread sends the last snapshot, with its age
  (``status_age_s``). Every other command changes what the loop owns and runs between batches.
  A command that fails is answered all the same, with its error (`control.ControlHandler.failure`),
  and the loop goes on; ``status`` counts those failures and the socket threads' own errors.
- Nothing slow runs on the loop: weight checkpoints (``--state-dir``: every
  ``--checkpoint-interval`` s, at a shape change and at shutdown), `save_model` and weights hashes
  (a recording's too: the loop only copies the weights) run on the one state worker
  (``umvd-state``, `statestore.StateWorker`), joined at shutdown after the final checkpoints.
- Housekeeping, between batches: streams without frames for ``--idle-s`` go idle (training
  paused), the capacity is re-evaluated, periodic checkpoints are queued.
- ``--ready-file``: once every socket is bound, the endpoints and the pid as JSON
  (`write_ready_file`); there only while the daemon serves: a previous run's is removed before
  binding, this run's at `close` (`remove_ready_file`).
- Signals: SIGINT, SIGTERM and, on Windows, SIGBREAK (Ctrl-Break, ``CTRL_BREAK_EVENT``) stop the
  loop as ``shutdown`` does (`portable.stop_signals`); from before the sockets are bound, so one
  that comes while the daemon starts closes it without serving (`run`).
The terminal status is `status.py`. Wire format: `wire/protocol.py` and docs/protocol.md;
failure behaviour: docs/reliability.md; remote set-up: docs/security.md.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import zmq

from umvd_live import __version__
from umvd_live.daemon.config import DaemonConfig
from umvd_live.daemon.control import ControlError, ControlHandler, Reply, read_only
from umvd_live.daemon.engines import engine_factory, inference_layout
from umvd_live.daemon.router import Router
from umvd_live.daemon.sinks import FrameSink, PublisherSink, RecordingSink, WeightsHashes
from umvd_live.daemon.statestore import StateStore, StateWorker
from umvd_live.daemon.status import StatusDisplay
from umvd_live.daemon.streams import StreamEngineFactory, monotonic
from umvd_live.daemon.transport import PendingReply, Transport
from umvd_live.engine.checkpoint import (
    CheckpointError,
    SavedWeights,
    check_model_flags,
    load_checkpoint,
    weights_hash,
    write_atomically,
)
from umvd_live.engine.device import DeviceUnavailable, pick_device
from umvd_live.engine.provenance import network_provenance
from umvd_live.portable import handle_stop_signals, restore_signals, signal_name
from umvd_live.wire.protocol import STREAM_NAME
from umvd_live.wire.security import PathNotAllowed, confine_path

if TYPE_CHECKING:
    from umvd_live.engine import StreamDenoiser
    from umvd_live.recording.ometiff import Provenance
    from umvd_live.recording.session import RecordingRequest
    from umvd_live.wire.schema import (
        CapacityStatus,
        ControlStatus,
        DaemonStatus,
        EndpointsStatus,
        EngineSettings,
        RecordingStatus,
    )

log = logging.getLogger("umvd_live.daemon")

#: How long the frame loop waits for frames before it looks at control and housekeeping again.
IDLE_WAIT_S = 0.02
#: Seconds between housekeeping passes (idle streams, capacity, periodic checkpoints).
HOUSEKEEPING_S = 0.5
#: How long a ``status`` request waits for the loop's fresh answer before the control thread
#: sends the last snapshot instead (docs/reliability.md: answered within 0.5 s under a flood).
STATUS_WAIT_S = 0.25
#: Format of the ``--ready-file`` JSON.
READY_FILE_VERSION = 1


@dataclass
class _Stop:
    requested: bool = False
    reason: str = ""


class Daemon:
    """The daemon: binds its sockets, runs the frame loop, answers control, shuts down cleanly."""

    def __init__(self, config: DaemonConfig, make_denoiser: StreamEngineFactory, sinks: Sequence[FrameSink] = ()):
        self.config = config
        self.batch, self.workers = inference_layout(config)
        self.transport = Transport(config)
        self.worker = StateWorker()
        self.store = StateStore(config.state_dir, config.checkpoint_interval_s, self.worker) \
            if config.state_dir else None
        self.router = Router(config, make_denoiser, self.batch * self.workers, self.transport.inbox,
                             store=self.store, budget=getattr(make_denoiser, "budget", None),
                             between=self._answer_status)
        self.router.sinks.extend(sinks)
        self.control = ControlHandler(self, config.model_dir,
                                      checkpoints=self.store.checkpoints if self.store is not None else None)
        self.endpoints: EndpointsStatus = {"input": "", "output": "", "control": ""}  # bound by `start`
        self.recording: RecordingSink | None = None
        self._stopped_recordings: list[RecordingSink] = []  # still writing their backlog
        #: Requests from the control thread; those that must wait for the end of a batch.
        self._requests: queue.SimpleQueue[tuple[dict[str, Any], Future[bytes]]] = queue.SimpleQueue()
        self._held: deque[tuple[dict[str, Any], Future[bytes]]] = deque()
        self._answering = False  # a command runs (a shutdown's flush calls back into the loop)
        self._last_status: tuple[float, DaemonStatus] | None = None  # what a late status reply sends
        self._display: StatusDisplay | None = None
        self._stop = _Stop()
        self._finished = False
        self._started = time.monotonic()
        self._next_housekeeping = 0.0
        self._next_checkpoint = time.monotonic() + config.checkpoint_interval_s

    @property
    def run_length(self) -> int:
        """Frames of one stream handed to its engine at once: a pass of every worker's batch."""
        return self.router.run_length

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the sockets and start receiving; start ``--record``'s recording; say ``ready``.
        Raises on a bad or busy endpoint."""
        if self.config.ready_file is not None:  # a previous run's endpoints: never read as this run's
            remove_ready_file(self.config.ready_file)
        self.endpoints = self.transport.start(self._on_request)
        assert self.transport.output is not None
        self.router.sinks.insert(0, PublisherSink(self.transport.output))  # the viewers first
        if self.store is not None:
            log.info("state directory %s: checkpoints every %.0f s and at shutdown",
                     self.store.directory, self.store.interval_s)
        if self.config.recording is not None:  # the operator's own path: not confined
            self._start_recording(self.config.recording)
        self.status()  # the first snapshot, for a status request the loop is too busy to answer
        if self.config.ready_file is not None:
            write_ready_file(self.config.ready_file, self.endpoints)
        log.info("ready: input=%s output=%s control=%s", *self.endpoints.values())

    def request_stop(self, reason: str) -> None:
        """Safe from a signal handler: the loop notices within IDLE_WAIT_S."""
        self._stop.requested, self._stop.reason = True, reason

    @property
    def stop_reason(self) -> str | None:
        """Why a stop was requested (a signal's name, ``shutdown command``); None while none was."""
        return self._stop.reason if self._stop.requested else None

    def serve(self, display: StatusDisplay | None = None) -> None:
        """The frame loop, until `shutdown` or a signal; then everything owed is flushed."""
        self._display = display
        while not self._stop.requested:
            self.run_once()
        log.info("stopping (%s)", self._stop.reason)
        self.finish()
        if display is not None:
            display.show(self.status())

    def run_once(self, wait_s: float = IDLE_WAIT_S) -> None:
        """One pass of the frame loop: route what the inbox holds (waiting up to ``wait_s`` for
        something), answer the control requests, housekeeping, the terminal status when due."""
        items = self.transport.inbox.drain(wait_s)
        if items:
            self.router.process(items)
        self.router.collect()
        self._answer_requests(only_reads=False)
        self._housekeeping()
        if self._display is not None and self._display.due():
            self._display.show(self.status())

    def finish(self) -> int:
        """Stop receiving, process what was received, flush every stream, close the sinks, write
        the final checkpoints. Returns the outputs the flushes handed out. Idempotent."""
        if self._finished:
            return 0
        self._finished = True
        self.transport.stop_input()
        flushed = 0
        try:
            try:
                leftover = self.transport.inbox.drain(0)
                if leftover:
                    self.router.process(leftover, allow_skip=False)
            finally:  # a last batch that failed must not keep every stream from its flush
                flushed = self.router.close_streams()  # queues each live stream's final checkpoint
        finally:  # whatever failed above, the recordings are finished and the checkpoints written
            stopped = [sink for sink in self._stopped_recordings if sink not in self.router.sinks]
            for sink in self.router.sinks + stopped:
                try:
                    sink.close()
                except Exception:
                    log.exception("closing sink %r failed", sink)
            self.worker.shutdown()  # the final checkpoints are on disk
        return flushed

    def close(self) -> None:
        try:
            self.finish()
            if self.transport.control is not None:
                self.transport.control.stop_receiving()
            self._answer_requests(only_reads=False)  # what came meanwhile (a second shutdown: "flushed": 0)
            self.transport.close()  # the control thread sends the last replies first
        finally:  # its endpoints are gone: a launcher waiting for the file must not read them
            if self.config.ready_file is not None:
                remove_ready_file(self.config.ready_file, pid=os.getpid())

    def _housekeeping(self) -> None:
        """Idle streams stop training; the capacity is re-evaluated; live streams are
        checkpointed every interval (on the state worker)."""
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + HOUSEKEEPING_S
        clock = monotonic()
        for live in self.router.streams.values():
            live.check_idle(clock)
        self._finish_stopped_recordings()
        self.router.check_capacity(clock)
        if self.store is not None and now >= self._next_checkpoint:
            self._next_checkpoint = now + self.store.interval_s
            for live in self.router.streams.values():
                live.checkpoint()

    # ---- control ------------------------------------------------------------------------------
    def _on_request(self, data: bytes) -> PendingReply:
        """On the control thread: decode, queue for the loop, wake it. A ``status`` the loop is
        too busy to answer within `STATUS_WAIT_S` gets the last snapshot."""
        reply: Future[bytes] = Future()
        try:
            request = self.control.decode(data)
        except ControlError as exc:
            reply.set_result(self.control.encode_error(str(exc)))
            return PendingReply(reply)
        except Exception as exc:  # a bug: still an answer, never a client left waiting
            log.exception("control: cannot read a request")
            reply.set_result(self.control.encode_error(f"{type(exc).__name__}: {exc}"))
            return PendingReply(reply)
        self._requests.put((request, reply))
        self.transport.inbox.wake()
        if read_only(request):
            return PendingReply(reply, time.monotonic() + STATUS_WAIT_S, self._late_status)
        return PendingReply(reply)

    def _late_status(self) -> bytes:
        """On the control thread: the last status the loop made, with its age (none before
        `start` made the first: the control socket answers from its binding on)."""
        last = self._last_status
        if last is None:
            return self.control.encode_error("the daemon is starting; ask again")
        made, status = last
        return self.control.encode({"cmd": "status"},
                                   {"ok": True} | dict(status) | {"status_age_s": round(monotonic() - made, 3)})

    def _answer_status(self) -> None:
        """A safe point of the frame loop (the router calls it between pieces of work)."""
        self._answer_requests(only_reads=True)

    def _answer_requests(self, *, only_reads: bool) -> None:
        """Answer the queued requests, in order; with ``only_reads`` only those that change
        nothing (the loop is inside a batch), the others stay queued for the batch's end."""
        if self._answering:
            return
        while True:
            try:
                self._held.append(self._requests.get_nowait())
            except queue.Empty:
                break
        if not self._held:
            return
        self._answering = True
        try:
            kept: deque[tuple[dict[str, Any], Future[bytes]]] = deque()
            while self._held:
                request, reply = self._held.popleft()
                if only_reads and not read_only(request):
                    kept.append((request, reply))
                elif reply.set_running_or_notify_cancel():  # not given up on by the control thread
                    self._answer(request, reply)
            self._held = kept
        finally:
            self._answering = False

    def _answer(self, request: dict[str, Any], reply: Future[bytes]) -> None:
        if self._finished and request.get("cmd") != "status":
            if request.get("cmd") == "shutdown":
                self.request_stop("shutdown command")
                reply.set_result(self.control.encode(request, {"ok": True, "flushed": 0}))
            else:
                reply.set_result(self.control.encode_error("the daemon is shutting down"))
            return
        try:
            answer = self.control.handle(request)
        except Exception as exc:  # `handle` answers every failure itself; a bug in it must not end the loop
            reply.set_result(self.control.encode(request, self.control.failure(request.get("cmd"), exc)))
            return
        answer.add_done_callback(lambda done: reply.set_result(self.control.encode(request, done.result())))

    def status(self) -> DaemonStatus:
        now = monotonic()
        cfg, router = self.config, self.router
        status: DaemonStatus = {
            "version": __version__,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "status_age_s": 0.0,
            "endpoints": self.endpoints,
            # what every stream's engine is built from (its own starting weights aside)
            "engine": cast("EngineSettings", asdict(cfg.engine)),
            "catchup_ms": 1000 * cfg.catchup_s,
            "model_dir": str(cfg.model_dir.resolve()),
            "training_paused": router.training_paused,
            "state_dir": self.store.summary() if self.store is not None else None,
            "worker": self.worker.summary(),
            "curve": self.transport.curve is not None,
            "streams": {name: live.snapshot(now) for name, live in router.streams.items()},
            "capacity": cast("CapacityStatus", router.capacity.snapshot(now) | {
                "skipped": {name: live.counters.skipped for name, live in router.streams.items()},
                "budget": router.budget.summary() if router.budget is not None else None,
            }),
            "rejected_unattributed": dict(router.rejected_unattributed),
            "inbox": {"depth": len(self.transport.inbox), "bytes": self.transport.inbox.nbytes,
                      "overflow": self.transport.inbox.overflow,
                      "errors": self.transport.receiver.errors if self.transport.receiver is not None else 0},
            "control": self._control_status(),
            "recording": cast("RecordingStatus", self.recording.session.status().to_dict()) if self.recording else None,
            "commands": self.control.commands,
        }
        self._last_status = (now, status)
        return status

    def _control_status(self) -> ControlStatus:
        """The control thread's figures (zeros before `start` binds its socket), and the commands'."""
        server = self.transport.control
        waiting, busy, late, errors = (server.waiting, server.busy, server.late, server.errors) \
            if server is not None else (0, 0, 0, 0)
        return {"waiting": waiting, "busy": busy, "late": late, "failed": self.control.failed, "errors": errors}

    def stream_names(self) -> list[str]:
        return list(self.router.streams)

    def set_training_paused(self, stream: str | None, paused: bool) -> list[str]:
        if stream is None:
            self.router.training_paused = paused
        names = [stream] if stream is not None else list(self.router.streams)
        for name in names:
            self.router.streams[name].set_training_paused(paused)
        log.info("training %s: %s", "paused" if paused else "resumed", ", ".join(names) or "(no stream yet)")
        return names

    def reset_streams(self, stream: str | None) -> list[str]:
        names = [stream] if stream is not None else list(self.router.streams)
        failed = []
        for name in names:
            try:  # one stream's failed flush must not leave the streams after it their old models
                self.router.reset(name)
            except Exception as exc:  # its model is dropped all the same: a new one starts at its next frame
                log.exception("stream %s: model reset, but its engine failed (its outputs owed are lost)", name)
                failed.append(f"{name} ({type(exc).__name__}: {exc})")
                continue
            log.info("stream %s: model reset", name)
        if failed:
            raise ControlError(f"reset failed for {', '.join(failed)}: the outputs owed are lost, a new model "
                               f"starts at the next frame; every other stream was reset")
        return names

    def save_model(self, stream: str, path: Path) -> Future[Reply]:
        """Write the stream's weights (on the state worker), those of its last denoiser once it
        ended; the reply says what was written."""
        live = self.router.streams[stream]
        den, final = live.denoiser, live.final_weights
        if den is None and final is None:
            raise ControlError(f"stream {stream!r} has no model yet (no valid frame so far)")

        def save() -> Reply:
            path.parent.mkdir(parents=True, exist_ok=True)
            # what was written, though training goes on; the file names its stream, as a checkpoint does
            if den is not None:
                step, digest = den.save_weights(str(path), {"stream": stream})
            else:
                assert final is not None
                step, digest = final.write(path, {"stream": stream})
            log.info("stream %s: weights saved to %s", stream, path)
            return {"stream": stream, "path": str(path), "weights_hash": digest, "model_step": int(step)}

        return self.worker.submit(save)

    def load_model(self, stream: str, path: Path) -> Reply | Future[Reply]:
        try:  # refuse a corrupt or foreign file now, not at the first frame; read once, on the frame loop
            weights = SavedWeights(*load_checkpoint(path))
        except CheckpointError as exc:
            raise ControlError(str(exc)) from None
        live = self.router.streams.get(stream)
        if live is None:
            if not STREAM_NAME.match(stream):
                raise ControlError(f"stream name {stream!r} must match {STREAM_NAME.pattern}")
            self.router.starting_weights[stream] = str(path)
            log.info("stream %s: will start from %s at its first frame", stream, path)
            return {"stream": stream, "path": str(path), "applied": "at_first_frame"}
        den = live.denoiser
        if den is not None:
            try:
                den.load_weights(str(path), weights)  # these, not the file again: it may have changed since
            except CheckpointError as exc:  # weights for another network: refused, the stream keeps its own
                raise ControlError(str(exc)) from None
            log.info("stream %s: weights loaded from %s", stream, path)
        live.init = str(path)  # a later start (shape change, end) starts from these weights as well
        live.init_explicit = True
        if den is None:
            return {"stream": stream, "path": str(path), "applied": "at_first_frame"}
        # the weights loaded, as read: the trainer may step on them before the reply is made
        return self.worker.submit(lambda: {"stream": stream, "path": str(path), "applied": "now",
                                           "weights_hash": weights_hash(weights.state_dict)})

    # ---- recording (umvd_live.recording.session) ------------------------------------------------
    def start_recording(self, path: str, streams: list[str] | None, raw: bool) -> Reply:
        """Record every denoised frame (and the raw input with ``raw``) of the streams named, or
        of every stream, under ``path`` confined to the output directory (a control command)."""
        from umvd_live.recording.session import RecordingRequest

        if self.recording is not None:
            raise ControlError("a recording is running; record_stop first")
        try:
            target = confine_path(path, self.config.output_dir)
        except PathNotAllowed as exc:
            raise ControlError(str(exc)) from None
        self._start_recording(RecordingRequest(path=target, streams=frozenset(streams) if streams else None, raw=raw))
        return {"path": str(target), "streams": streams, "raw": raw}

    def _start_recording(self, request: RecordingRequest) -> None:
        from umvd_live.recording.session import RecordingError, RecordingSession

        if self.recording is not None:
            raise ControlError("a recording is running; record_stop first")
        hashes = WeightsHashes(lambda weights: self.worker.submit(weights_hash, weights.state_dict))
        try:
            session = RecordingSession(request, provenance=lambda stream: self._provenance(stream, hashes),
                                       on_error=self._recording_failed)
        except RecordingError as exc:
            raise ControlError(str(exc)) from None
        self.recording = RecordingSink(session, hashes)
        self.router.sinks.append(self.recording)
        log.info("recording to %s (%s%s)", request.path,
                 ", ".join(sorted(request.streams)) if request.streams else "every stream",
                 ", with raw" if request.raw else "")

    def stop_recording(self) -> Reply:
        """Stop taking frames; the outputs still owed for the frames taken (window // 2 a
        stream) are recorded as they come, then the recorder finishes its backlog in the
        background (`_finish_stopped_recordings`)."""
        if self.recording is None:
            raise ControlError("no recording is running")
        sink, self.recording = self.recording, None
        sink.stop()
        self._stopped_recordings.append(sink)
        log.info("recording stopped%s", f"; outputs owed: {sink.finishing}" if sink.finishing else "")
        return {"recording": sink.session.status().to_dict() | {"recording": False}, "finishing": sink.finishing}

    def _finish_stopped_recordings(self) -> None:
        """A stopped recording leaves the sinks once its owed outputs are in; a stream that went
        idle (or away) owes nothing more: its last frames would come only with frames to come."""
        for sink in self._stopped_recordings:
            if sink not in self.router.sinks:
                continue
            gone = [s for s in sink.finishing if s not in self.router.streams or self.router.streams[s].idle]
            if gone:
                sink.give_up(gone, f"no frame for {self.config.idle_after_s:g} s after the stop")
            if not sink.finishing:
                self.router.sinks.remove(sink)

    def _provenance(self, stream: str, hashes: WeightsHashes) -> Provenance:
        """What a recording says of the stream's network; called on the frame loop at the first
        frame the recording takes of the stream, and again after each new engine of it (the files
        opened from then on name it: `RecordingSession.renew_provenance`). The weights hash: of the
        weights that engine's first recorded denoised frames came from, copied by the loop at the
        first of them and hashed on the state worker (`sinks.WeightsHashes`); the files say
        ``pending`` until it is known (`recording.ometiff.Provenance.weights_sha256_future`)."""
        from umvd_live.recording.ometiff import Provenance

        live = self.router.streams.get(stream)
        den = live.denoiser if live is not None else None
        engine = self.config.engine
        return Provenance(
            stream=stream, preset=getattr(den, "preset", None) or engine.preset,
            window=engine.window, weights_sha256_future=hashes.begin(stream),
            device=str(getattr(den, "device", engine.device)), source=self.endpoints.get("input"),
            extra=network_provenance(cast("StreamDenoiser", den)) if _network_built(den) else {},
        )

    def _recording_failed(self, message: str) -> None:
        log.error("recording failed, live output goes on: %s", message)

    def shutdown(self) -> Reply:
        """Flush everything owed before replying, so the reply means: all outputs are published."""
        try:
            flushed = self.finish()
        finally:  # a flush that failed must not leave a daemon that takes no frames running
            self.request_stop("shutdown command")
        return {"flushed": flushed}


def _network_built(den: object) -> bool:
    """Whether ``den`` has a network to describe: not a stand-in without one, and not an engine whose
    first frame is recorded (raw) before it is pushed, which builds the network (`spec` raises)."""
    try:
        return den is not None and getattr(den, "spec", None) is not None
    except RuntimeError:
        return False


def write_ready_file(path: Path, endpoints: EndpointsStatus) -> None:
    """``--ready-file``: the bound endpoints as JSON, written whole or not at all
    (`checkpoint.write_atomically`), so a reader never sees half of it."""
    payload = {"version": READY_FILE_VERSION, "pid": os.getpid(), "umvd_live": __version__,
               "endpoints": dict(endpoints)}
    with write_atomically(path) as fh:
        fh.write(json.dumps(payload).encode())


def remove_ready_file(path: Path, pid: int | None = None) -> None:
    """Remove the ``--ready-file`` ``path`` if it is there; with ``pid``, only if it is that
    process's (a file another daemon wrote since, or one that cannot be read, is left alone).
    A file that cannot be removed (Windows: a launcher holds it open) is logged, not raised:
    neither a start nor a close fails for it."""
    try:
        if pid is not None:
            try:
                data = json.loads(path.read_bytes())
            except ValueError:  # not a ready file: not ours
                return
            if not isinstance(data, dict) or data.get("pid") != pid:
                return
        path.unlink(missing_ok=True)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot remove the ready file %s: %s", path, exc)


# ---- the process --------------------------------------------------------------------------------
def _log_through(display: StatusDisplay) -> None:
    """On a terminal the log lines go through the live status display's console, so they do not
    tear its table, in the format the command line set (`apps.logs`)."""
    if not display.interactive:
        return
    from rich.logging import RichHandler

    root = logging.getLogger()
    for plain in list(root.handlers):
        rich = RichHandler(console=display.console, show_path=False, show_time=False, show_level=False)
        rich.setFormatter(plain.formatter)
        for kept in plain.filters:
            rich.addFilter(kept)
        root.removeHandler(plain)
        root.addHandler(rich)


def run(config: DaemonConfig) -> int:
    """`umvd-live serve` (apps/cli.py makes ``config`` of the flags): until a signal or `shutdown`."""
    try:  # a GPU that is not there, a bad model file: one line now, not a traceback or a failed first frame
        pick_device(config.engine.device)
        check_model_flags(config.engine.init, config.engine.prior)
    except (DeviceUnavailable, CheckpointError) as exc:
        print(f"umvd-live serve: {exc}", file=sys.stderr)
        return 2
    display = StatusDisplay(interval_s=config.status_interval_s)
    _log_through(display)
    try:
        daemon = Daemon(config, engine_factory(config))
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    # Ctrl-C, SIGTERM and (Windows) Ctrl-Break: the same clean stop as `shutdown`, already while
    # starting. Left to `apps.cli.main`'s handler (KeyboardInterrupt, exit 130) until the sockets
    # are bound, they skipped `close`: a ready file just written stayed behind.
    previous = handle_stop_signals(lambda signum, _frame: daemon.request_stop(signal_name(signum)))
    try:
        try:
            daemon.start()
        except (zmq.ZMQError, ValueError, ControlError, OSError) as exc:  # SecurityError is a ValueError
            log.error("cannot start: %s", exc)
            return 2
        if (reason := daemon.stop_reason) is not None:  # a signal while starting: no serving
            log.info("stopping (%s) before serving", reason)
        else:
            with display:
                daemon.serve(display)
    finally:  # every way out, a failed or interrupted start too: closed once, then the handlers put back
        try:
            daemon.close()
        finally:
            restore_signals(previous)
    log.info("exited cleanly")
    return 0
