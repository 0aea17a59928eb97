#!/usr/bin/env python
"""Memory soak: stream a simulated session through the daemon for minutes and watch its RSS.

Why: a live session runs for hours; memory that creeps up per frame (a cache that never drops old
frames, a growing list of figures) only shows over thousands of frames. This runs `umvd-live bench`
(the daemon itself, paced at --rate, training in the background) for --minutes and reports the
resident memory at the start of the stream, half-way and at the end, plus the growth over the
second half and its trend in MB per minute (least squares over those samples). The warm start
and the minutes after it legitimately fill the replay buffer and the allocator's pools, so
growth is judged over the second half of the run (or after the warm start, if that is later).
The pre-generated frames (`--ring-mb`) are allocated before the stream starts and are in every
sample.

Exit status: 0 when the growth over the second half is within --max-growth-mb, 1 when it is not,
2 on bad arguments.

Example: python tools/soak_memory.py --minutes 10 --size 256 256 --rate 30 --json /tmp/soak.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from umvd_live.apps import bench, cli
from umvd_live.daemon.runtime import tune_process

#: RSS samples whose median stands for "after the warm start" and for "the end".
SAMPLES_COMPARED = 3


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(256, 256))
    p.add_argument("--rate", type=float, default=30.0, metavar="HZ")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS samples (default 10)")
    p.add_argument("--max-growth-mb", type=float, default=50.0,
                   help="RSS growth over the second half that still counts as flat (default 50)")
    p.add_argument("--json", metavar="PATH", help="write the bench figures plus the soak summary")
    return p.parse_known_args(argv)  # anything else goes to `umvd-live bench` (--preset, --device, ...)


def summarize(result: dict, max_growth_mb: float) -> dict:
    """RSS at start, after the warm start and at the end; growth and trend after the warm start."""
    timeline = np.asarray(result["rss_mb_timeline"], dtype=np.float64).reshape(-1, 2)
    rss = result["rss_mb"]
    # Judged over the second half: the replay buffer fills after the warm start (600 frames) and
    # the allocator's high-water mark settles over the first minutes, while a leak grows with
    # every frame, so it shows in the second half too.
    settled_at = max(result["warmup_s"] or 0.0, (result["duration_s"] or 0.0) / 2)
    after = timeline[timeline[:, 0] >= settled_at, 1].tolist()
    # RSS wobbles by tens of MB as the allocator takes and returns memory: compare the medians of
    # the first and the last few samples after settling rather than two single readings.
    first = after[:SAMPLES_COMPARED]
    last = after[-SAMPLES_COMPARED:] + [rss["end"]]
    baseline = float(np.median(first)) if first else rss["start"]
    end = float(np.median(last))
    growth = end - baseline
    times = timeline[timeline[:, 0] >= settled_at, 0]
    trend = float(np.polyfit(times / 60.0, after, 1)[0]) if len(after) >= 3 else None
    return {
        "rss_mb_start": rss["start"], "rss_mb_after_warmup": rss["live"], "rss_mb_settled": baseline,
        "rss_mb_end": end, "rss_mb_max": float(timeline[:, 1].max()) if len(timeline) else None,
        "growth_mb": growth, "trend_mb_per_min": trend, "settled_at_s": settled_at,
        "samples": len(timeline), "max_growth_mb": max_growth_mb, "flat": bool(growth <= max_growth_mb),
    }


def main(argv: list[str] | None = None) -> int:
    opts, rest = parse(argv)
    if opts.minutes <= 0 or opts.rate <= 0 or opts.sample_s <= 0:
        print("soak_memory: --minutes, --rate and --sample-s must be > 0", file=sys.stderr)
        return 2
    frames = max(1, round(opts.minutes * 60 * opts.rate))
    args = cli.build_parser().parse_args(
        ["bench", "--size", *map(str, opts.size), "--rate", str(opts.rate), "--frames", str(frames),
         "--rss-every", str(opts.sample_s), *rest])
    tune_process(bench.__name__)  # as `umvd-live bench` does
    try:
        result = bench.measure(cli.bench_config(args))
    except ValueError as exc:
        print(f"soak_memory: {exc}", file=sys.stderr)
        return 2
    bench.print_table(result)
    soak = summarize(result, opts.max_growth_mb)
    print(f"RSS start {soak['rss_mb_start']:.0f} MB, after the warm start {soak['rss_mb_after_warmup'] or 0:.0f} MB, "
          f"max {soak['rss_mb_max']:.0f} MB; at {soak['settled_at_s']:.0f} s {soak['rss_mb_settled']:.0f} MB, "
          f"end {soak['rss_mb_end']:.0f} MB: growth {soak['growth_mb']:+.1f} MB"
          + (f", trend {soak['trend_mb_per_min']:+.2f} MB/min" if soak["trend_mb_per_min"] is not None else "")
          + f" over {result['duration_s']:.0f} s -> {'flat' if soak['flat'] else 'GROWING'}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(result | {"soak": soak}, indent=2, default=str) + "\n")
    return 0 if soak["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
