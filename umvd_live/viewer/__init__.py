"""The live viewer: a napari dock widget and `umvd-live view`, subscribed to the daemon's output.

Nothing here imports Qt or napari at import time: the core package works without the optional
``viewer`` extra, and the Qt-free parts (`noise`, `session`, `sites`; the control
client is `umvd_live.wire.control_client`) are usable and testable on their own. The Qt side
(the dock widget, its plot and worker, `umvd-live view`) is `viewer.qt`; napari finds the
widget through the npe2 manifest ``napari.yaml``.
"""
