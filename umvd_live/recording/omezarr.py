"""OME-Zarr recordings (``*.ome.zarr``): appendable along T, readable after ``kill -9``.

The alternative to the default crash-safe OME-TIFF (`umvd_live.recording.ometiff`), for labs that work
in OME-Zarr. One store per stream, as one file per stream for TIFF; the same provenance, the same
per-frame metadata, the same API (`ZarrRecording` mirrors `RecordingFile`).

Written with tensorstore (the zarr v3 driver), the OME-Zarr 0.5 metadata from yaozarrs' models;
why not ome-writers or acquire-zarr is measured in docs/recording.md (`tools/zarr_writers.py`):
both declare a frame in the array's shape before its chunk is on disk and ome-writers rewrites
the array metadata at every frame. Here:

* Layout: an OME-Zarr 0.5 image, ``<store>/zarr.json`` (``ome.multiscales`` with axes
  ``t, c, y, x``, one channel, its name in ``omero``; our provenance under ``umvd-live``), one
  array ``<store>/0`` chunked one frame per chunk, uncompressed, so that a frame is one file,
  written once.
* `append` starts the frame's chunk write (tensorstore writes a chunk to a temporary file,
  fsyncs and renames it: a reader never sees half a chunk); when the chunk is on disk, the
  frame's metadata goes as one JSON line into ``<store>/umvd-live-frames.jsonl`` (the TIFF's tag
  65111, same keys). At most `IN_FLIGHT` writes run at once. The chunks are written through a
  handle that assumes a larger shape than the declared one, so the array's metadata is not
  rewritten per frame.
* `checkpoint` (every second from the recorder) declares what is on disk: it grows the array's
  ``shape`` to the frames written (metadata only) and rewrites the provenance, each JSON document
  replaced atomically (``os.replace``, retried while Windows refuses it: `portable.replace_file`).
  The metadata therefore never declares a frame whose chunk is missing; after a kill, OME readers
  see the frames up to the last checkpoint and `read_zarr_recording` every frame whose line
  reached the JSON-lines file.
* tensorstore reports a failed write as ValueError; it is raised here as `ZarrWriteError`, an
  OSError with the store's path and the errno, so that the recorder ends the recording with a
  clear message as for a TIFF file (disk full and the like).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from umvd_live.portable import replace_file
from umvd_live.recording.fileio import O_BINARY
from umvd_live.recording.ometiff import (
    RECORDABLE_DTYPES,
    FrameInfo,
    Provenance,
    RecordingFormatError,
    RecordingLedger,
    _json_default,
    _typed,
    conform_frame,
    seq_gaps,
    seq_restarts,
    write_movie,
)

#: The group attribute that holds the provenance map (the TIFF's MapAnnotation, same keys).
ATTRIBUTE = "umvd-live"
FRAMES_FILE = "umvd-live-frames.jsonl"
ZARR_SUFFIXES = (".ome.zarr", ".zarr")
#: chunk writes in flight at once: what a kill can lose at most, beyond the frame being written
IN_FLIGHT = 16
#: a shape no recording reaches: what the write handle assumes, so writes never resize
_UNBOUNDED_T = 2**40


class ZarrWriteError(OSError):
    """A store's write failed (tensorstore's error, as an OSError: errno, the store's path)."""


_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def _os_error(exc: ValueError, path: Path) -> ZarrWriteError:
    """tensorstore's ValueError (``FAILED_PRECONDITION: Error writing local file ...
    [os_error_code='28']``) as a `ZarrWriteError`; the errno is the code on POSIX (on Windows the
    code is a Windows error number: EIO, the text says which)."""
    text = str(exc).split(" [tensorstore_spec=", 1)[0]
    code = _OS_ERROR_CODE.search(text)
    number = int(code.group(1)) if code and os.name == "posix" else errno.EIO
    return ZarrWriteError(number, text, str(path))


def _done(future: Any, path: Path) -> Any:
    """A tensorstore future's result; its error as `ZarrWriteError`."""
    try:
        return future.result()
    except ValueError as exc:
        raise _os_error(exc, path) from exc


def is_zarr_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an OME-Zarr store (``.zarr``/``.ome.zarr``), the format switch of
    the recorder, `umvd-live denoise` and `acquire replay`."""
    return Path(path).name.lower().endswith(ZARR_SUFFIXES)


def _deps() -> tuple[Any, Any, Any]:
    try:
        import tensorstore as ts
        from yaozarrs import DimSpec, v05
    except ImportError as exc:  # an optional extra: say how to get it
        raise RuntimeError(f"OME-Zarr needs the zarr extra: pip install 'umvd-live[zarr]' ({exc})") from None
    return ts, DimSpec, v05


def _array_spec(array_dir: Path, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(array_dir)},
                            # each chunk fsynced as it is written (tensorstore's default, stated)
                            "context": {"file_io_sync": True}}
    if metadata is not None:
        spec["metadata"] = metadata
    return spec


def _replace_json(path: Path, doc: dict[str, Any]) -> None:
    """Write a JSON document so that a reader (or a kill) sees the old one or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, default=_json_default, ensure_ascii=False)
        fh.flush()
        os.fsync(fh.fileno())
    replace_file(tmp, path)  # retried while Windows refuses it (a reader holds the file open)


class ZarrRecording(RecordingLedger):
    """One stream's OME-Zarr store, appended frame by frame (single-threaded use), with the API of
    `RecordingFile`: a kill loses at most the `IN_FLIGHT` frames whose writes are running;
    `checkpoint` declares every frame to OME readers (and, without an ``interval_ms``, the frames'
    own step on T); `close` writes the final metadata (``complete`` true). The bookkeeping, the
    provenance map and the measured frame interval are the TIFF recorder's (`RecordingLedger`)."""

    def __init__(self, path: Path, shape: tuple[int, int], dtype: np.dtype, provenance: Provenance,
                 first_info: FrameInfo):
        super().__init__(path, shape, dtype, provenance, first_info)
        self._ts, _, _ = _deps()
        self._writer: Any = None
        self._declared: Any = None
        self._frames_fh: Any = None
        self._declared_frames = 0
        self._submitted = 0
        self._pending: deque[tuple[Any, str, FrameInfo]] = deque()

    # -- creation -----------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, image: np.ndarray, info: FrameInfo,
               provenance: Provenance) -> ZarrRecording:
        """Create the store ``path`` (never overwriting: FileExistsError if it exists, a symlink
        there included) with its first frame, declared at once."""
        path = Path(path)
        image = np.asarray(image)
        if image.ndim != 2 or image.dtype.name not in RECORDABLE_DTYPES:
            raise ValueError(f"a recorded frame is 2-D {RECORDABLE_DTYPES}, got {image.shape} {image.dtype}")
        rec = cls(path, image.shape, image.dtype.newbyteorder("<"), provenance, info)
        os.mkdir(path)  # exclusive: an existing store (or a planted symlink) is never written into
        try:
            rec._create_store(image)
            rec.append(image, info)
            rec.checkpoint()
        except BaseException:
            rec._release()
            shutil.rmtree(path, ignore_errors=True)  # ours (mkdir) and holding no declared frame
            raise
        return rec

    def _create_store(self, first: np.ndarray) -> None:
        ts, DimSpec, v05 = _deps()
        h, w = self.shape
        width = {"unit": "micrometer", "scale": self.pixel_size_um} if self.pixel_size_um else {}
        height = {**width, "scale": self.acquisition.pixel_size_y_um} if width and self.acquisition.pixel_size_y_um \
            else width  # non-square pixels keep their height
        # a unit only with a calibration: a scale of 1 without one is a placeholder (`OmeZarrSeries`);
        # the time axis gets its unit once a checkpoint has measured the frames' step
        interval = ({"unit": "second", "scale": self.acquisition.interval_ms / 1e3}
                    if self.acquisition.interval_ms else {})
        dims = [DimSpec(name="t", size=0, type="time", **interval),
                DimSpec(name="c", size=1, type="channel"),
                DimSpec(name="y", size=h, type="space", **height), DimSpec(name="x", size=w, type="space", **width)]
        image = v05.Image(multiscales=[v05.Multiscale.from_dims(dims, name=self._name())],
                          omero=self._omero(v05, first))
        self._group: dict[str, Any] = {"zarr_format": 3, "node_type": "group",
                       "attributes": {"ome": image.model_dump(mode="json", exclude_none=True),
                                      ATTRIBUTE: self._provenance(0, final=False)}}
        _replace_json(self.path / "zarr.json", self._group)
        metadata = {"data_type": self.dtype.name, "shape": [0, 1, h, w], "dimension_names": ["t", "c", "y", "x"],
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, 1, h, w]}},
                    "chunk_key_encoding": {"name": "default"}, "fill_value": 0,
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]}
        array_dir = self.path / "0"
        self._declared = _done(ts.open(_array_spec(array_dir, metadata), create=True), self.path)
        # chunks go through a handle that assumes a huge T: no metadata write per frame
        self._writer = _done(ts.open(_array_spec(array_dir, {**metadata, "shape": [_UNBOUNDED_T, 1, h, w]}),
                                     open=True, assume_metadata=True), self.path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | O_BINARY
        self._frames_fh = os.fdopen(os.open(self.path / FRAMES_FILE, flags, 0o644), "ab", buffering=0)

    def _name(self) -> str:
        return f"{self.provenance.stream} {self.provenance.kind}"

    def _omero(self, v05: Any, first: np.ndarray) -> Any:
        channel = self.coordinates.channel if self.coordinates is not None else None
        channel = channel or self.acquisition.channel
        if channel is None:
            return None
        from umvd_live.wire.channel_colors import ome_color

        rgba = ome_color(channel)
        color = ("FFFFFF" if rgba is None
                 else f"{(rgba >> 24) & 0xFF:02X}{(rgba >> 16) & 0xFF:02X}{(rgba >> 8) & 0xFF:02X}")
        # display range: the first frame's (what a viewer's contrast starts at); the type's range.
        # Finite pixels only, in float64: a NaN or inf pixel would put NaN into zarr.json, which
        # strict JSON readers (JavaScript viewers, Java) refuse whole; none finite: 0..1
        finite = first[np.isfinite(first)].astype(np.float64)
        start, end = (float(v) for v in np.percentile(finite, (0.1, 99.9))) if finite.size else (0.0, 1.0)
        end = max(end, start + 1e-6)
        if self.dtype.kind in "ui":
            lo, hi = float(np.iinfo(self.dtype).min), float(np.iinfo(self.dtype).max)
        else:
            lo, hi = (min(start, float(finite.min())), max(end, float(finite.max()))) if finite.size else (start, end)
        return v05.Omero(channels=[v05.OmeroChannel(label=channel, color=color, window=v05.OmeroWindow(
            min=lo, max=hi, start=start, end=end))])

    # -- writing --------------------------------------------------------------------------------
    def append(self, image: np.ndarray, info: FrameInfo) -> None:
        """Queue one frame's chunk write; its metadata line follows once the chunk is on disk.

        Up to `IN_FLIGHT` chunk writes run at once (each fsyncs its file: one by one that would
        cost ~9 ms a frame here), so a kill loses at most those frames. Returns once tensorstore
        has copied ``image`` (as `RecordingFile.append` once it is written): a caller may reuse
        its buffer, as a camera's ring buffer does. Raises (an earlier frame's failed write too)
        before this frame's write starts: a frame whose `append` raised is not taken, as for
        `RecordingFile`, and `frames_written` counts it not."""
        if self._writer is None:
            raise ValueError("recording is closed")
        image = conform_frame(image, self.shape, self.dtype)
        self._retire(IN_FLIGHT - 1)  # room for this one
        index = self._submitted
        row = {"index": index, **asdict(info)}
        line = json.dumps(row, default=_json_default, ensure_ascii=True, separators=(",", ":"))
        write = self._writer[index, 0].write(image)
        # the write reads ``image`` later, on tensorstore's threads: wait for that copy (a memcpy;
        # the chunk's write and fsync still run in the background)
        _done(write.copy, self.path)
        self._pending.append((write, line, info))
        self._submitted += 1

    def _retire(self, keep: int) -> None:
        """Wait for the oldest writes until at most ``keep`` are in flight; in frame order, each
        done chunk gets its metadata line: a line is never written before its chunk.

        A failed write raises here and stays at the head of the queue, so every later call raises
        it again: no frame after a failed one gets a line or is declared (`abandon` included),
        even where its own chunk reached the disk."""
        while len(self._pending) > keep or (self._pending and self._pending[0][0].done()):
            future, line, info = self._pending[0]
            _done(future, self.path)  # a failed chunk write surfaces here
            self._pending.popleft()
            self._frames_fh.write(line.encode("ascii") + b"\n")
            self._track(info)

    def checkpoint(self, *, final: bool = False) -> None:
        """Finish the writes in flight, then declare every frame: the array's shape, then the
        provenance (each document durable and replaced atomically)."""
        if self._writer is None:
            return
        self._retire(0)
        self._declare(final=final)

    def _declare(self, *, final: bool) -> None:
        """Declare the frames whose lines are written: the frames file made durable, the array's
        shape grown to them, the group's metadata rewritten."""
        n = len(self.infos)
        os.fsync(self._frames_fh.fileno())
        if n != self._declared_frames:
            h, w = self.shape
            _done(self._declared.resize(exclusive_max=[n, 1, h, w], expand_only=True,
                                        resize_metadata_only=True), self.path)
            self._declared_frames = n
        attrs = self._group["attributes"]
        attrs[ATTRIBUTE] = self._provenance(n, final=final)
        if not self.acquisition.interval_ms:
            # the frames' own median step on T, from the first checkpoint on (as the TIFF's
            # TimeIncrement; OME-Zarr has no per-plane times)
            step = self._measured_increment(n)
            if step is not None:
                for ms in attrs["ome"]["multiscales"]:
                    ms["axes"][0]["unit"] = "second"
                    for ds in ms["datasets"]:
                        ds["coordinateTransformations"][0]["scale"][0] = round(step, 9)
        _replace_json(self.path / "zarr.json", self._group)

    def _provenance(self, n: int, *, final: bool) -> dict[str, str]:
        """The TIFF recorder's provenance map (same keys), and the acquisition's start."""
        out = self.provenance_map(frames=n, final=final)
        out["per_frame_metadata"] = f"{FRAMES_FILE} (a JSON line per frame)"
        if self.acquisition.acquisition_datetime:
            out["acquisition_datetime"] = self.acquisition.acquisition_datetime
        return out

    def close(self) -> None:
        """Declare everything and write the final provenance (``complete`` true; the weights
        hash waited for if still being computed, as `RecordingFile.close`)."""
        if self._writer is None:
            return
        try:
            self._await_weights_sha256()
            self.checkpoint(final=True)
        finally:
            self._release()

    def abandon(self) -> None:
        """Close after an I/O error: the frames whose chunks are on disk get their lines and are
        declared, where the disk still takes those small writes (as `RecordingFile.abandon`
        updates its OME-XML); what was declared before stays readable either way."""
        if self._writer is None:
            return
        try:
            self._retire(len(self._pending))  # the finished writes, up to the first that is not
        except OSError:
            pass  # that one failed: the frames before it are in, none after it
        try:
            self._declare(final=False)
        except OSError:
            pass  # a full disk: the last checkpoint's declaration stands
        finally:
            self._release()

    def _release(self) -> None:
        if self._frames_fh is not None:
            try:
                self._frames_fh.close()
            except OSError:
                pass
        self._pending.clear()  # after an error: writes in flight are not waited for
        self._writer = self._declared = self._frames_fh = None

    @property
    def frames_written(self) -> int:
        return self._submitted

    @property
    def closed(self) -> bool:
        return self._writer is None


def write_zarr_movie(path: str | os.PathLike, frames: Iterable[np.ndarray], infos: Iterable[FrameInfo],
                     provenance: Provenance) -> Path:
    """`ometiff.write_movie` for an OME-Zarr store (`umvd-live denoise IN OUT.ome.zarr`)."""
    return write_movie(path, frames, infos, provenance, create=ZarrRecording.create)


# -- reading our recordings -------------------------------------------------------------------
def _frame_rows(path: Path) -> list[dict[str, Any]]:
    """The per-frame lines; a line torn by a kill (no newline, or not JSON) ends the list."""
    try:
        data = (path / FRAMES_FILE).read_bytes()
    except FileNotFoundError:
        return []
    rows = []
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is incomplete
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def read_zarr_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """`ometiff.read_provenance` for a `ZarrRecording` store: its provenance map (typed), read
    from ``zarr.json`` alone (no pixels, no tensorstore); ``frames`` is what the last checkpoint
    declared. RecordingFormatError for a store that is no umvd-live recording (or one killed
    before its first checkpoint)."""
    path = Path(path)
    try:
        group = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecordingFormatError(f"{path}: not an OME-Zarr recording ({exc})") from None
    prov = group.get("attributes", {}).get(ATTRIBUTE) if isinstance(group, dict) else None
    if not isinstance(prov, dict) or prov.get("format") is None:
        raise RecordingFormatError(f"{path}: no {ATTRIBUTE} provenance: not a umvd-live recording")
    return _typed(dict(prov))


def read_zarr_recording(path: str | os.PathLike) -> tuple[np.ndarray, list[FrameInfo], dict[str, Any]]:
    """`ometiff.read_recording` for a `ZarrRecording` store, complete or killed: (frames T×H×W,
    a FrameInfo each, provenance). Every frame whose metadata line is complete is read (its chunk
    was on disk before the line was written), beyond the declared shape after a kill too;
    ``frames_declared`` is what the metadata declares to other readers."""
    ts, _, _ = _deps()
    path = Path(path)
    prov = read_zarr_provenance(path)
    try:
        meta = json.loads((path / "0" / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecordingFormatError(f"{path}: not an OME-Zarr recording ({exc})") from None
    rows = _frame_rows(path)
    declared = int(meta["shape"][0])
    n = max(len(rows), declared)
    _, _, h, w = meta["shape"]
    spec_meta = {k: v for k, v in meta.items() if k not in ("zarr_format", "node_type")}
    spec_meta["shape"] = [max(n, 1), 1, h, w]
    array = ts.open(_array_spec(path / "0", spec_meta), open=True, assume_metadata=True, read=True).result()
    frames = np.asarray(array[:n, 0].read().result()) if n else np.zeros((0, h, w), meta["data_type"])
    infos = []
    for row in rows[:n]:
        row.pop("index", None)
        infos.append(FrameInfo(**row))
    seqs = [i.seq for i in infos]
    prov.update(frames=n, frames_declared=declared, seq_gaps=seq_gaps(seqs), seq_restarts=seq_restarts(seqs),
                warmup_frames=[i for i, f in enumerate(infos) if f.state == "warmup"],
                first_live_frame=next((i for i, f in enumerate(infos) if f.state == "live"), None))
    return frames, infos, prov


# -- reading any OME-Zarr image (input of `denoise` and `acquire replay`) ----------------------
def _ome_keys(group: Any) -> dict[str, Any]:
    """A Zarr group's OME metadata (JSON): 0.5 nests its keys under "ome"; 0.4 has them at the top."""
    attrs = dict(group.attrs)
    return attrs.get("ome", attrs)


#: OME-Zarr space units -> micrometres.
_UNITS_UM = {"micrometer": 1.0, "micron": 1.0, "nanometer": 1e-3, "millimeter": 1e3}


class OmeZarrSeries:
    """One image (multiscales) of an OME-Zarr store: its full-resolution array, read lazily."""

    def __init__(self, path: Path, name: str, group: Any):
        attrs = dict(group.attrs)
        ome = _ome_keys(group)
        multiscale = ome["multiscales"][0]
        self.path, self.name = path, name
        self.axes = "".join(str(a["name"] if isinstance(a, dict) else a)[0].upper() for a in multiscale["axes"])
        units = [(a.get("unit") if isinstance(a, dict) else None) or "" for a in multiscale["axes"]]
        dataset = multiscale["datasets"][0]
        self.array = group[dataset["path"]]
        if self.array.ndim != len(self.axes) or self.axes[-2:] != "YX":
            raise RecordingFormatError(f"{path}: axes {self.axes!r} do not end in y, x for an array of "
                                       f"{self.array.ndim} dimensions")
        scale = next((t["scale"] for t in dataset.get("coordinateTransformations", []) if t.get("type") == "scale"),
                     [1.0] * len(self.axes))
        channels = (ome.get("omero") or {}).get("channels") or []
        self.channel_names = [str(c.get("label")) for c in channels] if channels and all(
            c.get("label") for c in channels) else None
        self.provenance = attrs.get(ATTRIBUTE) if isinstance(attrs.get(ATTRIBUTE), dict) else None
        # A scale of 1 with a unit is what other writers put when they know no calibration
        # (ome-writers): not taken. umvd-live's own stores give a unit only with a calibration,
        # so theirs is taken as it is (a 1-µm pixel, a 1-s time-lapse).
        calibrated = (lambda value: value > 0) if self.provenance is not None else (lambda value: 0 < value != 1.0)
        um = _UNITS_UM.get(units[-1])
        self.pixel_size_um = float(scale[-1]) * um if um and calibrated(scale[-1]) else None
        um_y = _UNITS_UM.get(units[-2])
        width = self.pixel_size_um
        height = float(scale[-2]) * um_y if width and um_y and scale[-2] > 0 else None
        self.pixel_size_y_um = height if height is not None and width and not np.isclose(height, width) else None
        t = self.axes.find("T")
        t_unit = {"second": 1.0, "millisecond": 1e-3, "minute": 60.0}.get(units[t]) if t >= 0 else None
        self.interval_s = float(scale[t]) * t_unit if t_unit and calibrated(scale[t]) else None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def read(self, index: tuple[int, ...]) -> np.ndarray:
        """The 2-D plane at ``index`` (one integer per leading axis)."""
        return np.asarray(self.array[index])

    def acquisition_meta(self, channel: int | None) -> dict[str, Any]:
        """The protocol ``meta`` keys this image tells (`umvd_live.wire.acqmeta`): pixel size, frame
        interval, the channel's name, the acquisition's start (a umvd-live recording's)."""
        from umvd_live.wire.acqmeta import AcquisitionMeta, iso_datetime

        names = self.channel_names or []
        name = names[channel] if channel is not None and channel < len(names) else (
            names[0] if len(names) == 1 else None)
        started = (self.provenance or {}).get("acquisition_datetime")
        return AcquisitionMeta(pixel_size_um=self.pixel_size_um, pixel_size_y_um=self.pixel_size_y_um,
                               interval_ms=self.interval_s * 1e3 if self.interval_s else None, channel=name,
                               acquisition_datetime=iso_datetime(started)).to_meta()

    def times(self) -> list[float | None] | None:
        """Per-frame acquisition times of a umvd-live recording (its frames file); else None."""
        if self.provenance is None:
            return None
        return [row.get("t") if row.get("t") is not None else row.get("t_received")
                for row in _frame_rows(self.path)]


def open_ome_zarr(path: str | os.PathLike) -> list[OmeZarrSeries]:
    """The images of an OME-Zarr store (0.4 or 0.5): one image, or the series of a
    bioformats2raw layout (pymmcore-plus / ome-writers write positions so). Plates: an error."""
    try:
        import zarr
    except ImportError as exc:
        raise RuntimeError(f"OME-Zarr needs the zarr extra: pip install 'umvd-live[zarr]' ({exc})") from None
    path = Path(path)
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises many kinds; the user gets one line
        raise RecordingFormatError(f"{path}: not a readable Zarr group ({type(exc).__name__}: {exc})") from None
    ome = _ome_keys(root)
    if "multiscales" in ome:
        return [OmeZarrSeries(path, "0", root)]
    if "plate" in ome:
        raise RecordingFormatError(f"{path}: an OME-Zarr plate; open one of its wells' images instead")
    if "bioformats2raw.layout" in ome:
        keys = sorted(root.group_keys(), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
        series = [OmeZarrSeries(path / k, k, root[k]) for k in keys
                  if "multiscales" in _ome_keys(root[k])]
        if series:
            return series
    raise RecordingFormatError(f"{path}: no OME-Zarr image (no multiscales metadata)")
