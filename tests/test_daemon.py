"""`umvd-live serve` end to end: a daemon subprocess, producer processes and a subscriber over
real loopback sockets on ephemeral ports, the real engine (lite preset, small frames, short warm
start so each test takes seconds)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from umvd_live.adapters.publisher import FramePublisher
from umvd_live.daemon.config import DaemonConfig
from umvd_live.daemon.engines import engine_factory, inference_layout
from umvd_live.daemon.service import Daemon
from umvd_live.daemon.statestore import checkpoint_stem
from umvd_live.daemon.status import render_lines, render_table
from umvd_live.daemon.streams import RateMeter, monotonic
from umvd_live.daemon.transport import Received
from umvd_live.engine import EngineConfig, StreamDenoiser, cpu_cores
from umvd_live.engine.checkpoint import CheckpointError, SavedWeights, load_checkpoint, save_checkpoint, weights_hash
from umvd_live.engine.model import DenoiserUNet
from umvd_live.engine.outputs import DenoisedFrame
from umvd_live.wire.protocol import decode_output, encode_end, encode_frame
from umvd_live.wire.security import PathNotAllowed, check_bind, confine_path

ENGINE_ARGS = ["--preset", "lite", "--device", "cpu", "--window", "7", "--warmup-frames", "40",
               "--warmup-steps", "10", "--status-interval", "1"]
HALF = 3  # N // 2 for N = 7
READY = re.compile(r"ready: input=(\S+) output=(\S+) control=(\S+)")


def engine(**fields) -> EngineConfig:
    """The daemon's engine for these tests: lite on the CPU, training in the background."""
    return EngineConfig(**({"preset": "lite", "device": "cpu", "train_mode": "background"} | fields))

#: A producer process: publishes the planned frames (and malformed messages) with the project's
#: FramePublisher, one per stream, paced at `rate` frames/s (0: as fast as possible).
PRODUCER = r"""
import json, sys, time
import msgpack, numpy as np, zmq
from umvd_live.adapters.publisher import FramePublisher

cfg = json.loads(sys.argv[1])
ctx = zmq.Context.instance()
pubs = {}
def publisher(stream):
    if stream not in pubs:
        pubs[stream] = FramePublisher(cfg["endpoint"], stream, sndhwm=100000)
        assert pubs[stream].wait_for_subscriber(20), "daemon never subscribed"
    return pubs[stream]

good = {"v": 1, "seq": 0, "shape": [8, 8], "dtype": "<u2"}
px = bytes(8 * 8 * 2)
BAD = {
    "part_count": [b"cam0", msgpack.packb(good)],
    "bad_msgpack": [b"cam0", b"\xc1\xc1", px],
    "header_not_map": [b"cam0", msgpack.packb([1, 2]), px],
    "missing_key": [b"cam0", msgpack.packb({"v": 1, "shape": [8, 8], "dtype": "<u2"}), px],
    "bad_dtype": [b"cam0", msgpack.packb(good | {"dtype": ">f8"}), px],
    "bad_shape": [b"cam0", msgpack.packb(good | {"shape": [100000, 100000]}), px],
    "size_mismatch": [b"cam0", msgpack.packb(good), px[:-2]],
    "bad_topic": [b"\xff\xfe", msgpack.packb(good), px],
}
bad_sock = None
if cfg["malformed"]:
    bad_sock = ctx.socket(zmq.XPUB)
    bad_sock.connect(cfg["endpoint"])
    assert bad_sock.poll(20000), "daemon never subscribed"
    bad_sock.recv()

malformed = {int(k): v for k, v in cfg["malformed"].items()}
rng = np.random.default_rng(0)
t0 = time.perf_counter()
for i, (stream, h, w, dtype) in enumerate(cfg["frames"]):
    yy, xx = np.mgrid[:h, :w]
    clean = 20 * (1 + 0.5 * np.sin(xx / 5 + i / 10) * np.cos(yy / 7))
    image = rng.poisson(clean).astype(dtype)
    assert publisher(stream).publish(image, t=i / 30, meta={"i": i})
    for kind in malformed.get(i, []):
        bad_sock.send_multipart(BAD[kind])
    if cfg["rate"]:
        time.sleep(max(0.0, t0 + (i + 1) / cfg["rate"] - time.perf_counter()))
for p in pubs.values():
    p.close()
if bad_sock is not None:
    bad_sock.close(linger=2000)
print(json.dumps({name: p.sent for name, p in pubs.items()}))
"""


class DaemonProcess:
    """`python -m umvd_live serve` on ephemeral loopback ports, its logs in files."""

    def __init__(self, tmp_path: Path, *extra: str, launcher: Sequence[str] = ("-m", "umvd_live"),
                 preexec_fn: Callable[[], None] | None = None):
        self.model_dir = tmp_path / "models"
        self.out_path = tmp_path / "daemon.out"
        self.err_path = tmp_path / "daemon.err"
        self.ready_path = tmp_path / "ready.json"
        self.ready_path.unlink(missing_ok=True)
        cmd = [sys.executable, *launcher, "serve",
               "--input", "tcp://127.0.0.1:*", "--output", "tcp://127.0.0.1:*",
               "--control", "tcp://127.0.0.1:*", "--output-dir", str(self.model_dir),
               "--ready-file", str(self.ready_path), *ENGINE_ARGS, *extra]
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, preexec_fn=preexec_fn)
        deadline = time.monotonic() + 60
        while True:
            if self.ready_path.is_file():  # written whole once every socket is bound
                self.ready = json.loads(self.ready_path.read_text())
                endpoints = self.ready["endpoints"]
                self.input, self.output, self.control = (endpoints[k] for k in ("input", "output", "control"))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"daemon did not start:\n{self.err_path.read_text()}")
            time.sleep(0.05)

    def request(self, msg: dict | bytes, timeout_s: float = 30) -> dict:
        ctx = zmq.Context.instance()
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        req.setsockopt(zmq.LINGER, 0)
        req.connect(self.control)
        try:
            req.send(msg if isinstance(msg, bytes) else msgpack.packb(msg))
            return msgpack.unpackb(req.recv())
        finally:
            req.close()

    def wait(self, timeout_s: float = 60) -> int:
        return self.proc.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.err_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Subscriber(threading.Thread):
    """Collects the daemon's output messages, by stream and kind, in arrival order."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 100000)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.connect(endpoint)
        # The subscription goes out right after the handshake: wait for it, so nothing the
        # daemon publishes from the first frame on is lost to the slow-joiner effect.
        assert monitor.poll(20000), "no connection to the daemon's output"
        recv_monitor_message(monitor)
        self.sock.disable_monitor()
        monitor.close()
        time.sleep(0.2)
        self.got: dict[tuple[str, str], list] = defaultdict(list)
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._halt.is_set():
            if self.sock.poll(50):
                msg = decode_output(self.sock.recv_multipart())
                self.got[(msg.stream, msg.kind)].append(msg)
        self.sock.close(linger=0)

    def denoised(self, stream: str) -> list:
        return self.got[(stream, "denoised")]

    def wait_for(self, stream: str, kind: str, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.got[(stream, kind)]) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def run_producer(endpoint: str, frames: list, rate: float = 30.0, malformed: dict | None = None) -> dict:
    cfg = {"endpoint": endpoint, "frames": frames, "rate": rate, "malformed": malformed or {}}
    out = subprocess.run([sys.executable, "-c", PRODUCER, json.dumps(cfg)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def daemon(tmp_path):
    started: list[DaemonProcess] = []

    def start(*extra: str, **options) -> DaemonProcess:
        started.append(DaemonProcess(tmp_path, *extra, **options))
        return started[-1]

    yield start
    for d in started:
        d.kill()


def test_stream_in_order_with_malformed_messages_then_shutdown(daemon):
    d = daemon("--catchup-ms", "60000")  # never skip: exactly one output per input
    assert d.ready["version"] == 1 and d.ready["pid"] == d.proc.pid and d.ready["umvd_live"]
    assert READY.search(d.log()).groups() == (d.input, d.output, d.control)  # the line for humans
    sub = Subscriber(d.output)
    kinds = ["part_count", "bad_msgpack", "header_not_map", "missing_key", "bad_dtype",
             "bad_shape", "size_mismatch", "bad_topic"]
    malformed = {str(5 + 10 * i): [kind] for i, kind in enumerate(kinds)}
    malformed["70"] = kinds  # a burst of every kind at once
    n = 90
    sent = run_producer(d.input, [["cam0", 64, 64, "<u2"]] * n, rate=30, malformed=malformed)
    assert sent == {"cam0": n}

    sub.wait_for("cam0", "denoised", n - HALF)
    status = d.request({"cmd": "status"})
    assert status["ok"]
    s = status["streams"]["cam0"]
    assert s["frames_in"] == n and s["frames_out"] == n - HALF and s["pending"] == HALF
    assert s["skipped"] == 0 and s["drops"] == 0
    assert s["rejected"] == {k: 2 for k in kinds if k != "bad_topic"}
    assert status["rejected_unattributed"] == {"bad_topic": 2}
    assert s["latency_ms"]["p50"] > 0 and s["state"] in ("warmup", "live")
    assert s["shape"] == [64, 64] and s["dtype"] == "<u2"
    assert any(line.startswith("stream cam0: in 90") for line in render_lines(status))
    console_text = io.StringIO()
    from rich.console import Console
    Console(file=console_text, width=200).print(render_table(status))
    assert "cam0" in console_text.getvalue()

    reply = d.request({"cmd": "shutdown"})
    assert reply == {"ok": True, "flushed": HALF}
    assert d.wait() == 0
    sub.wait_for("cam0", "denoised", n, timeout_s=5)
    sub.stop()

    out = sub.denoised("cam0")
    assert [m.header["seq"] for m in out] == list(range(n))
    for m in out:
        assert m.image.dtype == np.float32 and m.image.shape == (64, 64)
        assert np.isfinite(m.image).all()
        assert m.header["meta"] == {"i": m.header["seq"]} and m.header["t"] == m.header["seq"] / 30
        assert m.header["state"] in ("warmup", "live") and m.header["latency_ms"] >= 0
        assert isinstance(m.header["model_step"], int)
        assert isinstance(m.header["amplitude_gain"], float) and m.header["amplitude_gain"] >= 1.0
        assert m.header["jitter_shift_px"] is None  # 90 frames: the field's motion is measured over 96
    assert [m.header["seq"] for m in sub.got[("cam0", "raw")]] == list(range(n))
    raw = sub.got[("cam0", "raw")][10]
    assert raw.image.dtype == np.uint16 and raw.header["meta"] == {"i": 10}
    # Denoising changes the noisy input: the output is not the raw frame passed through.
    assert not np.allclose(out[40].image, sub.got[("cam0", "raw")][40].image)
    assert "exited cleanly" in d.log()


def test_control_commands_and_sigterm(daemon, tmp_path):
    d = daemon("--catchup-ms", "60000")  # never skip: every frame's output is checked below
    sub = Subscriber(d.output)
    run_producer(d.input, [["cam0", 32, 32, "<u2"]] * 30, rate=0)
    sub.wait_for("cam0", "denoised", 30 - HALF)
    status = d.request({"cmd": "status"})
    assert status["streams"]["cam0"]["frames_in"] == 30

    unknown = d.request({"cmd": "make_coffee"})
    assert unknown["ok"] is False and "unknown command" in unknown["error"]
    assert d.request(b"\xc1 not msgpack")["ok"] is False
    assert d.request({"no": "cmd"})["ok"] is False

    paused = d.request({"cmd": "pause_training"})
    assert paused == {"ok": True, "streams": ["cam0"], "training_paused": True}
    status = d.request({"cmd": "status"})
    assert status["training_paused"] and status["streams"]["cam0"]["training_paused"]
    assert d.request({"cmd": "pause_training", "stream": "nope"})["ok"] is False

    saved = d.request({"cmd": "save_model", "stream": "cam0", "path": "sub/cam0.pt"})
    assert saved["ok"], saved
    assert Path(saved["path"]) == (d.model_dir / "sub" / "cam0.pt").resolve()
    assert Path(saved["path"]).is_file() and isinstance(saved["weights_hash"], str)
    loaded = d.request({"cmd": "load_model", "path": "sub/cam0.pt"})  # the only stream
    assert loaded["ok"] and loaded["applied"] == "now"
    assert loaded["weights_hash"] == saved["weights_hash"]

    outside = tmp_path / "outside"
    outside.mkdir()
    (d.model_dir / "link").symlink_to(outside)
    for escape in ("../evil.pt", str(tmp_path / "evil.pt"), "link/evil.pt", "sub/../../evil.pt"):
        reply = d.request({"cmd": "save_model", "stream": "cam0", "path": escape})
        assert reply["ok"] is False, escape
    assert not list(tmp_path.glob("evil.pt")) and not list(outside.iterdir())
    (d.model_dir / "corrupt.pt").write_bytes(b"not a checkpoint")
    corrupt = d.request({"cmd": "load_model", "stream": "cam0", "path": "corrupt.pt"})
    assert corrupt["ok"] is False
    later = d.request({"cmd": "load_model", "stream": "cam1", "path": "sub/cam0.pt"})
    assert later["ok"] and later["applied"] == "at_first_frame"

    assert d.request({"cmd": "resume_training"})["training_paused"] is False
    reset = d.request({"cmd": "reset", "stream": "cam0"})
    assert reset == {"ok": True, "streams": ["cam0"]}
    sub.wait_for("cam0", "denoised", 30, timeout_s=10)  # a reset flushes what the old model owed
    s = d.request({"cmd": "status"})["streams"]["cam0"]
    assert s["resets"] == 1 and s["state"] == "warmup" and s["model_step"] == 0 and s["pending"] == 0

    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0
    sub.stop()
    assert [m.header["seq"] for m in sub.denoised("cam0")] == list(range(30))
    assert "stopping (SIGTERM)" in d.log() and "exited cleanly" in d.log()


#: `umvd-live serve` whose start-up ends in a wait, after the ready file is written, for a stop
#: signal (60 s at most): a signal sent once the ready file is there lands inside `Daemon.start`.
SIGNALLED_WHILE_STARTING = r"""
import sys, time
from umvd_live.apps.cli import main
from umvd_live.daemon.service import Daemon

start = Daemon.start

def start_then_wait(self):
    start(self)
    deadline = time.monotonic() + 60
    while not self._stop.requested and time.monotonic() < deadline:
        time.sleep(0.01)

Daemon.start = start_then_wait
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_starting_closes_the_daemon_cleanly(daemon, signame):
    """Ctrl-C or SIGTERM while `serve` starts (sockets bound, the ready file just written): the
    daemon's own clean stop, not the start-up's KeyboardInterrupt (exit status 130, no `close`, the
    ready file left behind): closed without serving, the ready file removed, exit status 0."""
    from test_pycromanager import _ctrl_c_as_in_a_terminal  # SIGINT's default, as a terminal gives it

    d = daemon(launcher=["-c", SIGNALLED_WHILE_STARTING], preexec_fn=_ctrl_c_as_in_a_terminal)
    d.proc.send_signal(getattr(signal, signame))
    assert d.wait() == 0, d.log()
    assert not d.ready_path.exists()
    assert f"stopping ({signame}) before serving" in d.log() and "exited cleanly" in d.log()


def test_shape_change_and_two_streams(daemon):
    d = daemon("--catchup-ms", "60000")
    sub = Subscriber(d.output)
    frames = []
    for i in range(40):
        frames.append(["cam0", 48, 48, "<u2"] if i < 20 else ["cam0", 40, 24, "<u2"])
        frames.append(["green", 32, 32, "|u1"])
    sent = run_producer(d.input, frames, rate=60)
    assert sent == {"cam0": 40, "green": 40}
    sub.wait_for("cam0", "denoised", 40 - HALF)
    sub.wait_for("green", "denoised", 40 - HALF)
    status = d.request({"cmd": "status"})
    assert status["streams"]["cam0"]["restarts"] == 1 and status["streams"]["green"]["restarts"] == 0
    assert status["streams"]["cam0"]["shape"] == [40, 24]
    assert status["streams"]["green"]["dtype"] == "|u1"
    assert d.request({"cmd": "shutdown"})["ok"]
    assert d.wait() == 0
    sub.wait_for("green", "denoised", 40, timeout_s=5)
    sub.stop()

    cam0 = sub.denoised("cam0")
    assert [m.header["seq"] for m in cam0] == list(range(40))
    assert all(m.image.shape == ((48, 48) if m.header["seq"] < 20 else (40, 24)) for m in cam0)
    green = sub.denoised("green")
    assert [m.header["seq"] for m in green] == list(range(40))
    assert all(m.image.shape == (32, 32) and m.image.dtype == np.float32 for m in green)
    assert "restarting its window and warm start" in d.log()


class CollectingSink:
    """A real FrameSink that keeps what it is given in memory and owes the streams named."""

    def __init__(self, owed: set[str]):
        self.owed = owed
        self.started: list = []
        self.raw: list = []
        self.denoised: list = []
        self.closed = False

    def owes(self, stream: str) -> bool:
        return stream in self.owed

    def on_stream_started(self, event):
        self.started.append(event)

    def on_raw(self, arrival):
        self.raw.append((arrival.frame.stream, arrival.frame.header.seq))

    def on_denoised(self, output):
        self.denoised.append(output)

    def close(self):
        self.closed = True


def test_preview_skips_when_behind_but_a_recorded_stream_gets_every_frame(tmp_path):
    config = DaemonConfig(engine=engine(warmup_frames=40, warmup_steps=10), input_bind="tcp://127.0.0.1:*",
                          output="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*", output_dir=tmp_path,
                          catchup_s=0.001)  # any backlog skips: deterministic on a fast machine
    sink = CollectingSink(owed={"rec"})
    d = Daemon(config, engine_factory(config), [sink])
    d.start()
    loop = threading.Thread(target=d.serve)
    loop.start()
    try:
        n = 120
        pubs = [FramePublisher(d.endpoints["input"], name, sndhwm=10000) for name in ("preview", "rec")]
        for p in pubs:
            assert p.wait_for_subscriber(10)
        rng = np.random.default_rng(0)
        req = zmq.Context.instance().socket(zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, 60000)
        req.connect(d.endpoints["control"])

        def status() -> dict:
            req.send(msgpack.packb({"cmd": "status"}))
            return msgpack.unpackb(req.recv())

        def publish(frames: int) -> None:
            for _ in range(frames):
                for p in pubs:
                    assert p.publish(rng.poisson(20.0, (64, 64)).astype(np.uint16))

        # The warm start's frames, then its training (the preview skips only the network's
        # outputs, whose cost it measures once live), then a burst far faster than the engine
        # infers: the first frame of the burst makes the streams live.
        publish(40)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            streams = status()["streams"]
            if all(streams.get(s, {}).get("engine", {}).get("train_steps", 0) >= 16 for s in ("preview", "rec")):
                break
            time.sleep(0.1)
        publish(n - 40)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            final = status()
            if all(final["streams"].get(s, {}).get("frames_in") == n for s in ("preview", "rec")):
                break
            time.sleep(0.1)
        req.send(msgpack.packb({"cmd": "shutdown"}))
        assert msgpack.unpackb(req.recv())["ok"]
        req.close(linger=0)
        for p in pubs:
            p.close()
    finally:
        d.request_stop("test over")
        loop.join(60)
        ended = d.status()["streams"]  # after the shutdown's flush: every output handed out
        d.close()

    # The snapshot taken while the last windows' passes ran adds up; the outputs handed out
    # after it (skipped ones too: they go out with their round) are counted by the end.
    preview, rec = final["streams"]["preview"], final["streams"]["rec"]
    assert preview["frames_in"] == rec["frames_in"] == n
    assert preview["frames_out"] + preview["skipped"] + preview["pending"] == n
    assert rec["skipped"] == 0 and rec["frames_out"] + rec["pending"] == n
    preview, rec = ended["preview"], ended["rec"]
    assert preview["skipped"] > 0, "the burst should have put the preview behind"
    assert preview["frames_out"] + preview["skipped"] == n and preview["pending"] == 0
    assert rec["skipped"] == 0 and rec["frames_out"] == n and rec["pending"] == 0
    recorded = [o for o in sink.denoised if o.stream == "rec"]
    assert [o.header.seq for o in recorded] == list(range(n))
    assert all(o.image is not None and o.image.shape == (64, 64) for o in recorded)
    previewed = [o for o in sink.denoised if o.stream == "preview"]
    assert [o.header.seq for o in previewed] == list(range(n))  # skipped ones come without image
    assert sum(o.image is None for o in previewed) == preview["skipped"]
    assert previewed[-1].image is not None  # the newest window is always shown
    assert len(sink.raw) == 2 * n and sink.closed
    assert {e.stream for e in sink.started} == {"preview", "rec"}


def _this_daemons_pass() -> bool:
    """Whether a pass of D seen by a global module hook is the test daemon's inference: the hook
    sees every thread, and a trainer or compiler thread an earlier test left finishing its step
    also runs D (it once made a count 4 passes too many in a fresh-clone CI run)."""
    thread = threading.current_thread()
    return torch.is_inference_mode_enabled() and (
        thread is threading.main_thread() or thread.name.startswith("umvd-infer"))


def test_waiting_frames_of_a_stream_are_denoised_in_batches(tmp_path, monkeypatch):
    """With --batch 4 and one worker, a backlog of one stream goes through the engine four frames
    at a time (one forward pass of D per run of ready windows), each stream's frames of a batch
    are taken together (runs break where the stream changes), and the outputs are those of a
    daemon that denoises one window at a time. With --workers 2 the runs are twice as long and
    their passes run on two threads, left running while the stream's next run follows."""
    with StreamDenoiser(EngineConfig(preset="lite", device="cpu", train_mode="inline")) as den:
        den.push(np.zeros((32, 32), np.uint16), infer=False)
        den.save_weights(tmp_path / "w.pt")
    rng = np.random.default_rng(3)
    order = ["a"] * 10 + ["b"] * 3 + ["a"] * 2
    images = [rng.poisson(20.0, (32, 32)).astype(np.uint16) for _ in order]
    seqs = {"a": 0, "b": 0}
    items = []
    for stream, image in zip(order, images):
        parts = [bytes(p) for p in encode_frame(stream, image, seqs[stream])]
        seqs[stream] += 1
        items.append(Received(parts, monotonic(), sum(map(len, parts))))

    def serve(batch: int, workers: int) -> tuple[list, list[int], set[int]]:
        config = DaemonConfig(engine=engine(init=str(tmp_path / "w.pt"), max_batch=batch, workers=workers),
                              input_bind="tcp://127.0.0.1:*", output="tcp://127.0.0.1:*",
                              control="tcp://127.0.0.1:*", output_dir=tmp_path)
        sink = CollectingSink(owed=set())
        d = Daemon(config, engine_factory(config), [sink])
        assert d.run_length == batch * workers
        d.set_training_paused(None, True)
        passes: list[int] = []  # D's batch size at each forward pass
        threads: set[int] = set()
        waits.clear()

        def hook(module, args, out):
            if isinstance(module, DenoiserUNet) and _this_daemons_pass():
                passes.append(args[0].shape[0])
                threads.add(threading.get_ident())

        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        d.start()
        try:
            d.router.process(items, allow_skip=False)
            d.finish()
        finally:
            handle.remove()
            d.close()
        return sink.denoised, passes, threads

    waits: list[tuple[int, bool]] = []  # frames and `wait` of each push_many
    push_many = StreamDenoiser.push_many

    def recording(self, frames, infer=None, tags=None, wait=True):
        waits.append((len(frames), wait))
        return push_many(self, frames, infer, tags, wait)

    monkeypatch.setattr(StreamDenoiser, "push_many", recording)
    batched, passes, _ = serve(4, 1)
    single, single_passes, _ = serve(1, 1)
    side_by_side, pair_passes, threads = serve(1, 2)
    # runs of 2 ready windows; every run leaves its passes running (its outputs come with the
    # stream's next run, or from `Router.collect` once they end)
    assert waits == [(2, False)] * 7 + [(1, False)]
    # a's 12 frames first (its 10, then the 2 that came after b's): kernel preparation (a blank
    # window) at its start, then runs of 4, 4, 4 frames -> 1, 4, 4 ready windows; b: preparation,
    # 3 frames -> none ready yet; the flushes: 3 each.
    assert passes == [1, 1, 4, 4, 1, 3, 3]
    assert single_passes == [1] * len(single_passes) and set(pair_passes) == {1}
    assert len(threads - {threading.get_ident()}) == 4, "each stream's engine ran passes on both its workers"
    assert [(o.stream, o.header.seq) for o in batched] == [(o.stream, o.header.seq) for o in single]
    assert [(o.stream, o.header.seq) for o in side_by_side] == [(o.stream, o.header.seq) for o in single]
    assert len(batched) == len(order) and all(o.state == "live" for o in batched)
    for got, want, pair in zip(batched, single, side_by_side):
        np.testing.assert_allclose(got.image, want.image, rtol=1e-4, atol=1e-2)
        np.testing.assert_allclose(pair.image, want.image, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("failing", [(10,), (12,), (10, 12), (8, 10)])
def test_an_engine_failure_in_a_run_left_running_loses_only_its_round(tmp_path, monkeypatch, failing):
    """A pass that fails loses its round only, counted as `engine_error`, and every other frame
    gets its output, in order, the last run's once its passes end (`Router.collect`, not with the
    stream's next frame). Runs of 2 frames: t = 0 (frames 0-3), 1-2 (frames 4-5), ..., 9-10
    (frames 12-13), 11-12 (frames 14-15, the batch's last run). t = 10: the round left running
    fails beside the last run, whose round is kept. t = 12: the last run's own round fails, found
    when it is collected, after its push completed the round before (t = 9, 10), whose outputs
    are kept. Both: two rounds lost. t = 8 and 10: the round the failed push left running fails
    too, when the stream settles after the failure."""
    with StreamDenoiser(EngineConfig(preset="lite", device="cpu", train_mode="inline")) as den:
        den.push(np.zeros((32, 32), np.uint16), infer=False)
        den.save_weights(tmp_path / "w.pt")
    rng = np.random.default_rng(4)
    items = []
    for seq in range(16):
        parts = [bytes(p) for p in encode_frame("a", rng.poisson(20.0, (32, 32)).astype(np.uint16), seq)]
        items.append(Received(parts, monotonic(), sum(map(len, parts))))
    config = DaemonConfig(engine=engine(init=str(tmp_path / "w.pt"), max_batch=1, workers=2),
                          input_bind="tcp://127.0.0.1:*", output="tcp://127.0.0.1:*",
                          control="tcp://127.0.0.1:*", output_dir=tmp_path)
    sink = CollectingSink(owed={"a"})
    d = Daemon(config, engine_factory(config), [sink])
    d.set_training_paused(None, True)
    real, failed = StreamDenoiser._denoise_chunk, []

    def denoise_chunk(den, chunk, band=None):  # fails the pass of each window in `failing`, once (not by
        for _, t, _, _ in chunk:  # counting passes: their order on two workers is the scheduler's)
            if t in failing and t not in failed:
                failed.append(t)
                raise RuntimeError("a pass failed")
        return real(den, chunk, band)

    monkeypatch.setattr(StreamDenoiser, "_denoise_chunk", denoise_chunk)
    d.start()
    try:
        d.router.process(items, allow_skip=False)
        live = d.router.streams["a"]
        run_out(d)  # the frame loop, without frames: the last round's outputs once it ends
        assert live.pending == live.denoiser.k  # owed: the last N//2, not the lost round's
        before_end = [o.header.seq for o in sink.denoised]
        d.finish()
    finally:
        d.close()
    lost = {r for t in failing for r in (t - 1, t)}  # their rounds
    assert sorted(failed) == list(failing) and live.counters.rejected["engine_error"] == len(lost)
    assert before_end == [t for t in range(13) if t not in lost]
    assert [o.header.seq for o in sink.denoised] == [t for t in range(16) if t not in lost]


def test_inference_layout_defaults_and_config_checks():
    config = DaemonConfig(engine=engine())
    assert inference_layout(config) == (1, 2 if cpu_cores() >= 2 else 1)
    assert inference_layout(replace(config, engine=engine(max_batch=3, workers=1))) == (3, 1)
    for bad, message in (({"max_batch": 0}, "max_batch must be >= 1"), ({"workers": 0}, "workers must be >= 1")):
        with pytest.raises(ValueError, match=message):
            engine(**bad)
    with pytest.raises(ValueError, match="background"):
        DaemonConfig(engine=EngineConfig(device="cpu"))  # inline training would hold the frame loop up
    for bad, message in (({"cpu_budget": 0}, "cpu-budget must be >= 1"), ({"max_streams": 0}, "max_streams"),
                         ({"idle_after_s": 0}, "idle_after_s"), ({"catchup_s": -1}, "catchup_s")):
        with pytest.raises(ValueError, match=message):
            DaemonConfig(engine=engine(), **bad)


# ---- small units --------------------------------------------------------------------------------
def test_confine_path(tmp_path):
    assert confine_path("a/b.pt", tmp_path) == (tmp_path / "a" / "b.pt").resolve()
    for bad in ("", "../x", "a/../../x", "/etc/passwd", "~/x", "a/..", 3, None, "a\x00b"):
        with pytest.raises(PathNotAllowed):
            confine_path(bad, tmp_path)


def test_check_loopback():
    for ok in ("tcp://127.0.0.1:5555", "tcp://localhost:*", "tcp://[::1]:5555", "ipc:///tmp/x"):
        check_bind(ok, allow_remote=False, curve=False)
    for bad in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.4:5555", "tcp://eth0:5555"):
        with pytest.raises(ValueError):
            check_bind(bad, allow_remote=False, curve=False)


def test_rate_meter_decays_after_the_stream_stops():
    meter = RateMeter(window_s=5.0)
    for i in range(300):
        meter.tick(i / 30)
    assert abs(meter.rate(10.0) - 30.0) < 1.0
    assert meter.rate(20.0) == 0.0


def test_record_start_and_stop_write_every_frame(daemon, tmp_path):
    import tifffile

    from umvd_live.recording.ometiff import read_provenance

    d = daemon()
    refused = d.request({"cmd": "record_start", "path": "../escape.ome.tif"})
    assert refused["ok"] is False and not list(tmp_path.glob("escape*"))
    started = d.request({"cmd": "record_start", "path": "rec/session.ome.tif", "raw": True})
    assert started["ok"], started
    assert d.request({"cmd": "record_start", "path": "again.ome.tif"})["ok"] is False
    run_producer(d.input, [["cam0", 32, 32, "<u2"]] * 40, rate=0)  # a burst: nothing skipped
    deadline = time.monotonic() + 60
    while d.request({"cmd": "status"})["streams"].get("cam0", {}).get("frames_in") != 40:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    status = d.request({"cmd": "status"})
    assert status["recording"]["recording"] and status["streams"]["cam0"]["skipped"] == 0
    assert d.request({"cmd": "shutdown"})["ok"] and d.wait() == 0  # flushes into the recording
    denoised = tifffile.imread(d.model_dir / "rec" / "session_cam0.ome.tif")
    raw = tifffile.imread(d.model_dir / "rec" / "session_cam0.raw.ome.tif")
    assert raw.shape == (40, 32, 32) and raw.dtype == np.uint16
    assert denoised.shape == (40, 32, 32) and denoised.dtype == np.float32
    assert np.isfinite(denoised).all()
    # the weights hash, made on the state worker, is in the finished files (never "pending")
    hashes = {read_provenance(d.model_dir / "rec" / f"session_cam0{kind}.ome.tif")["weights_sha256_at_start"]
              for kind in ("", ".raw")}
    assert len(hashes) == 1 and re.fullmatch(r"[0-9a-f]{64}", hashes.pop())


def test_record_stop(daemon):
    d = daemon()
    assert d.request({"cmd": "record_stop"})["ok"] is False  # nothing to stop
    assert d.request({"cmd": "record_start", "path": "a.ome.tif", "streams": ["cam0"]})["ok"]
    stopped = d.request({"cmd": "record_stop"})
    assert stopped["ok"] and stopped["recording"]["recording"] is False
    assert d.request({"cmd": "status"})["recording"] is None
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0


def received(parts) -> Received:
    """A message as the daemon's input thread hands it over, received now."""
    parts = [bytes(p) for p in parts]
    return Received(parts, monotonic(), sum(map(len, parts)))


def run_out(d: Daemon, timeout_s: float = 60.0) -> None:
    """Run the frame loop, without frames, until the rounds its engines left running have ended
    and their outputs gone out (`Router.collect`), as between a live stream's frames."""
    deadline = time.monotonic() + timeout_s
    while any(live.denoiser is not None and live.denoiser._running is not None for live in d.router.streams.values()):
        assert time.monotonic() < deadline, "a round left running never ended"
        d.run_once(0.05)


def daemon_in_process(tmp_path) -> tuple[Daemon, CollectingSink]:
    """A started daemon in this process (messages go to `router.process`), still warming up, with
    a sink that keeps its outputs."""
    config = DaemonConfig(engine=engine(warmup_frames=1000), input_bind="tcp://127.0.0.1:*",
                          output="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*", output_dir=tmp_path)
    sink = CollectingSink(owed=set())
    d = Daemon(config, engine_factory(config), [sink])
    d.start()
    return d, sink


def test_a_streams_end_hands_out_its_last_outputs_and_a_single_plane_comes_back_as_is(tmp_path):
    """The producer's end message (protocol `StreamEnd`) flushes that stream at once, without a
    shutdown: a time series gets its last N//2 outputs, and a stream of one time point (a plane of
    a z-stack, which is not a video) gets its frame back unchanged, marked warm-up. A stream that
    starts again after its end starts a new window: no frame of before the end enters it."""
    rng = np.random.default_rng(1)
    movie = [rng.poisson(30.0, (24, 24)).astype(np.uint16) for _ in range(10)]
    plane = rng.poisson(500.0, (24, 24)).astype(np.uint16)

    items = [received(encode_frame("ts", image, seq)) for seq, image in enumerate(movie)]
    items += [received(encode_frame("stack.z0", plane, 0)), received(encode_end("stack.z0", 1)),
              received(encode_end("ts", 10)), received(encode_end("never-seen", 0))]
    d, sink = daemon_in_process(tmp_path)
    try:
        d.router.process(items, allow_skip=False)
        out = {name: [o for o in sink.denoised if o.stream == name] for name in ("ts", "stack.z0")}
        assert [o.header.seq for o in out["ts"]] == list(range(10))  # all of them before any shutdown
        (single,) = out["stack.z0"]
        assert single.state == "warmup" and np.array_equal(single.image, plane.astype(np.float32))
        status = d.status()["streams"]
        assert status["ts"]["ends"] == 1 and status["ts"]["drops"] == 0
        assert "never-seen" not in status and d.status()["rejected_unattributed"] == {}
        # the stream starts again from seq 0: a new window, numbered anew, no restart counted
        d.router.process([received(encode_frame("ts", movie[0] * 0 + 7, 0)), received(encode_end("ts", 1))],
                         allow_skip=False)
        again = [o for o in sink.denoised if o.stream == "ts"][10:]
        assert len(again) == 1 and np.allclose(again[0].image, 7.0)  # only its own frame
        status = d.status()["streams"]["ts"]
        assert (status["ends"], status["seq_restarts"], status["restarts"]) == (2, 0, 0)
    finally:
        d.finish()
        d.close()


def test_a_stream_whose_last_flush_fails_still_lets_the_others_and_the_recording_finish(tmp_path, monkeypatch):
    """At shutdown one stream's final flush raises (an inference pass that fails): the other
    stream's last outputs still go out, the recording is finished (its files complete), and the
    daemon stops, as the shutdown command asked, rather than run on without taking frames."""
    from umvd_live.recording.ometiff import read_recording

    rng = np.random.default_rng(3)
    d, sink = daemon_in_process(tmp_path)
    try:
        assert d.control.handle({"cmd": "record_start", "path": "rec.ome.tif"}).result()["ok"]
        d.router.process([received(encode_frame(name, rng.poisson(30.0, (24, 24)).astype(np.uint16), seq))
                          for seq in range(8) for name in ("cam0", "cam1")], allow_skip=False)
        run_out(d)
        flush = StreamDenoiser.flush
        flushed: list[str] = []

        def first_fails(self):
            flushed.append("x")
            if len(flushed) == 1:
                raise RuntimeError("an inference pass failed in the final flush")
            return flush(self)

        monkeypatch.setattr(StreamDenoiser, "flush", first_fails)
        reply = d.control.handle({"cmd": "shutdown"}).result()
        assert d._stop.requested, f"the shutdown ({reply}) left the daemon running"
        counts = {name: sum(o.stream == name for o in sink.denoised) for name in ("cam0", "cam1")}
        assert sorted(counts.values()) == [8 - HALF, 8]  # one stream flushed in full, the other owed its last
        assert all(live.denoiser is None for live in d.router.streams.values())
        for name, count in counts.items():
            _, infos, provenance = read_recording(tmp_path / f"rec_{name}.ome.tif")
            assert provenance["complete"] and len(infos) == count
    finally:
        d.close()


# ---- streams, their slots and their checkpoints ----------------------------------------------------
class StepCounter:
    """A stand-in for `StreamDenoiser`, warm at once: every frame is a training step, its outputs
    are its inputs, and its weights (the step count) go to and come from real checkpoint files,
    so the daemon's stream and state-directory logic runs in milliseconds. Weights saved with
    ``foreign`` in their info are refused, as the engine refuses another network's (starting
    weights: at the first push, which builds its network)."""

    state, last_loss, warmup_progress, changes, warm, training_paused = "live", None, 1.0, [], True, False
    round_ended, on_pass_end = False, None  # its pushes run nothing on workers

    def __init__(self, init: str | None):
        self.model_step = self.frames_in = 0
        self.init = init

    def push_many(self, frames, infer=None, tags=None, wait=True):
        if self.frames_in == 0 and self.init is not None:
            self.load_weights(self.init)
        outputs = []
        for frame, tag in zip(frames, tags or [None] * len(frames)):
            self.model_step += 1
            self.frames_in += 1
            image = frame.astype(np.float32)
            outputs.append(DenoisedFrame(self.frames_in - 1, image, "live", self.model_step, tag=tag))
        return outputs

    def flush(self):
        return []

    def save_weights(self, path, info=None):
        weights = {"step": torch.tensor(float(self.model_step))}
        save_checkpoint(path, weights, {**(info or {}), "step": self.model_step})
        return self.model_step, weights_hash(weights)

    def weights_copy(self):
        return SavedWeights({"step": torch.tensor(float(self.model_step))}, {"step": self.model_step})

    def load_weights(self, path, weights=None):
        info = weights.info if weights is not None else load_checkpoint(path)[1]
        if info.get("foreign"):
            raise CheckpointError(f"{path}: weights are for another network")
        self.model_step = int(info["step"])

    def pause_training(self):
        pass

    resume_training = pause_training
    close = pause_training

    def weights_hash(self):
        return None

    def stats(self):
        return {}


def step_counter_daemon(tmp_path, **fields) -> Daemon:
    """A started daemon of `StepCounter` streams in this process (messages go to `router.process`)."""
    config = DaemonConfig(input_bind=None, output="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                          output_dir=tmp_path, **fields)
    d = Daemon(config, StepCounter)
    d.start()
    return d


def frames(stream: str, count: int, shape=(16, 16), first: int = 0) -> list[Received]:
    return [received(encode_frame(stream, np.full(shape, 7, np.uint16), seq)) for seq in range(first, first + count)]


def command(d: Daemon, **request) -> dict:
    return d.control.handle(request).result(timeout=60)


def checkpoint_file(state: Path, stream: str, shape: str = "16x16") -> Path:
    return state / "checkpoints" / f"{checkpoint_stem(stream)}.{shape}.u2.pt"


def test_reset_forgets_every_checkpoint_of_the_stream_also_after_its_end(tmp_path, monkeypatch):
    """`reset` drops the model: the checkpoints of every frame format the stream had (and one an
    earlier version left) go, also when the stream already ended, whose end wrote one, and also
    when the flush of a live stream fails; other streams keep theirs. Its next frames start fresh."""
    state = tmp_path / "state"
    d = step_counter_daemon(tmp_path, state_dir=state)
    try:
        d.router.process(frames("cam0", 5, (24, 24)) + frames("cam1", 3))
        d.router.process(frames("cam0", 4, first=5) + [received(encode_end("cam0", 9))])  # a shape change, an end
        save_checkpoint(state / "cam0.32x32.u2.pt", {"w": torch.zeros(1)}, {"step": 7})  # an earlier version's
        d.router.streams["cam1"].checkpoint()
        d.worker.submit(lambda: None).result()
        assert checkpoint_file(state, "cam0", "24x24").is_file() and checkpoint_file(state, "cam0").is_file()
        assert command(d, cmd="reset", stream="cam0")["ok"]
        d.worker.submit(lambda: None).result()
        assert sorted(p.name for p in state.rglob("*.pt")) == [checkpoint_file(state, "cam1").name]
        for shape in ((16, 16), (24, 24), (32, 32)):  # binning changed back and forth: fresh each time
            d.router.process(frames("cam0", 1, shape))
            s = d.status()["streams"]["cam0"]
            assert (s["resumed"], s["started_from"], s["model_step"]) == (0, None, 1), (shape, s)
        assert d.status()["streams"]["cam0"]["resets"] == 1

        d.router.streams["cam0"].checkpoint()  # a live stream whose flush fails at the reset
        d.worker.submit(lambda: None).result()
        monkeypatch.setattr(StepCounter, "flush", lambda self: 1 / 0)
        assert not command(d, cmd="reset", stream="cam0")["ok"]
        d.worker.submit(lambda: None).result()
        assert not list((state / "checkpoints").glob(f"{checkpoint_stem('cam0')}.*"))
    finally:
        d.close()


def test_a_stream_that_ended_gives_its_slot_to_a_new_one(tmp_path):
    """A producer that names a stream per position ends each: past --max-streams the stream idle
    longest of those that ended gives its slot (and its place in the status) to the new one. A
    live stream never does, nor one with a message waiting in the same batch."""
    d = step_counter_daemon(tmp_path, max_streams=2)
    try:
        for name in ("pos01", "pos02", "pos03"):
            d.router.process(frames(name, 3) + [received(encode_end(name, 3))])
        status = d.status()
        assert sorted(status["streams"]) == ["pos02", "pos03"] and status["rejected_unattributed"] == {}
        assert status["streams"]["pos03"]["ends"] == 1
        # pos02 has been idle longer, but a frame of it waits in the batch: pos03 makes room
        d.router.process(frames("pos02", 1, first=3) + frames("pos04", 2))
        assert sorted(d.stream_names()) == ["pos02", "pos04"]
        d.router.process(frames("pos05", 1))  # both live: refused
        assert sorted(d.stream_names()) == ["pos02", "pos04"]
        assert d.status()["rejected_unattributed"] == {"too_many_streams": 1}
    finally:
        d.close()


def test_a_refused_load_model_leaves_the_stream_its_checkpoint(tmp_path):
    """`load_model` of weights the stream's engine refuses (another network) changes nothing: the
    stream's next start still resumes its own checkpoint, not the refused file or from scratch.
    Weights it refuses only when it starts from them (named while the stream had ended) are
    dropped then, and its starts after that resume its checkpoints again: the final checkpoint of
    the model it started from scratch instead is written, even while that of the model before is
    still queued (a slow disk)."""
    state = tmp_path / "state"
    save_checkpoint(state / "other-net.pt", {"w": torch.ones(1)}, {"step": 5, "foreign": True})
    d = step_counter_daemon(tmp_path, state_dir=state)
    try:
        d.router.process(frames("cam0", 20))
        reply = command(d, cmd="load_model", stream="cam0", path="other-net.pt")
        assert not reply["ok"] and "another network" in reply["error"]
        d.router.process([received(encode_end("cam0", 20))] + frames("cam0", 1))  # the next acquisition
        s = d.status()["streams"]["cam0"]
        assert (s["resumed"], s["started_from"], s["model_step"]) == (1, str(checkpoint_file(state, "cam0")), 21)

        slow_disk = threading.Event()
        d.worker.submit(slow_disk.wait)
        d.router.process([received(encode_end("cam0", 1))])
        assert command(d, cmd="load_model", stream="cam0", path="other-net.pt")["applied"] == "at_first_frame"
        d.router.process(frames("cam0", 2))  # refused as it starts: from scratch, said so
        assert d.status()["streams"]["cam0"]["model_step"] == 2
        d.router.process([received(encode_end("cam0", 2))])
        slow_disk.set()
        d.router.process(frames("cam0", 1))
        s = d.status()["streams"]["cam0"]
        assert (s["resumed"], s["started_from"], s["model_step"]) == (2, str(checkpoint_file(state, "cam0")), 3)
    finally:
        d.close()


def test_load_model_for_a_stream_not_seen_yet_takes_no_slot(tmp_path):
    """Weights named for a stream before its first frame wait apart from the streams: a misspelt
    name takes no --max-streams slot and no place among the streams, and the stream it names
    starts from them when it comes."""
    save_checkpoint(tmp_path / "start.pt", {"w": torch.zeros(1)}, {"step": 40})
    d = step_counter_daemon(tmp_path, max_streams=1)
    try:
        reply = command(d, cmd="load_model", stream="camO", path="start.pt")  # a typo of cam0
        assert reply["ok"] and reply["applied"] == "at_first_frame" and d.stream_names() == []
        d.router.process(frames("cam0", 3))
        assert d.stream_names() == ["cam0"] and d.status()["rejected_unattributed"] == {}
        assert command(d, cmd="save_model")["stream"] == "cam0"  # the one stream, without naming it
        assert not command(d, cmd="reset", stream="camO")["ok"]
        d.router.process([received(encode_end("cam0", 3))])
        d.router.process(frames("camO", 1))  # in cam0's slot, now free
        s = d.status()["streams"]["camO"]
        assert (s["started_from"], s["model_step"]) == (str(tmp_path / "start.pt"), 41)
    finally:
        d.close()


def test_checkpoint_file_names_stay_apart_on_any_file_system(tmp_path):
    """Each stream's checkpoint is its own file, in a folder `save_model`/`load_model` cannot name:
    on a file system that ignores case too (``Cam0``/``cam0``), for Windows device names (``NUL``),
    and for a stream named like another's checkpoint, whose saved model once overwrote it. A file
    names its stream, and another stream's is not resumed. An earlier version's file still is."""
    from pathlib import PureWindowsPath

    state = tmp_path / "state"
    names = {"cam0": 5, "Cam0": 6, "NUL": 7, "cam0.16x16.u2": 8, "com1.x": 9}
    d = step_counter_daemon(tmp_path, state_dir=state)
    try:
        d.router.process([item for name, count in names.items() for item in frames(name, count)])
        assert command(d, cmd="save_model", stream="cam0.16x16.u2")["path"] == str(state / "cam0.16x16.u2.pt")
        for path in ("checkpoints/x.pt", "Checkpoints/x.pt", f"checkpoints/{checkpoint_file(state, 'cam0').name}"):
            assert "checkpoints" in command(d, cmd="save_model", stream="cam0", path=path)["error"]
    finally:
        d.close()  # the final checkpoints
    files = sorted(p.name for p in (state / "checkpoints").iterdir())
    assert len({name.casefold() for name in files}) == len(names) == len(files)
    assert not any(PureWindowsPath(name).is_reserved() for name in files), files
    assert load_checkpoint(checkpoint_file(state, "NUL"))[1]["stream"] == "NUL"
    # An earlier version's checkpoint of cam1, beside the saved models: still resumed. Cam0's file
    # replaced by cam0's: not Cam0's, so Cam0 starts fresh.
    save_checkpoint(state / "cam1.16x16.u2.pt", {"w": torch.zeros(1)}, {"step": 30})
    checkpoint_file(state, "Cam0").write_bytes(checkpoint_file(state, "cam0").read_bytes())
    d = step_counter_daemon(tmp_path, state_dir=state)
    try:
        d.router.process([item for name in [*names, "cam1"] for item in frames(name, 1)])
        steps = {name: s["model_step"] for name, s in d.status()["streams"].items()}
        assert steps == {name: count + 1 for name, count in names.items()} | {"Cam0": 1, "cam1": 31}
    finally:
        d.close()


def test_record_start_refuses_an_empty_list_of_streams(tmp_path):
    """``streams: []`` would record every stream while the reply said none: refused."""
    d = step_counter_daemon(tmp_path)
    try:
        reply = command(d, cmd="record_start", path="none.ome.tif", streams=[])
        assert not reply["ok"] and "at least one stream" in reply["error"]
        assert d.recording is None
    finally:
        d.close()


# ---- an engine that fails, a stream's end ----------------------------------------------------------
class Lagging(StepCounter):
    """A `StepCounter` whose outputs come HALF frames late, as the engine's centred window's do:
    its flush owes HALF outputs (and raises with ``fail_flush``, as a failed pass would)."""

    fail_flush = False

    def __init__(self, init: str | None):
        super().__init__(init)
        self.held: list[DenoisedFrame] = []

    def push_many(self, frames, infer=None, tags=None, wait=True):
        self.held += super().push_many(frames, infer, tags, wait)
        ready, self.held = self.held[:-HALF], self.held[-HALF:]
        return ready

    def flush(self):
        if self.fail_flush:
            raise RuntimeError("an inference pass failed in the flush")
        owed, self.held = self.held, []
        return owed


def test_a_failed_flush_at_a_streams_end_loses_only_that_streams_outputs_owed(tmp_path):
    """The flush at a stream's end raises: its outputs owed are counted as `engine_error`, the
    stream has ended all the same (its slot goes to a new stream), and the batch goes on for the
    other streams instead of the exception ending the frame loop."""
    config = DaemonConfig(input_bind=None, output="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                          output_dir=tmp_path, max_streams=2)
    sink = CollectingSink(owed=set())
    d = Daemon(config, Lagging, [sink])
    d.start()
    try:
        d.router.process(frames("a", 5) + frames("b", 5))
        d.router.streams["a"].denoiser.fail_flush = True
        d.router.process([received(encode_end("a", 5))] + frames("b", 3, first=5) + [received(encode_end("b", 8))])
        assert [o.header.seq for o in sink.denoised if o.stream == "b"] == list(range(8))
        assert [o.header.seq for o in sink.denoised if o.stream == "a"] == list(range(5 - HALF))
        a = d.status()["streams"]["a"]
        assert (a["ends"], a["rejected"], a["pending"], a["state"]) == (1, {"engine_error": HALF}, 0, "idle")
        d.router.process(frames("c", 1))  # a ended: its slot is free
        assert sorted(d.stream_names()) == ["b", "c"] and d.status()["rejected_unattributed"] == {}
    finally:
        d.close()


def test_a_streams_end_frees_its_slot_for_a_new_stream_in_the_same_batch(tmp_path):
    """Past --max-streams, a z-stack sent as one stream per plane, each ended after its frame, all
    waiting in one batch: each end frees a slot for the next plane, as it would in batches of
    their own, and every plane is denoised."""
    d = step_counter_daemon(tmp_path, max_streams=2)
    sink = CollectingSink(owed=set())
    d.router.sinks.append(sink)
    try:
        planes = [f"stack.z{z}" for z in range(5)]
        d.router.process([item for name in planes for item in frames(name, 2) + [received(encode_end(name, 2))]])
        assert [(o.stream, o.header.seq) for o in sink.denoised] == [(name, seq) for name in planes for seq in (0, 1)]
        assert d.status()["rejected_unattributed"] == {}
        assert sorted(d.stream_names()) == planes[-2:]
    finally:
        d.close()


def test_raw_frames_go_out_when_the_engine_fails_to_take_them(tmp_path, monkeypatch):
    """The raw output (the viewers' raw topic, a ``raw`` recording) gets every valid frame, also
    when its stream's engine fails before it takes them: the old model's flush at a shape change,
    a network that cannot be built."""
    d = step_counter_daemon(tmp_path)
    sink = CollectingSink(owed=set())
    d.router.sinks.append(sink)
    try:
        d.router.process(frames("cam0", 3))
        monkeypatch.setattr(d.router.streams["cam0"].denoiser, "flush", lambda: 1 / 0)
        d.router.process(frames("cam0", 2, (24, 24), first=3))  # a new ROI: the old model's flush fails

        def no_memory(init):
            raise MemoryError("cannot build the network")

        monkeypatch.setattr(d.router, "make_denoiser", no_memory)
        d.router.process(frames("cam1", 2))
        assert sink.raw == [("cam0", seq) for seq in range(5)] + [("cam1", 0), ("cam1", 1)]
        status = d.status()["streams"]
        assert status["cam0"]["rejected"]["engine_error"] >= 1 and status["cam1"]["rejected"] == {"engine_error": 2}
    finally:
        d.close()


def test_load_model_for_a_stream_that_ended_outlives_its_slot(tmp_path):
    """`load_model` for a stream that ended answers ``at_first_frame``: when its slot goes to a
    new stream meanwhile (--max-streams), the stream still starts from those weights when it
    comes back."""
    save_checkpoint(tmp_path / "w.pt", {"step": torch.tensor(500.0)}, {"step": 500})
    d = step_counter_daemon(tmp_path, max_streams=2)
    try:
        for name in ("pos01", "pos02"):
            d.router.process(frames(name, 3) + [received(encode_end(name, 3))])
        assert command(d, cmd="load_model", stream="pos01", path="w.pt")["applied"] == "at_first_frame"
        d.router.process(frames("pos03", 2) + [received(encode_end("pos03", 2))])  # in pos01's slot
        assert sorted(d.stream_names()) == ["pos02", "pos03"]
        d.router.process(frames("pos01", 1))  # its next time point, in pos02's slot
        s = d.status()["streams"]["pos01"]
        assert (s["started_from"], s["model_step"]) == (str(tmp_path / "w.pt"), 501)
    finally:
        d.close()


def test_a_reset_of_every_stream_resets_them_all_when_one_flush_fails(tmp_path, monkeypatch):
    """`reset` of every stream: the first stream's flush fails, yet every stream gets a new model,
    and the reply is an error that names the stream that failed (and only it)."""
    d = step_counter_daemon(tmp_path)
    try:
        d.router.process(frames("cam0", 3) + frames("cam1", 3) + frames("cam2", 3))
        monkeypatch.setattr(d.router.streams["cam0"].denoiser, "flush", lambda: 1 / 0)
        reply = command(d, cmd="reset")
        assert not reply["ok"] and "cam0" in reply["error"] and "cam1" not in reply["error"], reply
        status = d.status()["streams"]
        assert {name: (s["resets"], s["model_step"]) for name, s in status.items()} == \
            {name: (1, 0) for name in ("cam0", "cam1", "cam2")}
    finally:
        d.close()


def test_an_end_after_a_renumbering_counts_a_seq_jump_not_drops(tmp_path):
    """An end whose ``seq`` jumps past MAX_SEQ_GAP counts as a frame with that seq would: one
    `seq_jumps`, no drops; a small gap before an end counts its drops."""
    d = step_counter_daemon(tmp_path)
    try:
        d.router.process(frames("a", 3) + [received(encode_end("a", 5_000_000))])
        d.router.process(frames("b", 3) + [received(encode_end("b", 5))])
        status = d.status()["streams"]
        assert (status["a"]["drops"], status["a"]["seq_jumps"]) == (0, 1)
        assert (status["b"]["drops"], status["b"]["seq_jumps"]) == (2, 0)
    finally:
        d.close()


def test_a_recording_holds_the_same_frames_raw_and_denoised_from_its_start_to_its_stop(tmp_path):
    """An output is N//2 frames behind its input: the outputs that come after the start for frames
    received before it are not recorded, and a stop waits for the outputs of the frames taken,
    which come with the next frames. A stream that then goes idle owes nothing more."""
    from umvd_live.recording.ometiff import read_recording

    rng = np.random.default_rng(2)
    movie = [rng.poisson(30.0, (24, 24)).astype(np.uint16) for _ in range(40)]

    def send(stream: str, seqs: range) -> None:
        d.router.process([received(encode_frame(stream, movie[s], s)) for s in seqs], allow_skip=False)

    d, sink = daemon_in_process(tmp_path)
    try:
        send("ts", range(0, 5))
        d.start_recording("rec.ome.tif", None, raw=True)
        send("ts", range(5, 12))
        send("quiet", range(0, 6))
        run_out(d)
        stopped = d.stop_recording()
        half = d.config.engine.window // 2
        assert stopped["recording"]["recording"] is False
        assert stopped["finishing"] == {"ts": half, "quiet": half}
        assert d.status()["recording"] is None
        send("ts", range(12, 20))  # brings the outputs owed (and frames no longer recorded)
        d.run_once(wait_s=0)
        assert d.router.sinks.count(d._stopped_recordings[0]) == 1  # still owed by "quiet"
        d.router.streams["quiet"].idle = True  # no frame for --idle-s: what check_idle would set
        d._next_housekeeping = 0.0
        d.run_once(wait_s=0)
        assert d._stopped_recordings[0] not in d.router.sinks
    finally:
        d.finish()
    for name, taken in (("ts", range(5, 12)), ("quiet", range(0, 6 - half))):
        _, den, _ = read_recording(tmp_path / f"rec_{name}.ome.tif")
        raw_frames, raw, _ = read_recording(tmp_path / f"rec_{name}.raw.ome.tif")
        assert [f.seq for f in den] == list(taken), name
        assert [f.seq for f in raw] == list(range(5, 12) if name == "ts" else range(0, 6)), name


def test_a_recordings_weights_hash_is_made_off_the_frame_loop_of_the_weights_it_began_with(tmp_path, monkeypatch):
    """Hashing every weight tensor stalls the frame loop at 512² or with a large preset: the loop
    only copies the weights when a stream's recording begins, the state worker hashes the copy.
    The file names those weights, although the worker is held up until they changed, and says
    ``pending`` until the hash is known (what a kill then leaves: a readable recording)."""
    import umvd_live.daemon.service as service
    import umvd_live.engine.checkpoint as checkpoint
    import umvd_live.engine.stream as stream_module
    from umvd_live.recording.ometiff import read_recording

    hashed_on: list[str] = []
    for module in (checkpoint, service, stream_module):  # every name the weights hash goes by
        def tracing(state_dict, real=module.weights_hash):
            hashed_on.append(threading.current_thread().name)
            return real(state_dict)

        monkeypatch.setattr(module, "weights_hash", tracing)
    rng = np.random.default_rng(6)
    movie = [rng.poisson(30.0, (24, 24)).astype(np.uint16) for _ in range(14)]

    def send(seqs: range) -> None:
        d.router.process([received(encode_frame("ts", movie[s], s)) for s in seqs], allow_skip=False)

    path = tmp_path / "rec_ts.ome.tif"
    release = threading.Event()
    d, _ = daemon_in_process(tmp_path)
    try:  # 14 frames: fewer than min_train_frames, so no training step changes the weights below
        send(range(0, 4))
        den = d.router.streams["ts"].denoiser
        began = den.weights_copy()
        expected = weights_hash(began.state_dict)  # (the test module's own name: not traced)
        hashed_on.clear()  # (the engine hashes its starting weights as its stream starts: not ours)
        held = d.worker.submit(release.wait, 60)  # the state worker is busy (a checkpoint on a slow disk)
        d.start_recording("rec.ome.tif", None, raw=False)
        send(range(4, 10))  # the recording's first outputs: the weights are copied, the loop goes on
        assert threading.current_thread().name not in hashed_on, hashed_on  # the frame loop (this thread) did not hash
        deadline = time.monotonic() + 30
        while not path.is_file() or not read_recording(path)[1]:
            assert time.monotonic() < deadline, "the recording's file never got its first frame"
            time.sleep(0.05)
        assert read_recording(path)[2]["weights_sha256_at_start"] == "pending"
        # new weights before the worker gets to the hash: the file must still name the first ones
        den.load_weights("doubled.pt", SavedWeights({k: v * 2 for k, v in began.state_dict.items()}, began.info))
        assert weights_hash(den.weights_copy().state_dict) != expected
        send(range(10, 14))
        release.set()
        held.result(timeout=60)
        d.stop_recording()
    finally:
        release.set()
        d.finish()
    _, infos, provenance = read_recording(path)
    assert [f.seq for f in infos] == list(range(4, 14))
    assert provenance["complete"] and provenance["weights_sha256_at_start"] == expected
    # hashed once, on the state worker, never on the frame loop (this thread)
    assert len(hashed_on) == 1 and hashed_on[0].startswith(d.worker.THREAD_NAME), hashed_on
    d.close()


def test_a_raw_recording_begun_before_a_streams_first_frame_names_the_weights_of_its_first_outputs(tmp_path):
    """A recording with ``raw`` takes a stream's first frame before the frame is pushed, which
    builds the stream's network: its files still name the weights of its first denoised frames
    (no provenance error), raw and denoised alike. A stream that never gets a denoised frame
    recorded names none, and its file is finished without waiting for a hash that cannot come."""
    from umvd_live.recording.ometiff import read_recording

    rng = np.random.default_rng(7)

    def send(stream: str, seqs: range) -> None:
        d.router.process([received(encode_frame(stream, rng.poisson(30.0, (24, 24)).astype(np.uint16), s))
                          for s in seqs], allow_skip=False)

    d, _ = daemon_in_process(tmp_path)
    try:
        d.start_recording("rec.ome.tif", None, raw=True)
        send("ts", range(0, 8))  # fewer than min_train_frames: the weights stay those of the first outputs
        expected = weights_hash(d.router.streams["ts"].denoiser.weights_copy().state_dict)
        send("short", range(0, 2))  # no output before the stop
        d.stop_recording()
        d.router.streams["short"].idle = True  # what check_idle would set: its outputs will not come
        d._next_housekeeping = 0.0
        d.run_once(wait_s=0)
        began = time.monotonic()
    finally:
        d.finish()
    assert time.monotonic() - began < 30  # (not HASH_WAIT_S)
    for name in ("rec_ts.ome.tif", "rec_ts.raw.ome.tif"):
        _, infos, provenance = read_recording(tmp_path / name)
        assert provenance["complete"] and provenance["weights_sha256_at_start"] == expected, name
        assert "extra.provenance_error" not in provenance, provenance
    assert not (tmp_path / "rec_short.ome.tif").exists()
    _, infos, provenance = read_recording(tmp_path / "rec_short.raw.ome.tif")
    assert [f.seq for f in infos] == [0, 1] and provenance["complete"]
    assert provenance["weights_sha256_at_start"] is None and "weights_sha256_error" not in provenance
    d.close()


def test_a_recording_across_shape_changes_names_the_weights_of_each_engine_and_never_waits_on_a_hash(tmp_path):
    """At a shape change the old engine's last outputs, flushed as it closes, reach the recording
    after the new engine has started: the old-shape files still name the weights that made them
    (not the new network's, nor None), the new-shape files the new network's. A part left at a
    shape change never holds up the recorder's one writer while its hash is owed (the frames of
    the new shape are written before any output of it comes), and the stop does not wait for a
    hash (`HASH_WAIT_S`), also with a last shape that never got a denoised frame (None)."""
    from umvd_live.recording.ometiff import read_recording

    rng = np.random.default_rng(8)

    def send(shape: tuple[int, int], seqs: range) -> None:
        d.router.process([received(encode_frame("ts", rng.poisson(30.0, shape).astype(np.uint16), s))
                          for s in seqs], allow_skip=False)

    def all_written(session, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while (status := session.status()).frames_written < status.frames_submitted:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    d, _ = daemon_in_process(tmp_path)
    try:
        d.start_recording("rec.ome.tif", None, raw=True)
        session = d.recording.session
        send((24, 24), range(0, 2))  # fewer than window // 2: its outputs come only from the flush at the change
        den = d.router.streams["ts"].denoiser
        began = den.weights_copy()  # weights of their own, which a new network (same seed) has not
        doubled = SavedWeights({k: v * 2 for k, v in began.state_dict.items()}, began.info)
        den.load_weights("doubled.pt", doubled)
        first = weights_hash(doubled.state_dict)
        send((32, 32), range(2, 4))  # a new engine, no output of it yet: the first shape's hash is owed no more
        assert all_written(session), session.status()  # the writer was not held up by the part it left
        send((32, 32), range(4, 12))  # (fewer than min_train_frames: no training step changes the weights)
        second = weights_hash(d.router.streams["ts"].denoiser.weights_copy().state_dict)
        assert second != first
        send((16, 16), range(12, 14))  # a third engine, whose outputs will not come before the stop
        assert all_written(session), session.status()
        d.stop_recording()
        d.router.streams["ts"].idle = True  # what check_idle would set: its outputs will not come
        d._next_housekeeping = 0.0
        stopped = time.monotonic()
        d.run_once(wait_s=0)
        assert session.stop(wait=True, timeout=60)
        assert time.monotonic() - stopped < 20  # (not HASH_WAIT_S)
    finally:
        d.finish()
    parts = {"rec_ts": (first, [0, 1]), "rec_ts-part2": (second, list(range(2, 12))),
             "rec_ts-part3": (None, [12, 13])}
    for stem, (expected, seqs) in parts.items():
        for kind in ("", ".raw"):
            path = tmp_path / f"{stem}{kind}.ome.tif"
            if stem == "rec_ts-part3" and not kind:
                assert not path.exists()  # no denoised frame of the third shape
                continue
            _, infos, provenance = read_recording(path)
            assert [f.seq for f in infos] == seqs, path
            assert provenance["complete"] and provenance["weights_sha256_at_start"] == expected, path
            assert "weights_sha256_error" not in provenance, provenance
    d.close()


def test_a_streams_outputs_flushed_at_its_end_name_the_weights_that_made_them(tmp_path):
    """A stream shorter than the window's latency (a replay of a few frames, one z plane) gets all
    its outputs from the flush at its end, after its engine is gone: its files name the weights
    of that engine, not None (which says that no denoised frame was recorded)."""
    from umvd_live.recording.ometiff import read_recording

    rng = np.random.default_rng(9)
    d, _ = daemon_in_process(tmp_path)
    try:
        d.start_recording("rec.ome.tif", None, raw=True)
        d.router.process([received(encode_frame("short", rng.poisson(30.0, (24, 24)).astype(np.uint16), s))
                          for s in range(3)] + [received(encode_end("short", 3))], allow_skip=False)
        live = d.router.streams["short"]
        assert live.denoiser is None and live.final_weights is not None  # ended: its weights kept
        expected = weights_hash(live.final_weights.state_dict)
        d.stop_recording()
    finally:
        d.finish()
    for name in ("rec_short.ome.tif", "rec_short.raw.ome.tif"):
        _, infos, provenance = read_recording(tmp_path / name)
        assert [f.seq for f in infos] == [0, 1, 2], name
        assert provenance["complete"] and provenance["weights_sha256_at_start"] == expected, name
    d.close()


def test_load_model_reads_the_file_once_and_reports_the_weights_it_loaded(tmp_path, monkeypatch):
    """`load_model` into a live stream reads the model file once, on the frame loop, and the engine
    adopts what was read: the reply's weights hash names the weights loaded, also when the file is
    replaced meanwhile. Before, the engine read the file again: twice the loop's time, and a file
    replaced between the reads was loaded under the hash of the one before."""
    rng = np.random.default_rng(5)
    d, _ = daemon_in_process(tmp_path)
    try:  # 12 frames: fewer than min_train_frames, so no training step changes the weights below
        d.router.process([received(encode_frame("ts", rng.poisson(30.0, (24, 24)).astype(np.uint16), seq))
                          for seq in range(12)], allow_skip=False)
        saved = command(d, cmd="save_model", stream="ts", path="w.pt")
        assert saved["ok"], saved
        path = Path(saved["path"])
        state, info = load_checkpoint(path)
        reads: list[Path] = []
        torch_load = torch.load

        def counting_load(f, *args, **kwargs):
            if Path(f) == path:
                reads.append(path)
                try:
                    return torch_load(f, *args, **kwargs)
                finally:  # another model comes in right after the read (a copy replacing it)
                    save_checkpoint(path, {k: v * 2 for k, v in state.items()}, info)
            return torch_load(f, *args, **kwargs)

        monkeypatch.setattr(torch, "load", counting_load)
        reply = command(d, cmd="load_model", stream="ts", path="w.pt")
        assert reply["ok"] and reply["applied"] == "now", reply
        assert reads == [path]
        den = d.router.streams["ts"].denoiser
        assert reply["weights_hash"] == saved["weights_hash"] == weights_hash(state) == den.weights_hash()
    finally:
        d.close()  # (finishes it first)


def test_a_stream_that_ended_still_has_its_model_to_save(tmp_path):
    """Every acquisition source ends its streams, and the end closes the engine: the model it
    trained must still be there for save_model, with its step, until the stream starts again."""
    rng = np.random.default_rng(3)
    movie = [rng.poisson(30.0, (24, 24)).astype(np.uint16) for _ in range(12)]
    d, _ = daemon_in_process(tmp_path)
    try:
        d.router.process([received(encode_frame("ts", image, seq)) for seq, image in enumerate(movie)],
                         allow_skip=False)
        live = d.router.streams["ts"]
        before = live.denoiser.weights_hash()
        d.router.process([received(encode_end("ts", len(movie)))], allow_skip=False)
        assert live.denoiser is None and live.final_weights is not None
        reply = d.save_model("ts", tmp_path / "ended.pt").result(timeout=30)
        state, info = load_checkpoint(tmp_path / "ended.pt")
        assert reply["weights_hash"] == weights_hash(state) == before and info["stream"] == "ts"
        assert reply["model_step"] == info["step"] == d.status()["streams"]["ts"]["model_step"]
        d.router.process([received(encode_frame("ts", movie[0], 0))], allow_skip=False)  # starts again
        assert live.final_weights is None and live.denoiser is not None
    finally:
        d.finish()
