"""Lossless on-the-fly recording of denoised (and optionally raw) frames, one OME-TIFF per stream.

The daemon's processing thread hands every frame of a recorded stream to a `RecordingSession`
(`submit_denoised`, `submit_raw`); those calls copy at most one frame, do no I/O and never raise,
so a slow or full disk can never stall or kill processing. A writer thread drains the session's
`SpillQueue` (memory budget, overflow spilled to disk, nothing dropped) into crash-safe
`RecordingFile`s, checkpointing each file every ``checkpoint_interval_s``. A recording that falls
behind finishes after the acquisition ends: `stop(wait=False)` returns at once, `status()` says
how far behind the writer is. An I/O error (disk full) ends the session with `error` set and
``on_error`` called; the caller keeps serving.

Each stream gets a file of its own, also each position, channel and z plane of a
multi-dimensional acquisition (``cam0.p0.GCaMP.z2``): one writer appends to each file, so every
file stays append-only and crash-safe, and a stream's frames are written at their own pace. The
files name their place in the acquisition and the session's ``recording_id`` in their OME-XML;
`umvd_live.recording.acquisition.read_acquisition` assembles them.

A stream whose frame shape changes goes on in a new file (a part). Each file names the provenance
its stream had at the file's first frame (`renew_provenance`: the daemon's new engine after a
shape change). A weights hash still being computed (`Provenance.weights_sha256_future`) never
holds the writer up, which writes every stream: a part left at a shape change is closed once its
hash is known (checkpointed meanwhile), only the session's end waits for one (`HASH_WAIT_S`).

A base path ending in ``.ome.zarr`` records OME-Zarr stores instead (`umvd_live.recording.omezarr`).

Paths that arrive over the control socket go through `wire.security.confine_path` first.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from umvd_live.recording.ometiff import FrameInfo, Provenance, RecordingFile
from umvd_live.recording.omezarr import ZARR_SUFFIXES, ZarrRecording, is_zarr_path
from umvd_live.recording.spillqueue import QueueClosed, QueueOverflow, SpillQueue
from umvd_live.wire.protocol import STREAM_NAME, FrameHeader

log = logging.getLogger(__name__)

#: One stream's file or store: the base path's extension picks the format.
Recording = RecordingFile | ZarrRecording

DEFAULT_MEMORY_BUDGET = 512 * 1024 * 1024
FLUSH_INTERVAL_S = 1.0  # the issue asks for <= 2 s between flushes


class RecordingError(ValueError):
    """A recording request that cannot be honoured (bad path, missing directory, ...)."""


#: The name endings of the movie files we read and write: OME-TIFF (or plain TIFF) and OME-Zarr.
MOVIE_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", *ZARR_SUFFIXES)


def is_movie_path(path: str | os.PathLike) -> bool:
    """Whether ``path``'s name ends as a movie file's does (`MOVIE_SUFFIXES`, any case)."""
    return Path(path).name.lower().endswith(MOVIE_SUFFIXES)


def recording_stem(base: str | os.PathLike) -> str:
    """``dir/rec.ome.tif`` -> ``rec``: the start of every file name of a recording."""
    name = Path(base).name
    for suffix in MOVIE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def stream_path(base: str | os.PathLike, stream: str, *, raw: bool = False, part: int = 1) -> Path:
    """``rec.ome.tif`` + ``cam0`` -> ``rec_cam0.ome.tif`` (raw copy: ``rec_cam0.raw.ome.tif``;
    a later part after a frame-shape change: ``rec_cam0-part2.ome.tif``)."""
    if not STREAM_NAME.match(stream):
        raise RecordingError(f"stream name {stream!r} must match {STREAM_NAME.pattern}")
    name = (recording_stem(base) + f"_{stream}" + (f"-part{part}" if part > 1 else "")
            + (".raw" if raw else "") + (".ome.zarr" if is_zarr_path(base) else ".ome.tif"))
    return Path(base).with_name(name)


@dataclass(frozen=True)
class RecordingRequest:
    """What to record: from ``serve --record`` or a ``record_start`` control command."""

    path: Path  # base path; each stream's file name is derived from it (`stream_path`)
    streams: frozenset[str] | None = None  # None: every stream
    raw: bool = False  # also keep a copy of the input frames as received
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET  # queued pixels held in memory before spilling
    hard_limit_bytes: int | None = None  # memory ceiling if even spilling lags (default 2x budget)
    checkpoint_interval_s: float = FLUSH_INTERVAL_S


@dataclass(frozen=True)
class RecorderStatus:
    """How the recording is doing; ``behind_s`` is the span of acquisition time still queued."""

    recording: bool  # still accepting frames
    finished: bool  # every accepted frame written and the files closed (or failed)
    files: dict[str, list[str]]  # "cam0" / "cam0.raw" -> paths (several after a shape change)
    frames_submitted: int
    frames_written: int
    queued_frames: int
    queued_bytes_in_memory: int
    spilled_frames: int  # frames whose pixels wait in the spill file now
    spilled_total: int
    behind_s: float
    frames_lost: int  # accepted but never written (only after an error)
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ProvenanceFactory = Callable[[str], Provenance]


class RecordingSession:
    """One recording (``serve --record`` or ``record_start`` ... ``record_stop``), every stream.

    Thread contract: `submit_denoised`/`submit_raw` from one thread (the daemon's processing
    thread); `status`, `stop`, `records` from any thread.
    """

    def __init__(self, request: RecordingRequest, *, provenance: ProvenanceFactory | None = None,
                 on_error: Callable[[str], None] | None = None):
        base = Path(request.path)
        if not base.name or base.name in (".", ".."):
            raise RecordingError(f"{str(base)!r} names no file")
        for s in request.streams or ():
            stream_path(base, s)  # validates the names
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RecordingError(f"cannot create {str(base.parent)!r}: {exc.strerror}") from None
        if not os.access(base.parent, os.W_OK):
            raise RecordingError(f"{str(base.parent)!r} is not writable")
        if not 0 < request.checkpoint_interval_s <= 2.0:
            raise RecordingError("checkpoint_interval_s must be in (0, 2]")
        self.request = dataclasses.replace(request, path=base)
        #: written into every file of this session: what `read_acquisition` groups files by
        self.recording_id = uuid.uuid4().hex
        self._provenance_for = provenance or (lambda stream: Provenance(stream=stream))
        self._on_error = on_error
        # a short fixed name (``.umvd-recorder-<id>-*.spill``), not the base name: a base name
        # near the file system's 255-byte limit would make the spill file's too long (ENAMETOOLONG
        # the first time the disk falls behind)
        self._queue = SpillQueue(base.parent, request.memory_budget_bytes, request.hard_limit_bytes,
                                 name=f"umvd-recorder-{self.recording_id[:8]}")
        self._lock = threading.Lock()
        self._accepting = True
        self._stop_requested = threading.Event()
        self._finished = threading.Event()
        self.error: str | None = None
        self._provenances: dict[str, Provenance] = {}
        self._files: dict[str, list[str]] = {}
        self._submitted = 0
        self._written = 0
        self._lost = 0
        self._first_submit_mono: float | None = None
        self._last_submit_mono: float | None = None
        self._last_written_mono: float | None = None
        self._warned_no_image = False
        #: Writer thread: parts left at a shape change whose weights hash is still being computed,
        #: closed once it is known (`_close_if_hashed`, at each checkpoint) or at the end.
        self._closing: list[Recording] = []
        self._writer = threading.Thread(target=self._write_loop, name="umvd-recorder", daemon=True)
        self._writer.start()

    # -- producer side (the daemon's processing thread) -----------------------------------------
    def records(self, stream: str) -> bool:
        """Whether frames of ``stream`` are recorded: the daemon must then infer every frame."""
        return self._accepting and (self.request.streams is None or stream in self.request.streams)

    def submit_denoised(self, stream: str, header: FrameHeader, image: np.ndarray | None, *,
                        state: str, model_step: int, t_received: float | None = None,
                        amplitude_gain: float = 1.0, jitter_shift_px: tuple[float, float] | None = None) -> bool:
        """Queue one denoised frame (``header`` is the input frame's; ``amplitude_gain`` the
        factor the engine restored its amplitude by, ``jitter_shift_px`` the shift it moved it by,
        `engine.outputs.DenoisedFrame`). Never blocks
        or raises; returns False when the frame is not recorded (stream not selected, stopped, error)."""
        if image is None:
            # a skipped inference cannot be recorded; its seq shows up as a gap
            if not self._warned_no_image:
                self._warned_no_image = True
                log.warning("recording %s: frame seq %d had no denoised image (infer=False)",
                            stream, header.seq)
            return False
        return self._submit(stream, "denoised", header, image, state, model_step, t_received, amplitude_gain,
                            jitter_shift_px)

    def submit_raw(self, stream: str, header: FrameHeader, pixels: np.ndarray, *,
                   t_received: float | None = None) -> bool:
        """Queue one input frame as received (only if the request asked for ``raw``)."""
        if not self.request.raw:
            return False
        return self._submit(stream, "raw", header, pixels, None, None, t_received, None, None)

    def _submit(self, stream: str, kind: str, header: FrameHeader, image: np.ndarray,
                state: str | None, model_step: int | None, t_received: float | None,
                amplitude_gain: float | None, jitter_shift_px: tuple[float, float] | None) -> bool:
        if not self.records(stream):
            return False
        try:
            provenance = self._provenances.get(stream)
            if provenance is None:
                provenance = self._provenances[stream] = self._provenance(stream)
            # always a copy: the caller's buffer (a ZeroMQ message, an engine output) may be
            # reused after this call returns; ~50 µs per MiB
            image = np.array(image, dtype=np.float32 if kind == "denoised" else None, order="C")
            now_mono = time.monotonic()
            item = {
                "stream": stream,
                "kind": kind,
                "seq": header.seq,
                "t": header.t,
                "t_received": t_received if t_received is not None else time.time(),
                "state": state,
                "model_step": model_step,
                "amplitude_gain": None if amplitude_gain is None else float(amplitude_gain),
                "jitter_shift_px": None if jitter_shift_px is None else (float(jitter_shift_px[0]),
                                                                         float(jitter_shift_px[1])),
                "meta": header.meta,
                "mono": now_mono,
                "provenance": provenance,  # a new file opened for this frame names it
            }
            self._queue.put(item, image)
        except QueueClosed:
            return False  # stop() raced with this call: the frame was not taken
        except QueueOverflow as exc:
            self._fail(f"recording stopped: the disk cannot keep up ({exc})")
            return False
        except Exception as exc:  # never let the recorder kill the caller
            self._fail(f"recording stopped: {type(exc).__name__}: {exc}")
            return False
        with self._lock:
            self._submitted += 1
            if self._first_submit_mono is None:
                self._first_submit_mono = now_mono
            self._last_submit_mono = now_mono
        return True

    def renew_provenance(self, stream: str) -> None:
        """``stream``'s frames come from another network from now on (the daemon's new engine after
        a shape change, a reset, an end): its next frame takes a new provenance, which the files
        opened from then on name (a new part); the files already open keep theirs. Producer thread."""
        self._provenances.pop(stream, None)

    def _provenance(self, stream: str) -> Provenance:
        # called on the producer thread at the stream's first frame, and at its first after
        # `renew_provenance`: the daemon begins the hash of its engine's weights then
        # (`Provenance.weights_sha256_future`: the files name it once known)
        try:
            return self._provenance_for(stream)
        except Exception as exc:  # record anyway, and say why the provenance is thin
            log.exception("recording %s: the provenance callback failed", stream)
            return Provenance(stream=stream, extra={"provenance_error": f"{type(exc).__name__}: {exc}"})

    # -- control side ---------------------------------------------------------------------------
    def stop(self, *, wait: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting frames; the writer drains what is queued, then writes the final
        metadata. Returns whether it has finished (always, with ``wait`` and no timeout)."""
        self._accepting = False
        self._stop_requested.set()
        if wait:
            self._finished.wait(timeout)
        return self._finished.is_set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def status(self) -> RecorderStatus:
        q = self._queue.stats()
        with self._lock:
            behind = 0.0
            if q.queued and self._last_submit_mono is not None:
                # the newest queued frame was submitted this long after the last one written
                ref = self._last_written_mono or self._first_submit_mono or self._last_submit_mono
                behind = self._last_submit_mono - ref
            return RecorderStatus(
                recording=self._accepting,
                finished=self._finished.is_set(),
                files={k: list(v) for k, v in self._files.items()},
                frames_submitted=self._submitted,
                frames_written=self._written,
                queued_frames=q.queued,
                queued_bytes_in_memory=q.memory_bytes,
                spilled_frames=q.spilled,
                spilled_total=q.spilled_total,
                behind_s=max(0.0, behind),
                frames_lost=self._lost,
                error=self.error,
            )

    def _fail(self, message: str) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = message
            self._accepting = False
        log.error("%s", message)
        self._stop_requested.set()
        if self._on_error is not None:
            try:
                self._on_error(message)
            except Exception:  # a broken callback must not take the writer down
                log.exception("recording on_error callback failed")

    # -- writer thread --------------------------------------------------------------------------
    def _write_loop(self) -> None:
        files: dict[tuple[str, str], Recording] = {}
        closing = self._closing
        parts: dict[tuple[str, str], int] = {}
        next_checkpoint = time.monotonic() + self.request.checkpoint_interval_s
        sealed = False
        in_hand = False  # a frame taken from the queue and not yet written: lost if this fails
        try:
            while self.error is None:
                if self._queue.error is not None and not sealed:
                    # memory is no longer bounded; once sealed it only shrinks, and the frame
                    # whose spill failed is back in memory, so the drain writes it all the same
                    raise self._queue.error
                if not sealed and self._stop_requested.is_set():
                    self._queue.seal()  # a submit racing with stop() is refused, not lost
                    sealed = True
                item = self._queue.get(timeout=min(0.2, self.request.checkpoint_interval_s / 2))
                if item is not None:
                    in_hand = True
                    self._write_one(files, parts, *item)
                    in_hand = False
                elif sealed and not len(self._queue):
                    # `get` also times out while the spill thread holds a frame, so only an empty
                    # sealed queue ends the recording: every accepted frame is written, however
                    # long the disk takes (checkpointed as before, a kill meanwhile loses little)
                    break
                if time.monotonic() >= next_checkpoint:
                    for rec in files.values():
                        rec.checkpoint()
                    for rec in list(closing):
                        _close_if_hashed(rec, closing)
                    next_checkpoint = time.monotonic() + self.request.checkpoint_interval_s
            for rec in [*closing, *files.values()]:
                if self.error is None:
                    rec.close()  # the recording's end: may wait for a hash (`HASH_WAIT_S`)
        except OSError as exc:
            path = getattr(exc, "filename", None) or getattr(exc, "recording_path", None)
            name = errno.errorcode.get(exc.errno or 0, "error")
            # the frames in each file (an OME-Zarr store's writes in flight behind a failed one
            # are not: `frames_written` counts them)
            written = ", ".join(f"{k}: {len(r.infos)} frames" for k, r in files.items())
            self._fail(f"recording stopped: writing {path or 'the recording'} failed: "
                       f"{exc.strerror or exc} [{name}]; files keep what was written ({written})")
        except Exception as exc:  # pragma: no cover - a bug; still never kill the caller
            log.exception("recorder writer failed")
            self._fail(f"recording stopped: {type(exc).__name__}: {exc}")
        finally:
            unkept = 0
            try:
                if self.error is not None:
                    for rec in [*closing, *files.values()]:
                        try:
                            rec.abandon()  # what is linked stays readable; no more writes to a failing disk
                        except Exception:  # the others are abandoned all the same
                            log.exception("recording: abandoning %s failed", rec)
                        # an OME-Zarr store has taken a frame once its chunk write started; one
                        # that had not finished by the error is not in the store
                        unkept += rec.frames_written - len(rec.infos)
            finally:  # whatever happened above, `stop(wait=True)` must return
                lost = len(self._queue) + int(in_hand) + unkept
                self._queue.close()
                with self._lock:
                    self._written -= unkept
                    self._lost += lost
                self._finished.set()

    def _write_one(self, files: dict[tuple[str, str], Recording], parts: dict[tuple[str, str], int],
                   item: dict[str, Any], image: np.ndarray) -> None:
        # (stream, kind), not a name: a stream may itself be called "cam0.raw"
        key = (item["stream"], item["kind"])
        info = FrameInfo(seq=item["seq"], t=item["t"], t_received=item["t_received"],
                         state=item["state"], model_step=item["model_step"],
                         amplitude_gain=item["amplitude_gain"], jitter_shift_px=item["jitter_shift_px"],
                         meta=item["meta"])
        rec = files.get(key)
        if rec is not None and (rec.shape != image.shape or rec.dtype != image.dtype.newbyteorder("<")):
            # a new frame shape or dtype (a camera ROI change): start a new part; this one closes
            # once its weights hash is known (`_close_if_hashed`: at once, as a rule)
            log.warning("recording %s (%s): frames changed from %s %s to %s %s; starting a new file",
                        *key, rec.shape, rec.dtype, image.shape, image.dtype)
            del files[key]
            self._closing.append(rec)
            _close_if_hashed(rec, self._closing)
            rec = None
        if rec is None:
            rec = self._open(item, image, info, parts)
            files[key] = rec
        else:
            try:
                rec.append(image, info)
            except OSError as exc:
                exc.recording_path = str(rec.path)  # type: ignore[attr-defined]  # read back by getattr
                raise
        with self._lock:
            self._written += 1
            self._last_written_mono = item["mono"]

    def _open(self, item: dict[str, Any], image: np.ndarray, info: FrameInfo,
              parts: dict[tuple[str, str], int]) -> Recording:
        stream, raw = item["stream"], item["kind"] == "raw"
        key = (stream, item["kind"])
        base = item["provenance"]  # the stream's as this frame was taken: its network's
        prov = dataclasses.replace(base, recording_id=self.recording_id, kind="raw" if raw else base.kind)
        part = parts.get(key, 0) + 1
        while True:
            path = stream_path(self.request.path, stream, raw=raw, part=part)
            try:
                # the base path's extension picks the format: OME-Zarr stores or OME-TIFF files
                rec = (ZarrRecording if is_zarr_path(path) else RecordingFile).create(path, image, info, prov)
            except FileExistsError:
                part += 1  # never overwrite: an earlier recording keeps its file
                continue
            except OSError as exc:
                exc.recording_path = str(path)  # type: ignore[attr-defined]  # read back by getattr
                raise
            break
        parts[key] = part
        with self._lock:
            self._files.setdefault(f"{stream}.raw" if raw else stream, []).append(str(path))
        return rec


def _close_if_hashed(rec: Recording, closing: list[Recording]) -> None:
    """Close a part left at a shape change (no frame comes to it any more) if its weights hash is
    settled: its final metadata names the hash. Until then it is checkpointed (a hash that comes
    is written) and left open, rather than holding up the writer of every stream."""
    if rec.provenance.wait_for_weights_sha256(timeout=0):
        rec.close()
        closing.remove(rec)  # (after the close: one that fails is abandoned with the others)
    else:
        rec.checkpoint()
