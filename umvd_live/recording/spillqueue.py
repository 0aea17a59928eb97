"""A FIFO of frames that never blocks its producer and never drops: past a memory budget, frames
wait on disk.

Why: the recorder's queue sits between the daemon's processing thread and the file writer. A slow
disk must not stall processing (so `put` does no I/O at all), a long backlog must not exhaust
memory (so a spill thread moves the overflow to a spill file), and nothing may be lost (so the
order is kept exactly). The queue is three segments, oldest first::

    head (memory)  <  spilled (pixels on disk, headers in memory)  <  tail (memory)

`put` appends to the head while nothing is spilled or pending and the budget allows, else to the
tail; the spill thread moves the tail's oldest items to the spill file while memory is over
budget; `get` takes from the head, then the spilled segment, then the tail's oldest item. So the
head never holds more than the budget, and whatever memory holds beyond it stays spillable. Past a hard
limit (the spill thread cannot keep up either) `put` raises `QueueOverflow`: the caller stops the
recording with a clear error rather than exhaust memory.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from umvd_live.recording.fileio import pread_exact, pwrite_all


class QueueOverflow(RuntimeError):
    """The queue is over its hard memory limit: the spill file cannot keep up."""


class QueueClosed(RuntimeError):
    """The queue takes no more items (sealed or closed)."""


class SpillError(OSError):
    """Writing or reading the spill file failed (for example the disk is full)."""


@dataclass(frozen=True)
class QueueStats:
    queued: int  # items waiting, wherever they are
    memory_bytes: int  # pixel bytes held in memory
    spilled: int  # items whose pixels are in the spill file now
    spilled_bytes: int
    spilled_total: int  # items ever spilled


@dataclass
class _Spilled:
    header: dict[str, Any]
    offset: int
    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]


class SpillQueue:
    """FIFO of ``(header dict, ndarray)``; one producer thread, one consumer thread."""

    def __init__(self, spill_dir: str | os.PathLike, memory_budget_bytes: int,
                 hard_limit_bytes: int | None = None, *, name: str = "umvd-spill"):
        if memory_budget_bytes <= 0:
            raise ValueError("memory_budget_bytes must be positive")
        self.spill_dir = Path(spill_dir)
        self.budget = int(memory_budget_bytes)
        self.hard_limit = int(hard_limit_bytes if hard_limit_bytes is not None else 2 * self.budget)
        self._name = name
        self._cond = threading.Condition()
        self._head: deque[tuple[dict, np.ndarray]] = deque()
        self._tail: deque[tuple[dict, np.ndarray]] = deque()
        self._spilled: deque[_Spilled] = deque()
        self._in_flight = 0  # items the spill thread holds while writing them
        self._mem = 0
        self._spilled_bytes = 0
        self._spilled_total = 0
        self._write_pos = 0
        self._fd: int | None = None
        self.spill_path: Path | None = None
        self.error: SpillError | None = None
        self._sealed = False  # no more puts; what is queued can still be taken
        self._closed = False
        self._thread = threading.Thread(target=self._spill_loop, name=f"{name}-spiller", daemon=True)
        self._thread.start()

    # -- producer -----------------------------------------------------------------------------
    def put(self, header: dict[str, Any], array: np.ndarray) -> None:
        """Enqueue without I/O and without waiting on the consumer. Raises QueueOverflow."""
        n = array.nbytes
        with self._cond:
            if self._sealed or self._closed:
                raise QueueClosed("the queue takes no more items")
            if self._mem + n > self.hard_limit and self._mem > 0:
                raise QueueOverflow(
                    f"{self._mem + n} bytes queued in memory > hard limit {self.hard_limit}"
                    + (f"; spilling failed: {self.error}" if self.error else
                       "; the spill file cannot keep up"))
            if not self._spilled and not self._tail and not self._in_flight and self._mem + n <= self.budget:
                self._head.append((header, array))
            else:
                self._tail.append((header, array))
            self._mem += n
            self._cond.notify_all()

    # -- consumer -----------------------------------------------------------------------------
    def get(self, timeout: float | None = None) -> tuple[dict[str, Any], np.ndarray] | None:
        """The oldest item, or None if none arrives within ``timeout``. Raises SpillError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._head:
                    header, array = self._head.popleft()
                    self._mem -= array.nbytes
                    self._cond.notify_all()
                    return header, array
                if self._spilled:
                    rec = self._spilled.popleft()
                    break
                if self._in_flight:
                    self._cond.wait()
                    continue
                self._write_pos = 0  # nothing unread on disk: the spill file is reused from 0
                if self._tail:
                    # the tail's oldest is next in line; the rest stays in the tail, where the
                    # spill thread can still move it to disk (moved to the head it could not)
                    header, array = self._tail.popleft()
                    self._mem -= array.nbytes
                    self._cond.notify_all()
                    return header, array
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
        # read outside the lock: the producer must never wait on the disk
        try:
            data = _pread_all(self._fd, rec.nbytes, rec.offset)
        except OSError as exc:
            raise SpillError(exc.errno, f"reading the spill file failed: {exc.strerror}") from exc
        with self._cond:
            self._spilled_bytes -= rec.nbytes
        return rec.header, np.frombuffer(data, rec.dtype).reshape(rec.shape)

    def __len__(self) -> int:
        with self._cond:
            return len(self._head) + len(self._tail) + len(self._spilled) + self._in_flight

    def stats(self) -> QueueStats:
        with self._cond:
            return QueueStats(
                queued=len(self._head) + len(self._tail) + len(self._spilled) + self._in_flight,
                memory_bytes=self._mem,
                spilled=len(self._spilled) + self._in_flight,
                spilled_bytes=self._spilled_bytes,
                spilled_total=self._spilled_total,
            )

    def seal(self) -> None:
        """Refuse further `put`s, so that a consumer can drain the queue knowing it is final."""
        with self._cond:
            self._sealed = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the spill thread and delete the spill file (its content is then unreachable)."""
        with self._cond:
            self._sealed = self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.spill_path is not None:
            try:
                self.spill_path.unlink()
            except FileNotFoundError:
                pass

    # -- spill thread -------------------------------------------------------------------------
    def _spill_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._mem > self.budget and self._tail and self.error is None):
                    self._cond.wait()
                if self._closed:
                    return
                header, array = self._tail.popleft()
                self._in_flight = 1
                offset = self._write_pos
                self._write_pos += array.nbytes
            try:
                self._write(array, offset)
            except OSError as exc:
                with self._cond:
                    # keep the item (and the order): it goes back to the front of the tail
                    self._tail.appendleft((header, array))
                    self._in_flight = 0
                    self.error = SpillError(exc.errno, f"writing the spill file failed: {exc.strerror}")
                    self._cond.notify_all()
                continue
            with self._cond:
                self._spilled.append(_Spilled(header, offset, array.nbytes, array.dtype, array.shape))
                self._in_flight = 0
                self._mem -= array.nbytes
                self._spilled_bytes += array.nbytes
                self._spilled_total += 1
                self._cond.notify_all()

    def _write(self, array: np.ndarray, offset: int) -> None:
        if self._fd is None:
            fd, name = tempfile.mkstemp(prefix=f".{self._name}-", suffix=".spill", dir=self.spill_dir)
            self._fd, self.spill_path = fd, Path(name)
        pwrite_all(self._fd, np.ascontiguousarray(array).data.cast("B"), offset)


def _pread_all(fd: int | None, n: int, offset: int) -> bytes:
    if fd is None:
        raise OSError(9, "spill file not open")
    return pread_exact(fd, n, offset)
