"""Recording and reading: denoised (and raw) frames -> OME-TIFF or OME-Zarr files, and movie files in
(one reader for `acquire replay`, `denoise` and `batch`)."""

from umvd_live.recording.acquisition import read_acquisition
from umvd_live.recording.movie import (
    MovieError,
    MovieFrames,
    TiffMovie,
    ZarrMovie,
    movie_streams,
    open_movie,
    read_movie,
)
from umvd_live.recording.ometiff import (
    FrameInfo,
    Provenance,
    RecordingFile,
    RecordingFormatError,
    read_provenance,
    read_recording,
    write_movie,
)
from umvd_live.recording.omezarr import ZarrRecording, is_zarr_path, read_zarr_recording, write_zarr_movie
from umvd_live.recording.session import RecordingError, RecordingRequest, RecordingSession
from umvd_live.recording.spillqueue import QueueClosed, QueueOverflow, SpillQueue

__all__ = [
    "FrameInfo",
    "MovieError",
    "MovieFrames",
    "Provenance",
    "QueueClosed",
    "QueueOverflow",
    "RecordingError",
    "RecordingFile",
    "RecordingFormatError",
    "RecordingRequest",
    "RecordingSession",
    "SpillQueue",
    "TiffMovie",
    "ZarrMovie",
    "ZarrRecording",
    "is_zarr_path",
    "movie_streams",
    "open_movie",
    "read_acquisition",
    "read_movie",
    "read_provenance",
    "read_recording",
    "read_zarr_recording",
    "write_movie",
    "write_zarr_movie",
]
