"""A simulated two-photon calcium-imaging session with ground truth, fast enough to stream live.

Why: the engine's quality tests, the benchmark and the demo need movies whose clean signal is
known, that look and behave like real two-photon data (cells, neuropil, vessels, GCaMP transients,
photon-limited PMT noise), and that can be produced frame by frame at 30 Hz beside the daemon on a
small CPU. Everything static (cell footprints, neuropil, vessels) is built once; a frame is then one
sparse matrix-vector product (cell activity x footprints), a small dense one (neuropil modes), an
optional bilinear shift (drift) and the detector noise.

The parts: `StaticScene` (what the tissue looks like), `CalciumActivity` (what it does over time),
`DriftPath` (how it moves), `sample_detector` (how the PMT and digitiser turn an expected photon
count into ADU), `TwoPhotonSimulator` (frame t, in order) and `stream_simulation` (paced publishing).
`docs/simulator.md` describes the model and compares its noise statistics with a real movie.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy import ndimage, sparse

from umvd_live.adapters.publisher import FramePublisher

#: Somata per pixel of area, times radius squared: 0.055 / r**2 gives the ~35-45 somata (plus a third
#: as many small puncta) seen in the real 128x128 OptiNiSt movie at r = 5 px.
CELL_DENSITY = 0.055
UINT16_MAX = 65535


@dataclass(frozen=True)
class SimConfig:
    """What to simulate. Detector defaults reproduce the real OptiNiSt movie (docs/simulator.md).

    ``photons`` is the mean number of *detected* photons per pixel per frame, averaged over the
    frame and over time (before bleaching). ``gain_adu`` is the mean ADU per detected photon; with
    the PMT's excess noise factor F the noise variance grows as ``F * gain_adu`` per photon, which is
    what a Poisson-Gaussian fit (tools/noise_stats.py) reports as the "apparent" gain, and it then
    reports ``photons / F`` apparent photons.
    """

    height: int = 128
    width: int = 128
    rate_hz: float = 30.0
    photons: float = 2.0
    n_cells: int | None = None  # None: from the area (CELL_DENSITY)
    cell_radius_px: float = 5.0
    drift_px: float = 0.0  # amplitude of the slow sub-pixel/pixel motion of the tissue
    bleach_per_min: float = 0.0  # fraction of the fluorescence lost per minute
    gain_adu: float = 2170.0  # x F=1.3 = 2820 ADU/photon apparent, as measured on the real movie
    offset_adu: float = 1230.0
    read_noise_adu: float = 300.0
    excess_noise: float = 1.3  # PMT excess noise factor F = 1 + 1/a (gamma gain of shape a)
    noise_corr_x: float = 0.0  # neighbour correlation of the noise along x (real movie: ~0.22)
    noise_corr_y: float = 0.0  # and along y (real movie: ~0.19)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.height < 8 or self.width < 8:
            raise ValueError(f"frame size must be at least 8x8, got {self.height}x{self.width}")
        if not self.rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0, got {self.rate_hz}")
        if not self.photons > 0:
            raise ValueError(f"photons must be > 0, got {self.photons}")
        if self.excess_noise < 1.0:
            raise ValueError(f"excess_noise is a factor >= 1, got {self.excess_noise}")
        if self.gain_adu <= 0 or self.read_noise_adu < 0 or self.drift_px < 0 or self.cell_radius_px < 1:
            raise ValueError("gain_adu must be > 0, read_noise_adu and drift_px >= 0, cell_radius_px >= 1")
        if not 0.0 <= self.bleach_per_min < 1.0:
            raise ValueError(f"bleach_per_min is a fraction in [0, 1), got {self.bleach_per_min}")
        for name in ("noise_corr_x", "noise_corr_y"):
            if not 0.0 <= getattr(self, name) < 0.7:
                raise ValueError(f"{name} must be in [0, 0.7) (a 3-tap kernel cannot do more)")

    @classmethod
    def like_real_movie(cls, **overrides: Any) -> "SimConfig":
        """The OptiNiSt movie's measured statistics: 3.3 apparent photons, noise correlated ~0.2."""
        base = dict(photons=4.3, noise_corr_x=0.22, noise_corr_y=0.19)
        return cls(**(base | overrides))


# --------------------------------------------------------------------------------------- scene


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian random field of unit standard deviation and correlation length ``sigma``.

    Long correlation lengths are drawn on a coarser grid and interpolated up (same look, a
    fraction of the cost of a wide filter on the full grid).
    """
    step = max(1, int(sigma // 4))
    coarse = shape if step == 1 else tuple(-(-n // step) + 1 for n in shape)
    f = ndimage.gaussian_filter(rng.standard_normal(coarse), sigma / step, mode="wrap")
    if step > 1:
        f = ndimage.zoom(f, step, order=1)[: shape[0], : shape[1]]
    return (f - f.mean()) / (f.std() + 1e-12)


def _vessel_transmission(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Blood vessels as dark tubes: smooth random curves of 1.5-5 px radius that absorb 50-85%."""
    h, w = shape
    out = np.ones(shape)
    count = rng.poisson(h * w / 128**2) + 1
    for _ in range(count):
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        theta = rng.uniform(0, 2 * np.pi)
        mask = np.ones(shape, bool)
        for _ in range(int(1.5 * (h + w))):
            theta += rng.normal(0, 0.06)
            y, x = y + math.sin(theta), x + math.cos(theta)
            if not (0 <= y < h and 0 <= x < w):
                break
            mask[int(y), int(x)] = False
        radius = rng.uniform(1.5, 5.0)
        dist = ndimage.distance_transform_edt(mask)
        inside = np.clip((radius + 0.5 - dist), 0.0, 1.0)  # soft edge one pixel wide
        out *= 1.0 - rng.uniform(0.5, 0.85) * inside
    return out


def _soma_patch(
    rng: np.random.Generator, radius: float, frac_y: float, frac_x: float, nucleus: bool
) -> np.ndarray:
    """One cell body on its own patch: an ellipse with a soft edge, a dimmer nucleus, depth blur."""
    ry = radius * rng.uniform(0.85, 1.15)
    rx = radius * rng.uniform(0.85, 1.15)
    angle = rng.uniform(0, np.pi)
    blur = rng.uniform(0.4, 1.6) * max(radius / 5.0, 0.5)
    half = int(math.ceil(max(ry, rx) + 3 * blur + 2))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    yy -= frac_y
    xx -= frac_x
    u = (xx * math.cos(angle) + yy * math.sin(angle)) / rx
    v = (-xx * math.sin(angle) + yy * math.cos(angle)) / ry
    rho = np.sqrt(u * u + v * v)
    soft = 0.5 / max(radius, 1.0)  # edge width of half a pixel
    shape = 1.0 / (1.0 + np.exp((rho - 1.0) / soft))
    if nucleus:  # GCaMP is cytosolic: the nucleus is dimmer, so the soma looks like a ring
        nf = rng.uniform(0.45, 0.65)
        depth = rng.uniform(0.2, 0.7)
        shape *= 1.0 - depth / (1.0 + np.exp((rho - nf) / soft))
    return ndimage.gaussian_filter(shape, blur)


class StaticScene:
    """The tissue: cell footprints (sparse, pixels x cells), neuropil maps and vessels, all static.

    It is drawn on a canvas larger than the frame by the drift margin, so that a moving field of
    view never runs off the tissue. Units are relative brightness; the simulator scales them to
    photons.
    """

    NEUROPIL_MODES = 3

    def __init__(self, config: SimConfig, rng: np.random.Generator):
        self.margin = int(math.ceil(config.drift_px)) + 1 if config.drift_px > 0 else 0
        m = self.margin
        self.frame_shape = (config.height, config.width)
        self.canvas_shape = (config.height + 2 * m, config.width + 2 * m)
        ch, cw = self.canvas_shape
        self.transmission = _vessel_transmission(rng, self.canvas_shape)

        # Neuropil: a textured background (fine dendrites/axons, coarser patches) whose brightness
        # fluctuates slowly in a few large spatial modes.
        texture = np.exp(
            0.25 * _smooth_field(rng, self.canvas_shape, 1.0)
            + 0.20 * _smooth_field(rng, self.canvas_shape, 4.0)
            + 0.20 * _smooth_field(rng, self.canvas_shape, max(ch, cw) / 6)
        )
        texture /= texture.mean()
        # The modes have zero spatial mean, so they move brightness around without changing the
        # frame's mean photon count.
        modes = [np.ones(self.canvas_shape)]
        for _ in range(self.NEUROPIL_MODES):
            modes.append(0.5 * _smooth_field(rng, self.canvas_shape, max(ch, cw) / 4))
        self.neuropil = np.stack([(texture * mode * self.transmission).ravel() for mode in modes]).astype(np.float32)

        # Cells: somata with a nucleus (radius ~ cell_radius_px) and a third as many small bright
        # puncta (dendrite or bouton cross-sections), all away from vessels, overlapping little.
        r = config.cell_radius_px
        n_soma = config.n_cells if config.n_cells is not None else max(1, round(CELL_DENSITY * ch * cw / r**2))
        centres = self._place(rng, n_soma, 1.6 * r)
        n_puncta = len(centres) // 3
        puncta = self._place(rng, n_puncta, 1.5, avoid=centres, avoid_dist=1.2 * r)
        cols, rows, vals = [], [], []
        for i, ((cy, cx), is_soma) in enumerate([(c, True) for c in centres] + [(p, False) for p in puncta]):
            iy, ix = int(round(cy)), int(round(cx))
            radius = r * rng.uniform(0.8, 1.2) if is_soma else rng.uniform(0.8, 1.5)
            patch = _soma_patch(rng, radius, cy - iy, cx - ix, nucleus=is_soma)
            half = patch.shape[0] // 2
            y0, x0 = iy - half, ix - half
            ys, xs = np.nonzero(patch > 1e-3)
            ys, xs = ys + y0, xs + x0
            ok = (ys >= 0) & (ys < ch) & (xs >= 0) & (xs < cw)
            vals_i = patch[ys[ok] - y0, xs[ok] - x0] * self.transmission[ys[ok], xs[ok]]
            # Somata ~1.5-6x as bright as the neuropil at rest (the real movie's mean image: ~3.5).
            f0 = rng.lognormal(np.log(3.0), 0.4) if is_soma else rng.lognormal(np.log(4.0), 0.3)
            rows.append(ys[ok] * cw + xs[ok])
            cols.append(np.full(ok.sum(), i))
            vals.append(f0 * vals_i)
        self.n_cells = len(centres) + len(puncta)
        self.centres = np.array(list(centres) + list(puncta), dtype=np.float64).reshape(-1, 2)
        self.is_soma = np.array([True] * len(centres) + [False] * len(puncta))
        self.footprints = sparse.csr_matrix(
            (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
            shape=(ch * cw, self.n_cells),
        )

    def _place(
        self,
        rng: np.random.Generator,
        n: int,
        min_dist: float,
        avoid: list[tuple[float, float]] | None = None,
        avoid_dist: float = 0.0,
    ) -> list[tuple[float, float]]:
        """Random centres on tissue (not in vessels), at least ``min_dist`` apart."""
        ch, cw = self.canvas_shape
        placed: list[tuple[float, float]] = []
        pts = np.empty((0, 2))
        other = np.asarray(avoid if avoid else [], dtype=np.float64).reshape(-1, 2)
        for _ in range(50 * n):
            if len(placed) >= n:
                break
            c = rng.uniform((0, 0), (ch, cw))
            if self.transmission[int(c[0]), int(c[1])] < 0.8:
                continue
            if len(pts) and np.min(np.hypot(*(pts - c).T)) < min_dist:
                continue
            if len(other) and np.min(np.hypot(*(other - c).T)) < avoid_dist:
                continue
            placed.append((float(c[0]), float(c[1])))
            pts = np.asarray(placed)
        return placed

    def render(self, dff: np.ndarray, neuropil_coeffs: np.ndarray) -> np.ndarray:
        """Relative brightness of the whole canvas for these cell dF/F and neuropil coefficients."""
        cells = self.footprints @ (1.0 + dff).astype(np.float32)
        return (cells + neuropil_coeffs.astype(np.float32) @ self.neuropil).reshape(self.canvas_shape)


# ------------------------------------------------------------------------------------ activity


class CalciumActivity:
    """Poisson spiking (in bursts) through a GCaMP kernel, per cell, plus slow neuropil fluctuations.

    The kernel is a difference of exponentials (rise 50-100 ms, decay 0.4-1.2 s per cell), normalised
    to a peak of 1, run as two first-order recursions, so a step costs O(cells) and needs no history.
    """

    def __init__(self, n_cells: int, rate_hz: float, rng: np.random.Generator):
        self.rng = rng
        dt = 1.0 / rate_hz
        self.event_rate = rng.lognormal(np.log(0.25), 0.8, n_cells)  # bursts per second
        self.burst_extra = 1.0  # spikes per burst: 1 + Poisson(1.0)
        self.amplitude = rng.lognormal(np.log(0.3), 0.35, n_cells)  # dF/F of one spike at peak
        tau_rise = rng.uniform(0.05, 0.10, n_cells)
        tau_decay = rng.uniform(0.4, 1.2, n_cells)
        self.q_rise = np.exp(-dt / tau_rise)
        self.q_decay = np.exp(-dt / tau_decay)
        t_peak = tau_rise * tau_decay / (tau_decay - tau_rise) * np.log(tau_decay / tau_rise)
        self.norm = 1.0 / (np.exp(-t_peak / tau_decay) - np.exp(-t_peak / tau_rise))
        self.c_rise = np.zeros(n_cells)
        self.c_decay = np.zeros(n_cells)
        self.p_event = -np.expm1(-self.event_rate * dt)
        # Neuropil: mode 0 follows the population activity, modes 1.. are independent slow noise.
        self.q_neuropil = math.exp(-dt / 2.0)
        self.neuropil_state = np.zeros(StaticScene.NEUROPIL_MODES)
        self.neuropil_sd = 0.08
        for _ in range(int(5 * 1.2 * rate_hz)):  # burn in to the stationary state
            self.step()

    def mean_dff(self) -> np.ndarray:
        """Stationary mean dF/F of each cell: rate x spikes/burst x amplitude x kernel area."""
        kernel_sum = self.norm * (1.0 / (1.0 - self.q_decay) - 1.0 / (1.0 - self.q_rise))
        return self.p_event * (1.0 + self.burst_extra) * self.amplitude * kernel_sum

    def step(self) -> tuple[np.ndarray, np.ndarray]:
        """Advance one frame: (dF/F per cell, neuropil coefficients [1 + population term, modes])."""
        n = len(self.c_rise)
        fired = self.rng.random(n) < self.p_event
        spikes = np.where(fired, 1.0 + self.rng.poisson(self.burst_extra, n), 0.0)
        self.c_rise = self.q_rise * self.c_rise + spikes
        self.c_decay = self.q_decay * self.c_decay + spikes
        dff = self.amplitude * self.norm * (self.c_decay - self.c_rise)
        innov = self.rng.standard_normal(len(self.neuropil_state))
        self.neuropil_state = self.q_neuropil * self.neuropil_state + math.sqrt(1 - self.q_neuropil**2) * innov
        population = 0.3 * float(dff.mean())
        coeffs = np.concatenate(([1.0 + population], self.neuropil_sd * self.neuropil_state))
        return dff, coeffs


class DriftPath:
    """Slow, smooth motion of the tissue: two sinusoids per axis (periods 7-80 s), bounded by drift_px."""

    def __init__(self, drift_px: float, rng: np.random.Generator):
        self.drift_px = drift_px
        self.periods = rng.uniform((40.0, 7.0), (80.0, 15.0), size=(2, 2))  # (axis, component)
        self.phases = rng.uniform(0, 2 * np.pi, size=(2, 2))

    def offset(self, t: float) -> tuple[float, float]:
        """(dy, dx) in pixels at time t (seconds)."""
        s = np.sin(2 * np.pi * t / self.periods + self.phases) @ np.array([0.7, 0.3])
        return float(self.drift_px * s[0]), float(self.drift_px * s[1])


def _shifted_crop(canvas: np.ndarray, top: float, left: float, shape: tuple[int, int]) -> np.ndarray:
    """``shape`` window of ``canvas`` at a fractional position, by bilinear interpolation."""
    h, w = shape
    iy, ix = int(math.floor(top)), int(math.floor(left))
    fy, fx = top - iy, left - ix
    a = canvas[iy : iy + h + 1, ix : ix + w + 1]
    rows = (1 - fy) * a[:-1] + fy * a[1:]
    return (1 - fx) * rows[:, :-1] + fx * rows[:, 1:]


# --------------------------------------------------------------------------------------- noise


def _corr_kernel(rho: float) -> np.ndarray:
    """3-tap symmetric kernel of unit L2 norm whose output has neighbour correlation ``rho``."""
    if rho <= 0:
        return np.array([0.0, 1.0, 0.0])
    b = (1.0 - math.sqrt(1.0 - 2.0 * rho * rho)) / (2.0 * rho)  # rho = 2b / (1 + 2b^2)
    return np.array([b, 1.0, b]) / math.sqrt(1.0 + 2.0 * b * b)


def _correlate(noise: np.ndarray, config: SimConfig) -> np.ndarray:
    """Give zero-mean noise the requested neighbour correlation, keeping its variance."""
    for axis, rho in ((1, config.noise_corr_x), (0, config.noise_corr_y)):
        if rho > 0:
            b, c, _ = _corr_kernel(rho)
            noise = ndimage.correlate1d(noise, np.array([b, c, b], np.float32), axis=axis, mode="reflect")
    return noise


def sample_detector(photon_rate: np.ndarray, config: SimConfig, rng: np.random.Generator) -> np.ndarray:
    """One noisy uint16 frame for an expected photon count per pixel ``photon_rate``.

    Photons k ~ Poisson(rate); the PMT multiplies each photoelectron by a gamma-distributed gain, so
    the k together give Gamma(k a, g / a) ADU (mean k g, excess noise factor F = 1 + 1/a); the
    digitiser adds Gaussian read noise and the offset, rounds and clips to uint16. Optional
    neighbour correlation is applied to the zero-mean noise, so the expected value stays
    ``offset + g * rate`` exactly (before clipping).
    """
    rate = np.asarray(photon_rate, dtype=np.float32)
    g = np.float32(config.gain_adu)
    value = rng.poisson(rate).astype(np.float32)  # photons (in place from here on: it runs at 30 Hz)
    if config.excess_noise > 1.0:
        a = np.float32(1.0 / (config.excess_noise - 1.0))
        value *= a
        value = rng.standard_gamma(value, dtype=np.float32)
        value *= g / a
    else:
        value *= g
    if config.read_noise_adu > 0:
        read = rng.standard_normal(rate.shape, dtype=np.float32)
        read *= np.float32(config.read_noise_adu)
        value += read
    if config.noise_corr_x > 0 or config.noise_corr_y > 0:
        mean = g * rate
        value -= mean
        value = _correlate(value, config)
        value += mean
    value += np.float32(config.offset_adu)
    np.rint(value, out=value)
    np.clip(value, 0, UINT16_MAX, out=value)
    return value.astype(np.uint16)


def noisy_from_clean(clean: np.ndarray, config: SimConfig, rng: np.random.Generator) -> np.ndarray:
    """A fresh noise draw for a ground-truth frame (clean, in ADU): for tests and noise studies."""
    rate = np.maximum((np.asarray(clean, np.float32) - config.offset_adu) / config.gain_adu, 0.0)
    return sample_detector(rate, config, rng)


def expected_variance(clean: np.ndarray, config: SimConfig) -> np.ndarray:
    """The model's noise variance (ADU^2) of each pixel of a clean frame, ignoring clipping.

    F g^2 per expected photon plus read noise squared plus the rounding's 1/12; with neighbour
    correlation each pixel's variance is the squared-kernel-weighted mean of its neighbours'.
    """
    rate = np.maximum((np.asarray(clean, np.float64) - config.offset_adu) / config.gain_adu, 0.0)
    var = config.excess_noise * config.gain_adu**2 * rate + config.read_noise_adu**2
    for axis, rho in ((1, config.noise_corr_x), (0, config.noise_corr_y)):
        if rho > 0:
            var = ndimage.correlate1d(var, _corr_kernel(rho) ** 2, axis=axis, mode="reflect")
    return var + 1.0 / 12.0


# ----------------------------------------------------------------------------------- simulator


class TwoPhotonSimulator:
    """Frames of a simulated session, in order, each with its ground truth.

    Deterministic for a seed: the scene, the activity, the motion and the noise draw from
    independent streams of one SeedSequence, so e.g. the scene does not change with the frame count.
    """

    def __init__(self, config: SimConfig):
        self.config = config
        scene_ss, activity_ss, motion_ss, noise_ss = np.random.SeedSequence(config.seed).spawn(4)
        self.scene = StaticScene(config, np.random.default_rng(scene_ss))
        self.activity = CalciumActivity(self.scene.n_cells, config.rate_hz, np.random.default_rng(activity_ss))
        self.drift = DriftPath(config.drift_px, np.random.default_rng(motion_ss))
        self.noise_rng = np.random.default_rng(noise_ss)
        self.index = 0
        # Scale relative brightness to photons: the time-averaged mean over the (unshifted) frame.
        mean_np = np.zeros(StaticScene.NEUROPIL_MODES + 1, np.float32)
        mean_np[0] = 1.0 + 0.3 * float(self.activity.mean_dff().mean())
        expected = self._crop(self.scene.render(self.activity.mean_dff(), mean_np), 0.0, 0.0)
        self.photon_scale = config.photons / float(expected.mean())

    def _crop(self, canvas: np.ndarray, dy: float, dx: float) -> np.ndarray:
        m = self.scene.margin
        if m == 0:
            return canvas
        return _shifted_crop(canvas, m + dy, m + dx, self.scene.frame_shape)

    def clean_photons(self) -> np.ndarray:
        """Advance one frame and return its expected photon count per pixel (float32, H x W)."""
        t = self.index / self.config.rate_hz
        dff, coeffs = self.activity.step()
        canvas = self.scene.render(dff, coeffs)
        dy, dx = self.drift.offset(t) if self.config.drift_px > 0 else (0.0, 0.0)
        rate = self._crop(canvas, dy, dx)
        scale = self.photon_scale * (1.0 - self.config.bleach_per_min) ** (t / 60.0)
        self.index += 1
        rate = rate * np.float32(scale)  # a new array: the canvas may be a view of the scene's
        return np.maximum(rate, 0.0, out=rate)

    def next_frame(self) -> tuple[np.ndarray, np.ndarray]:
        """(noisy uint16, clean float32 = expected value of the noisy frame in ADU) of the next frame."""
        rate = self.clean_photons()
        noisy = sample_detector(rate, self.config, self.noise_rng)
        clean = rate * np.float32(self.config.gain_adu)
        clean += np.float32(self.config.offset_adu)
        return noisy, clean

    def movie(self, frames: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``frames`` frames as (T, H, W) uint16 noisy and float32 clean arrays."""
        c = self.config
        noisy = np.empty((frames, c.height, c.width), np.uint16)
        clean = np.empty((frames, c.height, c.width), np.float32)
        for i in range(frames):
            noisy[i], clean[i] = self.next_frame()
        return noisy, clean


# ----------------------------------------------------------------------------------- streaming


@dataclass
class StreamResult:
    """What a simulated stream did. ``clean`` maps seq -> ground truth when asked to keep it."""

    frames: int = 0  # frames generated and handed to the publisher
    sent: int = 0
    dropped: int = 0  # refused by the publisher (queue full): the acquisition did not wait
    late: int = 0  # frames published after their due time (the generator could not keep up)
    elapsed_s: float = 0.0
    subscribed: bool = False
    clean: dict[int, np.ndarray] = field(default_factory=dict)


def stream_simulation(
    publisher: FramePublisher,
    config: SimConfig,
    frames: int | None = None,
    rate_hz: float | None = None,
    *,
    stop: threading.Event | None = None,
    keep_clean: bool = False,
    on_frame: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    wait_subscriber_s: float = 5.0,
) -> StreamResult:
    """Publish simulated frames paced at ``rate_hz`` (default: the config's) until ``frames`` or ``stop``.

    Frame i is due at ``start + i / rate`` on the monotonic clock, so lateness never accumulates:
    a late frame goes out at once and the next keeps its own due time. Each frame carries
    ``t`` (seconds since the start, when it was published) and ``meta`` with its source. The
    ground truth is kept (``keep_clean``) or handed to ``on_frame(seq, noisy, clean)``, for a
    caller's quality summary. Waits up to ``wait_subscriber_s`` for a subscriber first, because a
    publisher's frames sent before the subscription arrives are lost.
    """
    rate = float(rate_hz or config.rate_hz)
    if rate <= 0:
        raise ValueError(f"rate_hz must be > 0, got {rate}")
    if frames is not None and frames < 0:
        raise ValueError(f"frames must be >= 0, got {frames}")
    sim = TwoPhotonSimulator(config)
    result = StreamResult(subscribed=publisher.wait_for_subscriber(wait_subscriber_s) if wait_subscriber_s > 0 else False)
    meta = {"source": "sim", "photons": config.photons, "gain_adu": config.gain_adu,
            "offset_adu": config.offset_adu, "seed": config.seed}
    period = 1.0 / rate
    start = time.monotonic()
    i = 0
    while (frames is None or i < frames) and not (stop is not None and stop.is_set()):
        noisy, clean = sim.next_frame()
        due = start + i * period
        wait = due - time.monotonic()
        if wait > 0:
            if stop is not None:
                if stop.wait(wait):
                    break
            else:
                time.sleep(wait)
        elif wait < -period:
            result.late += 1
        seq = publisher.seq
        if publisher.publish(noisy, t=time.monotonic() - start, meta=meta):
            result.sent += 1
        else:
            result.dropped += 1
        if keep_clean:
            result.clean[seq] = clean
        if on_frame is not None:
            on_frame(seq, noisy, clean)
        i += 1
    result.frames = i
    result.elapsed_s = time.monotonic() - start
    return result
