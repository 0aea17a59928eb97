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
from command_line import run_umvd_live
from useq import MDAEvent, MDASequence

from umvd_live.adapters.handoff import FrameHandoff
from umvd_live.adapters.mmcore import (
    ImageNumberTracker,
    LiveTap,
    MDAFailed,
    MMCoreSource,
    load_core,
    run_live,
    run_mda,
    time_lapse,
)
from umvd_live.adapters.publisher import FramePublisher
from umvd_live.adapters.pycamera import FocusStage, NoisyPatternCamera, render

pytestmark = pytest.mark.timeout(120)

SHAPE = (32, 48)  # H, W
SEED = 5
ENV = os.environ | {"PYTEST_RUNNING": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ACQUIRE = ("acquire", "pymmcore-plus")  # the command under test, before its options


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


def run_time_lapse(core, frames: int, interval_ms: float = 0.0) -> None:
    run_mda(core, time_lapse(frames, interval_ms))


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
        assert f.header.meta["group"] == "cam0" and f.stream == "cam0"  # one channel: one stream
        assert f.header.meta["camera_device"] == "Cam"
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


def test_each_mda_ends_its_streams_and_the_next_numbers_from_0(core, receiver):
    pub = connected_publisher(receiver.endpoint)
    with MMCoreSource(core, pub) as source:
        run_time_lapse(core, 4)
        run_time_lapse(core, 3)
    frames = receiver.wait_for(7)
    deadline = time.monotonic() + 10
    while len(receiver.ends) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    pub.close()
    assert source.frames_seen == 7
    assert [f.header.seq for f in frames] == [0, 1, 2, 3, 0, 1, 2]
    assert [f.header.meta["index"]["t"] for f in frames] == [0, 1, 2, 3, 0, 1, 2]
    # each MDA's end follows its last frame; its seq is the next frame's number (no drops)
    assert [(e.stream, e.seq) for e in receiver.ends] == [("cam0", 4), ("cam0", 3)]


def test_a_frame_the_source_cannot_publish_is_counted_and_the_mda_goes_on(core, receiver, monkeypatch, caplog):
    """A fault on our side of frameReady (here: a frame's metadata that cannot be read) is counted
    for the summary and logged once; the MDA acquires every frame."""
    import umvd_live.adapters.mmcore as mmcore_module

    real_frame_meta, calls = mmcore_module.frame_meta, []

    def failing_once(meta):
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("a metadata field we did not expect")
        return real_frame_meta(meta)

    monkeypatch.setattr(mmcore_module, "frame_meta", failing_once)
    pub = connected_publisher(receiver.endpoint)
    with MMCoreSource(core, pub) as source:
        run_time_lapse(core, 5)
    frames = receiver.wait_for(4)
    pub.close()
    assert (source.frames_seen, source.errors, len(frames)) == (5, 1, 4)
    assert [f.header.meta["index"]["t"] for f in frames] == [0, 2, 3, 4]
    assert [r.getMessage() for r in caplog.records if "could not publish" in r.getMessage()] == [
        "could not publish a frame; the acquisition goes on"]


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


@pytest.mark.parametrize("poll_interval_s", [0.0005, 0.05])  # 0.05: the first images go by unseen
def test_live_tap_publishes_each_image_once_without_popping(core, receiver, poll_interval_s):
    pub = connected_publisher(receiver.endpoint)
    core.setExposure(3.0)
    tap = LiveTap(core, pub, poll_interval_s=poll_interval_s)
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


def test_cli_live_tap_into_a_receiver(tmp_path, receiver):
    cfg = write_config(tmp_path / "MMConfig.cfg")
    out = run_umvd_live(*ACQUIRE, "--config", str(cfg), "--live", "--frames", "30", "--exposure-ms", "3",
                        "--to", receiver.endpoint)
    assert out.returncode == 0, out.stderr
    published = int(re.search(r"live: (\d+) frames sent", out.stdout).group(1))
    frames = receiver.wait_for(published)
    assert published >= 30 and len(frames) == published
    seqs = [f.header.seq for f in frames]
    assert seqs == sorted(set(seqs))
    assert all(np.array_equal(f.pixels, render(f.header.seq, SHAPE, SEED)) for f in frames)


def test_cli_refuses_bad_input_clearly(tmp_path):
    out = run_umvd_live(*ACQUIRE, "--config", str(tmp_path / "missing.cfg"), "--frames", "3", "--wait-s", "0.2")
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.cfg"
    bad.write_text("#py pyDevice,Cam,umvd_live.adapters.no_such_module,Camera\n")
    out = run_umvd_live(*ACQUIRE, "--config", str(bad), "--frames", "3", "--wait-s", "0.2")
    assert out.returncode == 2 and "cannot load" in out.stderr and "Traceback" not in out.stderr
    out = run_umvd_live(*ACQUIRE, "--config", str(write_config(tmp_path / "ok.cfg")), "--wait-s", "0.2")
    assert out.returncode == 2 and "--frames" in out.stderr


def test_cli_without_a_daemon_says_so(tmp_path):
    with socket_port() as port:  # a port nobody subscribes on
        out = run_umvd_live(*ACQUIRE, "--config", str(write_config(tmp_path / "MMConfig.cfg")),
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


def start_serve(tmp_path: Path, *engine_args: str) -> tuple[subprocess.Popen, str, str]:
    """`umvd-live serve` on ephemeral loopback ports, output dir ``tmp_path/out``: (process, input
    endpoint, control endpoint) once it says it is ready."""
    err_path = tmp_path / "serve.err"
    with open(tmp_path / "serve.out", "w") as out, open(err_path, "w") as err:
        serve = subprocess.Popen(
            [sys.executable, "-m", "umvd_live", "serve", "--input", "tcp://127.0.0.1:*",
             "--output", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
             "--output-dir", str(tmp_path / "out"), "--preset", "lite", "--device", "cpu",
             "--status-interval", "1", *engine_args],
            stdout=out, stderr=err, env=ENV)
    deadline = time.monotonic() + 60
    while not (match := READY.search(err_path.read_text())):
        if serve.poll() is not None or time.monotonic() > deadline:
            serve.kill()
            serve.wait()
            raise AssertionError(err_path.read_text())
        time.sleep(0.05)
    input_ep, _, control_ep = match.groups()
    return serve, input_ep, control_ep


def test_300_frames_through_acquire_into_serve_with_none_missing(tmp_path):
    """The issue's acceptance: a user's config with a pure-Python camera streams 300 frames through
    `umvd-live acquire pymmcore-plus` into `umvd-live serve`, with no frame missing."""
    # --catchup-ms: the 300 frames come as fast as the camera snaps them, and a preview would skip
    # to the newest window (the prior's outputs cost a network pass each): every output is owed here
    serve, input_ep, control_ep = start_serve(tmp_path, "--warmup-frames", "40", "--warmup-steps", "10",
                                              "--catchup-ms", "60000")
    try:
        cfg = write_config(tmp_path / "MMConfig.cfg", shape=(64, 64))
        acq = run_umvd_live(*ACQUIRE, "--config", str(cfg), "--frames", "300", "--to", input_ep)
        assert acq.returncode == 0, acq.stderr
        assert "300 frames acquired in 1 stream(s), 300 sent, 0 dropped in the hand-off, 0 dropped by " \
            "the publisher" in acq.stdout

        req = zmq.Context.instance().socket(zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, 30000)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(control_ep)
        try:
            deadline = time.monotonic() + 30
            while True:
                req.send(msgpack.packb({"cmd": "status"}))
                cam = msgpack.unpackb(req.recv()).get("streams", {}).get("cam0", {})
                if cam.get("frames_out", 0) >= 300 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            req.send(msgpack.packb({"cmd": "shutdown"}))
            req.recv()
        finally:
            req.close()
        assert cam["frames_in"] == 300
        assert cam["frames_out"] == 300 and cam["ends"] == 1  # the MDA's end flushed the last outputs
        assert cam["drops"] == 0 and cam["rejected_total"] == 0 and cam["seq_restarts"] == 0
        assert cam["last_seq"] == 299 and cam["shape"] == [64, 64] and cam["dtype"] == "<u2"
        assert serve.wait(30) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


# ------------------------------------------------------------------ multi-dimensional acquisitions

CHANNEL_PHOTONS = {"Dim": 5, "Bright": 400}


def write_multichannel_config(path: Path, shape: tuple[int, int] = SHAPE) -> Path:
    """A camera whose channel presets set its brightness, and a pure-Python focus drive whose
    position selects the plane the camera images."""
    path = write_config(path, shape)
    with open(path, "a") as f:
        f.write("#py pyDevice,Z,umvd_live.adapters.pycamera,FocusStage\n"
                "#py Property,Core,Focus,Z\n"
                "#py Property,Cam,FocusStage,Z\n")
        for preset, photons in CHANNEL_PHOTONS.items():
            f.write(f"#py ConfigGroup,Channel,{preset},Cam,Photons,{photons}\n")
    return path


def run_multichannel_mda(tmp_path, receiver, sequence: MDASequence, frames: int):
    """Run ``sequence`` on the camera of `write_multichannel_config` through an `MMCoreSource`;
    returns the source and the ``frames`` frames the receiver got."""
    core = load_core(write_multichannel_config(tmp_path / "MMConfig.cfg"))
    pub = connected_publisher(receiver.endpoint)
    with MMCoreSource(core, pub) as source:
        run_mda(core, sequence)
    received = receiver.wait_for(frames)
    pub.close()
    return source, received


def test_mda_channels_and_planes_become_streams_of_their_own(tmp_path, receiver):
    sequence = MDASequence(channels=["Dim", "Bright"], z_plan={"range": 2, "step": 1},
                           time_plan={"interval": 0, "loops": 4})
    source, frames = run_multichannel_mda(tmp_path, receiver, sequence, 24)
    names = [f"cam0.{c}.z{z}" for c in CHANNEL_PHOTONS for z in range(3)]
    assert source.streams_seen == names
    by_stream = {name: [f for f in frames if f.stream == name] for name in names}
    for c, channel in enumerate(CHANNEL_PHOTONS):
        for z in range(3):
            got = by_stream[f"cam0.{channel}.z{z}"]
            assert [f.header.seq for f in got] == [0, 1, 2, 3]  # numbered per stream
            assert [f.header.meta["index"] for f in got] == [{"t": t, "c": c, "z": z} for t in range(4)]
            assert {f.header.meta["channel"] for f in got} == {channel}
            assert {f.header.meta["group"] for f in got} == {"cam0"}
            times = [f.header.t for f in got]
            assert times == sorted(times)
            # frame n of the camera was snapped in MDA order t, c, z at this channel and plane
            for f, t in zip(got, range(4)):
                n = t * 6 + c * 3 + z
                assert np.array_equal(f.pixels, render(n, SHAPE, SEED, CHANNEL_PHOTONS[channel], z - 1.0))
    assert sorted((e.stream, e.seq) for e in receiver.ends) == sorted((name, 4) for name in names)


def test_cli_runs_a_useq_file_through_serve_one_stream_per_channel_and_plane(tmp_path):
    """Issue 16's acceptance with a real core: 2 channels x 3 planes x T time points from a
    useq-schema file, through `acquire pymmcore-plus --mda` into `serve`, recorded raw and
    denoised: every stream holds exactly one (c, z), and every frame arrives denoised and recorded."""
    T = 12
    (tmp_path / "mda.yaml").write_text(
        "axis_order: tpgcz\n"
        "channels:\n  - config: Dim\n  - config: Bright\n"
        "z_plan: {range: 2, step: 1}\n"
        f"time_plan: {{interval: 0, loops: {T}}}\n")
    cfg = write_multichannel_config(tmp_path / "MMConfig.cfg", shape=(48, 48))
    names = [f"cam0.{c}.z{z}" for c in CHANNEL_PHOTONS for z in range(3)]
    out_dir = tmp_path / "out"
    serve, input_ep, control_ep = start_serve(tmp_path, "--warmup-frames", "1000")
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 30000)
    req.setsockopt(zmq.LINGER, 0)

    def ask(**request):
        req.send(msgpack.packb(request))
        return msgpack.unpackb(req.recv())

    try:
        req.connect(control_ep)
        assert ask(cmd="record_start", path="rec.ome.tif", raw=True)["ok"]

        acq = run_umvd_live(*ACQUIRE, "--config", str(cfg), "--mda", str(tmp_path / "mda.yaml"),
                            "--to", input_ep, timeout=120)
        assert acq.returncode == 0, acq.stderr
        assert f"{6 * T} frames acquired in 6 stream(s), {6 * T} sent, 0 dropped" in acq.stdout

        deadline = time.monotonic() + 60
        while True:  # the MDA's end flushes each stream's last outputs: no shutdown needed
            streams = ask(cmd="status")["streams"]
            if all(streams.get(n, {}).get("frames_out", 0) >= T for n in names) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sorted(streams) == sorted(names)
        for c, channel in enumerate(CHANNEL_PHOTONS):
            for z in range(3):
                s = streams[f"cam0.{channel}.z{z}"]
                assert (s["frames_in"], s["frames_out"], s["drops"], s["ends"]) == (T, T, 0, 1)
                assert s["axes"] == {"group": "cam0", "channel": channel, "index": {"c": c, "z": z}}
        assert ask(cmd="record_stop")["ok"]
        assert ask(cmd="shutdown")["ok"]
        assert serve.wait(60) == 0
    finally:
        req.close()
        if serve.poll() is None:
            serve.kill()
            serve.wait()

    from umvd_live.recording.ometiff import read_recording

    planes = {}
    for name in names:
        raw, raw_infos, _ = read_recording(out_dir / f"rec_{name}.raw.ome.tif")
        den, infos, _ = read_recording(out_dir / f"rec_{name}.ome.tif")
        assert len(raw) == len(den) == T
        assert [i.seq for i in infos] == [i.seq for i in raw_infos] == list(range(T))
        # never mixed: the denoised frames keep their own channel's level...
        assert abs(den.mean() / raw.mean() - 1) < 0.1, name
        planes[name] = (raw.mean(0), den.mean(0))
    for channel in CHANNEL_PHOTONS:  # ... and their own plane's cells
        for z in range(3):
            _, den = planes[f"cam0.{channel}.z{z}"]
            corr = [np.corrcoef(den.ravel(), planes[f"cam0.{channel}.z{k}"][0].ravel())[0, 1] for k in range(3)]
            assert int(np.argmax(corr)) == z, (channel, z, corr)


def test_image_number_tracker_skips_the_image_left_in_the_buffer():
    numbers = ImageNumberTracker()
    numbers.prime(451)  # an earlier sequence's last image, still in the buffer at the tap's start
    assert numbers.seq_for(451) is None
    assert [numbers.seq_for(n) for n in (452, 452, 453, 456)] == [0, None, 1, 4]
    assert numbers.skipped == 2
    assert numbers.seq_for(0) == 0  # a new sequence restarts the numbering
    assert numbers.restarts == 1
    assert numbers.seq_for(3) == 3 and numbers.skipped == 2 + 2  # 1 and 2 went by
    assert numbers.seq_for(2) == 2 and numbers.skipped == 4 + 2  # restarted again: 0 and 1 went by
    assert numbers.restarts == 2


def test_image_number_tracker_tells_a_new_image_from_the_leftover_of_that_number():
    """A 1-image sequence left image 0 in the buffer; live mode's own image 0 (another time stamp)
    is new, and the first image of a new run seen late counts the ones before it as skipped."""
    numbers = ImageNumberTracker()
    numbers.prime(0, "10:00:00.000")
    assert numbers.seq_for(0, "10:00:00.000") is None
    assert numbers.seq_for(0, "10:00:05.000") == 0 and numbers.skipped == 0
    numbers = ImageNumberTracker()
    numbers.prime(7, "10:00:00.000")
    assert numbers.seq_for(2, "10:00:05.000") == 2 and numbers.skipped == 2  # images 0, 1 went by
    numbers = ImageNumberTracker()
    numbers.prime(None)  # an empty buffer: live mode starts after the tap, whose first poll is late
    assert numbers.seq_for(3, "10:00:05.000") == 3 and numbers.skipped == 3  # images 0-2 went by
    assert numbers.seq_for(4, "10:00:05.010") == 4 and numbers.restarts == 0


def test_live_tap_publishes_image_0_of_a_run_after_a_one_image_sequence(core, receiver):
    core.startSequenceAcquisition(1, 0, True)  # leaves its image 0 in the buffer
    deadline = time.monotonic() + 20
    while core.isSequenceRunning() and time.monotonic() < deadline:
        time.sleep(0.01)
    core.setExposure(30.0)  # slow frames: polling sees every one, even on a loaded machine
    pub = connected_publisher(receiver.endpoint)
    tap = LiveTap(core, pub).start()
    core.startContinuousSequenceAcquisition(0)
    while tap.published < 3 and time.monotonic() < deadline + 20:
        time.sleep(0.01)
    core.stopSequenceAcquisition()
    stats = tap.stop()
    frames = receiver.wait_for(stats.published)
    pub.close()
    numbers = [f.header.meta["image_number"] for f in frames]
    assert numbers[0] == 0 and frames[0].header.seq == 0
    assert [f.header.seq for f in frames] == numbers  # seq is the run's own ImageNumber
    assert stats.skipped == numbers[-1] + 1 - len(numbers)


def test_live_tap_reads_exposure_again_and_ends_the_stream_when_live_restarts(core, receiver):
    """The user changes the exposure (between two live runs, or during one): frames carry the new
    one; a restarted live run is a new stream, the old one ended first. The change during a run is
    announced by emitting the core's own ``exposureChanged``, which pymmcore-plus emits for C++
    cameras only."""
    pub = connected_publisher(receiver.endpoint)
    core.setExposure(3.0)
    tap = LiveTap(core, pub, poll_interval_s=0.0005).start()

    def wait_published(count: int) -> None:
        deadline = time.monotonic() + 30
        while tap.published < count and time.monotonic() < deadline:
            time.sleep(0.01)

    core.startContinuousSequenceAcquisition(0)
    wait_published(5)
    core.stopSequenceAcquisition()
    first_run = tap.published
    core.setExposure(4.0)
    core.startContinuousSequenceAcquisition(0)
    wait_published(first_run + 5)
    core.setExposure(5.0)  # during the run; then the signal a core emits for a C++ camera (MMCore's
    core.events.exposureChanged.emit("Cam", 5.0)  # onExposureChanged): UniMMCore 0.18.1 has none for a Python one
    wait_published(tap.published + 5)
    core.stopSequenceAcquisition()
    stats = tap.stop()
    frames = receiver.wait_for(stats.published)
    pub.close()
    numbers = [f.header.meta["image_number"] for f in frames]
    restarts = [i for i in range(1, len(numbers)) if numbers[i] <= numbers[i - 1]]
    assert len(restarts) == 1  # two runs (the tap may see a run's last image after we stopped it)
    first, second = frames[:restarts[0]], frames[restarts[0]:]
    assert {f.header.meta["exposure_ms"] for f in first} == {3.0}
    assert {f.header.meta["exposure_ms"] for f in second} == {4.0, 5.0}
    assert second[-1].header.meta["exposure_ms"] == 5.0
    assert second[0].header.seq == second[0].header.meta["image_number"]
    # the first run was ended before the second began, with the seq its next frame would have had
    assert [(e.stream, e.seq) for e in receiver.ends] == [("cam0", first[-1].header.seq + 1),
                                                          ("cam0", second[-1].header.seq + 1)]


def test_one_preset_at_two_exposures_is_two_streams(tmp_path, receiver):
    """useq takes one channel preset twice (at two exposures): two channels, two streams, never one
    stream whose frames alternate between them."""
    sequence = MDASequence(channels=[{"config": "Bright", "exposure": 10}, {"config": "Bright", "exposure": 20}],
                           time_plan={"interval": 0, "loops": 3})
    source, frames = run_multichannel_mda(tmp_path, receiver, sequence, 6)
    assert source.streams_seen == ["cam0.Bright", "cam0.Bright_c1"]
    for c, name in enumerate(source.streams_seen):
        got = [f for f in frames if f.stream == name]
        assert [f.header.seq for f in got] == [0, 1, 2]
        assert [f.header.meta["index"] for f in got] == [{"t": t, "c": c} for t in range(3)]
        assert {f.header.meta["channel"] for f in got} == {"Bright"}  # the preset's own name, as given


def test_an_event_list_gives_each_channel_index_its_own_stream(tmp_path, receiver):
    """A user's script runs a list of MDAEvents (no sequence, so no channel list at the start): one
    preset at two exposures, c=0 and c=1, is still two streams."""
    events = [MDAEvent(index={"t": t, "c": c}, channel={"config": "Bright"}, exposure=1 + c)
              for t in range(3) for c in range(2)]
    source, frames = run_multichannel_mda(tmp_path, receiver, events, 6)
    assert source.streams_seen == ["cam0.Bright", "cam0.Bright_c1"]
    for c, name in enumerate(source.streams_seen):
        got = [f for f in frames if f.stream == name]
        assert [f.header.meta["index"] for f in got] == [{"t": t, "c": c} for t in range(3)]
        assert [f.header.seq for f in got] == [0, 1, 2]


def test_a_positions_own_channels_name_its_streams(tmp_path, receiver):
    """A position with a sub-sequence numbers its own channels: its c=0 is Bright there, and its
    stream is named after Bright, not after the top-level sequence's c=0 (Dim)."""
    sequence = MDASequence(channels=["Dim", "Bright"], time_plan={"interval": 0, "loops": 2}, stage_positions=[
        {"name": "A", "sequence": {"channels": ["Bright"]}}, {"name": "B"}])
    source, frames = run_multichannel_mda(tmp_path, receiver, sequence, 6)
    assert sorted(source.streams_seen) == ["cam0.p0.Bright_c0", "cam0.p1.Bright", "cam0.p1.Dim"]
    for f in frames:
        assert f.stream.split(".")[2].split("_")[0] == f.header.meta["channel"]
        assert (f.pixels.mean() > 100) == (f.header.meta["channel"] == "Bright")  # the frame is that channel's


class JammingStage(FocusStage):
    """A focus drive that fails above 1 µm, as a jammed one would mid-z-stack."""

    def set_position_um(self, val: float) -> None:
        if val > 1:
            raise RuntimeError("stage jammed")
        super().set_position_um(val)


def test_a_device_error_fails_the_mda_and_the_command(tmp_path, receiver, capsys):
    """pymmcore-plus ends the MDA and re-raises a device's error on its own thread: `run_mda`
    raises it, and `acquire` says so after its summary and exits 1."""
    from umvd_live.apps.acquire import AcquireConfig, PublishConfig, run

    cfg = write_config(tmp_path / "MMConfig.cfg")
    with open(cfg, "a") as f:
        f.write(f"#py pyDevice,Z,{__name__},JammingStage\n#py Property,Core,Focus,Z\n")
    sequence = MDASequence(z_plan={"range": 4, "step": 1}, time_plan={"interval": 0, "loops": 2})
    core = load_core(cfg)
    pub = connected_publisher(receiver.endpoint)
    with MMCoreSource(core, pub) as source, pytest.raises(MDAFailed, match="stage jammed"):
        run_mda(core, sequence)
    pub.close()
    assert source.frames_seen == 4  # z -2..1, then the stage failed
    assert not core.mda.is_running()

    (tmp_path / "mda.yaml").write_text("z_plan: {range: 4, step: 1}\ntime_plan: {interval: 0, loops: 2}\n")
    status = run(AcquireConfig(source="pymmcore-plus", mda=str(tmp_path / "mda.yaml"), mm_config=str(cfg),
                               publish=PublishConfig(to=receiver.endpoint, wait_s=10)))
    out = capsys.readouterr()
    assert status == 1
    assert "4 frames acquired in 4 stream(s), 4 sent" in out.out
    assert "the MDA failed: RuntimeError: stage jammed" in out.err


@pytest.mark.parametrize("frames", [1, 40])
def test_run_live_sends_exactly_the_frames_asked_for(core, receiver, frames):
    """`acquire pymmcore-plus --live --frames N` sends N frames, not N+1 or more: the count is
    enforced on the tap's own thread before it polls, not by a loop that looks every 10 ms while a
    fast camera (no exposure: a new image as fast as the core snaps) keeps the tap publishing."""
    pub = connected_publisher(receiver.endpoint)
    core.setExposure(0.0)
    tap = LiveTap(core, pub, poll_interval_s=0.0005)
    run_live(core, tap, frames)
    stats = tap.stats()
    received = receiver.wait_for(frames + 1, timeout_s=3)  # waits out anything past N too
    pub.close()
    assert stats.published == frames and len(received) == frames, (stats, len(received))
    seqs = [f.header.seq for f in received]
    assert seqs == sorted(set(seqs))
    assert [(e.stream, e.seq) for e in receiver.ends] == [("cam0", seqs[-1] + 1)]  # the stream was ended once
    assert type(tap).poll_once is LiveTap.poll_once and "poll_once" not in vars(tap)  # the limit was this run's


class OverheatingCamera(NoisyPatternCamera):
    """A camera whose snap fails from its fourth frame on, as an overheated sensor would."""

    def snap(self, buffer: np.ndarray):
        if self.frames_snapped >= 3:
            raise RuntimeError("sensor overheated")
        return super().snap(buffer)


def write_overheating_config(path: Path) -> Path:
    text = write_config(path).read_text().replace("umvd_live.adapters.pycamera,NoisyPatternCamera",
                                                  f"{__name__},OverheatingCamera")
    path.write_text(text)
    return path


@pytest.mark.parametrize("interval_ms", [0, 1], ids=["camera-sequence", "snap-per-frame"])
def test_a_camera_whose_snap_fails_fails_the_mda_and_the_command(tmp_path, receiver, capsys, interval_ms):
    """pymmcore-plus swallows a failed snap: one snap per frame logs "Failed to snap image" and the
    MDA goes on; a camera sequence ends early (its thread's error) and the missing frames are only
    logged. Either way the MDA "completes": `run_mda` counts the frames each event owed, raises
    `MDAFailed` naming the camera and its error, and `acquire` exits 1 after its summary."""
    from umvd_live.apps.acquire import AcquireConfig, PublishConfig, run

    cfg = write_overheating_config(tmp_path / "MMConfig.cfg")
    core = load_core(cfg)
    pub = connected_publisher(receiver.endpoint)
    with MMCoreSource(core, pub) as source, pytest.raises(MDAFailed) as failed:
        run_time_lapse(core, 6, interval_ms)
    pub.close()
    assert source.frames_seen == 3
    assert str(failed.value) == ("the MDA failed: camera Cam: RuntimeError: sensor overheated "
                                 "(3 of 6 frames not acquired, the first at t=3)")
    capsys.readouterr()

    status = run(AcquireConfig(source="pymmcore-plus", frames=6, interval_ms=interval_ms, mm_config=str(cfg),
                               publish=PublishConfig(to=receiver.endpoint, wait_s=10)))
    out = capsys.readouterr()
    assert status == 1, out
    assert ("pymmcore-plus: 3 frames acquired in 1 stream(s), 3 sent, 0 dropped in the hand-off, "
            "0 dropped by the publisher, 0 rejected\n") in out.out
    assert out.err.strip().splitlines()[-1] == (
        "umvd-live acquire: the MDA failed: camera Cam: RuntimeError: sensor overheated "
        "(3 of 6 frames not acquired, the first at t=3)")
    assert "Exception in thread" not in out.err  # the camera thread's error is the reason, not a traceback


def test_a_cancelled_mda_is_not_a_failure(core, receiver):
    """Frames an MDA did not take because it was cancelled (here mid camera sequence) are not missing."""
    pub = connected_publisher(receiver.endpoint)
    with MMCoreSource(core, pub) as source:
        core.mda.events.frameReady.connect(lambda *_: source.frames_seen == 2 and core.mda.cancel())
        run_time_lapse(core, 50)
    pub.close()
    assert 2 <= source.frames_seen < 50


def test_a_frame_listener_that_raises_does_not_make_frames_missing(core):
    """psygnal calls no slot after one that raises (pymmcore-plus logs it and goes on): the
    audit's own slots come first, so another listener's error is not a camera's failure."""
    def broken(*_):
        raise ZeroDivisionError("a listener's bug")

    core.mda.events.frameReady.connect(broken)
    try:
        run_time_lapse(core, 3)  # no MDAFailed
    finally:
        core.mda.events.frameReady.disconnect(broken)
