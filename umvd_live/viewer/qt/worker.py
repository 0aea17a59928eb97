"""The QThread that runs a `LiveSession` and hands its events to the GUI thread.

Frames and stats go through `LatestOnly` mailboxes: a signal is emitted only when the mailbox was
empty, so a GUI slower than the stream sees the newest frames and never a growing queue of old
ones; the frames a newer hand-over replaces unread count as not shown (`LiveSession.merge_unread`).
Command replies are rare and each matters, so they travel in the signal itself.
"""

from __future__ import annotations

import logging
import threading

from qtpy.QtCore import QThread, Signal, Slot

from umvd_live.viewer.session import LatestOnly, LiveSession, LiveStats, SiteFrames, ViewerConfig

log = logging.getLogger("umvd_live.viewer")


class SessionWorker(QThread):
    frames_ready = Signal()
    stats_ready = Signal()
    command_done = Signal(object)  # ControlReply or CommandFailed

    def __init__(self, config: ViewerConfig, parent=None):
        super().__init__(parent)
        self.config = config
        self.session = LiveSession(config)
        self.frames: LatestOnly[SiteFrames] = LatestOnly(self.session.merge_unread)
        self.stats: LatestOnly[LiveStats] = LatestOnly()
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                try:
                    events = self.session.step(20)
                except Exception:  # a bug must not end the feed for good: log, breathe, go on
                    log.exception("viewer worker: step failed")
                    self._halt.wait(1.0)
                    continue
                for event in events:
                    if isinstance(event, SiteFrames):
                        if self.frames.put(event):
                            self.frames_ready.emit()
                    elif isinstance(event, LiveStats):
                        if self.stats.put(event):
                            self.stats_ready.emit()
                    else:
                        self.command_done.emit(event)
        finally:
            self.session.close()

    @Slot()  # connected to a widget's `destroyed`, whose argument it does not take
    def stop(self, timeout_ms: int = 3000) -> None:
        self._halt.set()
        self.wait(timeout_ms)
