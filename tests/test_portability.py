"""Windows portability (issue 18, item 1): umvd-live without the POSIX-only APIs.

Windows' Python has no ``os.pwrite``/``os.pread``, no ``resource`` module, no ``fork``, no
``sched_getaffinity``, no ``O_NOFOLLOW``, no SIGKILL. `posix_absent` takes them away, as on
Windows: inside a test (the spill queue, the recorder, the peak-memory figure) and, for the
commands, from the start of a real subprocess (``denoise`` of a small movie, ``serve --record``
fed by ``acquire replay``). A scan of the sources keeps new POSIX-only calls out.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import posix_absent
import pytest
import tifffile
from command_line import run_umvd_live
from test_viewer import x_display  # noqa: F401 (the fixture: a DISPLAY for `view`)

from umvd_live.daemon.runtime import peak_rss_mb
from umvd_live.recording.ometiff import read_recording
from umvd_live.recording.session import RecordingRequest, RecordingSession
from umvd_live.recording.spillqueue import SpillQueue
from umvd_live.wire.control_client import ControlClient
from umvd_live.wire.protocol import FrameHeader

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).with_name("posix_absent.py")
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FAST_ENGINE = ["--preset", "lite", "--device", "cpu", "--window", "3", "--context", "none",
               "--warmup-frames", "6", "--warmup-steps", "5"]
#: umvd_live.apps.logs.FORMAT, as every command writes it
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) umvd_live[\w.]*: ",
                      re.MULTILINE)


@pytest.fixture
def windows_like(monkeypatch):
    """This process without the POSIX-only APIs, for the length of the test."""
    posix_absent.remove(monkeypatch)
    assert not hasattr(os, "pwrite") and not hasattr(os, "pread") and not hasattr(os, "sched_getaffinity")
    with pytest.raises(ImportError):
        import resource  # noqa: F401


def movie_with_metadata(path: Path, frames: int = 12, shape=(32, 32)) -> np.ndarray:
    """A small OME-TIFF movie that says its pixel size, interval, channel and start."""
    movie = np.random.default_rng(0).poisson(30, (frames, *shape)).astype(np.uint16)
    tifffile.imwrite(path, movie, ome=True, metadata={
        "axes": "TYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "TimeIncrement": 0.1,
        "TimeIncrementUnit": "s", "Channel": {"Name": "GCaMP"}, "AcquisitionDate": "2024-05-06T07:08:09"})
    return movie


def ome_image(path: Path):
    """The file's OME Image as ome-types reads it (validated against the schema)."""
    ome_types = pytest.importorskip("ome_types")
    with tifffile.TiffFile(path) as tif:
        return ome_types.from_xml(tif.pages.first.description, validate=True).images[0]


def assert_input_metadata(path: Path) -> None:
    image = ome_image(path)
    pixels = image.pixels
    assert (pixels.physical_size_x, pixels.physical_size_y) == (0.5, 0.5)
    assert pixels.time_increment == pytest.approx(0.1)
    assert [c.name for c in pixels.channels] == ["GCaMP"]
    assert image.acquisition_date is not None and image.acquisition_date.isoformat().startswith("2024-05-06T07:08:09")


# -- in this process ------------------------------------------------------------------------------
def test_spill_queue_spills_and_reads_back_without_pwrite(windows_like, tmp_path):
    """Spilling and reading back run side by side on one descriptor: seek + write/read under a lock."""
    q = SpillQueue(tmp_path, memory_budget_bytes=4 * 32 * 32 * 4, hard_limit_bytes=10**9)
    n = 200
    got: list[tuple[dict, np.ndarray]] = []

    def consume() -> None:
        while len(got) < n:
            item = q.get(timeout=10)
            assert item is not None
            got.append(item)
            if len(got) % 20 == 0:
                time.sleep(0.01)  # let a backlog build up again

    consumer = threading.Thread(target=consume)
    consumer.start()
    for i in range(n):
        q.put({"i": i}, np.full((32, 32), i, np.float32))
        if i % 50 == 0:
            time.sleep(0.05)
    consumer.join(60)
    spilled = q.stats().spilled_total
    q.close()
    assert [h["i"] for h, _ in got] == list(range(n))
    assert all((a == h["i"]).all() for h, a in got)
    assert spilled > 0, "the budget of 4 frames should have made the queue spill"


def test_recorder_writes_and_spills_without_pwrite(windows_like, tmp_path, monkeypatch):
    shape = (128, 128)  # 64 KiB a frame, over the budget: frames wait in the spill file
    # The writer is held at its first frame until every frame is submitted, so the backlog must
    # spill: left to race, a busy machine's writer could take each frame before the spill thread.
    submitted = threading.Event()
    write_one = RecordingSession._write_one

    def held(self, *args):
        assert submitted.wait(60)
        write_one(self, *args)

    monkeypatch.setattr(RecordingSession, "_write_one", held)
    session = RecordingSession(RecordingRequest(path=tmp_path / "w.ome.tif", memory_budget_bytes=16 * 1024,
                                                hard_limit_bytes=10**9))
    for seq in range(100):
        image = np.full(shape, seq, np.float32) + np.arange(shape[1], dtype=np.float32)
        assert session.submit_denoised("cam0", FrameHeader(seq, shape, "<f4", t=seq / 10,
                                                           meta={"pixel_size_um": 0.5}),
                                       image, state="live", model_step=seq)
    # and until the spill thread has spilled some of the backlog (on a loaded machine it runs late)
    deadline = time.monotonic() + 30
    while session.status().spilled_total == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    submitted.set()
    assert session.stop(wait=True, timeout=60)
    status = session.status()
    assert status.error is None and status.frames_written == 100 and status.spilled_total > 0
    frames, infos, provenance = read_recording(tmp_path / "w_cam0.ome.tif")
    assert [i.seq for i in infos] == list(range(100)) and provenance["complete"]
    np.testing.assert_array_equal(frames[:, 0, 0], np.arange(100, dtype=np.float32))
    assert tifffile.imread(tmp_path / "w_cam0.ome.tif").shape == (100, *shape)
    assert ome_image(tmp_path / "w_cam0.ome.tif").pixels.time_increment == pytest.approx(0.1)


def test_peak_memory_without_resource(windows_like):
    peak = peak_rss_mb()  # psutil's figure, as on Windows
    assert 10 < peak < 1e6



#: SIGBREAK's number on Windows (Ctrl-Break, CTRL_BREAK_EVENT); Linux has no SIGBREAK.
SIGBREAK = 21


@pytest.fixture
def with_sigbreak(monkeypatch):
    """``signal.SIGBREAK`` as on Windows, and a ``signal.signal`` that notes the handlers it is
    given instead of installing them (21 is another signal here): {signal number: handler}."""
    monkeypatch.setattr(signal, "SIGBREAK", SIGBREAK, raising=False)
    installed: dict[int, object] = {}

    def note(signum, handler):
        previous = installed.get(signum, signal.getsignal(signum))
        installed[signum] = handler
        return previous

    monkeypatch.setattr(signal, "signal", note)
    return installed


def test_serve_stops_cleanly_on_ctrl_break(with_sigbreak, tmp_path, monkeypatch):
    """Windows never delivers SIGTERM, and Ctrl-Break (CTRL_BREAK_EVENT, the only console event a
    daemon started with CREATE_NEW_PROCESS_GROUP receives, as `apps.harness` starts it) is
    SIGBREAK, which by default ends the process at once: nothing flushed, no final checkpoint, no
    recording finished. `serve` handles it as SIGINT and SIGTERM: the loop stops, the streams are
    flushed, the final checkpoints written, the ready file removed, exit status 0."""
    from test_daemon import StepCounter

    from umvd_live.daemon import service
    from umvd_live.daemon.config import DaemonConfig
    from umvd_live.daemon.streams import monotonic
    from umvd_live.daemon.transport import Received
    from umvd_live.engine.checkpoint import load_checkpoint
    from umvd_live.wire.protocol import encode_frame

    def received(seq: int) -> Received:
        parts = [bytes(p) for p in encode_frame("cam0", np.full((16, 16), seq, "<u2"), seq)]
        return Received(parts, monotonic(), sum(map(len, parts)))

    monkeypatch.setattr(service, "engine_factory", lambda config: StepCounter)
    serve, stopped = service.Daemon.serve, []

    def ctrl_break_while_serving(self, display=None):
        self.router.process([received(seq) for seq in range(3)])
        handler = with_sigbreak.get(SIGBREAK)
        assert callable(handler), f"no handler for SIGBREAK: {with_sigbreak}"
        handler(SIGBREAK, None)  # Ctrl-Break
        stopped.append((self._stop.requested, handler))
        serve(self, display)

    monkeypatch.setattr(service.Daemon, "serve", ctrl_break_while_serving)
    ready = tmp_path / "ready.json"
    config = DaemonConfig(input_bind="tcp://127.0.0.1:*", output="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                          output_dir=tmp_path, state_dir=tmp_path / "state", checkpoint_interval_s=3600,
                          ready_file=ready, status_interval_s=3600)
    assert service.run(config) == 0
    [(requested, handler)] = stopped
    assert requested
    assert {signal.SIGINT, signal.SIGTERM, SIGBREAK} <= with_sigbreak.keys()
    assert handler not in {with_sigbreak[sig] for sig in (signal.SIGINT, signal.SIGTERM, SIGBREAK)}  # put back
    state, info = load_checkpoint(next((tmp_path / "state" / "checkpoints").glob("*.pt")))
    assert info["stream"] == "cam0" and info["step"] == 3  # the final checkpoint, at the clean stop
    assert not ready.exists()


@pytest.mark.parametrize("while_starting", ["Ctrl-Break", "a failure", "KeyboardInterrupt"])
def test_serve_interrupted_while_starting_closes_once_and_puts_the_handlers_back(
        while_starting, with_sigbreak, tmp_path, monkeypatch, caplog):
    """`serve`'s stop handlers are in place before its sockets are bound: Ctrl-Break (as SIGINT
    and SIGTERM) while it starts closes it without serving, exit status 0; before, it was taken as
    Ctrl-C (KeyboardInterrupt, 130) and the daemon's `close` skipped, a ready file just written
    left behind. Every way out of a start that got halfway (that, a failure, a KeyboardInterrupt)
    closes the daemon once and puts back the handlers `apps.cli.main` had put in place."""
    import zmq
    from test_daemon import StepCounter

    from umvd_live.daemon import service
    from umvd_live.daemon.config import DaemonConfig
    from umvd_live.portable import ctrl_c, stop_signals_as_ctrl_c

    monkeypatch.setattr(service, "engine_factory", lambda config: StepCounter)
    start, close, serve = service.Daemon.start, service.Daemon.close, service.Daemon.serve
    calls: list[str] = []

    def start_then_interrupted(self):
        start(self)  # the sockets bound, the ready file written
        assert ready.is_file()
        if while_starting == "Ctrl-Break":
            with_sigbreak[SIGBREAK](SIGBREAK, None)  # the handler in place, as the signal calls it
        elif while_starting == "a failure":
            raise zmq.ZMQError(zmq.EADDRINUSE)
        else:
            raise KeyboardInterrupt

    def counted_close(self):
        calls.append("close")
        close(self)

    def counted_serve(self, display=None):
        calls.append("serve")
        serve(self, display)

    monkeypatch.setattr(service.Daemon, "start", start_then_interrupted)
    monkeypatch.setattr(service.Daemon, "close", counted_close)
    monkeypatch.setattr(service.Daemon, "serve", counted_serve)
    ready = tmp_path / "ready.json"
    config = DaemonConfig(input_bind="tcp://127.0.0.1:*", output="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                          output_dir=tmp_path, ready_file=ready, status_interval_s=3600)
    sigint = signal.getsignal(signal.SIGINT)
    caplog.set_level("INFO", logger="umvd_live")
    with stop_signals_as_ctrl_c():  # as `apps.cli.main` runs every command
        try:
            status = service.run(config)
        except KeyboardInterrupt:
            status = 130
        after = dict(with_sigbreak)
    assert status == {"Ctrl-Break": 0, "a failure": 2, "KeyboardInterrupt": 130}[while_starting]
    assert calls == ["close"]  # once, and no serving
    assert not ready.exists()
    assert after.get(signal.SIGINT, sigint) is sigint  # Python's, untouched by `apps.cli.main`
    assert after[signal.SIGTERM] is ctrl_c and after[SIGBREAK] is ctrl_c
    if while_starting == "Ctrl-Break":
        assert "before serving" in caplog.text and "exited cleanly" in caplog.text


def test_the_demos_streaming_loop_notes_ctrl_break_as_ctrl_c(with_sigbreak):
    """The demo's streaming loop notes Ctrl-Break as it notes Ctrl-C (`StopSignals`); outside it
    Ctrl-Break ends the demo as every command (`test_every_command_ends_on_ctrl_break_as_on_ctrl_c`)."""
    from umvd_live.apps import demo

    with demo.StopSignals() as stop:
        with_sigbreak[SIGBREAK](SIGBREAK, None)
    assert stop.received == SIGBREAK


#: Each command as `umvd-live` runs it (before its files or daemon are looked at): (argv, the
#: module whose ``run`` it calls).
COMMANDS = {
    "acquire": (["acquire", "sim"], "umvd_live.apps.acquire"),
    "denoise": (["denoise", "in.tif", "out.tif"], "umvd_live.apps.denoise"),
    "batch": (["batch", "in.tif", "--output-dir", "out"], "umvd_live.apps.batch"),
    "bench": (["bench"], "umvd_live.apps.bench"),
    "view": (["view"], "umvd_live.viewer.qt.app"),
    "demo": (["demo"], "umvd_live.apps.demo"),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_ends_on_ctrl_break_as_on_ctrl_c(command, with_sigbreak, monkeypatch):
    """Ctrl-Break (SIGBREAK), left to its default, ends a Windows process at once: a recording
    neither flushed nor closed, the daemon never told. Every command takes it, and SIGTERM, as
    Ctrl-C, from before its module is imported (torch, on a loaded machine, takes seconds) to its
    end: its KeyboardInterrupt clean-up runs and `umvd-live` exits with 130. SIGINT is left to
    Python; the handlers are put back after."""
    import importlib

    from umvd_live.apps import cli
    from umvd_live.portable import ctrl_c

    argv, module_name = COMMANDS[command]
    module = importlib.import_module(module_name)
    at_import: dict[int, object] = {}

    def tune_process(name):
        at_import.update(with_sigbreak)
        return importlib.import_module(name)

    def interrupted(*args, **kwargs):
        handler = with_sigbreak.get(SIGBREAK)
        assert handler is ctrl_c and with_sigbreak.get(signal.SIGTERM) is ctrl_c, f"running {command}: {with_sigbreak}"
        handler(SIGBREAK, None)  # Ctrl-Break, as the signal would call it
        raise AssertionError("Ctrl-Break did not interrupt the command")

    monkeypatch.setattr(cli, "tune_process", tune_process)
    monkeypatch.setattr(cli.logs, "configure", lambda level: None)  # this process's logging left alone
    monkeypatch.setattr(module, "run", interrupted)
    assert cli.main(argv) == 130
    assert at_import.get(SIGBREAK) is ctrl_c and at_import.get(signal.SIGTERM) is ctrl_c
    assert signal.SIGINT not in at_import
    assert with_sigbreak[SIGBREAK] is not ctrl_c and with_sigbreak[signal.SIGTERM] is not ctrl_c  # put back


def test_a_command_run_from_another_thread_leaves_the_signals_alone():
    """Python sets signal handlers from the main thread only: a command that an embedding
    application runs on a thread of its own runs with the handlers as they are."""
    from umvd_live.portable import stop_signals_as_ctrl_c

    before = signal.getsignal(signal.SIGTERM)
    errors: list[BaseException] = []

    def command() -> None:
        try:
            with stop_signals_as_ctrl_c():
                assert signal.getsignal(signal.SIGTERM) is before
        except BaseException as exc:  # noqa: BLE001 (reported to the test's thread)
            errors.append(exc)

    thread = threading.Thread(target=command)
    thread.start()
    thread.join()
    assert errors == [] and signal.getsignal(signal.SIGTERM) is before


def test_ctrl_break_calls_what_ctrl_c_calls_now(monkeypatch):
    """`portable.ctrl_c` calls SIGINT's handler of the moment (napari's during `view`'s event loop,
    which quits the loop; a KeyboardInterrupt raised in a Qt slot would be lost), and raises
    KeyboardInterrupt where SIGINT has none of Python's (a shell's background job ignores it)."""
    from umvd_live.portable import ctrl_c

    called = []
    monkeypatch.setattr(signal, "getsignal", lambda signum: lambda *args: called.append((signum, *args)))
    ctrl_c(SIGBREAK, "frame")
    assert called == [(signal.SIGINT, signal.SIGINT, "frame")]
    for unhandled in (signal.SIG_IGN, signal.SIG_DFL, None, ctrl_c):
        monkeypatch.setattr(signal, "getsignal", lambda signum, handler=unhandled: handler)
        with pytest.raises(KeyboardInterrupt):
            ctrl_c(SIGBREAK, None)


def test_a_refused_rename_of_a_model_file_is_retried_then_reported(tmp_path, monkeypatch):
    """Windows refuses ``os.replace`` over a file another process holds open without delete sharing
    (a virus scanner scanning the last checkpoint, a viewer): PermissionError until it lets go.
    A checkpoint, a saved model and the ready file (`write_atomically`) retry, briefly, as an
    OME-Zarr store's metadata does (test_zarr.py); refused for good, the error is raised, the
    previous file is intact and no temporary is left."""
    import torch

    from umvd_live.engine.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "cam0.pt"
    save_checkpoint(path, {"w": torch.ones(2)}, {"step": 1})
    real, calls = os.replace, []

    def refused_thrice(src, dst):
        calls.append(dst)
        if len(calls) <= 3:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process",
                                  str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", refused_thrice)
    save_checkpoint(path, {"w": torch.full((2,), 2.0)}, {"step": 2})
    assert len(calls) == 4 and load_checkpoint(path)[1]["step"] == 2

    def refused(src, dst):
        raise PermissionError(13, "in use", str(dst))

    from umvd_live import portable

    monkeypatch.setattr(os, "replace", refused)
    monkeypatch.setattr(portable, "REPLACE_RETRY_S", 0.2)
    started = time.monotonic()
    with pytest.raises(PermissionError):
        save_checkpoint(path, {"w": torch.full((2,), 3.0)}, {"step": 3})
    assert 0.15 < time.monotonic() - started < 2
    monkeypatch.setattr(os, "replace", real)
    assert load_checkpoint(path)[1]["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["cam0.pt"]  # no temporary left


# -- the sources ----------------------------------------------------------------------------------
def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside a ``try`` that catches ImportError, or in a branch that tested the platform."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            return True
        if isinstance(node, (ast.If, ast.IfExp)) and re.search(
                r"sys\.platform|os\.name|hasattr\(os|hasattr\(signal", ast.unparse(node.test)):
            return True
    return False


#: Known, in files this change does not own (issue 18 report): (path, API). Each is a Windows failure.
KNOWN_ELSEWHERE: set[tuple[str, str]] = set()  # (file, API) allowed unguarded: none now


def test_no_unguarded_posix_only_api_in_the_package_and_tools():
    """umvd_live/, adapters/ and tools/ use a POSIX-only module, os function or signal only behind a
    platform test or an ImportError fallback (getattr with a default is fine too)."""
    os_names, signals, modules = set(posix_absent.OS_NAMES), set(posix_absent.SIGNAL_NAMES), set(posix_absent.MODULES)
    found = []
    for folder in ("umvd_live", "adapters", "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
            for node in ast.walk(tree):
                bad = None
                if isinstance(node, ast.Import):
                    bad = next((a.name for a in node.names if a.name.split(".")[0] in modules), None)
                elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in modules:
                    bad = node.module
                elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                        node.value.id == "os" and node.attr in os_names
                        or node.value.id == "signal" and node.attr in signals):
                    bad = f"{node.value.id}.{node.attr}"
                where = path.relative_to(ROOT).as_posix()
                if bad and not _guarded(node, parents) and (where, bad) not in KNOWN_ELSEWHERE:
                    found.append(f"{where}:{node.lineno}: {bad}")
    assert not found, "POSIX-only, with no portable path:\n" + "\n".join(found)


# -- the commands, in processes without them from the start ---------------------------------------
@pytest.mark.timeout(420)
def test_denoise_without_posix_apis_keeps_the_input_metadata(tmp_path):
    src, out = tmp_path / "in.ome.tif", tmp_path / "out.ome.tif"
    movie = movie_with_metadata(src)
    done = subprocess.run([sys.executable, str(HELPER), "denoise", str(src), str(out), *FAST_ENGINE,
                           "--steps-per-frame", "0.5"], capture_output=True, text=True, env=ENV, timeout=400,
                          check=False)
    assert done.returncode == 0, done.stderr
    frames, infos, _ = read_recording(out)
    assert frames.shape == movie.shape and [i.seq for i in infos] == list(range(len(movie)))
    assert_input_metadata(out)


READY = re.compile(r"ready: input=(\S+) output=(\S+) control=(\S+)")


@pytest.mark.timeout(420)
def test_serve_record_without_posix_apis_killed_keeps_frames_and_metadata(tmp_path):
    """`serve --record` where the POSIX-only APIs never existed, fed by `acquire replay` of a file
    with metadata, then killed (TerminateProcess on Windows): every frame and the metadata, from
    a checkpoint, are in the file."""
    src = tmp_path / "in.ome.tif"
    movie = movie_with_metadata(src, frames=20)
    err_path = tmp_path / "serve.err"
    cmd = [sys.executable, str(HELPER), "serve", "--input", "tcp://127.0.0.1:*", "--output", "tcp://127.0.0.1:*",
           "--control", "tcp://127.0.0.1:*", "--output-dir", str(tmp_path), "--record", str(tmp_path / "rec.ome.tif"),
           *FAST_ENGINE, "--status-interval", "3600"]
    with open(err_path, "w") as err:
        daemon = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=ENV)
    try:
        deadline = time.monotonic() + 180
        while not (match := READY.search(err_path.read_text())):
            assert daemon.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.1)
        endpoint, _, control = match.groups()
        replay = run_umvd_live("acquire", "replay", "--file", src, "--to", endpoint, "--rate", "20", "--wait-s", "60",
                               timeout=200, env=ENV)
        assert replay.returncode == 0, replay.stderr
        client = ControlClient(control, timeout_s=30)
        try:
            while (client.request("status")["recording"] or {}).get("frames_written", 0) < len(movie):
                assert time.monotonic() < deadline + 120, client.request("status")["recording"]
                time.sleep(0.2)
        finally:
            client.close()
        time.sleep(2.5)  # at least one checkpoint (every second) after the last frame
        daemon.kill()
        daemon.wait(30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(30)
    log = err_path.read_text()
    assert LOG_LINE.search(log), log  # the one log format (umvd_live.apps.logs)
    rec = tmp_path / "rec_cam0.ome.tif"
    frames, _, provenance = read_recording(rec)
    assert len(frames) == len(movie) and not provenance["complete"]  # killed: no clean close
    assert provenance["frames_declared_in_ome"] == len(movie)
    assert_input_metadata(rec)


def test_a_ready_file_windows_will_not_open_yet_is_not_ready(tmp_path, monkeypatch):
    """Windows refuses to open a file while it is renamed over (PermissionError): a launcher
    polling the ready file reads that as not there yet, as it reads a missing file."""
    from umvd_live.apps.harness import ReadySignal

    ready = tmp_path / "ready.json"
    assert ReadySignal.read(ready) is None
    ready.write_text("{}")

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "The process cannot access the file because it is being used by another process")

    monkeypatch.setattr(Path, "read_text", refused)
    assert ReadySignal.read(ready) is None


# -- Ctrl-Break, really sent ----------------------------------------------------------------------
def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT's default in the child, as a terminal gives it (`test_pycromanager`'s helper: a
    background job's children have it ignored)."""
    from test_pycromanager import _ctrl_c_as_in_a_terminal as default_sigint

    default_sigint()


KEYS = {"Ctrl-C": signal.SIGINT, "Ctrl-Break": posix_absent.SIGBREAK}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("key", KEYS)
def test_acquire_stops_on_ctrl_break_as_on_ctrl_c(key, receiver):
    """`acquire` in a Windows-like process, stopped by Ctrl-C or Ctrl-Break: the same clean stop,
    its summary, the stream's end sent to the daemon (which then hands out the stream's last
    outputs at once), exit status 130. Ctrl-Break left to its default ended it at once: no summary,
    no end message."""
    proc = subprocess.Popen([sys.executable, str(HELPER), "acquire", "sim", "--to", receiver.endpoint,
                             "--size", "32", "32", "--rate", "50", "--wait-s", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=_ctrl_c_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 240
        while len(receiver.frames) < 10:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1] if proc.poll() else ""
            time.sleep(0.05)
        proc.send_signal(KEYS[key])
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (key, proc.returncode, err)
    assert re.search(r"^sim: interrupted after \d+ frames sent", out, re.MULTILINE), out
    deadline = time.monotonic() + 10
    while not receiver.ends and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [end.stream for end in receiver.ends] == ["cam0"]


@pytest.mark.gui
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("x_display")
def test_view_closes_on_ctrl_break_as_on_ctrl_c(tmp_path):
    """`view` in a Windows-like process: Ctrl-Break while napari's event loop runs closes the
    window and stops the session (its sockets closed), exit status 130, as Ctrl-C does (napari
    quits its loop on SIGINT; a KeyboardInterrupt raised in a Qt slot instead would be lost and
    leave the window open until --quit-after)."""
    pytest.importorskip("napari", reason="napari is not installed (pip install 'umvd-live[viewer]')")
    import msgpack
    import zmq

    ctx = zmq.Context.instance()
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    control = rep.bind_to_random_port("tcp://127.0.0.1")
    requests = 0

    def answer(wait_ms: int) -> None:
        nonlocal requests
        if rep.poll(wait_ms):
            rep.recv()
            rep.send(msgpack.packb({"ok": True, "streams": {}}))
            requests += 1

    err_path = tmp_path / "view.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, str(HELPER), "view", "--connect", "tcp://127.0.0.1:9",
                                 "--control", f"tcp://127.0.0.1:{control}", "--quit-after", "200"],
                                stdout=subprocess.DEVNULL, stderr=err, env=ENV | {"DISPLAY": os.environ["DISPLAY"]},
                                preexec_fn=_ctrl_c_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 180
        while requests < 1:  # the widget's session is running
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            answer(50)
        settle = time.monotonic() + 3  # and the event loop, right after it
        while time.monotonic() < settle:
            answer(50)
        proc.send_signal(posix_absent.SIGBREAK)
        sent = time.monotonic()
        while proc.poll() is None and time.monotonic() < sent + 60:
            answer(50)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        rep.close()
    assert proc.returncode == 130, (proc.returncode, err_path.read_text())
    assert time.monotonic() - sent < 60


@pytest.mark.timeout(420)
def test_the_harness_ends_a_daemon_on_windows_with_ctrl_break_before_terminating_it(tmp_path, monkeypatch):
    """`ServeProcess.kill` on Windows sends Ctrl-Break (``CTRL_BREAK_EVENT``: the daemon runs in its
    own process group) and waits for the clean exit (streams flushed, final checkpoints, the ready
    file removed) before terminating it: a demo ended by a mistake or a second Ctrl-C leaves no
    daemon killed mid-write. Here the daemon is a Windows-like process and the harness believes
    it runs on Windows."""
    from umvd_live.apps.harness import ServeProcess

    daemon = ServeProcess(tmp_path, FAST_ENGINE, umvd_live=[sys.executable, str(HELPER)])
    try:
        daemon.wait_ready(240)
        daemon.status()  # the frame loop runs: its own stop handlers are in place
        time.sleep(0.5)
        with monkeypatch.context() as windows:
            windows.setattr(sys, "platform", "win32")
            windows.setattr(signal, "CTRL_BREAK_EVENT", posix_absent.SIGBREAK, raising=False)
            started = time.monotonic()
            daemon.kill(clean_exit_s=60)
        took = time.monotonic() - started
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
        daemon.stop(30)
    assert daemon.proc.returncode == 0, daemon.log()
    assert "exited cleanly" in daemon.log() and not daemon.ready_path.exists()
    assert took < 60
