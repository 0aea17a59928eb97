"""A recording read back as the acquisition it came from: one TCZYX array per position.

The recorder writes one file per stream, and a multi-dimensional acquisition has a stream per
position, channel and z plane (``cam0.p0.GCaMP.z2``, docs/recording.md). Each file names its
place in the acquisition in its OME-XML (`AcquisitionCoordinates`), and each frame its time point
(``meta.index.t``). `read_acquisition` finds the files of one recording from its base path, reads
each one whole with `read_recording` (every linked page: a killed recording reads up to its last
frame) and puts every frame where the acquisition took it, so that a multi-channel, multi-plane
recording opens as a hyperstack in one call::

    from umvd_live.recording.acquisition import read_acquisition
    stacks = read_acquisition("rec.ome.tif")        # {"cam0.p0": PositionStack, ...}
    s = stacks["cam0.p0"]
    s.data.shape, s.channels                        # (T, C, Z, Y, X), ("GCaMP", "mCherry")
    napari.Viewer().add_image(s.data, channel_axis=1, name=list(s.channels))

A recording of OME-Zarr stores (``serve --record rec.ome.zarr``: one store per stream, the same
provenance) is read the same way, ``read_acquisition("rec.ome.zarr")``.

Everything is read into memory: a position takes its frames' bytes (denoised: float32).
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from umvd_live.recording.ometiff import (
    FORMAT,
    STREAM_AXES,
    AcquisitionCoordinates,
    FrameInfo,
    RecordingFormatError,
    read_provenance,
    read_recording,
)
from umvd_live.recording.omezarr import is_zarr_path, read_zarr_provenance, read_zarr_recording
from umvd_live.recording.session import RecordingError, recording_stem, stream_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PositionStack:
    """Every channel and z plane of one position of a recording, as one (T, C, Z, Y, X) array."""

    axes: ClassVar[str] = "TCZYX"

    key: str  # "cam0.p0": GROUP[.pP][.gG] (and any further axis), or an older file's stream name
    position: str | None  # the position's name, when the producer sent one
    data: np.ndarray  # (T, C, Z, Y, X); 0 where `present` is False
    present: np.ndarray  # (T, C, Z) bool: whether a frame was recorded in that slot
    times: np.ndarray  # (T, C, Z) float64: each frame's own acquisition time in s (NaN: none)
    channels: tuple[str, ...]  # channel names along C ("c1" if unnamed; "" without a channel axis)
    c_indices: tuple[int | None, ...]  # the acquisition's channel index of each C slot
    z_indices: tuple[int | None, ...]  # the acquisition's z index of each Z slot
    t_indices: tuple[int, ...]  # the acquisition's time point of each T slot (see read_acquisition)
    streams: dict[tuple[int, int], str]  # (C slot, Z slot) -> stream name
    files: dict[str, tuple[Path, ...]]  # stream name -> its files
    pixel_size_um: float | None


@dataclass
class _StreamFrames:
    """One stream's frames, all its files read."""

    name: str
    coordinates: AcquisitionCoordinates | None
    frames: np.ndarray  # (n, Y, X)
    infos: list[FrameInfo]
    files: tuple[Path, ...]
    pixel_size_um: float | None

    @property
    def position_key(self) -> str:
        return self.coordinates.position_key if self.coordinates else self.name


def _format(base: Path) -> tuple[str, Callable[..., dict[str, Any]], Callable[..., tuple]]:
    """The file name pattern, provenance reader and reader of the format ``base`` names (the
    recorder's switch: ``.ome.zarr`` stores, else OME-TIFF files)."""
    stem = glob.escape(recording_stem(base))
    if is_zarr_path(base):
        return stem + "_*.ome.zarr", read_zarr_provenance, read_zarr_recording
    return stem + "_*.ome.tif", read_provenance, read_recording


def _named_for(base: Path, path: Path, prov: dict[str, Any]) -> bool:
    """Whether ``path`` bears a name given to a file of its provenance's stream and kind with base
    path ``base`` (`stream_path`, any part): the recorder names it by the stream, `umvd-live
    denoise` by the stream's name without its group (``den_GCaMP.ome.tif`` for ``mouse.GCaMP``,
    `wire.axes.StreamAxes.short_name`). The glob alone also matches other recordings: ``exp_*``
    takes in ``exp_ctrl_cam0.ome.tif``, a file of ``exp_ctrl.ome.tif``."""
    stream, group = prov.get("stream"), prov.get("group")
    if not isinstance(stream, str):
        return False
    names = [stream]
    if isinstance(group, str) and stream.startswith(group + "."):
        names.append(stream[len(group) + 1:])
    name = os.path.normcase(path.name)  # as the glob matched it: without case on Windows
    parts = [1, *(int(k) for k in re.findall(r"-part(\d+)", path.name))]
    raw = prov.get("kind") == "raw"
    for short in names:
        try:
            if any(os.path.normcase(stream_path(base, short, raw=raw, part=k).name) == name for k in parts):
                return True
        except RecordingError:  # a name the recorder never gives a stream
            continue
    return False


def recording_files(base: str | os.PathLike, *, kind: str = "denoised",
                    recording_id: str | None = None) -> list[Path]:
    """The files of one recording made with base path ``base`` (``rec.ome.tif``, or
    ``rec.ome.zarr`` for its OME-Zarr stores), of ``kind``
    ``"denoised"`` or ``"raw"``, in name order.

    The files are recognised by their OME provenance, and by their names as far as the name of a
    file of that stream and kind is fixed (`stream_path`, `umvd-live denoise`'s outputs
    included): a recording whose base name starts with this one's (``rec_ctrl.ome.tif`` for
    ``rec.ome.tif``) is never taken in. They are grouped by the
    recording session's ``recording_id``: a second recording into the same base path gets part
    numbers (``rec_cam0-part2.ome.tif``) and is never mixed with the first. When the files of
    more than one recording match, ``recording_id`` must say which one (the error lists them).
    Files a kill left before their first frame hold nothing and are left out.
    """
    base = Path(base)
    pattern, provenance_of, _ = _format(base)
    by_recording: dict[str | None, list[Path]] = {}
    started: dict[str | None, str] = {}
    for path in sorted(base.parent.glob(pattern)):
        try:
            prov = provenance_of(path)
        except (OSError, RecordingFormatError, ValueError) as exc:
            log.debug("%s: not a readable recording (%s)", path, exc)
            continue
        if prov.get("format") != FORMAT or prov.get("kind") != kind:
            continue  # another kind, or a file of no recording (killed before its first frame)
        if not _named_for(base, path, prov):
            continue  # a file of another recording whose base name starts with this one's
        rid = prov.get("recording_id")
        by_recording.setdefault(rid, []).append(path)
        started[rid] = min(started.get(rid, "~"), str(prov.get("started_utc")))
    if recording_id is not None:
        if recording_id not in by_recording:
            raise FileNotFoundError(f"no {kind} file of recording {recording_id!r} next to {base}")
        return by_recording[recording_id]
    if not by_recording:
        raise FileNotFoundError(f"no {kind} recording files {base.parent / pattern}")
    if len(by_recording) > 1:
        listing = "; ".join(f"{rid}: {len(files)} files from {started[rid]}"
                            for rid, files in sorted(by_recording.items(), key=lambda kv: started[kv[0]]))
        raise ValueError(f"{base} holds the files of {len(by_recording)} recordings ({listing}); "
                         "pass recording_id=")
    return next(iter(by_recording.values()))


def read_acquisition(base: str | os.PathLike, *, kind: str = "denoised",
                     recording_id: str | None = None) -> dict[str, PositionStack]:
    """Every position of a recording as a `PositionStack`, keyed ``GROUP[.pP][.gG]`` (a further
    axis of the acquisition, besides t, p, g, c and z, makes positions of its own the same way).

    ``base`` is the path the recording was started with (``rec.ome.tif``, ``rec.ome.zarr``); ``kind`` picks the
    denoised files or the raw copies; ``recording_id`` picks one recording where several share
    the base path (`recording_files`).

    C holds the channels and Z the planes the position's files hold, in the acquisition's order
    (``axis.c``, ``axis.z``). T is the acquisition's time points ``meta.index.t``, from the first
    to the last one recorded, so that a frame lost upstream on one stream leaves its slot empty
    (``present`` False) and does not shift that stream against the others. Where a stream's
    frames carry no time point, or their time points do not increase (a restarted producer), T is
    the frame order of each stream of that position instead. A stream whose frames changed shape during the recording,
    or two streams of one position with different frame shapes, cannot share an array: that
    raises ValueError, and `read_recording` reads such files one by one. Files recorded without
    acquisition coordinates (older producers) each become a position of one channel and plane,
    keyed by their stream name.
    """
    streams: dict[str, list[tuple[Path, np.ndarray, list[FrameInfo], dict[str, Any]]]] = {}
    _, _, read = _format(Path(base))
    for path in recording_files(base, kind=kind, recording_id=recording_id):
        frames, infos, prov = read(path)
        if infos:
            streams.setdefault(prov["stream"], []).append((path, frames, infos, prov))
    positions: dict[str, list[_StreamFrames]] = {}
    for name, parts in streams.items():
        parts.sort(key=lambda part: (str(part[3].get("started_utc")), part[0].name))
        shapes = {part[1].shape[1:] for part in parts}
        if len(shapes) > 1:
            raise ValueError(f"stream {name} changed its frame shape during the recording "
                             f"({sorted(shapes)}): read its files with read_recording")
        stream = _StreamFrames(
            name=name,
            coordinates=AcquisitionCoordinates.from_provenance(parts[0][3]),
            frames=np.concatenate([part[1] for part in parts]) if len(parts) > 1 else parts[0][1],
            infos=[info for part in parts for info in part[2]],
            files=tuple(part[0] for part in parts),
            pixel_size_um=parts[0][3].get("pixel_size_um"))
        positions.setdefault(stream.position_key, []).append(stream)

    def order(key: str) -> tuple:
        c = positions[key][0].coordinates
        if c is None:
            return (key, [])
        return (c.group, sorted((STREAM_AXES.index(k) if k in STREAM_AXES else len(STREAM_AXES), k, v)
                                for k, v in c.index.items() if k not in ("c", "z")))

    return {key: _assemble(key, positions[key]) for key in sorted(positions, key=order)}


def _axis_order(value: int | None) -> tuple[bool, int]:
    return (value is not None, value if value is not None else 0)


def _assemble(key: str, streams: list[_StreamFrames]) -> PositionStack:
    shapes = {s.frames.shape[1:] for s in streams}
    if len(shapes) > 1:
        raise ValueError(f"position {key}: its streams' frames differ in shape ({sorted(shapes)})")
    (height, width), = shapes

    def axis(s: _StreamFrames, name: str) -> int | None:
        return getattr(s.coordinates, name) if s.coordinates else None

    c_values = sorted({axis(s, "c") for s in streams}, key=_axis_order)
    z_values = sorted({axis(s, "z") for s in streams}, key=_axis_order)
    channels = []
    for c in c_values:
        names = [s.coordinates.channel for s in streams if axis(s, "c") == c and s.coordinates
                 and s.coordinates.channel is not None]
        channels.append(names[0] if names else f"c{c}" if c is not None else "")

    slot_of: dict[tuple[int, int], _StreamFrames] = {}
    for s in streams:
        slot = (c_values.index(axis(s, "c")), z_values.index(axis(s, "z")))
        if slot in slot_of:
            raise ValueError(f"position {key}: streams {slot_of[slot].name} and {s.name} have the "
                             f"same channel and plane")
        slot_of[slot] = s

    # the acquisition's time points where every frame has one, increasing; else frame order
    t_of: dict[str, list[int]] = {}
    for s in streams:
        ts = [i.t_index for i in s.infos if i.t_index is not None]
        if len(ts) < len(s.infos) or not all(a < b for a, b in itertools.pairwise(ts)):
            t_of = {s.name: list(range(len(s.infos))) for s in streams}
            break
        t_of[s.name] = ts
    first = min(ts[0] for ts in t_of.values())
    size_t = max(ts[-1] for ts in t_of.values()) - first + 1

    dtype = np.result_type(*(s.frames.dtype for s in streams))
    data = np.zeros((size_t, len(c_values), len(z_values), height, width), dtype)
    present = np.zeros((size_t, len(c_values), len(z_values)), bool)
    times = np.full(present.shape, np.nan)
    for (ci, zi), s in slot_of.items():
        slots = np.asarray(t_of[s.name]) - first
        data[slots, ci, zi] = s.frames
        present[slots, ci, zi] = True
        times[slots, ci, zi] = [np.nan if i.t is None else i.t for i in s.infos]
    named = [s.coordinates.position for s in streams if s.coordinates and s.coordinates.position]
    return PositionStack(
        key=key, position=named[0] if named else None, data=data, present=present, times=times,
        channels=tuple(channels), c_indices=tuple(c_values), z_indices=tuple(z_values),
        t_indices=tuple(range(first, first + size_t)),
        streams={slot: s.name for slot, s in sorted(slot_of.items())},
        files={s.name: s.files for s in sorted(streams, key=lambda s: s.name)},
        pixel_size_um=next((s.pixel_size_um for s in streams if s.pixel_size_um), None))
