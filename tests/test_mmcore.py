"""pymmcore-plus source: a real UniMMCore with a pure-Python camera loaded from a config file that
the test writes, real MDAs and live mode, frames received over loopback ZeroMQ on ephemeral ports,
and (end to end) `umvd-live acquire pymmcore-plus` into a real `umvd-live serve` subprocess."""

from __future__ import annotations

import os

os.environ.setdefault("PYTEST_RUNNING", "1")  # pymmcore-plus: no log file (read at import)

import re
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from umvd_live.adapters.handoff import FrameHandoff
from umvd_live.adapters.mmcore import (
    LiveTap,
    MMCoreSource,
    load_core,
    run_time_lapse,
)
from umvd_live.adapters.publisher import FramePublisher
from umvd_live.adapters.pycamera import render

pytestmark = pytest.mark.timeout(120)

SHAPE = (32, 48)  # H, W
SEED = 5
ENV = os.environ | {"PYTEST_RUNNING": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_config(path: Path, shape: tuple[int, int] = SHAPE, seed: int = SEED) -> Path:
    """A user's Micro-Manager configuration file with a pure-Python camera (`#py` lines)."""
    path.write_text(
        "# Micro-Manager configuration: one pure-Python camera\n"
        "#py pyDevice,Cam,umvd_live.adapters.pycamera,NoisyPatternCamera\n"
        "#py Property,Core,Initialize,1\n"
        f"#py Property,Cam,SensorHeight,{shape[0]}\n"
        f"#py Property,Cam,SensorWidth,{shape[1]}\n"
        f"#py Property,Cam,Seed,{seed}\n"
        "#py Property,Cam,Exposure,1.0\n"
        "#py Property,Core,Camera,Cam\n"
    )
    return path


@pytest.fixture
def core(tmp_path):
    return load_core(write_config(tmp_path / "MMConfig.cfg"))


def connected_publisher(endpoint: str) -> FramePublisher:
    pub = FramePublisher(endpoint, "cam0")
    assert pub.wait_for_subscriber(10)
    return pub


def test_config_file_loads_the_python_camera(core):
    assert core.getCameraDevice() == "Cam"
    assert (core.getImageHeight(), core.getImageWidth()) == SHAPE
    core.snapImage()
    assert np.array_equal(core.getImage(), render(0, SHAPE, SEED))


def test_every_mda_frame_arrives_with_its_seq_and_pixels(core, receiver):
    pub = connected_publisher(receiver.endpoint)
    source = MMCoreSource(core, pub).attach()
    run_time_lapse(core, 60, interval_ms=0)
    stats = source.detach()
    frames = receiver.wait_for(60)
    pub.close()

    assert (stats.offered, stats.sent, stats.handoff_dropped, stats.publisher_dropped) == (60, 60, 0, 0)
    assert [f.header.seq for f in frames] == list(range(60))
    for f in frames:  # exactly what the camera produced, frame by frame
        assert np.array_equal(f.pixels, render(f.header.seq, SHAPE, SEED))
        assert f.header.meta["index"] == {"t": f.header.seq}
        assert f.header.meta["camera"] == "Cam"
    times = [f.header.t for f in frames]
    assert all(b >= a for a, b in zip(times, times[1:])) and times[-1] > 0


def test_timed_mda_without_a_shutter_runs_and_restores_autoshutter(core, receiver):
    # pymmcore-plus 0.18.1 fails a non-sequenced MDA when no shutter is loaded; see shutter_workaround.
    assert core.getShutterDevice() == "" and core.getAutoShutter()
    pub = connected_publisher(receiver.endpoint)
    source = MMCoreSource(core, pub).attach()
    run_time_lapse(core, 5, interval_ms=5)
    stats = source.detach()
    frames = receiver.wait_for(5)
    pub.close()
    assert stats.sent == 5
    assert [f.header.seq for f in frames] == list(range(5))
    assert core.getAutoShutter()


def test_seq_keeps_counting_over_consecutive_mdas(core, receiver):
    pub = connected_publisher(receiver.endpoint)
    with MMCoreSource(core, pub) as source:
        run_time_lapse(core, 4)
        run_time_lapse(core, 3)
    frames = receiver.wait_for(7)
    pub.close()
    assert source.frames_seen == 7
    assert [f.header.seq for f in frames] == list(range(7))
    assert [f.header.meta["index"]["t"] for f in frames] == [0, 1, 2, 3, 0, 1, 2]


def test_full_handoff_drops_and_counts_instead_of_blocking(receiver):
    pub = connected_publisher(receiver.endpoint)
    handoff = FrameHandoff(pub, maxsize=3)  # sender not started yet: nothing leaves the queue
    image = np.zeros(SHAPE, np.uint16)
    accepted = [handoff.offer(image + i, seq=i) for i in range(10)]
    assert accepted == [True] * 3 + [False] * 7
    stats = handoff.stats()
    assert (stats.offered, stats.handoff_dropped, stats.pending) == (10, 7, 3)
    handoff.start()
    assert handoff.offer(image + 10, seq=10)  # room again once the sender drains
    stats = handoff.close()
    frames = receiver.wait_for(4)
    pub.close()
    # The daemon sees the lost frames as a gap in seq.
    assert [f.header.seq for f in frames] == [0, 1, 2, 10]
    assert [int(f.pixels[0, 0]) for f in frames] == [0, 1, 2, 10]
    assert (stats.sent, stats.handoff_dropped, stats.rejected, stats.pending) == (4, 7, 0, 0)


def test_unencodable_frame_is_rejected_and_the_sender_goes_on(receiver):
    pub = connected_publisher(receiver.endpoint)
    with FrameHandoff(pub) as handoff:
        handoff.offer(np.zeros(SHAPE, np.uint32), seq=0)  # protocol v1 carries no uint32
        handoff.offer(np.ones(SHAPE, np.uint16), seq=1)
    frames = receiver.wait_for(1)
    pub.close()
    assert handoff.stats().rejected == 1 and "uint32" in handoff.last_error
    assert [f.header.seq for f in frames] == [1]


def test_live_tap_publishes_each_image_once_without_popping(core, receiver):
    pub = connected_publisher(receiver.endpoint)
    core.setExposure(3.0)
    tap = LiveTap(core, pub, poll_interval_s=0.0005)
    tap.start()
    core.startContinuousSequenceAcquisition(0)
    deadline = time.monotonic() + 20
    while tap.published < 25 and time.monotonic() < deadline:
        time.sleep(0.01)
    core.stopSequenceAcquisition()
    stats = tap.stop()
    in_buffer = core.getRemainingImageCount()  # nobody popped: the owner's frames are all there
    frames = receiver.wait_for(stats.published)
    pub.close()

    assert stats.published >= 25
    assert in_buffer >= stats.published
    seqs = [f.header.seq for f in frames]
    assert len(seqs) == stats.published and seqs == sorted(set(seqs))  # each image once, in order
    assert seqs[-1] + 1 == stats.published + stats.skipped
    for f in frames:  # ImageNumber n is the camera's frame n
        assert np.array_equal(f.pixels, render(f.header.seq, SHAPE, SEED))
        assert f.header.meta["image_number"] == f.header.seq


# ------------------------------------------------------------------------------ command line


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "umvd_live.cli", "acquire", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def test_cli_live_tap_into_a_receiver(tmp_path, receiver):
    cfg = write_config(tmp_path / "MMConfig.cfg")
    out = run_cli("pymmcore-plus", "--config", str(cfg), "--live", "--frames", "30", "--exposure-ms", "3",
                  "--to", receiver.endpoint)
    assert out.returncode == 0, out.stderr
    published = int(re.search(r"live: (\d+) frames sent", out.stdout).group(1))
    frames = receiver.wait_for(published)
    assert published >= 30 and len(frames) == published
    seqs = [f.header.seq for f in frames]
    assert seqs == sorted(set(seqs))
    assert all(np.array_equal(f.pixels, render(f.header.seq, SHAPE, SEED)) for f in frames)


def test_cli_refuses_bad_input_clearly(tmp_path):
    out = run_cli("pymmcore-plus", "--config", str(tmp_path / "missing.cfg"), "--frames", "3", "--wait-s", "0.2")
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.cfg"
    bad.write_text("#py pyDevice,Cam,umvd_live.adapters.no_such_module,Camera\n")
    out = run_cli("pymmcore-plus", "--config", str(bad), "--frames", "3", "--wait-s", "0.2")
    assert out.returncode == 2 and "cannot load" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("pymmcore-plus", "--config", str(write_config(tmp_path / "ok.cfg")), "--wait-s", "0.2")
    assert out.returncode == 2 and "--frames" in out.stderr


def test_cli_without_a_daemon_says_so(tmp_path):
    with socket_port() as port:  # a port nobody subscribes on
        out = run_cli("pymmcore-plus", "--config", str(write_config(tmp_path / "MMConfig.cfg")),
                      "--frames", "3", "--to", f"tcp://127.0.0.1:{port}", "--wait-s", "0.5")
    assert out.returncode == 3 and "no daemon subscribed" in out.stderr


class socket_port:
    """A free loopback port, held by a bound (never listening) socket for the duration."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return self._sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


# ------------------------------------------------------------------------------ end to end

READY = re.compile(r"ready: input=(\S+) output=(\S+) control=(\S+)")


def test_300_frames_through_acquire_into_serve_with_none_missing(tmp_path):
    """The issue's acceptance: a user's config with a pure-Python camera streams 300 frames through
    `umvd-live acquire pymmcore-plus` into `umvd-live serve`, with no frame missing."""
    err_path = tmp_path / "serve.err"
    with open(tmp_path / "serve.out", "w") as out, open(err_path, "w") as err:
        serve = subprocess.Popen(
            [sys.executable, "-m", "umvd_live.cli", "serve", "--input", "tcp://127.0.0.1:*",
             "--output", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
             "--output-dir", str(tmp_path / "out"), "--preset", "lite", "--device", "cpu",
             "--warmup-frames", "40", "--warmup-steps", "10", "--status-interval", "1"],
            stdout=out, stderr=err, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while not (match := READY.search(err_path.read_text())):
            assert serve.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.05)
        input_ep, _, control_ep = match.groups()

        cfg = write_config(tmp_path / "MMConfig.cfg", shape=(64, 64))
        acq = run_cli("pymmcore-plus", "--config", str(cfg), "--frames", "300", "--to", input_ep)
        assert acq.returncode == 0, acq.stderr
        assert "300 frames acquired, 300 sent, 0 dropped in the hand-off, 0 dropped by the publisher" \
            in acq.stdout

        req = zmq.Context.instance().socket(zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, 30000)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(control_ep)
        try:
            deadline = time.monotonic() + 30
            while True:
                req.send(msgpack.packb({"cmd": "status"}))
                cam = msgpack.unpackb(req.recv()).get("streams", {}).get("cam0", {})
                if cam.get("frames_in", 0) >= 300 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            req.send(msgpack.packb({"cmd": "shutdown"}))
            req.recv()
        finally:
            req.close()
        assert cam["frames_in"] == 300
        assert cam["drops"] == 0 and cam["rejected_total"] == 0 and cam["seq_restarts"] == 0
        assert cam["last_seq"] == 299 and cam["shape"] == [64, 64] and cam["dtype"] == "<u2"
        assert serve.wait(30) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
