"""A control-socket client that survives the daemon going away. No Qt.

Why: a REQ socket whose request got no reply is stuck (it may not send again), and a daemon that
restarts never answers the lost request. So every request has a deadline; past it the socket is
closed without lingering and a fresh one connects, ready for the next request. The client is
non-blocking (`send` now, `poll` later) so that the viewer's worker keeps reading frames while a
request is out; `request` is the blocking form for the demo, scripts and tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from umvd_live.wire.security import enable_ipv6


class DaemonUnavailable(Exception):
    """No reply within the deadline: the daemon is away, restarting or stuck."""


@dataclass(frozen=True)
class ControlReply:
    """The daemon's reply to one request, with the request it answers (the reply to ``status``:
    `wire.schema.StatusReply`)."""

    request: dict[str, Any]
    reply: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.reply.get("ok"))

    @property
    def error(self) -> str | None:
        return None if self.ok else str(self.reply.get("error", "failed"))


class ControlClient:
    """One REQ socket to ``endpoint``, re-created after every timeout. One request at a time."""

    def __init__(self, endpoint: str, timeout_s: float = 1.5, context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._pending: dict[str, Any] | None = None
        self._deadline = 0.0
        self._timeout_s = timeout_s
        self.timeouts = 0  # requests that got no reply in time
        self.last_reply_at: float | None = None  # monotonic time of the last reply

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            enable_ipv6(sock, [self.endpoint])
            try:
                sock.connect(self.endpoint)
            except zmq.ZMQError:  # a malformed endpoint: no socket left behind per attempt
                sock.close(linger=0)
                raise
            self._sock = sock
        return self._sock

    def connect(self) -> None:
        """Connect now, so that a malformed endpoint raises zmq.ZMQError here rather than as
        DaemonUnavailable at every request."""
        self._socket()

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = None
        self._pending = None

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def send(self, request: dict[str, Any], timeout_s: float | None = None) -> None:
        """Send ``request`` (a map with ``cmd``) without waiting; `poll` collects the reply.

        ``timeout_s`` overrides the client's deadline for this request (e.g. a long `shutdown`, or
        `save_model`, which replies once the model is saved)."""
        if self._pending is not None:
            raise RuntimeError(f"request {self._pending.get('cmd')!r} is still waiting for its reply")
        try:
            self._socket().send(msgpack.packb(request), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self._reset()
            raise DaemonUnavailable(f"cannot send {request.get('cmd')!r} to {self.endpoint}: {exc}") from None
        self._pending = request
        self._timeout_s = self.timeout_s if timeout_s is None else timeout_s
        self._deadline = time.monotonic() + self._timeout_s

    def poll(self, timeout_ms: int = 0) -> ControlReply | None:
        """The reply if it came, None if still waiting; DaemonUnavailable once the deadline passed."""
        if self._pending is None or self._sock is None:
            return None
        if self._sock.poll(timeout_ms, zmq.POLLIN):
            raw = self._sock.recv()
            request = self._pending
            self._pending = None
            self.last_reply_at = time.monotonic()
            try:
                reply = msgpack.unpackb(raw)
            except Exception as exc:  # a daemon bug must not kill the viewer
                reply = {"ok": False, "error": f"unreadable reply: {exc}"}
            if not isinstance(reply, dict):
                reply = {"ok": False, "error": f"reply is not a map: {type(reply).__name__}"}
            return ControlReply(request, reply)
        if time.monotonic() >= self._deadline:
            cmd = self._pending.get("cmd")
            self.timeouts += 1
            self._reset()
            raise DaemonUnavailable(f"no reply to {cmd!r} from {self.endpoint} within {self._timeout_s:g} s")
        return None

    def request(self, cmd: str, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """Blocking request: the reply map, or DaemonUnavailable after the timeout."""
        self.send({"cmd": cmd, **fields}, timeout_s)
        while True:
            reply = self.poll(50)
            if reply is not None:
                return reply.reply

    def socket(self) -> zmq.Socket | None:
        """The socket a reply may arrive on (for a zmq.Poller), None when no request is out."""
        return self._sock if self._pending is not None else None

    def close(self) -> None:
        self._reset()
