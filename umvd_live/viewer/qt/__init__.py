"""The viewer's Qt side: the napari dock widget, its trace plot and worker, `umvd-live view`.

Its names load on first use, so that `umvd-live view` can say that napari or Qt is missing
instead of failing on import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the redundant aliases mark them re-exported (PEP 484), as __all__ is computed
    from umvd_live.viewer.qt.app import open_viewer as open_viewer
    from umvd_live.viewer.qt.plot import TraceLane as TraceLane
    from umvd_live.viewer.qt.plot import TracePlot as TracePlot
    from umvd_live.viewer.qt.plot import TraceSeries as TraceSeries
    from umvd_live.viewer.qt.widget import LiveViewerWidget as LiveViewerWidget
    from umvd_live.viewer.qt.worker import SessionWorker as SessionWorker

_MODULES = {
    "open_viewer": "app",
    "TraceLane": "plot",
    "TracePlot": "plot",
    "TraceSeries": "plot",
    "LiveViewerWidget": "widget",
    "SessionWorker": "worker",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
