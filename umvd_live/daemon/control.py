"""The control socket's commands: msgpack map requests with a ``cmd`` key, map replies with ``ok``.

The handler turns one request into one reply and never raises: every request must be answered,
and a bad request must not take the daemon down. A command that raises `ControlError` is refused
(its message is the reply's ``error``); any other exception, also one of making its reply (not a
map, a state worker's job that failed or was cancelled), is a failure: logged with its traceback,
counted (``failed``: status ``control.failed``), its reply naming the command and the exception.
`decode` runs on the control thread (a request that is not even a map is answered there);
`handle` runs on the frame loop, which owns everything the commands act on: ``status`` (the one
`READ_ONLY` command) at the loop's next safe point, the others between batches. A command whose
slow part runs on the state worker (``save_model``) returns a `Future` of its reply. The
daemon-side actions are behind the small `ControlTarget` interface.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Protocol

from umvd_live.wire.protocol import ProtocolError, pack, unpack_map
from umvd_live.wire.security import PathNotAllowed, confine_path

if TYPE_CHECKING:
    from umvd_live.wire.schema import DaemonStatus

log = logging.getLogger("umvd_live.daemon")

#: Largest control request accepted.
MAX_REQUEST_BYTES = 64 * 1024
#: Commands that only read: the frame loop answers them between bounded pieces of work, and a
#: reply the loop is late with is replaced by the last snapshot (`service`).
READ_ONLY = frozenset({"status"})



def read_only(request: dict[str, Any]) -> bool:
    """Whether the request is for a `READ_ONLY` command (whatever its ``cmd`` holds)."""
    cmd = request.get("cmd")
    return isinstance(cmd, str) and cmd in READ_ONLY


Reply = dict[str, Any]
Command = Callable[[dict[str, Any]], "Reply | Future[Reply]"]


class ControlError(Exception):
    """A request that cannot be carried out; its message goes back as ``error``."""


class ControlTarget(Protocol):
    """What the control commands act on (the daemon)."""

    def status(self) -> DaemonStatus: ...
    def stream_names(self) -> list[str]: ...
    def set_training_paused(self, stream: str | None, paused: bool) -> list[str]: ...
    def reset_streams(self, stream: str | None) -> list[str]: ...
    def save_model(self, stream: str, path: Path) -> Future[Reply]: ...
    def load_model(self, stream: str, path: Path) -> Reply | Future[Reply]: ...
    def start_recording(self, path: str, streams: list[str] | None, raw: bool) -> Reply: ...
    def stop_recording(self) -> Reply: ...
    def shutdown(self) -> Reply: ...


class ControlHandler:
    """Dispatches control requests to the daemon; ``model_dir`` confines save/load paths, and
    ``checkpoints`` (the state directory's) is out of their reach: a saved model must not
    overwrite a stream's checkpoint, nor take the place of one."""

    def __init__(self, target: ControlTarget, model_dir: Path, checkpoints: Path | None = None):
        self.target = target
        self.model_dir = model_dir
        self.checkpoints = checkpoints
        self.failed = 0  # commands that raised other than `ControlError` (logged, answered)
        self._lock = threading.Lock()  # `failed` is counted on the frame loop and the state worker
        self._commands: dict[str, Command] = {
            "status": lambda req: dict(target.status()),
            "pause_training": lambda req: self._training(req, paused=True),
            "resume_training": lambda req: self._training(req, paused=False),
            "reset": self._reset,
            "save_model": self._save_model,
            "load_model": self._load_model,
            "record_start": self._record_start,
            "record_stop": lambda req: target.stop_recording(),
            "shutdown": lambda req: target.shutdown(),
        }

    @property
    def commands(self) -> list[str]:
        return sorted(self._commands)

    @staticmethod
    def decode(data: bytes) -> dict[str, Any]:
        """One raw request as a map; `ControlError` (its reply: `encode_error`) when it is none."""
        try:
            return unpack_map(data, max_bytes=MAX_REQUEST_BYTES)
        except ProtocolError as exc:
            raise ControlError(f"bad request: {exc}") from None

    @staticmethod
    def encode(request: dict[str, Any], reply: Reply) -> bytes:
        """A reply, packed. Never raises."""
        try:
            return pack(reply)
        except Exception as exc:  # a reply with a value msgpack cannot pack: a bug, but answer
            log.exception("control: reply to %r does not pack", request.get("cmd"))
            return pack({"ok": False, "error": f"reply could not be encoded: {exc}"})

    @staticmethod
    def encode_error(message: str) -> bytes:
        return pack({"ok": False, "error": message})

    def handle(self, request: dict[str, Any]) -> Future[Reply]:
        """One request's reply, done now, or later for a command whose slow part runs elsewhere.
        The future never holds an exception: a refusal or a failure is a reply with ``ok`` false
        (`failure`)."""
        cmd = request.get("cmd")
        command = self._commands.get(cmd) if isinstance(cmd, str) else None
        if command is None:
            return _done({"ok": False, "error": f"unknown command {cmd!r}; known: {', '.join(self.commands)}"})
        stream = request.get("stream")
        if stream is not None and not isinstance(stream, str):
            return _done({"ok": False, "error": "stream must be a string"})
        try:
            reply = command(request)
            if not isinstance(reply, Future):
                return _done({"ok": True} | reply)  # in the try: a reply that is not a map is a failure too
        except Exception as exc:
            return _done(self.failure(cmd, exc))
        settled: Future[Reply] = Future()

        def settle(done: Future[Reply]) -> None:
            try:  # raises for a job that failed or was cancelled: a reply all the same
                answer = {"ok": True} | done.result()
            except Exception as exc:
                answer = self.failure(cmd, exc)
            settled.set_result(answer)

        reply.add_done_callback(settle)
        return settled

    def failure(self, cmd: object, exc: BaseException) -> Reply:
        """The reply to a command that raised: a `ControlError`'s message (a refusal); anything
        else is a failure (a bug, a file system error), logged and counted, its reply naming the
        command and the exception, so that the client need not read the daemon's log to know."""
        if isinstance(exc, ControlError):
            return {"ok": False, "error": str(exc)}
        with self._lock:
            self.failed += 1
        log.error("control command %s failed", cmd, exc_info=exc)
        return {"ok": False, "error": f"{cmd} failed: {type(exc).__name__}: {exc}"}

    # ---- commands -----------------------------------------------------------------------------
    def _training(self, req: dict[str, Any], paused: bool) -> Reply:
        stream = self._known_stream(req.get("stream"), required=False)
        return {"streams": self.target.set_training_paused(stream, paused), "training_paused": paused}

    def _reset(self, req: dict[str, Any]) -> Reply:
        stream = self._known_stream(req.get("stream"), required=False)
        return {"streams": self.target.reset_streams(stream)}

    def _save_model(self, req: dict[str, Any]) -> Future[Reply]:
        stream = self._known_stream(req.get("stream"), required=True)
        assert stream is not None  # required
        path = self._model_path(req.get("path", f"{stream}.pt"))
        return self.target.save_model(stream, path)

    def _load_model(self, req: dict[str, Any]) -> Reply | Future[Reply]:
        stream = req.get("stream")
        if stream is None:
            stream = self._known_stream(None, required=True)
        assert isinstance(stream, str)  # required; `handle` refused a stream that is not a string
        path = self._model_path(req.get("path", f"{stream}.pt"))
        if not path.is_file():
            raise ControlError(f"no model file {path.name!r} in the model directory")
        return self.target.load_model(stream, path)

    def _model_path(self, requested: Any) -> Path:
        """A save/load path from the client, confined to the model directory."""
        try:
            path = confine_path(requested, self.model_dir)
        except PathNotAllowed as exc:
            raise ControlError(f"model path: {exc}") from None
        # without case: NTFS and APFS open ``Checkpoints/`` as ``checkpoints/``
        if self.checkpoints is not None and PurePath(str(path).casefold()).is_relative_to(
                str(self.checkpoints.resolve()).casefold()):
            raise ControlError(f"model path: {requested!r} is in {self.checkpoints.name}/, the daemon's checkpoints")
        return path

    def _record_start(self, req: dict[str, Any]) -> Reply:
        """``{path, streams?, raw?}``: path relative to the output directory (the recorder
        confines it); streams: names to record (default every stream)."""
        path = req.get("path")
        if not isinstance(path, str):
            raise ControlError("record_start needs a path (relative to the output directory)")
        streams = req.get("streams")
        if streams is not None and (not isinstance(streams, list) or not all(isinstance(s, str) for s in streams)):
            raise ControlError("streams must be a list of stream names")
        if streams == []:  # would read as "none", but an empty selection records every stream
            raise ControlError("streams must name at least one stream (leave it out to record every stream)")
        raw = req.get("raw", False)
        if not isinstance(raw, bool):
            raise ControlError("raw must be true or false")
        return self.target.start_recording(path, streams, raw)

    def _known_stream(self, stream: str | None, *, required: bool) -> str | None:
        """A named stream must exist; an unnamed one means all streams, or the only one."""
        names = self.target.stream_names()
        if stream is not None:
            if stream not in names:
                raise ControlError(f"unknown stream {stream!r}; streams: {names}")
            return stream
        if not required:
            return None
        if len(names) == 1:
            return names[0]
        raise ControlError(f"name a stream: {names}" if names else "no stream has been seen yet")


def _done(reply: Reply) -> Future[Reply]:
    future: Future[Reply] = Future()
    future.set_result(reply)
    return future
