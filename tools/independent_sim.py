"""A second two-photon simulator, written apart from `umvd_live.adapters.simulation` on purpose.

Why: the engine's defaults were measured and tuned on the project's own simulator, and issue 14's
acceptance runs on simulators this project never sees. A model that makes *other* choices for the
same physics tells whether the defaults hold beyond the movies they were tuned on (tools/
bench_denoise.py ``--simulator independent``; docs/benchmarks.md, "An independent simulator").
It shares no modelling with adapters/simulation.py (only the parsing of ``--sim``, with the
project's `harness.sim_overrides`); where the two agree on a number it is the issue's (rise about
50 ms, decay 0.4-1.2 s, photons per pixel).

What it does differently:

* **spikes, then calcium**: each source fires as a Poisson process (rates log-normal, median
  0.25 Hz: the sparse firing of cortical layer 2/3, Barth & Poulet 2012, Trends Neurosci 35:345),
  with bursts of 2-6 more spikes at 0.3 times that rate; calcium is the spikes convolved with
  (1 - exp(-t/rise)) exp(-t/decay) (rise 30-80 ms, decay 0.4-1.2 s), and the indicator saturates:
  dF/F = F_max c / (c + K) (K = 6 spikes' calcium, F_max 2.5-5, so one spike gives 0.36-0.71);
* **somata** as super-Gaussian disks (radius 4-7 px) with a dim nucleus (GCaMP is cytosolic),
  **dendrites** as persistent random walks 20-60 px long, half of them carrying their soma's
  calcium (back-propagating action potentials) plus their own, and **boutons** 0.7-1.1 px;
* **neuropil** as a smooth 3-D Gaussian random field (about 8 px by 12 frames, 5 % sd) plus the
  population's mean activity;
* **motion** as a smoothed random walk (up to 1.5 px) plus white jitter (``jitter_px``, 0.25 px RMS
  per axis), each frame shifted by cubic splines (the truth moves too);
* **detection**: Poisson photons, each photon's PMT charge gamma-distributed (shape 3.3: excess
  noise factor 1.3), the amplifier's bandwidth as a first-order low-pass along the fast axis x
  (pole 0.35: neighbouring pixels' noise correlates about 0.35), Gaussian read noise, rounded to
  uint16. The truth is each frame's expected value: the same low-pass of the photons' mean.

Footprints (for the trace scores) are each source's resting template where it is above 15 % of
its peak; their kinds are the project simulator's labels (soma, process, punctum), so the same
per-kind tables read both.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage, signal, sparse

from umvd_live.apps.harness import sim_overrides

#: Brightest mean photons/pixel/frame at the full PMT gain; above it the gain is lowered in
#: proportion, as an experimenter would, so that the brightest bursts do not clip at 65535.
FULL_GAIN_PHOTONS = 2.0
#: Pixels of tissue simulated beyond each edge of the frame, so motion brings real tissue in.
MARGIN = 8


@dataclass(frozen=True)
class IndependentConfig:
    """One movie's physics. Size, brightness and seed are the benchmark's own options."""

    height: int = 128
    width: int = 128
    photons: float = 2.0  # mean detected photons/pixel/frame over the movie
    seed: int = 0
    rate_hz: float = 30.0
    rise_s: tuple[float, float] = (0.03, 0.08)
    decay_s: tuple[float, float] = (0.4, 1.2)
    motion: float = 1.0  # scale of the drift and the jitter
    jitter_px: float = 0.25  # RMS of the white jitter per axis (before ``motion``); 0 keeps every other draw
    fast_axis_pole: float = 0.35  # the low-pass along x: neighbouring pixels' noise correlation
    excess_shape: float = 3.3  # gamma shape of one photon's charge: excess noise factor 1 + 1/shape
    gain_adu: float = 1500.0  # ADU per photon at the full gain (`FULL_GAIN_PHOTONS`)
    offset_adu: float = 1000.0
    read_noise_adu: float = 250.0


#: The fields ``--sim FIELD=VALUE`` may set (`tools/bench_denoise.py`): the scalar ones.
TUNABLE = ("rate_hz", "motion", "jitter_px", "fast_axis_pole", "excess_shape", "gain_adu", "offset_adu",
           "read_noise_adu")


@dataclass(frozen=True)
class IndependentMovie:
    noisy: np.ndarray  # (T, H, W) uint16
    truth: np.ndarray  # (T, H, W) float32, the noisy frames' expected value
    footprints: sparse.csr_matrix  # (sources, H*W)
    kinds: tuple[str, ...]  # per source: soma, process or punctum
    gain_adu: float  # the PMT gain used (lowered above `FULL_GAIN_PHOTONS`)


def configure(height: int, width: int, photons: float, seed: int, sim: Sequence[str] = ()) -> IndependentConfig:
    """The config of one benchmark movie; ``sim``: ``FIELD=VALUE`` items of `TUNABLE`, read as the
    project simulator's are (`harness.sim_overrides`; ValueError names a bad one)."""
    changes = sim_overrides(sim, fields=TUNABLE)
    return dataclasses.replace(IndependentConfig(height=height, width=width, photons=photons, seed=seed), **changes)


def _calcium_kernel(rng: np.random.Generator, config: IndependentConfig) -> np.ndarray:
    t = np.arange(int(6 * config.decay_s[1] * config.rate_hz) + 1) / config.rate_hz
    kernel = (1 - np.exp(-t / rng.uniform(*config.rise_s))) * np.exp(-t / rng.uniform(*config.decay_s))
    return kernel / kernel.max()


def _sources(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[list[np.ndarray], list[str], list[int]]:
    """Resting templates (in units of the background's mean), kinds, and each dendrite's soma (-1: none).
    Their numbers grow with the area: 28-41 somata, 18-29 dendrites and 15-24 boutons on the
    canvas of a 128² frame (`MARGIN` around it)."""
    h, w = shape
    area = h * w / (128 + 2 * MARGIN) ** 2

    def count(low: int, high: int) -> int:
        return max(1, int(round(int(rng.integers(low, high)) * area)))

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    templates: list[np.ndarray] = []
    kinds: list[str] = []
    parents: list[int] = []
    centres: list[tuple[np.ndarray, float]] = []
    for _ in range(count(28, 42)):  # somata, not overlapping where 50 draws allow
        for _ in range(50):
            centre, radius = rng.uniform(4, [h - 4, w - 4]), rng.uniform(4.0, 7.0)
            if all(np.hypot(*(centre - c)) > radius + r for c, r in centres):
                break
        centres.append((centre, radius))
        r = np.hypot(yy - centre[0], (xx - centre[1]) * rng.uniform(0.8, 1.2)) / radius
        body = np.exp(-r**6) * (1 - 0.55 * np.exp(-((r / 0.55) ** 4)))
        templates.append(body * rng.lognormal(np.log(2.5), 0.35))
        kinds.append("soma")
        parents.append(-1)
    for _ in range(count(18, 30)):  # dendrites
        parent = int(rng.integers(len(centres))) if rng.random() < 0.5 else -1
        point = np.array(centres[parent][0]) if parent >= 0 else rng.uniform(0, [h, w])
        angle, path = rng.uniform(0, 2 * np.pi), np.zeros((h, w), np.float32)
        for _ in range(int(rng.uniform(20, 60) / 0.5)):
            angle += rng.normal(0, 0.08)
            point = point + 0.5 * np.array([np.sin(angle), np.cos(angle)])
            iy, ix = int(round(point[0])), int(round(point[1]))
            if 0 <= iy < h and 0 <= ix < w:
                path[iy, ix] += 1.0
        path = ndimage.gaussian_filter(path, rng.uniform(0.6, 0.9))
        if path.max() > 0:
            templates.append(path / path.max() * rng.lognormal(np.log(1.8), 0.3))
            kinds.append("process")
            parents.append(parent)
    for _ in range(count(15, 25)):  # boutons
        centre, sigma = rng.uniform(0, [h, w]), rng.uniform(0.7, 1.1)
        templates.append(np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma**2))
                         * rng.lognormal(np.log(3.0), 0.3))
        kinds.append("punctum")
        parents.append(-1)
    return [t.astype(np.float32) for t in templates], kinds, parents


def _activity(rng: np.random.Generator, config: IndependentConfig, frames: int, parents: list[int]) -> np.ndarray:
    """(frames, sources) dF/F: spikes and bursts through each source's calcium kernel, saturating."""
    dff = np.zeros((frames, len(parents)), np.float32)
    calcium_of: dict[int, np.ndarray] = {}
    for i, parent in enumerate(parents):
        rate = rng.lognormal(np.log(0.25), 0.7)
        spikes = rng.poisson(rate / config.rate_hz, frames).astype(float)
        bursts = rng.random(frames) < 0.3 * rate / config.rate_hz
        spikes[bursts] += rng.integers(2, 7, int(bursts.sum()))
        calcium = signal.fftconvolve(spikes, _calcium_kernel(rng, config))[:frames]
        if parent >= 0:  # a dendrite of a soma: its back-propagating spikes, and its own
            calcium = 0.8 * calcium_of[parent] + 0.4 * calcium
        calcium_of[i] = calcium
        dff[:, i] = rng.uniform(2.5, 5.0) * calcium / (calcium + 6.0)
    return dff


def simulate(config: IndependentConfig, frames: int) -> IndependentMovie:
    """One movie of ``frames`` frames (module docstring); the same config gives the same movie."""
    rng = np.random.default_rng([config.seed, 7_100_417])  # a stream of its own, apart from the project's seeds
    h, w = config.height + 2 * MARGIN, config.width + 2 * MARGIN
    background = ndimage.gaussian_filter(rng.standard_normal((h, w)), 6)
    texture = ndimage.gaussian_filter(rng.standard_normal((h, w)), 1.5)
    background = np.clip(1 + 0.35 * background / background.std() + 0.15 * texture / texture.std(), 0.3, None)
    templates, kinds, parents = _sources(rng, (h, w))
    dff = _activity(rng, config, frames, parents)
    coarse = ndimage.gaussian_filter(rng.standard_normal((frames, h // 4, w // 4)), (12, 2, 2))
    neuropil = 0.05 * coarse / coarse.std() + 0.2 * dff.mean(axis=1)[:, None, None]
    neuropil = ndimage.zoom(neuropil, (1, h / neuropil.shape[1], w / neuropil.shape[2]), order=1)
    walk = ndimage.gaussian_filter1d(np.cumsum(rng.normal(0, 1, (frames, 2)), axis=0), 30, axis=0)
    jitter = config.jitter_px * rng.normal(0, 1, (frames, 2))
    shifts = config.motion * (1.5 * walk / (np.abs(walk).max() + 1e-9) + jitter)
    bleach = np.exp(-np.arange(frames) / config.rate_hz / 1800.0)
    stack = np.stack(templates)
    expected = np.empty((frames, config.height, config.width), np.float32)
    crop = (slice(MARGIN, MARGIN + config.height), slice(MARGIN, MARGIN + config.width))
    for t in range(frames):
        frame = background * (1 + neuropil[t]) + np.tensordot(1 + dff[t], stack, axes=1)
        frame = ndimage.shift(ndimage.gaussian_filter(frame, 0.6), shifts[t], order=3, mode="nearest")
        expected[t] = frame[crop] * bleach[t]
    photons = expected * (config.photons / expected.mean())
    gain = config.gain_adu * min(1.0, FULL_GAIN_PHOTONS / config.photons)
    counts = rng.poisson(photons)
    charge = np.where(counts > 0, rng.gamma(np.maximum(counts, 1) * config.excess_shape, 1 / config.excess_shape), 0.0)
    pole = config.fast_axis_pole
    charge = signal.lfilter([1 - pole], [1, -pole], charge, axis=2)
    noisy = gain * charge + config.offset_adu + rng.normal(0, config.read_noise_adu, charge.shape)
    truth = gain * signal.lfilter([1 - pole], [1, -pole], photons, axis=2) + config.offset_adu
    resting = stack[(slice(None), *crop)]
    footprints = np.where(resting > 0.15 * resting.max(axis=(1, 2), keepdims=True), resting, 0.0)
    return IndependentMovie(np.clip(np.round(noisy), 0, 65535).astype(np.uint16), truth.astype(np.float32),
                            sparse.csr_matrix(footprints.reshape(len(footprints), -1), dtype=np.float32),
                            tuple(kinds), gain)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write one movie of the independent simulator: noisy.tif (uint16) "
                                "and truth.tif (float32, the expected value) to a folder.")
    p.add_argument("folder", type=Path)
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    p.add_argument("--photons", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sim", action="append", default=[], metavar="FIELD=VALUE", help=", ".join(TUNABLE))
    args = p.parse_args(argv)
    try:
        config = configure(*args.size, args.photons, args.seed, args.sim)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    movie = simulate(config, args.frames)
    args.folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(args.folder / "noisy.tif", movie.noisy)
    tifffile.imwrite(args.folder / "truth.tif", movie.truth)
    sparse.save_npz(args.folder / "footprints.npz", movie.footprints)
    print(f"{movie.noisy.shape} → {args.folder}: {len(movie.kinds)} sources, mean "
          f"{(movie.noisy.mean() - config.offset_adu) / movie.gain_adu:.2f} photons/pixel/frame")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
