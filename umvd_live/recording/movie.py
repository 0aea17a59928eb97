"""Reading a movie file for `umvd-live denoise`, with one clear error for every way it can be wrong,
and its acquisition metadata (pixel size, interval, channel, start), which the output keeps."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Self

import numpy as np
import tifffile

from umvd_live.recording.omezarr import (
    OmeZarrSeries,
    RecordingFormatError,
    is_zarr_path,
    open_ome_zarr,
)
from umvd_live.wire.acqmeta import AcquisitionMeta

log = logging.getLogger(__name__)


class MovieError(ValueError):
    """An input movie that cannot be denoised; the message is one line meant for the user."""


def read_movie(path: str | Path) -> np.ndarray:
    """A T×H×W movie from a TIFF / OME-TIFF / ImageJ hyperstack or an OME-Zarr store (its first
    image; singleton axes squeezed): all of it, with `MovieFrames`'s checks and errors."""
    with MovieFrames(path) as movie:
        return movie.read(0, len(movie))


def read_movie_metadata(path: str | Path) -> dict[str, Any]:
    """The movie's acquisition metadata as protocol ``meta`` keys (`umvd_live.wire.acqmeta`): what a
    replay of the file would send with each frame, and what `umvd-live denoise` writes into its
    output's OME. Empty when the file says nothing (or is not a readable TIFF: `read_movie` says
    why)."""
    if is_zarr_path(path):
        return _zarr_series(Path(path)).acquisition_meta(0)
    try:
        with tifffile.TiffFile(path) as tif:
            return AcquisitionMeta.from_tiff(tif).to_meta()
    except Exception as exc:  # optional: an unreadable file is read_movie's to report
        log.warning("%s: acquisition metadata not read (%s: %s)", path, type(exc).__name__, exc)
        return {}


def _zarr_series(path: Path) -> OmeZarrSeries:
    """The first image of an OME-Zarr store (a multi-position store: its first position)."""
    if not path.is_dir():
        raise MovieError(f"{path}: no such OME-Zarr store")
    try:
        return open_ome_zarr(path)[0]
    except (RecordingFormatError, RuntimeError) as exc:
        raise MovieError(str(exc)) from None


class MovieFrames:
    """A movie opened to read spans of frames: ``read(start, stop)`` equals
    ``read_movie(path)[start:stop]`` but reads only those frames (the TIFF pages, the Zarr chunks),
    so a task that handles one span of a long movie (`umvd-live batch`'s chunks) needs memory for
    that span only. The same checks and errors as `read_movie`, made before any pixel is read."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        self._tif: tifffile.TiffFile | None = None
        if is_zarr_path(path):
            series = _zarr_series(path)
            self._array: Any = series.array
        else:
            if not path.is_file():
                raise MovieError(f"{path}: no such file")
            try:
                self._tif = tifffile.TiffFile(path)
                series = self._tif.series[0]
            except Exception as exc:  # noqa: BLE001 - as read_movie: the user gets one line
                self.close()
                raise MovieError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
            self._array = series
        full = tuple(int(n) for n in series.shape)
        self._axes = [i for i, n in enumerate(full) if n != 1]  # read_movie squeezes the others
        dtype = np.dtype(series.dtype)
        if len(self._axes) != 3:
            self.close()
            raise MovieError(f"{path}: expected a T×H×W movie, got shape {full} ({series.axes})")
        t, h, w = (full[i] for i in self._axes)
        problem = (f"unsupported pixel type {dtype} (integer or float pixels expected)"
                   if dtype.kind not in "uif" or dtype.itemsize > 8 else
                   f"a movie needs at least 2 frames to be denoised, got {t}" if t < 2 else
                   f"frames of {h}×{w} are too small (4×4 at least)" if min(h, w) < 4 else None)
        if problem:
            self.close()
            raise MovieError(f"{path}: {problem}")
        self.shape = (t, h, w)
        self._full = full
        # a TIFF of one page per frame (every microscope format) reads pages; else the whole series
        self._pages = self._tif is not None and len(series.pages) == t

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames [start, stop) as `read_movie` returns them (its dtype rule)."""
        start, stop, _ = slice(start, stop).indices(len(self))
        stop = max(start, stop)
        try:
            if self._tif is None:  # OME-Zarr: the span's chunks
                index = [0] * len(self._full)
                for axis, span in zip(self._axes, (slice(start, stop), slice(None), slice(None)), strict=True):
                    index[axis] = span
                frames = np.asarray(self._array[tuple(index)])
            elif self._pages:
                frames = self._tif.asarray(key=range(start, stop), series=0) if stop > start else \
                    np.empty((0, *self.shape[1:]), self._array.dtype)
            else:  # frames are not pages (a rare layout): the whole series, cut
                frames = np.squeeze(self._array.asarray())[start:stop]
        except Exception as exc:  # noqa: BLE001 - a damaged file raises many kinds; the user gets one line
            raise MovieError(f"{self.path}: frames {start}-{stop} not readable ({type(exc).__name__}: {exc})") from None
        frames = frames.reshape(stop - start, *self.shape[1:])
        if frames.dtype.itemsize == 8 or frames.dtype.kind == "i" and frames.dtype.itemsize > 2:
            frames = frames.astype(np.float32)
        return frames

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
