"""The daemon's sockets, and the two threads that keep them answered while the frame loop computes.

- `InputReceiver` (thread ``umvd-input``) owns the SUB socket. It takes every message off the
  socket the moment it arrives, stamps its receipt time and appends it to a byte-bounded `Inbox`,
  so the producer's PUB never meets a full queue because the daemon was busy computing.
- `ControlServer` (thread ``umvd-control``) owns the control socket, a ROUTER that speaks to the
  clients' REQ sockets exactly as a REP would. It hands each request to the service and sends each
  reply once it is ready, in whatever order they become ready, so one slow command (or a frame
  loop deep in a backlog) never keeps another client's ``status`` waiting; a reply that is late
  past its deadline is replaced by its fallback (the service's last status snapshot).
- The output PUB socket is bound here and written only by the frame loop (`sinks.PublisherSink`).

`Transport` binds them all, loopback only unless ``--allow-remote`` with CURVE keys
(`wire/security.py`). Nothing here decodes a frame or knows a command: that is `router.py` and
`control.py`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq

from umvd_live.daemon.config import DaemonConfig
from umvd_live.daemon.streams import monotonic
from umvd_live.wire.protocol import MAX_PIXELS, MESSAGE_PARTS, pack
from umvd_live.wire.security import CurveServer, SecurityError, check_bind, enable_ipv6, is_loopback

if TYPE_CHECKING:
    from umvd_live.wire.schema import EndpointsStatus

log = logging.getLogger("umvd_live.daemon")

#: ZeroMQ queue lengths (messages). The receiver thread keeps the input side short; the output
#: side drops for a viewer that stopped reading rather than growing without bound.
INPUT_RCVHWM = 1000
OUTPUT_SNDHWM = 1000
#: Longest a closing output socket keeps trying to deliver what it still holds.
OUTPUT_LINGER_MS = 2000
#: Longest a closing control socket keeps trying to deliver its last replies (``shutdown``'s).
CONTROL_LINGER_MS = 500
#: Largest message part accepted off the wire; ZeroMQ drops a peer that sends more.
MAX_PART_BYTES = MAX_PIXELS * 4 + 64 * 1024
#: What holding a message costs besides its bytes (CPython's objects: the message, its list, its
#: receipt time; each part's bytes object and list slot), so that a flood of empty or tiny
#: messages cannot hold many times the inbox's budget.
MESSAGE_OVERHEAD = 256
PART_OVERHEAD = 48
#: How often the control thread looks for finished replies while some are outstanding (ms).
REPLY_POLL_MS = 2
#: How long a stopping control thread still waits for outstanding replies (``shutdown``'s own).
CONTROL_DRAIN_S = 5.0


# ---- input --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Received:
    parts: list[bytes]
    received: float  # monotonic() when taken from the socket
    nbytes: int  # the parts' bytes

    @property
    def cost(self) -> int:
        """The memory it holds, as the inbox counts it."""
        return self.nbytes + MESSAGE_OVERHEAD + PART_OVERHEAD * len(self.parts)


class Inbox:
    """A FIFO between the receiver thread and the frame loop, bounded in bytes (each message's
    `Received.cost`), never blocking."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0  # the messages' costs
        self.overflow = 0  # messages refused because the budget was spent
        self._items: deque[Received] = deque()
        self._cond = threading.Condition()

    def put(self, item: Received) -> bool:
        with self._cond:
            cost = item.cost
            if self.nbytes + cost > self.max_bytes:
                self.overflow += 1
                return False
            self._items.append(item)
            self.nbytes += cost
            self._cond.notify()
            return True

    def drain(self, timeout: float) -> list[Received]:
        """Everything waiting, after waiting up to ``timeout`` s for something to arrive (or a `wake`)."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            items = list(self._items)
            self._items.clear()
            self.nbytes = 0
            return items

    def wake(self) -> None:
        """End a `drain`'s wait now (a control request came)."""
        with self._cond:
            self._cond.notify()

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
        enable_ipv6(self.socket, [config.input_bind, *config.input_connect])
        self.endpoints: list[str] = []
        try:
            if config.input_bind is not None:
                secure(self.socket)  # a CURVE server for the producers that connect
                self.socket.bind(config.input_bind)
                self.endpoints.append(self.socket.getsockopt_string(zmq.LAST_ENDPOINT))
            for endpoint in config.input_connect:
                self.socket.connect(endpoint)
                self.endpoints.append(f"{endpoint} (connected)")
        except BaseException:
            self.socket.close()
            raise

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
                    # One part more than a message has is enough for the frame loop to reject it
                    # as `part_count`; the rest would only hold memory until then.
                    del parts[MESSAGE_PARTS + 1:]
                    self.inbox.put(Received(parts, monotonic(), sum(len(p) for p in parts)))
        finally:
            sock.close()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)


# ---- control ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PendingReply:
    """A control request's reply to come: ``reply`` resolves to the packed reply. Past
    ``deadline`` (monotonic seconds), ``fallback()`` is sent instead, if there is one, and the
    request is cancelled (the service skips work it had not begun)."""

    reply: Future[bytes]
    deadline: float | None = None
    fallback: Callable[[], bytes] | None = None


#: Turns one request's bytes into its reply to come (called on the control thread; must not block).
RequestHandler = Callable[[bytes], PendingReply]


class ControlServer(threading.Thread):
    """Owns the control socket: receives requests, sends each reply when it is ready."""

    def __init__(self, ctx: zmq.Context, endpoint: str, handle: RequestHandler,
                 secure: Callable[[zmq.Socket], None] = lambda sock: None):
        super().__init__(name="umvd-control", daemon=True)
        self._handle = handle
        self._stop_event = threading.Event()
        self._receiving = True  # False once the service stopped answering (`stop_receiving`)
        self._receive_lock = threading.Lock()
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, CONTROL_LINGER_MS)
        enable_ipv6(self.socket, [endpoint])
        try:
            secure(self.socket)
            self.socket.bind(endpoint)
        except BaseException:
            self.socket.close()
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.late = 0  # replies that missed their deadline and went out as their fallback

    def run(self) -> None:
        sock = self.socket
        pending: list[tuple[list[bytes], PendingReply]] = []
        drain_until: float | None = None
        try:
            while True:
                if self._stop_event.is_set():
                    drain_until = drain_until or time.monotonic() + CONTROL_DRAIN_S
                    if not pending or time.monotonic() > drain_until:
                        break
                if sock.poll(REPLY_POLL_MS if pending else 50, zmq.POLLIN):
                    with self._receive_lock:
                        if self._receiving:
                            self._receive(sock, pending)
                        else:
                            time.sleep(REPLY_POLL_MS / 1000)  # leave them queued: no one will answer
                if pending:
                    pending = self._send_ready(sock, pending)
        finally:
            sock.close()

    def _receive(self, sock: zmq.Socket, pending: list[tuple[list[bytes], PendingReply]]) -> None:
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            # A REQ client's request: [identity, b"", body]. Anything else is not a request a
            # REP socket would have taken either: dropped.
            if len(frames) < 3 or frames[-2] != b"":
                continue
            try:
                reply = self._handle(frames[-1])
            except Exception:  # the handler answers every request itself; a bug must not end this thread
                log.exception("control: a request could not be handled")
                continue
            pending.append((frames[:-1], reply))

    def _send_ready(self, sock: zmq.Socket, pending: list[tuple[list[bytes], PendingReply]]
                    ) -> list[tuple[list[bytes], PendingReply]]:
        now = time.monotonic()
        waiting = []
        for envelope, reply in pending:
            try:
                if reply.reply.done() and not reply.reply.cancelled():
                    body = reply.reply.result()
                elif reply.fallback is not None and reply.deadline is not None and now >= reply.deadline:
                    reply.reply.cancel()
                    body = reply.fallback()
                    self.late += 1
                else:
                    waiting.append((envelope, reply))
                    continue
            except Exception as exc:  # a bug: the client still gets an answer, and this thread goes on
                log.exception("control: a reply could not be made")
                body = pack({"ok": False, "error": f"reply could not be made: {type(exc).__name__}: {exc}"})
            try:
                sock.send_multipart([*envelope, body], flags=zmq.NOBLOCK)
            except zmq.ZMQError:  # the client is gone: ROUTER drops; anything else, log and go on
                log.debug("control: a reply could not be sent", exc_info=True)
        return waiting

    def stop_receiving(self) -> None:
        """Take no more requests (the service is about to stop answering); when this returns,
        no request is being handed over."""
        with self._receive_lock:
            self._receiving = False

    def stop(self) -> None:
        """Send the replies still to come (within `CONTROL_DRAIN_S`), then close the socket."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=CONTROL_DRAIN_S + 5)


# ---- all of them --------------------------------------------------------------------------------
class Transport:
    """Binds the daemon's sockets and runs the threads that own the input and control ones."""

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.inbox = Inbox(config.inbox_bytes)
        self.curve: CurveServer | None = None
        self.output: zmq.Socket | None = None
        self.receiver: InputReceiver | None = None
        self.control: ControlServer | None = None
        self._ctx = zmq.Context()

    def start(self, handle: RequestHandler) -> EndpointsStatus:
        """Check and bind every endpoint, start receiving; returns the bound endpoints. Raises on
        a bad or busy endpoint, and on bad CURVE keys before anything is bound."""
        cfg = self.config
        for endpoint in filter(None, (cfg.input_bind, cfg.output, cfg.control)):
            check_bind(endpoint, allow_remote=cfg.allow_remote, curve=cfg.curve is not None)
        for endpoint in cfg.input_connect:  # a remote producer connects to us, under CURVE
            if not is_loopback(endpoint):
                raise SecurityError(f"--input-connect {endpoint}: only loopback producers can be "
                                    "connected to; a remote producer connects to --input (docs/security.md)")
        if cfg.curve is not None:
            self.curve = CurveServer(cfg.curve)
            self.curve.start(self._ctx)
        self.output = self._ctx.socket(zmq.PUB)
        self.output.setsockopt(zmq.SNDHWM, OUTPUT_SNDHWM)
        self.output.setsockopt(zmq.LINGER, OUTPUT_LINGER_MS)
        enable_ipv6(self.output, [cfg.output])
        self._secure(self.output)
        self.output.bind(cfg.output)
        self.control = ControlServer(self._ctx, cfg.control, handle, self._secure)
        self.receiver = InputReceiver(self._ctx, cfg, self.inbox, self._secure)
        endpoints: EndpointsStatus = {
            "input": ", ".join(self.receiver.endpoints),
            "output": self.output.getsockopt_string(zmq.LAST_ENDPOINT),
            "control": self.control.endpoint,
        }
        self.receiver.start()
        self.control.start()
        return endpoints

    def _secure(self, sock: zmq.Socket) -> None:
        if self.curve is not None:
            self.curve.apply(sock)

    def stop_input(self) -> None:
        """Take no more frames (the inbox keeps what came)."""
        if self.receiver is not None:
            self.receiver.stop()

    def close(self) -> None:
        """Stop both threads (the control one after its last replies), close every socket."""
        self.stop_input()
        if self.control is not None:
            self.control.stop()
        for thread in (self.receiver, self.control):
            if thread is not None and not thread.is_alive() and not thread.socket.closed:
                thread.socket.close()  # never started (start-up failed): its thread did not close it
        if self.output is not None:
            self.output.close()
        if self.curve is not None:
            self.curve.stop()
        if any(thread is not None and thread.is_alive() for thread in (self.receiver, self.control)):
            log.error("a socket thread did not stop; closing its socket from here")
            self._ctx.destroy(linger=0)
        else:
            self._ctx.term()
