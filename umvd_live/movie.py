"""Reading a movie file for `umvd-live denoise`, with one clear error for every way it can be wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


class MovieError(ValueError):
    """An input movie that cannot be denoised; the message is one line meant for the user."""


def read_movie(path: str | Path) -> np.ndarray:
    """A T×H×W movie from a TIFF / OME-TIFF / ImageJ hyperstack (singleton axes squeezed)."""
    path = Path(path)
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
