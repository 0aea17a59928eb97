"""Does the shipped prior help on data unlike its training? Judged blind, as the engine does.

For each movie, the prior alone (no training) denoises every frame, and the engine's referee
(`engine.outputs.BlindReferee`) compares, frame by frame, the network's output and the temporal mean of
the window's other frames with the noisy frame itself: both are blind to it, so the smaller mean
squared distance is the better estimate without any ground truth. The table gives both distances
(in the normalised units of the stream) and the share of frames the referee showed the network;
the rest got the temporal mean, so no frame is worse than the mean either way.

    python tools/check_prior.py ../shared/data/*.tif
    python tools/check_prior.py --preset fast ../shared/data/*.tif
"""

from __future__ import annotations

import argparse

import numpy as np
import tifffile

from umvd_live.engine import EngineConfig, StreamDenoiser
from umvd_live.engine.outputs import BlindReferee, Probe


def judge(movie: np.ndarray, prior: str, preset: str = "auto") -> dict:
    config = EngineConfig(preset=preset, prior=prior, train_mode="inline", steps_per_frame=0.0,
                          warmup_frames=10**9, cpu_threads=1)
    network, mean, shown = [], [], 0
    with StreamDenoiser(config) as den:
        if den.config.prior == "none":
            raise SystemExit("--prior none: nothing to check")
        judge_one = den._judge

        def record(image: np.ndarray, probe: Probe, referee: BlindReferee) -> bool:
            centre = probe.centre[0].cpu().numpy()
            network.append(float(np.mean(np.square(image - centre))))
            mean.append(float(np.mean(np.square(probe.neighbours[0].cpu().numpy() - centre))))
            return judge_one(image, probe, referee)

        den._judge = record
        outputs = [o for frame in movie for o in den.push(frame)] + den.flush()
        shown = sum(o.state == "live" for o in outputs)
        name = den.prior.name if den.prior else None
    return {"prior": name, "frames": len(outputs), "network_mse": float(np.mean(network)),
            "mean_mse": float(np.mean(mean)), "shown": shown / len(outputs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("movies", nargs="+", help="T×H×W TIFF movies (a 4-D one: its first channel)")
    p.add_argument("--prior", default="auto")
    p.add_argument("--preset", default="auto",
                   help="the network (auto: a file's, lite on a CPU; fast: live streams of 512² and more)")
    args = p.parse_args()
    print("| movie | frames | prior | blind MSE, prior | blind MSE, temporal mean | frames showing the prior |")
    print("|---|---|---|---|---|---|")
    for path in args.movies:
        movie = tifffile.imread(path)
        movie = movie[:, 0] if movie.ndim == 4 else movie
        r = judge(movie, args.prior, args.preset)
        print(f"| {path.rsplit('/', 1)[-1]} | {r['frames']} | {r['prior']} | {r['network_mse']:.5f} | "
              f"{r['mean_mse']:.5f} | {100 * r['shown']:.0f} % |")


if __name__ == "__main__":
    main()
