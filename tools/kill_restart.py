"""Kill -9 the daemon mid-stream and restart it with the same --state-dir: does the stream resume live?

1. A daemon with ``--state-dir`` and ``--checkpoint-interval`` S takes ``umvd-live acquire sim``
   at 30 Hz until the stream is live and a checkpoint has been written.
2. The daemon is killed with SIGKILL (no clean shutdown), restarted with the same state
   directory, and the producer started again (seq from 0).
3. Figures: frames and seconds until the first live output, before and after the restart.

    python tools/kill_restart.py --size 64 64 --json kill_restart.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from umvd_live.daemon.statestore import checkpoint_stem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import request, start_daemon, start_producer, stop_producer  # noqa: E402


def first_live(endpoint: str, timeout_s: float) -> tuple[dict[str, Any], float]:
    """Poll status until cam0 is live; return its status and the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        s = request(endpoint, {"cmd": "status"})["streams"].get("cam0")
        if s and s["state"] == "live":
            return s, time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError("the stream never went live")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, default=(64, 64))
    p.add_argument("--rate", type=float, default=30.0)
    p.add_argument("--checkpoint-interval", type=float, default=5.0)
    p.add_argument("--preset", default="lite")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json")
    args = p.parse_args(argv)
    out: dict[str, Any] = {"size": list(args.size), "rate_hz": args.rate, "preset": args.preset,
                           "checkpoint_interval_s": args.checkpoint_interval}
    with tempfile.TemporaryDirectory(prefix="umvd-kill-") as tmp:
        work = Path(tmp)
        state = work / "state"
        ckpt = state / "checkpoints" / f"{checkpoint_stem('cam0')}.{args.size[0]}x{args.size[1]}.u2.pt"
        daemon, ep = start_daemon(work, args)
        producer = start_producer(ep["input"], args, seed=0, log=work / "producer.log")
        s, took = first_live(ep["control"], 900)
        out["before"] = {"frames_until_live": s["frames_in"], "seconds_until_live": round(took, 1),
                         "model_step_at_live": s["model_step"]}
        while not ckpt.is_file():
            time.sleep(0.1)
        saved_step = request(ep["control"], {"cmd": "status"})["streams"]["cam0"]["model_step"]
        time.sleep(1.0)
        daemon.kill()  # SIGKILL (TerminateProcess on Windows)
        daemon.wait()
        stop_producer(producer, crash=True)
        out["killed_at_model_step"] = saved_step
        out["checkpoint_files"] = sorted(x.name for x in state.iterdir())

        (work / "daemon.err").rename(work / "daemon1.err")
        daemon, ep = start_daemon(work, args)
        producer = start_producer(ep["input"], args, seed=1, log=work / "producer.log")
        s, took = first_live(ep["control"], 300)
        out["after"] = {"frames_until_live": s["frames_in"], "seconds_until_live": round(took, 1),
                        "model_step_at_live": s["model_step"], "resumed": s["resumed"],
                        "started_from": Path(s["started_from"]).name if s["started_from"] else None}
        stop_producer(producer, crash=False)
        out["shutdown"] = request(ep["control"], {"cmd": "shutdown"}, timeout_s=120)
        out["exit_code"] = daemon.wait(timeout=120)
        out["log_lines"] = [line.split(": ", 1)[-1] for line in (work / "daemon.err").read_text().splitlines()
                            if "checkpoint" in line or "new denoiser" in line]
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
