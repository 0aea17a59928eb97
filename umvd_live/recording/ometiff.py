"""Crash-safe OME-TIFF recording files: written one frame at a time, readable after ``kill -9``.

Why not `tifffile.TiffWriter` for writing: it links a new page into the IFD chain *before* it
writes that page's IFD and pixels (tifffile 2026.3.3, ``TiffWriter.write``), so a process killed
mid-frame leaves a linked page of zeros; and it writes the OME-XML only at ``close``. So this
module writes the BigTIFF structure itself, in an order that keeps the file valid at every
instant, and uses tifffile for what it does well: generating the OME-XML (`tifffile.OmeXml`) and
reading (`read_recording`, `tifffile.imread`, napari, Fiji/Bio-Formats all read plain BigTIFF).

On-disk layout (little-endian BigTIFF, one uncompressed strip per page, one page per frame):

* A page is committed in two steps: its pixels and its IFD (next-IFD = 0) are written past the
  end of the file, then the previous IFD's next-IFD field (or the header's first-IFD field) is
  pointed at it with one 8-byte write that does not cross a 4 KiB page boundary, which SIGKILL cannot
  tear. A reader therefore sees only complete pages.
* Every page carries its own per-frame metadata (seq, times, engine state, model step, amplitude
  gain, the producer's meta) as JSON in the private ASCII tag `FRAME_TAG`: metadata is committed
  with the frame it describes, so a killed file loses none of it.
* A stream of a multi-dimensional acquisition (one position, channel and z plane of it) names
  them in its OME-XML from the first frame on: `AcquisitionCoordinates` in the provenance map,
  the channel's name (and a default colour) on the OME Channel. `umvd_live.recording.acquisition` puts the
  files of one recording back together as TCZYX arrays.
* The OME-XML is the first page's ImageDescription. It is double-buffered: two fixed-size slots,
  each NUL-terminated and padded with spaces (valid trailing XML whitespace). A checkpoint
  (`RecordingFile.checkpoint`, the recorder calls it every second) fsyncs the pages, writes a new
  XML declaring exactly the committed pages into the idle slot, fsyncs, then points the tag at
  that slot with one small write. The XML therefore never declares a page that is not on disk.
  A clean `close` writes the final XML (per-plane DeltaT, the per-frame table) the same way.
* The weights hash may come after the file's first frame (`Provenance.weights_sha256_future`: the
  daemon hashes on its state worker, off the frame loop): the map says ``pending`` until it is
  known, the next checkpoint writes it, and `close` waits for it (`HASH_WAIT_S`) before the final
  XML. A `recording.session.RecordingSession` closes a file mid-recording (a shape change) only once
  its hash is settled, so only the recording's end can wait.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from umvd_live.recording.fileio import O_BINARY, pwrite_all
from umvd_live.wire.acqmeta import AcquisitionMeta, positive
from umvd_live.wire.channel_colors import ome_color

log = logging.getLogger(__name__)

#: Private TIFF tag (ASCII, JSON) holding one frame's metadata on every page.
FRAME_TAG = 65111
FORMAT = "umvd-live-recording/1"
PROVENANCE_NS = "umvd-live/provenance"
FRAMES_NS = "umvd-live/frames"
#: ``weights_sha256_at_start`` while the hash is still being computed (`Provenance.weights_sha256_future`):
#: what a recording killed before it was known keeps.
HASH_PENDING = "pending"
#: How long closing a recording waits for a weights hash still being computed (the daemon's state
#: worker may be writing checkpoints first); then the final metadata says ``pending``. Only the
#: recording's end waits so: a part left mid-recording is closed once its hash is settled.
HASH_WAIT_S = 120.0
#: Characters XML 1.0 does not allow anywhere, not even escaped.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_OME_NS = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"

# TIFF field types
_SHORT, _LONG, _ASCII, _RATIONAL, _LONG8 = 3, 4, 2, 5, 16
_EMPTY_HEADER = b"II" + struct.pack("<HHHQ", 43, 8, 0, 0)  # what `create` writes first: no page linked
_SAMPLE_FORMAT = {"u": 1, "i": 2, "f": 3}
#: dtypes a recording may hold: the float32 denoised output and the protocol's raw dtypes.
RECORDABLE_DTYPES = ("uint8", "uint16", "int16", "float32")
_PAGE = 4096


class RecordingFormatError(ValueError):
    """The file is not a umvd-live recording, or is damaged before its first page."""


#: useq's axes besides time that every stream holds fixed: position, grid position, channel, z
#: plane. A stream is one combination of them (and of any other axis the acquisition has); its
#: frames are time points. Channel and z become a position's C and Z (`umvd_live.recording.acquisition`).
STREAM_AXES = ("p", "g", "c", "z")
_AXIS_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,15}$")

def _index_value(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True)
class AcquisitionCoordinates:
    """Where a stream sits in a multi-dimensional acquisition: its (p, g, c, z) and their names.

    Taken from the stream's first frame's ``meta`` (``group``, ``index``, ``channel``,
    ``position``: docs/recording.md) and written into the file's provenance map from its first
    page on, so that the per-stream files of one acquisition can be put back together, after a
    crash too. ``None`` for frames without a ``group`` (older producers): their files are as before.
    """

    group: str  # the acquisition's base stream name, e.g. "cam0"
    index: dict[str, int] = field(default_factory=dict)  # the non-time axes: {"p": 0, "c": 1, "z": 2}
    axes: str = ""  # every axis of meta.index, time too, in its order, comma-separated: "t,p,c,z"
    channel: str | None = None  # the channel's display name
    position: str | None = None  # the position's name

    @classmethod
    def from_meta(cls, meta: Any) -> AcquisitionCoordinates | None:
        if not isinstance(meta, dict) or not isinstance(meta.get("group"), str):
            return None
        raw_index = meta.get("index")
        raw_index = raw_index if isinstance(raw_index, dict) else {}
        index = {k: v for k, v in ((k, _index_value(v)) for k, v in raw_index.items())
                 if k != "t" and isinstance(k, str) and _AXIS_KEY.match(k) and v is not None}
        text = {k: meta[k] if isinstance(meta.get(k), str) else None for k in ("channel", "position")}
        return cls(group=meta["group"], index=index, axes=",".join(map(str, raw_index)), **text)

    @classmethod
    def from_provenance(cls, prov: dict[str, Any]) -> AcquisitionCoordinates | None:
        """The inverse of `to_map`, from `read_provenance`'s typed dict."""
        if not isinstance(prov.get("group"), str):
            return None
        index = {k[5:]: v for k, v in prov.items() if k.startswith("axis.") and isinstance(v, int)}
        return cls(group=prov["group"], index=index, axes=str(prov.get("acquisition_axes", "")),
                   channel=prov.get("channel"), position=prov.get("position"))

    def to_map(self) -> dict[str, str]:
        """The provenance map's keys: ``group``, ``acquisition_axes``, ``axis.<key>`` for each
        non-time axis the acquisition has (``axis.p``, ``axis.g``, ``axis.c``, ``axis.z``, any
        other), ``channel`` and ``position`` (when named)."""
        out = {"group": self.group, "acquisition_axes": self.axes}
        out.update({f"axis.{k}": str(v) for k, v in self.index.items()})
        if self.channel is not None:
            out["channel"] = self.channel
        if self.position is not None:
            out["position"] = self.position
        return out

    @property
    def c(self) -> int | None:
        return self.index.get("c")

    @property
    def z(self) -> int | None:
        return self.index.get("z")

    @property
    def position_key(self) -> str:
        """``GROUP[.pP][.gG][.<key><i>…]``: what every channel and plane of one position share,
        the stream name without its channel and plane (further axes in key order)."""
        rest = sorted((k, v) for k, v in self.index.items() if k not in STREAM_AXES)
        return self.group + "".join(f".{k}{self.index[k]}" for k in ("p", "g") if k in self.index) \
            + "".join(f".{k}{v}" for k, v in rest)


@dataclass(frozen=True)
class Provenance:
    """Where a recording's frames came from: fixed for the whole file, written at its start (the
    weights hash may come later: ``weights_sha256_future``)."""

    stream: str
    kind: str = "denoised"  # "denoised" (float32, the input's units) or "raw" (as received)
    software_version: str = ""
    preset: str | None = None
    window: int | None = None
    weights_sha256: str | None = None  # hash of the model weights when the recording started
    device: str | None = None
    source: str | None = None  # input endpoint or input file
    pixel_size_um: float | None = None  # None: taken from the first frame's meta["pixel_size_um"]
    recording_id: str | None = None  # the RecordingSession's id: which files belong together
    extra: dict[str, Any] = field(default_factory=dict)
    #: The weights hash, still being computed (the daemon hashes a copy of the weights the file's
    #: first denoised frames came from on its state worker, not on the frame loop); used while
    #: ``weights_sha256`` is None. The files say ``pending`` until it is done, then its result
    #: (`weights_sha256_entries`).
    weights_sha256_future: Future[str | None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.software_version:
            from umvd_live import __version__

            object.__setattr__(self, "software_version", __version__)

    def weights_sha256_entries(self) -> dict[str, str]:
        """The provenance map's ``weights_sha256_at_start``: the hash, ``None`` (no model), or
        `HASH_PENDING` while ``weights_sha256_future`` runs; with ``weights_sha256_error`` when
        that failed (then ``None``)."""
        future = self.weights_sha256_future
        if self.weights_sha256 is not None or future is None:
            return {"weights_sha256_at_start": str(self.weights_sha256)}
        if not future.done():
            return {"weights_sha256_at_start": HASH_PENDING}
        try:
            return {"weights_sha256_at_start": str(future.result())}
        except CancelledError:
            return {"weights_sha256_at_start": "None", "weights_sha256_error": "cancelled"}
        except Exception as exc:
            return {"weights_sha256_at_start": "None", "weights_sha256_error": f"{type(exc).__name__}: {exc}"}

    def wait_for_weights_sha256(self, timeout: float | None = HASH_WAIT_S) -> bool:
        """Wait up to ``timeout`` s for ``weights_sha256_future`` (a recording's final metadata
        names the hash); whether the hash is settled (known, failed, or never pending)."""
        future = self.weights_sha256_future
        if self.weights_sha256 is not None or future is None or future.done():
            return True
        try:
            future.exception(timeout)
        except FutureTimeout:
            return False
        except CancelledError:
            pass
        return True


@dataclass(frozen=True)
class FrameInfo:
    """Metadata of one recorded frame (one row of the per-frame table)."""

    seq: int  # the producer's sequence number
    t: float | None = None  # the producer's acquisition time in seconds, if it sent one
    t_received: float | None = None  # wall-clock time (Unix seconds) the daemon received it
    # "warmup", "live" or "adapting" (engine.outputs.State) for denoised frames; None for raw copies
    state: str | None = None
    model_step: int | None = None  # training steps of the model that produced this frame
    # what its deviation from the blind baseline was multiplied by (engine.amplitude; 1.0: as the
    # network/mean made it); None for raw copies and recordings made before it was recorded
    amplitude_gain: float | None = None
    # the (y, x) pixels the engine moved it by with its frame's jitter (engine.jitter); None: not
    # moved, a raw copy, or a recording made before it was recorded
    jitter_shift_px: tuple[float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # the producer's per-frame meta

    def __post_init__(self) -> None:
        if self.jitter_shift_px is not None:  # read back from JSON as a list
            object.__setattr__(self, "jitter_shift_px", tuple(float(v) for v in self.jitter_shift_px))

    @property
    def time(self) -> float | None:
        """Acquisition time if the producer sent one, else the receive time."""
        return self.t if self.t is not None else self.t_received

    @property
    def t_index(self) -> int | None:
        """The acquisition's time point of this frame (``meta["index"]["t"]``), if it sent one."""
        index = self.meta.get("index") if isinstance(self.meta, dict) else None
        return _index_value(index.get("t")) if isinstance(index, dict) else None


@dataclass(frozen=True, slots=True)
class FrameRow:
    """What a recording keeps of each frame once its page is written: the per-frame table's
    columns. Not the producer's ``meta`` (it is on the page): a recording holds this for every
    frame until it closes, ~250 bytes a frame (~300 where the jitter moved it: tracemalloc over
    20,000 rows) instead of the meta's kilobytes (GiBs a day)."""

    seq: int
    t: float | None
    t_received: float | None
    state: str | None
    model_step: int | None
    amplitude_gain: float | None
    t_index: int | None
    shift_y_px: float | None  # `FrameInfo.jitter_shift_px`, as two numbers: no tuple held per frame
    shift_x_px: float | None

    @classmethod
    def of(cls, info: FrameInfo) -> FrameRow:
        shift_y, shift_x = info.jitter_shift_px if info.jitter_shift_px is not None else (None, None)
        return cls(seq=info.seq, t=info.t, t_received=info.t_received, state=info.state,
                   model_step=info.model_step, amplitude_gain=info.amplitude_gain, t_index=info.t_index,
                   shift_y_px=shift_y, shift_x_px=shift_x)

    @property
    def time(self) -> float | None:
        """Acquisition time if the producer sent one, else the receive time (`FrameInfo.time`)."""
        return self.t if self.t is not None else self.t_received


def seq_gaps(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Inclusive ranges of seq numbers missing between consecutive recorded frames."""
    gaps: list[tuple[int, int]] = []
    prev: int | None = None
    for s in seqs:
        if prev is not None and s > prev + 1:
            gaps.append((prev + 1, s - 1))
        prev = s
    return gaps


def seq_restarts(seqs: Iterable[int]) -> list[int]:
    """Frame indices where seq did not increase (a restarted producer): never merged silently."""
    out: list[int] = []
    prev: int | None = None
    for i, s in enumerate(seqs):
        if prev is not None and s <= prev:
            out.append(i)
        prev = s
    return out


def _format_gaps(gaps: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in gaps) or "none"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def _entry(tag: int, typ: int, count: int, value: bytes) -> tuple[int, int, int, bytes]:
    """One IFD entry: tag, TIFF type, count, value bytes (inline if <= 8 bytes)."""
    return (tag, typ, count, value)


def _ascii(text: str) -> bytes:
    return text.encode("ascii") + b"\x00"


class _Ifd:
    """A BigTIFF IFD laid out at a known file offset, with out-of-line values after it."""

    def __init__(self, entries: list[tuple[int, int, int, bytes]]):
        self.entries = sorted(entries)
        self.size_fixed = 8 + 20 * len(self.entries) + 8

    def field_offsets(self, tag: int) -> int:
        """Offset, relative to the IFD, of the count field of ``tag``'s entry."""
        for i, e in enumerate(self.entries):
            if e[0] == tag:
                return 8 + 20 * i + 4
        raise KeyError(tag)

    @property
    def next_field(self) -> int:
        return 8 + 20 * len(self.entries)

    def pack(self, pos: int, *, external: dict[int, int] | None = None) -> bytes:
        """Serialise at file offset ``pos``. ``external`` maps a tag to a value offset outside."""
        head = [struct.pack("<Q", len(self.entries))]
        tail = bytearray()
        tail_pos = pos + self.size_fixed
        for tag, typ, count, value in self.entries:
            if external and tag in external:
                field = struct.pack("<Q", external[tag])
            elif len(value) <= 8:
                field = value.ljust(8, b"\x00")
            else:
                if (tail_pos + len(tail)) % 2:
                    tail += b"\x00"
                field = struct.pack("<Q", tail_pos + len(tail))
                tail += value
            head.append(struct.pack("<HHQ", tag, typ, count) + field)
        head.append(struct.pack("<Q", 0))  # next IFD: none yet
        return b"".join(head) + bytes(tail)


def _place(pos: int, fields: Sequence[tuple[int, int]]) -> int:
    """Smallest even offset >= pos where each (relative offset, size) field lies inside one
    4 KiB page, so that updating it later is a single write that SIGKILL cannot tear."""
    p = pos + (pos % 2)
    while not all((p + rel) // _PAGE == (p + rel + size - 1) // _PAGE for rel, size in fields):
        p += 2
    return p


class RecordingLedger:
    """What one stream's recording has taken in (its frames' infos, sequence gaps and restarts)
    and the provenance map built from it: shared by the TIFF and the OME-Zarr recorder, so the
    two formats say the same thing under the same keys."""

    def __init__(self, path: Path, shape: tuple[int, int], dtype: np.dtype, provenance: Provenance,
                 first_info: FrameInfo):
        self.path = path
        self.shape = shape
        self.dtype = dtype
        self.provenance = provenance
        # pixel size, interval, channel, start: the first frame's meta (docs/protocol.md)
        acquisition = AcquisitionMeta.from_meta(first_info.meta)
        if positive(provenance.pixel_size_um):
            acquisition = replace(acquisition, pixel_size_um=positive(provenance.pixel_size_um))
        if acquisition.acquisition_datetime is None and first_info.t_received is not None:
            # a producer that does not say when it started: when the first frame arrived
            acquisition = replace(acquisition, acquisition_datetime=datetime.fromtimestamp(
                first_info.t_received, UTC).isoformat(timespec="milliseconds"))
        self.acquisition = acquisition
        self.pixel_size_um: float | None = acquisition.pixel_size_um
        self.coordinates = AcquisitionCoordinates.from_meta(first_info.meta)
        self.started_utc = datetime.now(UTC).isoformat(timespec="milliseconds")
        self.infos: list[FrameRow] = []  # one per frame written; the meta stays on its page
        self.gaps: list[tuple[int, int]] = []
        self.restarts: list[int] = []
        self.first_live_frame: int | None = None

    def _track(self, info: FrameInfo) -> None:
        if self.infos:
            prev = self.infos[-1].seq
            if info.seq > prev + 1:
                self.gaps.append((prev + 1, info.seq - 1))
            elif info.seq <= prev:
                self.restarts.append(len(self.infos))
        if self.first_live_frame is None and info.state == "live":
            self.first_live_frame = len(self.infos)
        self.infos.append(FrameRow.of(info))

    def provenance_map(self, *, frames: int, final: bool) -> dict[str, str]:
        """The flat key/value provenance stored as an OME MapAnnotation (readable in Fiji)."""
        p = self.provenance
        infos = self.infos[:frames]
        gaps = self.gaps if frames == len(self.infos) else seq_gaps(i.seq for i in infos)
        out = {
            "format": FORMAT,
            "software": "umvd-live",
            "software_version": p.software_version,
            "stream": p.stream,
            "kind": p.kind,
            "preset": str(p.preset),
            "window": str(p.window),
            **p.weights_sha256_entries(),
            "device": str(p.device),
            "source": str(p.source),
            "pixel_size_um": str(self.pixel_size_um),
            "started_utc": self.started_utc,
            "complete": "true" if final else "false",
            "frames": str(frames),
            "first_seq": str(infos[0].seq) if infos else "none",
            "last_seq": str(infos[-1].seq) if infos else "none",
            "seq_gaps": _format_gaps(gaps),
            "seq_restarts_at_frame": ",".join(map(str, [r for r in self.restarts if r < frames])) or "none",
            "first_live_frame": str(self.first_live_frame) if self.first_live_frame is not None
            and self.first_live_frame < frames else "none",
            "per_frame_metadata": f"TIFF tag {FRAME_TAG} (JSON) on every page",
        }
        if p.recording_id is not None:
            out["recording_id"] = p.recording_id
        if self.coordinates is not None:
            out.update(self.coordinates.to_map())
        if final:
            out["finished_utc"] = datetime.now(UTC).isoformat(timespec="milliseconds")
        for k, v in p.extra.items():
            out[f"extra.{k}"] = str(v)
        return out

    def _await_weights_sha256(self) -> None:
        """Before the final metadata: the weights hash, if still being computed (`HASH_WAIT_S`)."""
        if not self.provenance.wait_for_weights_sha256():
            log.warning("recording %s: the weights hash was not ready after %.0f s; the file says %r",
                        self.path, HASH_WAIT_S, HASH_PENDING)

    def _measured_increment(self, frames: int) -> float | None:
        """TimeIncrement when the producer sent no ``interval_ms``: the median step between the
        frames' times (acquisition time, else receive time), over the first 1001 frames at most
        (stable, and cheap at every checkpoint)."""
        times = [i.time for i in self.infos[:min(frames, 1001)]]
        if len(times) < 2 or any(t is None for t in times):
            return None
        steps = np.diff(np.asarray(times, dtype=np.float64))
        steps = steps[steps > 0]
        return float(np.median(steps)) if len(steps) else None


class RecordingFile(RecordingLedger):
    """One recording on disk, appended frame by frame (single-threaded use).

    Every `append` that returns is readable after SIGKILL; `checkpoint` makes it durable across
    power loss and updates the OME-XML; `close` writes the final OME-XML.
    """

    def __init__(self, path: Path, fd: int, shape: tuple[int, int], dtype: np.dtype,
                 provenance: Provenance, first_info: FrameInfo):
        super().__init__(path, shape, dtype, provenance, first_info)
        self._fd = fd
        self._uuid = f"urn:uuid:{uuid.uuid4()}"
        self._eof = 16
        self._link_pos = 8  # the header's first-IFD field
        self._committed_xml_frames = 0
        self._committed_hash: dict[str, str] | None = None  # the weights hash of the XML in place
        self._closed = False
        self._slots: list[int] = []
        self._slot_size = 0
        self._active_slot = 0
        self._desc_count_pos = 0  # file offset of the ImageDescription entry's count field

    # -- creation -----------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, image: np.ndarray, info: FrameInfo,
               provenance: Provenance) -> RecordingFile:
        """Create ``path`` (never overwriting: O_EXCL, and no symlink followed) with its first
        frame. The shape and dtype of that frame are the file's."""
        path = Path(path)
        image = np.asarray(image)
        if image.ndim != 2 or image.dtype.name not in RECORDABLE_DTYPES:
            raise ValueError(f"a recorded frame is 2-D {RECORDABLE_DTYPES}, got {image.shape} {image.dtype}")
        flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_BINARY
                 | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))  # POSIX only: see docs/recording.md
        fd = os.open(path, flags, 0o644)
        try:
            rec = cls(path, fd, image.shape, image.dtype.newbyteorder("<"), provenance, info)
            rec._write_header_and_slots()
            rec.append(image, info)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)  # ours (O_EXCL) and holding no complete frame
            raise
        return rec

    def _write_header_and_slots(self) -> None:
        # first-IFD = 0 until page 0 is complete
        pwrite_all(self._fd, _EMPTY_HEADER, 0)
        xml = self._xml(frames=1, final=False)
        self._slot_size = self._slot_size_for(len(xml.encode("utf-8")))
        self._slots = [self._eof, self._eof + self._slot_size]
        self._eof += 2 * self._slot_size
        self._write_slot(0, xml)

    @staticmethod
    def _slot_size_for(n: int) -> int:
        return -(-(2 * n + 1024) // _PAGE) * _PAGE

    def _write_slot(self, index: int, xml: str) -> None:
        data = xml.encode("utf-8")  # OME-TIFF's encoding: Bio-Formats, tifffile, ome-types read it
        body = data + b" " * (self._slot_size - 1 - len(data)) + b"\x00"
        pwrite_all(self._fd, body, self._slots[index])

    # -- frames -------------------------------------------------------------------------------
    def append(self, image: np.ndarray, info: FrameInfo) -> None:
        """Write one frame as a new page and link it: once this returns, SIGKILL cannot lose it."""
        if self._closed:
            raise ValueError("recording is closed")
        image = conform_frame(image, self.shape, self.dtype)
        index = len(self.infos)
        row = {"index": index, **asdict(info)}
        info_json = json.dumps(row, default=_json_default, ensure_ascii=True, separators=(",", ":"))
        data_pos = -(-self._eof // 16) * 16
        ifd = _Ifd(self._page_entries(image, info_json, data_pos, first=index == 0))
        fields = [(ifd.next_field, 8)]
        if index == 0:
            fields.append((ifd.field_offsets(270), 16))  # count + offset of the description
        ifd_pos = _place(data_pos + image.nbytes, fields)
        external = {270: self._slots[self._active_slot]} if index == 0 else None
        ifd_bytes = ifd.pack(ifd_pos, external=external)
        pad = b"\x00" * (ifd_pos - data_pos - image.nbytes)
        # the page, complete, beyond everything a reader can reach
        pwrite_all(self._fd, image.data.cast("B"), data_pos)
        pwrite_all(self._fd, pad + ifd_bytes, data_pos + image.nbytes)
        # commit: link the complete page into the chain
        pwrite_all(self._fd, struct.pack("<Q", ifd_pos), self._link_pos)
        self._link_pos = ifd_pos + ifd.next_field
        if index == 0:
            self._desc_count_pos = ifd_pos + ifd.field_offsets(270)
        self._eof = ifd_pos + len(ifd_bytes)

        self._track(info)

    def _page_entries(self, image: np.ndarray, info_json: str, data_pos: int, *, first: bool) -> list:
        h, w = self.shape
        e = [
            _entry(254, _LONG, 1, struct.pack("<I", 0)),
            _entry(256, _LONG, 1, struct.pack("<I", w)),
            _entry(257, _LONG, 1, struct.pack("<I", h)),
            _entry(258, _SHORT, 1, struct.pack("<H", self.dtype.itemsize * 8)),
            _entry(259, _SHORT, 1, struct.pack("<H", 1)),  # no compression
            _entry(262, _SHORT, 1, struct.pack("<H", 1)),  # min-is-black
            _entry(273, _LONG8, 1, struct.pack("<Q", data_pos)),
            _entry(277, _SHORT, 1, struct.pack("<H", 1)),
            _entry(278, _LONG, 1, struct.pack("<I", h)),
            _entry(279, _LONG8, 1, struct.pack("<Q", image.nbytes)),
            _entry(339, _SHORT, 1, struct.pack("<H", _SAMPLE_FORMAT[self.dtype.kind])),
            _entry(FRAME_TAG, _ASCII, len(info_json) + 1, _ascii(info_json)),
        ]
        if self.pixel_size_um:
            # pixels per centimetre, for readers that ignore OME (ImageJ's plain TIFF reader)
            x_res = struct.pack("<II", *_rational(1e4 / self.pixel_size_um))
            y_res = struct.pack("<II", *_rational(1e4 / (self.acquisition.pixel_size_y_um or self.pixel_size_um)))
            e += [_entry(282, _RATIONAL, 1, x_res), _entry(283, _RATIONAL, 1, y_res),
                  _entry(296, _SHORT, 1, struct.pack("<H", 3))]
        if first:
            sw = _ascii(f"umvd-live {self.provenance.software_version}")
            e.append(_entry(270, _ASCII, self._slot_size, b""))  # the value lives in a slot
            e.append(_entry(305, _ASCII, len(sw), sw))
        return e

    # -- OME-XML --------------------------------------------------------------------------------
    def _xml(self, *, frames: int, final: bool) -> str:
        h, w = self.shape
        meta: dict[str, Any] = {
            "Name": f"{self.provenance.stream} {self.provenance.kind}",
            "MapAnnotation": {"Namespace": PROVENANCE_NS,
                              "Value": self.provenance_map(frames=frames, final=final)},
        }
        # at every checkpoint, not only at close: a killed recording keeps them
        meta.update(self.acquisition.ome(time_increment_s=self._measured_increment(frames)))
        name = self.coordinates.channel if self.coordinates is not None else None
        name = name or self.acquisition.channel
        if name is not None:
            channel: dict[str, Any] = {"Name": name}
            color = ome_color(name)
            if color is not None:
                channel["Color"] = color
            meta["Channel"] = channel
        if final and frames:
            times = [i.time for i in self.infos[:frames] if i.time is not None]
            if len(times) == frames:  # every frame has a time
                meta["Plane"] = {"DeltaT": [round(t - times[0], 6) for t in times],
                                 "DeltaTUnit": ["s"] * frames}
            meta["CommentAnnotation"] = {"Namespace": FRAMES_NS, "Value": self.frame_table_tsv(frames)}
        ox = tifffile.OmeXml(UUID=self._uuid, Creator=f"umvd-live {self.provenance.software_version}")
        ox.addimage(self.dtype, (frames, h, w), (frames, 1, 1, h, w, 1), axes="TYX", **meta)
        # a channel or position named with a control character (valid in a frame's meta) would
        # make the whole OME-XML unreadable; markup never holds one, so the text loses it alone
        return _NOT_XML.sub("", ox.tostring(declaration=True))

    def frame_table_tsv(self, frames: int) -> str:
        """The per-frame table; ``t_index`` is the acquisition's time point (``meta.index.t``)."""
        rows = ["frame\tseq\tt\tt_received\tstate\tmodel_step\tamplitude_gain\tt_index\tshift_y_px\tshift_x_px"]
        for i, f in enumerate(self.infos[:frames]):
            rows.append(f"{i}\t{f.seq}\t{f.t}\t{f.t_received}\t{f.state}\t{f.model_step}\t{f.amplitude_gain}"
                        f"\t{f.t_index}\t{f.shift_y_px}\t{f.shift_x_px}")
        return "\n".join(rows)

    def _publish_xml(self, xml: str) -> None:
        """Write ``xml`` where no reader looks yet, make it durable, then switch to it."""
        data_len = len(xml.encode("utf-8")) + 1
        idle = 1 - self._active_slot
        if data_len <= self._slot_size:
            self._write_slot(idle, xml)
            os.fsync(self._fd)
            pwrite_all(self._fd, struct.pack("<Q", self._slots[idle]), self._desc_count_pos + 8)
            self._active_slot = idle
            return
        # outgrown: a new, larger pair of slots at the end of the file (geometric growth)
        self._slot_size = self._slot_size_for(data_len)
        base = -(-self._eof // _PAGE) * _PAGE
        self._slots = [base, base + self._slot_size]
        self._eof = base + 2 * self._slot_size
        self._write_slot(0, xml)
        os.fsync(self._fd)
        pwrite_all(self._fd, struct.pack("<QQ", self._slot_size, self._slots[0]), self._desc_count_pos)
        self._active_slot = 0

    def checkpoint(self) -> None:
        """Make every appended frame durable and declare them in the OME-XML."""
        if self._closed:
            return
        os.fsync(self._fd)
        n = len(self.infos)
        sha = self.provenance.weights_sha256_entries()  # (taken first: one that comes meanwhile is
        if n != self._committed_xml_frames or sha != self._committed_hash:  # written next time)
            self._publish_xml(self._xml(frames=n, final=False))
            self._committed_xml_frames, self._committed_hash = n, sha

    def close(self) -> None:
        """Write the final OME-XML (per-plane DeltaT, frame table, complete=true; the weights hash
        waited for if still being computed) and close."""
        if self._closed:
            return
        try:
            self._await_weights_sha256()
            os.fsync(self._fd)
            n = len(self.infos)
            self._publish_xml(self._xml(frames=n, final=True))
            self._committed_xml_frames = n
            os.fsync(self._fd)
        finally:
            self._closed = True
            os.close(self._fd)

    def abandon(self) -> None:
        """Close after an I/O error: what is linked stays readable.

        The OME-XML is brought up to date if it fits its reserved slot: overwriting space the file
        already has needs no new blocks, so this works on a full disk too, and tifffile and Fiji
        then see every frame that was linked, not just those of the last checkpoint.
        """
        if self._closed:
            return
        try:
            n = len(self.infos)
            sha = self.provenance.weights_sha256_entries()
            xml = self._xml(frames=n, final=False)
            if (n != self._committed_xml_frames or sha != self._committed_hash) \
                    and len(xml.encode("utf-8")) + 1 <= self._slot_size:
                self._publish_xml(xml)
                self._committed_xml_frames, self._committed_hash = n, sha
        except OSError:
            pass  # the frames stay readable page by page (read_recording)
        finally:
            self._closed = True
            try:
                os.close(self._fd)
            except OSError:
                pass

    @property
    def frames_written(self) -> int:
        return len(self.infos)

    @property
    def closed(self) -> bool:
        return self._closed


def _rational(x: float) -> tuple[int, int]:
    den = 1000
    while x * den > 2**31 and den > 1:
        den //= 10
    return max(1, round(x * den)), den


def conform_frame(image: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A frame as a recording of ``shape`` and little-endian ``dtype`` stores it (contiguous, in
    that byte order); another shape or pixel type is refused."""
    image = np.ascontiguousarray(image)
    if image.shape != shape or image.dtype.newbyteorder("<") != dtype:
        raise ValueError(f"frame {image.shape} {image.dtype} does not match the recording's {shape} {dtype}")
    return image.astype(dtype, copy=False)


# -- whole-movie API (offline parity: `umvd-live denoise` writes the same format) ---------------
def write_movie(path: str | os.PathLike, frames: Iterable[np.ndarray], infos: Iterable[FrameInfo],
                provenance: Provenance, create: Callable[..., Any] | None = None) -> Path:
    """Write a whole movie (T×H×W array or an iterable of 2-D frames) with one FrameInfo each.

    The same format, crash-safety and metadata as a live recording; frames may be a generator, so
    a long movie never has to fit in memory. ``create``: the recording's constructor, default
    `RecordingFile.create` (`omezarr.ZarrRecording.create` writes OME-Zarr the same way).
    """
    create = create or RecordingFile.create
    rec: Any = None
    checkpoint_at = time.monotonic() + 1.0
    try:
        for image, info in zip(frames, infos, strict=True):
            if rec is None:
                rec = create(path, image, info, provenance)
            else:
                rec.append(image, info)
            if time.monotonic() >= checkpoint_at:
                rec.checkpoint()
                checkpoint_at = time.monotonic() + 1.0
    except BaseException:
        if rec is not None:
            rec.abandon()
        raise
    if rec is None:
        raise ValueError("no frames to write")
    rec.close()
    return Path(path)


# -- reading -------------------------------------------------------------------------------------
def _parse_provenance(description: str) -> dict[str, Any]:
    try:
        root = ET.fromstring(description.strip().rstrip("\x00"))
    except ET.ParseError as exc:
        raise RecordingFormatError(f"OME-XML does not parse: {exc}") from None
    out: dict[str, Any] = {}
    for ann in root.iter(f"{_OME_NS}MapAnnotation"):
        if ann.get("Namespace") == PROVENANCE_NS:
            for m in ann.iter(f"{_OME_NS}M"):
                key = m.get("K")
                if key is not None:
                    out[key] = m.text or ""
    pixels = root.find(f"{_OME_NS}Image/{_OME_NS}Pixels")
    if pixels is not None:
        out["ome_size_t"] = int(pixels.get("SizeT", "0"))
    return out


def _typed(prov: dict[str, Any]) -> dict[str, Any]:
    def num(v: Any, kind: type) -> Any:
        try:
            return kind(v)
        except (TypeError, ValueError):
            return None

    out = dict(prov)
    for key in ("window", "frames", "first_seq", "last_seq", "first_live_frame",
                *(k for k in out if k.startswith("axis."))):
        if key in out:
            out[key] = num(out[key], int)
    if "pixel_size_um" in out:
        out["pixel_size_um"] = num(out["pixel_size_um"], float)
    for key in ("preset", "weights_sha256_at_start", "device", "source"):
        if out.get(key) == "None":
            out[key] = None
    out["complete"] = out.get("complete") == "true"
    return out


def _has_frames(path: Path) -> bool:
    """False for a recording killed before its first frame was complete, its header included (the
    file exists, empty or holding part of `_EMPTY_HEADER`, from `create`'s open to its first
    write: a reader polling a recording as it starts sees that too); raises for a file that is no
    little-endian BigTIFF."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) < 16 and _EMPTY_HEADER.startswith(head):
        return False
    if len(head) < 16 or head[:2] != b"II" or struct.unpack("<H", head[2:4])[0] != 43:
        raise RecordingFormatError(f"{path} is not a little-endian BigTIFF")
    return struct.unpack("<Q", head[8:16])[0] != 0


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance map of a recording (typed, as in `read_recording`) without its pixels: what
    a reader needs to sort files (``stream``, ``kind``, ``recording_id``, the acquisition's
    ``group``, ``axis.*``, ``channel``, ``position``). ``frames`` is what the OME-XML declares
    (the last checkpoint's count after a kill); a file killed before its first frame gives
    ``{"frames": 0}``."""
    path = Path(path)
    if not _has_frames(path):
        return {"frames": 0, "complete": False}
    with tifffile.TiffFile(path) as tif:
        prov = _typed(_parse_provenance(tif.pages.first.description))
    prov.pop("ome_size_t", None)
    return prov


def read_recording(path: str | os.PathLike) -> tuple[np.ndarray, list[FrameInfo], dict[str, Any]]:
    """Read a recording, complete or killed: (frames T×H×W, one FrameInfo per frame, provenance).

    All linked pages are read (each is complete by construction), including those a killed
    recorder wrote after its last OME-XML checkpoint. The provenance dict holds the OME
    MapAnnotation's keys (typed) and, recomputed from the frames themselves: ``frames``,
    ``seq_gaps`` (inclusive (first, last) ranges), ``seq_restarts``, ``first_live_frame``,
    ``warmup_frames`` (indices with state "warmup"), ``complete`` (a clean stop wrote the final
    metadata) and ``frames_declared_in_ome`` (how many the OME-XML declares; fewer after a kill).
    """
    path = Path(path)
    if not _has_frames(path):
        # killed before its first frame was complete: an empty recording
        return np.zeros((0, 0, 0), np.float32), [], {"frames": 0, "complete": False, "seq_gaps": [],
                                                      "seq_restarts": [], "first_live_frame": None,
                                                      "warmup_frames": [], "frames_declared_in_ome": 0}
    with tifffile.TiffFile(path) as tif:
        prov = _typed(_parse_provenance(tif.pages.first.description))
        images = []
        infos: list[FrameInfo] = []
        for page in tif.pages:
            if not isinstance(page, tifffile.TiffPage):  # frames come only with useframes, never set here
                raise RecordingFormatError(f"{path}: page {page.index} read as a TiffFrame")
            tag = page.tags.get(FRAME_TAG)
            if tag is None:
                raise RecordingFormatError(f"{path}: page {page.index} has no frame metadata tag")
            row = json.loads(tag.value)
            row.pop("index", None)
            infos.append(FrameInfo(**row))
            images.append(page.asarray())
    frames = np.stack(images) if images else np.zeros((0, 0, 0), np.float32)
    seqs = [i.seq for i in infos]
    prov["frames_declared_in_ome"] = prov.pop("ome_size_t", None)
    prov["frames"] = len(infos)
    prov["seq_gaps"] = seq_gaps(seqs)
    prov["seq_restarts"] = seq_restarts(seqs)
    prov["warmup_frames"] = [i for i, f in enumerate(infos) if f.state == "warmup"]
    prov["first_live_frame"] = next((i for i, f in enumerate(infos) if f.state == "live"), None)
    return frames, infos, prov
