"""The daemon: frames in over ZeroMQ -> one engine per stream -> every sink (output socket, recording).

Rooms: `config` (what it is asked to do), `transport` (the sockets and their threads), `router`
(decode, route, plan, fan out; no sockets), `service` (life cycle, the frame loop, control),
`streams`, `sinks`, `control`, `capacity`, `statestore`, `engines`, `status`.

Its names load on first use: `umvd-live` imports `daemon.runtime` before any command, and
`daemon.status` serves the demo, neither of which may pull torch in through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the redundant aliases mark them re-exported (PEP 484), as __all__ is computed
    from umvd_live.daemon.capacity import CapacityMonitor as CapacityMonitor
    from umvd_live.daemon.config import DaemonConfig as DaemonConfig
    from umvd_live.daemon.control import ControlError as ControlError
    from umvd_live.daemon.control import ControlHandler as ControlHandler
    from umvd_live.daemon.engines import EngineFactory as EngineFactory
    from umvd_live.daemon.engines import engine_factory as engine_factory
    from umvd_live.daemon.router import Router as Router
    from umvd_live.daemon.service import Daemon as Daemon
    from umvd_live.daemon.sinks import FrameSink as FrameSink
    from umvd_live.daemon.sinks import PublisherSink as PublisherSink
    from umvd_live.daemon.sinks import RecordingSink as RecordingSink
    from umvd_live.daemon.statestore import StateStore as StateStore
    from umvd_live.daemon.statestore import StateWorker as StateWorker
    from umvd_live.daemon.status import StatusDisplay as StatusDisplay
    from umvd_live.daemon.streams import LiveStream as LiveStream
    from umvd_live.daemon.streams import StreamEngine as StreamEngine
    from umvd_live.daemon.streams import StreamEngineFactory as StreamEngineFactory
    from umvd_live.daemon.transport import ControlServer as ControlServer
    from umvd_live.daemon.transport import Inbox as Inbox
    from umvd_live.daemon.transport import InputReceiver as InputReceiver
    from umvd_live.daemon.transport import Transport as Transport

_MODULES = {
    "CapacityMonitor": "capacity",
    "ControlError": "control",
    "ControlHandler": "control",
    "ControlServer": "transport",
    "Daemon": "service",
    "DaemonConfig": "config",
    "EngineFactory": "engines",
    "engine_factory": "engines",
    "FrameSink": "sinks",
    "Inbox": "transport",
    "InputReceiver": "transport",
    "LiveStream": "streams",
    "PublisherSink": "sinks",
    "RecordingSink": "sinks",
    "Router": "router",
    "StateStore": "statestore",
    "StateWorker": "statestore",
    "StatusDisplay": "status",
    "StreamEngine": "streams",
    "StreamEngineFactory": "streams",
    "Transport": "transport",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
