"""Reading a movie file for `umvd-live denoise`, with one clear error for every way it can be wrong,
and its acquisition metadata (pixel size, interval, channel, start), which the output keeps."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from umvd_live.acqmeta import AcquisitionMeta
from umvd_live.zarrfile import (
    OmeZarrSeries,
    RecordingFormatError,
    is_zarr_path,
    open_ome_zarr,
)

log = logging.getLogger(__name__)


class MovieError(ValueError):
    """An input movie that cannot be denoised; the message is one line meant for the user."""


def read_movie(path: str | Path) -> np.ndarray:
    """A T×H×W movie from a TIFF / OME-TIFF / ImageJ hyperstack or an OME-Zarr store (its first
    image; singleton axes squeezed)."""
    path = Path(path)
    if is_zarr_path(path):
        series = _zarr_series(path)
        movie = np.asarray(series.array[...])
    else:
        if not path.is_file():
            raise MovieError(f"{path}: no such file")
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                movie = series.asarray()
        except Exception as exc:
            raise MovieError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
    movie = np.squeeze(movie)
    if movie.ndim != 3:
        raise MovieError(f"{path}: expected a T×H×W movie, got shape {tuple(series.shape)} ({series.axes})")
    if movie.dtype.kind not in "uif" or movie.dtype.itemsize > 8:
        raise MovieError(f"{path}: unsupported pixel type {movie.dtype} (integer or float pixels expected)")
    if movie.shape[0] < 2:
        raise MovieError(f"{path}: a movie needs at least 2 frames to be denoised, got {movie.shape[0]}")
    if min(movie.shape[1:]) < 4:
        raise MovieError(f"{path}: frames of {movie.shape[1]}×{movie.shape[2]} are too small (4×4 at least)")
    if movie.dtype.itemsize == 8 or movie.dtype.kind == "i" and movie.dtype.itemsize > 2:
        movie = movie.astype(np.float32)
    return movie


def read_movie_metadata(path: str | Path) -> dict[str, Any]:
    """The movie's acquisition metadata as protocol ``meta`` keys (`umvd_live.acqmeta`): what a
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
