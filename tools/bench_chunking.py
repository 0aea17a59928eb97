"""What `umvd-live batch`'s time chunks do to quality, against the same movie in one piece
(docs/batch.md, "Quality: chunks against one piece").

Simulates a movie with the project's simulator (ground truth and cell footprints known), writes it
to an OME-TIFF and denoises it, with `denoise`'s defaults and the same seed, three ways, with the
batch's own task functions run in this process (the code a cluster runs, without the cluster):

- one piece: `start_movie`'s path for a movie of at most ``--chunk-frames`` frames
  (`denoise.denoise_movie`, i.e. `umvd-live denoise`);
- chunks: `train_movie` once, then `denoise_chunk` for every chunk of `plan_chunks`, joined;
- chunks without overlaps: the same chunks, each read as a movie of its own (its window mirrored
  at both ends, its context cut), to show what the overlaps buy.

Scored with `umvd_live.metrics` (PSNR, active-set PSNR, trace correlation and amplitude slope over
the footprints), on the whole movie and on the frames near the inner chunk seams (within N//2 of a
seam, and the frames after a seam that the context blocks reach back across); streamed and
``--offline``. Prints a markdown table.

    flock /tmp/umvd-cpu.lock python tools/bench_chunking.py --frames 600 --size 128 --chunk-frames 150
    flock /tmp/umvd-cpu.lock python tools/bench_chunking.py --seed 1 --modes streamed
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import tifffile

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
from umvd_live.apps import denoise
from umvd_live.apps.batch import BatchOptions, denoise_chunk, plan_chunks, train_movie
from umvd_live.apps.cli import build_parser, engine_config_from_args
from umvd_live.engine.budget import cpu_cores
from umvd_live.metrics import MovieScorer
from umvd_live.recording.movie import MovieFrames

COLUMNS = ("PSNR", "PSNR ±N//2 of a seam", "PSNR context after a seam", "active PSNR", "trace corr",
           "trace slope", "max |Δ one piece|")


def seam_frames(seams: list[int], k: int, lead: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(frames within k of a seam, frames in [seam, seam + lead)): the first is where a window
    would cross the seam, the second where the context blocks would."""
    near = sorted({t for s in seams for t in range(s - k, s + k) if 0 <= t < frames})
    after = sorted({t for s in seams for t in range(s, min(frames, s + lead))})
    return np.array(near), np.array(after)


def scores(estimate: np.ndarray, clean: np.ndarray, whole: MovieScorer, near: np.ndarray, after: np.ndarray,
           piece: np.ndarray | None) -> list[str]:
    """One table row; the PSNRs near the seams with the whole movie's peak, comparable to its PSNR."""
    s = whole.score(estimate)

    def psnr_of(frames: np.ndarray) -> float:
        d = estimate[frames].astype(np.float64) - clean[frames].astype(np.float64)
        return 10.0 * float(np.log10(whole.peak ** 2 / np.mean(d * d)))

    delta = "" if piece is None else f"{np.abs(estimate - piece).max():.3g} ADU"
    return [f"{s['psnr']:.2f}", f"{psnr_of(near):.2f}", f"{psnr_of(after):.2f}", f"{s['active_psnr']:.2f}",
            f"{s['trace_corr']:.3f}", f"{s['trace_slope']:.3f}", delta]


def run(args: argparse.Namespace) -> None:
    sim = TwoPhotonSimulator(SimConfig(height=args.size, width=args.size, photons=args.photons, seed=args.seed))
    noisy, clean = sim.movie(args.frames)
    whole = MovieScorer(clean, sim.footprint_matrix(), offset=sim.config.offset_adu)
    # `umvd-live batch`'s own options, parsed as the command parses them: its defaults
    parsed = build_parser().parse_args(["batch", "in.tif", "--output-dir", "out", "--seed", str(args.seed),
                                        "--chunk-frames", str(args.chunk_frames), *args.engine])
    threads = parsed.threads or cpu_cores()
    config = engine_config_from_args(parsed, workers=None, cpu_threads=threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} torch threads; "
          f"{args.frames} frames of {args.size}², {args.photons} photons/pixel/frame, seed {args.seed}; "
          f"chunks of at most {args.chunk_frames} frames; engine options: {' '.join(args.engine) or 'defaults'}",
          flush=True)
    rows: list[tuple[str, list[str]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "movie.ome.tif"
        tifffile.imwrite(src, noisy, ome=True, metadata={"axes": "TYX"})
        for offline in (mode == "offline" for mode in args.modes):
            mode = "--offline" if offline else "streamed"
            options = BatchOptions(engine=config, offline=offline, chunk_frames=args.chunk_frames)
            started = time.monotonic()
            piece = denoise.denoise_movie(noisy, config, offline=offline)
            piece.engine.close()
            piece_s = time.monotonic() - started
            started = time.monotonic()
            with MovieFrames(src) as reader:
                model = train_movie(reader, config, options)
            chunks = plan_chunks(args.frames, args.chunk_frames, model.k, model.context, model.changes)
            chunked = np.concatenate([denoise_chunk(str(src), model, c, options).frames for c in chunks])
            chunked_s = time.monotonic() - started
            bare = [replace(c, read_start=c.start, read_stop=c.stop, segment_start=c.start, segment_end=c.stop)
                    for c in chunks]
            unlapped = np.concatenate([denoise_chunk(str(src), model, c, options).frames for c in bare])
            seams = [c.start for c in chunks[1:] if c.start != c.segment_start]
            if not seams:
                raise SystemExit("no inner chunk seam: give more --frames or fewer --chunk-frames")
            near, after = seam_frames(seams, model.k, model.k + sum(model.context), args.frames)
            print(f"{mode}: {len(chunks)} chunks, seams at {seams}; one piece {piece_s:.0f} s, "
                  f"chunks {chunked_s:.0f} s (one process, in turn)", flush=True)
            if not rows:
                rows.append(("raw", scores(noisy.astype(np.float32), clean, whole, near, after, None)))
            rows += [(f"{mode}, one piece", scores(piece.frames, clean, whole, near, after, None)),
                     (f"{mode}, chunks", scores(chunked, clean, whole, near, after, piece.frames)),
                     (f"{mode}, chunks without overlaps", scores(unlapped, clean, whole, near, after, piece.frames))]
    print()
    print("| | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, row in rows:
        print(f"| {name} | " + " | ".join(row) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--photons", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0, help="the simulation's and the engine's")
    p.add_argument("--chunk-frames", type=int, default=150)
    p.add_argument("--modes", nargs="+", choices=("streamed", "offline"), default=["streamed", "offline"])
    p.add_argument("engine", nargs=argparse.REMAINDER, help="more `umvd-live batch` engine options, after --")
    args = p.parse_args()
    args.engine = [a for a in args.engine if a != "--"]
    run(args)


if __name__ == "__main__":
    main()
