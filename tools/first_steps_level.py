#!/usr/bin/env python
"""How far the first training steps from a prior move the network's output level.

Why: Adam's first steps move every weight by about the learning rate whatever its gradient, and
the live preview shows the trainer's weights every `sync_every` steps: a level that moves shows
as the whole preview darkening or brightening at once, and as a step in every cell's trace. This
builds a stream's engine on a simulated movie (`harness.sim_config`, the shipped prior of the
preset), takes the network's mean output on a few windows, trains STEPS steps and takes it again;
it prints the change as a share of the signal (the output's level above the digitiser offset),
per seed.

    python tools/first_steps_level.py --seeds 0 1 2 3                          # the default ramp
    python tools/first_steps_level.py --seeds 0 1 2 3 --lr-warmup-steps 0      # without the ramp
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from umvd_live.adapters.simulation import TwoPhotonSimulator
from umvd_live.apps.harness import sim_config
from umvd_live.engine import EngineConfig, StreamDenoiser
from umvd_live.engine.trainer import TrainerConfig


def level_change(size: int, seed: int, steps: int, preset: str, lr_warmup_steps: int | None) -> float:
    config = sim_config(size, size, 30.0, 2.0, seed)
    noisy, _ = TwoPhotonSimulator(config).movie(40)
    trainer = TrainerConfig() if lr_warmup_steps is None else TrainerConfig(lr_warmup_steps=lr_warmup_steps)
    den = StreamDenoiser(EngineConfig(preset=preset, device="cpu", train_mode="inline", steps_per_frame=0,
                                      seed=seed, trainer=trainer))
    for frame in noisy:
        den.push(frame)
    model, n = den.trainer.model, den.trainer.model.spec.window
    windows = torch.stack([torch.from_numpy(den.normalizer.forward(noisy[i - n // 2:i + n // 2 + 1]))
                           for i in range(10, 30, 4)])[:, :, None]
    background = float(den.normalizer.forward(np.float32(config.offset_adu)))

    def level() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(windows).mean())

    before = level()
    den.train_for(steps)
    change = (level() - before) / (before - background)
    den.close()
    return change


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128, help="frame side (default 128)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=8, help="training steps (default 8: the first published weights)")
    p.add_argument("--preset", default="lite")
    p.add_argument("--lr-warmup-steps", type=int, help="the ramp's steps (default: TrainerConfig's)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for seed in args.seeds:
        change = level_change(args.size, seed, args.steps, args.preset, args.lr_warmup_steps)
        print(f"seed {seed}: output level {100 * change:+.1f} % of the signal after {args.steps} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
