"""`umvd-live batch` measured: the scheduler's cost per task, throughput with 1 and 2 local workers,
and what splitting a movie in time chunks does to quality (docs/batch.md).

    flock /tmp/umvd-cpu.lock python tools/bench_cluster.py overhead --workers 1 2
    flock /tmp/umvd-cpu.lock python tools/bench_cluster.py throughput --workers 1 2
    flock /tmp/umvd-cpu.lock python tools/bench_cluster.py quality

overhead: no-op tasks through a LocalCluster (what Dask itself costs per task, and one task's
round trip). throughput: simulated movies through the `umvd-live batch` command, frames per second
overall from its manifest. quality: PSNR against the simulator's truth of one movie denoised in one
piece and in chunks (the batch's own task functions, run in this process), with and without the
overlaps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import tifffile
from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator

from umvd_live.batch import BatchOptions, denoise_chunk, plan_chunks, train_movie
from umvd_live.engine import EngineConfig
from umvd_live.filemode import denoise_movie
from umvd_live.metrics import psnr


def _noop(i: int) -> int:
    return i


def overhead(workers: list[int], tasks: int) -> None:
    from distributed import Client, LocalCluster

    for n in workers:
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            client.submit(_noop, -1, pure=False).result()  # workers up, function shipped
            started = time.perf_counter()
            client.gather(client.map(_noop, range(tasks), pure=False))
            per_task = (time.perf_counter() - started) / tasks
            trips = []
            for i in range(20):
                started = time.perf_counter()
                client.submit(_noop, i, pure=False).result()
                trips.append(time.perf_counter() - started)
            print(f"{n} workers: {1000 * per_task:.2f} ms per task ({tasks} no-op tasks at once), "
                  f"one task's round trip {1000 * np.median(trips):.1f} ms (median of 20)", flush=True)


def throughput(workers: list[int], movies: int, frames: int, size: int, engine: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(movies):
            noisy, _ = TwoPhotonSimulator(SimConfig(height=size, width=size, photons=2.0, seed=i)).movie(frames)
            tifffile.imwrite(root / f"m{i}.ome.tif", noisy, ome=True, metadata={"axes": "TYX"})
        for n in workers:
            out = root / f"out{n}"
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "umvd_live.cli", "batch", str(root / "m*.ome.tif"),
                                   "--output-dir", str(out), "--workers", str(n), *engine],
                                  capture_output=True, text=True, check=False)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            summary = json.loads((out / "batch-manifest.json").read_text())["summary"]
            print(f"{n} workers: {movies} movies × {frames} frames of {size}²: {summary['frames_per_s']:.2f} frames/s "
                  f"in the batch ({summary['seconds']:.1f} s), {wall:.1f} s with the cluster's start", flush=True)


def quality(frames: int, size: int, chunk_frames: int, config: EngineConfig, offline_steps: int) -> None:
    noisy, clean = TwoPhotonSimulator(SimConfig(height=size, width=size, photons=2.0, seed=0)).movie(frames)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "movie.ome.tif"
        tifffile.imwrite(src, noisy, ome=True, metadata={"axes": "TYX"})
        print(f"{frames} frames of {size}², chunks of {chunk_frames}; PSNR raw {psnr(noisy, clean):.2f} dB", flush=True)
        for offline in (False, True):
            mode = "offline" if offline else "streamed"
            whole = denoise_movie(noisy, config, offline=offline, offline_steps=offline_steps)
            whole.engine.close()
            options = BatchOptions(engine=config, offline=offline, chunk_frames=chunk_frames,
                                   offline_steps=offline_steps)
            model = train_movie(noisy, str(src), config, options)
            chunks = plan_chunks(frames, chunk_frames, model.k, model.context, model.changes)
            # no overlaps: each chunk a movie of its own (its window mirrored at both ends)
            bare = [replace(c, read_start=c.start, read_stop=c.stop, segment_start=c.start, segment_end=c.stop)
                    for c in chunks]
            scores = {}
            for name, plan in (("chunks with overlaps", chunks), ("chunks without overlaps", bare)):
                parts = [denoise_chunk(str(src), model, c, options) for c in plan]
                scores[name] = np.concatenate([p.frames for p in parts])
            line = f"{mode}: one piece {psnr(whole.frames, clean):.2f} dB"
            for name, images in scores.items():
                line += f", {name} {psnr(images, clean):.2f} dB"
            line += (f"; max |chunks with overlaps - one piece| "
                     f"{np.abs(scores['chunks with overlaps'] - whole.frames).max():.3g} ADU")
            print(line, flush=True)
            if not offline:
                edges = sorted({c.start for c in chunks[1:]})
                near = [t for e in edges for t in range(e - 3, e + 3)]
                print(f"  at the {len(edges)} inner chunk edges (±3 frames): with overlaps "
                      f"{psnr(scores['chunks with overlaps'][near], clean[near]):.2f} dB, without "
                      f"{psnr(scores['chunks without overlaps'][near], clean[near]):.2f} dB", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("overhead", "throughput", "quality"))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tasks", type=int, default=1000, help="overhead: no-op tasks")
    p.add_argument("--movies", type=int, default=4, help="throughput: movies")
    p.add_argument("--frames", type=int, default=None, help="frames per movie (throughput 200, quality 600)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--chunk-frames", type=int, default=150, help="quality: chunk length")
    args = p.parse_args()
    engine = ["--preset", "lite", "--warmup-frames", "100", "--warmup-steps", "200", "--steps-per-frame", "1"]
    if args.part == "overhead":
        overhead(args.workers, args.tasks)
    elif args.part == "throughput":
        throughput(args.workers, args.movies, args.frames or 200, args.size, engine)
    else:
        config = EngineConfig(preset="lite", warmup_frames=100, warmup_steps=200, steps_per_frame=1.0)
        quality(args.frames or 600, args.size, args.chunk_frames, config, offline_steps=1000)


if __name__ == "__main__":
    main()
