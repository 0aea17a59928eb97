"""Train the priors shipped in the package (`umvd_live/engine/prior_weights/<preset>-w<N>.pt`).

The same training as a live stream's (`trainer.OnlineTrainer`: blind, self-supervised, noisy
frames only, random windows, patches and flips, cut segments), on many short movies of the
project's simulator that differ in photon level, structure, motion and noise model. Each movie is
its own segment with its own normaliser, as a stream after a change would be, so no training
window mixes two movies. Deterministic for a seed; anyone can run it again:

    python tools/train_prior.py --preset lite --steps 2000 --active-share 0
    python tools/train_prior.py --preset fast --steps 2000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
from umvd_live.engine.checkpoint import save_checkpoint, weights_hash
from umvd_live.engine.model import PRESETS, UMVDNet
from umvd_live.engine.normalization import Normalizer
from umvd_live.engine.priors import shipped_path
from umvd_live.engine.trainer import OnlineTrainer, ReplayBuffer, TrainerConfig

#: What varies between the training movies: photons per pixel and frame, then structure, motion and
#: noise. Each movie takes one value of each from these lists, cycling with different strides.
PHOTONS = (0.3, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
CELL_RADIUS = (3.0, 5.0, 8.0)
DRIFT = (0.0, 1.0, 3.0)
NOISE = (  # (excess noise F, read noise ADU, correlation along x, along y)
    (1.0, 0.0, 0.0, 0.0),  # Poisson only
    (1.3, 300.0, 0.18, 0.0),  # the real movie's PMT (adapters/simulation.py)
    (1.3, 300.0, 0.3, 0.19),  # after motion correction's interpolation
    (1.6, 600.0, 0.0, 0.0),  # a noisier detector
)


def movie_configs(n: int, size: int, seed: int) -> list[SimConfig]:
    configs = []
    for i in range(n):
        excess, read, cx, cy = NOISE[(i * 3) % len(NOISE)]
        configs.append(SimConfig(
            height=size, width=size, photons=PHOTONS[i % len(PHOTONS)], cell_radius_px=CELL_RADIUS[(i * 5) % 3],
            drift_px=DRIFT[(i * 2) % 3], excess_noise=excess, read_noise_adu=read, noise_corr_x=cx,
            noise_corr_y=cy, seed=seed * 1000 + i,
        ))
    return configs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=[name for name in PRESETS if name != "paper"], default="lite")
    p.add_argument("--window", type=int, default=7)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--movies", type=int, default=28, help="simulated movies (default 28)")
    p.add_argument("--frames", type=int, default=160, help="frames per movie (default 160)")
    p.add_argument("--size", type=int, default=96, help="frame side in pixels (default 96)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: beside other work, OpenMP threads that wait on each other "
                        "cost more than they give)")
    p.add_argument("--active-share", type=float, default=TrainerConfig().active_share,
                   help="share of the patches drawn where the activity is (`TrainerConfig.active_share`; "
                        "default: the engine's, 1.0, the fast prior's recipe; the lite prior was trained "
                        "with 0, uniform patches, before the engine drew its patches there)")
    p.add_argument("--output", help="model file (default: the package's shipped prior for the preset)")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    spec = PRESETS[args.preset](args.window)
    configs = movie_configs(args.movies, args.size, args.seed)
    replay = ReplayBuffer(args.window, args.movies * args.frames, spec.context)
    started = time.monotonic()
    index = 0
    for segment, config in enumerate(configs):
        noisy, _ = TwoPhotonSimulator(config).movie(args.frames)
        normalizer = Normalizer.fit(noisy[0])  # as a stream does, on its first frame
        for frame in noisy:
            replay.add(index, torch.from_numpy(normalizer.forward(frame))[None], segment)
            index += 1
    print(f"{args.movies} movies of {args.frames} frames at {args.size}² simulated in "
          f"{time.monotonic() - started:.0f} s")

    net = UMVDNet(spec).to(memory_format=torch.channels_last)
    trainer = OnlineTrainer(net, TrainerConfig(active_share=args.active_share), torch.device("cpu"), seed=args.seed)
    # A slow decay at the end: the prior is a starting point, its last steps need not be large.
    lr = trainer.lr
    started = time.monotonic()
    losses: list[float] = []
    while trainer.steps < args.steps:
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr * (0.2 + 0.8 * 0.5 * (1 + np.cos(np.pi * trainer.steps / args.steps)))
        loss = trainer.step(replay)
        if loss is not None:
            losses.append(loss)
        if trainer.steps and trainer.steps % 500 == 0 and loss is not None:
            print(f"step {trainer.steps}: loss {np.mean(losses[-500:]):.5f} ({time.monotonic() - started:.0f} s)")
    state = trainer.model.state_dict()
    info = {
        "preset": args.preset, "spec": spec.to_dict(), "step": 0,
        "trained": (f"tools/train_prior.py --preset {args.preset} --window {args.window} --steps {args.steps} "
                    f"--movies {args.movies} --frames {args.frames} --size {args.size} --seed {args.seed} "
                    f"--active-share {args.active_share:g}"),
        "final_loss": float(np.mean(losses[-200:])),
    }
    path = save_checkpoint(args.output or shipped_path(args.preset, args.window), state, info)
    print(f"{path}: {sum(t.numel() for t in state.values())} parameters, sha256 {weights_hash(state)[:16]}, "
          f"{time.monotonic() - started:.0f} s of training")


if __name__ == "__main__":
    main()
