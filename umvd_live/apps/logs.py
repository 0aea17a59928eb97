"""One log format and one ``--log-level`` for every command (`cli.main` applies them).

Every command's log lines go to stderr as ``TIME LEVEL LOGGER: MESSAGE``, so the lines of
``serve``, ``acquire``, ``view`` and ``denoise`` running side by side read alike. ``--log-level``
sets the level of umvd-live's own loggers (``umvd_live.*``); libraries (pymmcore-plus,
mmpycorex, napari, ZeroMQ's authenticator) say only warnings and errors, except at ``debug``,
where everything is shown. The level is set on the ``umvd_live`` logger itself, so it holds
even where a command replaces the handler (``serve`` on a terminal prints through its live
status display).
"""

from __future__ import annotations

import argparse
import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LEVEL = "info"


def add_argument(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` on a command's parser."""
    parser.add_argument("--log-level", choices=LEVELS, default=DEFAULT_LEVEL, type=str.lower,
                        help=f"what umvd-live logs to stderr (default {DEFAULT_LEVEL}; debug also "
                             "shows the libraries' debug messages)")


def configure(level: str = DEFAULT_LEVEL) -> None:
    """Log to stderr in `FORMAT`: umvd-live's loggers at ``level``, the others at warning (all at
    debug). Replaces handlers set up before (a second call, as in tests, does not double lines)."""
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; one of {', '.join(LEVELS)}")
    number = logging.getLevelNamesMapping()[level.upper()]
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    if number > logging.DEBUG:
        # a library logger with a level of its own (pymmcore-plus: DEBUG) passes its records to
        # this handler whatever the root's level: the filter holds them back
        handler.addFilter(_ours_or_warnings)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if number <= logging.DEBUG else max(number, logging.WARNING))
    logging.getLogger("umvd_live").setLevel(number)


def _ours_or_warnings(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name == "umvd_live" or record.name.startswith("umvd_live.")
