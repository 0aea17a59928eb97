#!/usr/bin/env python
"""Cell Tracking Challenge movies through `umvd-live denoise`: is any frame worse than a blind
temporal mean of its neighbours?

The CTC movies (../shared/data/ctc_*.tif) are near-clean fluorescence time-lapses with slow frame
rates: cells move between frames, which is what breaks temporal averaging. For each movie and
photon level, noise is added to the movie as if it had been imaged with that few photons: its
darkest value is taken as the offset, its bright level (the 99.5th percentile above the offset) as
``photons`` photons per pixel, and each pixel's photons are drawn from a Poisson distribution
(seeded per movie and level), then scaled back to the movie's units. The noisy movie goes through
`umvd-live denoise` at its defaults (the command line), and each frame is scored (PSNR against the
clean movie, its range as the peak) as: the noisy frame; the neighbour mean, the N-1 = 6 frames
around it with itself left out (only the frames that exist at the ends); the denoised frame.
Issue 14 asks that no denoised frame be worse than the neighbour mean.

The movies are also denoised as they are, with no noise added, and the output compared with its
input: a denoiser should leave a near-clean movie nearly unchanged.

    python tools/check_ctc.py --photons 2 8 --json /tmp/ctc.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from figure_real import neighbour_mean, run_denoise

from umvd_live.recording.ometiff import read_recording

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BRIGHT_PERCENTILE = 99.5


def frame_psnr(estimate: np.ndarray, truth: np.ndarray, peak: float) -> np.ndarray:
    """PSNR of every frame, with one peak for the whole movie."""
    err = (np.asarray(estimate, np.float64) - np.asarray(truth, np.float64)) ** 2
    mse = err.reshape(len(err), -1).mean(axis=1)
    return 10 * np.log10(peak * peak / np.maximum(mse, 1e-30))


def add_photon_noise(clean: np.ndarray, photons: float, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """The movie imaged with ``photons`` photons/pixel at its bright level: (noisy, offset, bright)."""
    offset = float(clean.min())
    bright = float(np.percentile(clean - offset, BRIGHT_PERCENTILE))
    if bright <= 0:
        raise ValueError("the movie has no signal above its darkest value")
    counts = rng.poisson(photons * (clean - offset) / bright)
    return (offset + counts * (bright / photons)).astype(np.float32), offset, bright


def check_movie(path: Path, index: int, photons: list[float], seed: int, work: Path) -> dict:
    clean = tifffile.imread(path).astype(np.float32)
    peak = float(clean.max() - clean.min())
    out: dict = {"movie": path.name, "frames": len(clean), "shape": list(clean.shape[1:]), "noisy": []}
    for p in photons:
        rng = np.random.default_rng([seed, index, round(p * 1000)])
        noisy, offset, bright = add_photon_noise(clean, p, rng)
        source = work / f"{path.stem}_p{p:g}.tif"
        tifffile.imwrite(source, noisy)
        result = work / f"{path.stem}_p{p:g}_denoised.ome.tif"
        seconds = run_denoise(source, result)
        den, infos, prov = read_recording(result)
        den = den.astype(np.float32)
        steps = [i.model_step for i in infos]
        scores = {"raw": frame_psnr(noisy, clean, peak),
                  "neighbour mean": frame_psnr(neighbour_mean(noisy), clean, peak),
                  "denoised": frame_psnr(den, clean, peak)}
        margin = scores["denoised"] - scores["neighbour mean"]
        worse = np.flatnonzero(margin < 0)
        row = {"photons": p, "offset": offset, "bright": bright, "seconds": seconds,
               "mean_psnr": {k: float(v.mean()) for k, v in scores.items()},
               "per_frame": {k: [round(float(x), 3) for x in v] for k, v in scores.items()},
               "worst_margin": float(margin.min()), "worst_frame": int(margin.argmin()),
               "frames_worse": worse.tolist(), "margins_worse": [round(float(margin[i]), 3) for i in worse],
               "model_step": steps, "state": [i.state for i in infos], "changes": prov.get("extra.changes"),
               "final_step": max(s or 0 for s in steps)}
        out["noisy"].append(row)
        print(f"{path.name} {p:g} photons: raw {row['mean_psnr']['raw']:.2f}, neighbour mean "
              f"{row['mean_psnr']['neighbour mean']:.2f}, denoised {row['mean_psnr']['denoised']:.2f} dB; worst "
              f"margin {row['worst_margin']:+.2f} dB at frame {row['worst_frame']}; {len(worse)} frames worse "
              f"{dict(zip(row['frames_worse'], row['margins_worse']))}; model step per frame {steps}; "
              f"{seconds:.0f} s", flush=True)
    result = work / f"{path.stem}_clean_denoised.ome.tif"
    seconds = run_denoise(path, result)
    den, infos, _ = read_recording(result)
    den = den.astype(np.float32)
    vs_input = frame_psnr(den, clean, peak)
    nbr = frame_psnr(neighbour_mean(clean), clean, peak)
    diff = den - clean
    out["clean"] = {"seconds": seconds, "psnr_mean": float(vs_input.mean()), "psnr_min": float(vs_input.min()),
                    "psnr_min_frame": int(vs_input.argmin()), "neighbour_mean_psnr_mean": float(nbr.mean()),
                    "neighbour_mean_psnr_min": float(nbr.min()),
                    "mean_change": float(diff.mean()), "rms_change": float(np.sqrt((diff**2).mean())),
                    "p99_abs_change": float(np.percentile(np.abs(diff), 99)), "range": peak,
                    "per_frame": [round(float(x), 3) for x in vs_input],
                    "model_step": [i.model_step for i in infos]}
    c = out["clean"]
    print(f"{path.name} as it is: output vs input {c['psnr_mean']:.2f} dB (worst frame {c['psnr_min_frame']}: "
          f"{c['psnr_min']:.2f}); neighbour mean vs input {c['neighbour_mean_psnr_mean']:.2f}; rms change "
          f"{c['rms_change']:.2f} of a range of {peak:.0f}; {seconds:.0f} s", flush=True)
    return out


def tables(results: list[dict]) -> str:
    lines = [("| movie | photons at the bright level | PSNR raw (dB) | neighbour mean | denoised | denoised, "
              "frames by the final model / by an earlier one (frames) | worst frame: denoised - neighbour mean | "
              "frames worse than the neighbour mean: frame (margin, model step) | seconds |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for n in r["noisy"]:
            m, steps = n["mean_psnr"], n["model_step"]
            den = np.asarray(n["per_frame"]["denoised"])
            final = np.asarray([s == n["final_step"] for s in steps])
            split = " / ".join(f"{den[sel].mean():.2f} ({sel.sum()})" if sel.any() else "- (0)"
                               for sel in (final, ~final))
            worse = ", ".join(f"{f} ({d:+.2f}, {steps[f]})" for f, d in zip(n["frames_worse"], n["margins_worse"]))
            lines.append(f"| {r['movie']} | {n['photons']:g} | {m['raw']:.2f} | {m['neighbour mean']:.2f} | "
                         f"{m['denoised']:.2f} | {split} | {n['worst_margin']:+.2f} dB (frame {n['worst_frame']}) | "
                         f"{len(n['frames_worse'])} of {r['frames']}{': ' + worse if worse else ''} | "
                         f"{n['seconds']:.0f} |")
    lines += ["", ("| movie, as it is | output vs input: PSNR mean (worst frame) | neighbour mean vs input | "
              "rms change / range | mean change | seconds |"), "|---|---|---|---|---|---|"]
    for r in results:
        c = r["clean"]
        lines.append(f"| {r['movie']} | {c['psnr_mean']:.2f} dB ({c['psnr_min']:.2f}, frame {c['psnr_min_frame']}) | "
                     f"{c['neighbour_mean_psnr_mean']:.2f} dB | {c['rms_change']:.2f} / {c['range']:.0f} | "
                     f"{c['mean_change']:+.2f} | {c['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="folder of the ctc_*.tif movies (default ../shared/data)")
    p.add_argument("--photons", type=float, nargs="+", default=[2.0, 8.0],
                   help="photons/pixel/frame at each movie's bright level (default 2 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--movies", nargs="*", help="only these file names (default: every ctc_*.tif)")
    p.add_argument("--work", type=Path, help="keep the noisy and denoised movies here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write every figure, per frame, here")
    args = p.parse_args(argv)
    # the seed of a movie's noise depends on its place among all the movies, not on --movies
    paths = [(i, q) for i, q in enumerate(sorted(args.data.glob("ctc_*.tif")))
             if not args.movies or q.name in args.movies]
    if not paths:
        print(f"check_ctc: no ctc_*.tif movie in {args.data}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = [check_movie(path, i, args.photons, args.seed, work) for i, path in paths]
    print(tables(results))
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "seed": args.seed, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
