"""`umvd-live view`: a napari window with the live dock widget, subscribed to a running daemon.

``quit_after_s`` with ``screenshot`` take a screenshot of the whole window after that many seconds
and quit: for documentation and smoke tests without a person at the screen. The command line turns
its flags into the `ViewerConfig` (`apps.cli`), and refuses a ``quit_after_s`` that is not finite,
positive and at most `MAX_QUIT_AFTER_S`, or a ``screenshot`` without it. A ``screenshot`` whose
folder does not exist is refused before the window opens (exit status 2); one that cannot be
written still closes the window (exit status 1).
"""

from __future__ import annotations

import logging
from pathlib import Path

from umvd_live.viewer.session import ViewerConfig

log = logging.getLogger("umvd_live.viewer")
#: The longest ``quit_after_s``: Qt's timers count milliseconds in a signed 32-bit integer.
MAX_QUIT_AFTER_S = (2**31 - 1) / 1000


def open_viewer(config: ViewerConfig, show: bool = True):
    """A napari viewer with the dock widget docked on the right: (viewer, widget)."""
    import napari

    from umvd_live.viewer.qt.widget import LiveViewerWidget

    viewer = napari.Viewer(title="umvd-live", show=show)
    widget = LiveViewerWidget(viewer, config)
    viewer.window.add_dock_widget(widget, name="umvd-live", area="right")
    if show:
        viewer.window.resize(1500, 950)
    return viewer, widget


def run(config: ViewerConfig, *, quit_after_s: float | None = None, screenshot: Path | None = None) -> int:
    """Open the window and run napari's event loop until it closes (or ``quit_after_s`` passed).
    Returns the exit status: 0, 1 for a screenshot that could not be saved, 2 for one whose
    folder does not exist (said before the window opens)."""
    if screenshot is not None and not Path(screenshot).parent.is_dir():
        log.error("--screenshot %s: the folder %s does not exist", screenshot, Path(screenshot).parent)
        return 2
    try:
        import napari
        from qtpy.QtCore import QTimer
    except ImportError as exc:
        raise SystemExit(f"umvd-live view needs the viewer extra: pip install 'umvd-live[viewer]' ({exc})") from exc
    viewer, widget = open_viewer(config)
    status = 0
    if quit_after_s is not None:
        def finish() -> None:
            nonlocal status
            try:
                if screenshot is not None:
                    viewer.screenshot(str(screenshot), canvas_only=False)
                    log.info("screenshot saved to %s", screenshot)
            except Exception as exc:  # an exception in a Qt slot would leave the window open
                log.error("--screenshot %s: not saved: %s", screenshot, exc)
                status = 1
            finally:
                viewer.close()

        QTimer.singleShot(int(quit_after_s * 1000), finish)
    try:
        napari.run()
    finally:
        widget.close_session()
    return status
