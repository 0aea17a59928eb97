"""`umvd-live view`: a napari window with the live dock widget, subscribed to a running daemon.

``--screenshot PATH --quit-after S`` take a screenshot of the whole window after S seconds and
quit: for documentation and smoke tests without a person at the screen.
"""

from __future__ import annotations

import argparse
import logging

from umvd_live.viewer.session import ViewerConfig

log = logging.getLogger("umvd_live.viewer")


def config_from_args(args: argparse.Namespace) -> ViewerConfig:
    region = tuple(args.region) if getattr(args, "region", None) else None
    return ViewerConfig(output=args.connect, control=args.control, stream=args.stream, region=region)


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


def run(args: argparse.Namespace) -> int:
    try:
        import napari
        from qtpy.QtCore import QTimer
    except ImportError as exc:
        raise SystemExit(f"umvd-live view needs the viewer extra: pip install 'umvd-live[viewer]' ({exc})")
    viewer, widget = open_viewer(config_from_args(args))
    if args.quit_after is not None:
        def finish() -> None:
            if args.screenshot:
                viewer.screenshot(args.screenshot, canvas_only=False)
                log.info("screenshot saved to %s", args.screenshot)
            viewer.close()

        QTimer.singleShot(int(args.quit_after * 1000), finish)
    try:
        napari.run()
    finally:
        widget.close_session()
    return 0
