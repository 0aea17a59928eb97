"""Recording throughput with one file per stream: many streams against one stream of the same pixels.

A multi-dimensional acquisition is recorded as one file per (position, channel, z) stream
(docs/recording.md). This measures what that costs the writer: the same frames, round-robin over
``--streams N`` streams (N files, 2N with ``--raw``), through a real `RecordingSession` into real
files, checkpointed every second as in the daemon.

* ``--rate 0`` (unpaced): every frame is submitted at once; the figure is how many frames per
  second the writer sustains until the last one is on disk and every file closed.
* ``--rate R``: R frames per second in all, so each of N streams runs at R/N Hz; the figures are
  how far the writer fell behind (``behind_s``, sampled at every submit) and how long after the
  last submit the recording was finished.

    python tools/bench_recording.py --size 256 256 --frames 1800 --streams 1 6 --rate 0 180 --raw

Configurations alternate, ``--repeats`` times, so that the machine's load hits them alike; the
table gives the median and every run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from umvd_live.recording.session import RecordingRequest, RecordingSession
from umvd_live.wire.protocol import FrameHeader


@dataclass(frozen=True)
class RecordingRun:
    """One recording of ``frames`` frames over ``streams`` streams."""

    streams: int
    rate: float  # frames per second in all; 0: unpaced
    files: int
    frames_written: int  # denoised and raw together
    mib_written: float
    seconds: float  # first submit to every file closed
    max_behind_s: float
    finished_after_last_submit_s: float
    spilled: int

    @property
    def frames_per_s(self) -> float:
        return self.frames_written / self.seconds

    @property
    def mib_per_s(self) -> float:
        return self.mib_written / self.seconds


def record(directory: Path, shape: tuple[int, int], frames: int, streams: int, rate: float,
           raw: bool, memory_budget_bytes: int, suffix: str = ".ome.tif") -> RecordingRun:
    """Submit ``frames`` frames round-robin over ``streams`` streams (acquisition meta as the
    multi-dimensional sources send it) and wait until they are on disk."""
    rng = np.random.default_rng(0)
    denoised = [rng.random(shape, dtype=np.float32) for _ in range(8)]
    camera = [rng.integers(0, 4096, shape, dtype=np.uint16) for _ in range(8)]
    session = RecordingSession(RecordingRequest(path=directory / f"bench{suffix}", raw=raw,
                                                memory_budget_bytes=memory_budget_bytes))
    names = [f"cam0.GCaMP.z{z}" if streams > 1 else "cam0" for z in range(streams)]
    interval = streams / rate if rate else 0.0  # one round (one frame per stream)
    max_behind = 0.0
    started = time.perf_counter()
    for i in range(frames):
        t, z = divmod(i, streams)
        if interval and z == 0:
            delay = started + t * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        meta = {"group": "cam0", "index": {"t": t, "z": z}, "channel": "GCaMP"}
        header = FrameHeader(seq=t, shape=shape, dtype="<u2", t=t * interval, meta=meta)
        if raw:
            session.submit_raw(names[z], header, camera[i % 8])
        session.submit_denoised(names[z], header, denoised[i % 8], state="live", model_step=t)
        if interval:
            max_behind = max(max_behind, session.status().behind_s)
    last_submit = time.perf_counter()
    session.stop(wait=True)
    done = time.perf_counter()
    st = session.status()
    if st.error:
        raise RuntimeError(st.error)
    mib = sum(f.stat().st_size for paths in st.files.values() for p in paths
              for f in ([Path(p)] if Path(p).is_file() else Path(p).rglob("*")) if f.is_file()) / 2**20
    return RecordingRun(streams=streams, rate=rate, files=sum(len(v) for v in st.files.values()),
                        frames_written=st.frames_written, mib_written=mib, seconds=done - started,
                        max_behind_s=max_behind, finished_after_last_submit_s=done - last_submit,
                        spilled=st.spilled_total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    ap.add_argument("--frames", type=int, default=1800, help="denoised frames per run, all streams together")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 6])
    ap.add_argument("--rate", type=float, nargs="+", default=[0.0, 180.0],
                    help="frames per second, all streams together; 0: unpaced")
    ap.add_argument("--raw", action="store_true", help="also record a raw uint16 copy of every frame")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-mib", type=int, default=2048,
                    help="the recorder's memory budget: above the run's bytes, nothing spills and "
                         "the figure is the file writer's alone (the daemon's default is 512)")
    ap.add_argument("--dir", type=Path, default=Path("."), help="where the files are written (then deleted)")
    ap.add_argument("--zarr", action="store_true", help="record OME-Zarr stores instead of OME-TIFF files")
    args = ap.parse_args()
    shape = tuple(args.size)

    runs: dict[tuple[float, int], list[RecordingRun]] = {}
    load_start = psutil.getloadavg()[0]
    for _ in range(args.repeats):
        for rate in args.rate:
            for streams in args.streams:
                directory = Path(tempfile.mkdtemp(prefix="bench-recording-", dir=args.dir))
                try:
                    run = record(directory, shape, args.frames, streams, rate, args.raw,
                                 args.memory_mib * 2**20, ".ome.zarr" if args.zarr else ".ome.tif")
                finally:
                    shutil.rmtree(directory, ignore_errors=True)
                runs.setdefault((rate, streams), []).append(run)

    print(f"{args.frames} frames of {shape[0]}x{shape[1]} float32"
          f"{' + their uint16 raw copies' if args.raw else ''} per run; {platform.machine()}, "
          f"{os.cpu_count()} cores, load {load_start:.1f} -> {psutil.getloadavg()[0]:.1f}\n")
    print("| rate (frames/s, all streams) | streams | files | written: frames/s | MiB/s | runs: frames/s "
          "| max behind (s) | finished after last submit (s) | spilled |")
    print("|---|---|---|---|---|---|---|---|---|")
    med = statistics.median
    for (rate, streams), rs in runs.items():
        # a paced run's frames/s is its pace: only the unpaced runs measure the writer
        speed = (f"{med(r.frames_per_s for r in rs):.0f} | {med(r.mib_per_s for r in rs):.0f} | "
                 + ", ".join(f"{r.frames_per_s:.0f}" for r in rs)) if not rate else "– | – | –"
        print(f"| {'unpaced' if not rate else f'{rate:g} ({rate / streams:g} per stream)'} | {streams} "
              f"| {rs[0].files} | {speed} | {f'{med(r.max_behind_s for r in rs):.2f}' if rate else '–'} "
              f"| {med(r.finished_after_last_submit_s for r in rs):.2f} | {max(r.spilled for r in rs)} |")
    print("\nwritten: denoised and raw frames, median and each run (unpaced: the writer's rate); "
          "behind: sampled at every submit (paced runs); behind and finished: medians")


if __name__ == "__main__":
    main()
