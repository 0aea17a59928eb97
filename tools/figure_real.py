#!/usr/bin/env python
"""Pictures of `umvd-live denoise` at work: frames and cell traces, raw beside a blind temporal
mean of the neighbours and the denoised movie, and beside the truth on a simulated movie.

Whole-movie scores hide ghosts, blur and cut transients; a frame during activity and the traces of
a few cells show them (issue 14). The neighbour mean, the N-1 = 6 frames around each frame with
the frame itself left out, is the blind baseline: what a frame's neighbours say about it without
any network.

    python tools/figure_real.py real                     # the OptiNiSt movie -> docs/img/real_optinist.png
    python tools/figure_real.py sim                      # a simulated movie  -> docs/img/sim_2photons.png
    python tools/figure_real.py sim --sim cell_radius_px=3 --out r3.png   # other physics, as bench_denoise --sim
    python tools/figure_real.py sim --simulator independent --out ind.png  # tools/independent_sim.py's movie
    python tools/figure_real.py real --denoised OUT.tif  # reuse an output of `umvd-live denoise`
    python tools/figure_real.py live --size 512 512      # a live stream -> docs/img/live_512.png

`live` streams a simulated movie through the daemon at 30 Hz with `umvd-live bench` (training in
the background, as in a session) and draws what the preview showed: each frame's live output,
the last one shown where the preview skipped a frame, warm-up outputs included; frames larger
than 256² are cropped to their central 256² so that the figure stays readable.

`denoise` runs at its defaults, through the command line. Cells are picked from the movie itself,
never from a truth, and reproducibly: the local maxima of the temporal standard deviation of the
movie smoothed in time and space, at least 12 px apart; their traces are the means over a disc of
radius 3 px, in dF/F about the neighbour mean's median. The frames shown are the one where the
picked cells are quietest and the one where they are most active, over a few frames, and the one
where the denoised frame and the neighbour mean differ most. Per cell the script prints the
project's trace scores (`umvd_live.metrics.trace_scores`) of each method against the neighbour
mean's trace (and against the truth on a simulated movie), and when each trace crosses half of
the rise in its zoom. Matplotlib is not a dependency of the project, so the figure is drawn with
Pillow.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter
from skimage.feature import peak_local_max

from umvd_live.metrics import MovieScorer, trace_scores

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_denoise import SIMULATORS, config_of, simulate  # noqa: E402  (the benchmark's movies, --sim included)

ROOT = Path(__file__).resolve().parents[1]
REAL_MOVIE = ROOT.parent / "shared" / "data" / "2p_optinist_mouse_1000x128x128_u16.tif"
REAL_OFFSET = 1230.0  # the OptiNiSt movie's digitiser offset (../shared/data/README.md)

COLOURS = {"raw": (175, 175, 175), "neighbour mean": (230, 130, 0), "denoised": (20, 100, 200),
           "truth": (0, 0, 0)}
WIDTHS = {"raw": 1, "neighbour mean": 1, "denoised": 2, "truth": 1}


# ------------------------------------------------------------------------------------ data


def neighbour_mean(movie: np.ndarray, window: int = 7) -> np.ndarray:
    """Each frame's blind temporal mean: the ``window - 1`` frames around it, itself left out.

    At the ends only the frames that exist are averaged (frame 0: frames 1-3), which is what the
    engine's mirrored window holds there too.
    """
    if window < 3 or window % 2 == 0:
        raise ValueError(f"window must be odd and at least 3, got {window}")
    movie = np.asarray(movie, dtype=np.float32)
    k, t_frames = window // 2, len(movie)
    if t_frames < 2:
        raise ValueError("a neighbour mean needs at least 2 frames")
    cumsum = np.concatenate([np.zeros((1, *movie.shape[1:])), np.cumsum(movie, axis=0, dtype=np.float64)])
    t = np.arange(t_frames)
    lo, hi = np.maximum(t - k, 0), np.minimum(t + k, t_frames - 1)
    sums = cumsum[hi + 1] - cumsum[lo] - movie
    return (sums / (hi - lo)[:, None, None]).astype(np.float32)


def run_denoise(source: Path, output: Path) -> float:
    """`umvd-live denoise SOURCE OUTPUT` at its defaults; returns the wall time in seconds."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "umvd_live", "denoise", str(source), str(output)], check=True)
    return time.monotonic() - start


def pick_cells(movie: np.ndarray, n: int, *, min_distance: int = 12, border: int = 6) -> np.ndarray:
    """(n, 2) centres (y, x): local maxima of the temporal standard deviation of the smoothed movie."""
    smooth = gaussian_filter(np.asarray(movie, dtype=np.float32), (2.0, 1.5, 1.5))
    spread = smooth.std(axis=0)
    return peak_local_max(spread, min_distance=min_distance, exclude_border=border, num_peaks=n)


def discs(centres: np.ndarray, shape: tuple[int, int], radius: float = 3.0) -> np.ndarray:
    """(cells, H, W) disc footprints of the given radius around each centre."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.stack([((yy - y) ** 2 + (xx - x) ** 2 <= radius**2).astype(np.float32) for y, x in centres])


def disc_traces(movie: np.ndarray, footprints: np.ndarray) -> np.ndarray:
    """(cells, T): each cell's mean over its disc, frame by frame."""
    flat = np.asarray(movie, dtype=np.float64).reshape(len(movie), -1)
    weights = footprints.reshape(len(footprints), -1).astype(np.float64)
    return (weights / weights.sum(axis=1, keepdims=True)) @ flat.T


def pick_frames(movie: np.ndarray, footprints: np.ndarray, margin: int = 4) -> tuple[int, int]:
    """(quiet, active): the frames where the picked cells, z-scored, are least and most active, over
    a few frames (smoothed over sigma 5 frames, so a one-frame disturbance is not taken for quiet)."""
    smooth = disc_traces(gaussian_filter(np.asarray(movie, dtype=np.float32), (5.0, 0, 0)), footprints)
    median = np.median(smooth, axis=1, keepdims=True)
    mad = np.median(np.abs(smooth - median), axis=1, keepdims=True) + 1e-9
    activity = ((smooth - median) / mad).mean(axis=0)
    inner = slice(margin, len(activity) - margin)
    return int(np.argmin(activity[inner]) + margin), int(np.argmax(activity[inner]) + margin)


# ------------------------------------------------------------------------------------ drawing


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def grey(image: np.ndarray, lo: float, hi: float, zoom: int) -> Image.Image:
    scaled = np.clip((image - lo) / (hi - lo), 0, 1)
    return Image.fromarray((scaled * 255).astype(np.uint8)).resize(
        (image.shape[1] * zoom, image.shape[0] * zoom), Image.NEAREST).convert("RGB")


def diverging(image: np.ndarray, span: float, zoom: int) -> Image.Image:
    """Blue (negative) - white (0) - red (positive), saturating at +-span."""
    v = np.clip(image / span, -1, 1)[..., None]
    white, red, blue = np.array([255, 255, 255.0]), np.array([200, 30, 30.0]), np.array([30, 60, 200.0])
    rgb = np.where(v >= 0, white + v * (red - white), white - v * (blue - white))
    return Image.fromarray(rgb.astype(np.uint8)).resize(
        (image.shape[1] * zoom, image.shape[0] * zoom), Image.NEAREST)


def nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    step = min((m * 10 ** np.floor(np.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first = np.ceil(lo / step) * step
    return [float(v) + 0.0 for v in np.arange(first, hi + step * 1e-6, step)]  # + 0.0: no "-0"


@dataclass
class Axes:
    """A plot area in pixels of the canvas, with its data ranges."""

    draw: ImageDraw.ImageDraw
    box: tuple[int, int, int, int]  # left, top, right, bottom
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def to_px(self, x: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
        left, top, right, bottom = self.box
        px = left + (np.asarray(x) - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * (right - left)
        py = bottom - (np.asarray(y) - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * (bottom - top)
        return list(zip(px.tolist(), np.clip(py, top, bottom).tolist()))

    def frame(self, label: str = "") -> None:
        left, top, right, bottom = self.box
        small = font(11)
        self.draw.rectangle(self.box, outline=(0, 0, 0))
        for x in nice_ticks(*self.xlim, count=6):
            (px, _), = self.to_px([x], [self.ylim[0]])
            self.draw.line([(px, bottom), (px, bottom + 3)], fill=(0, 0, 0))
            self.draw.text((px, bottom + 4), f"{x:g}", fill=(0, 0, 0), font=small, anchor="mt")
        for y in nice_ticks(*self.ylim, count=3):
            (_, py), = self.to_px([self.xlim[0]], [y])
            self.draw.line([(left - 3, py), (left, py)], fill=(0, 0, 0))
            if y == 0:
                self.draw.line([(left, py), (right, py)], fill=(225, 225, 225))
            self.draw.text((left - 5, py), f"{y:g}", fill=(0, 0, 0), font=small, anchor="rm")
        if label:
            self.draw.text((left + 4, top + 2), label, fill=(0, 0, 0), font=font(12))

    def plot(self, x: np.ndarray, y: np.ndarray, colour: tuple[int, int, int], width: int = 1) -> None:
        self.draw.line(self.to_px(x, y), fill=colour, width=width)


def frame_panels(canvas: Image.Image, at: tuple[int, int], rows: list[tuple[str, dict[str, Image.Image]]],
                 marks: np.ndarray, zoom: int) -> int:
    """Rows of labelled images; the picked cells circled and numbered on the first column."""
    draw = ImageDraw.Draw(canvas)
    x0, y = at
    for title, panels in rows:
        x = x0
        for i, (name, image) in enumerate(panels.items()):
            draw.text((x, y), f"{name}, {title}" if i == 0 else name, fill=(0, 0, 0), font=font(13))
            canvas.paste(image, (x, y + 18))
            if i == 0:
                for n, (cy, cx) in enumerate(marks, 1):
                    cx_, cy_ = x + (cx + 0.5) * zoom, y + 18 + (cy + 0.5) * zoom
                    r = 4.5 * zoom
                    draw.ellipse((cx_ - r, cy_ - r, cx_ + r, cy_ + r), outline=(255, 210, 0), width=2)
                    draw.text((cx_ + r + 1, cy_ - r), str(n), fill=(255, 210, 0), font=font(13))
            x += image.width + 8
        y += 18 + max(im.height for im in panels.values()) + 10
    return y


def dff(trace: np.ndarray, f0: float, offset: float) -> np.ndarray:
    return (trace - f0) / max(f0 - offset, 1e-9)


def zoom_window(trace: np.ndarray, length: int, before: int, span: int = 16) -> tuple[int, int]:
    """A window of ``length`` frames around the steepest rise of a trace: where a late or cut
    transient shows. The rise is taken over ``span`` frames of the trace smoothed over 5, so that a
    brief dip and its recovery (motion) do not count as one."""
    smooth = np.convolve(trace, np.ones(5) / 5, mode="same")
    half = span // 2
    rise = np.full_like(smooth, -np.inf)
    rise[half + 2:len(smooth) - half - 2] = smooth[span + 2:len(smooth) - 2] - smooth[2:len(smooth) - span - 2]
    start = int(np.clip(int(np.argmax(rise)) - before, 0, max(len(trace) - length, 0)))
    return start, min(start + length, len(trace))


def most_different(denoised: np.ndarray, mean: np.ndarray, edge: int = 3) -> int:
    """The frame where the denoised movie and the neighbour mean differ most (root mean square),
    less the first and last ``edge`` frames, where the neighbour mean has fewer frames."""
    rms = np.sqrt(((denoised - mean) ** 2).reshape(len(mean), -1).mean(axis=1))
    return int(np.argmax(rms[edge:len(rms) - edge]) + edge)


def render(movies: dict[str, np.ndarray], *, title: str, subtitle: str, offset: float, cells: int,
           out: Path, zoom: int = 2, zoom_frames: int = 60) -> dict:
    """The figure: frames (quiet, active) of every movie, then each picked cell's traces."""
    raw = movies["raw"]
    centres = pick_cells(raw, cells)
    footprints = discs(centres, raw.shape[1:])
    quiet, active = pick_frames(raw, footprints)
    apart = most_different(movies["denoised"], movies["neighbour mean"])
    mean_image = raw.mean(axis=0)
    lo = float(np.percentile(mean_image, 0.5))
    hi = float(np.percentile(np.stack([movies["neighbour mean"][quiet], movies["neighbour mean"][active]]), 99.7))
    reference = movies.get("truth", movies["neighbour mean"])
    ref_name = "truth" if "truth" in movies else "neighbour mean"
    span = float(np.percentile(np.abs(raw[active] - reference[active]), 99)) / 2

    rows = []
    shown = (("quiet", quiet), ("active", active), ("most unlike", apart))
    for name, t in shown:
        panels = {f"{m} (frame {t})" if m == "raw" else m: grey(movies[m][t], lo, hi, zoom) for m in movies}
        panels[f"denoised - {ref_name}"] = diverging(movies["denoised"][t] - reference[t], span, zoom)
        if ref_name == "truth":
            panels["neighbour mean - truth"] = diverging(movies["neighbour mean"][t] - reference[t], span, zoom)
        rows.append((name, panels))

    traces = {m: disc_traces(v, footprints) for m, v in movies.items()}
    panel_w = raw.shape[2] * zoom
    n_cols = len(rows[0][1])
    width = max(60 + n_cols * (panel_w + 8), 1300)
    full_w = int((width - 140) * 0.68)
    row_h = 150
    frames_h = len(rows) * (18 + raw.shape[1] * zoom + 10)
    height = 70 + frames_h + 40 + len(centres) * (row_h + 28) + 20
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((20, 10), title, fill=(0, 0, 0), font=font(17))
    draw.text((20, 34), subtitle, fill=(60, 60, 60), font=font(12))
    y = frame_panels(canvas, (20, 56), rows, centres, zoom)
    draw.text((20, y), f"grey: {lo:.0f} to {hi:.0f} (same for every image); differences: +-{span:.0f}, "
              "red = brighter than the reference, blue = darker; "
              "most unlike: the frame where denoised and neighbour mean differ most", fill=(60, 60, 60), font=font(12))
    y += 22
    x = 60
    for m in movies:  # legend
        draw.line([(x, y + 8), (x + 24, y + 8)], fill=COLOURS[m], width=3)
        draw.text((x + 30, y), m, fill=(0, 0, 0), font=font(13))
        x += 40 + int(draw.textlength(m, font=font(13)))
    draw.text((x + 20, y), "dF/F (about the neighbour mean's median) vs frame; Q, A, U: the frames above (quiet, "
              "active, most unlike); right: zoom on the cell's steepest rise", fill=(60, 60, 60), font=font(12))
    y += 26
    t_axis = np.arange(len(raw))
    zooms = []
    for n in range(len(centres)):
        f0 = float(np.median(traces["neighbour mean"][n]))
        curves = {m: dff(traces[m][n], f0, offset) for m in movies}
        # the y range from the curves that are not raw (raw noise would flatten the rest)
        calm = np.concatenate([c for m, c in curves.items() if m != "raw"])
        ylim = (float(min(calm.min(), -0.1)) - 0.05, float(calm.max()) * 1.15 + 0.05)
        full = Axes(draw, (60, y, 60 + full_w, y + row_h), (0, len(raw) - 1), ylim)
        start, stop = zoom_window(curves["neighbour mean"], zoom_frames, zoom_frames // 3)
        zooms.append((start, stop))
        part = Axes(draw, (60 + full_w + 40, y, width - 20, y + row_h), (start, stop - 1), ylim)
        for m, c in curves.items():
            full.plot(t_axis, c, COLOURS[m], 1)
            part.plot(t_axis[start:stop], c[start:stop], COLOURS[m], WIDTHS[m])
        full.frame(f"cell {n + 1} (y {centres[n][0]}, x {centres[n][1]})")
        part.frame(f"frames {start}-{stop - 1}")
        for name, t in shown:  # the frames shown above
            (px, _), = full.to_px([t], [ylim[1]])
            draw.polygon([(px - 4, y), (px + 4, y), (px, y + 6)], fill=(120, 120, 120))
            draw.text((px, y - 1), {"most unlike": "U"}.get(name, name[0].upper()), fill=(90, 90, 90),
                      font=font(11), anchor="mb")
        y += row_h + 28
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    return {"cells": centres.tolist(), "quiet": quiet, "active": active, "apart": apart, "grey": (lo, hi),
            "zooms": zooms, "footprints": footprints}


def half_rise(trace: np.ndarray, start: int, stop: int, base: float, top: float) -> float:
    """The first frame in [start, stop) where ``trace`` crosses halfway from ``base`` to ``top``,
    interpolated linearly between frames (NaN if it never does)."""
    half = base + 0.5 * (top - base)
    seg = trace[start:stop]
    above = np.flatnonzero(seg >= half)
    if len(above) == 0:
        return float("nan")
    i = int(above[0])
    if i == 0:
        return float(start)
    return start + i - 1 + float((half - seg[i - 1]) / (seg[i] - seg[i - 1]))


def rise_report(movies: dict[str, np.ndarray], footprints: np.ndarray, zooms: list[tuple[int, int]]) -> None:
    """Timing and height of each zoomed rise: when each trace crosses half of the rise (of the
    neighbour mean, or of the truth), and the height it reaches in the window.

    The whole-trace lag hides late rises when the transients last hundreds of frames: the long
    decays dominate the cross-correlation.
    """
    ref = "truth" if "truth" in movies else "neighbour mean"
    traces = {m: disc_traces(v, footprints) for m, v in movies.items() if m != "raw"}
    print(f"\nrises in the zooms: frame of the half-rise (of the {ref}'s rise), the height reached over "
          f"the {ref}'s, and the mean excess over the {ref} in the 13 frames before its half-rise, over its rise:")
    for n, (start, stop) in enumerate(zooms):
        r = traces[ref][n]
        base = float(r[start:start + 5].mean())
        top = float(np.convolve(r[start:stop], np.ones(3) / 3, mode="valid").max())
        cells = []
        ref_half = half_rise(r, start, stop, base, top)
        early = slice(max(int(ref_half) - 15, 0), max(int(ref_half) - 2, 0))  # the frames before the rise
        for m, tr in traces.items():
            t_half = half_rise(tr[n], start, stop, base, top)
            height = (float(np.convolve(tr[n][start:stop], np.ones(3) / 3, mode="valid").max()) - base) / (top - base)
            before = float(np.mean(tr[n][early] - r[early])) / (top - base) if early.stop > early.start else np.nan
            cells.append(f"{m} {t_half:.1f} ({height:.2f}, {before:+.2f} before)")
        print(f"  cell {n + 1}, frames {start}-{stop - 1}: " + ", ".join(cells))


def report(movies: dict[str, np.ndarray], footprints: np.ndarray, offset: float) -> None:
    """Per-cell trace scores (umvd_live.metrics) against the neighbour mean's trace, and the truth's.

    Not against the raw trace: a blind estimate of frame t holds none of frame t's noise but some
    of its neighbours', so its cross-correlation with the raw trace dips at lag 0 and its lag comes
    out wrong. The neighbour mean is blind and symmetric in time as well, so the noise it shares
    with the denoised trace does not shift the lag.
    """
    references = ["neighbour mean"] + (["truth"] if "truth" in movies else [])
    for ref in references:
        print(f"\nagainst the {ref} trace, per picked cell: corr / slope / peak ratio / lag (frames), then the mean:")
        for m, movie in movies.items():
            if m == ref or m == "raw":
                continue
            s = trace_scores(movie, movies[ref], footprints, offset=offset, min_dff=0.0)
            cells = "  ".join(f"{c:.2f}/{sl:.2f}/{p:.2f}/{lag:+.1f}" for c, sl, p, lag in
                              zip(s.correlation, s.slope, s.peak_ratio, s.lag_frames))
            mean = s.summary()
            print(f"  {m:15s} {cells}   mean {mean['trace_corr']:.3f}/{mean['trace_slope']:.2f}/"
                  f"{mean['peak_ratio']:.2f}/{mean['lag_frames']:+.2f}")


# ------------------------------------------------------------------------------------ commands


def denoised_movie(source: Path, given: Path | None, work: Path) -> tuple[np.ndarray, str]:
    if given is not None:
        return tifffile.imread(given).astype(np.float32), "denoised: umvd-live denoise at its defaults"
    output = work / f"{source.stem}_denoised.ome.tif"
    seconds = run_denoise(source, output)
    print(f"umvd-live denoise {source} {output}: {seconds:.1f} s")
    return tifffile.imread(output).astype(np.float32), "denoised: umvd-live denoise at its defaults"


LIVE_CROP = 256  # live: larger frames are drawn cropped to their central LIVE_CROP x LIVE_CROP


def run_live_bench(size: tuple[int, int], seed: int, work: Path) -> tuple[Path, dict]:
    """`umvd-live bench` at 30 Hz on a simulated movie of ``size``, its frames saved
    (``--save-outputs``); returns the saved frames' path and the bench's JSON figures."""
    saved, figures = work / "live.npz", work / "live.json"
    subprocess.run([sys.executable, "-m", "umvd_live", "bench", "--size", str(size[0]), str(size[1]),
                    "--seed", str(seed), "--oracle", "none", "--save-outputs", str(saved), "--json", str(figures)],
                   check=True)
    return saved, json.loads(figures.read_text())


def live_movies(saved: Path) -> tuple[dict[str, np.ndarray], float, int]:
    """The saved live run's movies (the first stream's), cropped to `LIVE_CROP`: raw, truth and
    what the preview showed (a skipped frame's place holds the last output shown; before the
    first, the neighbour mean), with the digitiser offset and how many frames were held."""
    with np.load(saved) as arrays:
        name = next(key[: -len(".raw")] for key in arrays.files if key.endswith(".raw"))
        raw, truth = arrays[f"{name}.raw"], arrays[f"{name}.truth"]
        shown, offset = arrays[f"{name}.denoised"].copy(), float(arrays[f"{name}.offset_adu"])
    h, w = raw.shape[1:]
    top, left = max(0, (h - LIVE_CROP) // 2), max(0, (w - LIVE_CROP) // 2)
    crop = (slice(None), slice(top, top + LIVE_CROP), slice(left, left + LIVE_CROP))
    raw, truth, shown = raw[crop].astype(np.float32), truth[crop].astype(np.float32), shown[crop]
    mean = neighbour_mean(raw)
    held = 0
    for t in range(len(shown)):
        if np.isnan(shown[t, 0, 0]):
            shown[t] = shown[t - 1] if t else mean[0]
            held += 1
    return {"raw": raw, "neighbour mean": mean, "denoised": shown, "truth": truth}, offset, held


def content_args(argv: list[str] | None) -> list[str]:
    """The command's arguments less those that do not change the picture (where files go, reuse)."""
    args, out, skip = list(sys.argv[1:] if argv is None else argv), [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--work", "--out", "--denoised"):
            skip = True
        elif not a.startswith(("--work=", "--out=", "--denoised=")):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("movie", choices=("real", "sim", "live"),
                   help="the real OptiNiSt movie, a simulated one (denoise), or a simulated live stream (bench)")
    p.add_argument("--input", type=Path, default=REAL_MOVIE, help="real: the movie (default: the OptiNiSt movie)")
    p.add_argument("--offset", type=float, default=REAL_OFFSET, help="real: the digitiser offset, for dF/F")
    p.add_argument("--denoised", type=Path, help="an output of `umvd-live denoise` of the same movie to reuse "
                                                  "(live: the --save-outputs .npz of an earlier run)")
    p.add_argument("--frames", type=int, default=600, help="sim: frames (default 600)")
    p.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"), help="sim: frame size")
    p.add_argument("--photons", type=float, default=2.0, help="sim: photons/pixel/frame (default 2)")
    p.add_argument("--seed", type=int, default=0, help="sim: seed (default 0)")
    p.add_argument("--sim", action="append", default=[], metavar="FIELD=VALUE",
                   help="sim: a simulator setting other than its default (a SimConfig field, or with "
                        "--simulator independent one of its TUNABLE), repeatable, as tools/bench_denoise.py "
                        "takes it: cell_radius_px=3, rate_hz=10, ...")
    p.add_argument("--simulator", choices=SIMULATORS, default="project",
                   help="sim: the project's simulator or tools/independent_sim.py's, as tools/bench_denoise.py")
    p.add_argument("--cells", type=int, default=5, help="cells whose traces are drawn (default 5)")
    p.add_argument("--work", type=Path, help="where the movies and denoised outputs go (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="the PNG (default docs/img/real_optinist.png or docs/img/sim_2photons.png)")
    args = p.parse_args(argv)
    if (args.sim or args.simulator != "project") and args.movie != "sim":
        p.error(f"--sim and --simulator set the simulated movie of `sim`; `{args.movie}` takes none")
    config_of(args, args.photons, args.seed)  # a bad --sim stops here, before the movie is read or made
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.movie == "real":
            raw = tifffile.imread(args.input).astype(np.float32)
            den, how = denoised_movie(args.input, args.denoised, work)
            movies = {"raw": raw, "neighbour mean": neighbour_mean(raw), "denoised": den}
            offset = args.offset
            title = f"Real two-photon movie: {args.input.name} ({raw.shape[0]} frames of {raw.shape[1]}x{raw.shape[2]})"
            out = args.out or ROOT / "docs" / "img" / "real_optinist.png"
        elif args.movie == "live":
            saved, figures = (args.denoised, None) if args.denoised else run_live_bench(args.size, args.seed, work)
            movies, offset, held = live_movies(saved)
            den = movies["denoised"]
            shape = movies["raw"].shape
            title = (f"Live stream: {shape[0]} frames of {args.size[0]}x{args.size[1]} at 30 Hz"
                     f"{f' (central {shape[1]}x{shape[2]} shown)' if shape[1:] != tuple(args.size) else ''}, "
                     f"2 photons/pixel/frame, seed {args.seed}")
            how = (f"denoised: what the live preview showed (umvd-live bench, training in the background; "
                   f"{held} skipped frames hold the last output)")
            if figures is not None:
                print(f"bench: {figures['fps_out']:.1f} fps out, {figures['skipped']} skipped, "
                      f"p99 {figures['latency_ms_p99']:.0f} ms")
            out = args.out or ROOT / "docs" / "img" / f"live_{args.size[0]}.png"
        else:
            movie = simulate(args, args.photons, args.seed)  # as tools/bench_denoise.py draws it: the same frames
            physics = " ".join(args.sim)
            tag = "" if args.simulator == "project" else f"_{args.simulator}"
            source = work / f"sim{tag}_p{args.photons:g}_s{args.seed}{''.join('_' + item for item in args.sim)}.tif"
            tifffile.imwrite(source, movie.noisy)
            den, how = denoised_movie(source, args.denoised, work)
            movies = {"raw": movie.noisy.astype(np.float32), "neighbour mean": neighbour_mean(movie.noisy),
                      "denoised": den, "truth": movie.truth}
            offset = movie.offset_adu
            title = (f"Simulated two-photon movie: {args.frames} frames of {args.size[0]}x{args.size[1]}, "
                     f"{args.photons:g} photons/pixel/frame, {args.simulator} simulator {physics or 'defaults'}, "
                     f"seed {args.seed}")
            out = args.out or ROOT / "docs" / "img" / f"sim_{args.photons:g}photons.png"
        if den.shape != movies["raw"].shape:
            raise SystemExit(f"the denoised movie is {den.shape}, the input {movies['raw'].shape}")
        subtitle = (f"{how}; neighbour mean: the 6 frames around each frame, the frame itself left out; "
                    f"made by: python tools/figure_real.py {' '.join(content_args(argv))}")
        info = render(movies, title=title, subtitle=subtitle, offset=offset, cells=args.cells, out=out)
    print(f"wrote {out}: cells (y, x) {info['cells']}, quiet frame {info['quiet']}, active frame "
          f"{info['active']}, most unlike the neighbour mean {info['apart']}, zooms {info['zooms']}, "
          f"grey {info['grey'][0]:.0f}-{info['grey'][1]:.0f}")
    report(movies, info["footprints"], offset)
    rise_report(movies, info["footprints"], info["zooms"])
    if args.movie == "sim":  # the whole movie, every cell of the simulator, as tools/bench_denoise.py scores it
        scorer = MovieScorer(movies["truth"], movie.footprints, offset=offset)
        print("\nthe whole movie, with the simulator's own footprints (umvd_live.metrics):")
        for m in ("raw", "neighbour mean", "denoised"):
            print(f"  {m:15s}", {k: round(v, 3) for k, v in scorer.score(movies[m]).items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
