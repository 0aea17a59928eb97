"""`umvd-live denoise`: a recorded movie through the same engine as a live session.

Streamed (default): frames are pushed in order with inline training, as a live stream would see
them; `--offline`: the paper's recipe, training on the whole movie first. Either way every frame
is then denoised by a final pass with the final weights, and with context blocks from both sides
of the window (`EngineConfig.context_sides`): a file need not be causal, and a context of the
past alone made transients trail the truth (docs/engine.md, "Context from both sides").
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from dataclasses import dataclass, replace

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from umvd_live.engine.checkpoint import CheckpointError
from umvd_live.engine.stream import DenoisedFrame, EngineConfig, StreamDenoiser
from umvd_live.recording.movie import MovieError, read_movie, read_movie_metadata
from umvd_live.recording.ometiff import FrameInfo, Provenance, write_movie
from umvd_live.recording.omezarr import is_zarr_path, write_zarr_movie

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
    exist, so the context comes from both sides of the window; and training draws from every
    frame pushed so far (within the replay's byte bound), since the final weights denoise all."""
    return replace(config, train_mode="inline", warmup_frames=min(config.warmup_frames, t_frames),
                   context_sides="both",
                   trainer=replace(config.trainer, replay_frames=max(config.trainer.replay_frames, t_frames)))


def denoise_movie(
    movie: np.ndarray,
    config: EngineConfig,
    *,
    offline: bool = False,
    offline_steps: int | None = None,
    console: Console | None = None,
) -> DenoiseResult:
    """Denoise a whole T×H×W movie; every frame gets exactly one output, in the input's units."""
    console = console or Console(stderr=True, quiet=True)
    t_frames = len(movie)
    engine = StreamDenoiser(file_config(config, t_frames))
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
    assert all(o is not None for o in final), "every input frame gets exactly one output"
    frames = np.stack([o.image for o in final]).astype(np.float32, copy=False)
    return DenoiseResult(frames=frames, outputs=final, seconds=time.monotonic() - start, engine=engine)


def engine_config(args: argparse.Namespace, **overrides: object) -> EngineConfig:
    """`denoise`'s engine options as a config; `umvd-live batch` takes the same options."""
    config = EngineConfig(
        preset=args.preset,
        device=args.device,
        window=args.window,
        context=args.context,
        warmup_frames=args.warmup_frames,
        init=args.init,
        prior=args.prior,
        seed=args.seed,
        max_batch=args.batch, workers=args.workers,
        precision=args.precision,
        steps_per_frame=args.steps_per_frame,
        cpu_threads=args.threads,
    )
    if args.warmup_steps is not None:
        config = replace(config, warmup_steps=args.warmup_steps)
    return replace(config, **overrides)


def denoise_provenance(engine: StreamDenoiser, source: str | Path, *, offline: bool,
                       **extra: object) -> Provenance:
    """What an output of `denoise` (or of `batch`, with its ``extra``) says about how it was made."""
    return Provenance(
        stream=Path(source).stem, preset=engine.preset, window=engine.config.window,
        weights_sha256=engine.start_hash, device=str(engine.device), source=str(source),
        extra={"mode": "offline" if offline else "streamed", "final_model_step": engine.model_step,
               "context_blocks": ",".join(map(str, engine.spec.context)) or "none",
               "context_sides": engine.config.context_sides,
               "changes": ",".join(f"{c.index}:{c.reason}" for c in engine.changes) or "none",
               **({"prior": engine.prior.name, "prior_sha256": engine.prior.sha256} if engine.prior else {}),
               **extra},
    )


def write_denoised(output: str | Path, source: str | Path, frames: np.ndarray, outputs: list[DenoisedFrame],
                   provenance: Provenance) -> None:
    """Write a denoised movie with one frame record per output; raises OSError, ValueError or
    RuntimeError (the zarr extra is missing)."""
    # the input's pixel size, interval, channel and start, as a replay of it would send them
    meta = read_movie_metadata(source)
    infos = (FrameInfo(seq=o.index, state=o.state, model_step=o.model_step, meta=meta) for o in outputs)
    # the output's extension picks the format: an OME-Zarr store or (default) an OME-TIFF
    (write_zarr_movie if is_zarr_path(output) else write_movie)(output, frames, infos, provenance)


def _fail(message: str) -> int:
    print(f"umvd-live denoise: error: {message}", file=sys.stderr)  # one line, never wrapped
    return 2


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    if Path(args.output).exists():
        return _fail(f"{args.output} exists: recordings are never overwritten; remove it or pick another name")
    try:
        movie = read_movie(args.input)
    except MovieError as exc:
        return _fail(str(exc))
    config = engine_config(args)
    try:
        result = denoise_movie(movie, config, offline=args.offline, console=err)
    except (CheckpointError, ValueError, RuntimeError) as exc:
        return _fail(str(exc))
    engine = result.engine
    try:
        write_denoised(args.output, args.input, result.frames, result.outputs,
                       denoise_provenance(engine, args.input, offline=args.offline))
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: the zarr extra is missing
        return _fail(f"cannot write {args.output}: {exc}")
    if args.save_model:
        engine.save_weights(args.save_model)
    result.engine.close()
    fallbacks = sum(o.state == "warmup" for o in result.outputs)
    err.print(
        f"denoised {len(movie)} frames of {movie.shape[1]}×{movie.shape[2]} in {result.seconds:.1f} s "
        f"({result.engine.preset} on {result.engine.device}, {result.engine.model_step} training steps) → {args.output}"
        + (f"; {fallbacks} frames where the network lost to the neighbours' mean got the window's mean"
           if fallbacks else "")
    )
    return 0


if __name__ == "__main__":
    from umvd_live.apps.cli import main

    sys.exit(main(["denoise", *sys.argv[1:]]))
