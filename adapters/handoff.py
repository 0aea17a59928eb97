"""A bounded hand-off between an acquisition callback and the network.

Micro-Manager calls its frame callbacks (pymmcore-plus ``frameReady``, pycromanager's
``image_process_fn``) on the acquisition's own thread: whatever the callback does delays the next
frame. `FrameHandoff.offer` only appends to a bounded queue and returns; a sender thread encodes and
publishes. When the queue is full (network or daemon stalled for longer than the queue lasts) the
frame is dropped *here* and counted, and the acquisition goes on at full speed.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from umvd_live.adapters.publisher import FramePublisher

log = logging.getLogger(__name__)

_STOP = object()


@dataclass(frozen=True)
class HandoffStats:
    """Counters of one hand-off: every offered frame ends up sent, dropped (here or by the
    publisher), undelivered, rejected, or still pending."""

    offered: int
    handoff_dropped: int  # refused because the queue was full
    sent: int  # accepted by the publisher's socket
    publisher_dropped: int  # refused by the publisher (its send queue full)
    rejected: int  # not encodable (e.g. a dtype protocol v1 does not carry); see the log
    pending: int  # still in the queue
    undelivered: int  # sent while no daemon was subscribed (down, or restarting): discarded
    ends_lost: int  # stream ends the publisher could not send (`FramePublisher.end`)


@dataclass(frozen=True)
class _Item:
    image: np.ndarray
    t: float | None
    meta: dict[str, Any] | None
    seq: int | None
    stream: str | None  # None: the publisher's own stream


@dataclass(frozen=True)
class _End:
    stream: str | None


class FrameHandoff:
    """Queue + sender thread in front of a `FramePublisher` (which is then used by that thread only)."""

    def __init__(self, publisher: FramePublisher, maxsize: int = 256):
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.publisher = publisher
        self.maxsize = maxsize
        # Unbounded underneath: the bound counts frames only, so that a stream's end (`end`) is
        # never refused and always follows that stream's last frame.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued_frames = 0
        self._offered = 0
        self._dropped = 0
        self._rejected = 0
        self.last_error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FrameHandoff:
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_loop, name="umvd-handoff", daemon=True)
            self._thread.start()
        return self

    def offer(
        self,
        image: np.ndarray,
        t: float | None = None,
        meta: dict[str, Any] | None = None,
        seq: int | None = None,
        stream: str | None = None,
    ) -> bool:
        """Queue one frame of ``stream`` (default: the publisher's) for sending; never blocks.
        False means it was dropped (``maxsize`` frames already waiting).

        The image is kept by reference, not copied: callers pass arrays nobody writes to afterwards
        (pymmcore-plus and pycromanager hand each callback a fresh array).
        """
        with self._lock:
            self._offered += 1
            if self._queued_frames >= self.maxsize:
                self._dropped += 1
                return False
            self._queued_frames += 1
        self._queue.put(_Item(image, t, meta, seq, stream))
        return True

    def end(self, stream: str | None = None) -> None:
        """Queue the end of ``stream`` after its frames already queued (`FramePublisher.end`,
        which may wait a little for room, here on the sender thread); never blocks, never refused."""
        self._queue.put(_End(stream))

    def _send_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, _End):
                self.publisher.end(item.stream)
                continue
            with self._lock:
                self._queued_frames -= 1
            try:
                self.publisher.publish(item.image, t=item.t, meta=item.meta, seq=item.seq, stream=item.stream)
            except (ValueError, TypeError) as exc:
                # A frame the protocol cannot carry must not kill the sender (nor, through it, the
                # acquisition): count it and say why, once.
                with self._lock:
                    self._rejected += 1
                    first = self.last_error is None
                    self.last_error = str(exc)
                if first:
                    log.error("frame not sent: %s", exc)

    def close(self, timeout_s: float = 10.0) -> HandoffStats:
        """Send what is queued (up to ``timeout_s``), stop the thread and return the final counts."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout_s)
            self._thread = None
        return self.stats()

    def stats(self) -> HandoffStats:
        with self._lock:
            offered, dropped, rejected = self._offered, self._dropped, self._rejected
        return HandoffStats(
            offered=offered,
            handoff_dropped=dropped,
            sent=self.publisher.sent,
            publisher_dropped=self.publisher.dropped,
            rejected=rejected,
            pending=self._queued_frames,
            undelivered=self.publisher.undelivered,
            ends_lost=self.publisher.ends_lost,
        )

    def __enter__(self) -> FrameHandoff:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
