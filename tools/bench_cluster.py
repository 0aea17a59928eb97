"""`umvd-live batch` measured: the scheduler's cost per task and throughput with 1 and 2 local
workers (docs/batch.md; what time chunks do to quality: tools/bench_chunking.py).

    flock /tmp/umvd-cpu.lock python tools/bench_cluster.py overhead --workers 1 2
    flock /tmp/umvd-cpu.lock python tools/bench_cluster.py throughput --workers 1 2

overhead: no-op tasks through a LocalCluster (what Dask itself costs per task, and one task's
round trip). throughput: simulated movies through the `umvd-live batch` command, frames per second
overall from its manifest.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator


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
            done = subprocess.run([sys.executable, "-m", "umvd_live", "batch", str(root / "m*.ome.tif"),
                                   "--output-dir", str(out), "--workers", str(n), *engine],
                                  capture_output=True, text=True, check=False)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            summary = json.loads((out / "batch-manifest.json").read_text())["summary"]
            print(f"{n} workers: {movies} movies × {frames} frames of {size}²: {summary['frames_per_s']:.2f} frames/s "
                  f"in the batch ({summary['seconds']:.1f} s), {wall:.1f} s with the cluster's start", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("overhead", "throughput"))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tasks", type=int, default=1000, help="overhead: no-op tasks")
    p.add_argument("--movies", type=int, default=4, help="throughput: movies")
    p.add_argument("--frames", type=int, default=200, help="throughput: frames per movie")
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    engine = ["--preset", "lite", "--warmup-frames", "100", "--warmup-steps", "200", "--steps-per-frame", "1"]
    if args.part == "overhead":
        overhead(args.workers, args.tasks)
    else:
        throughput(args.workers, args.movies, args.frames, args.size, engine)


if __name__ == "__main__":
    main()
