"""What Windows does differently, in one place for every part of umvd-live (standard library only,
so the engine, the daemon, the recorders and the commands import it without importing each other).

* `replace_file`: ``os.replace`` retried while Windows refuses it. A file another process holds
  open without delete sharing (a viewer reading it, a virus scanner or indexer scanning a file
  just written) cannot be replaced until it lets go: PermissionError, for a moment. POSIX
  replaces open files; a PermissionError there is for good and is raised after the same short
  wait. Used for model files and the ready file (`engine.checkpoint.write_atomically`) and for
  an OME-Zarr store's metadata (`recording.omezarr`).
* `stop_signals`: the signals that ask a process to stop cleanly. Windows never delivers SIGTERM
  and has SIGBREAK: Ctrl-Break, and ``CTRL_BREAK_EVENT``, the only console event that reaches a
  child started with ``CREATE_NEW_PROCESS_GROUP`` (`apps.harness` starts `serve` so); left to
  its default it ends the process at once, with nothing flushed. `stop_signals_as_ctrl_c` makes
  every command (`apps.cli.main`) end on them as on Ctrl-C; `serve` and the demo's streaming loop
  then put their own handler in place (`handle_stop_signals`).

Positioned reads and writes (no ``os.pwrite`` on Windows) are `recording.fileio`'s. The helpers
look their ``os`` and ``signal`` names up at each call, so a test can imitate Windows
(tests/test_portability.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: How long a refused `replace_file` is retried (from 5 ms, doubling, to 100 ms between tries).
REPLACE_RETRY_S = 1.0


def replace_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], retry_s: float | None = None) -> None:
    """``os.replace(src, dst)``, retried for up to ``retry_s`` (default `REPLACE_RETRY_S`) while it
    raises PermissionError; the last PermissionError is raised once that time is up. Any other
    error is raised at once."""
    deadline = time.monotonic() + (REPLACE_RETRY_S if retry_s is None else retry_s)
    delay = 0.005
    while True:
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def stop_signals() -> tuple[int, ...]:
    """The signals this platform has that ask a process to stop: SIGINT (Ctrl-C) and SIGTERM
    everywhere (Windows defines SIGTERM but never delivers it), SIGBREAK where it exists
    (Windows: Ctrl-Break, ``CTRL_BREAK_EVENT``)."""
    found = [signal.SIGINT, signal.SIGTERM]
    sigbreak = getattr(signal, "SIGBREAK", None)
    if sigbreak is not None:
        found.append(sigbreak)
    return tuple(found)


def handle_stop_signals(handler: Callable[[int, Any], Any], *, keep_sigint: bool = False) -> dict[int, Any]:
    """Install ``handler`` for every one of `stop_signals` (SIGINT left as it is with
    ``keep_sigint``: Python's own handler raises KeyboardInterrupt); returns the handlers it
    replaced, for `restore_signals`. On the main thread only, as `signal.signal`."""
    return {sig: signal.signal(sig, handler) for sig in stop_signals()
            if not (keep_sigint and sig == signal.SIGINT)}


def restore_signals(previous: dict[int, Any]) -> None:
    """Put back the handlers `handle_stop_signals` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: a handler not set from Python


def ctrl_c(signum: int, frame: Any) -> None:
    """A stop signal taken as Ctrl-C: the handler SIGINT has now is called, as SIGINT would call
    it (Python's own raises KeyboardInterrupt; napari's, while `view`'s event loop runs, quits the
    loop and raises it afterwards, where a KeyboardInterrupt raised in a Qt slot would be lost).
    Where SIGINT has no Python handler (ignored, as in a shell's background job), KeyboardInterrupt
    is raised here: the signal was sent to stop this process."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not ctrl_c:
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


@contextmanager
def stop_signals_as_ctrl_c() -> Iterator[None]:
    """For the block: SIGTERM and (Windows) SIGBREAK, Ctrl-Break, handled as Ctrl-C (`ctrl_c`),
    so a command's KeyboardInterrupt clean-up runs (a recording flushed and closed, the daemon
    told) instead of the process ending at once; SIGINT is left as it is. The previous handlers
    are put back after. Python sets handlers from the main thread only: elsewhere (a command run
    from an embedding application's thread) the block runs with the handlers as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = handle_stop_signals(ctrl_c, keep_sigint=True)
    try:
        yield
    finally:
        restore_signals(previous)


def signal_name(signum: int) -> str:
    """``SIGTERM``, ``SIGBREAK``, ...; ``signal 42`` for a number the platform has no name for."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
