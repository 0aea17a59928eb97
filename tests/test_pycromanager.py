"""pycromanager source: owner mode through pycromanager's real (Python-backend) acquisition engine on
a UniMMCore with a pure-Python camera, tap mode on the same core through `Core()`, the missing
Micro-Manager path in a real subprocess, and the Java GUI path when something answers on 4827."""

from __future__ import annotations

import os

os.environ.setdefault("PYTEST_RUNNING", "1")  # pymmcore-plus: no log file (read at import)

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zmq
from command_line import run_umvd_live

from umvd_live.adapters import pycromanager_source as pm
from umvd_live.adapters.publisher import FramePublisher
from umvd_live.adapters.pycamera import render

pytestmark = pytest.mark.timeout(120)

SHAPE = (32, 40)
SEED = 11
ENV = os.environ | {"PYTEST_RUNNING": "1", "PYTHONUNBUFFERED": "1"}
ACQUIRE = ("acquire", "pycromanager")  # the command under test, before its options


def write_config(path: Path) -> Path:
    path.write_text(
        "#py pyDevice,Cam,umvd_live.adapters.pycamera,NoisyPatternCamera\n"
        "#py Property,Core,Initialize,1\n"
        f"#py Property,Cam,SensorHeight,{SHAPE[0]}\n"
        f"#py Property,Cam,SensorWidth,{SHAPE[1]}\n"
        f"#py Property,Cam,Seed,{SEED}\n"
        "#py Property,Core,Camera,Cam\n"
    )
    return path


@pytest.fixture
def backend(tmp_path):
    core = pm.start_python_backend(write_config(tmp_path / "MMConfig.cfg"))
    core.setExposure(1.0)
    try:
        yield core
    finally:
        pm.stop_python_backend()


def publisher_for(rx) -> FramePublisher:  # rx: the `receiver` fixture
    pub = FramePublisher(rx.endpoint, "cam0")
    assert pub.wait_for_subscriber(10)
    return pub


def test_python_backend_core_answers_in_both_conventions(backend):
    from pycromanager import Core

    assert Core() is backend  # what pycromanager's own code gets
    assert backend.get_camera_device() == backend.getCameraDevice() == "Cam"
    assert (backend.get_image_height(), backend.get_image_width()) == SHAPE


def test_owner_mode_publishes_every_image_and_leaves_the_raw_data_to_micromanager(backend, receiver, tmp_path):
    pub = publisher_for(receiver)
    owner = pm.PycroManagerOwner(pub)
    pm.run_owner_acquisition(owner, 30, 0, directory=tmp_path / "raw", name="session")
    stats = owner.close()
    frames = receiver.wait_for(30)
    pub.close()

    assert (owner.frames_seen, stats.sent, stats.handoff_dropped, stats.rejected) == (30, 30, 0, 0)
    assert [f.header.seq for f in frames] == list(range(30))
    assert [f.header.meta["index"] for f in frames] == [{"t": i} for i in range(30)]
    assert {f.stream for f in frames} == {"cam0"}
    assert [(e.stream, e.seq) for e in receiver.ends] == [("cam0", 30)]
    for f in frames:
        assert np.array_equal(f.pixels, render(f.header.seq, SHAPE, SEED))
    # pycromanager saved the raw frames itself (we read them back from its files, after saving).
    (stack,) = (tmp_path / "raw").glob("session*/*.tif")
    saved = tifffile.imread(stack)
    assert saved.shape == (30, *SHAPE) and saved.dtype == np.uint16
    assert all(np.array_equal(saved[i], frames[i].pixels) for i in range(30))


def test_owner_reads_saved_images_from_the_dataset_and_never_raises(receiver):
    """The ``image_saved_fn`` on pycromanager's own RAM dataset: an image it cannot read or
    publish is counted, never raised into the acquisition."""
    from ndstorage.ndram_dataset import NDRAMDataset

    dataset = NDRAMDataset()
    dataset.initialize({})
    dataset.put_image({"time": 0}, np.arange(12, dtype=np.uint32).reshape(3, 4), {"Height": 3, "Width": 4})
    dataset.put_image({"time": 1}, np.ones((3, 4), np.uint16), {"Height": 3, "Width": 4})
    pub = publisher_for(receiver)
    owner = pm.PycroManagerOwner(pub).start()
    owner.saved({"time": 7}, dataset)  # not in the dataset: counted, not raised
    owner.saved({"time": 0}, dataset)  # protocol v1 carries no uint32: rejected by the hand-off
    owner.saved({"time": 1}, dataset)
    stats = owner.close()
    frames = receiver.wait_for(1)
    pub.close()
    assert owner.errors == 1 and owner.frames_seen == 3  # the unreadable one was acquired too
    assert stats.rejected == 1 and stats.sent == 1
    assert [f.header.seq for f in frames] == [1] and frames[0].header.meta["index"] == {"t": 1}
    np.testing.assert_array_equal(frames[0].pixels, np.ones((3, 4), np.uint16))


def test_tap_follows_live_mode_without_stealing_frames(backend, receiver):
    pub = publisher_for(receiver)
    core = pm.connect_core(attempts=1)  # with the Python backend: the in-process core
    assert core is backend
    backend.setExposure(3.0)
    tap = pm.TaggedImageTap(core, pub, poll_interval_s=0.0005).start()
    backend.startContinuousSequenceAcquisition(0)
    deadline = time.monotonic() + 20
    while tap.published < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    backend.stopSequenceAcquisition()
    stats = tap.stop()
    in_buffer = backend.getRemainingImageCount()  # read last: the tap may publish until it stops
    frames = receiver.wait_for(stats.published)
    pub.close()
    assert stats.published >= 20 and in_buffer >= stats.published
    seqs = [f.header.seq for f in frames]
    assert len(seqs) == stats.published and seqs == sorted(set(seqs))
    # The core's ImageNumber is the camera's frame. seq counts from the first image the tap saw where
    # the buffer held an earlier image when it started, and is the ImageNumber itself where the buffer
    # was empty (`ImageNumberTracker.prime`): under load the tap's first poll may come a few 3-ms
    # frames late, and those frames are skipped, not renumbered. Either way seq's gaps are the camera's.
    numbers = [int(f.header.meta["image_number"]) for f in frames]
    assert seqs[0] in (0, numbers[0])
    assert [n - numbers[0] for n in numbers] == [s - seqs[0] for s in seqs]
    assert all(np.array_equal(f.pixels, render(n, SHAPE, SEED)) for f, n in zip(frames, numbers))


def test_owner_mode_splits_channels_and_planes_into_streams(tmp_path, receiver):
    """pycromanager's own event list with 2 channels x 3 planes: a stream per (channel, z), named
    by the channel presets, each holding its own consecutive time points."""
    from pycromanager import multi_d_acquisition_events

    cfg = write_config(tmp_path / "MMConfig.cfg")
    with open(cfg, "a") as f:
        f.write("#py pyDevice,Z,umvd_live.adapters.pycamera,FocusStage\n#py Property,Core,Focus,Z\n"
                "#py Property,Cam,FocusStage,Z\n"
                "#py ConfigGroup,Channel,Dim,Cam,Photons,5\n#py ConfigGroup,Channel,Bright,Cam,Photons,400\n")
    pm.start_python_backend(cfg).setExposure(1.0)
    try:
        pub = publisher_for(receiver)
        owner = pm.PycroManagerOwner(pub)
        events = multi_d_acquisition_events(num_time_points=3, channel_group="Channel",
                                            channels=["Dim", "Bright"], z_start=-1, z_end=1, z_step=1)
        pm.run_owner_acquisition(owner, events)
        owner.close()
    finally:
        pm.stop_python_backend()
    frames = receiver.wait_for(18)
    pub.close()
    names = [f"cam0.{c}.z{z}" for c in ("Dim", "Bright") for z in range(3)]
    assert owner.streams_seen == names
    for c, channel in enumerate(("Dim", "Bright")):
        for z in range(3):
            got = [f for f in frames if f.stream == f"cam0.{channel}.z{z}"]
            assert [f.header.seq for f in got] == [0, 1, 2]
            assert [f.header.meta["index"] for f in got] == [{"t": t, "c": c, "z": z} for t in range(3)]
            assert {f.header.meta["channel"] for f in got} == {channel}
            level = np.mean([f.pixels.mean() for f in got])
            assert (level < 20) if channel == "Dim" else (level > 100)
    assert sorted(e.stream for e in receiver.ends) == sorted(names)


def test_tap_reads_the_acquisition_axes_of_tagged_images():
    assert pm.axes_of_tags({"ImageNumber": "3"}) is None  # live mode: one stream
    assert pm.axes_of_tags({"Axes": '{"time": 2, "channel": "GFP"}'}) == {"time": 2, "channel": "GFP"}
    tags = {"ChannelIndex": "1", "Channel": "RFP", "SliceIndex": "4", "FrameIndex": "7", "PositionIndex": 0}
    assert pm.axes_of_tags(tags) == {"position": 0, "z": 4, "time": 7, "channel": "RFP"}
    reader = pm.AxesReader("cam0")
    axes, t = reader.read({"time": 7, "channel": "RFP", "z": 4, "position": "A1"})
    assert (axes.name, t) == ("cam0.p0.RFP.z4", 7)
    assert axes.meta(t) == {"group": "cam0", "index": {"t": 7, "p": 0, "c": 0, "z": 4},
                            "channel": "RFP", "position": "A1"}
    assert reader.read({"time": 8, "channel": "GFP"})[0].name == "cam0.GFP"
    assert reader.read({"channel": "GFP"})[0].index == {"c": 1}  # numbered in order of appearance
    # names that differ only in characters a stream name cannot hold: two channels, two streams
    assert reader.read({"channel": "GFP 1"})[0].name == "cam0.GFP_1"
    assert reader.read({"channel": "GFP/1"})[0].name == "cam0.GFP_1_c3"
    assert reader.read({"time": 3, "channel": "GFP 1"})[0].name == "cam0.GFP_1"  # and each stays its own


def test_flat_java_pixels_are_shaped_by_their_tags():
    flat = np.arange(12, dtype=np.uint16)
    assert pm.to_image(flat, {"Height": "3", "Width": "4"}).shape == (3, 4)
    with pytest.raises(ValueError, match="do not make"):
        pm.to_image(flat, {"Height": 5, "Width": 4})
    with pytest.raises(ValueError, match="Height and Width"):
        pm.to_image(flat, {})


class LiveModeCore:
    """Micro-Manager's live mode as `TaggedImageTap` sees it over Java: a new flat image every few
    ms. A fake, because pycromanager's Python backend cannot give the faults it plays: image
    ``bad`` is a 32-bit RGB camera's (a dtype protocol v1 does not carry), image ``flat`` has no
    Height/Width tags, and from image ``gone`` on the core raises what no poll may swallow."""

    def __init__(self, bad: int = 3, flat: int = 6, gone: int | None = None):
        self.bad, self.flat, self.gone = bad, flat, gone
        self.number = -1

    def get_last_tagged_image(self):
        from types import SimpleNamespace

        self.number += 1
        if self.gone is not None and self.number >= self.gone:
            raise SystemExit("the tap's thread ends")
        n = self.number
        tags = {"ImageNumber": str(n)} | ({} if n == self.flat else {"Height": "4", "Width": "4"})
        return SimpleNamespace(tags=tags, pix=np.full(16, n, np.uint32 if n == self.bad else np.uint16))


def test_tap_counts_an_image_it_cannot_publish_and_goes_on(receiver, caplog):
    pub = publisher_for(receiver)
    tap = pm.TaggedImageTap(LiveModeCore(), pub, poll_interval_s=0.001).start()
    deadline = time.monotonic() + 30
    while tap.published < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tap.is_alive()
    stats = tap.stop()
    frames = receiver.wait_for(stats.published)
    pub.close()
    assert stats.rejected == 2 and stats.errors == 0
    numbers = [f.header.meta["image_number"] for f in frames]
    assert 3 not in numbers and 6 not in numbers and numbers[:4] == [1, 2, 4, 5]  # 0 primed the tap
    assert len([r for r in caplog.records if "could not be published" in r.getMessage()]) == 2  # once each


def test_acquire_tap_ends_when_the_tap_stops_following(receiver, capsys):
    """A tap whose thread ended (here a BaseException from the core) must not leave `acquire
    pycromanager --frames N` waiting forever."""
    from umvd_live.apps import acquire

    pub = publisher_for(receiver)
    options = acquire.AcquireConfig(source="pycromanager", frames=1000, poll_ms=1)
    status = acquire._pycromanager_tap(options, pm, LiveModeCore(gone=10), pub)
    pub.close()
    assert status == acquire.EXIT_FAILED
    assert "stopped following" in capsys.readouterr().err


def _ctrl_c_as_in_a_terminal() -> None:
    """A shell gives a job it starts in the background (`pytest &`) SIGINT ignored, its children
    inherit that, and Python then leaves it ignored: the child would never see the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_aborts_an_owner_acquisition(tmp_path, receiver):
    """Ctrl-C in owner mode stops the acquisition at once (pycromanager's ``Acquisition.__exit__``
    would acquire every pending event first), with the summary and exit status 130."""
    cfg = write_config(tmp_path / "MMConfig.cfg")
    proc = subprocess.Popen(
        [sys.executable, "-m", "umvd_live", "acquire", "pycromanager", "--mode", "owner", "--config",
         str(cfg), "--frames", "1500", "--interval-ms", "20", "--save-dir", str(tmp_path / "raw"),
         "--to", receiver.endpoint], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        preexec_fn=_ctrl_c_as_in_a_terminal if os.name == "posix" else None)
    try:
        deadline = time.monotonic() + 90
        while len(receiver.frames) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(receiver.frames) >= 10, proc.stderr.read() if proc.poll() is not None else "no frames"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)  # 1500 frames at 20 ms take 30 s and more
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    acquired, sent, *lost = map(int, re.search(
        r"owner: (\d+) frames acquired in 1 stream\(s\), (\d+) sent, (\d+) dropped in the hand-off, "
        r"(\d+) dropped by the publisher, (\d+) rejected(?:, (\d+) not read or not published)?"
        r"(?:, (\d+) still queued)?", out).groups(default="0"))
    assert acquired < 1500
    assert acquired == sent + sum(lost), (out, err)  # every frame accounted for (a loaded machine may drop)
    frames = receiver.wait_for(sent)
    seqs = [f.header.seq for f in frames]
    assert len(seqs) == sent and seqs == sorted(set(seqs)), (out, err)
    if not any(lost):
        assert seqs == list(range(acquired))


# ------------------------------------------------------------------------------ command line


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_micromanager_gives_a_message_and_retries_with_backoff():
    out = run_umvd_live(*ACQUIRE, "--mode", "tap", "--mm-port", str(free_port()), "--connect-attempts", "3",
                        "--retry-s", "0.05")
    assert out.returncode == 4
    assert "Traceback" not in out.stderr
    retries = re.findall(r"attempt (\d)/3\); retrying in ([\d.]+) s", out.stderr)
    assert retries == [("1", "0.1"), ("2", "0.1")]  # 0.05 s then 0.1 s, printed to one decimal
    assert "Micro-Manager did not answer" in out.stderr and "Run pycro-manager server on port 4827" in out.stderr


def test_a_silent_server_on_the_port_is_reported_without_traceback():
    # Something listens but never replies: pycromanager's own connection attempt times out.
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        out = run_umvd_live(*ACQUIRE, "--mm-port", str(port), "--connect-attempts", "2", "--retry-s", "0.05")
    finally:
        silent.close(linger=0)
    assert out.returncode == 4
    assert "Traceback" not in out.stderr
    assert "Couldn't create Core" in out.stderr


def test_cli_owner_mode_on_the_python_backend(tmp_path, receiver):
    cfg = write_config(tmp_path / "MMConfig.cfg")
    out = run_umvd_live(*ACQUIRE, "--mode", "owner", "--config", str(cfg), "--frames", "20",
                        "--save-dir", str(tmp_path / "raw"), "--to", receiver.endpoint)
    assert out.returncode == 0, out.stderr
    assert "20 frames acquired in 1 stream(s), 20 sent, 0 dropped in the hand-off" in out.stdout
    frames = receiver.wait_for(20)
    assert [f.header.seq for f in frames] == list(range(20))
    (stack,) = (tmp_path / "raw").glob("cam0*/*.tif")
    assert tifffile.imread(stack).shape == (20, *SHAPE)


def test_cli_owner_mode_needs_frames():
    out = run_umvd_live(*ACQUIRE, "--mode", "owner", "--mm-port", str(free_port()), "--connect-attempts", "1")
    assert out.returncode == 2 and "--frames" in out.stderr


# ------------------------------------------------------------------------------ the Java GUI


@pytest.mark.skipif(not pm.port_answers(pm.MM_DEFAULT_PORT),
                    reason="no Micro-Manager answers on port 4827 (start the GUI with its pycro-manager "
                           "server enabled to run this test)")
def test_owner_mode_through_the_micromanager_gui(receiver, tmp_path):
    pm.connect_core(attempts=2, first_delay_s=0.5)
    pub = publisher_for(receiver)
    owner = pm.PycroManagerOwner(pub)
    pm.run_owner_acquisition(owner, 10, 0, directory=tmp_path, name="umvd_gui_test")
    stats = owner.close()
    frames = receiver.wait_for(10)
    pub.close()
    assert stats.sent == 10 and [f.header.seq for f in frames] == list(range(10))
