"""The daemon's sockets, and the two threads that keep them answered while the frame loop computes.

- `InputReceiver` (thread ``umvd-input``) owns the SUB socket. It takes every message off the
  socket the moment it arrives, stamps its receipt time and appends it to a byte-bounded `Inbox`,
  so the producer's PUB never meets a full queue because the daemon was busy computing.
- `ControlServer` (thread ``umvd-control``) owns the control socket, a ROUTER that speaks to the
  clients' REQ sockets exactly as a REP would. It hands each request to the service and sends each
  reply once it is ready, in whatever order they become ready, so one slow command (or a frame
  loop deep in a backlog) never keeps another client's ``status`` waiting; a reply that is late
  past its deadline is replaced by its fallback (the service's last status snapshot). A request
  the service fails to take, or whose reply it fails to make, still gets an error reply (counted:
  ``errors``, status ``control.errors``). It reads at most `CONTROL_READ_BATCH` requests between
  two rounds of sending, and holds at most `MAX_WAITING_REQUESTS` unanswered
  (`MAX_WAITING_PER_CLIENT` from one connection): past that a request is answered at once with a
  ``busy`` error, so a client that floods requests neither starves the others nor grows the
  daemon's memory.
- The output PUB socket is bound here and written only by the frame loop (`sinks.PublisherSink`).

`Transport` binds them all, loopback only unless ``--allow-remote`` with CURVE keys
(`wire/security.py`). Nothing here decodes a frame or knows a command: that is `router.py` and
`control.py`.
"""

from __future__ import annotations

import heapq
import itertools
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
from umvd_live.daemon.control import MAX_REQUEST_BYTES
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
#: Most requests the control thread reads before it sends the replies that are ready: a client
#: sending requests without pause cannot keep it reading while the others' replies wait.
CONTROL_READ_BATCH = 64
#: Most requests taken and not answered yet, in all and from one connection (a REQ client has one
#: at a time). Past either a request is not taken: it is answered at once with a ``busy`` error.
MAX_WAITING_REQUESTS = 1024
MAX_WAITING_PER_CLIENT = 16
#: Largest message part the control socket accepts. A request over `control.MAX_REQUEST_BYTES`
#: but within this still gets its error reply; ZeroMQ drops the connection of a peer that sends
#: more as the part arrives, before it is held whole (no reply: the client times out).
CONTROL_MAX_MSG_BYTES = MAX_REQUEST_BYTES + 64 * 1024
#: At most one log line about busy replies this often (seconds).
BUSY_LOG_S = 10.0
#: How long a socket thread pauses after an unexpected error in its loop before it goes on.
ERROR_PAUSE_S = 0.1


def _loop_error(thread: str, count: int) -> None:
    """Log an unexpected error of a socket thread's loop (the thread goes on): with its traceback
    the first 5 times, then every 100th, so that one that keeps coming does not fill the log."""
    if count <= 5 or count % 100 == 0:
        log.exception("%s: unexpected error (%d so far); the thread goes on", thread, count)


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
    `Received.cost`), never blocking. The bound counts the batch the loop took last as well: it
    holds those messages until it drains again (one consumer, done with a batch when it asks for
    the next)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0  # the queued messages' costs
        self.held = 0  # the costs of the batch last drained, which the frame loop still works on
        self.overflow = 0  # messages refused because the budget was spent
        self._items: deque[Received] = deque()
        self._cond = threading.Condition()
        self._woken = False  # a `wake` came since the last `drain`: its next wait is cut short

    def put(self, item: Received) -> bool:
        with self._cond:
            cost = item.cost
            if self.nbytes + self.held + cost > self.max_bytes:
                self.overflow += 1
                return False
            self._items.append(item)
            self.nbytes += cost
            self._cond.notify()
            return True

    def drain(self, timeout: float) -> list[Received]:
        """Everything waiting, after waiting up to ``timeout`` s for something to arrive (or a `wake`).
        The batch drained before is done with: its bytes no longer count."""
        with self._cond:
            self.held = 0
            if not self._items and not self._woken:
                self._cond.wait(timeout)
            self._woken = False
            items = list(self._items)
            self._items.clear()
            self.held, self.nbytes = self.nbytes, 0
            return items

    def wake(self) -> None:
        """End a `drain`'s wait now, or the next one's if none waits (a control request came, an
        engine's pass ended)."""
        with self._cond:
            self._woken = True
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
        self.errors = 0  # unexpected errors of the loop (logged; the thread went on)
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
                try:
                    self._take(sock)
                except zmq.ContextTerminated:
                    break
                except Exception:  # MemoryError, a bug: the daemon must not stop taking frames
                    self.errors += 1
                    _loop_error(self.name, self.errors)
                    self._stop_event.wait(ERROR_PAUSE_S)
        finally:
            sock.close()

    def _take(self, sock: zmq.Socket) -> None:
        if not sock.poll(50, zmq.POLLIN):
            return
        while True:  # drain everything that is there before polling again
            try:
                parts = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            # One part more than a message has is enough for the frame loop to reject it
            # as `part_count`; the rest would only hold memory until then.
            del parts[MESSAGE_PARTS + 1:]
            self.inbox.put(Received(parts, monotonic(), sum(len(p) for p in parts)))

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


class _Waiting:
    """A request taken whose reply is not sent yet. Only the control thread reads or changes it;
    its future's callback (on whatever thread resolves it) only queues it in ``_ready``."""

    __slots__ = ("envelope", "client", "pending", "sent")

    def __init__(self, envelope: list[bytes], client: bytes, pending: PendingReply):
        self.envelope = envelope
        self.client = client  # the connection it came on (its ROUTER identity)
        self.pending: PendingReply | None = pending  # dropped once sent: the reply's bytes go with it
        self.sent = False


class ControlServer(threading.Thread):
    """Owns the control socket: receives requests, sends each reply when it is ready.

    A turn reads at most `CONTROL_READ_BATCH` requests, then sends the replies that are ready
    (those whose future resolved, in that order, then those past their deadline: their fallback).
    At most ``max_waiting`` requests wait for their reply, ``max_per_client`` from one
    connection; a request past either is answered at once with a ``busy`` error, and never
    reaches the handler."""

    def __init__(self, ctx: zmq.Context, endpoint: str, handle: RequestHandler,
                 secure: Callable[[zmq.Socket], None] = lambda sock: None, *,
                 max_waiting: int = MAX_WAITING_REQUESTS, max_per_client: int = MAX_WAITING_PER_CLIENT):
        super().__init__(name="umvd-control", daemon=True)
        self._handle = handle
        self._max_waiting, self._max_per_client = max_waiting, max_per_client
        self._stop_event = threading.Event()
        self._receiving = True  # False once the service stopped answering (`stop_receiving`)
        self._receive_lock = threading.Lock()
        self._ready: deque[_Waiting] = deque()  # resolved, appended by the futures' callbacks
        self._deadlines: list[tuple[float, int, _Waiting]] = []  # a heap: those with a fallback
        self._order = itertools.count()  # ties in the heap
        self._per_client: dict[bytes, int] = {}  # requests waiting, by connection
        self._busy_logged = 0.0  # when the next busy reply may be logged
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, CONTROL_LINGER_MS)
        self.socket.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_MSG_BYTES)
        enable_ipv6(self.socket, [endpoint])
        try:
            secure(self.socket)
            self.socket.bind(endpoint)
        except BaseException:
            self.socket.close()
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.waiting = 0  # requests taken whose reply is not sent yet
        self.late = 0  # replies that missed their deadline and went out as their fallback
        self.busy = 0  # requests answered with the busy error (too many waiting)
        #: Unexpected errors on this thread, of its loop or of the service taking a request or making
        #: its reply (logged; the thread went on, and such a request got an error reply).
        self.errors = 0

    def run(self) -> None:
        sock = self.socket
        drain_until: float | None = None
        try:
            while True:
                if self._stop_event.is_set():
                    drain_until = drain_until or time.monotonic() + CONTROL_DRAIN_S
                    if not self.waiting or time.monotonic() > drain_until:
                        break
                try:
                    self._turn(sock)
                except zmq.ContextTerminated:
                    break
                except Exception:  # MemoryError, a bug: the control socket must stay answered
                    self.errors += 1
                    _loop_error(self.name, self.errors)
                    time.sleep(ERROR_PAUSE_S)
        finally:
            sock.close()

    def _turn(self, sock: zmq.Socket) -> None:
        if sock.poll(REPLY_POLL_MS if self.waiting else 50, zmq.POLLIN):
            with self._receive_lock:
                if self._receiving:
                    self._receive(sock)
                else:
                    time.sleep(REPLY_POLL_MS / 1000)  # leave them queued: no one will answer
        if self.waiting:
            self._send_ready(sock)

    def _receive(self, sock: zmq.Socket) -> None:
        for _ in range(CONTROL_READ_BATCH):
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            # A REQ client's request: [identity, b"", body]. Anything else is not a request a
            # REP socket would have taken either: dropped.
            if len(frames) < 3 or frames[-2] != b"":
                continue
            envelope, client = frames[:-1], frames[0]
            mine = self._per_client.get(client, 0)
            if self.waiting >= self._max_waiting or mine >= self._max_per_client:
                self._refuse(sock, envelope, mine)
                continue
            try:
                pending = self._handle(frames[-1])
            except Exception as exc:  # the handler answers every request itself; a bug still gets an
                self.errors += 1  # answer (not a client left to its timeout), and this thread goes on
                _loop_error(self.name, self.errors)
                self._send(sock, envelope, pack({"ok": False, "error": f"the request could not be handled: "
                                                                       f"{type(exc).__name__}: {exc}"}))
                continue
            self._wait_for(envelope, client, pending)

    def _refuse(self, sock: zmq.Socket, envelope: list[bytes], mine: int) -> None:
        self.busy += 1
        if mine >= self._max_per_client:
            error = f"busy: too many requests waiting from this connection ({mine}); ask again once they are answered"
        else:
            error = f"busy: too many requests waiting ({self.waiting}); ask again shortly"
        now = time.monotonic()
        if now >= self._busy_logged:  # at most one line every `BUSY_LOG_S`: a flood must not fill the log
            self._busy_logged = now + BUSY_LOG_S
            log.warning("control: %s (%d busy replies so far)", error, self.busy)
        self._send(sock, envelope, pack({"ok": False, "error": error}))

    def _wait_for(self, envelope: list[bytes], client: bytes, pending: PendingReply) -> None:
        entry = _Waiting(envelope, client, pending)
        # Called at once if it is done already (then on this thread): it is sent this turn.
        pending.reply.add_done_callback(lambda _done: self._ready.append(entry))
        self.waiting += 1
        self._per_client[client] = self._per_client.get(client, 0) + 1
        if pending.fallback is not None and pending.deadline is not None:
            heapq.heappush(self._deadlines, (pending.deadline, next(self._order), entry))
            if len(self._deadlines) > 2 * self.waiting + CONTROL_READ_BATCH:  # mostly sent already
                self._deadlines = [item for item in self._deadlines if not item[2].sent]
                heapq.heapify(self._deadlines)

    def _send_ready(self, sock: zmq.Socket) -> None:
        while self._ready:
            entry = self._ready.popleft()
            if not entry.sent:  # else: its fallback went out, and it was answered after all
                self._finish(sock, entry, self._result(entry))
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            entry = heapq.heappop(self._deadlines)[2]
            if entry.sent or entry.pending is None:
                continue
            pending = entry.pending
            if pending.reply.done():  # answered meanwhile (its callback queued it)
                self._finish(sock, entry, self._result(entry))
                continue
            pending.reply.cancel()  # the service skips it if it had not begun
            try:
                assert pending.fallback is not None  # only those with one are in the heap
                body = pending.fallback()
                self.late += 1
            except Exception as exc:  # a bug: the client still gets an answer, and this thread goes on
                body = self._unmade(exc)
            self._finish(sock, entry, body)

    def _result(self, entry: _Waiting) -> bytes:
        assert entry.pending is not None
        reply = entry.pending.reply
        if reply.cancelled():  # by someone else: this thread marks what it cancels as sent
            return pack({"ok": False, "error": "the request was cancelled"})
        try:
            return reply.result()
        except Exception as exc:
            return self._unmade(exc)

    def _unmade(self, exc: Exception) -> bytes:
        self.errors += 1
        log.error("control: a reply could not be made", exc_info=exc)
        return pack({"ok": False, "error": f"reply could not be made: {type(exc).__name__}: {exc}"})

    def _finish(self, sock: zmq.Socket, entry: _Waiting, body: bytes) -> None:
        entry.sent, entry.pending = True, None
        self.waiting -= 1
        left = self._per_client.pop(entry.client) - 1
        if left:
            self._per_client[entry.client] = left
        self._send(sock, entry.envelope, body)

    @staticmethod
    def _send(sock: zmq.Socket, envelope: list[bytes], body: bytes) -> None:
        try:
            sock.send_multipart([*envelope, body], flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # the client is gone: ROUTER drops; anything else, log and go on
            log.debug("control: a reply could not be sent", exc_info=True)

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
