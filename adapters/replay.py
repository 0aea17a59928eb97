"""Replay a recorded movie as a live stream: rehearse a session, test on real data.

Reads every format `umvd_live.recording.movie` reads (TIFF, OME-TIFF, ImageJ, ScanImage,
Micro-Manager NDTiff/MMStack, OME-Zarr: the reader `umvd-live denoise` uses too) one plane at a
time, a stream per (position, channel, plane), and paces them either at a fixed rate or at the
file's own frame timestamps: OME ``Plane DeltaT``, Micro-Manager ``ElapsedTime-ms`` (per-image
metadata of NDTiff and MMStack files), ScanImage ``frameTimestamps_sec``. Optionally loops.

The schedule (`replay_schedule`) is pure: which file frame goes out at which offset from the start;
`replay` only sleeps until each due time and publishes. A late frame goes out at once and the next
keeps its own due time, so lateness never accumulates.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from umvd_live.adapters.publisher import FramePublisher, sleep_unless_stopped
from umvd_live.recording.movie import MovieError, TiffMovie, ZarrMovie, open_movie
from umvd_live.wire.axes import StreamNumbering
from umvd_live.wire.protocol import SUPPORTED_DTYPES


class ReplayError(MovieError):
    """A readable file that cannot be replayed as asked, with the reason in words."""


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
    dropped: int  # refused by the publisher (queue full), or sent while no daemon was subscribed
    loops: int  # passes started over the file
    late_max_s: float  # worst lateness of a frame against its due time
    elapsed_s: float


def open_replay(config: ReplayConfig, *, group: str = "cam0") -> TiffMovie | ZarrMovie:
    """``config``'s file opened by the one movie reader (`open_movie`) and checked for what a
    replay needs: pixel types protocol v1 carries and, at file timing, increasing timestamps.
    Raises MovieError (ReplayError for those two)."""
    movie = open_movie(config.path, series=config.series, channel=config.channel, group=group)
    try:
        for info in movie.series_info.values():
            if info.dtype.str not in SUPPORTED_DTYPES:
                raise ReplayError(
                    f"{config.path}: pixel type {info.dtype} is not one the stream protocol carries "
                    f"({', '.join(sorted(SUPPORTED_DTYPES))}); convert the file first"
                )
        if config.file_timing and movie.timestamps() is None:
            raise ReplayError(
                f"{config.path}: this {movie.kind} file carries no increasing per-frame timestamps (OME "
                "DeltaT, Micro-Manager ElapsedTime-ms, ScanImage frameTimestamps_sec); drop --file-timing "
                "to replay it at --rate"
            )
    except BaseException:
        movie.close()
        raise
    return movie


def replay(
    publisher: FramePublisher,
    config: ReplayConfig,
    *,
    stop: threading.Event | None = None,
    on_frame: Callable[[ScheduledFrame], None] | None = None,
) -> ReplayStats:
    """Publish the file's frames on their schedule until it ends, ``max_frames`` or ``stop``: one
    stream per (position, channel, plane) of the file (`open_replay`), named from the publisher's
    stream, each numbered from 0; at the end each stream is ended (protocol `StreamEnd`)."""
    with open_replay(config, group=publisher.stream) as movie:
        timestamps = None
        if config.file_timing:
            timestamps = movie.timestamps()
            assert timestamps is not None, "open_replay checked them"
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
                    if sleep_unless_stopped(wait, stop):
                        break
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
