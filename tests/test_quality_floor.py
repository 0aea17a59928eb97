"""Quality floor on the simulator (issue 14, item 6): the denoised movie keeps the calcium transients.

Whole-movie PSNR rewards a denoiser that learns the field is still and flattens the transients
(issue 14); this floor is on what users look at instead: the amplitude slope of the per-cell,
footprint-weighted traces (`metrics.trace_scores`: 1 keeps the transients' amplitude). The movie is
tiny (64x64, 300 frames, ~19 cells) and trained inline through `denoise`'s own streamed path for
300 steps: the cost of test_filemode's PSNR floor (380 steps), not more.

The floor comes from measurements (docs/benchmarks.md, "Quality floor in CI"): in this setting the
engine keeps 1.00 / 0.86 / 1.12 of the amplitude on seeds 0 / 1 / 2 (this test uses seed 0), with
the final pass's amplitude restoration (`engine.amplitude`); 0.74 / 0.67 / 0.81 before it, and
0.63 / 0.55 / 0.54 before training patches were drawn where the activity is. The floor, 0.8, sits
0.2 below the engine on seed 0 (its arithmetic, bf16 or float32, depends on the CPU) and catches
the outputs that flatten the transients: Gaussians of sigma_t 8 to 32 frames (0.77 to 0.42 on seed
0), a 96-frame running mean, a still field (the movie's mean: 0), and the network's own outputs
before their shrinkage was undone (0.74). Issue 14's target is 0.9.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
from umvd_live.apps.denoise import denoise_movie
from umvd_live.engine import EngineConfig
from umvd_live.metrics import MovieScorer, gaussian_3d, temporal_mean

SEED = 0
FRAMES = 300
#: The amplitude slope the denoised traces must keep (see the module's docstring).
SLOPE_FLOOR = 0.8


@pytest.fixture(scope="module")
def movie():
    sim = TwoPhotonSimulator(SimConfig(height=64, width=64, photons=2.0, seed=SEED))
    noisy, clean = sim.movie(FRAMES)
    return noisy, MovieScorer(clean, sim.footprint_matrix(), offset=sim.config.offset_adu)


def test_the_denoised_traces_keep_the_transients(movie):
    noisy, scorer = movie
    torch.manual_seed(0)
    config = EngineConfig(preset="lite", device="cpu", warmup_frames=100, warmup_steps=100, steps_per_frame=1.0,
                          seed=0)
    result = denoise_movie(noisy, config)
    ours, raw = scorer.score(result.frames), scorer.score(noisy)
    print(f"cells {ours['cells']}: denoised PSNR {ours['psnr']:.2f} dB (raw {raw['psnr']:.2f}), active-set "
          f"{ours['active_psnr']:.2f} dB, trace corr {ours['trace_corr']:.3f}, slope {ours['trace_slope']:.3f}")
    assert ours["cells"] >= 10
    assert ours["psnr"] > raw["psnr"] + 8.0  # it denoises ...
    assert ours["trace_slope"] >= SLOPE_FLOOR  # ... and keeps the transients


@pytest.mark.parametrize("name, cut", [
    ("3-D Gaussian, sigma_t 8 frames", lambda noisy: gaussian_3d(noisy, 8.0, 0.5)),
    ("3-D Gaussian, sigma_t 24 frames", lambda noisy: gaussian_3d(noisy, 24.0, 0.5)),
    ("3-D Gaussian, sigma_t 32 frames", lambda noisy: gaussian_3d(noisy, 32.0, 0.5)),
    ("96-frame running mean", lambda noisy: temporal_mean(noisy, 96)),
    ("the movie's mean (a still field)", lambda noisy: np.broadcast_to(noisy.mean(axis=0, dtype=np.float32),
                                                                        noisy.shape)),
])
def test_the_floor_fails_an_output_that_cuts_the_transients(movie, name, cut):
    noisy, scorer = movie
    assert scorer.score(noisy)["trace_slope"] > 0.9  # the raw frames keep them (noisily)
    assert scorer.score(cut(noisy))["trace_slope"] < SLOPE_FLOOR, name
