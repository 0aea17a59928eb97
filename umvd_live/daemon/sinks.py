"""Where the daemon's frames can go besides the viewer socket: the interface a recorder implements.

A sink sees every valid input frame and every engine output, in order, on the daemon's processing
thread. A sink that *owes* a stream (a recording of it) makes the daemon infer every frame of that
stream, even late, instead of letting the preview skip to the latest window. Calls must return
quickly: a sink that writes to disk queues internally, so the live output never waits for a disk.
"""

from __future__ import annotations

import time
from typing import Any, Protocol, runtime_checkable

from umvd_live.daemon.streams import DenoisedOutput, StreamStarted, monotonic
from umvd_live.wire.protocol import Frame


@runtime_checkable
class FrameSink(Protocol):
    def owes(self, stream: str) -> bool:
        """True when this sink needs every denoised frame of ``stream`` (no preview skipping)."""
        ...

    def on_stream_started(self, event: StreamStarted, weights_hash: str) -> None:
        """A stream got a new denoiser (first frame, shape/dtype change, reset)."""
        ...

    def on_raw(self, frame: Frame, received: float) -> None:
        """Every valid input frame, as received. ``frame.pixels`` is a read-only view: copy it
        if it must outlive the call."""
        ...

    def on_denoised(self, output: DenoisedOutput) -> None:
        """Every engine output, in ``seq`` order per stream; ``output.image`` is None for a
        preview-skipped frame (never for a stream this sink owes)."""
        ...

    def close(self) -> None:
        """Called once at shutdown, after the last outputs were flushed."""
        ...


class RecordingSink:
    """Plugs a `umvd_live.recording.session.RecordingSession` into the daemon as a FrameSink.

    The session does its own queuing, spilling and writing; this adapter only translates calls.
    Receipt times are monotonic in the daemon and wall-clock (Unix seconds) in the recording.
    """

    def __init__(self, session: Any):  # a RecordingSession; Any keeps tifffile out of imports
        self.session = session

    def owes(self, stream: str) -> bool:
        return self.session.records(stream)

    def on_stream_started(self, event: StreamStarted, weights_hash: str) -> None:
        pass  # the session starts a new file part itself when a stream's shape changes

    def on_raw(self, frame: Frame, received: float) -> None:
        self.session.submit_raw(frame.stream, frame.header, frame.pixels, t_received=_wall(received))

    def on_denoised(self, output: DenoisedOutput) -> None:
        if output.image is None and not self.owes(output.stream):
            return  # a preview skip on a stream this recording does not take
        self.session.submit_denoised(output.stream, output.header, output.image, state=output.state,
                                     model_step=output.model_step, t_received=_wall(output.received))

    def close(self) -> None:
        """Stop accepting frames and wait until everything queued is on disk."""
        self.session.stop(wait=True)


def _wall(received: float) -> float:
    return time.time() - (monotonic() - received)
