"""Soak `umvd-live serve`: a long simulated session with producer restarts; memory and threads must stay flat.

Starts a daemon subprocess (ephemeral loopback ports, a temporary --state-dir) and the project's
own producer, ``umvd-live acquire sim``, at ``--rate`` Hz. Every ``--restart-every`` seconds the
producer is stopped, alternately killed (SIGKILL, a crash) and interrupted (SIGINT, a clean stop),
and started again, so its ``seq`` restarts from 0. Every ``--sample-every`` seconds it records the
daemon's RSS, threads, open files, CPU and status counters; a subscriber counts denoised frames.
At the end it shuts the daemon down and prints (and with --json writes) the figures: RSS at the
start and end of the second half and its slope, thread counts, frames in/out, restarts seen.

    python tools/soak.py --duration 1800 --size 64 64 --json soak.json

A benchmark, not a test: docs/reliability.md has the figures of a real run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from umvd_live.wire.control_client import ControlClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_daemon import Collector  # noqa: E402  (the same output subscriber)


def start_daemon(workdir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, dict[str, str]]:
    import re

    err = workdir / "daemon.err"
    cmd = [sys.executable, "-m", "umvd_live", "serve", "--input", "tcp://127.0.0.1:*",
           "--output", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
           "--output-dir", str(workdir / "out"), "--state-dir", str(workdir / "state"),
           "--checkpoint-interval", str(args.checkpoint_interval), "--preset", args.preset,
           "--device", args.device, "--status-interval", "30"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with open(workdir / "daemon.out", "w") as out, open(err, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=out, stderr=fh, env=env)
    deadline = time.monotonic() + 120
    while not (m := re.search(r"ready: input=(\S+) output=(\S+) control=(\S+)", err.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(err.read_text())
        time.sleep(0.1)
    return proc, dict(zip(("input", "output", "control"), m.groups()))


def start_producer(endpoint: str, args: argparse.Namespace, seed: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "umvd_live", "acquire", "sim", "--to", endpoint, "--rate",
           str(args.rate), "--size", str(args.size[0]), str(args.size[1]), "--frames", "100000000",
           "--seed", str(seed)]
    with open(log, "a") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                env=os.environ | {"OMP_NUM_THREADS": "1"})


def stop_producer(proc: subprocess.Popen, crash: bool) -> None:
    if crash:
        proc.kill()  # SIGKILL (TerminateProcess on Windows)
    else:
        proc.send_signal(signal.SIGINT)  # a clean stop: POSIX (Windows: CTRL_C_EVENT to a process group)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def request(endpoint: str, msg: dict, timeout_s: float = 30) -> dict:
    client = ControlClient(endpoint, timeout_s)
    try:
        return client.request(**msg)
    finally:
        client.close()


def soak(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="umvd-soak-") as tmp:
        workdir = Path(tmp)
        daemon, ep = start_daemon(workdir, args)
        ps = psutil.Process(daemon.pid)
        collector = Collector(ep["output"])
        samples: list[dict[str, Any]] = []
        restarts = 0
        producer = start_producer(ep["input"], args, seed=0, log=workdir / "producer.log")
        t0 = time.monotonic()
        next_restart = t0 + args.restart_every
        next_sample = t0
        ps.cpu_percent(None)
        try:
            while (now := time.monotonic()) - t0 < args.duration:
                if now >= next_restart:
                    stop_producer(producer, crash=restarts % 2 == 0)
                    restarts += 1
                    producer = start_producer(ep["input"], args, seed=restarts, log=workdir / "producer.log")
                    next_restart = now + args.restart_every
                if now >= next_sample:
                    st = request(ep["control"], {"cmd": "status"})
                    s = st["streams"].get("cam0", {})
                    sample = {
                        "t_s": round(now - t0, 1), "rss_mb": round(ps.memory_info().rss / 2**20, 1),
                        "threads": ps.num_threads(), "fds": ps.num_fds(),
                        "cpu_pct": ps.cpu_percent(None),
                        **{k: s.get(k) for k in ("frames_in", "frames_out", "skipped", "drops",
                                                 "seq_restarts", "model_step", "state", "fps_in", "changes")},
                        "p50_ms": (s.get("latency_ms") or {}).get("p50"),
                        "p99_ms": (s.get("latency_ms") or {}).get("p99"),
                    }
                    samples.append(sample)
                    print(json.dumps(sample), flush=True)
                    next_sample = now + args.sample_every
                time.sleep(0.2)
        finally:
            stop_producer(producer, crash=False)
            time.sleep(1.0)
            final = request(ep["control"], {"cmd": "status"})
            shutdown = request(ep["control"], {"cmd": "shutdown"}, timeout_s=120)
            exit_code = daemon.wait(timeout=120)
            collector.stop()
            log_text = (workdir / "daemon.err").read_text()
        half = [s for s in samples if s["t_s"] >= args.duration / 2] or samples
        t = np.array([s["t_s"] for s in half])
        rss = np.array([s["rss_mb"] for s in half])
        slope = float(np.polyfit(t, rss, 1)[0] * 3600) if len(half) > 2 else float("nan")
        s = final["streams"]["cam0"]
        return {
            "duration_s": args.duration, "rate_hz": args.rate, "size": list(args.size),
            "preset": args.preset, "device": args.device, "producer_restarts": restarts,
            "seq_restarts_seen": s["seq_restarts"], "frames_in": s["frames_in"],
            "frames_out": s["frames_out"], "skipped": s["skipped"], "drops": s["drops"],
            "denoised_received": len(collector.denoised.get("cam0", [])),
            "model_step": s["model_step"], "state": s["state"],
            # abrupt changes the engine saw: a restart with another seed is a new field (a true one)
            "changes": s.get("changes"), "last_change": s.get("last_change"),
            "rss_mb_first": samples[0]["rss_mb"], "rss_mb_second_half_start": float(rss[0]),
            "rss_mb_end": float(rss[-1]), "rss_mb_max": max(x["rss_mb"] for x in samples),
            "rss_slope_mb_per_h_second_half": round(slope, 2),
            "threads_min": min(x["threads"] for x in samples), "threads_max": max(x["threads"] for x in samples),
            "threads_end": samples[-1]["threads"], "fds_min": min(x["fds"] for x in samples),
            "fds_max": max(x["fds"] for x in samples),
            "p50_ms_median": float(np.median([x["p50_ms"] for x in samples if x["p50_ms"] is not None])),
            "p99_ms_max": max((x["p99_ms"] for x in samples if x["p99_ms"] is not None), default=None),
            "checkpoints": final.get("state_dir"), "shutdown": shutdown, "exit_code": exit_code,
            "errors_in_log": sum(" ERROR " in line for line in log_text.splitlines()),
            "samples": samples,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=1800.0, help="seconds (default 1800)")
    p.add_argument("--rate", type=float, default=30.0, help="frames per second (default 30)")
    p.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"))
    p.add_argument("--restart-every", type=float, default=180.0, help="producer restart period, s")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--checkpoint-interval", type=float, default=60.0)
    p.add_argument("--preset", default="lite")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", metavar="PATH", help="write the figures (with every sample) here")
    args = p.parse_args(argv)
    result = soak(args)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
