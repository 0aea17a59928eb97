"""`umvd-live demo`: the quality bookkeeping on synthetic frames, and short real demos in a
subprocess (the daemon, the simulator and the subscriber all really started, on ephemeral ports)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from command_line import run_umvd_live

from umvd_live.apps.cli import main
from umvd_live.apps.demo import QualityTracker, StopSignals
from umvd_live.metrics import psnr, temporal_mean

#: A small, quick session: 64x64 frames and a short warm start, one torch thread per process.
SMALL = ["--size", "64", "64", "--preset", "lite", "--device", "cpu",
         "--warmup-frames", "60", "--warmup-steps", "30"]
DURATION_S = 20
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "250"}  # no wrapping


def _movie(frames: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16]
    clean = np.stack([100 + 50 * np.sin(xx / 3 + t / 4) * np.cos(yy / 5) for t in range(frames)]).astype(np.float32)
    noisy = rng.poisson(clean).astype(np.uint16)
    return noisy, clean


def test_quality_tracker_scores_live_outputs_against_the_truth_of_their_seq() -> None:
    noisy, clean = _movie()
    tracker = QualityTracker()
    for seq in range(len(noisy)):
        tracker.add_truth(seq, noisy[seq], clean[seq])
    rng = np.random.default_rng(1)
    estimates = {}
    for seq in range(3, 15):  # outputs in seq order; 0-2 never come (skipped), 3-6 are warm-up
        estimates[seq] = clean[seq] + rng.normal(0, 2, clean[seq].shape).astype(np.float32)
        tracker.add_output(seq, estimates[seq], "warmup" if seq < 7 else "live")
    tracker.finish()

    live = range(7, 15)
    means = tracker.live_means()
    assert means["frames"] == len(live)
    assert tracker.warmup_outputs == 4 and tracker.unscored == 0
    assert means["denoised_db"] == pytest.approx(np.mean([psnr(estimates[s], clean[s]) for s in live]), abs=0.006)
    assert means["raw_db"] == pytest.approx(np.mean([psnr(noisy[s], clean[s]) for s in live]), abs=0.006)
    tmean = temporal_mean(noisy, 5)  # interior frames: the same 5-frame centred mean
    assert means["tmean_db"] == pytest.approx(np.mean([psnr(tmean[s], clean[s]) for s in live]), abs=0.006)
    assert means["denoised_db"] > means["raw_db"]
    # A truth is kept only until its output has come: memory stays bounded on long sessions.
    assert sorted(tracker.truth) == list(range(15, 20))
    # The activity metrics' frames: every input and output, by seq, whatever the output's state.
    assert sorted(tracker.frames.inputs) == list(range(20)) and sorted(tracker.frames.outputs) == list(range(3, 15))
    assert tracker.frames.first_seq("live") == 7
    bounded = QualityTracker(keep_frames=6)
    for seq in range(len(noisy)):
        bounded.add_truth(seq, noisy[seq], clean[seq])
    bounded.ingest()
    assert sorted(bounded.frames.inputs) == list(range(14, 20))


@pytest.mark.parametrize("flags, message", [
    (["--size", "4", "4"], "at least 8x8"),
    (["--rate", "0"], "--rate must be a finite number > 0, got 0"),
    (["--rate", "inf"], "--rate must be a finite number > 0, got inf"),
    (["--photons", "inf"], "--photons must be a finite number > 0, got inf"),
    (["--photons", "nan"], "--photons must be a finite number > 0"),
    (["--duration", "0"], "--duration must be a finite number > 0"),
    (["--duration", "inf"], "--duration must be a finite number > 0"),
    (["--seed", "-1"], "--seed must be in 0..2**63-1, got -1"),
    (["--seed", str(2**63)], "--seed must be in 0..2**63-1"),
    (["--window", "103"], "--window must be odd, from 3 to 101, got 103"),
])
def test_bad_arguments_are_refused_before_anything_starts(capsys: pytest.CaptureFixture[str], flags: list[str],
                                                          message: str) -> None:
    assert main(["demo", *flags]) == 2
    assert message in capsys.readouterr().err


def test_the_demo_checks_the_engine_s_own_bounds() -> None:
    """The demo checks --window and --seed before the daemon starts, with the engine's own bounds
    (one definition, `engine.config`'s: a copy drifted unnoticed)."""
    from umvd_live.apps import demo
    from umvd_live.engine import config

    assert demo.MAX_WINDOW is config.MAX_WINDOW and demo.MAX_SEED is config.MAX_SEED


def test_demo_summary_shows_denoising_beats_raw(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    proc = run_umvd_live("demo", "--duration", DURATION_S, *SMALL, "--json", out, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads(out.read_text())
    figures = json.dumps(s)  # shown with any failure below
    assert s["ended_by"] == f"--duration {DURATION_S} s"
    # Every frame sent is accounted for: received, or a preview the daemon skipped to keep up (on
    # a loaded machine it skips more: a share received would be a timing, not a contract).
    assert s["frames_received"] > 0 and s["frames_unaccounted"] == 0, figures
    assert s["live_frames_scored"] >= 30, figures
    assert s["psnr_denoised_db"] > s["psnr_raw_db"] + 1.0, figures
    assert s["training_steps"] >= 30 and s["warmup_is_serve_default"] is False, figures
    assert s["latency_p50_ms"] is not None and s["live_after_s"] is not None, figures
    # The printed summary and the hint, and no daemon left behind.
    assert "umvd-live view --connect tcp://127.0.0.1:" in proc.stdout
    assert re.search(rf"PSNR raw\s+│\s+{s['psnr_raw_db']:.2f} dB", proc.stdout), proc.stdout
    assert re.search(rf"PSNR denoised\s+│\s+{s['psnr_denoised_db']:.2f} dB", proc.stdout), proc.stdout
    # The activity (issue 14), scored after the stream beside the oracle Gaussians, as bench does.
    a = s["activity"]
    assert a is not None and s["activity_skipped"] is None, figures
    assert a["span"][0] == s["first_live_seq"] and a["frames"] >= 30, figures
    assert set(a["rows"]) == {"raw", "temporal mean, 5 frames", "denoised"}
    assert set(a["oracle"]["best"]) <= {"psnr", "active_psnr", "trace_corr"} and a["oracle"]["grid"] == "reduced"
    assert a["rows"]["denoised"]["psnr"] > a["rows"]["raw"]["psnr"], figures
    assert "activity against the truth" in proc.stdout and "amplitude slope" in proc.stdout
    assert set(a["rows"]["denoised"]["by_kind"]) <= {"soma", "punctum", "process"}
    assert "per kind of source" in proc.stdout
    assert not psutil.pid_exists(s["daemon_pid"])


def test_ctrl_c_ends_the_demo_cleanly_with_its_summary(tmp_path: Path) -> None:
    """A terminal's Ctrl-C signals the whole foreground process group: the demo shuts the daemon
    down in order and still prints its summary."""
    out = tmp_path / "summary.json"
    proc = subprocess.Popen([sys.executable, "-m", "umvd_live", "demo", "--duration", "120", *SMALL,
                             "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("umvd-live demo ·") and "received 0 " not in line or not line:
                break  # the first status line with denoised frames in it
        assert any(" received " in line for line in lines), "".join(lines)
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    s = json.loads(out.read_text())
    assert s["ended_by"] == "Ctrl-C" and s["duration_s"] < 60
    # Nothing lost in the shutdown: every frame sent was denoised and received, or its preview
    # was skipped by a daemon that fell behind (counted).
    assert s["frames_sent"] > 0 and s["frames_received"] > 0 and s["frames_unaccounted"] == 0
    assert "summary (Ctrl-C)" in rest
    assert not psutil.pid_exists(s["daemon_pid"])


class _SignalsInDel:
    """Sends the process SIGINT from inside its finaliser, as a terminal's Ctrl-C can land while
    the main thread runs one, and stays in the finaliser until the signal's Python-level handler
    has run there (``landed``; a handler that raises ends the wait too), however late the signal
    is delivered on a loaded machine."""

    def __init__(self, landed=lambda: False):
        self.landed = landed

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 10
        while not self.landed() and time.monotonic() < deadline:  # the handler runs here, inside __del__
            time.sleep(0.001)


def test_ctrl_c_landing_in_a_finaliser_still_ends_the_stream(monkeypatch) -> None:
    """The handler that raised KeyboardInterrupt lost it there (Python prints and drops exceptions
    from __del__), and the demo streamed on; StopSignals notes the signal instead."""
    # Python's own handler to start from, whatever an earlier test of this process left installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopSignals() as stop:
            _SignalsInDel(lambda: stop.received is not None)  # dropped at once: its finaliser runs now
            assert stop.received == signal.SIGINT
        # The old way, for contrast: the interrupt goes to sys.unraisablehook, which prints and drops it.
        dropped: list = []
        monkeypatch.setattr(sys, "unraisablehook", dropped.append)
        _SignalsInDel()
        assert [type(d.exc_value) for d in dropped] == [KeyboardInterrupt]
        # Outside the block Ctrl-C interrupts again.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_quality_tracker_scores_adapting_outputs_as_past_the_warm_start() -> None:
    """An "adapting" output (after a detected change) is the network's own, not warm-up: scored."""
    noisy, clean = _movie(frames=10)
    tracker = QualityTracker()
    for seq in range(len(noisy)):
        tracker.add_truth(seq, noisy[seq], clean[seq])
    for seq in range(len(noisy)):
        tracker.add_output(seq, clean[seq] + 1.0, "warmup" if seq < 3 else "adapting" if seq < 6 else "live")
    assert tracker.warmup_outputs == 3
    assert tracker.live_means()["frames"] == 7


def test_json_folder_is_made_or_refused_before_the_session(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json into a missing folder: made up front; one that cannot be made: a one-line refusal, not
    a traceback after the whole session."""
    from umvd_live.apps.cli import build_parser, demo_config

    config = demo_config(build_parser().parse_args(["demo", "--json", str(tmp_path / "new" / "d.json")]))
    assert config.json_path is not None and config.json_path.parent.is_dir()
    (tmp_path / "file").write_text("")
    assert main(["demo", "--json", str(tmp_path / "file" / "d.json")]) == 2
    assert "--json: cannot create the folder" in capsys.readouterr().err
    assert main(["demo", "--json", str(tmp_path / "new")]) == 2  # a folder, not a file: refused too
    assert f"--json: {tmp_path / 'new'} is a folder" in capsys.readouterr().err


def test_outputs_after_the_stream_ended_do_not_count_as_while_streaming(monkeypatch) -> None:
    """fps_out and the latency figures are over the outputs received while streaming: those taken
    once the acquisition has stopped (the catch-up wait, the final flush) are left out."""
    import contextlib
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from umvd_live.apps import demo

    waiting: list[list[bytes]] = []
    collector = demo.OutputCollector("tcp://127.0.0.1:9", QualityTracker())
    collector.subscriber.close()

    def receive(timeout_s: float):
        yield from list(waiting)
        waiting.clear()

    def output(seq: int) -> None:
        waiting.append([str(seq).encode()])

    collector.subscriber = SimpleNamespace(receive=receive, decode=lambda parts: SimpleNamespace(
        header={"seq": int(parts[0]), "state": "live", "latency_ms": 5.0}, image=np.zeros((4, 4))))

    class Sim:
        started_at, error, sent, result = time.monotonic() - 1.0, None, 2, None

        def is_alive(self) -> bool:
            return True

        def stop(self) -> None:
            output(1)  # published before the stream ended, taken after

    monkeypatch.setattr(demo, "DemoDisplay", lambda console: contextlib.nullcontext(
        SimpleNamespace(due=lambda: False)))
    daemon = SimpleNamespace(proc=SimpleNamespace(poll=lambda: None), status=lambda: {"streams": {}})
    config = demo.DemoConfig(duration_s=0.5, height=64, width=64)
    output(0)
    demo._stream(config, Console(file=io.StringIO()), daemon, collector, collector.tracker, Sim())
    output(2)  # after the stream ended: what the catch-up wait and the flush take
    collector.pump(0.0)
    assert collector.figures.received == 3
    assert collector.figures.received_streaming == 2 and len(collector.figures.latencies_ms) == 2


def test_a_normal_run_s_summary_has_the_engine_s_preset_device_and_training_rate(tmp_path: Path) -> None:
    """The stream's end message closes its engine, so a status taken after it has no engine figures:
    the summary printed "preset - on -" and "—" steps/s (JSON nulls) whenever the simulation ended
    normally. They are the figures of the last status taken while the stream ran. With ``--oracle
    none`` the activity table says nothing about oracle Gaussians."""
    out = tmp_path / "summary.json"
    proc = run_umvd_live("demo", "--duration", "6", *SMALL, "--oracle", "none", "--json", out, timeout=120,
                         env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads(out.read_text())
    figures = json.dumps(s)
    assert s["ended_by"] == "--duration 6 s", figures
    assert (s["preset"], s["device"]) == ("lite", "cpu"), figures
    assert s["training_steps_per_s"] is not None and s["training_steps_per_s"] > 0, figures
    assert "preset lite on cpu" in proc.stdout, proc.stdout
    assert re.search(rf"training steps\s+│\s+{s['training_steps']}\s+│\s+{s['training_steps_per_s']:.1f} steps/s",
                     proc.stdout), proc.stdout
    assert "oracle" not in proc.stdout.lower(), proc.stdout
    assert not psutil.pid_exists(s["daemon_pid"])
