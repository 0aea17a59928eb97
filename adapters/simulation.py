"""A simulated two-photon calcium-imaging session with ground truth, fast enough to stream live.

Why: the engine's quality tests, the benchmark and the demo need movies whose clean signal is
known, that look and behave like real two-photon data, and that can be produced frame by frame at
30 Hz beside the daemon on a small CPU. Everything static (footprints, neuropil maps, vessels) is
built once; a frame is then one sparse matrix-vector product (source activity x footprints), two
small dense products (the neuropil's activity on a coarse grid), a cubic sub-pixel shift (motion)
and the detector noise.

What is modelled, and where each part comes from (docs/simulator.md has the numbers):

* somata, ring-shaped because GCaMP is cytosolic, and small bright puncta (bouton and spine
  cross-sections), sized and placed like the real OptiNiSt movie's mean and max projections;
* thin processes (dendrite segments and axons with boutons) with their own transients: Chen et al.
  2013 (Nature 499:295) image independently active dendritic segments 5-40 um long with GCaMP6;
* neuropil with its own slow activity on a coarse grid of smooth spatial basis functions, as
  Suite2p models it (Pachitariu et al. 2017, bioRxiv 061507: neuropil basis size 6 x the cell
  radius, ``ratio_neuropil``), plus a term that follows the population; a cell's pixels carry the
  neuropil under them, which is why Suite2p subtracts 0.7 x the surrounding neuropil
  (``neucoeff``); cell signals overlap a fluctuating neuropil that analysis must separate
  (Mukamel et al. 2009, Neuron 63:747); NAOMi (Song et al. 2021, J Neurosci Methods 358:109173)
  simulates the neuropil's processes with their own activity;
* GCaMP kinetics: a difference of exponentials, 10-90 % rise ~50 ms (tau_rise 20-45 ms) and decay
  tau 0.4-1.2 s per source (Suite2p's recommended tau: 0.7 s GCaMP6f, 1.0 s GCaMP6m; Chen et al.
  2013: spikes in a burst give step-wise rises resolvable at 50-75 ms for GCaMP6f), bursts whose
  spikes are spread over successive frames (intra-burst interval ~20 ms), a mild saturation of
  large responses (the indicators' non-linear AP-to-dF/F curve, Chen et al. 2013; Dana et al. 2019,
  Nat Methods 16:649, jGCaMP7), and population coupling that varies from cell to cell (Okun et al.
  2015, Nature 521:511);
* rigid motion: slow drift plus fast jitter (heartbeat- and breathing-like oscillations and a
  random part); in-plane brain motion in head-fixed, running mice is ~2-5 um (Dombeck et al. 2007,
  Neuron 56:43); the ground truth moves with the tissue;
* bleaching: the fluorescence decays exponentially in time (Patterson & Piston 2000, Biophys J
  78:2159, on two-photon photobleaching);
* the detector: Poisson photon counts, a PMT whose gain per photoelectron is gamma distributed (the
  excess noise factor F; the gamma law approximates a PMT's single-photoelectron pulse-height
  distribution, cf. Kissick et al. 2010, Anal Chem 82:10129), Gaussian read noise, offset,
  rounding and clipping; noise correlated along the fast scan axis x only, as measured on raw
  two-photon data (the SIMA example movie, docs/simulator.md: 0.18 in x, 0.01 in y), from the
  detector electronics' bandwidth, which spans neighbouring pixels of a line.

The ground truth of a frame is the expected value of its noisy frame, in ADU. The parts:
`StaticScene` (what the tissue looks like), `CalciumActivity` (what it does over time),
`DriftPath` (how it moves), `sample_detector` (how the PMT and digitiser turn an expected photon
count into ADU), `TwoPhotonSimulator` (frame t, in order; its `footprints()` for trace metrics) and
`stream_simulation` (paced publishing). `SimConfig.minimal()` turns the realistic extras off, for
tests that isolate one effect.

A session may also script what a user does while tuning the acquisition (`SimEvent`, issue 15): a
step in laser power (the detected photons and the truth scale) and a rigid stage move (the field
of view jumps by whole pixels over the tissue, the truth too). Without events nothing changes.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final, Literal

import numpy as np
from scipy import ndimage, sparse

from umvd_live.adapters.publisher import FramePublisher, sleep_unless_stopped

#: Somata per pixel of area, times radius squared: 0.055 / r**2 gives the ~35-45 somata (plus a third
#: as many small puncta) seen in the real 128x128 OptiNiSt movie at r = 5 px.
CELL_DENSITY = 0.055
#: Thin processes (dendrite segments, axons) per soma, when ``n_processes`` is not given.
PROCESSES_PER_SOMA = 0.5
#: Neuropil basis spacing in cell radii (Suite2p's ``ratio_neuropil`` default).
NEUROPIL_BASIS_RADII = 6.0
UINT16_MAX = 65535

SOMA, PUNCTUM, PROCESS = "soma", "punctum", "process"
LASER: Final = "laser"
MOVE: Final = "move"


@dataclass(frozen=True)
class SimEvent:
    """A change made during the session, in effect from the first frame at or after ``at_s``.

    ``laser``: the laser power steps so that the detected photons, and with them the truth, are
    ``scale`` times what they were (the change a user makes to see a sample better; PMT excess
    noise and the read noise stay as they are). ``move``: the stage moves, so that the field of
    view jumps by ``shift_px`` = (dy, dx) whole pixels over the tissue: what was at (y + dy, x + dx)
    is now at (y, x), in the noisy frames and the truth alike.
    """

    at_s: float
    kind: Literal["laser", "move"]
    scale: float = 1.0
    shift_px: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.at_s) and self.at_s >= 0):
            raise ValueError(f"an event's time must be >= 0 s, got {self.at_s}")
        if self.kind == LASER:
            if not (math.isfinite(self.scale) and self.scale > 0):
                raise ValueError(f"a laser step scales the photons by a factor > 0, got {self.scale}")
        elif self.kind == MOVE:
            if len(self.shift_px) != 2 or any(int(v) != v for v in self.shift_px):
                raise ValueError(f"a stage move is whole pixels (dy, dx), got {self.shift_px}")
        else:
            raise ValueError(f"unknown event kind {self.kind!r}: {LASER} or {MOVE}")

    @classmethod
    def laser(cls, at_s: float, scale: float) -> SimEvent:
        return cls(at_s, LASER, scale=float(scale))

    @classmethod
    def move(cls, at_s: float, dy: int, dx: int) -> SimEvent:
        return cls(at_s, MOVE, shift_px=(int(dy), int(dx)))

    def first_frame(self, rate_hz: float) -> int:
        """The first frame (frame i is taken at i / rate_hz s) that the change is in."""
        return max(0, math.ceil(self.at_s * rate_hz - 1e-9))

    def label(self) -> str:
        if self.kind == LASER:
            return f"laser ×{_ratio(self.scale)}"
        dy, dx = self.shift_px
        return f"stage move {dx} px" if dy == 0 else f"stage move ({dy}, {dx}) px"


def _ratio(value: float) -> str:
    """3 -> '3', 0.3333 -> '1/3': how a factor is spoken of."""
    frac = Fraction(value).limit_denominator(16)
    if abs(float(frac) - value) > 1e-3 * value:
        return f"{value:g}"
    return str(frac.numerator) if frac.denominator == 1 else f"{frac.numerator}/{frac.denominator}"


def parse_events(text: str, duration_s: float) -> tuple[SimEvent, ...]:
    """Events from a comma-separated list of ``laser=SCALE@WHEN`` and ``move=DX@WHEN`` or
    ``move=DY:DX@WHEN``. WHEN is seconds (``30s``) or a fraction of ``duration_s`` (``1/2``,
    ``0.5``); SCALE a number or a ratio (``1/3``). Example, issue 15's session over 60 s:
    ``laser=3@30s,move=40@40s,laser=1/3@50s`` = ``laser=3@1/2,move=40@2/3,laser=1/3@5/6``."""
    events = []
    for item in (part.strip() for part in text.split(",")):
        try:
            what, when = item.split("@")
            kind, value = what.split("=")
            kind = kind.strip().lower()
            when = when.strip()
            at_s = float(when[:-1]) if when.endswith("s") else float(Fraction(when)) * duration_s
            if kind == LASER:
                event = SimEvent.laser(at_s, float(Fraction(value.strip())))
            elif kind == MOVE:
                parts = [int(v) for v in value.split(":")]
                if len(parts) not in (1, 2):
                    raise ValueError(value)
                dy, dx = (0, parts[0]) if len(parts) == 1 else parts
                event = SimEvent.move(at_s, dy, dx)
            else:
                raise ValueError(kind)
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"bad event {item!r} ({exc}): expected laser=SCALE@WHEN or move=DX@WHEN "
                             "or move=DY:DX@WHEN, WHEN in seconds (30s) or a fraction of the session (1/2)") from None
        events.append(event)
    return tuple(sorted(events, key=lambda e: e.at_s))


def stage_reach(events: tuple[SimEvent, ...]) -> int:
    """The farthest the stage moves from where it started, in pixels along either axis."""
    y = x = reach = 0
    for event in sorted(events, key=lambda e: e.at_s):
        if event.kind == MOVE:
            y, x = y + event.shift_px[0], x + event.shift_px[1]
            reach = max(reach, abs(y), abs(x))
    return reach


@dataclass(frozen=True)
class SimConfig:
    """What to simulate. Detector defaults reproduce the real OptiNiSt movie (docs/simulator.md).

    ``photons`` is the mean number of *detected* photons per pixel per frame, averaged over the
    frame and over time (before bleaching). ``gain_adu`` is the mean ADU per detected photon; with
    the PMT's excess noise factor F the noise variance grows as ``F * gain_adu`` per photon, which is
    what a Poisson-Gaussian fit (tools/noise_stats.py) reports as the "apparent" gain, and it then
    reports ``photons / F`` apparent photons.

    The defaults include what raw two-photon movies have: slight motion (``drift_px``,
    ``jitter_px``), slow bleaching, neuropil with its own activity, thin processes and noise
    correlated along the fast scan axis x. ``SimConfig.minimal()`` turns these off.
    """

    height: int = 128
    width: int = 128
    rate_hz: float = 30.0
    photons: float = 2.0
    n_cells: int | None = None  # somata; None: from the area (CELL_DENSITY)
    cell_radius_px: float = 5.0
    drift_px: float = 1.0  # amplitude of the slow motion of the tissue (pixels)
    bleach_per_min: float = 0.005  # fraction of the fluorescence lost per minute
    gain_adu: float = 2170.0  # x F=1.3 = 2820 ADU/photon apparent, as measured on the real movie
    offset_adu: float = 1230.0
    read_noise_adu: float = 300.0
    excess_noise: float = 1.3  # PMT excess noise factor F = 1 + 1/a (gamma gain of shape a)
    noise_corr_x: float = 0.18  # neighbour correlation of the noise along the fast axis x (raw SIMA data: 0.18)
    noise_corr_y: float = 0.0  # and along y (raw data: ~0.01; the motion-corrected OptiNiSt movie: 0.19)
    jitter_px: float = 0.2  # RMS of the fast motion (heartbeat, breathing, random), pixels
    neuropil_activity: float = 1.0  # scale of the neuropil's own activity (0: only the population term)
    n_processes: int | None = None  # thin processes; None: PROCESSES_PER_SOMA per soma
    seed: int = 0
    events: tuple[SimEvent, ...] = ()  # laser steps and stage moves during the session (issue 15)

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
        if self.jitter_px < 0 or self.neuropil_activity < 0:
            raise ValueError("jitter_px and neuropil_activity must be >= 0")
        if (self.n_processes is not None and self.n_processes < 0) or (self.n_cells is not None and self.n_cells < 0):
            raise ValueError("n_cells and n_processes must be >= 0")
        if not 0.0 <= self.bleach_per_min < 1.0:
            raise ValueError(f"bleach_per_min is a fraction in [0, 1), got {self.bleach_per_min}")
        for name in ("noise_corr_x", "noise_corr_y"):
            if not 0.0 <= getattr(self, name) < 0.7:
                raise ValueError(f"{name} must be in [0, 0.7) (a 3-tap kernel cannot do more)")
        if not all(isinstance(event, SimEvent) for event in self.events):
            raise ValueError("events must be SimEvent objects (SimEvent.laser, SimEvent.move, parse_events)")

    @classmethod
    def like_real_movie(cls, **overrides: Any) -> SimConfig:
        """The OptiNiSt movie's measured statistics: 3.3 apparent photons, noise correlated ~0.2 in x
        and y (it was interpolated by motion correction, so its field does not move either)."""
        base = dict(photons=4.3, noise_corr_x=0.22, noise_corr_y=0.19, drift_px=0.0, jitter_px=0.0)
        return cls(**(base | overrides))

    @classmethod
    def minimal(cls, **overrides: Any) -> SimConfig:
        """The plain model: a still field, no bleaching, white noise, static neuropil texture (with
        only the population term), no thin processes. For tests that isolate one effect."""
        base = dict(drift_px=0.0, jitter_px=0.0, bleach_per_min=0.0, noise_corr_x=0.0, noise_corr_y=0.0,
                    neuropil_activity=0.0, n_processes=0)
        return cls(**(base | overrides))


def motion_margin(config: SimConfig) -> int:
    """Pixels of tissue drawn beyond each frame edge, so that a moving field never runs off it.

    The motion is clipped to ``margin - 2`` pixels (the cubic shift reads two more rows/columns).
    """
    if config.drift_px <= 0 and config.jitter_px <= 0:
        return 0
    # drift <= drift_px; the two oscillations <= (sqrt(0.5) + 1) jitter_px; 3 sd of the random part.
    reach = config.drift_px + (math.sqrt(0.5) + 1.0 + 3.0 * math.sqrt(0.25)) * config.jitter_px
    return int(math.ceil(reach)) + 2


def scene_margin(config: SimConfig) -> int:
    """Pixels of tissue drawn beyond each frame edge: the motion's margin, plus the farthest stage
    move (``stage_reach``), so that the field of view stays on tissue after every move. Without
    stage moves it is ``motion_margin``: the same scene as ever for a seed."""
    reach = stage_reach(config.events)
    if reach == 0:
        return motion_margin(config)
    return max(motion_margin(config), 2) + reach


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


def _splat(image: np.ndarray, ys: np.ndarray, xs: np.ndarray, weights: np.ndarray) -> None:
    """Add ``weights`` at fractional positions, spread bilinearly over the four nearest pixels."""
    iy, ix = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = ys - iy, xs - ix
    for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (1, 0, fy * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 1, fy * fx)):
        np.add.at(image, (iy + dy, ix + dx), weights * w)


def _process_patch(rng: np.random.Generator, frac_y: float, frac_x: float) -> tuple[np.ndarray, int, int]:
    """A thin process on its own patch: (patch, row and column of the patch's centre pixel).

    A smooth random curve 8-40 px long with a Gaussian cross-section (sigma 0.45-0.9 px). Half are
    dendrite segments (slightly thicker, brightness varying slowly along them), half are axons
    with boutons: varicosities every 3-8 px, 1.5-2.5 times as bright as the shaft. The centre line
    of the shaft is ~1 in brightness.
    """
    axon = rng.random() < 0.5
    length = rng.uniform(8.0, 40.0)
    width = rng.uniform(0.45, 0.7) if axon else rng.uniform(0.6, 0.9)
    step = 0.5
    n = max(2, int(length / step))
    angle = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.05, n))
    ys = np.concatenate(([0.0], np.cumsum(np.sin(angle[:-1]) * step)))
    xs = np.concatenate(([0.0], np.cumsum(np.cos(angle[:-1]) * step)))
    ys += frac_y - ys.mean()
    xs += frac_x - xs.mean()
    pad = int(math.ceil(3 * 1.2)) + 2
    hy, hx = int(math.ceil(np.abs(ys).max())) + pad, int(math.ceil(np.abs(xs).max())) + pad
    line = np.zeros((2 * hy + 2, 2 * hx + 2))
    if axon:
        brightness = np.ones(n)
    else:  # dendrite: brightness varies slowly along it (sd ~25 %, over ~4 px)
        wobble = ndimage.gaussian_filter1d(rng.standard_normal(n + 32), 8.0)[16:-16]
        brightness = np.exp(0.25 * wobble / (wobble.std() + 1e-12))
    _splat(line, ys + hy, xs + hx, brightness * step)
    line = ndimage.gaussian_filter(line, width)
    along = line[np.rint(ys + hy).astype(int), np.rint(xs + hx).astype(int)]
    line /= max(float(np.median(along)), 1e-12)
    if axon:
        at = np.cumsum(rng.uniform(3.0, 8.0, int(length / 3) + 1) / step).astype(int)
        at = at[at < n]
        if len(at):
            boutons = np.zeros_like(line)
            _splat(boutons, ys[at] + hy, xs[at] + hx, rng.uniform(0.5, 1.5, len(at)))
            sigma = rng.uniform(0.7, 1.1)
            boutons = ndimage.gaussian_filter(boutons, sigma) * (2 * np.pi * sigma * sigma)
            line = line + boutons
    return line, hy, hx


class StaticScene:
    """The tissue: source footprints (sparse, pixels x sources), neuropil maps and vessels, all static.

    Sources are somata, then puncta, then thin processes (``kinds``). It is drawn on a canvas
    larger than the frame by the motion margin, so that a moving field of view never runs off the
    tissue. Units are relative brightness (the neuropil's mean is ~1); the simulator scales them
    to photons.
    """

    def __init__(self, config: SimConfig, rng: np.random.Generator):
        self.margin = scene_margin(config)
        m = self.margin
        self.frame_shape = (config.height, config.width)
        self.canvas_shape = (config.height + 2 * m, config.width + 2 * m)
        ch, cw = self.canvas_shape
        self.transmission = _vessel_transmission(rng, self.canvas_shape)

        # Neuropil: a textured background (fine dendrites/axons, coarser patches), whose activity
        # (CalciumActivity) lives on a coarse grid of smooth basis functions (below).
        texture = np.exp(
            0.25 * _smooth_field(rng, self.canvas_shape, 1.0)
            + 0.20 * _smooth_field(rng, self.canvas_shape, 4.0)
            + 0.20 * _smooth_field(rng, self.canvas_shape, max(ch, cw) / 6)
        )
        texture /= texture.mean()
        self.neuropil = (texture * self.transmission).astype(np.float32)

        # Cells: somata with a nucleus (radius ~ cell_radius_px) and a third as many small bright
        # puncta (dendrite or bouton cross-sections), all away from vessels, overlapping little.
        r = config.cell_radius_px
        n_soma = config.n_cells if config.n_cells is not None else max(1, round(CELL_DENSITY * ch * cw / r**2))
        centres = self._place(rng, n_soma, 1.6 * r)
        n_puncta = len(centres) // 3
        puncta = self._place(rng, n_puncta, 1.5, avoid=centres, avoid_dist=1.2 * r)
        cols: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        vals: list[np.ndarray] = []

        def add(patch: np.ndarray, y0: int, x0: int, f0: float) -> None:
            ys, xs = np.nonzero(patch > 1e-3 * patch.max())
            ys, xs = ys + y0, xs + x0
            ok = (ys >= 0) & (ys < ch) & (xs >= 0) & (xs < cw)
            vals_i = patch[ys[ok] - y0, xs[ok] - x0] * self.transmission[ys[ok], xs[ok]]
            rows.append(ys[ok] * cw + xs[ok])
            cols.append(np.full(ok.sum(), len(cols)))
            vals.append(f0 * vals_i)

        for (cy, cx), is_soma in [(c, True) for c in centres] + [(p, False) for p in puncta]:
            iy, ix = int(round(cy)), int(round(cx))
            radius = r * rng.uniform(0.8, 1.2) if is_soma else rng.uniform(0.8, 1.5)
            patch = _soma_patch(rng, radius, cy - iy, cx - ix, nucleus=is_soma)
            half = patch.shape[0] // 2
            # Somata ~1.5-6x as bright as the neuropil at rest (the real movie's mean image: ~3.5).
            f0 = rng.lognormal(np.log(3.0), 0.4) if is_soma else rng.lognormal(np.log(4.0), 0.3)
            add(patch, iy - half, ix - half, f0)

        # Thin processes: dendrite segments and axons with boutons, anywhere on tissue (they may
        # cross somata), each its own source; their shafts ~1.5x the neuropil, boutons brighter.
        n_proc = config.n_processes if config.n_processes is not None else round(PROCESSES_PER_SOMA * len(centres))
        processes = self._place(rng, n_proc, 3.0)
        for cy, cx in processes:
            iy, ix = int(round(cy)), int(round(cx))
            patch, hy, hx = _process_patch(rng, cy - iy, cx - ix)
            add(patch, iy - hy, ix - hx, rng.lognormal(np.log(1.5), 0.3))

        self.n_cells = len(centres) + len(puncta) + len(processes)
        self.centres = np.array(list(centres) + list(puncta) + list(processes), dtype=np.float64).reshape(-1, 2)
        self.kinds = np.array([SOMA] * len(centres) + [PUNCTUM] * len(puncta) + [PROCESS] * len(processes))
        self.is_soma = self.kinds == SOMA
        self.footprints = sparse.csr_matrix(
            (np.concatenate(vals).astype(np.float32) if vals else np.zeros(0, np.float32),
             (np.concatenate(rows) if rows else np.zeros(0, int), np.concatenate(cols) if cols else np.zeros(0, int))),
            shape=(ch * cw, self.n_cells),
        )

        # Neuropil activity basis (Suite2p's neuropil model): Gaussian bumps on a grid whose spacing
        # is NEUROPIL_BASIS_RADII cell radii, normalised to sum to 1 at every pixel, so a grid of
        # coefficients C gives the field basis_y C basis_x^T (two small dense products).
        # Along x the field is evaluated every COARSE_STEP columns and linearly interpolated between
        # (the basis is ~15 px wide: the interpolation's error is ~1 % of the field).
        spacing = NEUROPIL_BASIS_RADII * r
        self.basis_y = self._basis(ch, spacing, np.arange(ch))
        self.basis_x = self._basis(cw, spacing, np.arange(cw))
        self.basis_x_coarse = self._basis(cw, spacing, np.arange(0, cw + self.COARSE_STEP, self.COARSE_STEP))
        self.neuropil_grid = (self.basis_y.shape[1], self.basis_x.shape[1])

    COARSE_STEP = 4

    @staticmethod
    def _basis(n: int, spacing: float, at: np.ndarray) -> np.ndarray:
        """Gaussian bumps every ~``spacing`` px over ``n`` px, evaluated at ``at``, summing to 1 there."""
        k = max(1, int(round(n / spacing)))
        nodes = (np.arange(k) + 0.5) * n / k
        b = np.exp(-0.5 * ((np.asarray(at, np.float64)[:, None] - nodes[None, :]) / (0.5 * n / k)) ** 2)
        return (b / b.sum(axis=1, keepdims=True)).astype(np.float32)

    def neuropil_field(self, coeffs: np.ndarray) -> np.ndarray:
        """The neuropil's dF/F over the canvas for grid coefficients: basis_y C basis_x^T.

        einsum, not @: a BLAS call here wakes OpenBLAS's threads, whose spinning then slows the
        single-threaded noise draws that follow (3-4x on a busy 2-core machine).
        """
        coeffs = np.asarray(coeffs, np.float32).reshape(self.neuropil_grid)
        rows = np.einsum("ik,kl->il", self.basis_y, coeffs)
        coarse = np.einsum("il,jl->ij", rows, self.basis_x_coarse)
        step = self.COARSE_STEP
        cw = self.canvas_shape[1]
        out = np.empty(self.canvas_shape, np.float32)
        for phase in range(step):
            n = len(range(phase, cw, step))
            f = np.float32(phase / step)
            out[:, phase::step] = coarse[:, :n] * (1 - f) + coarse[:, 1 : n + 1] * f
        return out

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

    def render(self, dff: np.ndarray, neuropil_coeffs: np.ndarray, neuropil_level: float) -> np.ndarray:
        """Relative brightness of the whole canvas.

        ``dff``: each source's dF/F; ``neuropil_coeffs``: the neuropil's dF/F at the grid nodes
        (``neuropil_grid``, flattened or not); ``neuropil_level``: a dF/F common to all the
        neuropil (the population term).
        """
        cells = self.footprints @ (1.0 + dff).astype(np.float32)
        activity = self.neuropil_field(neuropil_coeffs)
        activity += np.float32(1.0 + neuropil_level)
        activity *= self.neuropil
        activity += cells.reshape(self.canvas_shape)
        return activity


# ------------------------------------------------------------------------------------ activity


class CalciumActivity:
    """Spiking in bursts through a GCaMP kernel, per source, and the neuropil's own slow activity.

    Per source: bursts arrive as a Poisson process (rate log-normal, median 0.25/s) modulated by a
    slow population drive z(t) (AR(1), tau 2 s) to which each source couples with its own
    strength b (rate x exp(b z - b^2/2), so the mean rate is unchanged; b uniform in 0-0.5); a burst
    has a geometric number of spikes (mean per source 1 + log-normal, median 2.5), delivered over
    successive frames (each pending spike fires within a frame with probability 1 - exp(-dt / 20
    ms)). Spikes drive a difference of exponentials (rise tau 20-45 ms, decay tau 0.4-1.2 s per
    source) normalised to a peak of 1, run as two first-order recursions (a step costs O(sources)
    and needs no history). The linear sum c gives dF/F = A c (1 + 1/s) / (1 + c / s): A
    (log-normal, median 0.25, at most 0.8) is the dF/F of one spike at its peak, and s
    (log-normal, median 6 spikes) saturates large bursts at (s + 1) A.

    Neuropil, per node of the scene's coarse grid: its own transients (events at 0.3/s, peak dF/F
    log-normal with median 0.12 x ``neuropil_activity``, rise tau 150 ms, decay tau 1.5 s: the
    summed, smeared activity of many unresolved processes) plus a slow AR(1) wobble (tau 3 s, sd
    0.03 x ``neuropil_activity``); and a level common to all the neuropil, 0.3 x the sources'
    mean dF/F (the population).
    """

    BURST_INTERVAL_S = 0.02  # spike spacing inside a burst
    POPULATION_TAU_S = 2.0
    NEUROPIL_EVENT_RATE = 0.3  # per node per second
    NEUROPIL_TAU_RISE_S, NEUROPIL_TAU_DECAY_S = 0.15, 1.5
    NEUROPIL_WOBBLE_TAU_S, NEUROPIL_WOBBLE_SD = 3.0, 0.03
    POPULATION_TO_NEUROPIL = 0.3

    def __init__(
        self, n_cells: int, rate_hz: float, rng: np.random.Generator, *,
        n_neuropil: int = 0, neuropil_activity: float = 1.0,
    ):
        self.rng = rng
        self.dt = dt = 1.0 / rate_hz
        n = n_cells
        self.event_rate = rng.lognormal(np.log(0.25), 0.8, n)  # bursts per second
        self.burst_spikes = 1.0 + rng.lognormal(np.log(1.5), 0.6, n)  # mean spikes per burst (geometric)
        self.amplitude = np.minimum(rng.lognormal(np.log(0.25), 0.45, n), 0.8)  # dF/F of one spike at peak
        self.saturation = rng.lognormal(np.log(6.0), 0.3, n)  # in single-spike peaks
        self.coupling = rng.uniform(0.0, 0.5, n)
        self.tau_rise = rng.uniform(0.02, 0.045, n)
        self.tau_decay = rng.uniform(0.4, 1.2, n)
        self.q_rise, self.q_decay, self.norm = self._kernel(self.tau_rise, self.tau_decay, dt)
        self.c_rise = np.zeros(n)
        self.c_decay = np.zeros(n)
        self.pending = np.zeros(n, np.int64)
        self.p_deliver = -math.expm1(-dt / self.BURST_INTERVAL_S)
        self.q_population = math.exp(-dt / self.POPULATION_TAU_S)
        self.population = 0.0
        self.spikes = np.zeros(n)
        self.dff = np.zeros(n)
        # Neuropil nodes.
        m = n_neuropil
        self.np_amplitude = neuropil_activity * rng.lognormal(np.log(0.12), 0.5, m)
        self.np_p_event = -math.expm1(-self.NEUROPIL_EVENT_RATE * dt)
        q_r, q_d, norm = self._kernel(np.array([self.NEUROPIL_TAU_RISE_S]), np.array([self.NEUROPIL_TAU_DECAY_S]), dt)
        self.np_q_rise, self.np_q_decay, self.np_norm = float(q_r[0]), float(q_d[0]), float(norm[0])
        self.np_rise = np.zeros(m)
        self.np_decay = np.zeros(m)
        self.np_q_wobble = math.exp(-dt / self.NEUROPIL_WOBBLE_TAU_S)
        self.np_wobble_sd = self.NEUROPIL_WOBBLE_SD * neuropil_activity
        self.np_wobble = np.zeros(m)
        # Saturation lowers the mean dF/F below the linear formula: measured once, on its own stream.
        self.saturation_ratio = self._calibrate_saturation(np.random.default_rng(rng.integers(2**63)))
        # Burn in to the stationary state: several decay times and population times.
        for _ in range(int(10.0 * rate_hz)):
            self.step()

    @staticmethod
    def _kernel(tau_rise: np.ndarray, tau_decay: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-frame factors of the two recursions, and the factor that makes the peak 1."""
        t_peak = tau_rise * tau_decay / (tau_decay - tau_rise) * np.log(tau_decay / tau_rise)
        norm = 1.0 / (np.exp(-t_peak / tau_decay) - np.exp(-t_peak / tau_rise))
        return np.exp(-dt / tau_rise), np.exp(-dt / tau_decay), norm

    def mean_dff(self) -> np.ndarray:
        """Stationary mean dF/F of each source.

        Bursts per frame x spikes per burst x amplitude x the kernel's area in frames (the
        population drive leaves each source's mean rate unchanged), times the saturation's
        measured reduction (``saturation_ratio``).
        """
        kernel_sum = self.norm * (1.0 / (1.0 - self.q_decay) - 1.0 / (1.0 - self.q_rise))
        p_event = -np.expm1(-self.event_rate * self.dt)
        linear = p_event * self.burst_spikes * self.amplitude * (1.0 + 1.0 / self.saturation) * kernel_sum
        return linear * self.saturation_ratio

    def mean_neuropil(self) -> tuple[np.ndarray, float]:
        """Stationary mean of (the node coefficients, the common level)."""
        kernel_sum = self.np_norm * (1.0 / (1.0 - self.np_q_decay) - 1.0 / (1.0 - self.np_q_rise))
        nodes = self.np_p_event * self.np_amplitude * kernel_sum
        level = self.POPULATION_TO_NEUROPIL * float(self.mean_dff().mean()) if len(self.amplitude) else 0.0
        return nodes, level

    def _cells_step(self) -> np.ndarray:
        """Advance the sources' spiking and kernels one frame; return the linear sum c per source."""
        rng = self.rng
        n = len(self.c_rise)
        b = self.coupling
        rate = self.event_rate * np.exp(b * self.population - 0.5 * b * b)
        fired = rng.random(n) < -np.expm1(-rate * self.dt)
        self.pending += np.where(fired, rng.geometric(1.0 / self.burst_spikes), 0)
        spikes = rng.binomial(self.pending, self.p_deliver)
        self.pending -= spikes
        self.spikes = spikes.astype(np.float64)
        self.c_rise = self.q_rise * self.c_rise + self.spikes
        self.c_decay = self.q_decay * self.c_decay + self.spikes
        q = self.q_population
        self.population = q * self.population + math.sqrt(1.0 - q * q) * float(rng.standard_normal())
        return self.norm * (self.c_decay - self.c_rise)

    def _saturate(self, c: np.ndarray) -> np.ndarray:
        """dF/F from the linear sum: A c (1 + 1/s) / (1 + c/s), exactly A for one spike at its peak."""
        return self.amplitude * c * (1.0 + 1.0 / self.saturation) / (1.0 + c / self.saturation)

    def _calibrate_saturation(self, rng: np.random.Generator, seconds: float = 120.0) -> np.ndarray:
        """E[saturated c] / E[c A (1 + 1/s)] per source, from a separate run of the spiking (own rng):
        ``seconds`` of it, in 600 to 4000 frames (~0.1 s of CPU at 30 Hz)."""
        n = len(self.c_rise)
        saved = (self.c_rise, self.c_decay, self.pending, self.population, self.spikes, self.rng)
        self.c_rise, self.c_decay, self.pending = np.zeros(n), np.zeros(n), np.zeros(n, np.int64)
        self.population, self.rng = 0.0, rng
        burn, steps = int(10.0 / self.dt), min(4000, max(600, int(seconds / self.dt)))
        linear, saturated = np.zeros(n), np.zeros(n)
        for i in range(burn + steps):
            c = self._cells_step()
            if i >= burn:
                linear += c
                saturated += self._saturate(c)
        self.c_rise, self.c_decay, self.pending, self.population, self.spikes, self.rng = saved
        linear *= self.amplitude * (1.0 + 1.0 / self.saturation)
        return np.where(linear > 0, saturated / np.maximum(linear, 1e-300), 1.0)

    def step(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Advance one frame: (dF/F per source, neuropil dF/F per grid node, common neuropil dF/F)."""
        rng = self.rng
        n = len(self.c_rise)
        self.dff = self._saturate(self._cells_step())
        m = len(self.np_rise)
        kicks = np.where(rng.random(m) < self.np_p_event, self.np_amplitude, 0.0)
        self.np_rise = self.np_q_rise * self.np_rise + kicks
        self.np_decay = self.np_q_decay * self.np_decay + kicks
        qw = self.np_q_wobble
        self.np_wobble = qw * self.np_wobble + math.sqrt(1.0 - qw * qw) * self.np_wobble_sd * rng.standard_normal(m)
        nodes = self.np_norm * (self.np_decay - self.np_rise) + self.np_wobble
        level = self.POPULATION_TO_NEUROPIL * float(self.dff.mean()) if n else 0.0
        return self.dff, nodes, level


class DriftPath:
    """Rigid motion of the tissue, in pixels: a slow drift plus fast jitter.

    Drift: two sinusoids per axis (periods 40-80 s and 7-15 s, weights 0.7 and 0.3), bounded by
    ``drift_px``. Jitter, of RMS magnitude ``jitter_px``: a heartbeat-like oscillation (8-12 Hz,
    a mouse's 500-700 beats/min; a quarter of the variance) and a breathing-like one (2-4 Hz; half)
    along random directions, and a random AR(1) part (tau 50 ms; a quarter). ``offset(t)`` is the
    deterministic part; ``step(t)`` adds the random part and must be called once per frame, in
    order.
    """

    def __init__(self, drift_px: float, rng: np.random.Generator, jitter_px: float = 0.0, rate_hz: float = 30.0):
        self.drift_px = drift_px
        self.periods = rng.uniform((40.0, 7.0), (80.0, 15.0), size=(2, 2))  # (axis, component)
        self.phases = rng.uniform(0, 2 * np.pi, size=(2, 2))
        self.jitter_px = jitter_px
        self.freqs = rng.uniform((8.0, 2.0), (12.0, 4.0))  # heartbeat, breathing (Hz)
        self.jitter_phases = rng.uniform(0, 2 * np.pi, 2)
        angles = rng.uniform(0, np.pi, 2)
        self.directions = np.stack([np.sin(angles), np.cos(angles)], axis=1)  # (component, (dy, dx))
        self.amplitudes = jitter_px * np.sqrt(2.0 * np.array([0.25, 0.5]))  # sinusoid variance = a^2/2
        self.random_sd = jitter_px * math.sqrt(0.25 / 2.0)  # per axis
        self.q = math.exp(-1.0 / (rate_hz * 0.05))
        self.state = np.zeros(2)
        self.rng = rng

    def offset(self, t: float) -> tuple[float, float]:
        """(dy, dx) in pixels at time t (seconds): the drift and the oscillations."""
        s = np.sin(2 * np.pi * t / self.periods + self.phases)
        d = self.drift_px * (0.7 * s[:, 0] + 0.3 * s[:, 1])
        if self.jitter_px > 0:
            osc = self.amplitudes * np.sin(2 * np.pi * self.freqs * t + self.jitter_phases)
            d = d + osc[0] * self.directions[0] + osc[1] * self.directions[1]
        return float(d[0]), float(d[1])

    def step(self, t: float) -> tuple[float, float]:
        """The offset of the next frame, at time t, including the random part of the jitter."""
        dy, dx = self.offset(t)
        if self.jitter_px > 0:
            q = self.q
            self.state = q * self.state + math.sqrt(1.0 - q * q) * self.random_sd * self.rng.standard_normal(2)
            dy, dx = dy + float(self.state[0]), dx + float(self.state[1])
        return dy, dx


def _shifted_crop(canvas: np.ndarray, top: float, left: float, shape: tuple[int, int]) -> np.ndarray:
    """``shape`` window of ``canvas`` at a fractional position, by bilinear interpolation."""
    h, w = shape
    iy, ix = int(math.floor(top)), int(math.floor(left))
    fy, fx = top - iy, left - ix
    a = canvas[iy : iy + h + 1, ix : ix + w + 1]
    rows = (1 - fy) * a[:-1] + fy * a[1:]
    return (1 - fx) * rows[:, :-1] + fx * rows[:, 1:]


def _cubic_weights(f: float) -> tuple[float, float, float, float]:
    """Keys' cubic convolution (a = -0.5, Catmull-Rom) weights of samples -1, 0, 1, 2 at offset f."""
    f2, f3 = f * f, f * f * f
    return (-0.5 * f3 + f2 - 0.5 * f, 1.5 * f3 - 2.5 * f2 + 1.0, -1.5 * f3 + 2.0 * f2 + 0.5 * f, 0.5 * f3 - 0.5 * f2)


def _shifted_crop_cubic(canvas: np.ndarray, top: float, left: float, shape: tuple[int, int]) -> np.ndarray:
    """``shape`` window of ``canvas`` at a fractional position, by cubic convolution (Keys 1981).

    Unlike bilinear interpolation, whose blur grows with the fractional part (a [0.5, 0.5] kernel
    at half a pixel), it keeps fine structure nearly as sharp at every sub-pixel position, so a
    jittering field does not flicker in sharpness from frame to frame. Reads one row and column
    before and two after the window.
    """
    h, w = shape
    iy, ix = int(math.floor(top)), int(math.floor(left))
    wy = [np.float32(v) for v in _cubic_weights(top - iy)]
    wx = [np.float32(v) for v in _cubic_weights(left - ix)]
    a = canvas[iy - 1 : iy + h + 2, ix - 1 : ix + w + 2]
    rows = wy[0] * a[0:h] + wy[1] * a[1 : h + 1] + wy[2] * a[2 : h + 2] + wy[3] * a[3 : h + 3]
    return wx[0] * rows[:, 0:w] + wx[1] * rows[:, 1 : w + 1] + wx[2] * rows[:, 2 : w + 2] + wx[3] * rows[:, 3 : w + 3]


# --------------------------------------------------------------------------------------- noise


def _corr_kernel(rho: float) -> np.ndarray:
    """3-tap symmetric kernel of unit L2 norm whose output has neighbour correlation ``rho``."""
    if rho <= 0:
        return np.array([0.0, 1.0, 0.0])
    b = (1.0 - math.sqrt(1.0 - 2.0 * rho * rho)) / (2.0 * rho)  # rho = 2b / (1 + 2b^2)
    return np.array([b, 1.0, b]) / math.sqrt(1.0 + 2.0 * b * b)


def _noise_margin(config: SimConfig) -> tuple[int, int]:
    """(rows, columns) of noise drawn beyond each edge of the frame: the correlation kernel's
    half-width along each correlated axis, 0 along the others."""
    return (1 if config.noise_corr_y > 0 else 0, 1 if config.noise_corr_x > 0 else 0)


def _correlate(noise: np.ndarray, config: SimConfig) -> np.ndarray:
    """Give zero-mean noise the requested neighbour correlation, keeping its variance.

    ``noise`` is drawn `_noise_margin` wider than the frame on each side and the frame is cropped
    from the filtered noise, so that every pixel, the edges' too, is a full kernel's sum of
    independent draws: the same variance and neighbour correlation everywhere (a reflected edge
    would sum one draw twice and raise the edge pixels' variance by ~18 % at 0.18)."""
    for axis, rho in ((1, config.noise_corr_x), (0, config.noise_corr_y)):
        if rho > 0:
            b, c, _ = (np.float32(v) for v in _corr_kernel(rho))
            n = noise.shape[axis]
            before, centre, after = (noise[(slice(None),) * axis + (slice(i, n - 2 + i),)] for i in range(3))
            out = centre * c
            out += b * before
            out += b * after
            noise = out
    return noise


def sample_detector(photon_rate: np.ndarray, config: SimConfig, rng: np.random.Generator) -> np.ndarray:
    """One noisy uint16 frame for an expected photon count per pixel ``photon_rate``.

    Photons k ~ Poisson(rate); the PMT multiplies each photoelectron by a gamma-distributed gain, so
    the k together give Gamma(k a, g / a) ADU (mean k g, excess noise factor F = 1 + 1/a); the
    digitiser adds Gaussian read noise and the offset, rounds and clips to uint16. Optional
    neighbour correlation is applied to the zero-mean noise, drawn a pixel beyond the correlated
    edges so that the edge pixels are like the rest (`_correlate`), so the expected value stays
    ``offset + g * rate`` exactly (before clipping).
    """
    frame = np.asarray(photon_rate, dtype=np.float32)
    g = np.float32(config.gain_adu)
    margin = _noise_margin(config)
    correlated = config.noise_corr_x > 0 or config.noise_corr_y > 0
    # Correlated noise is drawn a kernel's half-width beyond the edges (`_correlate`), there from
    # the edge pixels' rate (as `expected_variance` assumes), and the frame cropped from it.
    rate = np.pad(frame, [(m, m) for m in margin], mode="edge") if correlated else frame
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
    if correlated:
        value -= g * rate
        value = _correlate(value, config)
        value += g * frame
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
    correlation each pixel's variance is the squared-kernel-weighted mean of its neighbours', those
    beyond an edge at the edge pixel's rate (`sample_detector` draws them so: mode "nearest").
    """
    rate = np.maximum((np.asarray(clean, np.float64) - config.offset_adu) / config.gain_adu, 0.0)
    var = config.excess_noise * config.gain_adu**2 * rate + config.read_noise_adu**2
    for axis, rho in ((1, config.noise_corr_x), (0, config.noise_corr_y)):
        if rho > 0:
            var = ndimage.correlate1d(var, _corr_kernel(rho) ** 2, axis=axis, mode="nearest")
    return var + 1.0 / 12.0


# ----------------------------------------------------------------------------------- simulator


class TwoPhotonSimulator:
    """Frames of a simulated session, in order, each with its ground truth.

    Deterministic for a seed: the scene, the activity, the motion and the noise draw from
    independent streams of one SeedSequence, so e.g. the scene does not change with the frame count.
    After each frame, ``dff`` holds every source's true dF/F (the truth traces, in the order of
    ``scene.kinds``), ``spikes`` the spikes it received in that frame and ``offset`` the tissue's
    (dy, dx) displacement in pixels; with scripted events (``SimConfig.events``), ``stage`` the
    field of view's (dy, dx) from where it started and ``intensity`` the laser's photon factor.
    """

    def __init__(self, config: SimConfig):
        self.config = config
        scene_ss, activity_ss, motion_ss, noise_ss = np.random.SeedSequence(config.seed).spawn(4)
        self.scene = StaticScene(config, np.random.default_rng(scene_ss))
        grid = self.scene.neuropil_grid
        self.activity = CalciumActivity(
            self.scene.n_cells, config.rate_hz, np.random.default_rng(activity_ss),
            n_neuropil=grid[0] * grid[1], neuropil_activity=config.neuropil_activity,
        )
        self.drift = DriftPath(config.drift_px, np.random.default_rng(motion_ss), config.jitter_px, config.rate_hz)
        self.noise_rng = np.random.default_rng(noise_ss)
        self.index = 0
        self.offset = (0.0, 0.0)
        self.stage = (0, 0)
        self.intensity = 1.0
        self._events = sorted(config.events, key=lambda e: e.at_s)
        self._motion_reach = max(motion_margin(config) - 2, 0)
        # Scale relative brightness to photons: the time-averaged mean over the (unshifted) frame.
        nodes, level = self.activity.mean_neuropil()
        expected = self._crop(self.scene.render(self.activity.mean_dff(), nodes, level), 0.0, 0.0)
        self.photon_scale = config.photons / float(expected.mean())

    @property
    def dff(self) -> np.ndarray:
        """Each source's true dF/F in the last frame (somata, puncta, processes: ``scene.kinds``)."""
        return self.activity.dff

    @property
    def spikes(self) -> np.ndarray:
        """The spikes each source received in the last frame."""
        return self.activity.spikes

    def footprints(self, stage: tuple[int, int] = (0, 0)) -> np.ndarray:
        """(sources, H, W) float32: each source's expected photons per frame at rest, in the frame at
        zero motion and before bleaching and laser steps (its spatial footprint: for
        footprint-weighted traces), with the stage at ``stage`` (see ``SimEvent``). Dense: 1 GB at
        512² for its thousand sources; the scores take `footprint_matrix`."""
        h, w = self.scene.frame_shape
        return self.footprint_matrix(stage).toarray().reshape(self.scene.n_cells, h, w)

    def footprint_matrix(self, stage: tuple[int, int] = (0, 0)) -> sparse.csr_matrix:
        """`footprints` as a sparse (sources, H*W) float32 matrix: what `umvd_live.metrics` takes,
        a few MB where the dense array is a GB at 512²."""
        m = self.scene.margin
        h, w = self.scene.frame_shape
        ch, cw = self.scene.canvas_shape
        dy, dx = int(stage[0]), int(stage[1])
        if max(abs(dy), abs(dx)) > max(m - 2, 0) and (dy, dx) != (0, 0):
            raise ValueError(f"stage {stage} is off the simulated tissue (margin {m} px)")
        rows = ((np.arange(h)[:, None] + m + dy) * cw + (np.arange(w)[None, :] + m + dx)).ravel()
        return sparse.csr_matrix(self.scene.footprints[rows].T * self.photon_scale, dtype=np.float32)

    def _crop(self, canvas: np.ndarray, dy: float, dx: float) -> np.ndarray:
        m = self.scene.margin
        if m == 0:
            return canvas
        return _shifted_crop_cubic(canvas, m + dy, m + dx, self.scene.frame_shape)

    def _apply_events(self) -> None:
        """The scripted changes that take effect at this frame."""
        while self._events and self._events[0].first_frame(self.config.rate_hz) <= self.index:
            event = self._events.pop(0)
            if event.kind == LASER:
                self.intensity *= event.scale
            else:
                self.stage = (self.stage[0] + event.shift_px[0], self.stage[1] + event.shift_px[1])

    def clean_photons(self) -> np.ndarray:
        """Advance one frame and return its expected photon count per pixel (float32, H x W)."""
        c = self.config
        t = self.index / c.rate_hz
        self._apply_events()
        dff, nodes, level = self.activity.step()
        canvas = self.scene.render(dff, nodes, level)
        if self.scene.margin:
            reach = self._motion_reach
            dy, dx = self.drift.step(t)
            self.offset = (min(max(dy, -reach), reach), min(max(dx, -reach), reach))
        rate = self._crop(canvas, self.offset[0] + self.stage[0], self.offset[1] + self.stage[1])
        scale = self.photon_scale * self.intensity * (1.0 - c.bleach_per_min) ** (t / 60.0)
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
    dropped: int = 0  # refused by the publisher (queue full), or sent with no subscriber: the acquisition did not wait
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
    publisher's frames sent before the subscription arrives are lost. When it stops (``frames``,
    ``stop``, or an exception such as Ctrl-C) the stream is ended (protocol `StreamEnd`), so the
    daemon hands out its last outputs at once instead of at its shutdown.
    """
    rate = float(rate_hz or config.rate_hz)
    if rate <= 0:
        raise ValueError(f"rate_hz must be > 0, got {rate}")
    if frames is not None and frames < 0:
        raise ValueError(f"frames must be >= 0, got {frames}")
    sim = TwoPhotonSimulator(config)
    subscribed = publisher.wait_for_subscriber(wait_subscriber_s) if wait_subscriber_s > 0 else False
    result = StreamResult(subscribed=subscribed)
    meta = {"source": "sim", "photons": config.photons, "gain_adu": config.gain_adu,
            "offset_adu": config.offset_adu, "seed": config.seed}
    period = 1.0 / rate
    start = time.monotonic()
    i = 0
    try:
        while (frames is None or i < frames) and not (stop is not None and stop.is_set()):
            noisy, clean = sim.next_frame()
            due = start + i * period
            wait = due - time.monotonic()
            if wait > 0:
                if sleep_unless_stopped(wait, stop):
                    break
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
    finally:
        if publisher.seq > 0:  # frames went out since the stream was last ended
            publisher.end()
    result.frames = i
    result.elapsed_s = time.monotonic() - start
    return result
