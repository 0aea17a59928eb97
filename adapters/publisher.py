"""The one publisher every frame source uses to speak protocol v1 to the daemon's input.

It never blocks the caller with a frame: a full send queue (the daemon far behind) drops the frame
and counts it, because the acquisition is sacred. It uses an XPUB socket so that it sees the
daemon's subscription come and go: plain PUB silently discards frames sent while nobody is
subscribed (before the daemon's subscription arrives, or after it went down), and those are counted
as `undelivered`. A stream's end (`end`) may wait a little for room (`END_WAIT_S`): it is one small
message per stream, sent when the acquisition is over, and without it the daemon keeps the
stream's last outputs until its shutdown.
For a daemon that requires CURVE (a remote GPU workstation, docs/security.md), give the client's
key pair and the daemon's public key: a refused key never sees the subscription, so
`wait_for_subscriber` returns False.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
import zmq

from umvd_live.wire.protocol import encode_end, encode_frame
from umvd_live.wire.security import enable_ipv6

DEFAULT_INPUT = "tcp://127.0.0.1:5555"
#: How long `FramePublisher.end` waits for room in a full send queue.
END_WAIT_S = 1.5


def sleep_unless_stopped(seconds: float, stop: threading.Event | None) -> bool:
    """A paced source's wait for its next frame's due time: ``seconds`` of sleep, cut short when
    ``stop`` is set. Returns whether it was (the source then stops)."""
    if stop is not None:
        return stop.wait(seconds)
    time.sleep(seconds)
    return False


class FramePublisher:
    """Publishes frames of one stream (``stream``) or of several (`publish`'s ``stream``), numbering
    each stream's frames with consecutive ``seq`` from 0."""

    def __init__(
        self,
        endpoint: str = DEFAULT_INPUT,
        stream: str = "cam0",
        *,
        bind: bool = False,
        sndhwm: int = 2000,
        context: zmq.Context | None = None,
        client_key: str | os.PathLike | None = None,
        server_key: str | os.PathLike | None = None,
    ):
        """``client_key``: this producer's ``NAME.key_secret``; ``server_key``: the daemon's
        public ``NAME.key``. Both or neither (then no CURVE, as on loopback)."""
        self.stream = stream
        self.endpoint = endpoint
        self._next_seq: dict[str, int] = {}
        self.sent = 0  # frames the socket took, with a subscriber to take them
        self.dropped = 0  # frames refused: the send queue was full
        self.undelivered = 0  # frames sent while no subscriber wanted their stream: discarded
        self.ends_lost = 0  # stream ends refused even after waiting `END_WAIT_S`, or with no subscriber
        self._topics: set[bytes] = set()  # the prefixes subscribed to now
        self._stalled = False  # an end timed out, and nothing went out since
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        # At the high-water mark an XPUB socket drops silently; with NODROP a non-blocking send
        # says so (EAGAIN), and the frame is counted in `dropped` (it read 0 with frames lost).
        self._sock.setsockopt(zmq.XPUB_NODROP, 1)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.setsockopt(zmq.SNDTIMEO, int(END_WAIT_S * 1000))  # only `end` sends blocking
        # Queue only to a connected daemon: when its connection goes, so does its subscription
        # (`undelivered` counts from then on) instead of frames piling up for a daemon that may
        # never come back, lost at `close` without a count.
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        enable_ipv6(self._sock, [endpoint])  # a daemon on tcp://[::1]
        if (client_key is None) != (server_key is None):
            self._sock.close(linger=0)
            raise ValueError("CURVE needs both client_key (NAME.key_secret) and server_key (the daemon's .key)")
        if client_key is not None and server_key is not None:  # both or neither, checked above
            from umvd_live.wire.security import apply_client

            try:
                apply_client(self._sock, client_key, server_key)
            except Exception:
                self._sock.close(linger=0)
                raise
        if bind:
            self._sock.bind(endpoint)
        else:
            self._sock.connect(endpoint)

    def wait_for_subscriber(self, timeout_s: float = 5.0) -> bool:
        """Block until a subscriber (the daemon) has subscribed, or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        self._read_subscriptions()
        while not self._topics and (left := deadline - time.monotonic()) > 0:
            if self._sock.poll(int(left * 1000), zmq.POLLIN):
                self._read_subscriptions()
        return bool(self._topics)

    def _read_subscriptions(self) -> None:
        """Take in the (un)subscriptions the XPUB socket has queued, without waiting: one per
        prefix, when its first subscriber comes (``0x01``) and when its last one goes (``0x00``,
        also when the daemon's connection closes)."""
        while self._sock.poll(0, zmq.POLLIN):
            msg = self._sock.recv(zmq.NOBLOCK)
            if msg[:1] == b"\x01":
                self._topics.add(msg[1:])
            elif msg[:1] == b"\x00":
                self._topics.discard(msg[1:])

    def _subscribed(self, stream: str) -> bool:
        topic = stream.encode()
        return any(topic.startswith(prefix) for prefix in self._topics)

    @property
    def seq(self) -> int:
        """The ``seq`` the default stream's next frame gets."""
        return self._next_seq.get(self.stream, 0)

    def publish(
        self,
        image: np.ndarray,
        t: float | None = None,
        meta: dict[str, Any] | None = None,
        *,
        seq: int | None = None,
        stream: str | None = None,
    ) -> bool:
        """Send one frame of ``stream`` (default: this publisher's) without blocking. Returns
        False if it could not go (counted in `dropped`) or nobody was subscribed to take it
        (counted in `undelivered`).

        ``seq`` lets a source send the frame's own acquisition number, so that frames lost before
        the publisher (e.g. in a source's hand-off queue) show up as gaps at the daemon; numbering
        then continues from ``seq + 1``. By default each stream's frames are numbered consecutively.
        """
        name = self.stream if stream is None else stream
        number = self._next_seq.get(name, 0) if seq is None else seq
        parts = encode_frame(name, image, number, t=t, meta=meta)
        self._next_seq[name] = number + 1
        self._read_subscriptions()
        try:
            self._sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped += 1
            return False
        self._stalled = False
        if not self._subscribed(name):
            self.undelivered += 1
            return False
        self.sent += 1
        return True

    def end(self, stream: str | None = None) -> bool:
        """Tell the daemon that ``stream`` (default: this publisher's) is over, so that it hands
        out the stream's last outputs now (protocol `StreamEnd`); its numbering starts from 0 again.

        Call it from the thread that sends (a hand-off's sender, a tap's, after an acquisition):
        when the send queue is full it waits up to `END_WAIT_S` for room, then counts the end in
        `ends_lost`, as one sent while no daemon was subscribed. After one timed out, the next ends
        are only tried until something goes out again (the daemon is stuck: one wait per stream of
        a large MDA would add up)."""
        name = self.stream if stream is None else stream
        parts = encode_end(name, self._next_seq.pop(name, 0))
        self._read_subscriptions()
        try:
            self._sock.send_multipart(parts, flags=zmq.NOBLOCK if self._stalled else 0, copy=False)
        except zmq.Again:
            self.ends_lost += 1
            self._stalled = True
            return False
        self._stalled = False
        if not self._subscribed(name):
            self.ends_lost += 1
            return False
        return True

    def restart_sequence(self) -> None:
        """Start numbering every stream at 0 again, as a restarted producer does."""
        self._next_seq.clear()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> FramePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
