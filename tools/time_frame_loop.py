"""Where the frame loop waits: `umvd-live bench` with each call of the loop's parts timed.

Wraps the router's `process`, the engine's `push_many`, `_finish` (D's passes), weight adoption
and segment starts, and the trainer's `ReplayBuffer.add`/`sample` and `OnlineTrainer.step` with
`time.perf_counter` and `time.thread_time`, runs `umvd-live bench` with the arguments given, then
prints each one's count, median, p99 and maximum in ms, and the CPU time of its own thread, median
and total (what the call computed, not what it waited for: docs/benchmarks.md, "Where the frame
loop waits", "The frame loop's own work at 512²").

    python tools/time_frame_loop.py --events default --oracle none
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from umvd_live.apps.cli import main
from umvd_live.daemon.router import Router
from umvd_live.engine.stream import StreamDenoiser
from umvd_live.engine.trainer import OnlineTrainer, ReplayBuffer

durations: dict[str, list[float]] = defaultdict(list)
cpu_times: dict[str, list[float]] = defaultdict(list)


def timed(cls: type, name: str, label: str) -> None:
    call: Callable[..., Any] = getattr(cls, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            return call(*args, **kwargs)
        finally:
            durations[label].append(1000 * (time.perf_counter() - started))
            cpu_times[label].append(1000 * (time.thread_time() - cpu_started))

    setattr(cls, name, wrapper)


for cls, name, label in [
    (Router, "process", "router.process"),
    (StreamDenoiser, "push_many", "push_many"),
    (StreamDenoiser, "_finish", "D passes (_finish)"),
    (StreamDenoiser, "_adopt_published_weights", "adopt weights"),
    (StreamDenoiser, "_begin_segment", "segment start"),
    (ReplayBuffer, "add", "replay add"),
    (ReplayBuffer, "sample", "replay sample"),
    (OnlineTrainer, "step", "training step"),
]:
    timed(cls, name, label)

if __name__ == "__main__":
    status = main(["bench", *sys.argv[1:]])
    for label, values in durations.items():
        ms = np.asarray(values)
        print(f"{label:20s} {ms.size:6d} calls  p50 {np.median(ms):7.2f}  p99 {np.percentile(ms, 99):7.2f}  "
              f"max {ms.max():7.2f} ms  CPU p50 {np.median(cpu_times[label]):7.2f} ms, "
              f"total {sum(cpu_times[label]) / 1000:6.1f} s")
    sys.exit(status)
