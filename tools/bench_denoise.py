"""Quality benchmark of `umvd-live denoise` on a simulated two-photon movie with ground truth.

Writes the simulated movie, runs the real command line (streamed default, then `--offline`), and
compares with the noisy input, a 5-frame temporal mean and the 3-D Gaussian filter that the
ground truth says is best (an oracle): PSNR over the whole movie, and over the pixels and frames
where the truth is active (calcium transients) with the slope that says whether their amplitude
survives (`metrics.activity_fidelity`). Prints a markdown table for docs/benchmarks.md.

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
from umvd_live.metrics import activity_fidelity, best_gaussian, psnr, temporal_mean


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
    rows: list[dict] = []

    def add(name: str, estimate: np.ndarray, seconds: float | None = None, notes: str = "") -> None:
        active_psnr, slope = activity_fidelity(estimate, clean)
        rows.append({"method": name, "psnr_db": psnr(estimate, clean), "active_psnr_db": active_psnr,
                     "activity_slope": slope, "seconds": seconds, "notes": notes})

    add("noisy input", noisy)
    add("temporal mean, 5 frames", temporal_mean(noisy, 5))
    start = time.monotonic()
    g_movie, (st, sxy), g_psnr = best_gaussian(noisy, clean)
    add("3-D Gaussian, best σ by ground truth", g_movie, time.monotonic() - start, f"σt={st}, σxy={sxy}")

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
            add(name, result, seconds, " ".join(extra + args.extra))

    machine = f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    print(f"\n{args.frames}×{args.size[0]}×{args.size[1]} simulated movie, {args.photons} photons/pixel/frame, seed {args.seed}; {machine}\n")
    print("| method | PSNR (dB) | vs Gaussian (dB) | active-set PSNR (dB) | activity slope | seconds | notes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        secs = f"{r['seconds']:.0f}" if r["seconds"] is not None else ""
        print(f"| {r['method']} | {r['psnr_db']:.2f} | {r['psnr_db'] - g_psnr:+.2f} | {r['active_psnr_db']:.2f} "
              f"| {r['activity_slope']:.2f} | {secs} | {r['notes']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
