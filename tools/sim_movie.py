#!/usr/bin/env python
"""Write a simulated two-photon movie and its ground truth as TIFFs (for benchmarks and tests).

Frames are generated and written one at a time, so any length fits in memory. Outputs, in
``--out-dir``: ``noisy.tif`` (uint16, T x H x W), ``clean.tif`` (float32, the expected value of
each noisy frame in ADU) and ``config.json`` (the SimConfig used).

Example: python tools/sim_movie.py --frames 600 --size 128 128 --photons 2 --out-dir /tmp/sim
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import tifffile

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator


def build_config(args: argparse.Namespace) -> SimConfig:
    fields = dict(height=args.size[0], width=args.size[1], rate_hz=args.rate, seed=args.seed)
    for name in ("photons", "gain_adu", "offset_adu", "read_noise_adu", "excess_noise", "n_cells",
                 "drift_px", "jitter_px", "bleach_per_min", "neuropil_activity", "n_processes"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.noise_corr is not None:
        fields["noise_corr_y"], fields["noise_corr_x"] = args.noise_corr
    if args.like_real:
        return SimConfig.like_real_movie(**fields)
    return SimConfig.minimal(**fields) if args.minimal else SimConfig(**fields)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(128, 128))
    p.add_argument("--rate", type=float, default=30.0, help="frame rate in Hz (sets the kinetics per frame)")
    p.add_argument("--photons", type=float, default=None, help="mean detected photons/pixel/frame (default 2)")
    p.add_argument("--drift", dest="drift_px", type=float, help="slow motion amplitude in pixels (default 1)")
    p.add_argument("--jitter", dest="jitter_px", type=float, help="RMS of the fast motion in pixels (default 0.2)")
    p.add_argument("--bleach", dest="bleach_per_min", type=float,
                   help="fraction of fluorescence lost per minute (default 0.005)")
    p.add_argument("--neuropil-activity", dest="neuropil_activity", type=float,
                   help="scale of the neuropil's own activity (default 1, 0: none)")
    p.add_argument("--n-processes", dest="n_processes", type=int, help="thin processes (default: half the somata)")
    p.add_argument("--noise-corr", type=float, nargs=2, metavar=("Y", "X"),
                   help="neighbour correlation of the noise along y and x (default 0 0.18; real movie: 0.19 0.22)")
    p.add_argument("--like-real", action="store_true",
                   help="the real OptiNiSt movie's statistics (4.3 photons, noise correlation 0.19/0.22, no motion)")
    p.add_argument("--minimal", action="store_true",
                   help="the plain model: no motion, no bleaching, white noise, static neuropil, no processes")
    p.add_argument("--gain-adu", dest="gain_adu", type=float)
    p.add_argument("--offset-adu", dest="offset_adu", type=float)
    p.add_argument("--read-noise-adu", dest="read_noise_adu", type=float)
    p.add_argument("--excess-noise", dest="excess_noise", type=float)
    p.add_argument("--n-cells", dest="n_cells", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", required=True, type=Path)
    args = p.parse_args(argv)
    if args.frames < 1:
        p.error("--frames must be >= 1")
    try:
        config = build_config(args)
    except ValueError as exc:
        p.error(str(exc))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sim = TwoPhotonSimulator(config)
    noisy_path, clean_path = args.out_dir / "noisy.tif", args.out_dir / "clean.tif"
    meta = {"axes": "TYX"}
    with tifffile.TiffWriter(noisy_path) as noisy_tif, tifffile.TiffWriter(clean_path) as clean_tif:
        for _ in range(args.frames):
            noisy, clean = sim.next_frame()
            noisy_tif.write(noisy, contiguous=True, metadata=meta)
            clean_tif.write(clean, contiguous=True, metadata=meta)
    (args.out_dir / "config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
    print(f"wrote {noisy_path} (uint16) and {clean_path} (float32): {args.frames} x {config.height} x "
          f"{config.width}, {config.photons} photons/pixel/frame, {sim.scene.n_cells} cells, seed {config.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
