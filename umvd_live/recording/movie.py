"""Reading movie files: the one reader of `umvd-live acquire replay`, `denoise` and `batch`.

TIFF, OME-TIFF, ImageJ, ScanImage and Micro-Manager NDTiff/MMStack files through tifffile, and
OME-Zarr stores, one plane at a time (memory use is one frame, whatever the file size). A file
with channels, planes (Z) or positions holds one stream per (position, channel, plane), named by
the rule of `umvd_live.wire.axes`: a window never mixes two channels or planes, whichever command
reads the file.

- `TiffMovie` / `ZarrMovie` (`open_movie`): every plane with its stream, in acquisition order,
  the file's timestamps and acquisition metadata; replay paces and publishes them.
- `MovieFrames`: one stream as a T×H×W movie read by spans of frames, with one clear error for
  every way it cannot be denoised; `denoise` and `batch` denoise each stream on its own engine.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import tifffile

from umvd_live.recording.ometiff import FRAME_TAG
from umvd_live.recording.omezarr import OmeZarrSeries, RecordingFormatError, is_zarr_path, open_ome_zarr
from umvd_live.recording.session import recording_stem
from umvd_live.wire.acqmeta import AcquisitionMeta, local_name
from umvd_live.wire.axes import StreamAxes, channel_parts, name_part

log = logging.getLogger(__name__)

#: OME time units -> seconds.
_OME_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9, "min": 60.0, "h": 3600.0}
_MM_METADATA_TAG = 51123
#: ScanImage's per-frame description holds lines like ``frameTimestamps_sec = 12.345678``.
_SI_TIMESTAMP = re.compile(r"^\s*frameTimestamps_sec\s*=\s*([-+0-9.eE]+)\s*$", re.MULTILINE)
#: tifffile's axis letters -> useq's keys. ``R`` (region) is Micro-Manager's stage position in
#: MMStack and NDTiff files; the series of a multi-series file (OME: its Images) are positions too.
_SPLIT_AXES = {"C": "c", "Z": "z", "R": "p", "M": "g"}
#: Axes a stream runs along when the file has no ``T``: a plain multi-page TIFF's pages ("I", "Q").
_SEQUENCE_AXES = ("T", "I", "Q")


class MovieError(ValueError):
    """A movie file that cannot be read as asked; the message is one line meant for the user."""


def _unreadable(path: Path, what: str, exc: BaseException) -> MovieError:
    """The one line for an unexpected error while a file is opened (a damaged file raises many
    kinds, from tifffile, zarr or the metadata's parsing)."""
    lines = str(exc).strip().splitlines()
    return MovieError(f"{path}: not readable as {what} ({type(exc).__name__}: {lines[0] if lines else ''})")


@dataclass(frozen=True)
class Plane:
    """One 2-D plane of the file and where it sits in the acquisition."""

    series: int  # the file's series (position) it belongs to
    plane: int  # flat index among the series' leading axes, in file order
    time: int  # its time point (0 in a file without a time axis)
    axes: StreamAxes  # its stream


@dataclass(frozen=True)
class SeriesInfo:
    """What one series (image) of a file holds: its axes (tifffile's letters), shape and the
    dtype its planes are read in. ``one_time_point``: the file says the series is a single time
    point of several planes (a z-stack, a snapshot of channels), so it is no movie even when it
    is a 3-D stack (`stream_planes`)."""

    axes: str
    shape: tuple[int, ...]
    dtype: np.dtype
    one_time_point: bool = False

    @property
    def frame_shape(self) -> tuple[int, int]:
        return int(self.shape[-2]), int(self.shape[-1])


def _pixel_type(path: Path, dtype: np.dtype) -> np.dtype:
    """The dtype planes are read in: native byte order, float64 as float32 (the engine and the
    protocol work in float32). Pixels that are not numbers raise MovieError."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "uif" or dtype.itemsize > 8:
        raise MovieError(f"{path}: unsupported pixel type {dtype} (integer or float pixels expected)")
    native = dtype.newbyteorder("=") if dtype.byteorder not in "=|" else dtype
    return np.dtype(np.float32) if native == np.float64 else native


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


def _recorded_frames(tif: tifffile.TiffFile, series: tifffile.TiffPageSeries) -> int:
    """How many frames a umvd-live recording holds (0 for any other file). Each of its linked
    pages is one whole frame with its `FRAME_TAG`; a recorder killed after its last checkpoint
    declares fewer in its OME-XML than it linked, so its frames are counted page by page, as
    `read_recording` reads them."""
    if len(tif.series) != 1 or series.axes not in ("TYX", "YX") or FRAME_TAG not in tif.pages.first.tags:
        return 0
    return len(tif.pages)


class _Series:
    """The planes of one tifffile series, read one at a time (memory use: one frame)."""

    def __init__(self, path: Path, tif: tifffile.TiffFile, index: int):
        self.path = path
        self.index = index
        self.series = tif.series[index]
        axes, shape = self.series.axes, tuple(self.series.shape)
        if "S" in axes:
            raise MovieError(f"{path}: {shape[axes.index('S')]}-sample (RGB) images; a stream carries grey frames")
        if len(shape) < 2 or axes[-2:] != "YX":
            raise MovieError(f"{path}: the last axes are {axes[-2:]!r}, not image rows and columns")
        self.tif = tif
        self.recorded = _recorded_frames(tif, self.series)
        if self.recorded > int(np.prod(shape[:-2], dtype=np.int64)):  # a killed recording's later frames
            axes, shape = "TYX", (self.recorded, *shape[-2:])
        self.info = SeriesInfo(axes, tuple(int(n) for n in shape), _pixel_type(path, self.series.dtype))
        self.shape = self.info.frame_shape
        self.dtype = self.info.dtype
        self.lead_axes, self.lead_shape = axes[:-2], tuple(int(n) for n in shape[:-2])
        self.n_planes = int(np.prod(self.lead_shape, dtype=np.int64))
        pages = self.series.pages
        self.page_per_plane = bool(self.recorded) or len(pages) == self.n_planes and all(
            p is None or tuple(p.shape[-2:]) == self.shape for p in (pages[0], pages[-1])
        )
        self.memmap: np.ndarray | None = None
        if not self.page_per_plane:
            # A series stored as one large block (ImageJ > 4 GiB, some shaped files): map it.
            try:
                self.memmap = tifffile.memmap(path, series=index, mode="r").reshape(-1, *self.shape)
            except Exception as exc:
                raise MovieError(
                    f"{path}: frames are not stored one per page and cannot be memory-mapped ({exc})"
                ) from None

    def plane_axes(self, plane: int) -> dict[str, int]:
        """The leading-axis indices of a plane, by tifffile's axis letter."""
        if not self.lead_shape:
            return {}
        return {axis: int(i) for axis, i in zip(self.lead_axes, np.unravel_index(plane, self.lead_shape))}

    def recorded_page(self, plane: int) -> tifffile.TiffPage:
        """A recording's page, read as a page of its own: tifffile leaves those past the OME-XML's
        frames keyframe-less in the series."""
        page = self.tif.pages.get(plane)
        if not isinstance(page, tifffile.TiffPage):
            raise MovieError(f"{self.path}: page {plane} is not a whole TIFF page")
        return page

    def time_axis(self) -> str | None:
        return next((a for a in _SEQUENCE_AXES if a in self.lead_axes), None)

    def frame(self, plane: int) -> np.ndarray:
        if self.memmap is not None:
            image = np.asarray(self.memmap[plane])
        else:
            page = self.recorded_page(plane) if self.recorded else self.series.pages[plane]
            if page is None:
                raise MovieError(f"{self.path}: plane {plane} of series {self.index} is missing from the file")
            image = page.asarray()
        image = image.reshape(self.shape)
        return image if image.dtype == self.dtype else image.astype(self.dtype)


class TiffMovie:
    """Every 2-D plane of a TIFF-family file, with the stream each belongs to, read one at a time.

    A file with channels, planes (Z) or positions (several series, or an ``R`` axis) becomes one
    stream per (position, channel, plane) by the rule of `umvd_live.wire.axes`: ``group``
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
            raise MovieError(f"{self.path}: no such file")
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as exc:  # noqa: BLE001 - a damaged file raises many kinds; the user gets one line
            raise MovieError(f"{self.path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
        try:
            self._setup(series, channel, group)
        except BaseException as exc:
            self._tif.close()
            if isinstance(exc, Exception) and not isinstance(exc, MovieError):
                # a file damaged past its first page (a copy cut short) fails in tifffile's series,
                # pages or metadata parsing: one line, as for a header that does not parse
                raise _unreadable(self.path, "a TIFF movie", exc) from None
            raise

    def _setup(self, series: int | None, channel: int | None, group: str) -> None:
        tif = self._tif
        self.kind = _file_kind(tif)
        n_series = len(tif.series)
        if series is not None and not 0 <= series < n_series:
            raise MovieError(f"{self.path}: series {series} does not exist ({n_series} series)")
        chosen = [series] if series is not None else list(range(n_series))
        readers = []
        for i in chosen:
            try:
                readers.append(_Series(self.path, tif, i))
            except MovieError:
                if series is not None or n_series == 1:
                    raise
                # another kind of series (a thumbnail, an RGB overview) beside the movie: skip it
        if not readers:
            raise MovieError(f"{self.path}: no series with grey 2-D frames")
        for r in readers:
            r.info = replace(r.info, one_time_point=self._ome_one_time_point(r))
        self._series = {r.index: r for r in readers}
        self.series_info = {r.index: r.info for r in readers}
        positions = len(readers) > 1
        planes: list[Plane] = []
        for r in readers:
            n_channels = r.lead_shape[r.lead_axes.index("C")] if "C" in r.lead_axes else 1
            names, parts = _channel_labels(self._channel_names(r.index), n_channels)
            if channel is not None and not 0 <= channel < n_channels:
                raise MovieError(f"{self.path}: channel {channel} does not exist ({n_channels} channels)")
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
                position = self._position_name(r.index) if positions else None
                axes = StreamAxes(group, index, channel=names[c] if c is not None else None, position=position,
                                  channel_part=parts[c] if c is not None else None)
                planes.append(Plane(r.index, plane, ax.get(time_axis, 0) if time_axis else 0, axes))
        # acquisition order: time point by time point; within one, position by position, file order
        self.planes = sorted(planes, key=lambda p: (p.time, p.series))
        self.n_frames = len(self.planes)
        if self.n_frames == 0:
            raise MovieError(f"{self.path}: no frames")
        self.streams = list(dict.fromkeys(p.axes.name for p in self.planes))
        first = readers[0]
        self.shape, self.dtype = first.shape, first.dtype  # of the first stream; others may differ
        # pixel size, interval, (single) channel name, start: sent with every frame (docs/protocol.md)
        self._file_meta = {r.index: AcquisitionMeta.from_tiff(tif, r.index).to_meta() for r in readers}
        self.series_index = first.index

    def _channel_names(self, series: int) -> list[str] | None:
        """The file's channel names for a series: OME ``Channel Name``, Micro-Manager ``ChNames``."""
        tif = self._tif
        if tif.is_ome and tif.ome_metadata:
            image = self._ome_image(series)
            if image is not None:
                names = [el.attrib.get("Name", "") for el in image.iter() if local_name(el) == "Channel"]
                if names and all(names):
                    return names
        summary = (tif.micromanager_metadata or {}).get("Summary") if hasattr(tif, "micromanager_metadata") else None
        mm_names = summary.get("ChNames") if isinstance(summary, dict) else None
        return [str(n) for n in mm_names] if isinstance(mm_names, list) and mm_names else None

    def _ome_one_time_point(self, r: _Series) -> bool:
        """Whether the OME-XML says that series ``r``, which has no time axis, is one time point
        of several planes: ``SizeT="1"`` with ``SizeZ`` > 1 (a z-stack), or with ``SizeC`` > 1 and
        channels it labels (a channel name, or a ``DimensionOrder`` other than ``XYCZT``). Not
        where it says only what tifffile writes for a 3-D stack it was told nothing about
        (``SizeC`` = planes, ``SizeT="1"``, ``XYCZT``, unnamed channels): such a file says
        nothing, and stays a movie (`stream_planes`)."""
        if not self._tif.is_ome or "T" in r.lead_axes:
            return False
        image = self._ome_image(r.index)
        pixels = next((el for el in image.iter() if local_name(el) == "Pixels"), None) if image is not None else None
        if pixels is None:
            return False

        def size(axis: str) -> int:
            try:
                return int(pixels.get(f"Size{axis}", "1"))
            except ValueError:
                return 1

        if size("T") != 1:
            return False
        if size("Z") > 1:
            return True
        if size("C") > 1:
            named = any(el.get("Name") for el in pixels.iter() if local_name(el) == "Channel")
            return named or pixels.get("DimensionOrder") != "XYCZT"
        return False

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

    def file_meta(self, i: int) -> dict[str, Any]:
        """Plane ``i``'s acquisition metadata as protocol ``meta`` keys (`umvd_live.wire.acqmeta`):
        pixel size, interval, the (single) channel name and start its series states."""
        return dict(self._file_meta[self.planes[i].series])

    def acquisition_meta(self, i: int) -> dict[str, Any]:
        """Plane ``i``'s protocol ``meta``: the file's acquisition metadata (`file_meta`) and the
        plane's place in the acquisition (`StreamAxes.meta`)."""
        plane = self.planes[i]
        return {**self._file_meta[plane.series], **plane.axes.meta(plane.time)}

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
        reader = self._recorded_times if self._series[self.series_index].recorded else {
            "ome": self._ome_times,
            "ndtiff": self._mm_times,
            "mmstack": self._mm_times,
            "scanimage": self._scanimage_times,
        }.get(self.kind)
        stamps = reader() if reader is not None else None
        if stamps is None or len(stamps) != self.n_frames or not np.all(np.isfinite(stamps)):
            return None
        times = np.asarray(stamps, dtype=np.float64)
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

    def _recorded_times(self) -> list[float] | None:
        """A umvd-live recording's frame times, from each page's `FRAME_TAG` (a killed one's OME-XML
        has no per-plane times, nor its last frames)."""
        series = self._series[self.series_index]
        rows = [json.loads(series.recorded_page(p.plane).tags[FRAME_TAG].value) for p in self.planes]
        # as `FrameInfo.time`: the acquisition's time, else the time received
        times = [row.get("t") if row.get("t") is not None else row.get("t_received") for row in rows]
        return None if any(t is None for t in times) else [float(t) for t in times]

    def _ome_times(self) -> list[float] | None:
        by_plane: dict[tuple[int, ...], float] = {}  # (series, t, z, c)
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

    def __enter__(self) -> Self:
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
        self.path = Path(path)
        if not self.path.is_dir():
            raise MovieError(f"{self.path}: no such OME-Zarr store")
        try:
            self._setup(series, channel, group)
        except (RecordingFormatError, RuntimeError) as exc:  # RuntimeError: the zarr extra is missing
            raise MovieError(str(exc)) from None
        except MovieError:
            raise
        except Exception as exc:  # noqa: BLE001 - malformed metadata raises many kinds; the user gets one line
            raise _unreadable(self.path, "an OME-Zarr movie", exc) from None

    def _setup(self, series: int | None, channel: int | None, group: str) -> None:
        images = open_ome_zarr(self.path)
        if series is not None and not 0 <= series < len(images):
            raise MovieError(f"{self.path}: series {series} does not exist ({len(images)} series)")
        chosen = [series] if series is not None else list(range(len(images)))
        self._series: dict[int, OmeZarrSeries] = {i: images[i] for i in chosen}
        self.series_info = {i: SeriesInfo(images[i].axes, images[i].shape, _pixel_type(self.path, images[i].dtype),
                                          _zarr_one_time_point(images[i].axes, images[i].shape))
                            for i in chosen}
        positions = len(images) > 1
        planes: list[Plane] = []
        for i in chosen:
            image = images[i]
            lead_axes, lead_shape = image.axes[:-2], image.shape[:-2]
            n_channels = lead_shape[lead_axes.index("C")] if "C" in lead_axes else 1
            if channel is not None and not 0 <= channel < n_channels:
                raise MovieError(f"{self.path}: channel {channel} does not exist ({n_channels} channels)")
            names, parts = _channel_labels(image.channel_names, n_channels)
            for flat in range(int(np.prod(lead_shape, dtype=np.int64))):
                ax = {a: int(k) for a, k in zip(lead_axes, np.unravel_index(flat, lead_shape))}
                if channel is not None and ax.get("C", 0) != channel:
                    continue
                index: dict[str, int] = {"p": i} if positions else {}
                index.update({a.lower(): k for a, k in ax.items() if a != "T"})
                c = index.get("c")
                name = names[c] if c is not None else None
                if c is not None and n_channels == 1:
                    index.pop("c")  # one channel (as umvd-live records a stream): no channel axis
                axes = StreamAxes(group, index, channel=name, position=image.name if positions else None,
                                  channel_part=parts[c] if c is not None and "c" in index else None)
                planes.append(Plane(i, flat, ax.get("T", 0), axes))
        self.planes = sorted(planes, key=lambda p: (p.time, p.series))
        self.n_frames = len(self.planes)
        if self.n_frames == 0:
            raise MovieError(f"{self.path}: no frames")
        self.streams = list(dict.fromkeys(p.axes.name for p in self.planes))
        first = self.series_info[chosen[0]]
        self.shape, self.dtype = first.frame_shape, first.dtype
        self.series_index = chosen[0]

    def _index(self, plane: Plane) -> tuple[int, ...]:
        image = self._series[plane.series]
        return tuple(int(k) for k in np.unravel_index(plane.plane, image.shape[:-2]))

    def file_meta(self, i: int) -> dict[str, Any]:
        """Plane ``i``'s acquisition metadata: the store's pixel size, interval, its channel's
        name and start."""
        plane = self.planes[i]
        image = self._series[plane.series]
        return image.acquisition_meta(dict(zip(image.axes, self._index(plane))).get("C"))

    def acquisition_meta(self, i: int) -> dict[str, Any]:
        """Plane ``i``'s protocol ``meta``: `file_meta` and the plane's place in the acquisition."""
        plane = self.planes[i]
        return {**self.file_meta(i), **plane.axes.meta(plane.time)}

    def __len__(self) -> int:
        return self.n_frames

    def frame(self, i: int) -> np.ndarray:
        """Plane ``i`` (0-based, acquisition order) as a 2-D array; reads only that plane."""
        plane = self.planes[i]
        image = self._series[plane.series].read(self._index(plane))
        dtype = self.series_info[plane.series].dtype
        return image if image.dtype == dtype else image.astype(dtype)

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _zarr_one_time_point(axes: str, shape: tuple[int, ...]) -> bool:
    """Whether an OME-Zarr image is one time point of several planes: a ``t`` axis of length 1
    (OME-Zarr names every axis; a store without ``t`` says nothing about time, as an unlabelled
    TIFF stack, and a 3-D one stays a movie: `stream_planes`)."""
    return "T" in axes and shape[axes.index("T")] == 1 and int(np.prod(shape[:-2], dtype=np.int64)) > 1


def open_movie(path: str | Path, *, series: int | None = None, channel: int | None = None,
               group: str = "cam0") -> TiffMovie | ZarrMovie:
    """The reader for ``path``: `ZarrMovie` for an OME-Zarr store (``.zarr``), else `TiffMovie`."""
    cls = ZarrMovie if is_zarr_path(path) else TiffMovie
    return cls(path, series=series, channel=channel, group=group)


# ---------------------------------------------------------------------- one stream as a movie


def file_group(path: str | Path) -> str:
    """The group of a file's streams when it is denoised: its name (``mouse.ome.tif`` -> ``mouse``)
    made fit for a stream name, so an output's provenance names the stream it came from."""
    return name_part(recording_stem(path)) or "movie"


def _channel_labels(names: list[str] | None, n_channels: int) -> tuple[list[str | None], list[str]]:
    """Each channel's name as the file gives it (None where it gives none) and its part of the
    stream names (`channel_parts`: two channels named alike still get streams of their own)."""
    given = [names[i] if names and i < len(names) else None for i in range(n_channels)]
    return given, channel_parts(given)


def stream_planes(movie: TiffMovie | ZarrMovie) -> dict[str, list[int]]:
    """Each stream's planes (indices into ``movie.planes``, in time order), by short name
    (`StreamAxes.short_name`: ``GCaMP``, ``p1.c0.z2``; "" for a file of one plain stream).

    One exception to the stream rule: a single 3-D stack without a time axis (``ZYX``, ``CYX``)
    is read as one movie along its one axis, as it always was: Fiji saves a time-lapse as slices
    (``Z``) and tifffile calls the planes of an unlabelled OME or ImageJ stack channels, so such
    a file is far more often a movie than a z-stack. A warning says so. Not where the file names
    its channels, each its own (``CYX`` with DAPI, GFP, RFP): that is a snapshot of channels,
    whose levels and content differ, never one movie; nor where it says it holds one time point
    (`SeriesInfo.one_time_point`: an OME ``SizeT="1"`` z-stack or labelled snapshot, an
    OME-Zarr ``t`` axis of length 1)."""
    by_name: dict[str, list[int]] = {}
    for i, plane in enumerate(movie.planes):
        by_name.setdefault(plane.axes.short_name, []).append(i)
    (info, *others) = movie.series_info.values()
    names = [movie.planes[p[0]].axes.channel for p in by_name.values()]
    named_channels = info.axes[:1] == "C" and all(names) and len(set(names)) == len(names)
    if (len(by_name) > 1 and not others and len(info.axes) == 3 and all(len(p) == 1 for p in by_name.values())
            and not named_channels and not info.one_time_point):
        _say_planes_are_frames(str(movie.path), len(movie.planes), info.axes[0])
        return {"": list(range(len(movie.planes)))}
    return by_name


@functools.cache
def _say_planes_are_frames(path: str, planes: int, axis: str) -> None:
    """The warning of `stream_planes`, once per file: a file is opened to list its streams, to
    check each and to read it."""
    log.warning("%s: no time axis; its %d planes along %s are read as the movie's frames", path, planes, axis)


def movie_streams(path: str | Path) -> list[str]:
    """The short names of a movie file's streams (`stream_planes`), in acquisition order; a file
    whose every stream is one frame (no movie: `MovieFrames`' error) raises MovieError."""
    with open_movie(path, group=file_group(path)) as movie:
        by_name = stream_planes(movie)
        _check_movie(Path(path), movie, by_name)
        return list(by_name)


def _check_movie(path: Path, movie: TiffMovie | ZarrMovie, by_name: dict[str, list[int]]) -> None:
    """MovieError when no stream of the file has more than one frame: an image, or planes of one
    time point (a z-stack, a snapshot of channels), with nothing to denoise over time."""
    if not all(len(planes) == 1 for planes in by_name.values()):
        return
    info = next(iter(movie.series_info.values()))
    if len(by_name) == 1:
        got = f"one {info.frame_shape[0]}×{info.frame_shape[1]} image"
    elif any(i.one_time_point for i in movie.series_info.values()):
        got = (f"{len(by_name)} streams of one frame each: the file says it has one time point (axes {info.axes}), "
               "a z-stack or a snapshot of channels, so there is nothing to denoise over time")
    else:
        got = f"{len(by_name)} streams of one frame each (axes {info.axes}: no time axis)"
    raise MovieError(f"{path}: expected a T×H×W movie, got {got}")


class MovieFrames:
    """One stream of a movie file, as a T×H×W movie read by spans: ``read(start, stop)`` reads only
    those frames (TIFF pages, Zarr chunks), so a task that handles one span of a long movie
    (`umvd-live batch`'s chunks) needs memory for that span only. Every check is made, with a
    one-line `MovieError`, before any pixel is read.

    ``stream`` is a short name (`movie_streams`); None takes a file's only stream, and refuses a
    file of several with their names. Frames of integers wider than 16 bits or of float64 are
    read as float32."""

    def __init__(self, path: str | Path, stream: str | None = None):
        self.path = Path(path)
        self._movie = open_movie(self.path, group=file_group(self.path))
        try:
            self._setup(stream)
        except BaseException:
            self.close()
            raise

    def _setup(self, stream: str | None) -> None:
        movie = self._movie
        by_name = stream_planes(movie)
        self.streams = list(by_name)
        _check_movie(self.path, movie, by_name)
        if stream is None:
            if len(by_name) > 1:
                raise MovieError(f"{self.path}: {len(by_name)} streams ({describe_streams(self.streams)}): "
                                 "name the ones to denoise (--stream)")
            stream = self.streams[0]
        elif stream not in by_name:
            raise MovieError(f"{self.path}: no stream {stream!r}; its streams: {describe_streams(self.streams)}")
        self.stream = stream
        self._planes = by_name[stream]
        plane = movie.planes[self._planes[0]]
        self.axes = plane.axes
        info = movie.series_info[plane.series]
        self.dtype = info.dtype
        h, w = info.frame_shape
        t = len(self._planes)
        problem = (f"a movie needs at least 2 frames to be denoised, got {t} in stream {stream}" if t < 2 else
                   f"frames of {h}×{w} are too small (4×4 at least)" if min(h, w) < 4 else None)
        if problem:
            raise MovieError(f"{self.path}: {problem}")
        self.shape = (t, h, w)

    @property
    def several(self) -> bool:
        """Whether the file holds more than this one stream (its outputs are then named by stream)."""
        return len(self.streams) > 1

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames [start, stop) of the stream, (stop - start)×H×W."""
        start, stop, _ = slice(start, stop).indices(len(self))
        stop = max(start, stop)
        try:
            frames = [self._movie.frame(i) for i in self._planes[start:stop]]
        except Exception as exc:  # noqa: BLE001 - a damaged file raises many kinds; the user gets one line
            raise MovieError(f"{self.path}: frames {start}-{stop} not readable ({type(exc).__name__}: {exc})") from None
        out = np.stack(frames) if frames else np.empty((0, *self.shape[1:]), self.dtype)
        if out.dtype.itemsize == 8 or out.dtype.kind in "iu" and out.dtype.itemsize > 2:
            out = out.astype(np.float32)
        return out

    def frame_meta(self, t: int) -> dict[str, Any]:
        """Frame ``t``'s acquisition metadata as protocol ``meta`` keys, as a replay of the file
        would send them and as a denoised output keeps them: pixel size, interval, channel, start,
        and for a stream of a file of several its place in the acquisition (``group``, ``index``,
        ``channel``, ``position``: `read_acquisition` puts the outputs back together)."""
        i = self._planes[t]
        return self._movie.acquisition_meta(i) if self.several else self._movie.file_meta(i)

    def close(self) -> None:
        self._movie.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe_streams(names: list[str]) -> str:
    """``GCaMP, tdTomato``: a file's streams for a message."""
    return ", ".join(names) if all(names) else "one, unnamed (a plain movie)"


def read_movie(path: str | Path, stream: str | None = None) -> np.ndarray:
    """One stream of a movie file (its only one by default), all of it, as T×H×W
    (`MovieFrames`'s checks, errors and dtype rule)."""
    with MovieFrames(path, stream) as movie:
        return movie.read(0, len(movie))
