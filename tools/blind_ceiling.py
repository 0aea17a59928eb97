"""What an output blind to its frame can keep of a jittering truth (tools/independent_sim.py's movies).

Why: issue 14's output stays blind to its centre frame, so it cannot know where frame t's own jitter
put the tissue, and the part of a cell's footprint-weighted truth trace that the jitter moves is noise
to it. At best it is right about everything else: its frame is the truth with the drift and without
the jitter, or, the jitter being unknown, averaged over it (the jitter's Gaussian blur in place of its
shift). Scored against the real truth, that frame's amplitude slope and correlation are what an output
keeps that is blind, and unbiased where it can know; they say how close the issue's slope target of
0.9 lies to what blindness allows (docs/benchmarks.md, "What a blind output can keep under jitter").
An output may still score above them: one that overshoots the part it can know.

    python tools/blind_ceiling.py --photons 0.5 2 --seeds 0 1 2 3 4 --json out.json

Only for the independent simulator: its jitter is white and drawn apart from the rest, so
``jitter_px=0`` gives the same movie without it. The project simulator's fast motion holds
oscillations partly predictable from neighbouring frames, and its canvas grows with the jitter, so a
jitter-free movie of it would be another scene.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from umvd_live.metrics import finite_json, trace_scores

sys.path.insert(0, str(Path(__file__).resolve().parent))
import independent_sim  # noqa: E402  (tools/independent_sim.py)
from bench_denoise import independent_config  # noqa: E402  (its --sim read as the benchmark reads it)
from independent_sim import IndependentConfig  # noqa: E402

ESTIMATES = ("without the jitter", "the jitter averaged out")


def ceilings(config: IndependentConfig, frames: int) -> dict[str, Any]:
    """Trace scores (means, and per kind of source) of each of `ESTIMATES` against the truth."""
    movie = independent_sim.simulate(config, frames)
    still = independent_sim.simulate(dataclasses.replace(config, jitter_px=0.0), frames)
    offset = config.offset_adu
    # Each movie is scaled to the config's mean photons over its own frames; the still one's mean
    # differs by a hair, so it is put on the moving one's scale (the truth is linear in it).
    scale = (movie.truth.mean(dtype=np.float64) - offset) / (still.truth.mean(dtype=np.float64) - offset)
    known = offset + (still.truth - offset) * np.float32(scale)
    averaged = jitter_average(known, config.motion * config.jitter_px)
    out: dict[str, Any] = {}
    for name, estimate in zip(ESTIMATES, (known, averaged)):
        scores = trace_scores(estimate, movie.truth, movie.footprints, offset)
        out[name] = {**scores.summary(), "by_kind": scores.by_kind(movie.kinds)}
    return out


def jitter_average(movie: np.ndarray, rms_px: float) -> np.ndarray:
    """Each frame averaged over white shifts of ``rms_px`` RMS per axis: to second order in the shift,
    the frame plus rms² / 2 times its second derivative along each axis, the 3-tap kernel
    [a, 1 - 2a, a] with a = rms² / 2 (a Gaussian sampled at σ 0.25 px is a delta to 1e-3, not a blur
    of variance 0.0625 px²). From rms 0.8 px (a = 1/3: three equal taps) a sampled Gaussian has the
    shift's variance (0.64 px² at σ 0.8) and the 3-tap kernel would turn negative."""
    a = rms_px**2 / 2
    if a > 1 / 3:
        return ndimage.gaussian_filter(movie, (0, rms_px, rms_px), mode="nearest")
    kernel = np.array([a, 1 - 2 * a, a])
    along_y = ndimage.correlate1d(movie, kernel, axis=1, mode="nearest")
    return ndimage.correlate1d(along_y, kernel, axis=2, mode="nearest")


def table_row(label: str, scores: dict[str, Any]) -> str:
    cells = scores[ESTIMATES[1]]["cells"]
    means = " | ".join(f"{scores[name]['trace_slope']:.3f} / {scores[name]['trace_corr']:.4f}" for name in ESTIMATES)
    kinds = ", ".join(f"{kind} {s['trace_slope']:.2f} / {s['trace_corr']:.3f}"
                      for kind, s in scores[ESTIMATES[1]]["by_kind"].items())
    return f"| {label} ({cells}) | {means} | {kinds} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Amplitude slope and trace correlation of the independent simulator's "
                                "truth without its jitter, scored against its truth: what a blind output keeps.")
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    p.add_argument("--photons", type=float, nargs="+", default=[0.5, 2.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sim", action="append", default=[], metavar="FIELD=VALUE",
                   help="the independent simulator's fields: " + ", ".join(independent_sim.TUNABLE))
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)
    independent_config(args, args.photons[0], args.seeds[0])  # a bad --sim stops here, before the table
    print("| movie (scored cells) | without the jitter: slope / corr | the jitter averaged out: slope / corr "
          "| per kind (averaged): slope / corr |")
    print("|---|---|---|---|")
    results = []
    for photons in args.photons:
        for seed in args.seeds:
            config = independent_config(args, photons, seed)
            scores = ceilings(config, args.frames)
            print(table_row(f"{photons:g} photons, seed {seed}", scores), flush=True)
            results.append({"photons": photons, "seed": seed, "config": dataclasses.asdict(config), **scores})
    if args.json:
        args.json.write_text(json.dumps(finite_json({"argv": sys.argv, "movies": results}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
