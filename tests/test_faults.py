"""Faults around a real daemon subprocess: a producer that crashes and restarts, the daemon killed
and restarted with --state-dir (and a corrupt checkpoint, and a checkpoint write killed midway), a
long pause in the stream, a disk that fills up during a recording (RLIMIT_FSIZE on the daemon
process)."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_daemon import HALF, DaemonProcess, Subscriber, checkpoint_file, run_producer, step_counter_daemon

from umvd_live.adapters.publisher import FramePublisher

pytestmark = pytest.mark.timeout(240)


def wait_status(d: DaemonProcess, predicate, timeout_s: float = 60, stream: str = "cam0") -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        s = d.request({"cmd": "status"})["streams"].get(stream, {})
        if s and predicate(s):
            return s
        assert time.monotonic() < deadline, f"timed out; last status of {stream}: {s}"
        time.sleep(0.1)


@pytest.fixture
def daemons(tmp_path):
    started: list[DaemonProcess] = []

    def start(*extra: str, workdir: Path | None = None) -> DaemonProcess:
        work = workdir or tmp_path / f"d{len(started)}"
        work.mkdir(parents=True, exist_ok=True)
        started.append(DaemonProcess(work, *extra))
        return started[-1]

    yield start
    for d in started:
        d.kill()


def test_producer_crash_and_restart_with_seq_from_zero(daemons):
    d = daemons("--catchup-ms", "60000")
    sub = Subscriber(d.output)
    run_producer(d.input, [["cam0", 32, 32, "<u2"]] * 30, rate=60)  # a process that exits...
    wait_status(d, lambda s: s["frames_in"] == 30)
    run_producer(d.input, [["cam0", 32, 32, "<u2"]] * 30, rate=60)  # ...and a new one, seq from 0
    s = wait_status(d, lambda s: s["frames_in"] == 60)
    assert s["seq_restarts"] == 1 and s["drops"] == 0
    assert s["restarts"] == 0  # the same model goes on: no new warm start
    assert d.request({"cmd": "shutdown"})["ok"] and d.wait() == 0
    sub.wait_for("cam0", "denoised", 60, timeout_s=10)
    sub.stop()
    assert [m.header["seq"] for m in sub.denoised("cam0")] == list(range(30)) * 2
    assert "seq went back from 29 to 0 (producer restart?); going on" in d.log()


def test_kill_and_restart_resumes_from_the_state_dir(daemons, tmp_path):
    state = tmp_path / "state"
    ckpt = checkpoint_file(state, "cam0", "32x32")
    # --idle-s: a slow machine must not idle the stream before its warm start is trained;
    # --prior none: a warm start from scratch tells a resumed model from a fresh one by its state
    args = ("--state-dir", str(state), "--checkpoint-interval", "0.5", "--catchup-ms", "60000",
            "--idle-s", "600", "--prior", "none")
    first = daemons(*args)
    run_producer(first.input, [["cam0", 32, 32, "<u2"]] * 60, rate=0)
    wait_status(first, lambda s: s["frames_in"] == 60 and s["model_step"] >= 10)
    # The engine turns live at a push once the trained weights are adopted: a few more frames.
    pub = FramePublisher(first.input, "cam0")
    assert pub.wait_for_subscriber(20)
    rng = np.random.default_rng(1)
    deadline = time.monotonic() + 60
    while first.request({"cmd": "status"})["streams"]["cam0"]["state"] != "live":
        assert time.monotonic() < deadline, first.log()
        pub.publish(rng.poisson(20, (32, 32)).astype(np.uint16))
        time.sleep(0.1)
    pub.close()
    deadline = time.monotonic() + 30
    while not ckpt.is_file():  # the periodic checkpoint
        assert time.monotonic() < deadline, first.log()
        time.sleep(0.1)
    first.proc.send_signal(signal.SIGKILL)  # no clean shutdown
    first.wait()
    # Written, then renamed: a kill amid a periodic write leaves at most its temporary file
    # (once in a CI run), which the next start removes before any stream writes again.
    assert all(p.name.startswith(".cam0-") for p in state.rglob(".*"))

    second = daemons(*args)
    assert not list(state.rglob(".*"))
    sub = Subscriber(second.output)
    run_producer(second.input, [["cam0", 32, 32, "<u2"]] * 10 + [["cam1", 32, 32, "<u2"]] * 10, rate=0)
    s = wait_status(second, lambda s: s["frames_in"] == 10)
    assert s["resumed"] == 1 and s["started_from"] == str(ckpt) and s["state"] == "live"
    assert s["model_step"] >= 10
    cam1 = wait_status(second, lambda s: s["frames_in"] == 10, stream="cam1")
    assert cam1["resumed"] == 0 and cam1["state"] == "warmup"  # no checkpoint of its own
    sub.wait_for("cam0", "denoised", 10 - HALF)
    assert all(m.header["state"] == "live" for m in sub.denoised("cam0"))  # warm start skipped
    # A new frame shape is a new model: no checkpoint of that shape, so a warm start.
    run_producer(second.input, [["cam0", 24, 40, "<u2"]] * 5, rate=0)
    s = wait_status(second, lambda s: s["frames_in"] == 15)
    assert s["state"] == "warmup" and s["shape"] == [24, 40] and s["resumed"] == 1
    assert second.request({"cmd": "shutdown"})["ok"] and second.wait() == 0
    sub.stop()
    assert "resuming from checkpoint" in second.log()

    # A corrupt checkpoint (a truncated file) is refused with a clear message, moved aside, and
    # the stream starts fresh.
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    third = daemons(*args)
    run_producer(third.input, [["cam0", 32, 32, "<u2"]] * 10, rate=0)
    s = wait_status(third, lambda s: s["frames_in"] == 10)
    assert s["resumed"] == 0 and s["state"] == "warmup" and s["started_from"] is None
    assert "refusing checkpoint" in third.log() and "the stream starts fresh" in third.log()
    assert ckpt.with_name(ckpt.name + ".corrupt").is_file()
    status = third.request({"cmd": "status"})
    assert status["state_dir"]["refused"] == 1
    assert third.request({"cmd": "shutdown"})["ok"] and third.wait() == 0


def test_a_checkpoint_write_killed_midway_leaves_no_temporary_after_a_restart(tmp_path):
    """A process killed inside a checkpoint write (here: it dies in the fsync) leaves a full-size
    temporary beside the file, as one of an earlier version (a `tempfile.mkstemp` name) may be:
    the daemon's start removes them, and nothing else."""
    state = tmp_path / "state"
    target = checkpoint_file(state, "cam0")
    killed = ("import os, sys, torch\n"
              "from umvd_live.engine.checkpoint import save_checkpoint\n"
              "os.fsync = lambda fd: os._exit(9)\n"
              "save_checkpoint(sys.argv[1], {'w': torch.zeros(10000)}, {'step': 1})\n")
    assert subprocess.run([sys.executable, "-c", killed, str(target)]).returncode == 9
    (left,) = target.parent.glob(f".{target.name}.*")
    assert left.stat().st_size > 40000 and not target.exists()
    earlier = state / ".cam0.32x32.u2.pt.k2_9x0qa"
    kept = [state / "cam0.32x32.u2.pt.corrupt", state / ".notes.txt.k2_9x0qa", state / ".hidden", state / "m.pt"]
    for path in [earlier, *kept]:
        path.write_bytes(b"x")
    step_counter_daemon(tmp_path, state_dir=state).close()
    assert sorted(p for p in state.rglob("*") if p.is_file()) == sorted(kept)


def test_a_long_pause_idles_the_stream_then_it_resumes(daemons):
    d = daemons("--idle-s", "2", "--catchup-ms", "60000")
    run_producer(d.input, [["cam0", 32, 32, "<u2"]] * 60, rate=0)
    s = wait_status(d, lambda s: s["frames_out"] == 60 - HALF)
    if not s["idle"]:  # (a loaded machine may take longer than --idle-s to get here)
        assert s["latency_ms"]["count"] == 60 - HALF
    idle = wait_status(d, lambda s: s["idle"], timeout_s=30)
    assert idle["latency_ms"]["p50"] is None  # no stale figures while nothing flows
    time.sleep(0.5)  # a training step in flight when the pause began finishes
    step = d.request({"cmd": "status"})["streams"]["cam0"]["model_step"]
    time.sleep(1.0)
    still = d.request({"cmd": "status"})["streams"]["cam0"]
    assert still["model_step"] == step, "an idle stream must not keep training"
    assert still["state"] != "idle" and still["training_paused"] is False  # not the operator's pause

    run_producer(d.input, [["cam0", 32, 32, "<u2"]] * 30, rate=60)
    s = wait_status(d, lambda s: s["frames_in"] == 90 and s["frames_out"] == 90 - HALF)
    assert s["pauses"] == 1 and not s["idle"] and s["restarts"] == 0
    # The outputs owed since before the pause were published late; their wait is not a latency
    # figure of the resumed stream: only the 27 new frames' outputs are in the statistics.
    assert s["latency_ms"]["count"] == 30 - HALF
    wait_status(d, lambda s: s["model_step"] > step)  # training resumed
    assert "idle, training paused" in d.log() and "training resumed" in d.log()
    assert d.request({"cmd": "shutdown"})["ok"] and d.wait() == 0


def _small_file_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_during_recording_stops_it_but_not_the_live_output(tmp_path):
    import tifffile

    d = DaemonProcess(tmp_path, "--catchup-ms", "60000", preexec_fn=_small_file_limit(600_000))
    try:
        sub = Subscriber(d.output)
        assert d.request({"cmd": "record_start", "path": "rec.ome.tif", "raw": True})["ok"]
        n = 150  # 150 x (16 KiB denoised + 8 KiB raw) = 3.6 MB, far over the 600 kB limit
        run_producer(d.input, [["cam0", 64, 64, "<u2"]] * n, rate=100)
        wait_status(d, lambda s: s["frames_in"] == n and s["frames_out"] == n - HALF)
        rec = d.request({"cmd": "status"})["recording"]
        assert rec["error"] and "File too large" in rec["error"] and "EFBIG" in rec["error"]
        assert rec["recording"] is False and rec["frames_written"] < n
        assert "recording failed, live output goes on" in d.log()
        sub.wait_for("cam0", "denoised", n - HALF)
        assert [m.header["seq"] for m in sub.denoised("cam0")] == list(range(n - HALF))
        assert d.request({"cmd": "record_stop"})["ok"]
        assert d.request({"cmd": "shutdown"})["ok"] and d.wait() == 0
        sub.stop()
        # What was written before the disk filled stays readable, and the OME metadata declares
        # all of it, so a plain tifffile/Fiji read sees every linked frame.
        with tifffile.TiffFile(d.model_dir / "rec_cam0.ome.tif") as tif:
            pages = [page.asarray() for page in tif.pages]
        assert 0 < len(pages) < n and all(p.shape == (64, 64) for p in pages)
        movie = tifffile.imread(d.model_dir / "rec_cam0.ome.tif")
        assert movie.shape == (len(pages), 64, 64)
    finally:
        d.kill()
