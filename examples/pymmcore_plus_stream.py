"""Stream your own pymmcore-plus acquisition into `umvd-live serve`.

Your script keeps full control of the core and the MDA; `MMCoreSource` only listens to
``core.mda.events.frameReady`` and hands each frame to a bounded queue, so the acquisition never
waits for the network. Run the daemon first (`umvd-live serve`), then e.g.:

    python examples/pymmcore_plus_stream.py MMConfig.cfg --frames 100
    python examples/pymmcore_plus_stream.py MMConfig.cfg --live --seconds 5
"""

from __future__ import annotations

import argparse
import gc
import time

from useq import MDASequence

from umvd_live.adapters.mmcore import LiveTap, MMCoreSource, load_core, shutter_workaround
from umvd_live.adapters.publisher import FramePublisher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="Micro-Manager configuration file (C++ and/or #py devices)")
    parser.add_argument("--to", default="tcp://127.0.0.1:5555", help="daemon input endpoint")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--interval-ms", type=float, default=0.0)
    parser.add_argument("--live", action="store_true", help="tap live mode instead of running an MDA")
    parser.add_argument("--seconds", type=float, default=5.0, help="--live: how long")
    args = parser.parse_args()

    core = load_core(args.config)  # or your own CMMCorePlus / UniMMCore, configured as you like
    publisher = FramePublisher(args.to, stream="cam0")
    if not publisher.wait_for_subscriber(10):
        raise SystemExit(f"no daemon subscribed at {args.to}")

    if args.live:
        tap = LiveTap(core, publisher).start()  # peeks at the newest image, never pops the buffer
        core.startContinuousSequenceAcquisition(0)
        time.sleep(args.seconds)
        core.stopSequenceAcquisition()
        print(tap.stop())
    else:
        source = MMCoreSource(core, publisher).attach()  # connects to core.mda.events.frameReady
        sequence = MDASequence(time_plan={"interval": args.interval_ms / 1000, "loops": args.frames})
        with shutter_workaround(core):  # pymmcore-plus 0.18.1, no shutter loaded
            core.mda.run(sequence)  # blocking; core.run_mda(sequence) runs it in a thread
        print(source.detach())  # sends what is still queued, then the counts
    publisher.close()


if __name__ == "__main__":
    main()
    # Free the core now: one left to the interpreter's final garbage collection can abort the
    # process at exit (pymmcore's registerCallback thread calls into a finalizing Python).
    gc.collect()
