"""pycromanager frame source, for labs that run the Micro-Manager GUI (Java) or pycromanager scripts.

* Owner mode — `PycroManagerOwner.saved` is the ``image_saved_fn`` of an ``Acquisition`` that
  pycromanager runs: once Micro-Manager has stored an image (to disk, or to its RAM dataset), it
  reads it back from the dataset and offers it to a bounded `FrameHandoff`. The pixels never go
  back: an ``image_process_fn`` would carry every raw frame Java -> Python -> Java and sit on the
  saving path (docs/adapters.md measures both). It never raises: an exception there would abort
  the user's acquisition.
* Tap mode — `TaggedImageTap` follows the GUI's own live mode or MDA by polling
  ``Core().get_last_tagged_image()``, a peek: ``pop_next_tagged_image`` would steal the frames the
  GUI displays and saves.

`connect_core` reaches the Micro-Manager ZMQ server (port 4827) with retries and back-off, and fails
with `MicroManagerNotRunning` — a message saying what to do, not a traceback.

`start_python_backend` runs pycromanager's own (Python) acquisition engine on a pymmcore-plus
``UniMMCore``, so that the owner path also runs with pure-Python devices, without Java.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from umvd_live.adapters.handoff import FrameHandoff, HandoffStats
from umvd_live.adapters.mmcore import ImageNumberTracker, elapsed_seconds, log_failure_once, tags_meta
from umvd_live.adapters.publisher import FramePublisher
from umvd_live.wire.acqmeta import ACQUISITION_DATETIME
from umvd_live.wire.axes import ChannelParts, StreamAxes, StreamNumbering, name_part

log = logging.getLogger(__name__)

MM_DEFAULT_PORT = 4827


class MicroManagerNotRunning(RuntimeError):
    """Nothing answered on the Micro-Manager ZMQ port after every retry."""

    def __init__(self, port: int, attempts: int, cause: str = ""):
        self.port = port
        self.attempts = attempts
        where = "" if port == MM_DEFAULT_PORT else f" (this command asked for port {port}: --mm-port)"
        super().__init__(
            f"Micro-Manager did not answer on port {port} ({attempts} attempt"
            f"{'s' if attempts != 1 else ''}). Start Micro-Manager and tick Tools > Options > "
            f"'Run pycro-manager server on port {MM_DEFAULT_PORT}'{where}."
            + (f" Last error: {cause}" if cause else "")
        )


def port_answers(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port`` (Micro-Manager's server, maybe)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextmanager
def _quiet_bridge_threads() -> Iterator[None]:
    # pyjavaz's socket thread dies with an uncaught exception (printed as a traceback) when the
    # server does not reply; the caller reports the failure in words instead.
    previous = threading.excepthook

    def hook(info: threading.ExceptHookArgs) -> None:
        if info.thread is not None and info.thread.name.startswith("BridgeSocketThread"):
            log.debug("pycromanager bridge thread: %s", info.exc_value)
            return
        previous(info)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def connect_core(
    port: int = MM_DEFAULT_PORT,
    *,
    attempts: int = 5,
    first_delay_s: float = 1.0,
    max_delay_s: float = 30.0,
    timeout_ms: int = 1000,
    report: Callable[[str], None] = print,
) -> Any:
    """pycromanager's ``Core()``, retried with exponential back-off while Micro-Manager is absent.

    With a Python backend started in this process, that in-process core is returned at once.
    """
    from mmpycorex import launcher
    from pycromanager import Core

    if launcher.is_pymmcore_active():
        return Core()
    delay = first_delay_s
    cause = ""
    for attempt in range(1, attempts + 1):
        if not port_answers(port):
            cause = f"nothing listens on 127.0.0.1:{port}"
        else:
            try:
                with _quiet_bridge_threads():
                    return Core(port=port, timeout=timeout_ms)
            except Exception as exc:  # pycromanager raises a bare Exception when nobody answers
                cause = str(exc)
        if attempt < attempts:
            report(
                f"Micro-Manager is not answering on port {port} (attempt {attempt}/{attempts}); "
                f"retrying in {delay:.1f} s"
            )
            time.sleep(delay)
            delay = min(delay * 2, max_delay_s)
    raise MicroManagerNotRunning(port, attempts, cause)


#: pycromanager's axis names -> useq's keys (`umvd_live.wire.axes`); other names stay as they are.
_AXIS_KEYS = {"time": "t", "position": "p", "channel": "c", "z": "z"}


class AxesReader:
    """pycromanager's ``Axes`` (``{"time": 3, "channel": "DAPI", "z": 2}``) -> the frame's stream.

    pycromanager names a channel (and may name a position) instead of numbering it: a name gets the
    next index the first time it is seen, so ``c`` counts channels in acquisition order."""

    def __init__(self, group: str):
        self.group = group
        self._numbers: dict[str, dict[str, int]] = {}
        self._channel_parts = ChannelParts()  # of the channel names seen, in their order

    def read(self, axes: Any) -> tuple[StreamAxes, int | None]:
        """(the frame's stream, its time index or None)."""
        index: dict[str, int] = {}
        names: dict[str, str] = {}
        t = None
        for key, value in (axes.items() if isinstance(axes, dict) else ()):
            axis = _AXIS_KEYS.get(str(key)) or name_part(str(key), 8)
            if not axis:
                continue
            if isinstance(value, str):
                numbers = self._numbers.setdefault(axis, {})
                names[axis] = value
                value = numbers.setdefault(value, len(numbers))
            elif not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                continue
            if axis == "t":
                t = int(value)
            else:
                index[axis] = int(value)
        c, part = index.get("c"), None
        if c is not None and "c" in names:  # a named channel: numbered in order, so is its part
            part = self._channel_parts.part(names["c"], c)
        return StreamAxes(self.group, index, channel=names.get("c"), position=names.get("p"), channel_part=part), t


def axes_of_tags(tags: dict[str, Any]) -> dict[str, Any] | None:
    """The acquisition axes a tagged image carries: pycromanager's ``Axes`` (a map, or JSON text
    over Java), else Micro-Manager's ``ChannelIndex``/``SliceIndex``/``PositionIndex`` tags with the
    ``Channel`` name. None for an image without any (live mode)."""
    axes = tags.get("Axes")
    if isinstance(axes, str):
        try:
            axes = json.loads(axes)
        except ValueError:
            axes = None
    if isinstance(axes, dict):
        return axes
    out: dict[str, Any] = {}
    for tag, key in (("PositionIndex", "position"), ("SliceIndex", "z"), ("FrameIndex", "time")):
        try:
            out[key] = int(tags[tag])
        except (KeyError, TypeError, ValueError):
            pass
    if tags.get("Channel"):
        out["channel"] = str(tags["Channel"])
    return out if set(out) - {"time"} else None


class PycroManagerOwner:
    """Owner mode: publishes each image of an acquisition that pycromanager runs, one stream per
    (position, channel, z) of its ``Axes`` (`umvd_live.wire.axes`), off the raw-data path.

    `saved` is the acquisition's ``image_saved_fn``: pycromanager calls it once Micro-Manager has
    stored the image (NDTiff on disk with a directory, its RAM dataset without), and it reads the
    pixels back from that dataset. Nothing is handed back: the raw data goes from the camera to
    storage as it would without us, and a slow or failing publisher cannot delay or alter it.
    `close` ends the streams, so the daemon hands out their last outputs at once. ``group``: the
    streams' base name (default: the publisher's stream)."""

    def __init__(self, publisher: FramePublisher, *, queue_size: int = 256, group: str | None = None):
        self.handoff = FrameHandoff(publisher, maxsize=queue_size)
        self.axes = AxesReader(group or publisher.stream)
        self.numbering = StreamNumbering()
        self.frames_seen = 0  # every image Micro-Manager stored and told us of
        self.errors = 0  # of those, the ones we could not read or publish (the first is logged)
        self._t0: float | None = None
        self._started: dict[str, str] = {}

    def start(self) -> PycroManagerOwner:
        self.handoff.start()
        return self

    def saved(self, axes: dict[str, Any], dataset: Any) -> None:
        """``image_saved_fn(axes, dataset)``: read the stored image and its tags, publish them."""
        try:
            image, metadata = read_saved_image(dataset, axes)
        except Exception:  # never let our side abort the user's acquisition
            self.frames_seen += 1  # acquired, though not by us: counted in `errors`
            self._failed()
            return
        metadata.setdefault("Axes", axes)
        self.publish(image, metadata)

    def publish(self, image: np.ndarray, metadata: dict[str, Any]) -> None:
        """Offer one image (with its pycromanager tags) to the hand-off; never raises."""
        try:
            now = time.monotonic()
            if self._t0 is None:
                self._t0 = now
            self.frames_seen += 1
            axes, t_index = self.axes.read(metadata.get("Axes"))
            stream = axes.name
            if not self._started:  # the acquisition's start, unless its tags say (docs/protocol.md)
                self._started[ACQUISITION_DATETIME] = datetime.now().astimezone().isoformat(timespec="milliseconds")
            meta = {"source": "pycromanager", **self._started, **tags_meta(metadata), **axes.meta(t_index)}
            # pycromanager's Python backend stamps sequenced frames ElapsedTime-ms 0: keep our clock.
            self.handoff.offer(image, t=now - self._t0, meta=meta, seq=self.numbering.next(stream), stream=stream)
        except Exception:  # never let our side abort the user's acquisition
            self._failed()

    def _failed(self) -> None:
        self.errors += 1
        if self.errors == 1:
            log.exception("could not read or publish an image; the acquisition goes on")

    @property
    def streams_seen(self) -> list[str]:
        return self.numbering.streams

    def close(self, timeout_s: float = 10.0) -> HandoffStats:
        """End every stream, send what is still queued, and return the counts."""
        for stream in self.numbering.streams:
            self.handoff.end(stream)
        return self.handoff.close(timeout_s)


#: NDTiff pixel types (ndstorage's ``NDTiffIndexEntry.pixel_type``) -> dtype
_NDTIFF_DTYPES = {0: np.uint8, 1: np.uint16, 3: np.uint16, 4: np.uint16, 5: np.uint16, 6: np.uint16}


def read_saved_image(dataset: Any, axes: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The pixels and tags of the image stored at ``axes``.

    An NDTiff dataset on disk is read through a new unbuffered handle at the offsets of its index
    entry (the NDTiff format's own fields): ndstorage's readers keep a read-ahead buffer, and the
    next image, written while we read this one, would be served from it stale (seen here as
    undecodable metadata with pycromanager's Python backend). A RAM dataset is read as is."""
    entry = getattr(dataset, "index", {}).get(frozenset(axes.items())) if isinstance(
        getattr(dataset, "index", None), dict) else None
    if entry is None or entry.pixel_type not in _NDTIFF_DTYPES:
        return np.asarray(dataset.read_image(**axes)), dict(dataset.read_metadata(**axes) or {})
    dtype = np.dtype(_NDTIFF_DTYPES[entry.pixel_type])
    shape = (entry.image_height, entry.image_width)
    with open(os.path.join(dataset.path, entry.filename), "rb", buffering=0) as fh:
        fh.seek(entry.pix_offset)
        pixels = fh.read(shape[0] * shape[1] * dtype.itemsize)
        fh.seek(entry.metadata_offset)
        tags = fh.read(entry.metadata_length)
    return np.frombuffer(pixels, dtype=dtype).reshape(shape), json.loads(tags)


def run_owner_acquisition(
    owner: PycroManagerOwner,
    frames: int | list[dict[str, Any]],
    interval_ms: float = 0.0,
    *,
    directory: str | Path | None = None,
    name: str = "umvd_live",
    port: int = MM_DEFAULT_PORT,
) -> Any:
    """Run an acquisition through pycromanager with ``owner`` told of each saved image: a ``frames``-point
    time-lapse, or pycromanager's own event list (``multi_d_acquisition_events(...)``: channels,
    z, positions).

    With ``directory`` the raw data is saved there (NDTiff) by pycromanager itself. Returns the
    dataset pycromanager wrote or holds. Ctrl-C aborts the acquisition (its pending events are
    dropped) and waits for what is under way to finish, then raises KeyboardInterrupt:
    ``Acquisition.__exit__`` would acquire every event first.
    """
    from pycromanager import Acquisition, multi_d_acquisition_events

    if isinstance(frames, int):
        events = multi_d_acquisition_events(num_time_points=frames, time_interval_s=interval_ms / 1000)
    else:
        events = frames
    owner.start()
    acq = Acquisition(
        directory=str(directory) if directory is not None else None,
        name=name,
        image_saved_fn=owner.saved,
        port=port,
        show_display=False,
    )
    acq.acquire(events)
    acq.mark_finished()
    # pycromanager waits uninterruptibly (its threads are joined in a `finally`): wait on a thread
    # of ours, so that Ctrl-C reaches this one and can abort the acquisition.
    failures: list[Exception] = []

    def await_completion() -> None:
        try:
            acq.await_completion()
        except Exception as exc:  # pycromanager's own (hook, hardware) errors: raised below
            failures.append(exc)

    waiter = threading.Thread(target=await_completion, name="umvd-acq-wait", daemon=True)
    waiter.start()
    try:
        while waiter.is_alive():
            waiter.join(0.2)
    except KeyboardInterrupt:
        acq.abort()
        waiter.join()
        raise
    if failures:
        raise failures[0]
    return acq.get_dataset()


@dataclass(frozen=True)
class TapStats:
    published: int
    skipped: int  # images that went by between two polls
    errors: int  # failed polls (Micro-Manager busy or gone)
    publisher_dropped: int
    rejected: int  # new images that could not be published (a pixel type protocol v1 does not carry...); see the log
    undelivered: int  # published while no daemon was subscribed


class TaggedImageTap:
    """Publishes each new image of the GUI's live mode or MDA, seen by polling the last image.

    Images whose tags carry acquisition axes (`axes_of_tags`: the GUI's MDA) go to a stream per
    (position, channel, z); live mode's images, without such tags, to the publisher's stream, which
    is ended when live mode starts again. An image that cannot be published is counted
    (``rejected``) and logged once per kind: the tap goes on while the microscope does."""

    def __init__(self, core: Any, publisher: FramePublisher, *, poll_interval_s: float = 0.01,
                 group: str | None = None):
        self.core = core
        self.publisher = publisher
        self.poll_interval_s = poll_interval_s
        self.numbers = ImageNumberTracker()
        self.axes = AxesReader(group or publisher.stream)
        self.numbering = StreamNumbering()  # streams split by the images' axes tags
        self._live_images = 0  # published to the publisher's own stream since it was last ended
        self.published = 0
        self.errors = 0
        self.rejected = 0
        self._failures: set[str] = set()  # kinds of rejected images logged
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _newest(self) -> tuple[Any, dict[str, Any], int] | None:
        """The buffer's newest tagged image, its tags and its ``ImageNumber``; None when none."""
        try:
            tagged = self.core.get_last_tagged_image()
        except Exception:  # empty buffer, or Micro-Manager busy: try again next poll
            self.errors += 1
            return None
        tags = dict(tagged.tags or {})
        try:
            return tagged, tags, int(tags["ImageNumber"])
        except (KeyError, TypeError, ValueError):
            return None

    def poll_once(self) -> bool:
        """Publish the newest image if it is one not seen yet; not gated on the core's
        ``is_sequence_running``, for the reason `mmcore.LiveTap.poll_once` gives."""
        newest = self._newest()
        if newest is None:
            return False
        tagged, tags, number = newest
        restarts = self.numbers.restarts
        seq = self.numbers.seq_for(number, tags.get("TimeReceivedByCore"))
        if seq is None:
            return False
        if self.numbers.restarts != restarts:
            self._end_live_stream()  # live mode started again: a new stream
        image = to_image(tagged.pix, tags)
        meta: dict[str, Any] = {"source": "pycromanager-tap", "image_number": number, **tags_meta(tags)}
        stream = None
        acquisition_axes = axes_of_tags(tags)
        if acquisition_axes is not None:  # the GUI's MDA: a stream per (position, channel, z)
            axes, t_index = self.axes.read(acquisition_axes)
            stream = axes.name
            meta |= axes.meta(t_index)
            seq = self.numbering.next(stream)  # images that went by between polls are in `skipped`
        else:
            self._live_images += 1
        self.publisher.publish(image, t=elapsed_seconds(tags), meta=meta, seq=seq, stream=stream)
        self.published += 1
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                published = self.poll_once()
            except Exception as exc:  # one image we cannot publish must not end the tap
                self.rejected += 1
                log_failure_once(self._failures, "tap: an image could not be published", exc)
                published = False
            if not published:
                self._stop.wait(self.poll_interval_s)

    def is_alive(self) -> bool:
        """Whether the tap is following (started, and its thread running)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> TaggedImageTap:
        if self._thread is None:
            newest = self._newest()
            if newest is None:
                self.numbers.prime(None)  # empty: the next sequence starts after us
            else:
                self.numbers.prime(newest[2], newest[1].get("TimeReceivedByCore"))
            self.errors = 0  # an empty buffer at the start is no failed poll
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="umvd-mm-tap", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> TapStats:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        # We stop following: the daemon hands out the last outputs of what we published now.
        streams = self.numbering.streams
        for stream in streams:
            self.publisher.end(stream)
        self.numbering.forget(streams)
        self._end_live_stream()
        return TapStats(self.published, self.numbers.skipped, self.errors, self.publisher.dropped, self.rejected,
                        self.publisher.undelivered)

    def _end_live_stream(self) -> None:
        if self._live_images:
            self.publisher.end()
            self._live_images = 0


def to_image(pix: Any, tags: dict[str, Any]) -> np.ndarray:
    """A 2-D array from a tagged image: over Java ``pix`` is flat, shaped by the Height/Width tags."""
    image = np.asarray(pix)
    if image.ndim == 1:
        try:
            h, w = int(tags["Height"]), int(tags["Width"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("a flat tagged image needs Height and Width tags") from None
        if h * w != image.size:
            raise ValueError(f"{image.size} pixels do not make a {h}x{w} image")
        image = image.reshape(h, w)
    return image


# --------------------------------------------------------------------------- Python backend


def _snake(name: str) -> str:
    # The same conversion pycromanager applies to MMCoreJ / pymmcore method names.
    s1 = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z0-9])([A-Z])", r"\1_\2", s1).lower()


def _snake_case_class(base: type) -> type:
    """A subclass of ``base`` with a snake_case alias for every camelCase method.

    pycromanager's Python engine calls the core in snake_case (as over Java). The aliases call the
    camelCase method by name, so UniMMCore's Python overrides (Python cameras) are the ones used.
    """
    from mmpycorex.launcher import TaggedImage

    def alias(name: str) -> Callable[..., Any]:
        return lambda self, *args, **kwargs: getattr(self, name)(*args, **kwargs)

    namespace: dict[str, Any] = {}
    for name in dir(base):
        if name.startswith("_") or not name[:1].islower() or name == name.lower():
            continue
        snake = _snake(name)
        if snake in namespace or hasattr(base, snake) or not callable(getattr(base, name, None)):
            continue
        namespace[snake] = alias(name)

    def get_tagged_image(self, cam_index, camera, height, width, binning=None, pixel_type=None,
                         roi_x_start=None, roi_y_start=None):  # noqa: ANN001 - pycromanager's signature
        tags = {"Camera": camera, "Height": height, "Width": width, "CameraChannelIndex": cam_index,
                "PixelType": pixel_type}
        return TaggedImage(tags, self.getImage())

    def pop_next_tagged_image(self):  # noqa: ANN001
        image, md = self.popNextImageAndMD()
        return TaggedImage(dict(md), image)

    def get_last_tagged_image(self):  # noqa: ANN001
        image, md = self.getLastImageAndMD()
        return TaggedImage(dict(md), image)

    namespace.update(
        TaggedImage=TaggedImage,
        get_tagged_image=get_tagged_image,
        pop_next_tagged_image=pop_next_tagged_image,
        get_last_tagged_image=get_last_tagged_image,
    )
    # SWIG classes refuse new attributes after creation: build the class in one go.
    return type(base.__name__ + "SnakeCase", (base,), namespace)


def start_python_backend(config: str | Path | None = None, mm_path: str | None = None) -> Any:
    """Start pycromanager's Python engine on a new pymmcore-plus ``UniMMCore`` and return the core.

    pycromanager's own ``start_headless(..., python_backend=True)`` builds a plain pymmcore core,
    which cannot load ``#py`` pure-Python devices; this is its equivalent for a UniMMCore. The core
    answers in both camelCase and snake_case. Call `stop_python_backend` when done.
    """
    import warnings

    from mmpycorex import launcher
    from pycromanager.acquisition.acq_eng_py.internal.engine import Engine
    from pymmcore_plus.experimental.unicore import UniMMCore

    from umvd_live.adapters.mmcore import _quiet_adapter_search

    if launcher.is_pymmcore_active() or Engine.get_instance() is not None:
        raise RuntimeError("a pycromanager Python backend is already running in this process")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated methods get aliases too
        cls = _snake_case_class(UniMMCore)
    with _quiet_adapter_search(mm_path is None):
        core = cls(mm_path=mm_path) if mm_path else cls()
    if config is not None:
        core.loadSystemConfiguration(str(config))
    # mmpycorex has no public call to register an existing core; `Core()` returns _PYMMCORES[0]
    # and `Acquisition` picks the Python backend when that list is not empty.
    launcher._PYMMCORES.append(core)
    Engine(core)
    return core


def stop_python_backend() -> None:
    """Shut down the engine and forget the core started by `start_python_backend`."""
    from mmpycorex import launcher
    from pycromanager.acquisition.acq_eng_py.internal.engine import Engine

    engine = Engine.get_instance()
    if engine is not None:
        engine.shutdown()
        del Engine.singleton
    launcher._PYMMCORES.clear()
