"""Quality benchmark of `umvd-live denoise` on simulated two-photon movies, scored on the activity.

For each photon level and seed: simulates a movie with the project's simulator (defaults: motion,
bleaching, neuropil with its own activity, thin processes, PMT excess noise, noise correlated along
x), writes it to TIFF, runs the real command line (`umvd-live denoise` at its defaults, streamed;
`--offline` too when asked), and scores it beside the noisy input, a 5-frame temporal mean and the
3-D Gaussian filters whose sigma the ground truth picks *separately for each metric* (oracles;
sigma_t up to 32 frames) with `umvd_live.metrics`: whole-movie PSNR, PSNR over the active set
(where the truth is >= 10 % of its range above the pixel's median), and per-cell footprint-weighted
trace correlation, amplitude slope, peak ratio and lag. Prints one markdown table per photon
level, means over the seeds, for docs/benchmarks.md, and below it the slope and correlation per
kind of source (somata, puncta, thin processes), which those means hide.

    python tools/bench_denoise.py --frames 600 --size 128 128 --photons 0.5 2 8 --seeds 0 1 2 --json out.json

``--sim FIELD=VALUE`` changes the simulator's physics (any `SimConfig` field, e.g. ``rate_hz=10``,
``drift_px=3``), to check that the engine holds on movies unlike those it was tuned on;
``--simulator independent`` draws the movies from a second model written apart from the project's
(tools/independent_sim.py; its ``--sim`` fields are its `TUNABLE`).

Above 2 photons/pixel/frame the PMT gain (ADU per photon) is lowered in proportion, as an
experimenter would, so that the brightest transients stay below 65535 (else 1-2 % of the pixels
clip at 8 photons and the truth is no longer the noisy frames' expected value): the rule of
`umvd-live bench` and `umvd-live demo` (`umvd_live.apps.harness.fit_gain`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tifffile

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
from umvd_live.apps.harness import movie_config
from umvd_live.metrics import ORACLE_LABELS, ORACLE_METRICS, MovieScorer, format_kind, oracle_gaussians, temporal_mean
from umvd_live.metrics import REPORT_HEADERS as HEADER
from umvd_live.metrics import REPORT_METRICS as METRICS
from umvd_live.metrics import format_score as fmt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import independent_sim  # noqa: E402  (a second simulator, tools/independent_sim.py)
from independent_sim import IndependentConfig  # noqa: E402

BEST_COLUMNS = ORACLE_METRICS
#: ``--simulator``: the project's, or tools/independent_sim.py's (a second model, written apart).
SIMULATORS = ("project", "independent")


def run_cli(args: list[str]) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "umvd_live", *args], check=True)
    return time.monotonic() - start


def sim_config(args: argparse.Namespace, photons: float, seed: int) -> SimConfig:
    """The movie's simulator (`harness.movie_config`: the PMT gain lowered above 2 photons by the
    rule `umvd-live bench` and `demo` use, then ``--sim``'s fields; a ``gain_adu`` there wins)."""
    try:
        return movie_config(args.size[0], args.size[1], photons, seed, args.sim)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def independent_config(args: argparse.Namespace, photons: float, seed: int) -> IndependentConfig:
    """The same for ``--simulator independent`` (tools/independent_sim.py)."""
    try:
        return independent_sim.configure(args.size[0], args.size[1], photons, seed, args.sim)
    except ValueError as e:
        raise SystemExit(str(e)) from None


@dataclass(frozen=True)
class Movie:
    """A simulated movie and what scoring it needs, from either simulator."""

    noisy: np.ndarray
    truth: np.ndarray
    footprints: Any
    kinds: tuple[str, ...]
    offset_adu: float
    gain_adu: float


def config_of(args: argparse.Namespace, photons: float, seed: int) -> SimConfig | IndependentConfig:
    """The movie's config from ``args.simulator``'s simulator; SystemExit names a bad ``--sim``."""
    return (independent_config if args.simulator == "independent" else sim_config)(args, photons, seed)


def simulate(args: argparse.Namespace, photons: float, seed: int) -> Movie:
    """One movie of ``args.simulator``."""
    config = config_of(args, photons, seed)
    if isinstance(config, IndependentConfig):
        movie = independent_sim.simulate(config, args.frames)
        return Movie(movie.noisy, movie.truth, movie.footprints, movie.kinds, config.offset_adu, movie.gain_adu)
    sim = TwoPhotonSimulator(config)
    noisy, clean = sim.movie(args.frames)
    return Movie(noisy, clean, sim.footprint_matrix(), tuple(sim.scene.kinds), config.offset_adu, config.gain_adu)


def bench_one(args: argparse.Namespace, photons: float, seed: int, tmp: Path) -> dict:
    """Every method's scores on one simulated movie."""
    movie = simulate(args, photons, seed)
    noisy, clean = movie.noisy, movie.truth
    scorer = MovieScorer(clean, movie.footprints, offset=movie.offset_adu, kinds=movie.kinds)
    rows: dict[str, dict] = {}

    def add(name: str, estimate: np.ndarray, seconds: float | None = None, **extra) -> None:
        rows[name] = {**scorer.score(estimate), "seconds": seconds, **extra}
        r = rows[name]
        print(f"  {name}: PSNR {r['psnr']:.2f}, active {r['active_psnr']:.2f}, corr {r['trace_corr']:.3f}, "
              f"slope {r['trace_slope']:.2f}, peak {r['peak_ratio']:.2f}, lag {r['lag_frames']:+.2f}", flush=True)

    print(f"photons {photons}, seed {seed}: {len(movie.kinds)} sources, {scorer.traces.cells.size} active cells, "
          f"clipped {100 * np.mean(noisy == 65535):.4f} %", flush=True)
    add("noisy input", noisy)
    add("temporal mean, 5 frames", temporal_mean(noisy, 5))
    start = time.monotonic()
    search = oracle_gaussians(noisy, clean, scorer=scorer)
    oracle_seconds = time.monotonic() - start
    for metric, oracle in search.best.items():
        rows[f"oracle:{metric}"] = {**oracle.scores, "seconds": oracle_seconds,
                                    "sigma_t": oracle.sigma_t, "sigma_xy": oracle.sigma_xy}
        r = rows[f"oracle:{metric}"]
        print(f"  Gaussian oracle for {metric} (σt {oracle.sigma_t:g}, σxy {oracle.sigma_xy:g}): "
              f"PSNR {r['psnr']:.2f}, active {r['active_psnr']:.2f}, corr {r['trace_corr']:.3f}, "
              f"slope {r['trace_slope']:.2f}", flush=True)

    if not args.skip_denoise:
        src = tmp / f"noisy_{photons}_{seed}.tif"
        tifffile.imwrite(src, noisy)
        runs = [("umvd-live denoise (default, streamed)", [])]
        if args.offline:
            runs.append(("umvd-live denoise --offline", ["--offline"]))
        for name, extra in runs:
            out = tmp / f"out_{photons}_{seed}_{len(rows)}.ome.tif"
            seconds = run_cli(["denoise", str(src), str(out), *extra, *args.extra])
            result = tifffile.imread(out)
            assert result.shape == noisy.shape and result.dtype == np.float32, (result.shape, result.dtype)
            add(name, result, seconds)
            out.unlink()
        src.unlink()
    return {"config": {"photons": photons, "seed": seed, "gain_adu": movie.gain_adu, "frames": args.frames,
                       "size": list(args.size), "sources": len(movie.kinds),
                       "active_cells": int(scorer.traces.cells.size), "active_fraction": scorer.active_fraction},
            "rows": rows}


def sigmas(runs: list[dict], key: str) -> str:
    st = [run["rows"][key]["sigma_t"] for run in runs]
    sxy = [run["rows"][key]["sigma_xy"] for run in runs]
    join = lambda xs: f"{xs[0]:g}" if len(set(xs)) == 1 else "/".join(f"{x:g}" for x in xs)  # noqa: E731
    return f"σt {join(st)}, σxy {join(sxy)}"


def table(photons: float, runs: list[dict]) -> str:
    seeds = " ".join(str(r["config"]["seed"]) for r in runs)
    lines = [f"**{photons:g} photons/pixel/frame**, seeds {seeds} (mean over seeds; σ per seed where they differ)",
             "", "| method | " + " | ".join(HEADER) + " | seconds |", "|---" * (len(HEADER) + 2) + "|"]

    def mean(key: str, metric: str) -> float:
        return float(np.mean([run["rows"][key][metric] for run in runs]))

    def row(label: str, key: str) -> None:
        secs = [run["rows"][key]["seconds"] for run in runs]
        sec = f"{np.mean(secs):.0f}" if all(s is not None for s in secs) and not key.startswith("oracle") else ""
        lines.append(f"| {label} | " + " | ".join(fmt(m, mean(key, m)) for m in METRICS) + f" | {sec} |")

    row("noisy input", "noisy input")
    row("temporal mean, 5 frames", "temporal mean, 5 frames")
    for metric in BEST_COLUMNS:
        key = f"oracle:{metric}"
        if all(key in run["rows"] for run in runs):
            row(label(runs, key), key)
    cells = []
    for metric in METRICS:
        key = f"oracle:{metric}"
        if metric in BEST_COLUMNS and all(key in run["rows"] for run in runs):
            cells.append(f"{fmt(metric, mean(key, metric))} ({sigmas(runs, key)})")
        else:
            cells.append("")
    lines.append("| best Gaussian per column (oracle) | " + " | ".join(cells) + " | |")
    for key in runs[0]["rows"]:
        if key.startswith("umvd-live"):
            row(key, key)
    return "\n".join(lines)


def kind_table(photons: float, runs: list[dict]) -> str:
    """Amplitude slope and trace correlation per kind of source (soma, punctum, process): the
    means of the table above hide which sources fall short. Rows that some seed lacks (an oracle
    with no cell to score) are left out, as in `table`."""
    kinds = list(dict.fromkeys(k for run in runs for k in run["rows"]["noisy input"]["by_kind"]))

    def mean(key: str, kind: str) -> dict[str, float]:
        found = [run["rows"][key]["by_kind"][kind] for run in runs if kind in run["rows"][key]["by_kind"]]
        return {m: float(np.mean([f[m] for f in found])) if found else float("nan")
                for m in ("trace_slope", "trace_corr")}

    counts = {k: "/".join(str(run["rows"]["noisy input"]["by_kind"].get(k, {}).get("cells", 0)) for run in runs)
              for k in kinds}
    lines = [f"**{photons:g} photons/pixel/frame, per kind of source**: amplitude slope / trace corr "
             "(means over the seeds)", "",
             "| method | " + " | ".join(f"{k} ({counts[k]} cells)" for k in kinds) + " |",
             "|---" * (len(kinds) + 1) + "|"]
    for key in runs[0]["rows"]:
        if all(key in run["rows"] for run in runs):
            lines.append(f"| {label(runs, key)} | " + " | ".join(format_kind(mean(key, k)) for k in kinds) + " |")
    return "\n".join(lines)


def label(runs: list[dict], key: str) -> str:
    """A row's label: the method, or the metric an oracle maximises with its sigmas."""
    if key.startswith("oracle:"):
        return f"Gaussian oracle for {ORACLE_LABELS[key.split(':', 1)[1]]} ({sigmas(runs, key)})"
    return key


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    p.add_argument("--photons", type=float, nargs="+", default=[0.5, 2.0, 8.0],
                   help="mean detected photons/pixel/frame, one table each (default 0.5 2 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--offline", action="store_true", help="also run `denoise --offline`")
    p.add_argument("--sim", action="append", default=[], metavar="FIELD=VALUE",
                   help="a simulator setting other than its default (a SimConfig field, or with --simulator "
                        "independent one of its TUNABLE), repeatable: rate_hz=10, drift_px=3, n_cells=60, ...")
    p.add_argument("--simulator", choices=SIMULATORS, default="project",
                   help="the project's simulator, or tools/independent_sim.py's (a second model, written apart)")
    p.add_argument("--skip-denoise", action="store_true", help="only the baselines and oracles")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `denoise` options (last)")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args()
    config_of(args, args.photons[0], args.seeds[0])  # a bad --sim stops here, before any movie is simulated

    command = "python tools/bench_denoise.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_start = psutil.getloadavg()[0]
    results: dict[float, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for photons in args.photons:
            results[photons] = [bench_one(args, photons, seed, Path(tmp)) for seed in args.seeds]
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, load {load_start:.1f} → {psutil.getloadavg()[0]:.1f}")
    print(f"\n{command}\n{datetime.date.today().isoformat()}; {args.frames}×{args.size[0]}×{args.size[1]} simulated "
          f"movies ({args.simulator} simulator, {' '.join(args.sim) or 'defaults'}); {machine}\n")
    if args.json:  # first: the figures of a long run outlive a failure to tabulate them
        Path(args.json).write_text(json.dumps({"command": command, "date": datetime.date.today().isoformat(),
                                               "machine": machine,
                                               "results": {str(k): v for k, v in results.items()}}, indent=1))
    for photons, runs in results.items():
        print(table(photons, runs) + "\n")
        print(kind_table(photons, runs) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
