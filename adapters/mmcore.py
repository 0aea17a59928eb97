"""pymmcore-plus frame source: publish what an in-process Micro-Manager core acquires.

Two taps, both usable from a user's own acquisition script:

* `MMCoreSource` connects to ``core.mda.events.frameReady`` (psygnal) and publishes every frame of
  every MDA the core runs. The signal fires on the MDA thread, so the handler only offers the frame
  to a bounded `FrameHandoff`: a slow network never slows the acquisition, it costs counted drops.
* `LiveTap` follows live mode (``startContinuousSequenceAcquisition``), which has no per-frame
  signal: it polls ``getLastImageAndMD`` — a peek that leaves the core's buffer to its owner (a GUI
  popping frames, or nobody) — and publishes each new ``ImageNumber`` once.

``seq`` is the acquisition's own frame number (MDA: frames since `attach`; live: ``ImageNumber``),
so frames lost anywhere on the way appear as gaps at the daemon. ``t`` is in seconds since the
acquisition started (MDA ``runner_time_ms``; live ``ElapsedTime-ms``). ``meta`` carries the
acquisition's metadata under pymmcore-plus's names (docs/protocol.md): ``pixel_size_um``,
``exposure_ms``, ``camera_device`` from `FrameMetaV1`, ``acquisition_datetime`` (SummaryMetaV1
``datetime``) and ``interval_ms`` (the sequence's time plan) from ``sequenceStarted``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from umvd_live.adapters.handoff import FrameHandoff, HandoffStats
from umvd_live.adapters.publisher import FramePublisher
from umvd_live.wire.acqmeta import (
    ACQUISITION_DATETIME,
    CAMERA_DEVICE,
    EXPOSURE_MS,
    INTERVAL_MS,
    PIXEL_SIZE_UM,
    AcquisitionMeta,
    iso_datetime,
    positive,
)
from umvd_live.wire.axes import ChannelParts, StreamAxes, StreamNumbering, split_index

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus
    from useq import MDAEvent, MDASequence

log = logging.getLogger(__name__)


def _plain_index(index: Any) -> dict[str, int]:
    # useq axis keys are str-enums; msgpack wants plain str keys.
    return {str(getattr(k, "value", k)): int(v) for k, v in dict(index).items()}


def event_axes(group: str, event: MDAEvent, parts: ChannelParts | None = None) -> StreamAxes:
    """The stream of an MDA event (`umvd_live.wire.axes`): its non-time indices, its channel
    preset's name and its position's name. ``parts``: the MDA's, which tell apart channels of one
    preset (one preset at two exposures is two channels). The channel is the event's own (preset,
    ``c``): an MDA run from a list of events has no channel list, and a position's sub-sequence
    numbers its own channels."""
    _, index = split_index(_plain_index(event.index))
    channel = event.channel.config if event.channel is not None else None
    c = index.get("c")
    return StreamAxes(group, index, channel=channel, position=event.pos_name or None,
                      channel_part=parts.part(channel, c) if parts is not None and c is not None else None)


class MMCoreSource:
    """Publishes every MDA frame of ``core``, one stream per (position, grid, channel, z) of the
    MDA (`umvd_live.wire.axes`), each stream numbered from 0. When an MDA finishes (or is
    cancelled) each of its streams is ended, so the daemon hands out their last outputs at once.
    Call `attach`; `detach` flushes and returns counts. ``group``: the streams' base name
    (default: the publisher's stream)."""

    def __init__(self, core: CMMCorePlus, publisher: FramePublisher, *, queue_size: int = 256,
                 group: str | None = None):
        self.core = core
        self.publisher = publisher
        self.group = group or publisher.stream
        self.handoff = FrameHandoff(publisher, maxsize=queue_size)
        self.numbering = StreamNumbering()
        self.frames_seen = 0
        self.errors = 0  # frames we could not publish (the first is logged)
        self._streams_seen: dict[str, None] = {}  # an ordered set
        self._axes: dict[tuple, StreamAxes] = {}
        self._sequence_meta: dict[str, Any] = {}  # of the MDA running now (`_on_sequence_started`)
        self._channel_parts = ChannelParts()  # its channels' parts of the stream names
        self._attached = False

    def attach(self) -> MMCoreSource:
        if not self._attached:
            self.handoff.start()
            self.core.mda.events.sequenceStarted.connect(self._on_sequence_started)
            self.core.mda.events.frameReady.connect(self._on_frame_ready)
            self.core.mda.events.sequenceFinished.connect(self._on_sequence_finished)
            self._attached = True
        return self

    def _on_sequence_started(self, sequence: MDASequence, summary: Any) -> None:
        """The acquisition's start (SummaryMetaV1 ``datetime``) and its nominal interval."""
        meta: dict[str, Any] = {}
        start = iso_datetime(summary.get("datetime")) if isinstance(summary, dict) else None
        if start is not None:
            meta[ACQUISITION_DATETIME] = start
        interval = getattr(getattr(sequence, "time_plan", None), "interval", None)
        if interval is not None and interval.total_seconds() > 0:
            meta[INTERVAL_MS] = interval.total_seconds() * 1e3
        self._sequence_meta = meta
        # The sequence's own channels first, so that their names do not depend on which position
        # comes first; other channels (a list of events, a position's sub-sequence) as they appear.
        self._channel_parts = ChannelParts()
        for c, channel in enumerate(getattr(sequence, "channels", None) or ()):
            self._channel_parts.part(getattr(channel, "config", None), c)
        self._axes.clear()  # this MDA's channels name its streams

    def _stream_axes(self, event: MDAEvent) -> StreamAxes:
        key = (tuple((k, v) for k, v in event.index.items() if k != "t"), event.channel, event.pos_name)
        axes = self._axes.get(key)
        if axes is None:  # once per (p, g, c, z): the MDA thread has no time to waste
            axes = self._axes[key] = event_axes(self.group, event, self._channel_parts)
            self._streams_seen[axes.name] = None
            if len(self._axes) > 4096:
                self._axes.clear()
        return axes

    @property
    def streams_seen(self) -> list[str]:
        """Every stream this source has published to, in the order of their first frame."""
        return list(self._streams_seen)

    def _on_frame_ready(self, image: np.ndarray, event: MDAEvent, meta: dict[str, Any]) -> None:
        # Runs on the MDA thread: no I/O here, only a non-blocking queue put. Never raises: the
        # runner would log psygnal's error with a traceback for every such frame and the summary
        # could not count it; a frame we cannot publish is counted in `errors`, the first logged.
        self.frames_seen += 1
        try:
            axes = self._stream_axes(event)
            stream = axes.name
            runner_ms = meta.get("runner_time_ms") if isinstance(meta, dict) else None
            t_index = event.index.get("t")
            info = {"source": "pymmcore-plus", **self._sequence_meta, **axes.meta(t_index)}
            if isinstance(meta, dict):
                info |= frame_meta(meta)
            self.handoff.offer(
                image,
                t=float(runner_ms) / 1000 if runner_ms is not None else None,
                meta=info,
                seq=self.numbering.next(stream),
                stream=stream,
            )
        except Exception:
            self.errors += 1
            if self.errors == 1:
                log.exception("could not publish a frame; the acquisition goes on")

    def _on_sequence_finished(self, *_: Any) -> None:
        self._end_streams()
        self._sequence_meta = {}

    def _end_streams(self) -> None:
        streams = self.numbering.streams
        for stream in streams:
            self.handoff.end(stream)
        self.numbering.forget(streams)
        self._axes.clear()

    def detach(self, timeout_s: float = 10.0) -> HandoffStats:
        """Disconnect from the core, end the streams still open, send what is still queued, and
        return the counts."""
        if self._attached:
            self.core.mda.events.sequenceStarted.disconnect(self._on_sequence_started)
            self.core.mda.events.frameReady.disconnect(self._on_frame_ready)
            self.core.mda.events.sequenceFinished.disconnect(self._on_sequence_finished)
            self._attached = False
            self._end_streams()
        return self.handoff.close(timeout_s)

    def __enter__(self) -> MMCoreSource:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()


class ImageNumberTracker:
    """Turns the core's ``ImageNumber`` tags, seen by polling, into new-image decisions and ``seq``.

    An image is its (``ImageNumber``, time stamp): the same seen again is not new; a jump counts
    the images that went by between polls; a number not greater than the last one's starts a new
    sequence (``restarts``), whose ``seq`` is its ``ImageNumber`` (images missed before the first
    one seen count as skipped). The first image of a sequence already running when the tap started
    (`prime` with the image then in the buffer) starts ``seq`` at 0; one that started after the tap
    found the buffer empty (`prime` with None) is numbered from its first image, seen or not.
    """

    def __init__(self) -> None:
        self.last: int | None = None
        self.base = 0
        self.skipped = 0
        self.restarts = 0  # new sequences seen after the first image (live mode stopped and started)
        self._last_image: tuple[int, Any] | None = None
        self._primed = False

    def prime(self, number: int | None, stamp: Any = None) -> None:
        """The image in the buffer when the tap starts (an earlier sequence's last one, or a running
        one's): not new. The next image starts ``seq`` from 0, or from its own number when it
        starts a new sequence (a number not greater than this one's; the same number with another
        ``stamp``). None, an empty buffer: the next sequence starts after the tap, and image n is
        ``seq`` n even when the tap's first poll comes late (its first images count as skipped)."""
        if number is None:
            self.last, self._last_image, self._primed = -1, None, False  # as if image -1 were seen
        else:
            self.last, self._last_image, self._primed = number, (number, stamp), True

    def seq_for(self, number: int, stamp: Any = None) -> int | None:
        """``seq`` for a newly seen image, or None when it is the image seen last time. ``stamp``
        (its ``TimeReceivedByCore``) tells a new sequence's image from an old one of that number."""
        if (number, stamp) == self._last_image:
            return None
        if self.last is not None and number <= self.last:  # a new sequence, numbered from 0
            self.base, self._primed = 0, False
            self.skipped += number
            self.restarts += 1
        elif self.last is None or self._primed:
            self.base, self._primed = number, False
        elif number > self.last + 1:
            self.skipped += number - self.last - 1
        self.last, self._last_image = number, (number, stamp)
        return number - self.base


def frame_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The protocol ``meta`` keys of a pymmcore-plus `FrameMetaV1`, under its own names; a pixel
    size of 0 (no pixel-size configuration) is left out."""
    out: dict[str, Any] = {}
    for key in (PIXEL_SIZE_UM, EXPOSURE_MS):
        value = positive(meta.get(key))
        if value is not None:
            out[key] = value
    if meta.get(CAMERA_DEVICE):
        out[CAMERA_DEVICE] = str(meta[CAMERA_DEVICE])
    return out


def tags_meta(tags: dict[str, Any]) -> dict[str, Any]:
    """The protocol ``meta`` keys of a Micro-Manager image's tags (the Java GUI's and pycromanager's
    spellings: `AcquisitionMeta.from_micromanager`), ``Exposure`` and ``Camera`` too."""
    if not isinstance(tags, dict):
        return {}
    out = AcquisitionMeta.from_micromanager(tags).to_meta()
    exposure = positive(tags.get("Exposure"))
    if exposure is not None:
        out[EXPOSURE_MS] = exposure
    if tags.get("Camera"):
        out[CAMERA_DEVICE] = str(tags["Camera"])
    return out


def elapsed_seconds(tags: dict[str, Any]) -> float | None:
    """Micro-Manager's ``ElapsedTime-ms`` tag (a string or number) in seconds, if present."""
    value = tags.get("ElapsedTime-ms")
    try:
        return float(value) / 1000 if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def log_failure_once(seen: set[str], what: str, exc: Exception) -> None:
    """Log ``exc`` with its traceback the first time its kind (type and message) is seen: a tap
    polls every few milliseconds, and one lasting fault must not flood the log."""
    kind = f"{type(exc).__name__}: {exc}"
    if kind not in seen:
        seen.add(kind)
        log.error("%s (%s); polling on (logged once)", what, kind, exc_info=exc)


@dataclass(frozen=True)
class LiveTapStats:
    published: int  # new images handed to the publisher
    skipped: int  # ImageNumbers that went by between two polls (never seen here)
    publisher_dropped: int


class LiveTap:
    """Follows live mode by polling the newest image; never pops the core's circular buffer.

    Live mode stopped and started again (a new sequence of ``ImageNumber``) is a new stream: the
    old one is ended first. Exposure and pixel size are read from the core at each start and when
    the core says they changed (``events.exposureChanged``, ``pixelSizeChanged``)."""

    def __init__(self, core: CMMCorePlus, publisher: FramePublisher, *, poll_interval_s: float = 0.001,
                 limit: int | None = None):
        self.core = core
        self.publisher = publisher
        self.poll_interval_s = poll_interval_s
        self.limit = limit  # images to publish at most (None: until stopped)
        self.published = 0
        self._ended_after = 0  # images published when the stream was last ended
        self.errors = 0
        self._failures: set[str] = set()  # kinds of failed polls logged
        self.numbers = ImageNumberTracker()
        self._live_meta: dict[str, Any] = {}  # read from the core (`_read_live_meta`)
        self._meta_changed = threading.Event()  # set by the core's signals, on whatever thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read_live_meta(self, started: bool) -> None:
        """Live mode's tags carry no pixel size or exposure: read them from the core. ``started``:
        a sequence starts, and now is its acquisition start."""
        self._meta_changed.clear()
        meta = frame_meta({PIXEL_SIZE_UM: self.core.getPixelSizeUm(), EXPOSURE_MS: self.core.getExposure()})
        start = datetime.now().astimezone().isoformat(timespec="milliseconds") if started else \
            self._live_meta.get(ACQUISITION_DATETIME)
        self._live_meta = meta | {ACQUISITION_DATETIME: start}

    def _on_meta_changed(self, *_: Any) -> None:
        # Emitted on the thread that changed the setting (the user's, a GUI's): only a flag here.
        self._meta_changed.set()

    def _newest(self) -> tuple[np.ndarray, dict[str, Any], int] | None:
        """The buffer's newest image, its tags and its ``ImageNumber``; None when there is none."""
        try:
            image, md = self.core.getLastImageAndMD()
        except (IndexError, RuntimeError):  # buffer empty: live mode just started
            return None
        tags = dict(md)
        try:
            return image, tags, int(tags["ImageNumber"])
        except (KeyError, ValueError):
            return None

    def poll_once(self) -> bool:
        """Publish the newest image if it is one not seen yet. True if one was published.

        Not gated on ``isSequenceRunning``: a UniMMCore (pymmcore-plus 0.18.1) can report False
        for a whole live run under CPU load. An image left from an earlier sequence is never new
        (`ImageNumberTracker.prime` at `start`, and the same number is not published twice)."""
        if self.limit is not None and self.published >= self.limit:
            return False
        newest = self._newest()
        if newest is None:
            return False
        image, tags, number = newest
        restarts = self.numbers.restarts
        seq = self.numbers.seq_for(number, tags.get("TimeReceivedByCore"))
        if seq is None:
            return False
        if self.numbers.restarts != restarts:  # live mode was started again: a new stream
            self._end_stream()
            self._read_live_meta(started=True)
        elif self._meta_changed.is_set():
            self._read_live_meta(started=False)
        meta = {"source": "pymmcore-plus-live", "image_number": number, **self._live_meta}
        if tags.get("Camera"):
            meta[CAMERA_DEVICE] = str(tags["Camera"])
        self.publisher.publish(image, t=elapsed_seconds(tags), meta=meta, seq=seq)
        self.published += 1
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                published = self.poll_once()
            except Exception as exc:  # a tap must never die silently while the microscope runs on
                self.errors += 1
                log_failure_once(self._failures, "live tap: polling the core failed", exc)
                published = False
            if not published:
                self._stop.wait(self.poll_interval_s)

    def start(self) -> LiveTap:
        if self._thread is None:
            newest = self._newest()
            if newest is None:
                self.numbers.prime(None)  # empty: the next sequence starts after us
            else:
                self.numbers.prime(newest[2], newest[1].get("TimeReceivedByCore"))
            self.core.events.exposureChanged.connect(self._on_meta_changed)
            self.core.events.pixelSizeChanged.connect(self._on_meta_changed)
            self._read_live_meta(started=True)
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="umvd-live-tap", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> LiveTapStats:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
            self.core.events.exposureChanged.disconnect(self._on_meta_changed)
            self.core.events.pixelSizeChanged.disconnect(self._on_meta_changed)
        self._end_stream()  # we stop following: the daemon hands out the last outputs now
        return self.stats()

    def _end_stream(self) -> None:
        if self.published > self._ended_after:
            self.publisher.end()
            self._ended_after = self.published

    def stats(self) -> LiveTapStats:
        return LiveTapStats(self.published, self.numbers.skipped, self.publisher.dropped)


# --------------------------------------------------------------------------- running a core


def _config_has_cpp_devices(config: Path) -> bool:
    for line in config.read_text(errors="replace").splitlines():
        if line.strip().startswith("Device,"):
            return True
    return False


def load_core(config: str | Path, mm_path: str | None = None) -> CMMCorePlus:
    """A `UniMMCore` (C++ and ``#py`` pure-Python devices) loaded from a Micro-Manager config file."""
    from pymmcore_plus.experimental.unicore import UniMMCore

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"Micro-Manager configuration file not found: {path}")
    quiet = mm_path is None and not _config_has_cpp_devices(path)
    with _quiet_adapter_search(quiet):
        core = UniMMCore(mm_path=mm_path) if mm_path else UniMMCore()
    core.loadSystemConfiguration(str(path))
    if not core.getCameraDevice():
        raise ValueError(f"{path}: the configuration sets no camera (Property,Core,Camera,<label>)")
    return core


@contextmanager
def _quiet_adapter_search(quiet: bool) -> Iterator[None]:
    # A config of pure-Python devices needs no Micro-Manager install; pymmcore-plus still looks for
    # one and logs an ERROR when there is none, which would only alarm the user.
    logger = logging.getLogger("pymmcore-plus")
    level = logger.level
    if quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def shutter_workaround(core: CMMCorePlus) -> Iterator[None]:
    """Work around pymmcore-plus 0.18.1: an MDA that is not one hardware sequence (a timed one, or
    one that changes channel or plane) fails in ``setShutterOpen`` when no shutter is loaded.

    Auto-shutter is switched off for the run when no shutter is loaded, and restored afterwards.
    """
    needed = not core.getShutterDevice() and core.getAutoShutter()
    if needed:
        core.setAutoShutter(False)
    try:
        yield
    finally:
        if needed:
            core.setAutoShutter(True)


def time_lapse(frames: int, interval_ms: float = 0.0) -> MDASequence:
    """A ``frames``-point time-lapse of the current channel and position."""
    from useq import MDASequence, TIntervalLoops

    return MDASequence(time_plan=TIntervalLoops(interval=timedelta(milliseconds=interval_ms), loops=frames))


def load_sequence(path: str | Path) -> MDASequence:
    """A useq-schema MDA sequence from a YAML or JSON file (pymmcore-plus's own format)."""
    from useq import MDASequence

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MDA sequence file not found: {path}")
    try:
        return MDASequence.from_file(path)
    except Exception as exc:  # pydantic's ValidationError, YAML errors: say which file and why
        raise ValueError(f"{path}: not a valid useq-schema MDA sequence ({exc})") from None


class MDAFailed(RuntimeError):
    """An MDA ended with an error (pymmcore-plus ``FinishReason.ERRORED``: a device raised), or
    without frames its camera owed (`FrameAudit`)."""


def _index_words(index: Any) -> str:
    return " ".join(f"{k}={v}" for k, v in _plain_index(index).items()) or "the first event"


class FrameAudit:
    """Counts, event by event, the frames an MDA's camera owed and the frames it delivered.

    pymmcore-plus (0.18.1) does not fail an MDA whose camera fails: ``MDAEngine.exec_single_event``
    catches a failed ``snapImage``, logs ``Failed to snap image.`` and yields no frame; a camera
    sequence that ends early (a pure-Python camera's ``AcquisitionThread`` dies of the camera's
    error) is logged as ``Unexpected number of images returned from sequence`` and its missing
    frames are yielded as None, which reach no ``frameReady``. The runner goes on and ends with
    ``FinishReason.COMPLETED``. This follows the runner's signals, on its own thread (a counter
    each: the acquisition is not slowed; connected first, since psygnal calls no slot after one
    that raises): ``sequenceStarted`` (SummaryMetaV1 ``image_infos``: ``camera_label``),
    ``eventStarted`` (an event that acquires images owes one frame per camera channel, counted
    when it is settled, with the camera its channel preset chose; a `SequencedEvent` one per
    sub-event), ``frameReady`` (FrameMetaV1 ``camera_device``), ``sequenceCanceled`` (the event
    cut short is not missing frames) and ``sequenceFinished``. The reason is the camera's error:
    the exception of a pymmcore-plus thread that died (taken from ``threading.excepthook``; the
    one it reports is logged at debug level only, any other goes to the hook before), else the
    pymmcore-plus warning logged on the MDA thread during the event.
    An event a custom engine skips (``SkipEvent``) counts as missing too.
    """

    _MAX_REASONS = 16  # warnings kept per event, until the first failure is known

    def __init__(self, core: CMMCorePlus):
        from pymmcore_plus.core import SequencedEvent
        from useq import AcquireImage

        self.core = core
        self._sequenced = SequencedEvent
        self._image_actions = (AcquireImage, type(None))  # the actions MDAEngine.exec_event images
        self.expected = 0  # frames owed by the events settled so far
        self.missing = 0
        self.camera = ""
        self.first_missing: str | None = None  # where: the index of the first frame not acquired
        self.reason: str | None = None  # why: the camera's error, if one was seen
        self.cause: BaseException | None = None
        self._n_cameras = 1
        self._owed = 0  # images owed by the event running now, per camera channel
        self._got = 0
        self._event: Any = None
        self._mda_thread: int | None = None
        self._warnings: list[logging.LogRecord] = []  # pymmcore-plus's, of the event running now
        self._thread_errors: list[BaseException] = []  # of pymmcore-plus threads, this event
        self._handler = _RecordTo(self._on_record)
        self._previous_hook: Any = None

    # -- the runner's signals, on the MDA thread

    def _on_sequence_started(self, sequence: Any, summary: Any) -> None:
        self._mda_thread = threading.get_ident()
        self._settle()
        infos = summary.get("image_infos") if isinstance(summary, dict) else None
        info = infos[0] if infos and isinstance(infos[0], dict) else {}
        self.camera = str(info.get("camera_label") or self.camera)

    def _on_event_started(self, event: Any) -> None:
        self._settle()
        action = getattr(event, "action", None)
        frames = 0 if not isinstance(action, self._image_actions) else \
            len(event.events) if isinstance(event, self._sequenced) else 1
        self._event, self._owed, self._got = event, frames, 0
        if self._warnings:
            self._warnings = []
        if self._thread_errors:
            self._thread_errors = []

    def _on_frame_ready(self, image: Any, event: Any, meta: Any) -> None:
        self._got += 1
        if not self.camera and isinstance(meta, dict) and meta.get(CAMERA_DEVICE):
            self.camera = str(meta[CAMERA_DEVICE])

    def _on_sequence_canceled(self, *_: Any) -> None:
        self._owed = self._got = 0  # cut short on purpose

    def _on_sequence_finished(self, *_: Any) -> None:
        self._settle()

    def _settle(self) -> None:
        """Close the account of the event that ran last."""
        if self._owed:  # the event's own camera setting (a channel preset may switch the camera)
            self._n_cameras = max(1, int(self.core.getNumberOfCameraChannels()))
        owed, got, event = self._owed * self._n_cameras, self._got, self._event
        self._owed = self._got = 0
        self.expected += owed
        if got >= owed:
            return
        self.missing += owed - got
        if self.first_missing is None:
            self.camera = str(self.core.getCameraDevice() or self.camera)  # the event's camera
            events = getattr(event, "events", None)
            first = events[got // self._n_cameras] if events else event
            self.first_missing = _index_words(getattr(first, "index", {}))
            self.reason, self.cause = self._why()

    def _why(self) -> tuple[str | None, BaseException | None]:
        """The camera's error: a pymmcore-plus thread's exception (its cause: the device's own),
        else the last warning carrying an exception, else the first warning."""
        if self._thread_errors:
            error = self._thread_errors[0]
            own = error.__cause__ or error
            return f"{type(own).__name__}: {own}", error
        for record in reversed(self._warnings):
            logged = next((a for a in record.args if isinstance(a, BaseException)), None) \
                if isinstance(record.args, tuple) else None
            if logged is not None:
                return f"{type(logged).__name__}: {logged}", logged
        if self._warnings:
            return self._warnings[0].getMessage(), None
        return None, None

    # -- pymmcore-plus's warnings and its threads' errors, while attached

    def _on_record(self, record: logging.LogRecord) -> None:
        if (self.first_missing is None and record.thread == self._mda_thread
                and len(self._warnings) < self._MAX_REASONS):
            self._warnings.append(record)

    def _excepthook(self, args: Any) -> None:
        thread = args.thread
        if thread is not None and type(thread).__module__.startswith("pymmcore_plus") and \
                isinstance(args.exc_value, Exception):
            if self.first_missing is None and len(self._thread_errors) < self._MAX_REASONS:
                self._thread_errors.append(args.exc_value)  # said once, as the failure's reason
                log.debug("pymmcore-plus thread %s ended with an error", thread.name,
                          exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
                return
        self._previous_hook(args)

    def _slots(self) -> list[tuple[Any, Callable[..., None]]]:
        events = self.core.mda.events
        return [(events.sequenceStarted, self._on_sequence_started), (events.eventStarted, self._on_event_started),
                (events.frameReady, self._on_frame_ready), (events.sequenceCanceled, self._on_sequence_canceled),
                (events.sequenceFinished, self._on_sequence_finished)]

    def attach(self) -> FrameAudit:
        for signal, slot in self._slots():
            try:  # first: psygnal calls no slot after one that raises (Qt signals take no priority)
                signal.connect(slot, priority=1000)
            except TypeError:
                signal.connect(slot)
        logging.getLogger("pymmcore-plus").addHandler(self._handler)
        self._previous_hook, threading.excepthook = threading.excepthook, self._excepthook
        return self

    def detach(self) -> None:
        for signal, slot in self._slots():
            signal.disconnect(slot)
        logging.getLogger("pymmcore-plus").removeHandler(self._handler)
        if threading.excepthook == self._excepthook:  # unless someone replaced it since
            threading.excepthook = self._previous_hook

    def __enter__(self) -> FrameAudit:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def failure(self) -> MDAFailed | None:
        """`MDAFailed` saying which camera failed, why, and how many frames it did not acquire;
        None when every frame owed arrived."""
        if not self.missing:
            return None
        why = self.reason or "no image (see pymmcore-plus's log)"
        return MDAFailed(f"the MDA failed: camera {self.camera or '(unknown)'}: {why} ({self.missing} of "
                         f"{self.expected} frames not acquired, the first at {self.first_missing})")


class _RecordTo(logging.Handler):
    """Hands warnings to a callback as they are (a `FrameAudit` keeps a few; no formatting here)."""

    def __init__(self, callback: Callable[[logging.LogRecord], None]):
        super().__init__(logging.WARNING)
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        self.callback(record)


def run_mda(core: CMMCorePlus, sequence: Iterable[MDAEvent]) -> None:
    """Run an MDA (a sequence, or a list of events) on ``core`` and wait for it (Ctrl-C cancels
    it cleanly).

    Raises `MDAFailed` when the MDA ended with an error: pymmcore-plus ends the run (its
    ``sequenceFinished`` too) and re-raises the error on the MDA's own thread, where nobody would
    see it. The runner runs on a thread of ours, as ``core.run_mda`` does, to catch it there.
    Raises it too, once the MDA has run to its end, when its camera did not deliver every frame
    (a failed snap: pymmcore-plus logs it and goes on; `FrameAudit`)."""
    failures: list[Exception] = []

    def run() -> None:
        try:
            core.mda.run(sequence)
        except Exception as exc:
            failures.append(exc)

    if core.mda.is_running():
        raise ValueError("Cannot start an MDA while the previous MDA is still running.")
    with shutter_workaround(core), FrameAudit(core) as audit:
        thread = threading.Thread(target=run, name="umvd-mda")
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.2)
        except KeyboardInterrupt:
            core.mda.cancel()
            thread.join(10)
            raise
    if failures:
        raise MDAFailed(f"the MDA failed: {type(failures[0]).__name__}: {failures[0]}") from failures[0]
    failure = audit.failure()
    if failure is not None:
        raise failure from audit.cause


def run_live(core: CMMCorePlus, tap: LiveTap, frames: int | None, interval_ms: float = 0.0) -> None:
    """Start live mode, tap it until ``frames`` images were published (or Ctrl-C), stop it.
    Exactly ``frames``: the tap itself stops publishing there (`LiveTap.limit`), as this loop,
    which only looks every 10 ms, would let a fast camera outrun it."""
    tap.limit = frames
    tap.start()
    core.startContinuousSequenceAcquisition(interval_ms)
    try:
        while frames is None or tap.published < frames:
            time.sleep(0.01)
    finally:
        core.stopSequenceAcquisition()
        tap.stop()
