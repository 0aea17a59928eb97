"""Which threads of a running process take the CPU: each thread's share of a core over a few
seconds, named where py-spy can name it (Python threads); the others are native (a BLAS or
OpenMP pool, ZeroMQ's I/O threads). This found numpy's OpenBLAS thread spinning beside the
daemon's passes (docs/benchmarks.md, "One BLAS thread").

    umvd-live bench --size 512 512 --oracle none &
    sleep 25; python tools/thread_cpu.py $(pgrep -f "umvd-live bench") --seconds 15
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time

import psutil


def python_thread_names(pid: int) -> dict[int, str]:
    """Native thread id -> Python thread name, from ``py-spy dump`` (empty without py-spy)."""
    spy = shutil.which("py-spy")
    if spy is None:
        return {}
    out = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60).stdout
    names = {}
    for line in out.splitlines():
        if line.startswith("Thread ") and '"' in line:
            names[int(line.split()[1], 0)] = line.split('"')[1]
    return names


def thread_times(process: psutil.Process) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in process.threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pid", type=int)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    process = psutil.Process(args.pid)
    names = python_thread_names(args.pid)
    before, started = thread_times(process), time.monotonic()
    time.sleep(args.seconds)
    after, elapsed = thread_times(process), time.monotonic() - started
    shares = sorted(((after[t] - before.get(t, 0.0)) / elapsed, t) for t in after)
    for share, tid in reversed(shares):
        if share >= 0.005:
            print(f"{tid:>8}  {names.get(tid, '(native)'):24s} {100 * share:5.1f} % of a core")
    print(f"total {100 * sum(share for share, _ in shares):.1f} % of a core over {elapsed:.1f} s")


if __name__ == "__main__":
    main()
