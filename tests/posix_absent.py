"""Make a process look like Windows to umvd-live: the POSIX-only APIs it could reach for are gone.

``remove(monkeypatch)`` does it inside a test (undone after it); ``python tests/posix_absent.py
ARGS...`` runs ``umvd-live ARGS...`` in a process where they are gone from the start, for the
commands (``serve --record``, ``denoise``, ``acquire``, ``view``) tested as subprocesses
(tests/test_portability.py). That process also has Windows' ``signal.SIGBREAK`` (Ctrl-Break,
``CTRL_BREAK_EVENT``), a number Linux delivers: send it `SIGBREAK` as Windows sends Ctrl-Break.
The third-party libraries are imported first: on Windows they take their own Windows paths, which
this cannot imitate; what is under test is umvd-live's own code.
"""

from __future__ import annotations

import os
import signal
import sys

#: os functions and flags Windows' Python does not have (that umvd-live might use).
OS_NAMES = ("pwrite", "pread", "fork", "forkpty", "sched_getaffinity", "sched_setaffinity",
            "O_NOFOLLOW", "O_CLOEXEC", "getuid", "geteuid", "getpgid", "killpg", "setsid", "getloadavg")
#: Those removed inside a test: pytest itself needs the others (getuid for tmp_path).
IN_TEST_OS_NAMES = ("pwrite", "pread", "fork", "forkpty", "sched_getaffinity", "O_NOFOLLOW", "O_CLOEXEC")
#: Signals Windows has no number for (it has SIGINT, SIGTERM, SIGABRT, SIGBREAK, ...).
SIGNAL_NAMES = ("SIGKILL", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGCHLD",
                "SIGXFSZ")
#: Windows' SIGBREAK, as a subprocess of `remove_for_good` has it: a signal Linux delivers and
#: whose default, like SIGBREAK's, ends the process at once with nothing flushed (SIGBREAK's own
#: number, 21, is SIGTTIN here, which would only suspend it).
SIGBREAK = int(signal.SIGUSR1)
#: Modules Windows' Python does not have: importing one raises ImportError.
MODULES = ("resource", "fcntl", "termios", "pwd", "grp")
#: Imported before the APIs go: the libraries umvd-live uses (see the module docstring).
LIBRARIES = ("numpy", "scipy.ndimage", "torch", "zmq", "msgpack", "tifffile", "rich.console",
             "rich.live", "rich.progress", "rich.logging", "psutil")
#: And for ``view``: napari and Qt (platformdirs, under napari, takes ``os.geteuid`` on Linux).
VIEWER_LIBRARIES = ("napari", "napari.viewer", "napari.qt", "napari._qt.qt_main_window", "qtpy.QtCore")


def remove(monkeypatch) -> None:
    """In this process, until the test ends: the modules and the os functions umvd-live's own code
    could reach for (not the signals, which pytest-timeout needs). psutil is imported first (on
    Linux it uses ``resource`` itself; on Windows its own Windows module)."""
    __import__("psutil")
    for name in IN_TEST_OS_NAMES:
        monkeypatch.delattr(os, name, raising=False)
    for name in MODULES:
        monkeypatch.setitem(sys.modules, name, None)


def remove_for_good(command: str = "") -> None:
    for lib in LIBRARIES + (VIEWER_LIBRARIES if command == "view" else ()):
        __import__(lib)
    for name in OS_NAMES:
        if hasattr(os, name):
            delattr(os, name)
    for name in SIGNAL_NAMES:
        if hasattr(signal, name):
            delattr(signal, name)
    signal.SIGBREAK = SIGBREAK  # type: ignore[attr-defined]  # Windows only
    for name in MODULES:
        sys.modules[name] = None  # type: ignore[assignment]


if __name__ == "__main__":
    remove_for_good(sys.argv[1] if len(sys.argv) > 1 else "")
    from umvd_live.apps.cli import main

    sys.exit(main(sys.argv[1:]))
