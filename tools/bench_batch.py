"""Time per frame of the engine against its batch size and workers: what `--batch` and
`--workers` should be on this machine.

Streams random frames through a live `StreamDenoiser` (an untrained network: the time does not
depend on the weights; no training) with `push_many`, `batch × workers` frames per call,
`max_batch = batch` and `workers` passes side by side, the machine's cores split among them. What
is timed is the engine's whole path per frame: normalisation, G, the window and context history,
D, and the copy back to numpy.

    python tools/bench_batch.py --preset lite --size 256 256 --size 512 512 --batch 1 2 4 8 --workers 1 2

On the 2-core development CPU one window at a time is fastest from 256² on (docs/benchmarks.md);
on a GPU a batch fills the device.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from umvd_live.engine import EngineConfig, StreamDenoiser, cpu_cores


def seconds_per_frame(config: EngineConfig, frames: np.ndarray, batch: int, seconds: float) -> float:
    """`batch`: frames per `push_many` call."""
    with StreamDenoiser(config) as den:
        warm = 2 * den.config.window + 100  # past the context blocks' reach: the steady state
        for start in range(0, warm, batch):
            den.push_many(frames[start % len(frames):][:batch])
        pushed, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            start = (warm + pushed) % (len(frames) - batch)
            den.push_many(frames[start:start + batch])  # outputs come back as numpy: synchronised
            pushed += batch
        return (time.perf_counter() - started) / pushed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="lite", choices=("lite", "fast", "paper"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--size", type=int, nargs=2, action="append", metavar=("H", "W"))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="passes side by side (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per pass on a CPU (default: the cores / workers)")
    p.add_argument("--seconds", type=float, default=3.0, help="timing per batch size (default 3)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for h, w in args.size or [(256, 256), (512, 512)]:
            base = EngineConfig(preset=args.preset, device=args.device, precision=args.precision,
                                train_mode="inline", steps_per_frame=0)
            frames = rng.poisson(20.0, (max(args.batch) * max(args.workers) + 64, h, w)).astype(np.uint16)
            weights = Path(tmp) / f"untrained_{h}x{w}.pt"
            with StreamDenoiser(base) as den:
                den.push(frames[0], infer=False)
                den.save_weights(weights)
                label = f"{den.preset} {h}×{w} on {den.device} ({'bf16' if den.bf16 else 'fp32'})"
            for workers in args.workers:
                threads = args.threads or max(1, cpu_cores() // workers)
                for batch in args.batch:
                    config = replace(base, init=str(weights), max_batch=batch, workers=workers, cpu_threads=threads)
                    ms = 1000 * seconds_per_frame(config, frames, batch * workers, args.seconds)
                    print(f"{label}: batch {batch:3d} × {workers} workers: {ms:7.2f} ms per frame, "
                          f"{1000 / ms:8.1f} frames/s ({threads} threads per pass)", flush=True)


if __name__ == "__main__":
    main()
