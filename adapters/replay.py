"""Replay a recorded movie as a live stream: rehearse a session, test on real data.

Reads TIFF, OME-TIFF, ImageJ, ScanImage and Micro-Manager NDTiff/MMStack files through tifffile
one plane at a time (memory use is one frame, whatever the file size), and paces them either at a
fixed rate or at the file's own frame timestamps: OME ``Plane DeltaT``, Micro-Manager
``ElapsedTime-ms`` (per-image metadata of NDTiff and MMStack files), ScanImage
``frameTimestamps_sec``. Optionally loops.

The schedule (`replay_schedule`) is pure: which file frame goes out at which offset from the start;
`replay` only sleeps until each due time and publishes. A late frame goes out at once and the next
keeps its own due time, so lateness never accumulates.
"""

from __future__ import annotations

import math
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from umvd_live.adapters.publisher import FramePublisher
from umvd_live.protocol import SUPPORTED_DTYPES

#: OME time units -> seconds.
_OME_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9, "min": 60.0, "h": 3600.0}
_MM_METADATA_TAG = 51123
#: ScanImage's per-frame description holds lines like ``frameTimestamps_sec = 12.345678``.
_SI_TIMESTAMP = re.compile(r"^\s*frameTimestamps_sec\s*=\s*([-+0-9.eE]+)\s*$", re.MULTILINE)


class ReplayError(ValueError):
    """A file that cannot be replayed as asked, with the reason in words."""


def _file_kind(tif: tifffile.TiffFile) -> str:
    if tif.is_ndtiff:
        return "ndtiff"
    if tif.is_mmstack or tif.is_micromanager:
        return "mmstack"
    if tif.is_ome:
        return "ome"
    if tif.is_scanimage:
        return "scanimage"
    if tif.is_imagej:
        return "imagej"
    return "tiff"


class TiffMovie:
    """The 2-D frames of one series of a TIFF-family file, read one at a time.

    Leading axes other than the channel are flattened in file order; with a ``C`` axis only
    ``channel`` is kept (one stream carries one channel).
    """

    def __init__(self, path: str | Path, *, series: int = 0, channel: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise ReplayError(f"no such file: {self.path}")
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as exc:
            raise ReplayError(f"{self.path}: not a readable TIFF file ({exc})") from None
        try:
            self._setup(series, channel)
        except Exception:
            self._tif.close()
            raise

    def _setup(self, series: int, channel: int) -> None:
        tif = self._tif
        self.kind = _file_kind(tif)
        if not 0 <= series < len(tif.series):
            raise ReplayError(f"{self.path}: series {series} does not exist ({len(tif.series)} series)")
        self._series = tif.series[series]
        self.series_index = series
        axes, shape = self._series.axes, tuple(self._series.shape)
        if "S" in axes:
            raise ReplayError(f"{self.path}: {shape[axes.index('S')]}-sample (RGB) images; "
                              "a stream carries grey frames")
        if len(shape) < 2 or axes[-2:] not in ("YX",):
            raise ReplayError(f"{self.path}: the last axes are {axes[-2:]!r}, not image rows and columns")
        self.axes = axes
        self.shape: tuple[int, int] = (int(shape[-2]), int(shape[-1]))
        lead_axes, lead_shape = axes[:-2], shape[:-2]
        self._lead_shape = lead_shape
        planes = np.arange(int(np.prod(lead_shape, dtype=np.int64)))  # () -> one plane
        if "C" in lead_axes and lead_shape[lead_axes.index("C")] > 1:
            c_axis = lead_axes.index("C")
            n_channels = lead_shape[c_axis]
            if not 0 <= channel < n_channels:
                raise ReplayError(f"{self.path}: channel {channel} does not exist ({n_channels} channels)")
            index = np.unravel_index(planes, lead_shape) if lead_shape else ()
            planes = planes[index[c_axis] == channel]
        self.channel = channel
        self._planes = planes
        self._lead_axes = lead_axes
        self.n_frames = len(planes)
        if self.n_frames == 0:
            raise ReplayError(f"{self.path}: no frames")
        dtype = np.dtype(self._series.dtype)
        native = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
        if native.str not in SUPPORTED_DTYPES and native != np.float64:
            raise ReplayError(
                f"{self.path}: pixel type {dtype} is not one the stream protocol carries "
                f"({', '.join(sorted(SUPPORTED_DTYPES))}); convert the file first"
            )
        # float64 goes out as float32: the denoiser works in float32 anyway.
        self.dtype = np.dtype(np.float32) if native == np.float64 else native
        pages = self._series.pages
        n_planes = int(np.prod(lead_shape, dtype=np.int64))
        self._page_per_plane = len(pages) == n_planes and all(
            p is None or tuple(p.shape[-2:]) == self.shape for p in (pages[0], pages[-1])
        )
        self._memmap: np.ndarray | None = None
        if not self._page_per_plane:
            # A series stored as one large block (ImageJ > 4 GiB, some shaped files): map it.
            try:
                self._memmap = tifffile.memmap(self.path, series=series, mode="r")
            except Exception as exc:
                raise ReplayError(
                    f"{self.path}: frames are not stored one per page and cannot be memory-mapped ({exc})"
                ) from None
            self._memmap = self._memmap.reshape(-1, *self.shape)

    def __len__(self) -> int:
        return self.n_frames

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` (0-based) as a 2-D array in the stream's dtype; reads only that plane."""
        plane = int(self._planes[i])
        if self._memmap is not None:
            image = np.asarray(self._memmap[plane])
        else:
            page = self._series.pages[plane]
            if page is None:
                raise ReplayError(f"{self.path}: frame {i} is missing from the file")
            image = page.asarray()
        image = image.reshape(self.shape)
        if image.dtype != self.dtype:
            image = image.astype(self.dtype)
        return image

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self.n_frames):
            yield self.frame(i)

    # ------------------------------------------------------------------------ timestamps

    def timestamps(self) -> np.ndarray | None:
        """Each frame's acquisition time in seconds from the first frame, if the file has them.

        None when the file carries no per-frame times, or when they do not increase (e.g. a
        sequenced pycromanager acquisition stamps every frame 0).
        """
        reader = {
            "ome": self._ome_times,
            "ndtiff": self._mm_times,
            "mmstack": self._mm_times,
            "scanimage": self._scanimage_times,
        }.get(self.kind)
        times = reader() if reader is not None else None
        if times is None or len(times) != self.n_frames or not np.all(np.isfinite(times)):
            return None
        times = np.asarray(times, dtype=np.float64) - times[0]
        if self.n_frames > 1 and (np.any(np.diff(times) < 0) or times[-1] <= 0):
            return None
        return times

    def _plane_axes(self, plane: int) -> dict[str, int]:
        if not self._lead_shape:
            return {}
        index = np.unravel_index(plane, self._lead_shape)
        return {axis: int(i) for axis, i in zip(self._lead_axes, index)}

    def _ome_times(self) -> list[float] | None:
        xml = self._tif.ome_metadata
        if not xml:
            return None
        try:
            root = ET.fromstring(xml)
        except ET.ParseError:
            return None
        images = [el for el in root.iter() if el.tag.endswith("}Image") or el.tag == "Image"]
        if self.series_index >= len(images):
            return None
        by_tzc: dict[tuple[int, int, int], float] = {}
        for plane in images[self.series_index].iter():
            if not (plane.tag.endswith("}Plane") or plane.tag == "Plane") or "DeltaT" not in plane.attrib:
                continue
            unit = _OME_TIME_UNITS.get(plane.attrib.get("DeltaTUnit", "s"))
            if unit is None:
                return None
            key = tuple(int(plane.attrib.get(k, 0)) for k in ("TheT", "TheZ", "TheC"))
            by_tzc[key] = float(plane.attrib["DeltaT"]) * unit
        if not by_tzc:
            return None
        times = []
        for plane in self._planes:
            ax = self._plane_axes(int(plane))
            key = (ax.get("T", 0), ax.get("Z", 0), ax.get("C", 0))
            if key not in by_tzc:
                return None
            times.append(by_tzc[key])
        return times

    def _full_page(self, plane: int) -> Any:
        """The TiffPage (with its tags) behind a series plane; None if the file lacks it."""
        page = self._series.pages[plane]
        if page is None or not isinstance(page, tifffile.TiffFrame):
            return page
        try:
            return page.aspage()
        except ValueError:
            # A "virtual" frame (NDTiff: built from NDTiff.index): find its IFD by data offset.
            return self._ifd_by_offset(page.parent).get(page.dataoffsets[0])

    def _ifd_by_offset(self, parent: tifffile.TiffFile) -> dict[int, tifffile.TiffPage]:
        cache = self.__dict__.setdefault("_ifd_cache", {})
        key = id(parent)
        if key not in cache:
            pages = parent.pages
            useframes = pages.useframes
            pages.useframes = False
            try:
                cache[key] = {p.dataoffsets[0]: p for p in pages if p.dataoffsets}
            finally:
                pages.useframes = useframes
        return cache[key]

    def _mm_times(self) -> list[float] | None:
        if self._memmap is not None:
            return None
        times = []
        for plane in self._planes:
            page = self._full_page(int(plane))
            tag = page.tags.get(_MM_METADATA_TAG) if page is not None else None
            value = tag.value if tag is not None else None
            if not isinstance(value, dict) or "ElapsedTime-ms" not in value:
                return None
            try:
                times.append(float(value["ElapsedTime-ms"]) / 1000)
            except (TypeError, ValueError):
                return None
        return times

    def _scanimage_times(self) -> list[float] | None:
        if self._memmap is not None:
            return None
        times = []
        for plane in self._planes:
            page = self._full_page(int(plane))
            if page is None:
                return None
            match = _SI_TIMESTAMP.search(page.description or "")
            if match is None:
                return None
            times.append(float(match.group(1)))
        return times

    def close(self) -> None:
        self._memmap = None
        self._tif.close()

    def __enter__(self) -> "TiffMovie":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class ScheduledFrame:
    index: int  # frame of the file
    loop: int  # pass over the file, from 0
    due_s: float  # when it goes out, seconds from the start of the replay


def replay_schedule(
    n_frames: int,
    *,
    rate_hz: float = 30.0,
    timestamps: np.ndarray | None = None,
    loop: bool = False,
    max_frames: int | None = None,
) -> Iterator[ScheduledFrame]:
    """The replay's frames in order, each with its due time.

    At ``rate_hz`` frame k of the replay is due at k / rate. With ``timestamps`` (seconds from the
    first frame) a frame is due at its own time; each further loop starts one typical frame
    interval (the median) after the previous loop's last frame. Endless when looping without
    ``max_frames``.
    """
    if n_frames < 1:
        raise ValueError("nothing to replay")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    if timestamps is None:
        if not rate_hz > 0 or not math.isfinite(rate_hz):
            raise ValueError(f"rate must be a positive number, got {rate_hz}")
        period = 1.0 / rate_hz
        times = np.arange(n_frames) * period
        loop_length = n_frames * period
    else:
        times = np.asarray(timestamps, dtype=np.float64)
        if times.shape != (n_frames,):
            raise ValueError(f"{len(times)} timestamps for {n_frames} frames")
        times = times - times[0]
        step = float(np.median(np.diff(times))) if n_frames > 1 else 1.0 / rate_hz
        loop_length = float(times[-1]) + step
    k = 0
    pass_ = 0
    while True:
        for i in range(n_frames):
            if max_frames is not None and k >= max_frames:
                return
            yield ScheduledFrame(index=i, loop=pass_, due_s=pass_ * loop_length + float(times[i]))
            k += 1
        if not loop:
            return
        pass_ += 1


# ------------------------------------------------------------------------------ replay


@dataclass(frozen=True)
class ReplayConfig:
    path: Path
    rate_hz: float = 30.0
    file_timing: bool = False  # pace at the file's own timestamps instead of rate_hz
    loop: bool = False
    max_frames: int | None = None  # stop after this many (default: the file once, or forever if looping)
    series: int = 0
    channel: int = 0


@dataclass(frozen=True)
class ReplayStats:
    published: int
    dropped: int  # refused by the publisher (queue full)
    loops: int  # passes started over the file
    late_max_s: float  # worst lateness of a frame against its due time
    elapsed_s: float


def replay(
    publisher: FramePublisher,
    config: ReplayConfig,
    *,
    stop: threading.Event | None = None,
    on_frame: Callable[[ScheduledFrame], None] | None = None,
) -> ReplayStats:
    """Publish the file's frames on their schedule until it ends, ``max_frames`` or ``stop``."""
    with TiffMovie(config.path, series=config.series, channel=config.channel) as movie:
        timestamps = None
        if config.file_timing:
            timestamps = movie.timestamps()
            if timestamps is None:
                raise ReplayError(
                    f"{config.path}: this {movie.kind} file carries no increasing per-frame "
                    "timestamps (OME DeltaT, Micro-Manager ElapsedTime-ms, ScanImage "
                    "frameTimestamps_sec); replay it at a fixed rate instead"
                )
        schedule = replay_schedule(
            movie.n_frames, rate_hz=config.rate_hz, timestamps=timestamps,
            loop=config.loop, max_frames=config.max_frames,
        )
        published = dropped = loops = 0
        late_max = 0.0
        start = time.monotonic()
        for item in schedule:
            image = movie.frame(item.index)  # read before waiting: the wait absorbs the read
            wait = start + item.due_s - time.monotonic()
            if wait > 0:
                if stop is not None:
                    if stop.wait(wait):
                        break
                else:
                    time.sleep(wait)
            elif stop is not None and stop.is_set():
                break
            late_max = max(late_max, -wait)
            meta = {"source": "replay", "file_frame": item.index, "loop": item.loop}
            if publisher.publish(image, t=item.due_s, meta=meta):
                published += 1
            else:
                dropped += 1
            loops = max(loops, item.loop + 1)
            if on_frame is not None:
                on_frame(item)
        return ReplayStats(published, dropped, loops, late_max, time.monotonic() - start)
