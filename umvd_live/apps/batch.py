"""`umvd-live batch`: many recorded movies through `denoise`'s engine, on a Dask cluster.

A lab's nightly archive outgrows one machine; people run such work on the cluster they have
(a Dask cluster, or SLURM through dask-jobqueue), so this is plain dask.distributed: a
`LocalCluster` of worker processes on this machine (``--workers``), or any running scheduler
(``--scheduler``). Workers must see the inputs and ``--output-dir`` (a shared file system).

Work split. A movie of up to ``chunk_frames`` frames is one task that runs `denoise`'s own
code path (`denoise.denoise_movie`, `denoise.write_denoised`): its output is `denoise`'s for
the same options and seed. A longer movie is trained once by one task (`train_movie`: `--offline`,
the paper's recipe on the whole movie; streamed, the warm start on its first burst) and its
frames are then denoised in time chunks by several tasks that share those weights
(`denoise_chunk`), each chunk reading N//2 plus the context frames before its first output
frame and N//2 after its last, so every output sees the window and context blocks it would see
in one piece; one more task joins the chunks and writes the file (`write_chunks`). A chunk's task
reads only its frames (`movie.MovieFrames`): a worker's memory is a chunk's, not the movie's.
docs/batch.md has what chunking does to quality. A file of several streams (channels, planes,
positions) is an input per stream, each on its own engine, written where `denoise` writes it
(`denoise.stream_outputs`).

Failure. A lost worker's tasks are rerun by the scheduler, and a task that raised is retried
(``retries``). An output is written under a temporary name and renamed, so the final name only
ever holds a whole file. A failed input gets one line and the others go on; the exit status is 1
when any failed. A manifest (JSON) lists inputs → outputs with provenance and timings, written
after every input, and keeps an earlier batch's entries for the outputs this one does not touch;
``--resume`` skips the inputs whose output exists and was made from that input (its provenance's
``source``; with ``--save-models``: and its model, which is put in place before the output).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import itertools
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from umvd_live.apps import denoise
from umvd_live.apps.cli import engine_config_from_args
from umvd_live.engine import DenoisedFrame, EngineConfig, StreamDenoiser
from umvd_live.engine.amplitude import AmplitudeGain
from umvd_live.engine.budget import cpu_cores
from umvd_live.engine.cellblend import CellBlend
from umvd_live.engine.changes import Change, ChangeDetector
from umvd_live.engine.checkpoint import CheckpointError
from umvd_live.engine.jitter import JitterFollowed
from umvd_live.engine.normalization import sanitize
from umvd_live.portable import replace_file
from umvd_live.recording.movie import MovieError, MovieFrames
from umvd_live.recording.ometiff import Provenance, read_provenance
from umvd_live.recording.omezarr import is_zarr_path, read_zarr_provenance
from umvd_live.recording.session import recording_stem

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "umvd-live-batch/1"
#: Movies up to this many frames are one task; longer ones are split (`plan_chunks`).
DEFAULT_CHUNK_FRAMES = 2000
#: The output's name ending, which replaces the input's (``movie.tif`` -> ``DIR/movie.ome.tif``).
_OUTPUT_SUFFIX = {"ome-tiff": ".ome.tif", "ome-zarr": ".ome.zarr"}
#: Input errors are returned as `Failed`, not raised: rerunning them (Dask's retries) cannot help.
_INPUT_ERRORS = (MovieError, CheckpointError, ValueError, RuntimeError)


# -- plan ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchOptions:
    engine: EngineConfig
    offline: bool = False
    chunk_frames: int = DEFAULT_CHUNK_FRAMES
    save_models: bool = False  # each movie's final weights beside its output (NAME.pt)
    retries: int = 1  # reruns of a task that raised (a lost worker's tasks are rerun anyway)
    offline_steps: int | None = None  # None: `denoise --offline`'s (`denoise.default_offline_steps`)


@dataclass(frozen=True)
class Chunk:
    """Output frames [start, stop) of a movie, denoised from the frames [read_start, read_stop),
    all in the segment [segment_start, segment_end) (`umvd_live.engine.changes`)."""

    index: int
    start: int
    stop: int
    read_start: int
    read_stop: int
    segment: int = 0
    segment_start: int = 0
    segment_end: int | None = None


def plan_chunks(frames: int, chunk_frames: int, k: int, context: tuple[int, ...],
                changes: tuple[int, ...] = ()) -> list[Chunk]:
    """Equal time chunks of at most ``chunk_frames`` output frames, within the segments that the
    ``changes`` (first frames of new segments) start. Each reads k + sum(context) frames before
    its first output and as many after its last (the window's halves and the context blocks,
    which a recorded movie takes from both sides: `denoise.file_config`), never beyond its
    segment: the engine treats each segment apart, so a chunk's output frames then see exactly
    the frames they would see in one piece."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    lead = k + sum(context)
    starts = sorted({0, *(c for c in changes if 0 < c < frames)})
    chunks: list[Chunk] = []
    for segment, (first, end) in enumerate(itertools.pairwise([*starts, frames])):
        n = max(1, -(-(end - first) // chunk_frames))
        bounds = [first + round(i * (end - first) / n) for i in range(n + 1)]
        chunks += [Chunk(len(chunks) + i, a, b, max(first, a - lead), min(end, b + lead), segment, first, end)
                   for i, (a, b) in enumerate(itertools.pairwise(bounds))]
    return chunks


def output_name(source: Path, fmt: str = "ome-tiff") -> str:
    return recording_stem(source) + _OUTPUT_SUFFIX[fmt]


def expand_inputs(patterns: list[str]) -> tuple[list[Path], list[str]]:
    """(inputs in order without repeats, patterns that matched nothing). A path without glob
    characters is kept as it is, so a missing file fails with `read_movie`'s own message; so is
    an existing path, its ``[`` and ``]`` taken literally (``cell[1].tif``)."""
    found: list[Path] = []
    empty: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern) and not os.path.lexists(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                empty.append(pattern)
            found += [Path(m) for m in matches]
        else:
            found.append(Path(pattern))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique, empty


# -- tasks (run on the workers) ------------------------------------------------------------------
@dataclass(frozen=True)
class Failed:
    """An input that cannot be denoised, in one line."""

    message: str


@dataclass(frozen=True)
class Written:
    """An output written whole under its final name."""

    output: str
    frames: int
    shape: tuple[int, int]
    model_step: int
    provenance: dict[str, Any]
    seconds: dict[str, float]
    workers: list[str]


@dataclass(frozen=True)
class WarmModel:
    """A long movie's trained weights (a checkpoint's bytes), shared by its chunks."""

    weights: bytes
    frames: int
    shape: tuple[int, int]
    k: int
    context: tuple[int, ...]
    changes: tuple[int, ...]  # first frames of the movie's segments after the first
    provenance: Provenance
    seconds: float
    worker: str
    stream: str  # the movie's stream (`MovieFrames`' short name)


@dataclass(frozen=True)
class ChunkResult:
    chunk: Chunk
    frames: np.ndarray  # (stop - start, H, W) float32
    outputs: list[DenoisedFrame]  # without images: the frame records
    seconds: float
    worker: str
    gains: tuple[AmplitudeGain, ...] = ()  # the chunk's amplitude restoration (`engine.amplitude`), movie frames
    blends: tuple[CellBlend, ...] = ()  # the chunk's cell-scale blend (`engine.cellblend`), movie frames
    follows: tuple[JitterFollowed, ...] = ()  # the chunk's jitter followed (`engine.jitter`), movie frames


def _worker() -> tuple[str, int]:
    """(address, tasks it runs at once) of the Dask worker running this task, or ("local", 1)."""
    try:
        from distributed import get_worker

        worker = get_worker()
        return worker.address, worker.state.nthreads
    except (ImportError, ValueError):
        return "local", 1


def _task_config(config: EngineConfig) -> EngineConfig:
    """The engine's torch threads: as given, else this machine's cores divided among the tasks
    its worker runs at once, so tasks side by side never oversubscribe the cores (several workers
    on one host: give ``--threads``)."""
    if config.cpu_threads is not None:
        return config
    return replace(config, cpu_threads=max(1, cpu_cores() // _worker()[1]))


def _model_path(output: Path) -> Path:
    """Where ``--save-models`` puts a movie's weights: NAME.pt beside NAME.ome.tif."""
    return output.with_name(output_name(output).removesuffix(_OUTPUT_SUFFIX["ome-tiff"]) + ".pt")


def start_movie(source: str, stream: str | None, output: str, options: BatchOptions) -> Written | WarmModel | Failed:
    """A movie's (one stream's) first task: the whole of it if short (`denoise`'s code path), else
    its training."""
    started = time.monotonic()
    try:
        config = _task_config(options.engine)
        with MovieFrames(source, stream) as reader:
            if len(reader) > options.chunk_frames:
                return train_movie(reader, config, options)
            movie = reader.read(0, len(reader))
            read_s = time.monotonic() - started
            result = denoise.denoise_movie(movie, config, offline=options.offline, offline_steps=options.offline_steps)
            try:
                provenance = denoise.denoise_provenance(result.engine, reader, offline=options.offline)
                written = time.monotonic()
                if options.save_models:  # first: an output is never left without its model
                    denoise.write_atomic(_model_path(Path(output)), result.engine.save_weights, overwrite=True)
                denoise.write_atomic(Path(output), lambda tmp: denoise.write_denoised(
                    tmp, reader, result.frames, result.outputs, provenance))
            finally:
                result.engine.close()
    except _INPUT_ERRORS as exc:
        return Failed(str(exc))
    return Written(output, len(movie), movie.shape[1:], result.engine.model_step, _provenance_dict(provenance),
                   {"read": read_s, "denoise": result.seconds, "write": time.monotonic() - written,
                    "task": time.monotonic() - started}, [_worker()[0]])


def train_movie(reader: MovieFrames, config: EngineConfig, options: BatchOptions) -> WarmModel:
    """The weights a long movie's chunks share, trained as `denoise` trains them: `--offline`, on
    the whole movie at once (held in memory, as `denoise --offline` holds it); streamed, every
    frame pushed in order with inline training, read a chunk's length at a time (the replay
    buffer holds what its byte bound allows)."""
    started = time.monotonic()
    frames = len(reader)
    engine = StreamDenoiser(denoise.file_config(config, frames))
    try:
        if options.offline:
            engine.pretrain(reader.read(0, frames), options.offline_steps or denoise.default_offline_steps(frames))
        else:
            for first in range(0, frames, options.chunk_frames):
                for frame in reader.read(first, min(frames, first + options.chunk_frames)):
                    engine.push(frame, infer=False)
        found = find_changes(reader, config, options.chunk_frames)
        changes = tuple(change.index for change in found)
        chunks = len(plan_chunks(frames, options.chunk_frames, engine.k, engine.spec.context, changes))
        # the changes the chunks are planned by (`--offline`'s pre-training pushes no frames: its
        # engine sees none)
        provenance = denoise.denoise_provenance(engine, reader, offline=options.offline, changes=found,
                                                chunks=chunks)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "weights.pt"
            engine.save_weights(path)
            weights = path.read_bytes()
        return WarmModel(weights, frames, reader.shape[1:], engine.k, engine.spec.context, changes,
                         provenance, time.monotonic() - started, _worker()[0], reader.stream)
    finally:
        engine.close()


def find_changes(reader: MovieFrames, config: EngineConfig, block: int) -> tuple[Change, ...]:
    """The changes that would start new segments when the whole movie is pushed, each at its
    frame: the engine's change detector sees every frame in order, and only the frames
    (`umvd_live.engine.changes`), read ``block`` frames at a time."""
    detector = ChangeDetector(config.changes)
    found = []
    for first in range(0, len(reader), block):
        for i, frame in enumerate(reader.read(first, first + block), first):
            clean, clean_ok = sanitize(frame)
            # as the engine: NaN/Inf frames are not tested
            change = detector.observe(clean) if clean_ok else None
            if change is not None:
                found.append(replace(change, index=i))
    return tuple(found)


def denoise_chunk(source: str, model: WarmModel, chunk: Chunk, options: BatchOptions) -> ChunkResult:
    """One chunk of a long movie: `denoise`'s final pass (`StreamDenoiser.denoise_frames`) over
    the chunk's output frames, with the movie's trained weights.

    The engine is built on its segment's first frame (`pretrain` with no steps): the intensity
    normalisation the engine fits there in one piece. The chunk's frames are denoised as one
    segment, which the read span lies in (`find_changes`, `plan_chunks`).

    Only the chunk's frames are read (and its segment's first), so a worker's memory is a
    chunk's, whatever the movie's length."""
    started = time.monotonic()
    with MovieFrames(source, model.stream) as reader:
        if reader.shape != (model.frames, *model.shape):
            raise MovieError(f"{source}: changed while it was being denoised")
        first = reader.read(chunk.segment_start, chunk.segment_start + 1)
        span = reader.read(chunk.read_start, chunk.read_stop)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        weights.write_bytes(model.weights)
        config = replace(denoise.file_config(_task_config(options.engine), model.frames), init=str(weights),
                         steps_per_frame=0.0, changes=replace(options.engine.changes, enabled=False))
        engine = StreamDenoiser(config)
        engine.pretrain(first, 0)  # loads the weights: the file may go
    try:
        done = engine.denoise_frames(span, [t - chunk.read_start for t in range(chunk.start, chunk.stop)])
    finally:
        engine.close()
    images = denoise.stack_images(done)
    outputs = [replace(out, index=out.index + chunk.read_start, image=None, segment=chunk.segment) for out in done]
    if len(outputs) != chunk.stop - chunk.start:
        raise RuntimeError(f"{source}: chunk {chunk.index} left frames without an output")
    shift = chunk.read_start  # the chunk's frames -> the movie's
    gains = tuple(replace(gain, first=gain.first + shift, unrestored=tuple(t + shift for t in gain.unrestored))
                  for gain in engine.amplitude_gains)
    blends = tuple(replace(blend, first=blend.first + shift, unblended=tuple(t + shift for t in blend.unblended))
                   for blend in engine.cell_blends)
    follows = tuple(replace(f, first=f.first + shift, unmoved=tuple(t + shift for t in f.unmoved),
                            shifts={t + shift: s for t, s in f.shifts.items()})
                    for f in engine.jitter_follows)
    return ChunkResult(chunk, images, outputs, time.monotonic() - started, _worker()[0], gains, blends, follows)


def write_chunks(source: str, output: str, model: WarmModel, options: BatchOptions, *parts: ChunkResult) -> Written:
    """Join a long movie's chunks in order and write them (`denoise.write_denoised`)."""
    started = time.monotonic()
    parts = tuple(sorted(parts, key=lambda p: p.chunk.index))
    frames = (image for p in parts for image in p.frames)  # written as they come: no joined copy
    outputs = [o for p in parts for o in p.outputs]
    # each chunk measured its own
    blends = denoise.describe_blends([blend for p in parts for blend in p.blends])
    gains = denoise.describe_gains([gain for p in parts for gain in p.gains])
    follows = denoise.describe_jitter([f for p in parts for f in p.follows])
    provenance = replace(model.provenance, extra={**model.provenance.extra, "cell_blend": blends,
                                                  "amplitude_gain": gains, "jitter": follows})
    if options.save_models:  # first: an output is never left without its model
        denoise.write_atomic(_model_path(Path(output)), lambda tmp: tmp.write_bytes(model.weights), overwrite=True)
    with MovieFrames(source, model.stream) as reader:  # the stream's metadata, for every frame
        denoise.write_atomic(Path(output), lambda tmp: denoise.write_denoised(tmp, reader, frames, outputs,
                                                                              provenance))
    return Written(output, len(outputs), model.shape, outputs[-1].model_step, _provenance_dict(provenance),
                   {"train": model.seconds, "denoise": sum(p.seconds for p in parts),
                    "write": time.monotonic() - started},
                   list(dict.fromkeys([model.worker, *(p.worker for p in parts), _worker()[0]])))


def _provenance_dict(provenance: Provenance) -> dict[str, Any]:
    return {k: v for k, v in asdict(provenance).items() if v not in (None, {}, "")}


# -- the client: submit, follow, record ----------------------------------------------------------
@dataclass
class Item:
    """One input and what became of it (a manifest entry)."""

    input: Path
    output: Path
    stream: str | None = None  # the input's stream (`MovieFrames`); None: not known (the input failed)
    status: str = "pending"  # pending | done | skipped | failed
    error: str | None = None
    frames: int | None = None
    shape: tuple[int, int] | None = None
    chunks: int = 1
    model_step: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    workers: list[str] = field(default_factory=list)
    submitted: float = 0.0

    def entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {"input": str(self.input), "output": str(self.output), "status": self.status}
        if self.stream:
            out["stream"] = self.stream
        if self.error:
            out["error"] = self.error
        if self.input.exists() and not self.input.is_dir():
            stat = self.input.stat()
            out["input_bytes"], out["input_mtime_ns"] = stat.st_size, stat.st_mtime_ns
        if self.frames is not None and self.shape is not None:  # set together, once written
            out.update(frames=self.frames, height=self.shape[0], width=self.shape[1], chunks=self.chunks,
                       final_model_step=self.model_step, provenance=self.provenance,
                       seconds={k: round(v, 3) for k, v in self.seconds.items()}, workers=self.workers)
        return out


@dataclass
class BatchReport:
    items: list[Item]
    seconds: float
    frames: int
    manifest: Path

    @property
    def failed(self) -> list[Item]:
        return [i for i in self.items if i.status == "failed"]

    def count(self, status: str) -> int:
        return sum(i.status == status for i in self.items)


#: An entry's status for an output that was written (skipped: by an earlier run).
_MADE = ("done", "skipped")


def _same_file(recorded: object, source: Path) -> bool:
    """Whether a path an output or a manifest records (``recorded``) names the input ``source``."""
    if not isinstance(recorded, str) or not recorded:
        return False
    path = Path(recorded).expanduser()
    try:
        return path.resolve() == source.resolve() or (path.exists() and os.path.samefile(path, source))
    except OSError:
        return False


def output_source(output: Path) -> str | None:
    """The input file an output says it was made from (its provenance's ``source``: the OME-TIFF's
    MapAnnotation, the OME-Zarr store's attributes); None where it says none or cannot be read."""
    try:
        prov = read_zarr_provenance(output) if is_zarr_path(output) else read_provenance(output)
    except Exception:  # noqa: BLE001 - anything but a readable umvd-live output says nothing
        return None
    source = prov.get("source")
    return source if isinstance(source, str) and source else None


def _existing_output_error(item: Item, manifest: _Manifest, resume: bool, save_models: bool) -> str | None:
    """Why ``item``, whose output exists, fails (None: ``--resume`` skips it, as done).

    Only an output made from this very input is taken as its: a different movie's output under
    the same name (``day1/cell1.tif`` and ``day2/cell1.tif`` into one folder) never is, with or
    without ``--resume``. The output's provenance (``source``) says which input made it; one
    without any, the earlier manifest's record; one that says nothing is not taken as done."""
    source = output_source(item.output) or manifest.made_from(item.output)
    if source is not None and not _same_file(source, item.input):
        return (f"{item.output} exists, made from {source}: outputs are never overwritten; "
                "remove it or choose another --output-dir")
    if not resume:
        return "output exists: outputs are never overwritten (--resume skips it)"
    if source is None:
        return (f"{item.output} exists and says nothing of the input it was made from (no umvd-live provenance): "
                "remove it to denoise this input, or choose another --output-dir")
    model = _model_path(item.output)
    if save_models and not model.exists():  # done means both
        return f"output exists without its model {model.name} (--save-models): remove the output to denoise it again"
    return None


def _about(item: Item, error: str) -> str:
    """An input's error, naming the input once (`read_movie`'s messages begin with it)."""
    return error if error.startswith(str(item.input)) else f"{item.input}: {error}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class _Manifest:
    """The batch's record, rewritten atomically after every input (a killed batch leaves one).

    Several batches into one folder share one manifest: the earlier one's entries for outputs
    this batch has no input for are carried forward, before this batch's, so no run's records
    are lost (a later batch's entry replaces an earlier one of the same output; one that failed
    because the output exists keeps the record of the output that is there). A skipped input
    keeps the entry of the run that made its output."""

    def __init__(self, path: Path, header: dict[str, Any], earlier: Iterable[dict[str, Any]]):
        self.path = path
        self.header = header
        self.earlier = list(earlier)  # the earlier manifest's entries, in its order
        #: the earlier entries of outputs that were made (done, or skipped: made before), by output
        self.made = {e["output"]: e for e in self.earlier if e.get("status") in _MADE}

    @staticmethod
    def load(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """An earlier manifest's header and its entries (those with an output, and no "pending"
        one: a killed batch's unfinished work is no record); empty where there is none to read."""
        try:
            data = json.loads(path.read_text())
            entries = [e for e in data.get("inputs", [])
                       if isinstance(e, dict) and isinstance(e.get("output"), str) and e.get("status") != "pending"]
            return {k: v for k, v in data.items() if k not in ("summary", "inputs")}, entries
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}, []

    def made_from(self, output: Path) -> str | None:
        """The input an earlier manifest says ``output`` was made from, if it says so."""
        entry = self.made.get(str(output))
        return entry.get("input") if entry is not None and isinstance(entry.get("input"), str) else None

    def carried(self, items: list[Item]) -> list[dict[str, Any]]:
        """The earlier entries this batch's do not replace: those of outputs it has no input for,
        and the record of an output still there that an input of this batch failed to replace."""
        ours = {str(i.output): i for i in items}

        def kept(entry: dict[str, Any]) -> bool:
            item = ours.get(entry["output"])
            return item is None or (item.status == "failed" and entry.get("status") in _MADE
                                    and os.path.lexists(entry["output"]))

        return [e for e in self.earlier if kept(e)]

    def write(self, items: list[Item], summary: dict[str, Any]) -> None:
        entries = self.carried(items)
        for item in items:
            entry = item.entry()
            earlier = self.made.get(str(item.output))
            if item.status == "skipped" and earlier is not None and _same_file(earlier.get("input"), item.input):
                entry = {**earlier, "status": "skipped"}
            entries.append(entry)
        data = {**self.header, "summary": summary, "inputs": entries}
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        replace_file(tmp, self.path)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("movies"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=False,
    )


def run_batch(client: Any, items: list[Item], options: BatchOptions, manifest: _Manifest,
              console: Console | None = None) -> BatchReport:
    """Denoise every pending item on ``client``'s cluster; record each as it ends. A progress bar
    follows the futures as they complete (`distributed.as_completed`)."""
    from distributed import as_completed

    console = console or Console(stderr=True, quiet=True)
    started = time.monotonic()
    frames_done = 0
    run_id = uuid.uuid4().hex[:8]
    role: dict[str, tuple[Item, str, Any]] = {}  # future key -> (item, role, detail)
    # A key never comes back: Dask hands out the existing future for a key it still holds (and
    # never runs the new task), so a key made from the count of pending futures once gave one
    # stream's output another stream's chunks.
    numbers = itertools.count()
    futures_of: dict[int, list[Any]] = {}
    pending = [i for i in items if i.status == "pending"]
    ac = as_completed()

    def submit(item: Item, what: str, detail: Any, fn: Callable, *args: Any) -> Any:
        key = f"umvd-{what}-{item.input.stem}-{run_id}-{next(numbers)}"
        future = client.submit(fn, *args, key=key, pure=False, retries=options.retries)
        role[future.key] = (item, what, detail)
        futures_of.setdefault(id(item), []).append(future)
        ac.add(future)
        return future

    def summary() -> dict[str, Any]:
        elapsed = time.monotonic() - started
        return {"done": sum(i.status == "done" for i in items), "skipped": sum(i.status == "skipped" for i in items),
                "failed": sum(i.status == "failed" for i in items), "frames": frames_done,
                "seconds": round(elapsed, 3), "frames_per_s": round(frames_done / elapsed, 2) if elapsed > 0 else 0.0}

    with _progress(console) as progress:
        bar = progress.add_task("denoising", total=len(items), info="",
                                completed=sum(i.status != "pending" for i in items))

        def finish(item: Item, written: Written | None = None, error: str | None = None) -> None:
            if error is not None:
                item.status, item.error = "failed", error
                progress.console.print(f"umvd-live batch: error: {_about(item, error)}", soft_wrap=True,
                                       markup=False, highlight=False)
                for f in futures_of.get(id(item), []):
                    f.cancel()
            elif written is None:
                raise TypeError("finish() takes what was written, or the error")
            else:
                item.status = "done"
                height, width = written.shape
                item.frames, item.shape, item.model_step = written.frames, (height, width), written.model_step
                item.provenance, item.workers = written.provenance, written.workers
                item.seconds = {**written.seconds, "wall": time.monotonic() - item.submitted}
            futures_of.pop(id(item), None)
            progress.advance(bar)
            manifest.write(items, summary())

        for item in pending:
            item.submitted = time.monotonic()
            submit(item, "start", None, start_movie, str(item.input), item.stream, str(item.output), options)
        manifest.write(items, summary())
        for future in ac:
            item, what, detail = role.pop(future.key)
            if item.status != "pending":  # failed already; its other futures were cancelled
                continue
            if future.status != "finished":
                finish(item, error=_one_line(future.exception()) if future.status == "error" else "cancelled")
                continue
            if what == "chunk":  # its frames stay on the worker for `write_chunks`
                frames_done += detail.stop - detail.start
            else:
                result = future.result()
                if isinstance(result, Failed):
                    finish(item, error=result.message)
                elif isinstance(result, Written):
                    if what == "start":
                        frames_done += result.frames
                    finish(item, written=result)
                else:  # a WarmModel: its chunks share the weights, which stay on the cluster
                    chunks = plan_chunks(result.frames, options.chunk_frames, result.k, result.context,
                                         result.changes)
                    item.chunks = len(chunks)
                    parts = [submit(item, "chunk", c, denoise_chunk, str(item.input), future, c, options)
                             for c in chunks]
                    submit(item, "write", None, write_chunks, str(item.input), str(item.output), future, options,
                           *parts)
            elapsed = time.monotonic() - started
            progress.update(bar, info=f"{frames_done} frames, {frames_done / max(elapsed, 1e-9):.1f} frames/s")
    report = BatchReport(items, time.monotonic() - started, frames_done, manifest.path)
    manifest.write(items, summary())
    return report


# -- command line --------------------------------------------------------------------------------
def stream_items(source: Path, output: Path, wanted: list[str]) -> list[Item]:
    """An input's items: one per stream to denoise (`denoise.stream_outputs`), or one failed item
    when the file cannot be read or lacks a ``--stream``."""
    try:
        return [Item(source, out, stream) for stream, out in denoise.stream_outputs(source, output, wanted)]
    except MovieError as exc:
        return [Item(source, output, status="failed", error=str(exc))]
    except Exception as exc:  # noqa: BLE001 - whatever a damaged input raises: its line, and the others go on
        return [Item(source, output, status="failed", error=f"{source}: not readable as a movie ({_one_line(exc)})")]


def _fail(message: str) -> int:
    print(f"umvd-live batch: error: {message}", file=sys.stderr)  # one line, never wrapped
    return 2


def dashboard_link(client: Any) -> str | None:
    """The Dask dashboard's address, when the scheduler serves one. Its HTTP server runs without
    bokeh too, with no dashboard (a page asking for bokeh, or a 404), so the scheduler is asked
    whether it has bokeh (a lambda: pickled by value, it needs nothing of ours over there)."""
    try:
        if "dashboard" not in client.scheduler_info().get("services", {}):
            return None
        has_bokeh = client.run_on_scheduler(lambda: importlib.util.find_spec("bokeh") is not None)
    except Exception:  # noqa: BLE001 - a link is a courtesy: a scheduler that will not say gets none
        return None
    return client.dashboard_link if has_bokeh else None


def default_workers(cores: int | None = None) -> int:
    """``--workers``' default: Dask's own split of a LocalCluster (`nprocesses_nthreads`): one
    worker per core up to 4 cores, then about √cores workers of √cores torch threads each.

    One task per core is what measured fastest here (2 cores: two single-thread workers make 1.57×
    the frames/s of one worker of two threads: a small movie's training uses threads poorly), and
    Dask's rule keeps that on small machines; on large ones it bounds the workers, since each holds
    a movie (or a chunk) and its output in memory, within RAM / workers (Dask's memory limit)."""
    from distributed.deploy.utils import nprocesses_nthreads

    return nprocesses_nthreads(cores or cpu_cores())[0]


class SchedulerFileError(ValueError):
    """A ``--scheduler`` file that is no Dask scheduler file; the message is one line."""


def scheduler_file_address(path: Path, tries: int = 10, pause_s: float = 0.1) -> str:
    """The ``address`` of a scheduler file (``dask scheduler --scheduler-file``), checked here:
    Dask's own reading of an empty file, of ``{}`` or of a YAML file ends in an AssertionError,
    of ``{"address": 8786}`` in a TypeError. A file being written (empty, or JSON cut short) is
    read again ``tries`` times, ``pause_s`` apart, as Dask does; then SchedulerFileError."""
    problem = ""
    for attempt in range(tries):
        if attempt:
            time.sleep(pause_s)
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise SchedulerFileError(f"{path} cannot be read ({exc})") from None
        try:
            data = json.loads(text)
        except ValueError:  # UnicodeDecodeError included
            problem = "it is empty" if not text.strip() else "it is not JSON"
            continue
        address = data.get("address") if isinstance(data, dict) else None
        if isinstance(address, str) and address.strip():
            return address.strip()
        problem = ('its "address" is not a scheduler address' if isinstance(data, dict) and "address" in data
                   else 'it has no "address"')
        break  # whole JSON: reading it again will not help
    raise SchedulerFileError(f"{path} is not a Dask scheduler file ({problem}; dask scheduler --scheduler-file "
                             "writes one)")


def open_client(workers: int | None, scheduler: str | None) -> tuple[Any, Any]:
    """(client, local cluster or None): an existing scheduler (its address, or its scheduler
    file: SchedulerFileError if it is none), or ``workers`` local worker processes of one task
    each."""
    from distributed import Client, LocalCluster

    if scheduler:
        if Path(scheduler).is_file():  # a scheduler file (dask scheduler --scheduler-file)
            return Client(scheduler_file_address(Path(scheduler)), timeout="30s"), None
        return Client(scheduler, timeout="30s"), None
    # any free port: None would mean Dask's fixed 8787, taken by a second batch or another cluster.
    # Dask's own logs only from CRITICAL up: the batch reports every task's failure itself, and
    # what Dask logs as an error here is a race of its shutdown under load (a worker's heartbeat
    # meeting the closing scheduler: a traceback on the user's terminal after a clean run).
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.CRITICAL)
    return Client(cluster), cluster


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    if importlib.util.find_spec("distributed") is None:
        return _fail("batch needs dask.distributed: pip install 'umvd-live[cluster]'")
    if args.workers is not None and args.workers < 1:
        return _fail(f"--workers must be >= 1, got {args.workers}")
    if args.chunk_frames < 1:
        return _fail(f"--chunk-frames must be >= 1, got {args.chunk_frames}")
    workers = args.workers or default_workers()
    threads = args.threads
    if threads is None and not args.scheduler:
        threads = max(1, cpu_cores() // workers)  # the local cores, divided among the workers
    try:
        engine = engine_config_from_args(args, workers=None, cpu_threads=threads)
    except ValueError as exc:  # bad engine flags (an even --window): one line, as `denoise` says it
        return _fail(str(exc))
    options = BatchOptions(engine=engine, offline=args.offline, chunk_frames=args.chunk_frames,
                           save_models=args.save_models, retries=args.retries)
    out_dir = Path(args.output_dir)
    manifest_path = Path(args.manifest) if args.manifest else out_dir / "batch-manifest.json"
    for folder in dict.fromkeys((out_dir, manifest_path.parent)):  # before any work, which it records
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return _fail(f"cannot create {folder}: {exc}")
    inputs, empty = expand_inputs(args.inputs)
    items = [item for p in inputs for item in stream_items(p, (out_dir / output_name(p, args.format)).resolve(),
                                                           args.streams)]
    for pattern in empty:
        items.append(Item(Path(pattern), out_dir, status="failed", error="matches no file"))
    # names compared without case: on a case-insensitive file system (macOS, Windows) outputs
    # differing only by case are one file
    by_output: dict[str, Item] = {}
    for item in items:
        name = os.path.normcase(item.output).casefold()
        if item.status == "pending" and name in by_output:
            first = by_output[name]
            return _fail(f"{first.input} and {item.input} would both write {first.output}"
                         + (f" (as {item.output})" if item.output != first.output else ""))
        by_output[name] = item
    earlier_header, earlier = _Manifest.load(manifest_path)
    records = _Manifest(manifest_path, earlier_header, earlier)
    sources = {p.resolve() for p in inputs}
    for item in items:
        if item.status == "pending" and item.output.resolve() in sources:  # raw data is never replaced
            item.status, item.error = "failed", "its output would be an input: choose another --output-dir"
        elif item.status == "pending" and item.output.exists():
            error = _existing_output_error(item, records, args.resume, args.save_models)
            item.status, item.error = ("failed", error) if error is not None else ("skipped", None)
    for item in items:
        if item.status == "failed" and item.error is not None:  # failed items always say why
            print(f"umvd-live batch: error: {_about(item, item.error)}", file=sys.stderr)
    pending = [item for item in items if item.status == "pending"]
    if not pending:  # nothing to do: no cluster either; the earlier run's header stays, saying how
        _Manifest(manifest_path, earlier_header or {"format": MANIFEST_FORMAT, "command": ["umvd-live", *sys.argv[1:]]},
                  earlier).write(items, {})
        err.print(f"nothing to denoise ({sum(i.status == 'skipped' for i in items)} skipped) → {manifest_path}",
                  soft_wrap=True, highlight=False)
        return 1 if any(item.status == "failed" for item in items) else 0
    try:
        client, cluster = open_client(workers, args.scheduler)
    except SchedulerFileError as exc:
        return _fail(f"--scheduler {exc}")
    except (OSError, TimeoutError, ValueError) as exc:
        return _fail(f"cannot reach the Dask scheduler {args.scheduler}: {_one_line(exc)}")
    try:
        link = dashboard_link(client)
        info = client.scheduler_info()
        n_workers = len(info.get("workers", {}))
        err.print(f"Dask scheduler {client.scheduler.address}, {n_workers} workers"
                  + (f", dashboard {link}" if link else ""), soft_wrap=True, highlight=False)
        header = {
            "format": MANIFEST_FORMAT, "software_version": _version(), "command": ["umvd-live", *sys.argv[1:]],
            "started": datetime.now(UTC).isoformat(timespec="seconds"), "output_dir": str(out_dir.resolve()),
            "cluster": {"scheduler": client.scheduler.address, "workers": n_workers, "local": cluster is not None,
                        "dashboard": link},
            "options": {"offline": options.offline, "chunk_frames": options.chunk_frames,
                        "retries": options.retries, "engine": asdict(options.engine)},
        }
        report = run_batch(client, items, options, _Manifest(manifest_path, header, earlier), err)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        for item in pending:  # temporaries of tasks whose worker died mid-write, or of an interrupted batch
            denoise.remove_partials(item.output)
            denoise.remove_partials(_model_path(item.output))
    fps = report.frames / report.seconds if report.seconds > 0 else 0.0
    err.print(f"{report.count('done')} done, {report.count('skipped')} skipped, {len(report.failed)} failed: "
              f"{report.frames} frames in {report.seconds:.1f} s ({fps:.1f} frames/s) → {report.manifest}",
              soft_wrap=True, highlight=False)
    return 1 if report.failed else 0


def _version() -> str:
    from umvd_live import __version__

    return __version__
