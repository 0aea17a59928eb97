"""Where a file's amplitude slope goes: the restoration's blind measurement beside the truth's.

`denoise` restores the transients' amplitude by the slope of its outputs on the truth, measured
blind (`umvd_live.engine.amplitude`): the outputs' covariance with the noisy frames over the
truth's variance, that variance extrapolated from the noisy frames' lag-1 and lag-2
autocovariance, 2 C(1) - C(2). This tool splits, on one simulated movie, what keeps the restored
slope from 1: the outputs of `umvd-live denoise --keep-amplitude 0` (the network and the
cell-scale blend, no restoration) are restored again here with the truth's own variance in
place of the blind estimate, and with other local-gain settings.

    python tools/slope_budget.py --photons 2 --seeds 3 --sim rate_hz=10 --work /tmp/budget

Per movie it prints: the unrestored outputs' per-cell slope; the pooled slope as measured and as
it truly is; the blind variance estimate over the truth's variance, and the same extrapolation of
the truth's own lags over its variance (what no lag sees: a frame's own motion jitter, the
fastest rises); then PSNR / active-set PSNR / trace corr / slope of the default restoration, of
the restoration given the truth's variance (the ceiling of a better estimate), and of each
``--local PX,PRIOR`` (the local gain's smoothing and its pull towards the field's slope).
``--work`` keeps each movie's outputs, so a second run only re-scores.

``--variance-only`` runs no `denoise`: per movie, the blind estimate of the truth's variance over
the truth's own lag extrapolation (what the estimate can at best see), and their mean and spread
over the seeds, to tell the measurement's bias from its chance error:

    python tools/slope_budget.py --variance-only --photons 0.5 2 8 --seeds 10 11 12 13 14 15 16 17 18 19
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

from umvd_live.adapters.simulation import TwoPhotonSimulator
from umvd_live.engine import amplitude
from umvd_live.engine.window import window_indices
from umvd_live.metrics import MovieScorer
from umvd_live.recording.ometiff import read_recording

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_denoise import sim_config  # noqa: E402  (the benchmark's movies, --sim included)

#: The frames on either side of an output that the default `lite` final pass reads (window and
#: context blocks from both sides: `window.context_reach(3, (8, 24, 64), True)`).
REACH = 51


def restore(noisy: np.ndarray, net: np.ndarray, scored: np.ndarray,
            shrinkage: amplitude.Shrinkage | None) -> np.ndarray:
    """`amplitude.restore_amplitude` as `denoise` runs it, with ``shrinkage`` in place of its blind
    measurement (None: the blind one)."""
    out = [frame.copy() for frame in net]

    def neighbours(t: int) -> np.ndarray:  # the referee's blind window mean, as `engine.offline`'s
        return np.mean([noisy[i] for i in window_indices(t, 0, len(noisy) - 1, 3) if i != t], axis=0)

    measure = amplitude.measure_shrinkage
    if shrinkage is not None:
        amplitude.measure_shrinkage = lambda *a, **k: shrinkage
    try:
        amplitude.restore_amplitude(list(noisy), out, reach=REACH, keep=1.0, scored=scored, neighbours=neighbours)
    finally:
        amplitude.measure_shrinkage = measure
    return np.stack(out)


def about_baselines(movie: np.ndarray) -> np.ndarray:
    """The truth's deviations from its own baselines (the weights of `amplitude.slow_baselines`,
    frame t left out), float64: what the restoration's measurement estimates the variance of."""
    frames = list(movie.astype(np.float32))
    baselines = amplitude.slow_baselines(frames, frames, 0)
    assert baselines is not None
    return np.stack([movie[t] - baselines.noisy(t, frames[t]) for t in range(len(frames))]).astype(np.float64)


def lag_extrapolation(deviations: np.ndarray) -> float:
    """2 C(1) - C(2) of the truth's deviations (`about_baselines`), pooled, over their variance."""
    lag = [float((deviations[j:] * deviations[:len(deviations) - j]).mean()) for j in range(3)]
    return (2 * lag[1] - lag[2]) / lag[0]


def variance_only(args: argparse.Namespace, photons: float, seeds: list[int]) -> None:
    """The blind variance estimate against the truth's lag extrapolation, movie by movie."""
    differences = []
    for seed in seeds:
        config = sim_config(args, photons, seed)
        noisy, clean = TwoPhotonSimulator(config).movie(args.frames)
        frames, truth_frames = list(noisy.astype(np.float32)), list(clean.astype(np.float32))
        # the truth as the estimate: its covariance always stands out, only the variance is looked at
        baselines = amplitude.slow_baselines(frames, truth_frames, 0)
        measured = amplitude.measure_shrinkage(frames, truth_frames, baselines) if baselines is not None else None
        truth = about_baselines(clean)
        variance = float((truth * truth).mean())
        noise = float(noisy.astype(np.float64).var(0).mean()) - float(clean.astype(np.float64).var(0).mean())
        blind = float(measured.signal.mean()) / variance if measured is not None else float("nan")
        extrapolated = lag_extrapolation(truth)
        differences.append(blind - extrapolated)
        print(f"photons {photons:g}, seed {seed}: blind variance / truth's {blind:.3f}, the truth's lag extrapolation "
              f"{extrapolated:.3f}, difference {differences[-1]:+.3f}; "
              f"noise variance / truth's {noise / variance:.1f}", flush=True)
    spread = np.std(differences, ddof=1) if len(differences) > 1 else float("nan")
    print(f"photons {photons:g}: difference mean {np.mean(differences):+.4f}, sd {spread:.4f} over {len(seeds)} movies")


def budget(args: argparse.Namespace, photons: float, seed: int) -> None:
    config = sim_config(args, photons, seed)
    sim = TwoPhotonSimulator(config)
    noisy_u16, clean = sim.movie(args.frames)
    noisy, clean = noisy_u16.astype(np.float32), clean.astype(np.float64)
    work = Path(args.work) / f"p{photons:g}_s{seed}_{'_'.join(args.sim) or 'default'}"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "net.ome.tif").exists():
        tifffile.imwrite(work / "noisy.tif", noisy_u16)
        subprocess.run([sys.executable, "-m", "umvd_live", "denoise", str(work / "noisy.tif"),
                        str(work / "net.ome.tif"), "--keep-amplitude", "0", "--threads", str(args.threads)], check=True)
    net_frames, infos, _ = read_recording(work / "net.ome.tif")
    net = np.asarray(net_frames, np.float32)
    scored = np.array([info.state == "live" for info in infos])
    scorer = MovieScorer(clean, sim.footprint_matrix(), offset=config.offset_adu, kinds=sim.scene.kinds)

    baselines = amplitude.slow_baselines(list(noisy), list(net), REACH)
    measured = amplitude.measure_shrinkage(list(noisy), list(net), baselines, scored) if baselines is not None else None
    if baselines is None or measured is None:
        print(f"photons {photons:g}, seed {seed}: no activity measured")
        return
    truth = about_baselines(clean)
    d = np.stack([net[t] - baselines.output(t, noisy[t]) for t in np.flatnonzero(scored).tolist()]).astype(np.float64)
    true_slope = float((d * truth[scored]).sum() / (truth[scored] ** 2).sum())
    true_variance = (truth * truth).mean(0)
    unrestored = scorer.score(net)
    print(f"photons {photons:g}, seed {seed} {' '.join(args.sim)}: unrestored slope "
          f"{unrestored['trace_slope']:.3f} ({by_kind(unrestored)}); "
          f"pooled slope measured {measured.slope:.3f}, true {true_slope:.3f}; "
          f"blind variance / truth's {measured.signal.mean() / true_variance.mean():.3f}, "
          f"the truth's own lag extrapolation / its variance {lag_extrapolation(truth):.3f}", flush=True)
    ceiling = amplitude.Shrinkage(float(measured.covariance.mean() / true_variance.mean()), measured.covariance,
                                  true_variance, measured.noise_to_signal)
    runs: list[tuple[str, amplitude.Shrinkage | None, tuple[float, float] | None]] = [
        ("default restoration", None, None), ("with the truth's variance", ceiling, None)]
    runs += [(f"local gain px {px:g}, prior {prior:g}", None, (px, prior)) for px, prior in args.local]
    defaults = amplitude.LOCAL_PX, amplitude.LOCAL_PRIOR
    for label, shrinkage, local in runs:
        amplitude.LOCAL_PX, amplitude.LOCAL_PRIOR = local or defaults
        try:
            s = scorer.score(restore(noisy, net, scored, shrinkage))
        finally:
            amplitude.LOCAL_PX, amplitude.LOCAL_PRIOR = defaults
        print(f"  {label}: PSNR {s['psnr']:.2f}, active {s['active_psnr']:.2f}, corr {s['trace_corr']:.3f}, "
              f"slope {s['trace_slope']:.3f} ({by_kind(s)})", flush=True)


def by_kind(scores: dict) -> str:
    """The slope per kind of source (somata, puncta, processes)."""
    return ", ".join(f"{kind} {value['trace_slope']:.2f}" for kind, value in scores["by_kind"].items())


def pair(text: str) -> tuple[float, float]:
    px, _, prior = text.partition(",")
    return float(px), float(prior)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    p.add_argument("--photons", type=float, nargs="+", default=[2.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[3])
    p.add_argument("--sim", action="append", default=[], metavar="FIELD=VALUE", help="as tools/bench_denoise.py's")
    p.add_argument("--local", type=pair, nargs="*", default=[], metavar="PX,PRIOR",
                   help="local-gain settings to compare (default 4,2)")
    p.add_argument("--threads", type=int, default=1, help="`denoise`'s torch threads (1: deterministic)")
    p.add_argument("--work", default="slope_budget", help="folder for the movies and outputs (reused)")
    p.add_argument("--variance-only", action="store_true", help="only the blind variance estimate, no `denoise`")
    args = p.parse_args()
    for photons in args.photons:
        if args.variance_only:
            variance_only(args, photons, args.seeds)
            continue
        for seed in args.seeds:
            budget(args, photons, seed)


if __name__ == "__main__":
    main()
