"""`umvd-live denoise`: a recorded movie through the same engine as a live session.

Streamed (default): frames are pushed in order with inline training, as a live stream would see
them; `--offline`: the paper's recipe, training on the whole movie first. Either way every frame
is then denoised by a final pass with the final weights, and with context blocks from both sides
of the window (`EngineConfig.context_sides`): a file need not be causal, and a context of the
past alone made transients trail the truth (docs/engine.md, "Context from both sides").

A file of several streams (channels, planes, positions: `umvd_live.recording.movie`) is denoised
stream by stream, each on its own engine, so a window never mixes channels; each stream's output is
named as the recorder names a stream's file (`stream_outputs`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from umvd_live.engine import DenoisedFrame, EngineConfig, StreamDenoiser
from umvd_live.engine.amplitude import SMOOTH_PX, AmplitudeGain
from umvd_live.engine.cellblend import CellBlend
from umvd_live.engine.changes import Change
from umvd_live.engine.checkpoint import CheckpointError
from umvd_live.engine.device import DeviceUnavailable, pick_device
from umvd_live.engine.jitter import JitterFollowed
from umvd_live.engine.normalization import bad_pixels
from umvd_live.engine.provenance import network_provenance
from umvd_live.portable import replace_file
from umvd_live.recording.movie import MovieError, MovieFrames, describe_streams, movie_streams
from umvd_live.recording.ometiff import FrameInfo, Provenance, write_movie
from umvd_live.recording.omezarr import is_zarr_path, write_zarr_movie
from umvd_live.recording.session import MOVIE_SUFFIXES, is_movie_path, stream_path

log = logging.getLogger(__name__)

#: Offline pre-training steps per movie frame (bounded below and above): about 5 passes over
#: every window's worth of 64x64 patches of a 128x128 movie.
OFFLINE_STEPS_PER_FRAME = 5
OFFLINE_STEPS_MIN, OFFLINE_STEPS_MAX = 1000, 6000


def default_offline_steps(t_frames: int) -> int:
    """`--offline`'s pre-training steps for a movie of ``t_frames`` frames."""
    return int(np.clip(OFFLINE_STEPS_PER_FRAME * t_frames, OFFLINE_STEPS_MIN, OFFLINE_STEPS_MAX))


@dataclass(frozen=True)
class DenoiseResult:
    frames: np.ndarray  # (T, H, W) float32, input units
    outputs: list[DenoisedFrame]  # per frame: state and model step of its final output
    seconds: float
    engine: StreamDenoiser


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def file_config(config: EngineConfig, t_frames: int) -> EngineConfig:
    """The engine's settings for a recorded movie of ``t_frames`` frames (`denoise`, `batch`):
    inline training; a movie shorter than the burst warm-starts on all of it; its later frames
    exist, so the context comes from both sides of the window; training draws from every
    frame pushed so far (within the replay's byte bound), since the final weights denoise all;
    and those are the trainer's own weights, not their running average: the average steadies a
    live preview whose weights change from one output to the next, while a file's final pass has
    one set of weights for every frame, and on files the average cut the transients' amplitude
    slope by 0.01-0.03 (docs/benchmarks.md, "The running average in a file's final pass")."""
    return replace(config, train_mode="inline", warmup_frames=min(config.warmup_frames, t_frames),
                   context_sides="both",
                   trainer=replace(config.trainer, replay_frames=max(config.trainer.replay_frames, t_frames),
                                   average_decay=0.0))


def denoise_movie(
    movie: np.ndarray,
    config: EngineConfig,
    *,
    offline: bool = False,
    offline_steps: int | None = None,
    console: Console | None = None,
) -> DenoiseResult:
    """Denoise a whole T×H×W movie; every frame gets exactly one output, in the input's units.
    ``config`` is adapted to a file (`file_config`) but its training steps per frame are taken as
    given: the command line's default for files is 10 (``--steps-per-frame``), the engine's own 1
    (a live stream's), which on a simulated 600-frame movie gave 0.6 dB less than 4 did."""
    console = console or Console(stderr=True, quiet=True)
    t_frames = len(movie)
    warn_bad_pixels(movie)
    engine = StreamDenoiser(file_config(config, t_frames))
    if t_frames < engine.config.window:  # no window fits: 0 training steps, the starting weights' outputs
        log.warning("%d frames are fewer than the %d-frame window: the network is not trained; each frame gets "
                    "its starting weights' output (the prior's, if any) or, where the referee finds that worse, "
                    "the window's mean (a lone frame is passed through)", t_frames, engine.config.window)
    start = time.monotonic()
    with _progress(console) as progress:
        if offline:
            steps = offline_steps or default_offline_steps(t_frames)
            task = progress.add_task("training", total=steps, info="")
            engine.pretrain(
                movie, steps, lambda done, loss: progress.update(task, completed=done, info=f"loss {loss or 0:.4f}")
            )
            engine.pause_training()
        # The pass in order: training (streamed), and the changes that cut the movie into segments.
        task = progress.add_task("training" if not offline else "segments", total=t_frames, info="")
        for frame in movie:
            engine.push(frame, infer=False)
            progress.update(task, completed=engine.frames_in, info=f"step {engine.model_step}")
        task = progress.add_task("denoising", total=t_frames, info="")
        final: list[DenoisedFrame | None] = [None] * t_frames
        for out in engine.denoise_frames(movie, list(range(t_frames)), progress=lambda: progress.advance(task)):
            final[out.index] = out
    outputs = [o for o in final if o is not None]
    assert len(outputs) == t_frames, "every input frame gets exactly one output"
    return DenoiseResult(frames=stack_images(outputs), outputs=outputs, seconds=time.monotonic() - start,
                         engine=engine)


def warn_bad_pixels(movie: np.ndarray) -> None:
    """Say which frames hold pixels that are no measurement (NaN, ±Inf, out of range:
    `normalization.bad_pixels`), as the daemon says of a stream's: the engine replaces them by
    their frame's median and never trains on such a frame. A movie without one measured pixel is
    a ValueError: its output would be a made-up movie of zeros."""
    frames = pixels = 0
    for frame in movie:
        bad = bad_pixels(frame)
        if bad is not None:
            frames, pixels = frames + 1, pixels + int(np.count_nonzero(bad))
    if pixels and pixels == movie.size:
        raise ValueError("no pixel of the movie is a measurement: all are NaN, ±Inf or out of range")
    if frames:
        log.warning("%d of %d frames hold %d NaN, ±Inf or out-of-range pixels: denoised with those replaced by "
                    "their frame's median, and not trained on", frames, len(movie), pixels)


def stack_images(outputs: Sequence[DenoisedFrame]) -> np.ndarray:
    """The outputs' images as one float32 (T, H, W) movie; an output without one is an error."""
    images = [o.image for o in outputs if o.image is not None]
    if len(images) != len(outputs):
        raise RuntimeError(f"{len(outputs) - len(images)} of {len(outputs)} outputs have no image")
    return np.stack(images).astype(np.float32, copy=False)


@dataclass(frozen=True)
class DenoiseConfig:
    """One `umvd-live denoise` run: a movie in, its denoised copy out (the command line's flags,
    turned into it by `apps.cli`)."""

    input: Path
    output: Path  # OME-TIFF, or OME-Zarr by its extension; never overwritten (several streams: `stream_outputs`)
    engine: EngineConfig = field(default_factory=EngineConfig)
    offline: bool = False  # train on the whole movie at once (the paper's recipe) instead of along it
    save_model: Path | None = None  # where the final weights go (several streams: one file each, named the same way)
    streams: tuple[str, ...] = ()  # only these streams of the file (short names); empty: every one

    def __post_init__(self) -> None:
        if not is_movie_path(self.output):  # written as the format its name says, never a guess
            raise ValueError(f"cannot write {self.output}: an output's name ends as an OME-TIFF's or an OME-Zarr's "
                             f"does ({', '.join(MOVIE_SUFFIXES)})")


def stream_outputs(source: str | Path, output: str | Path, wanted: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """The streams of ``source`` to denoise (short names, `movie_streams`), each with its output.

    A file of one stream writes ``output`` itself. A file of several writes an output per stream
    beside it, named as the recorder names a stream's file (`recording.session.stream_path`:
    ``out.ome.tif`` + ``GCaMP`` -> ``out_GCaMP.ome.tif``). ``wanted`` keeps only those streams; a
    name the file does not hold raises MovieError with the names it does."""
    names = movie_streams(source)
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise MovieError(f"{source}: no stream {', '.join(map(repr, unknown))}; its streams: {describe_streams(names)}")
    if len(names) == 1:
        return [(names[0], Path(output))]
    return [(name, stream_path(output, name)) for name in names if not wanted or name in wanted]


def _beside(path: Path, stream: str) -> Path:
    """``model.pt`` + ``GCaMP`` -> ``model_GCaMP.pt``: a per-stream file for a path the user gave."""
    return path.with_name(f"{path.stem}_{stream}{path.suffix}")


def denoise_provenance(engine: StreamDenoiser, movie: MovieFrames, *, offline: bool,
                       changes: Sequence[Change] | None = None, **extra: object) -> Provenance:
    """What an output of `denoise` (or of `batch`, with its ``extra``) says about how it was made:
    its source file and stream (a file of one stream: the file's name, as always). ``changes``: the
    segments' changes where the engine did not see them all (`batch.find_changes`), else the
    engine's."""
    return Provenance(
        stream=movie.axes.name if movie.several else movie.path.stem, preset=engine.preset,
        window=engine.config.window, weights_sha256=engine.start_hash, device=str(engine.device),
        source=str(movie.path),
        extra={"mode": "offline" if offline else "streamed", "final_model_step": engine.model_step,
               **network_provenance(engine),
               "context_sides": engine.config.context_sides,
               "changes": ",".join(f"{c.index}:{c.reason}" for c in
                                   (engine.changes if changes is None else changes)) or "none",
               "cell_blend": describe_blends(engine.cell_blends),
               "amplitude_gain": describe_gains(engine.amplitude_gains),
               "jitter": describe_jitter(engine.jitter_follows),
               **extra},
    )


def describe_blends(blends: Sequence[CellBlend]) -> str:
    """The cell-scale blend of each segment (`engine.cellblend`), for the provenance and the summary
    line: ``first-frame:mean weight`` (``(the blind means' temporal sigmas the regions took,
    frames the referee left unblended)``, or why none was applied)."""
    def one(b: CellBlend) -> str:
        span = f"{min(b.sigmas):g}-{max(b.sigmas):g}" if len(b.sigmas) > 1 else "".join(f"{s:g}" for s in b.sigmas)
        why = f"sigma {span} frames" if b.sigma_t is not None else b.reason
        if b.unblended:
            why += f", {len(b.unblended)} frames left unblended by the referee"
        return f"{b.first}:{b.weight:.3f} ({why})"
    return ", ".join(one(b) for b in blends) or "none"


def describe_gains(gains: Sequence[AmplitudeGain]) -> str:
    """The amplitude restoration of each segment (`engine.amplitude`), for the provenance and the
    summary line: ``first-frame:mean gain`` (``(slope measured, the gain map's range, the
    correction's smoothing where wider than 1 px, frames the referee left unrestored)``, or why
    none was applied)."""
    def one(g: AmplitudeGain) -> str:
        why = f"slope {g.slope:.3f}" if g.slope is not None else g.reason
        if g.reason and g.slope is not None:
            why += f", {g.reason}"
        if g.gain != 1.0:
            why += f", {g.gain_range[0]:.2f}-{g.gain_range[1]:.2f} across the field"
            if g.smooth_px != SMOOTH_PX:
                why += f", smoothed over {g.smooth_px:.2f} px"
        if g.unrestored:
            why += f", {len(g.unrestored)} frames left unrestored by the referee"
        return f"{g.first}:{g.gain:.3f} ({why})"
    return ", ".join(one(g) for g in gains) or "none"


def describe_jitter(follows: Sequence[JitterFollowed]) -> str:
    """Following the jitter in each segment (`engine.jitter`), for the provenance and the summary
    line: ``first-frame:mean shift px`` (``(the Wiener weight, the shared motion's and the
    estimate's noise RMS per axis y/x, frames the referee left where they were, frames whose shift
    could not be measured)``, or why none was moved)."""
    def one(f: JitterFollowed) -> str:
        if not any(f.weight):
            return f"{f.first}:0 ({f.reason})"
        why = (f"weight {f.weight[0]:.2f}/{f.weight[1]:.2f}, motion {f.jitter_px[0]:.2f}/{f.jitter_px[1]:.2f} px, "
               f"noise {f.noise_px[0]:.2f}/{f.noise_px[1]:.2f} px")
        if f.unmoved:
            why += f", {len(f.unmoved)} frames left unmoved by the referee"
        if f.unmeasured:
            why += f", {f.unmeasured} frames not measured"
        return f"{f.first}:{f.moved_px:.2f} px ({why})"
    return ", ".join(one(f) for f in follows) or "none"


def write_denoised(output: str | Path, movie: MovieFrames, frames: Iterable[np.ndarray],
                   outputs: list[DenoisedFrame], provenance: Provenance) -> None:
    """Write a denoised stream with one frame record per output; raises OSError, ValueError or
    RuntimeError (the zarr extra is missing)."""
    # the stream's pixel size, interval, channel, start (and place), as a replay of it would send them
    infos = (FrameInfo(seq=o.index, state=o.state, model_step=o.model_step, amplitude_gain=o.amplitude_gain,
                       jitter_shift_px=o.jitter_shift_px, meta=movie.frame_meta(o.index))
             for o in outputs)
    # the output's extension picks the format: an OME-Zarr store or (default) an OME-TIFF
    (write_zarr_movie if is_zarr_path(output) else write_movie)(output, frames, infos, provenance)


#: `_partial_name`'s form: this, 12 hex digits, ``.`` and the output's name.
_PARTIAL_PREFIX = ".partial-"
_PARTIAL_ID = 12


def _partial_name(output: Path) -> Path:
    """A temporary name beside ``output`` with the same ending (it picks the format)."""
    return output.with_name(f"{_PARTIAL_PREFIX}{uuid.uuid4().hex[:_PARTIAL_ID]}.{output.name}")


def _partial_pattern(output: Path) -> re.Pattern[str]:
    """What exactly the names `_partial_name` gives ``output``'s temporaries match: the output's
    name taken literally (``cell[1].ome.tif``'s brackets are no glob class), and nothing else
    (``.partial-….x.cell1.ome.tif`` is another output's, ``x.cell1.ome.tif``)."""
    return re.compile(f"{re.escape(_PARTIAL_PREFIX)}[0-9a-f]{{{_PARTIAL_ID}}}{re.escape('.' + output.name)}")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_partials(path: Path) -> None:
    """Remove the temporaries `write_atomic` left beside ``path`` (a process killed mid-write):
    the folder's names that `_partial_pattern` matches whole, and no other."""
    pattern = _partial_pattern(path)
    try:
        names = os.listdir(path.parent)
    except OSError:  # no folder: no temporaries
        return
    for name in names:
        if pattern.fullmatch(name):
            _remove(path.parent / name)


def _place_new(tmp: Path, output: Path) -> None:
    """Rename ``tmp`` to ``output`` unless that name is taken (FileExistsError), another case of it
    on a case-insensitive file system included: a file by a hard link, which fails atomically when
    the name exists (a rename would replace it); a store (folder), or a file system without hard
    links, by a check and a rename."""
    if not tmp.is_dir():
        try:
            os.link(tmp, output)
        except FileExistsError:
            raise
        except OSError:  # no hard links here (some network and FAT file systems)
            pass
        else:
            tmp.unlink()
            return
    if os.path.lexists(output):
        raise FileExistsError(f"{output} exists: outputs are never overwritten")
    os.rename(tmp, output)


def write_atomic(output: Path, write: Callable[[Path], object], *, overwrite: bool = False) -> None:
    """``write(tmp)`` then rename it to ``output``, so no reader ever sees a partial file under the
    final name and an error or an interrupt leaves none (the temporary is removed). An existing
    ``output`` is replaced only with ``overwrite`` (a model file; never a recording: `_place_new`)."""
    tmp = _partial_name(output)
    try:
        write(tmp)
        if overwrite:
            replace_file(tmp, output)  # atomic on POSIX and Windows (retried while Windows refuses)
        else:
            _place_new(tmp, output)
    except BaseException:
        _remove(tmp)
        raise


def _fail(message: str) -> int:
    print(f"umvd-live denoise: error: {message}", file=sys.stderr)  # one line, never wrapped
    return 2


def run(config: DenoiseConfig) -> int:
    err = Console(stderr=True)
    try:
        pick_device(config.engine.device)  # before reading a movie that may take minutes to read
    except DeviceUnavailable as exc:
        return _fail(str(exc))
    try:
        jobs = stream_outputs(config.input, config.output, config.streams)
        # every stream opened (and so checked) before any is denoised: a bad later stream found
        # after the earlier ones were written would leave outputs that a rerun refuses
        several = False
        for stream, _ in jobs:
            with MovieFrames(config.input, stream) as movie:
                several = movie.several
    except MovieError as exc:
        return _fail(str(exc))
    models: list[Path | None] = [None] * len(jobs)
    if config.save_model is not None:
        models = [_beside(config.save_model, stream) if several else config.save_model for stream, _ in jobs]
    # the paths checked before any computing, which can take hours
    for (_, output), model in zip(jobs, models, strict=True):
        if os.path.lexists(output):
            return _fail(f"{output} exists: recordings are never overwritten; remove it or pick another name")
        for path in (output, model):
            if path is not None and not path.parent.is_dir():
                return _fail(f"cannot write {path}: {path.parent} is not a folder")
    for (stream, output), model in zip(jobs, models, strict=True):
        status = _denoise_stream(config, stream, output, model, err)
        if status:
            return status
    return 0


def _denoise_stream(config: DenoiseConfig, stream: str, output: Path, model: Path | None, err: Console) -> int:
    """One stream of the input through its own engine, into ``output``, and its weights into
    ``model`` first: an output is never left without the model asked for."""
    try:
        with MovieFrames(config.input, stream) as movie:
            frames = movie.read(0, len(movie))
            try:
                result = denoise_movie(frames, config.engine, offline=config.offline, console=err)
            except (CheckpointError, ValueError, RuntimeError) as exc:
                return _fail(str(exc))
            engine = result.engine
            try:
                try:
                    if model is not None:  # atomic already (`checkpoint.save_checkpoint`)
                        engine.save_weights(model)
                except (OSError, RuntimeError) as exc:
                    return _fail(f"cannot save the model to {model}: {exc}")
                try:
                    write_atomic(output, lambda tmp: write_denoised(tmp, movie, result.frames, result.outputs,
                                                                    denoise_provenance(engine, movie,
                                                                                       offline=config.offline)))
                except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: the zarr extra is missing
                    return _fail(f"cannot write {output}: {exc}")
            finally:
                engine.close()
            several = movie.several
    except MovieError as exc:
        return _fail(str(exc))
    fallbacks = sum(o.state == "warmup" for o in result.outputs)
    err.print(
        f"denoised {len(frames)} frames of {frames.shape[1]}×{frames.shape[2]}"
        + (f" (stream {stream})" if several else "")
        + f" in {result.seconds:.1f} s ({engine.preset} on {engine.device}, {engine.model_step} training steps)"
        + f" → {output}"
        + f"; cell-scale blend {describe_blends(engine.cell_blends)}"
        + f"; amplitude gain {describe_gains(engine.amplitude_gains)}"
        + f"; jitter followed {describe_jitter(engine.jitter_follows)}"
        + (f"; {fallbacks} frames where the network lost to the neighbours' mean got the window's mean"
           if fallbacks and len(frames) >= engine.config.window else "")  # shorter: warned by `denoise_movie`
    )
    return 0


if __name__ == "__main__":
    from umvd_live.apps.cli import main

    sys.exit(main(["denoise", *sys.argv[1:]]))
