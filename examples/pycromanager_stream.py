"""Stream a pycromanager acquisition, or the Micro-Manager GUI's own, into `umvd-live serve`.

owner: your pycromanager ``Acquisition`` gets ``image_saved_fn=owner.saved``; each image is
read back once Micro-Manager has saved it and published; the raw data path is left alone.
tap: follows whatever the GUI acquires (live mode, MDA) by peeking at the newest image.

    python examples/pycromanager_stream.py owner --frames 50 --save-dir /data/raw
    python examples/pycromanager_stream.py tap --seconds 30
    python examples/pycromanager_stream.py owner --frames 50 --config MMConfig.cfg   # no Java needed
"""

from __future__ import annotations

import argparse
import gc
import time

from pycromanager import Acquisition, multi_d_acquisition_events

from umvd_live.adapters import pycromanager_source as pm
from umvd_live.adapters.publisher import FramePublisher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("owner", "tap"))
    parser.add_argument("--to", default="tcp://127.0.0.1:5555", help="daemon input endpoint")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0, help="tap: how long")
    parser.add_argument("--save-dir", help="owner: where Micro-Manager saves the raw data")
    parser.add_argument("--config", help="owner: run pycromanager's Python engine on this config instead of Java")
    args = parser.parse_args()

    if args.config:
        pm.start_python_backend(args.config)
    core = pm.connect_core()  # retries with back-off, then a clear MicroManagerNotRunning
    publisher = FramePublisher(args.to, stream="cam0")
    if not publisher.wait_for_subscriber(10):
        raise SystemExit(f"no daemon subscribed at {args.to}")
    try:
        if args.mode == "owner":
            owner = pm.PycroManagerOwner(publisher).start()
            with Acquisition(directory=args.save_dir, name="umvd", image_saved_fn=owner.saved,
                             show_display=False) as acq:
                acq.acquire(multi_d_acquisition_events(num_time_points=args.frames))
            print(owner.close())
        else:
            tap = pm.TaggedImageTap(core, publisher).start()
            time.sleep(args.seconds)
            print(tap.stop())
    finally:
        publisher.close()
        if args.config:
            pm.stop_python_backend()


if __name__ == "__main__":
    main()
    # Free the core now: one left to the interpreter's final garbage collection can abort the
    # process at exit (pymmcore's registerCallback thread calls into a finalizing Python).
    gc.collect()
