"""How the change detector (`umvd_live.engine.changes`) does: events it must see, streams it must not.

For each photon level: a steady simulated stream (activity with bursts, motion, bleaching: the
simulator's defaults) and the largest value each test statistic reached on it, as a share of its
threshold (under 1: no false change); then laser steps and stage moves, and the frame each was
detected at (the event is at frame 60), and one hot pixel or a spike of 2 or 3 along a row (none
may be found). Then a sparse field of a few bright spots, with a hot pixel, a spike and a stage
move. Real movies given as arguments are scanned too, as they are and with a hot pixel or a spike
in their middle frame.

    python tools/bench_changes.py --size 128 --frames 3000
    python tools/bench_changes.py ../shared/data/*.tif

With ``--session``, it also denoises a scripted 30-s session (laser ×3 at 10 s, stage move 40 px at
15 s, laser ×1/3 at 20 s) through the engine, inline (not paced: the live, paced figures come from
`umvd-live bench --events`), with and without change detection, and prints PSNR raw/denoised in
bins after the start and after each change.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tifffile

from umvd_live.adapters.simulation import SimConfig, SimEvent, TwoPhotonSimulator
from umvd_live.engine import EngineConfig, StreamDenoiser
from umvd_live.engine.changes import ChangeConfig, ChangeDetector, _robust_sd

EVENTS = {"laser ×3": SimEvent.laser(2.0, 3.0), "laser ×1.5": SimEvent.laser(2.0, 1.5),
          "laser ×1/3": SimEvent.laser(2.0, 1 / 3), "move 40 px": SimEvent.move(2.0, 0, 40),
          "move 10 px": SimEvent.move(2.0, 0, 10), "move 4 px": SimEvent.move(2.0, 0, 4)}


class Margins(ChangeDetector):
    """The detector, recording how close each test came to its threshold."""

    def __init__(self) -> None:
        super().__init__()
        self.worst = {"level": 0.0, "spread": 0.0, "content": 0.0}

    def _test(self, index, level, spread, corr):  # noqa: ANN001, ANN202
        c = self.config
        levels, spreads = np.log(np.asarray(self._levels)), np.log(np.asarray(self._spreads))
        measures = (("level", level, levels, c.level_jump), ("spread", spread, spreads, c.spread_jump))
        for name, value, ref, floor in measures:
            threshold = max(floor, c.spread_factor * _robust_sd(ref))
            self.worst[name] = max(self.worst[name], abs(np.log(value) - np.median(ref)) / threshold)
        if len(self._corrs) >= 2:
            corrs = np.asarray(self._corrs)
            typical = float(np.median(corrs))
            drop = max(c.min_decorrelation, (c.decorrelation - 1) * (1 - typical), c.spread_factor * _robust_sd(corrs))
            self.worst["content"] = max(self.worst["content"], (typical - corr) / drop)
        return super()._test(index, level, spread, corr)


SPARSE_SPOTS = 3  # bright spots of 1.2-px sigma, 3000 counts above a background of 100


def changes(movie: np.ndarray, detail: bool = False) -> str:
    """The changes a new detector finds in ``movie``, in words."""
    det = ChangeDetector()
    for frame in movie:
        det.observe(frame)
    if detail:
        return ", ".join(f"{c.index} {c.reason} (level ×{c.level_ratio:.2f}, r {c.correlation:.2f})"
                         for c in det.changes) or "none"
    return ", ".join(f"{c.index} {c.reason}" for c in det.changes) or "none"


def with_hot_pixel(movie: np.ndarray, at: int, length: int = 1) -> np.ndarray:
    """A copy of ``movie`` with one pixel of frame ``at`` at the dtype's largest value (a PMT spike,
    a saturated pixel), or ``length`` along a row (a readout spike): never a change."""
    hot = movie.copy()
    hot[at, 11, 13:13 + length] = np.iinfo(hot.dtype).max if hot.dtype.kind in "ui" else 100 * float(hot.max())
    return hot


def sparse_field(size: int, frames: int, seed: int) -> np.ndarray:
    """Poisson frames of `SPARSE_SPOTS` bright spots on a flat background: a field whose 99th
    percentile of block means is the background's, where one hot block stands out most."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    spots = sum(3000 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.2**2))
                for y, x in rng.uniform(0, size, (SPARSE_SPOTS, 2)))
    return rng.poisson(100 + spots, (frames, size, size)).astype(np.uint16)


SESSION = (SimEvent.laser(10.0, 3.0), SimEvent.move(15.0, 0, 40), SimEvent.laser(20.0, 1 / 3))
BINS = ((0, 8), (8, 15), (15, 30), (30, 60), (60, 120))  # frames at 30 Hz: 0-0.25 s, 0.25-0.5, 0.5-1, 1-2, 2-4


def session(size: int, detect: bool, prior: str) -> None:
    config = SimConfig(height=size, width=size, photons=2.0, seed=3, events=SESSION)
    noisy, truth = TwoPhotonSimulator(config).movie(900)
    engine = EngineConfig(changes=ChangeConfig(enabled=detect), prior=prior, warmup_frames=200, warmup_steps=200,
                          steps_per_frame=0.5, cpu_threads=1)
    with StreamDenoiser(engine) as den:
        out = {o.index: o for frame in noisy for o in den.push(frame)}
        out.update({o.index: o for o in den.flush()})
        found = ", ".join(f"{c.index} {c.reason}" for c in den.changes) or "none"
    print(f"\nsession at {size}², detection {'on' if detect else 'off'}, prior {prior}; changes found: {found}")
    print("| from | 0-0.25 s | 0.25-0.5 s | 0.5-1 s | 1-2 s | 2-4 s | states, first 0.5 s |")
    print("|---|---|---|---|---|---|---|")
    for start, label in ((0, "stream start"), (300, "laser ×3"), (450, "stage move"), (600, "laser ×1/3")):
        scale = float(np.ptp(truth[start:start + 150]))
        cells = []
        for a, b in BINS:
            idx = range(start + a, start + b)
            raw = np.mean([10 * np.log10(scale**2 / np.mean((noisy[i] - truth[i]) ** 2)) for i in idx])
            den_ = np.mean([10 * np.log10(scale**2 / np.mean((out[i].image - truth[i]) ** 2)) for i in idx])
            cells.append(f"{raw:.1f}/{den_:.1f}")
        states = ", ".join(sorted({out[start + i].state for i in range(15)}))
        print(f"| {label} | " + " | ".join(cells) + f" | {states} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("movies", nargs="*", help="real T×H×W TIFF movies to scan for changes")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--frames", type=int, default=3000, help="frames of each steady stream (default 3000: 100 s)")
    p.add_argument("--photons", type=float, nargs="+", default=[0.5, 2.0, 8.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--session", action="store_true", help="also denoise the scripted session (see above)")
    args = p.parse_args()
    print(f"steady streams, {args.size}², {args.frames} frames: the largest statistic / its threshold")
    print("| photons | seed | changes | level | spread | content | ms per frame |")
    print("|---|---|---|---|---|---|---|")
    for photons in args.photons:
        for seed in args.seeds:
            sim = TwoPhotonSimulator(SimConfig(height=args.size, width=args.size, photons=photons, seed=seed))
            det, spent = Margins(), 0.0
            for _ in range(args.frames):
                frame = sim.next_frame()[0]
                started = time.perf_counter()
                det.observe(frame)
                spent += time.perf_counter() - started
            w = det.worst
            print(f"| {photons:g} | {seed} | {len(det.changes)} | {w['level']:.2f} | {w['spread']:.2f} | "
                  f"{w['content']:.2f} | {1000 * spent / args.frames:.2f} |")
    print("\nevents at frame 60: the frame each was detected at, and why")
    print("| photons | " + " | ".join(EVENTS) + " | hot pixel | spike 2 px | spike 3 px |")
    print("|---|" + "---|" * (len(EVENTS) + 3))
    for photons in args.photons:
        cells = []
        for event in EVENTS.values():
            config = SimConfig(height=args.size, width=args.size, photons=photons, seed=7, events=(event,))
            cells.append(changes(TwoPhotonSimulator(config).movie(120)[0]))
        config = SimConfig(height=args.size, width=args.size, photons=photons, seed=7)
        steady = TwoPhotonSimulator(config).movie(120)[0]
        cells += [changes(with_hot_pixel(steady, 60, length)) for length in (1, 2, 3)]
        print(f"| {photons:g} | " + " | ".join(cells) + " |")
    print(f"\na sparse field ({SPARSE_SPOTS} spots on a flat background, {args.size}²): a hot pixel at frame 40 and "
          f"a stage move at frame 60, each alone")
    for seed in args.seeds:
        field = sparse_field(args.size, 90, seed)
        moved = field.copy()
        moved[60:] = np.roll(field[60:], (args.size // 5, args.size // 7), (1, 2))
        print(f"seed {seed}: hot pixel: {changes(with_hot_pixel(field, 40))}; spike of 3 px: "
              f"{changes(with_hot_pixel(field, 40, 3))}; move: {changes(moved)}")
    for path in args.movies:
        movie = tifffile.imread(path)
        movie = movie[:, 0] if movie.ndim == 4 else movie
        middle = len(movie) // 2
        print(f"{path.rsplit('/', 1)[-1]}: {len(movie)} frames, changes: {changes(movie, detail=True)}; with a hot "
              f"pixel at frame {middle}: {changes(with_hot_pixel(movie, middle), detail=True)}; with a spike of 3 px "
              f"there: {changes(with_hot_pixel(movie, middle, 3), detail=True)}")
    if args.session:
        for detect, prior in ((True, "auto"), (False, "auto"), (True, "none")):
            session(args.size, detect, prior)


if __name__ == "__main__":
    main()
