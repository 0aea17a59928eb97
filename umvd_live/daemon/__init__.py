"""The daemon: frames in over ZeroMQ -> one engine per stream -> every sink (output socket, recording).

Its names load on first use: `umvd-live` imports `daemon.runtime` before any command, and
`daemon.status` serves the demo, neither of which may pull torch in through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from umvd_live.daemon.capacity import CapacityMonitor
    from umvd_live.daemon.control import ControlError, ControlHandler
    from umvd_live.daemon.service import Daemon, DaemonConfig, engine_factory
    from umvd_live.daemon.sinks import FrameSink, RecordingSink
    from umvd_live.daemon.statestore import StateStore
    from umvd_live.daemon.status import StatusDisplay
    from umvd_live.daemon.streams import LiveStream, StreamEngine, StreamEngineFactory

_MODULES = {
    "CapacityMonitor": "capacity",
    "ControlError": "control",
    "ControlHandler": "control",
    "Daemon": "service",
    "DaemonConfig": "service",
    "engine_factory": "service",
    "FrameSink": "sinks",
    "RecordingSink": "sinks",
    "StateStore": "statestore",
    "StatusDisplay": "status",
    "LiveStream": "streams",
    "StreamEngine": "streams",
    "StreamEngineFactory": "streams",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
