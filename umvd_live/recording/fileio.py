"""Positioned writes and reads on a file descriptor, on every platform.

The recorder (`umvd_live.recording.ometiff`) and the spill queue (`umvd_live.recording.spillqueue`) write at
explicit offsets: a page past the end of the file, then an 8-byte link back into it. POSIX has
``os.pwrite``/``os.pread`` for that, which leave the descriptor's file position alone and so need
no lock. Windows has neither (Python offers them only on POSIX). There each call is
``lseek`` + ``write`` (or ``read``) under a lock per descriptor, so that two threads sharing one
descriptor (the spill queue's writer and reader) never interleave a seek with the other's
transfer.

Crash safety is the same on both: what matters to a reader after a kill is the order in which the
bytes reach the file and that the 8-byte commit write never crosses a 4 KiB page, and both paths
issue the same writes, in the same order, from the same buffers. (Durability across power loss
comes from ``os.fsync``, which Windows has: it is ``FlushFileBuffers`` there.) The helpers look
the POSIX calls up at each call, so a test can take them away (tests/test_portability.py).
"""

from __future__ import annotations

import os
import threading

_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(fd: int) -> threading.Lock:
    with _locks_guard:
        lock = _locks.get(fd)
        if lock is None:
            lock = _locks[fd] = threading.Lock()
        return lock


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd``; raises OSError (disk full: ENOSPC)."""
    view = memoryview(data).cast("B")
    pwrite = getattr(os, "pwrite", None)
    if pwrite is None:  # Windows
        with _lock_for(fd):
            os.lseek(fd, offset, os.SEEK_SET)
            while view.nbytes:
                n = os.write(fd, view)
                if n <= 0:  # pragma: no cover - a regular file either writes or raises
                    raise OSError("short write")
                view = view[n:]
        return
    while view.nbytes:
        n = pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover - a regular file either writes or raises
            raise OSError("short write")
        view = view[n:]
        offset += n


def pread_exact(fd: int, n: int, offset: int) -> bytes:
    """Exactly ``n`` bytes from ``offset`` of ``fd``; OSError(EIO) if the file ends before."""
    pread = getattr(os, "pread", None)
    parts: list[bytes] = []
    if pread is None:  # Windows
        with _lock_for(fd):
            os.lseek(fd, offset, os.SEEK_SET)
            while n > 0:
                chunk = os.read(fd, n)
                if not chunk:
                    raise OSError(5, "file shorter than expected")
                parts.append(chunk)
                n -= len(chunk)
    else:
        while n > 0:
            chunk = pread(fd, n, offset)
            if not chunk:
                raise OSError(5, "file shorter than expected")
            parts.append(chunk)
            n -= len(chunk)
            offset += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)  # b"" for n == 0


#: ``os.open`` flags for a binary file: Windows opens in text mode (CRLF translation) without
#: ``O_BINARY``; POSIX has no such flag (and no such mode).
O_BINARY = getattr(os, "O_BINARY", 0)
