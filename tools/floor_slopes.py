"""The figures behind tests/test_quality_floor.py's floor: the amplitude slope that `denoise`'s
streamed path keeps on the test's tiny movie (64x64, 300 frames, 2 photons, the test's engine
settings), per seed, beside the slopes of 3-D Gaussians of sigma_t 8-32 frames.

    python tools/floor_slopes.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse

import torch

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
from umvd_live.apps.denoise import denoise_movie
from umvd_live.engine import EngineConfig
from umvd_live.metrics import MovieScorer, gaussian_3d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="simulator seeds (the test uses 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        sim = TwoPhotonSimulator(SimConfig(height=64, width=64, photons=2.0, seed=seed))
        noisy, clean = sim.movie(300)
        scorer = MovieScorer(clean, sim.footprint_matrix(), offset=sim.config.offset_adu)
        torch.manual_seed(0)
        config = EngineConfig(preset="lite", device="cpu", warmup_frames=100, warmup_steps=100, steps_per_frame=1.0,
                              seed=0)  # the test's
        ours, raw = scorer.score(denoise_movie(noisy, config).frames), scorer.score(noisy)
        gaussians = {s: round(scorer.score(gaussian_3d(noisy, s, 0.5))["trace_slope"], 3) for s in (8, 16, 24, 32)}
        print(f"seed {seed}: cells {ours['cells']} psnr {ours['psnr']:.2f} (raw {raw['psnr']:.2f}) active "
              f"{ours['active_psnr']:.2f} corr {ours['trace_corr']:.3f} slope {ours['trace_slope']:.3f}; "
              f"gaussian slopes by sigma_t {gaussians}", flush=True)


if __name__ == "__main__":
    main()
