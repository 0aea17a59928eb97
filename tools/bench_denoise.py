"""Quality benchmark of `umvd-live denoise` on a simulated two-photon movie with ground truth.

Writes the simulated movie, runs the real command line (streamed default, then `--offline`), and
compares with the noisy input, a 5-frame temporal mean and the 3-D Gaussian filter that the
ground truth says is best (an oracle). Prints a markdown table for docs/benchmarks.md.

    python tools/bench_denoise.py --frames 600 --size 128 128 --photons 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
from umvd_live.metrics import best_gaussian, psnr, temporal_mean


def run_cli(args: list[str]) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "umvd_live.cli", *args], check=True)
    return time.monotonic() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--size", type=int, nargs=2, default=(128, 128))
    p.add_argument("--photons", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `denoise` options")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    config = SimConfig(height=args.size[0], width=args.size[1], photons=args.photons, seed=args.seed)
    noisy, clean = TwoPhotonSimulator(config).movie(args.frames)
    rows: list[tuple[str, float, float | None, str]] = [("noisy input", psnr(noisy, clean), None, "")]
    rows.append(("temporal mean, 5 frames", psnr(temporal_mean(noisy, 5), clean), None, ""))
    start = time.monotonic()
    _, (st, sxy), g_psnr = best_gaussian(noisy, clean)
    rows.append(("3-D Gaussian, best σ by ground truth", g_psnr, time.monotonic() - start, f"σt={st}, σxy={sxy}"))

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "noisy.tif"
        tifffile.imwrite(src, noisy)
        runs = [("umvd-live denoise (default, streamed)", [])]
        if not args.skip_offline:
            runs.append(("umvd-live denoise --offline", ["--offline"]))
        for name, extra in runs:
            out = Path(tmp) / f"out{len(rows)}.ome.tif"
            seconds = run_cli(["denoise", str(src), str(out), *extra, *args.extra])
            result = tifffile.imread(out)
            assert result.shape == noisy.shape and result.dtype == np.float32, (result.shape, result.dtype)
            rows.append((name, psnr(result, clean), seconds, " ".join(extra + args.extra)))

    machine = f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    print(f"\n{args.frames}×{args.size[0]}×{args.size[1]} simulated movie, {args.photons} photons/pixel/frame, seed {args.seed}; {machine}\n")
    print("| method | PSNR (dB) | vs Gaussian (dB) | seconds | notes |\n|---|---|---|---|---|")
    for name, value, seconds, notes in rows:
        secs = f"{seconds:.0f}" if seconds is not None else ""
        print(f"| {name} | {value:.2f} | {value - g_psnr:+.2f} | {secs} | {notes} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
