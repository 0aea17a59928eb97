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

from umvd_live.adapters.axes import StreamAxes, StreamNumbering
from umvd_live.adapters.publisher import FramePublisher
from umvd_live.wire.acqmeta import AcquisitionMeta, local_name
from umvd_live.wire.protocol import SUPPORTED_DTYPES

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


#: tifffile's axis letters -> useq's keys. ``R`` (region) is Micro-Manager's stage position in
#: MMStack and NDTiff files; the series of a multi-series file (OME: its Images) are positions too.
_SPLIT_AXES = {"C": "c", "Z": "z", "R": "p", "M": "g"}
#: Axes a stream runs along when the file has no ``T``: a plain multi-page TIFF's pages ("I", "Q").
_SEQUENCE_AXES = ("T", "I", "Q")


@dataclass(frozen=True)
class Plane:
    """One 2-D plane of the file and where it sits in the acquisition."""

    series: int  # the file's series (position) it belongs to
    plane: int  # flat index among the series' leading axes, in file order
    time: int  # its time point (0 in a file without a time axis)
    axes: StreamAxes  # its stream


class _Series:
    """The planes of one tifffile series, read one at a time (memory use: one frame)."""

    def __init__(self, path: Path, tif: tifffile.TiffFile, index: int):
        self.path = path
        self.index = index
        self.series = tif.series[index]
        axes, shape = self.series.axes, tuple(self.series.shape)
        if "S" in axes:
            raise ReplayError(f"{path}: {shape[axes.index('S')]}-sample (RGB) images; a stream carries grey frames")
        if len(shape) < 2 or axes[-2:] != "YX":
            raise ReplayError(f"{path}: the last axes are {axes[-2:]!r}, not image rows and columns")
        self.shape: tuple[int, int] = (int(shape[-2]), int(shape[-1]))
        self.lead_axes, self.lead_shape = axes[:-2], tuple(int(n) for n in shape[:-2])
        self.n_planes = int(np.prod(self.lead_shape, dtype=np.int64))
        dtype = np.dtype(self.series.dtype)
        native = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
        if native.str not in SUPPORTED_DTYPES and native != np.float64:
            raise ReplayError(
                f"{path}: pixel type {dtype} is not one the stream protocol carries "
                f"({', '.join(sorted(SUPPORTED_DTYPES))}); convert the file first"
            )
        # float64 goes out as float32: the denoiser works in float32 anyway.
        self.dtype = np.dtype(np.float32) if native == np.float64 else native
        pages = self.series.pages
        self.page_per_plane = len(pages) == self.n_planes and all(
            p is None or tuple(p.shape[-2:]) == self.shape for p in (pages[0], pages[-1])
        )
        self.memmap: np.ndarray | None = None
        if not self.page_per_plane:
            # A series stored as one large block (ImageJ > 4 GiB, some shaped files): map it.
            try:
                self.memmap = tifffile.memmap(path, series=index, mode="r").reshape(-1, *self.shape)
            except Exception as exc:
                raise ReplayError(
                    f"{path}: frames are not stored one per page and cannot be memory-mapped ({exc})"
                ) from None

    def plane_axes(self, plane: int) -> dict[str, int]:
        """The leading-axis indices of a plane, by tifffile's axis letter."""
        if not self.lead_shape:
            return {}
        return {axis: int(i) for axis, i in zip(self.lead_axes, np.unravel_index(plane, self.lead_shape))}

    def time_axis(self) -> str | None:
        return next((a for a in _SEQUENCE_AXES if a in self.lead_axes), None)

    def frame(self, plane: int) -> np.ndarray:
        if self.memmap is not None:
            image = np.asarray(self.memmap[plane])
        else:
            page = self.series.pages[plane]
            if page is None:
                raise ReplayError(f"{self.path}: plane {plane} of series {self.index} is missing from the file")
            image = page.asarray()
        image = image.reshape(self.shape)
        return image if image.dtype == self.dtype else image.astype(self.dtype)


class TiffMovie:
    """Every 2-D plane of a TIFF-family file, with the stream each belongs to, read one at a time.

    A file with channels, planes (Z) or positions (several series, or an ``R`` axis) becomes one
    stream per (position, channel, plane) by the rule of `umvd_live.adapters.axes`: ``group``
    plus the file's channel names (OME ``Channel Name``, Micro-Manager ``ChNames``) or ``c{i}``.
    Planes come in acquisition order: time point by time point, each in file order (by the file's
    own timestamps when replayed at file timing, `acquisition_order`). ``series`` and ``channel``
    keep only that series or channel. A file without a time axis is one time point: each plane is
    a stream of one frame (a z-stack is not a video; docs/adapters.md).
    """

    def __init__(self, path: str | Path, *, series: int | None = None, channel: int | None = None,
                 group: str = "cam0"):
        self.path = Path(path)
        if not self.path.is_file():
            raise ReplayError(f"no such file: {self.path}")
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as exc:
            raise ReplayError(f"{self.path}: not a readable TIFF file ({exc})") from None
        try:
            self._setup(series, channel, group)
        except Exception:
            self._tif.close()
            raise

    def _setup(self, series: int | None, channel: int | None, group: str) -> None:
        tif = self._tif
        self.kind = _file_kind(tif)
        n_series = len(tif.series)
        if series is not None and not 0 <= series < n_series:
            raise ReplayError(f"{self.path}: series {series} does not exist ({n_series} series)")
        chosen = [series] if series is not None else list(range(n_series))
        readers = []
        for i in chosen:
            try:
                readers.append(_Series(self.path, tif, i))
            except ReplayError:
                if series is not None or n_series == 1:
                    raise
                # another kind of series (a thumbnail, an RGB overview) beside the movie: skip it
        if not readers:
            raise ReplayError(f"{self.path}: no series with grey 2-D frames")
        self._series = {r.index: r for r in readers}
        positions = len(readers) > 1
        planes: list[Plane] = []
        for r in readers:
            names = self._channel_names(r.index)
            n_channels = r.lead_shape[r.lead_axes.index("C")] if "C" in r.lead_axes else 1
            if channel is not None and not 0 <= channel < n_channels:
                raise ReplayError(f"{self.path}: channel {channel} does not exist ({n_channels} channels)")
            time_axis = r.time_axis()
            for plane in range(r.n_planes):
                ax = r.plane_axes(plane)
                if channel is not None and ax.get("C", 0) != channel:
                    continue
                index: dict[str, int] = {"p": r.index} if positions else {}
                for letter, i in ax.items():
                    if letter == time_axis:
                        continue
                    key = _SPLIT_AXES.get(letter, letter.lower())
                    index["g" if key == "p" and positions else key] = i
                c = index.get("c")
                name = names[c] if c is not None and names and c < len(names) else None
                axes = StreamAxes(group, index, channel=name, position=self._position_name(r.index) if positions else None)
                planes.append(Plane(r.index, plane, ax.get(time_axis, 0) if time_axis else 0, axes))
        # acquisition order: time point by time point; within one, position by position, file order
        self.planes = sorted(planes, key=lambda p: (p.time, p.series))
        self.n_frames = len(self.planes)
        if self.n_frames == 0:
            raise ReplayError(f"{self.path}: no frames")
        self.streams = list(dict.fromkeys(p.axes.name for p in self.planes))
        first = readers[0]
        self.shape, self.dtype = first.shape, first.dtype  # of the first stream; others may differ
        # pixel size, interval, (single) channel name, start: sent with every frame (docs/protocol.md)
        self._acquisition_meta = {r.index: AcquisitionMeta.from_tiff(tif, r.index).to_meta() for r in readers}
        self.series_index = first.index

    def _channel_names(self, series: int) -> list[str] | None:
        """The file's channel names for a series: OME ``Channel Name``, Micro-Manager ``ChNames``."""
        tif = self._tif
        if tif.is_ome and tif.ome_metadata:
            image = self._ome_image(series)
            if image is not None:
                names = [el.attrib.get("Name") for el in image.iter() if local_name(el) == "Channel"]
                if names and all(names):
                    return names
        summary = (tif.micromanager_metadata or {}).get("Summary") if hasattr(tif, "micromanager_metadata") else None
        names = summary.get("ChNames") if isinstance(summary, dict) else None
        return [str(n) for n in names] if isinstance(names, list) and names else None

    def _position_name(self, series: int) -> str | None:
        image = self._ome_image(series) if self._tif.is_ome else None
        return image.attrib.get("Name") if image is not None else None

    def _ome_image(self, series: int) -> ET.Element | None:
        root = self.__dict__.get("_ome_root")
        if root is None:
            try:
                root = self._ome_root = ET.fromstring(self._tif.ome_metadata or "")
            except ET.ParseError:
                return None
        images = [el for el in root.iter() if local_name(el) == "Image"]
        return images[series] if series < len(images) else None

    def acquisition_meta(self, i: int) -> dict[str, Any]:
        """Plane ``i``'s protocol ``meta``: the file's acquisition metadata (`umvd_live.wire.acqmeta`)
        and the plane's place in the acquisition (`StreamAxes.meta`)."""
        plane = self.planes[i]
        return {**self._acquisition_meta[plane.series], **plane.axes.meta(plane.time)}

    def __len__(self) -> int:
        return self.n_frames

    def frame(self, i: int) -> np.ndarray:
        """Plane ``i`` (0-based, acquisition order) as a 2-D array; reads only that plane."""
        plane = self.planes[i]
        return self._series[plane.series].frame(plane.plane)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self.n_frames):
            yield self.frame(i)

    # ------------------------------------------------------------------------ timestamps

    def timestamps(self) -> np.ndarray | None:
        """Each plane's acquisition time in seconds from the first, if the file has them.

        None when the file carries no per-plane times, or when they do not increase (e.g. a
        sequenced pycromanager acquisition stamps every frame 0)."""
        reader = {
            "ome": self._ome_times,
            "ndtiff": self._mm_times,
            "mmstack": self._mm_times,
            "scanimage": self._scanimage_times,
        }.get(self.kind)
        times = reader() if reader is not None else None
        if times is None or len(times) != self.n_frames or not np.all(np.isfinite(times)):
            return None
        times = np.asarray(times, dtype=np.float64)
        times -= times.min()
        if self.n_frames > 1 and times.max() <= 0:
            return None
        if any(np.any(np.diff(times[self._stream_rows(name)]) <= 0) for name in self.streams):
            return None  # a stream's own frames must come in time order
        return times

    def _stream_rows(self, name: str) -> np.ndarray:
        return np.array([i for i, p in enumerate(self.planes) if p.axes.name == name], dtype=np.int64)

    def acquisition_order(self, times: np.ndarray) -> None:
        """Put the planes in the order of ``times`` (the file's own timestamps, `timestamps`)."""
        order = np.argsort(times, kind="stable")
        self.planes = [self.planes[i] for i in order]

    def _ome_times(self) -> list[float] | None:
        by_plane: dict[tuple[int, int, int, int], float] = {}
        for series in self._series:
            image = self._ome_image(series)
            if image is None:
                return None
            for plane in image.iter():
                if local_name(plane) != "Plane" or "DeltaT" not in plane.attrib:
                    continue
                unit = _OME_TIME_UNITS.get(plane.attrib.get("DeltaTUnit", "s"))
                if unit is None:
                    return None
                key = (series, *(int(plane.attrib.get(k, 0)) for k in ("TheT", "TheZ", "TheC")))
                by_plane[key] = float(plane.attrib["DeltaT"]) * unit
        times = []
        for p in self.planes:
            ax = self._series[p.series].plane_axes(p.plane)
            key = (p.series, ax.get("T", 0), ax.get("Z", 0), ax.get("C", 0))
            if key not in by_plane:
                return None
            times.append(by_plane[key])
        return times

    def _full_page(self, p: Plane) -> Any:
        """The TiffPage (with its tags) behind a plane; None if the file lacks it."""
        page = self._series[p.series].series.pages[p.plane]
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

    def _page_values(self, read: Callable[[Any], float | None]) -> list[float] | None:
        if any(r.memmap is not None for r in self._series.values()):
            return None
        values = []
        for p in self.planes:
            page = self._full_page(p)
            value = read(page) if page is not None else None
            if value is None:
                return None
            values.append(value)
        return values

    def _mm_times(self) -> list[float] | None:
        def elapsed(page: Any) -> float | None:
            tag = page.tags.get(_MM_METADATA_TAG)
            value = tag.value if tag is not None else None
            if not isinstance(value, dict) or "ElapsedTime-ms" not in value:
                return None
            try:
                return float(value["ElapsedTime-ms"]) / 1000
            except (TypeError, ValueError):
                return None

        return self._page_values(elapsed)

    def _scanimage_times(self) -> list[float] | None:
        def stamp(page: Any) -> float | None:
            match = _SI_TIMESTAMP.search(page.description or "")
            return float(match.group(1)) if match else None

        return self._page_values(stamp)

    def close(self) -> None:
        for r in self._series.values():
            r.memmap = None
        self._tif.close()

    def __enter__(self) -> "TiffMovie":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ZarrMovie:
    """Every 2-D plane of an OME-Zarr store (0.4 or 0.5), with the stream each belongs to: the
    interface of `TiffMovie`, so that channels (``c``), planes (``z``), positions (the series of
    a bioformats2raw store, as pymmcore-plus writes them) and any other axis split into streams
    by the same rule. Reads one plane at a time; timestamps are a umvd-live recording's own."""

    kind = "ome-zarr"

    def __init__(self, path: str | Path, *, series: int | None = None, channel: int | None = None,
                 group: str = "cam0"):
        from umvd_live.recording.omezarr import RecordingFormatError, open_ome_zarr

        self.path = Path(path)
        if not self.path.is_dir():
            raise ReplayError(f"no such OME-Zarr store: {self.path}")
        try:
            images = open_ome_zarr(self.path)
        except (RecordingFormatError, RuntimeError) as exc:
            raise ReplayError(str(exc)) from None
        if series is not None and not 0 <= series < len(images):
            raise ReplayError(f"{self.path}: series {series} does not exist ({len(images)} series)")
        chosen = [series] if series is not None else list(range(len(images)))
        self._series = {i: images[i] for i in chosen}
        positions = len(images) > 1
        planes: list[Plane] = []
        for i in chosen:
            image = images[i]
            dtype = np.dtype(image.dtype)
            if dtype.str not in SUPPORTED_DTYPES and dtype != np.float64:
                raise ReplayError(f"{self.path}: pixel type {dtype} is not one the stream protocol carries "
                                  f"({', '.join(sorted(SUPPORTED_DTYPES))}); convert the store first")
            lead_axes, lead_shape = image.axes[:-2], image.shape[:-2]
            n_channels = lead_shape[lead_axes.index("C")] if "C" in lead_axes else 1
            if channel is not None and not 0 <= channel < n_channels:
                raise ReplayError(f"{self.path}: channel {channel} does not exist ({n_channels} channels)")
            for flat in range(int(np.prod(lead_shape, dtype=np.int64))):
                ax = {a: int(k) for a, k in zip(lead_axes, np.unravel_index(flat, lead_shape))}
                if channel is not None and ax.get("C", 0) != channel:
                    continue
                index: dict[str, int] = {"p": i} if positions else {}
                index.update({a.lower(): k for a, k in ax.items() if a != "T"})
                c = index.get("c")
                names = image.channel_names
                name = names[c] if c is not None and names and c < len(names) else None
                if c is not None and lead_shape[lead_axes.index("C")] == 1:
                    index.pop("c")  # one channel (as umvd-live records a stream): no channel axis
                axes = StreamAxes(group, index, channel=name, position=image.name if positions else None)
                planes.append(Plane(i, flat, ax.get("T", 0), axes))
        self.planes = sorted(planes, key=lambda p: (p.time, p.series))
        self.n_frames = len(self.planes)
        if self.n_frames == 0:
            raise ReplayError(f"{self.path}: no frames")
        self.streams = list(dict.fromkeys(p.axes.name for p in self.planes))
        first = self._series[chosen[0]]
        self.shape = first.shape[-2:]
        self.dtype = np.dtype(np.float32) if first.dtype == np.float64 else np.dtype(first.dtype)
        self.series_index = chosen[0]

    def _index(self, plane: Plane) -> tuple[int, ...]:
        image = self._series[plane.series]
        return tuple(int(k) for k in np.unravel_index(plane.plane, image.shape[:-2]))

    def acquisition_meta(self, i: int) -> dict[str, Any]:
        """Plane ``i``'s protocol ``meta``: the store's pixel size, interval, channel name, start
        and the plane's place in the acquisition."""
        plane = self.planes[i]
        image = self._series[plane.series]
        c = dict(zip(image.axes, self._index(plane))).get("C")
        return {**image.acquisition_meta(c), **plane.axes.meta(plane.time)}

    def __len__(self) -> int:
        return self.n_frames

    def frame(self, i: int) -> np.ndarray:
        """Plane ``i`` (0-based, acquisition order) as a 2-D array; reads only that plane."""
        plane = self.planes[i]
        image = self._series[plane.series].read(self._index(plane))
        return image if image.dtype == self.dtype else image.astype(self.dtype)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self.n_frames):
            yield self.frame(i)

    def timestamps(self) -> np.ndarray | None:
        """Each plane's time in seconds from the first: a umvd-live recording's per-frame times
        (one stream, so one plane per time point); None for other stores."""
        if len(self._series) != 1:
            return None
        times = next(iter(self._series.values())).times()
        if times is None or len(times) < self.n_frames or any(t is None for t in times[:self.n_frames]):
            return None
        out = np.asarray(times[: self.n_frames], dtype=np.float64)
        out -= out.min()
        return out if self.n_frames < 2 or np.all(np.diff(out) > 0) else None

    def acquisition_order(self, times: np.ndarray) -> None:
        """Put the planes in the order of ``times`` (`timestamps`)."""
        order = np.argsort(times, kind="stable")
        self.planes = [self.planes[i] for i in order]

    def close(self) -> None:
        self._series = {}

    def __enter__(self) -> ZarrMovie:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_movie(path: str | Path, *, series: int | None = None, channel: int | None = None,
               group: str = "cam0") -> TiffMovie | ZarrMovie:
    """The reader for ``path``: `ZarrMovie` for an OME-Zarr store (``.zarr``), else `TiffMovie`."""
    from umvd_live.recording.omezarr import is_zarr_path

    cls = ZarrMovie if is_zarr_path(path) else TiffMovie
    return cls(path, series=series, channel=channel, group=group)


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
    time_points: np.ndarray | None = None,
    loop: bool = False,
    max_frames: int | None = None,
) -> Iterator[ScheduledFrame]:
    """The replay's frames in order, each with its due time.

    At ``rate_hz`` time point k of the replay is due at k / rate: frame i's time point is
    ``time_points[i]`` (default i; the planes of one time point, its channels and z, go out
    together). With ``timestamps`` (seconds from the first frame) a frame is due at its own time;
    each further loop starts one typical frame interval (the median step) after the previous loop's
    last frame. Endless when looping without ``max_frames``.
    """
    if n_frames < 1:
        raise ValueError("nothing to replay")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    if timestamps is None:
        if not rate_hz > 0 or not math.isfinite(rate_hz):
            raise ValueError(f"rate must be a positive number, got {rate_hz}")
        points = np.arange(n_frames) if time_points is None else np.asarray(time_points)
        if points.shape != (n_frames,):
            raise ValueError(f"{len(points)} time points for {n_frames} frames")
        times = (points - points.min()) / rate_hz
        loop_length = (float(points.max() - points.min()) + 1) / rate_hz
    else:
        times = np.asarray(timestamps, dtype=np.float64)
        if times.shape != (n_frames,):
            raise ValueError(f"{len(times)} timestamps for {n_frames} frames")
        times = times - times[0]
        steps = np.diff(times)
        steps = steps[steps > 0]
        step = float(np.median(steps)) if len(steps) else 1.0 / rate_hz
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
    series: int | None = None  # only this series (position); default every one
    channel: int | None = None  # only this channel; default every one, a stream each


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
    """Publish the file's frames on their schedule until it ends, ``max_frames`` or ``stop``: one
    stream per (position, channel, plane) of the file (`TiffMovie`, `ZarrMovie`), named from the publisher's
    stream, each numbered from 0; at the end each stream is ended (protocol `StreamEnd`)."""
    with open_movie(config.path, series=config.series, channel=config.channel, group=publisher.stream) as movie:
        timestamps = None
        if config.file_timing:
            timestamps = movie.timestamps()
            if timestamps is None:
                raise ReplayError(
                    f"{config.path}: this {movie.kind} file carries no increasing per-frame "
                    "timestamps (OME DeltaT, Micro-Manager ElapsedTime-ms, ScanImage "
                    "frameTimestamps_sec); replay it at a fixed rate instead"
                )
            movie.acquisition_order(timestamps)
            timestamps = np.sort(timestamps, kind="stable")
        schedule = replay_schedule(
            movie.n_frames, rate_hz=config.rate_hz, timestamps=timestamps,
            time_points=np.array([p.time for p in movie.planes]), loop=config.loop,
            max_frames=config.max_frames,
        )
        numbering = StreamNumbering()
        published = dropped = loops = 0
        late_max = 0.0
        start = time.monotonic()
        try:
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
                plane = movie.planes[item.index]
                meta = {"source": "replay", "file_frame": item.index, "loop": item.loop,
                        **movie.acquisition_meta(item.index)}
                stream = plane.axes.name
                if publisher.publish(image, t=item.due_s, meta=meta, seq=numbering.next(stream), stream=stream):
                    published += 1
                else:
                    dropped += 1
                loops = max(loops, item.loop + 1)
                if on_frame is not None:
                    on_frame(item)
        finally:
            for stream in numbering.streams:
                publisher.end(stream)
        return ReplayStats(published, dropped, loops, late_max, time.monotonic() - start)
