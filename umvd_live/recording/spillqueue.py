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

The spill files rotate: once one holds `rotate_bytes`, the next item goes to a new file, and a
file is deleted as soon as its last item is read. A writer that stays a few frames behind the
camera for hours (the spilled segment never empty) then holds on disk about its backlog, not every
frame that ever passed through.
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

#: Bytes a spill file takes before the next item goes to a new one (at least the memory budget).
ROTATE_BYTES = 64 * 2**20


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


@dataclass(eq=False)
class _SpillFile:
    fd: int
    path: Path
    size: int = 0  # bytes written and reserved: where the next item goes
    unread: int = 0  # items written or being written to it and not yet read back


@dataclass
class _Spilled:
    header: dict[str, Any]
    file: _SpillFile
    offset: int
    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]


class SpillQueue:
    """FIFO of ``(header dict, ndarray)``; one producer thread, one consumer thread."""

    def __init__(self, spill_dir: str | os.PathLike, memory_budget_bytes: int,
                 hard_limit_bytes: int | None = None, *, name: str = "umvd-spill",
                 rotate_bytes: int | None = None):
        if memory_budget_bytes <= 0:
            raise ValueError("memory_budget_bytes must be positive")
        self.spill_dir = Path(spill_dir)
        self.budget = int(memory_budget_bytes)
        self.hard_limit = int(hard_limit_bytes if hard_limit_bytes is not None else 2 * self.budget)
        #: a spill file takes no new item once it holds this much (module docstring)
        self.rotate_bytes = int(rotate_bytes if rotate_bytes is not None else max(self.budget, ROTATE_BYTES))
        self._name = name
        self._cond = threading.Condition()
        self._head: deque[tuple[dict, np.ndarray]] = deque()
        self._tail: deque[tuple[dict, np.ndarray]] = deque()
        self._spilled: deque[_Spilled] = deque()
        self._in_flight = 0  # items the spill thread holds while writing them
        self._mem = 0
        self._spilled_bytes = 0
        self._spilled_total = 0
        self._file: _SpillFile | None = None  # the file the spill thread writes to
        self._files: list[_SpillFile] = []  # every file not yet deleted, oldest first
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
                left = None if deadline is None else deadline - time.monotonic()
                if self._in_flight:
                    if left is not None and left <= 0:
                        return None
                    self._cond.wait(left)
                    continue
                if self._file is not None and not self._file.unread:
                    self._file.size = 0  # nothing unread on disk: the spill file is reused from 0
                if self._tail:
                    # the tail's oldest is next in line; the rest stays in the tail, where the
                    # spill thread can still move it to disk (moved to the head it could not)
                    header, array = self._tail.popleft()
                    self._mem -= array.nbytes
                    self._cond.notify_all()
                    return header, array
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
        # read outside the lock: the producer must never wait on the disk
        try:
            data = pread_exact(rec.file.fd, rec.nbytes, rec.offset)
        except OSError as exc:
            raise SpillError(exc.errno, f"reading the spill file failed: {exc.strerror}") from exc
        finally:
            with self._cond:
                self._spilled_bytes -= rec.nbytes
                rec.file.unread -= 1
                done = self._let_go(rec.file)
            if done:
                _delete(rec.file)
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
        """Refuse further `put`s, so that a consumer can drain the queue knowing it is final (and
        spill no more). `get` may still time out while an item is being spilled: the queue is
        drained when ``len()`` is 0."""
        with self._cond:
            self._sealed = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the spill thread and delete the spill file (its content is then unreachable)."""
        with self._cond:
            self._sealed = self._closed = True
            self._cond.notify_all()
        self._thread.join()
        with self._cond:
            files, self._files, self._file = self._files, [], None
        for file in files:
            _delete(file)

    @property
    def spill_paths(self) -> list[Path]:
        """The spill files on disk now, oldest first."""
        with self._cond:
            return [file.path for file in self._files]

    # -- spill thread -------------------------------------------------------------------------
    def _spill_loop(self) -> None:
        while True:
            with self._cond:
                # sealed: memory only shrinks from now on, and the consumer would read whatever
                # went to disk straight back; it takes the tail from memory instead
                while not self._closed and not (self._mem > self.budget and self._tail and self.error is None
                                                and not self._sealed):
                    self._cond.wait()
                if self._closed:
                    return
                header, array = self._tail.popleft()
                self._in_flight = 1
                file = self._file
                if file is not None and (file.size == 0 or file.size + array.nbytes <= self.rotate_bytes):
                    offset, file.size, file.unread = file.size, file.size + array.nbytes, file.unread + 1
                else:
                    file = None  # a new file (made outside the lock: the producer never waits on I/O)
            try:
                if file is None:
                    file, offset = self._new_file(array.nbytes), 0
                pwrite_all(file.fd, np.ascontiguousarray(array).data.cast("B"), offset)
            except Exception as exc:  # whatever it is, the item is kept and the writer told
                with self._cond:
                    # keep the item (and the order): it goes back to the front of the tail
                    self._tail.appendleft((header, array))
                    self._in_flight = 0
                    if file is not None:
                        file.unread -= 1
                    if isinstance(exc, OSError) and exc.errno is not None:
                        self.error = SpillError(exc.errno, f"writing the spill file failed: {exc.strerror}")
                    else:
                        self.error = SpillError(f"writing the spill file failed: {exc!r}")
                    self._cond.notify_all()
                continue
            with self._cond:
                self._spilled.append(_Spilled(header, file, offset, array.nbytes, array.dtype, array.shape))
                self._in_flight = 0
                self._mem -= array.nbytes
                self._spilled_bytes += array.nbytes
                self._spilled_total += 1
                self._cond.notify_all()

    def _new_file(self, first_item_bytes: int) -> _SpillFile:
        """A new spill file, holding the item about to be written; the one before it is deleted
        here if everything in it was read already, else by `get` once it is."""
        fd, name = tempfile.mkstemp(prefix=f".{self._name}-", suffix=".spill", dir=self.spill_dir)
        file = _SpillFile(fd, Path(name), size=first_item_bytes, unread=1)
        with self._cond:
            old, self._file = self._file, file
            self._files.append(file)
            done = old is not None and self._let_go(old)
        if done:
            assert old is not None
            _delete(old)
        return file

    def _let_go(self, file: _SpillFile) -> bool:
        """With the lock held: whether ``file`` is done with (every item in it read, and no more
        going to it); if so it leaves the list, and the caller deletes it outside the lock."""
        if file.unread or file is self._file:
            return False
        self._files.remove(file)
        return True


def _delete(file: _SpillFile) -> None:
    os.close(file.fd)
    try:
        file.path.unlink()
    except FileNotFoundError:
        pass
