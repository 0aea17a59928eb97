"""Cost per frame of pycromanager owner mode, before (``image_process_fn``) and after
(``image_saved_fn``), on pycromanager's Python engine with a pure-Python camera saving NDTiff.

Modes: ``none`` (the acquisition alone), ``process`` (the former owner mode: publish inside
``image_process_fn`` and hand the image back into the saving path), ``saved`` (the owner mode
now: `PycroManagerOwner.saved` reads each image back once it is saved). Figures: wall time of
the acquisition per frame, and the time spent in our callback per frame (median, p99).

    python tools/bench_pycromanager_owner.py --frames 300 --size 512 512 --repeats 3

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

os.environ.setdefault("PYTEST_RUNNING", "1")  # pymmcore-plus: no log file

import numpy as np
import zmq
from umvd_live.adapters import pycromanager_source as pm
from umvd_live.adapters.publisher import FramePublisher


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
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--size", type=int, nargs=2, default=(512, 512))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    h, w = args.size
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "MMConfig.cfg"
        cfg.write_text("#py pyDevice,Cam,umvd_live.adapters.pycamera,NoisyPatternCamera\n"
                       f"#py Property,Core,Initialize,1\n#py Property,Cam,SensorHeight,{h}\n"
                       f"#py Property,Cam,SensorWidth,{w}\n#py Property,Core,Camera,Cam\n")
        core = pm.start_python_backend(cfg)
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
    print(f"{args.frames} frames of {h}x{w} uint16 per run, saved as NDTiff; {args.repeats} runs each\n")
    print("| owner mode | acquisition, ms/frame (median; runs) | our callback, ms/frame: median | p99 |")
    print("|---|---|---|---|")
    for mode in ("none", "process", "saved"):
        s = np.array(spent[mode]) * 1e3
        cb = f"{np.median(s):.3f} | {np.percentile(s, 99):.3f}" if len(s) else "– | –"
        print(f"| {mode} | {statistics.median(walls[mode]):.2f}; {', '.join(f'{x:.2f}' for x in walls[mode])} | {cb} |")


if __name__ == "__main__":
    main()
