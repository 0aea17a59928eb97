"""Where the daemon's frames go: every output is a `FrameSink`, the viewers' socket included.

The router hands every sink the same events, in order, in one loop (`router.Router._fan_out`):
a stream's new denoiser, every valid input frame, every engine output. A sink that *owes* a
stream (a recording of it) makes the daemon infer every frame of that stream, even late, instead
of letting the preview skip to the latest window. Calls run on the frame loop and must return
quickly: a sink that writes to disk queues internally, so the live output never waits for a disk.

- `PublisherSink`: the output PUB socket (`transport.py` binds it): the raw input as it came
  under ``<stream>/raw``, each denoised frame with its latency (docs/protocol.md). It owes no
  stream: a viewer wants the present, not every frame.
- `RecordingSink`: a `recording.session.RecordingSession` (``record_start``, ``serve --record``),
  with its streams' weights hashes (`WeightsHashes`: the loop copies the weights of the engine that
  made a stream's first recorded output, the daemon's state worker hashes the copy).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import zmq

from umvd_live.daemon.streams import Arrival, DenoisedOutput, EngineWeights, StreamStarted, monotonic
from umvd_live.wire.protocol import RAW_SUFFIX, encode_denoised

if TYPE_CHECKING:  # recording.session imports the file writers: only when a recording starts
    from umvd_live.engine.checkpoint import SavedWeights
    from umvd_live.recording.session import RecordingSession

log = logging.getLogger(__name__)

#: Frames of a recorded stream awaiting their outputs, at most (an engine that failed for good
#: leaves its frames awaited; the oldest are then forgotten).
MAX_AWAITED = 10_000


@runtime_checkable
class FrameSink(Protocol):
    def owes(self, stream: str) -> bool:
        """True when this sink needs every denoised frame of ``stream`` (no preview skipping)."""
        ...

    def on_stream_started(self, event: StreamStarted) -> None:
        """A stream got a new denoiser (first frame, shape/dtype change, reset)."""
        ...

    def on_raw(self, arrival: Arrival) -> None:
        """Every valid input frame, as received, before its denoising. ``arrival.frame.pixels``
        is a read-only view: copy it if it must outlive the call."""
        ...

    def on_denoised(self, output: DenoisedOutput) -> None:
        """Every engine output, in ``seq`` order per stream; ``output.image`` is None for a
        preview-skipped frame (never for a stream this sink owes)."""
        ...

    def close(self) -> None:
        """Called once at shutdown, after the last outputs were flushed."""
        ...


class PublisherSink:
    """The viewers' output socket as a sink. The frame loop is the socket's only user."""

    def __init__(self, socket: zmq.Socket):
        self.socket = socket

    def owes(self, stream: str) -> bool:
        return False

    def on_stream_started(self, event: StreamStarted) -> None:
        pass

    def on_raw(self, arrival: Arrival) -> None:
        """The message as received, re-topiced ``<stream>/raw``: no re-encoding, no copy."""
        topic, header, pixels = arrival.message
        self.socket.send_multipart([bytes(topic) + RAW_SUFFIX.encode(), header, pixels],
                                   flags=zmq.NOBLOCK, copy=False)

    def on_denoised(self, output: DenoisedOutput) -> None:
        if output.image is None:
            return  # skipped by the preview: nothing to show
        parts = encode_denoised(output.stream, output.header, output.image, state=output.state,
                                latency_ms=output.latency_ms, model_step=output.model_step,
                                amplitude_gain=output.amplitude_gain, jitter_shift_px=output.jitter_shift_px)
        self.socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)

    def close(self) -> None:
        pass  # the transport closes the socket, after its linger


class WeightsHashes:
    """The weights hash each stream's files of one recording name (`recording.ometiff.Provenance`'s
    ``weights_sha256_future``), made off the frame loop: hashing every tensor of a large network
    would stall it. A hash is begun for each of a stream's engines (`begin`: at the first frame the
    recording takes of it, again after `RecordingSink.on_stream_started`) and owed until a denoised
    frame of that engine is recorded (`take`): then the loop copies the weights of the engine that
    made the frame (`streams.EngineWeights`: also once that engine has closed, for the outputs it
    flushed at a shape change or at the stream's end) and ``hash_later`` hashes the copy elsewhere
    (the daemon's state worker). So a file names the weights its first denoised frames came from,
    also when its first frame, recorded raw, came before the network existed. One still owed when
    the next engine's is begun, or at the stop, is None: no denoised frame of it was recorded.
    Frame loop only, but for the futures, which the hashing thread completes."""

    def __init__(self, hash_later: Callable[[SavedWeights], Future[str]]):
        self._hash_later = hash_later
        self._owed: dict[str, Future[str | None]] = {}  # by stream: not copied yet

    def begin(self, stream: str) -> Future[str | None]:
        """The hash of the weights of ``stream``'s current engine, for the files opened from now
        on (at the first frame the recording takes of it, and of each new engine)."""
        before = self._owed.pop(stream, None)
        if before is not None:  # the last engine is gone without a recorded denoised frame
            before.set_result(None)
        future: Future[str | None] = Future()
        self._owed[stream] = future
        return future

    def take(self, stream: str, weights: EngineWeights | None) -> None:
        """A denoised frame of ``stream`` was recorded, made with ``weights``: copy them if the
        hash is still owed."""
        future = self._owed.get(stream)
        if future is None or weights is None:
            return
        try:
            copy = weights.copy()
            if copy is None:  # (no network: none made this frame)
                return
            job = self._hash_later(copy)
        except Exception as exc:  # the files say why they name no hash; the recording goes on
            log.exception("recording %s: cannot hash the weights", stream)
            del self._owed[stream]
            future.set_exception(exc)
            return
        del self._owed[stream]
        job.add_done_callback(lambda done: _relay(done, future))

    def settle(self) -> None:
        """No more denoised frames will be recorded: the hashes still owed are None."""
        for future in self._owed.values():
            future.set_result(None)
        self._owed.clear()


def _relay(done: Future[str], future: Future[str | None]) -> None:
    """``done``'s outcome into ``future`` (on the thread that completed ``done``)."""
    if done.cancelled():
        future.cancel()
    elif (exc := done.exception()) is not None:
        future.set_exception(exc)
    else:
        future.set_result(done.result())


class RecordingSink:
    """Plugs a `recording.session.RecordingSession` into the daemon as a FrameSink.

    A recording holds the frames received between its start and its stop, raw and denoised
    alike: an output whose input frame came before the start is not recorded, and a stop waits
    for the outputs still owed for the frames received before it, which come window // 2 frames
    later (`stop`, `give_up`). The session does its own queuing, spilling and writing; this
    adapter only chooses and translates calls. Receipt times are monotonic in the daemon and
    wall-clock (Unix seconds) in the recording.
    """

    def __init__(self, session: RecordingSession, hashes: WeightsHashes | None = None):
        self.session = session
        #: The weights hashes the session's provenance names (the daemon's `_provenance` begins them).
        self.hashes = hashes
        #: Per stream, the ``seq`` of the frames received while recording whose outputs have not
        #: come yet, in order: a stream's outputs come in the order of its input frames.
        self._awaited: dict[str, deque[int]] = {}
        self._stopping = False

    @property
    def finishing(self) -> dict[str, int]:
        """After `stop`: the streams whose outputs are still owed, with how many."""
        return {s: len(q) for s, q in self._awaited.items() if q} if self._stopping else {}

    def owes(self, stream: str) -> bool:
        if self._stopping:
            return bool(self._awaited.get(stream))
        return self.session.records(stream)

    def on_stream_started(self, event: StreamStarted) -> None:
        """A new engine, after the outputs the old one flushed: the stream's next files (the
        session starts a new part when the frame shape changes) name its weights, not the old."""
        self.session.renew_provenance(event.stream)

    def on_raw(self, arrival: Arrival) -> None:
        frame = arrival.frame
        if self._stopping or not self.session.records(frame.stream):
            return  # stopped: the frames after the stop are not recorded
        awaited = self._awaited.setdefault(frame.stream, deque(maxlen=MAX_AWAITED))
        awaited.append(frame.header.seq)
        self.session.submit_raw(frame.stream, frame.header, frame.pixels, t_received=_wall(arrival.received))

    def on_denoised(self, output: DenoisedOutput) -> None:
        awaited = self._awaited.get(output.stream)
        if not awaited or output.header.seq not in awaited:
            return  # its input frame came before the start (or was not taken: stopped, not recorded)
        # Those before it in the queue will never come (an engine failure lost them: counted on
        # the stream's engine_error).
        for _ in range(awaited.index(output.header.seq) + 1):
            awaited.popleft()
        if output.image is None and not self.owes(output.stream):
            return  # a preview skip on a stream this recording does not take
        taken = self.session.submit_denoised(output.stream, output.header, output.image, state=output.state,
                                             model_step=output.model_step, t_received=_wall(output.received),
                                             amplitude_gain=output.amplitude_gain,
                                             jitter_shift_px=output.jitter_shift_px)
        if taken and self.hashes is not None:
            self.hashes.take(output.stream, output.weights)  # the engine's first recorded output: its weights
        self._finish_if_done()

    def stop(self) -> None:
        """``record_stop``: take no more input frames; the session stops once the outputs of the
        frames already taken are recorded (or `give_up` says they will not come)."""
        self._stopping = True
        self._finish_if_done()

    def give_up(self, streams: Iterable[str], why: str) -> None:
        """The outputs still owed for ``streams`` will not come (the stream went idle, or is gone):
        stop waiting for them, and say which frames the denoised files lack."""
        for stream in streams:
            awaited = self._awaited.get(stream)
            if self._stopping and awaited:
                log.warning("recording %s: %d frames (seq %d-%d) were recorded raw only (%s)", stream,
                            len(awaited), awaited[0], awaited[-1], why)
                awaited.clear()
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        if self._stopping and not any(self._awaited.values()) and not self.session.finished:
            self._settle()
            self.session.stop(wait=False)

    def close(self) -> None:
        """Stop accepting frames and wait until everything queued is on disk."""
        self._settle()
        self.session.stop(wait=True)

    def _settle(self) -> None:
        """No more denoised frames: a file still waiting for a hash (raw frames only) waits no longer."""
        if self.hashes is not None:
            self.hashes.settle()


def _wall(received: float) -> float:
    return time.time() - (monotonic() - received)
