"""Cost per frame of pycromanager owner mode, before (``image_process_fn``) and after
(``image_saved_fn``), on pycromanager's Python engine with a pure-Python camera saving NDTiff.

Modes: ``none`` (the acquisition alone), ``process`` (the former owner mode: publish inside
``image_process_fn`` and hand the image back into the saving path), ``saved`` (the owner mode
now: `PycroManagerOwner.saved` reads each image back once it is saved). Figures: wall time of
the acquisition per frame, and the time spent in our callback per frame (median, p99). The modes
run interleaved (none, process, saved, none, ...), so a change of load hits all of them.

The camera hands out frames rendered before the runs (`ReplayCamera`): rendering a 512x512 frame
of `pycamera.NoisyPatternCamera` takes ~75 ms of CPU here, which would bury the fraction of a
millisecond under test. Under a minute on 2 cores with the defaults:

    flock /tmp/umvd-cpu.lock python tools/bench_pycromanager_owner.py --frames 500 --size 512 512 --repeats 5

On the Python engine nothing is serialised; with the Java GUI an ``image_process_fn`` also
carries every frame Java -> Python -> Java over ZeroMQ, which this cannot measure without
Micro-Manager (docs/adapters.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

os.environ.setdefault("PYTEST_RUNNING", "1")  # pymmcore-plus: no log file

import numpy as np
import psutil
import zmq

from umvd_live.adapters import pycromanager_source as pm
from umvd_live.adapters.publisher import FramePublisher
from umvd_live.adapters.pycamera import NoisyPatternCamera, render


class ReplayCamera(NoisyPatternCamera):
    """`NoisyPatternCamera`'s frames, rendered once: a snap is a copy (and the exposure's wait)."""

    frames: ClassVar[list[np.ndarray]] = []

    def snap(self, buffer: np.ndarray):
        start = time.perf_counter()
        n = self.frames_snapped
        buffer[:] = self.frames[n % len(self.frames)]
        self.frames_snapped += 1
        left = self._exposure_ms / 1000 - (time.perf_counter() - start)
        if left > 0:
            time.sleep(left)
        return {"PatternFrame": str(n)}


def sink() -> tuple[str, threading.Event]:
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.bind("tcp://127.0.0.1:*")
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    halt = threading.Event()

    def run() -> None:
        while not halt.is_set():
            if sock.poll(20):
                sock.recv_multipart()
        sock.close(linger=0)

    threading.Thread(target=run, daemon=True).start()
    return endpoint, halt


def run(mode: str, frames: int, directory: Path, endpoint: str) -> tuple[float, list[float]]:
    from pycromanager import Acquisition, multi_d_acquisition_events

    pub = FramePublisher(endpoint, "cam0")
    pub.wait_for_subscriber(5)
    owner = pm.PycroManagerOwner(pub, queue_size=frames).start()
    spent: list[float] = []

    def process(image, metadata):  # the owner mode before this change
        t = time.perf_counter()
        owner.publish(image, metadata)
        spent.append(time.perf_counter() - t)
        return image, metadata

    def saved(axes, dataset):
        t = time.perf_counter()
        owner.saved(axes, dataset)
        spent.append(time.perf_counter() - t)

    hooks = {"none": {}, "process": {"image_process_fn": process}, "saved": {"image_saved_fn": saved}}[mode]
    t0 = time.perf_counter()
    with Acquisition(directory=str(directory), name=mode, show_display=False, **hooks) as acq:
        acq.acquire(multi_d_acquisition_events(num_time_points=frames, time_interval_s=0))
    wall = time.perf_counter() - t0
    owner.close()
    pub.close()
    return wall, spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--size", type=int, nargs=2, default=(512, 512))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    h, w = args.size
    load = psutil.getloadavg()[0]  # portable (emulated on Windows)
    ReplayCamera.frames = [render(n, (h, w)) for n in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        core = pm.start_python_backend()
        camera = ReplayCamera()
        camera.sensor_height, camera.sensor_width = h, w
        core.loadPyDevice("Cam", camera)
        core.initializeDevice("Cam")
        core.setCameraDevice("Cam")
        core.setExposure(0.1)
        endpoint, halt = sink()
        walls: dict[str, list[float]] = {}
        spent: dict[str, list[float]] = {}
        try:
            for r in range(args.repeats):
                for mode in ("none", "process", "saved"):
                    wall, s = run(mode, args.frames, Path(tmp) / f"{mode}{r}", endpoint)
                    walls.setdefault(mode, []).append(wall / args.frames * 1e3)
                    spent.setdefault(mode, []).extend(s)
        finally:
            halt.set()
            pm.stop_python_backend()
    print(f"{args.frames} frames of {h}x{w} uint16 per run, saved as NDTiff; {args.repeats} runs each; "
          f"load average at start {load:.2f}\n")
    print("| owner mode | acquisition, ms/frame (median; runs) | our callback, ms/frame: median | p99 |")
    print("|---|---|---|---|")
    for mode in ("none", "process", "saved"):
        s = np.array(spent[mode]) * 1e3
        cb = f"{np.median(s):.3f} | {np.percentile(s, 99):.3f}" if len(s) else "– | –"
        print(f"| {mode} | {statistics.median(walls[mode]):.2f}; {', '.join(f'{x:.2f}' for x in walls[mode])} | {cb} |")


if __name__ == "__main__":
    main()
