"""Protocol fuzz of `umvd-live serve`: thousands of malformed messages mixed into valid streams.

Starts a real daemon subprocess on ephemeral loopback ports and sends it, over one connection (so
the order is kept), a deterministic mix of:
- malformed messages, every one labelled with the rejection reason the protocol (docs/protocol.md)
  prescribes and the stream it must be counted on: random bytes and wrong part counts, msgpack that
  is not a map or has non-string keys, negative/zero/float/huge shapes, object/big-endian/void/
  unsupported dtypes, payloads of the wrong size, bad seq/t/meta/version, oversized headers, bad
  topics, and random header bytes (their reason is whatever decoding yields);
- valid uint16 frames on ``cam0``, with ``seq`` jumping forward, jumping far, and going back to 0;
- valid float32 frames on ``flt``, every tenth with NaN/Inf pixels (a frame with them is never
  trained on, nor is any window that contains it), more of them once its model is live.
While it sends, it samples the daemon's RSS and threads and times ``status`` requests sent back to
back, until every message is accounted for: the control reply latency under the flood (max, p99,
p50; issue 17 asks for every reply within 0.5 s), and how many replies the control thread sent
from the last snapshot because the frame loop was busy. Then it shuts the daemon down (which
flushes every output) and checks that every valid frame got its denoised frame, finite, and that
the counters add up.

    python tools/fuzz_daemon.py --malformed 20000 --json fuzz.json

`tests/test_fuzz.py` runs the same with 5000 malformed messages.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import psutil
import zmq
from zmq.utils.monitor import recv_monitor_message

from umvd_live.engine.checkpoint import load_checkpoint
from umvd_live.wire.control_client import ControlClient, DaemonUnavailable
from umvd_live.wire.protocol import ProtocolError, decode_frame, decode_output, encode_frame

ENGINE_ARGS = ["--preset", "lite", "--device", "cpu", "--window", "7", "--warmup-frames", "40",
               "--warmup-steps", "10", "--catchup-ms", "600000", "--status-interval", "2",
               "--idle-s", "300"]
UNATTRIBUTED = "-"  # stream key of rejections counted under rejected_unattributed


def _h(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


GOOD = {"v": 1, "seq": 0, "shape": [8, 8], "dtype": "<u2"}
PX = bytes(8 * 8 * 2)


def _variants(reason: str, headers: list[Any], topic: bytes = b"cam0", px: bytes = PX) -> list[tuple[list[bytes], str]]:
    return [([topic, h if isinstance(h, bytes) else _h(h), px], reason) for h in headers]


#: Fixed malformed messages by category: (parts, the reason the protocol prescribes).
FIXED: dict[str, list[tuple[list[bytes], str]]] = {
    "part_count": [([b"cam0"], "part_count"), ([b"cam0", _h(GOOD)], "part_count"),
                   ([b"cam0", _h(GOOD), PX, b"x"], "part_count"),
                   ([b"cam0", _h(GOOD), PX, b"", b""], "part_count")],
    "not_a_map": _variants("header_not_map", [[1, 2], 7, "header", None, _h(b"bytes"), 1.5, True]),
    "non_str_keys": _variants("bad_msgpack", [{1: 1}, {1.5: 2}, {None: "v"}, {True: 1}])
                    + _variants("bad_version", [{b"v": 1, b"seq": 0, b"shape": [8, 8], b"dtype": "<u2"}]),
    "bad_msgpack": _variants("bad_msgpack", [b"\xc1", b"\xc1\xc1\xc1", b"\x92\x01", b"\xdf\xff\xff\xff\xff"]),
    "bad_version": _variants("bad_version", [GOOD | {"v": 2}, GOOD | {"v": "1"},
                                             {k: v for k, v in GOOD.items() if k != "v"}]),
    "missing_key": _variants("missing_key", [{k: v for k, v in GOOD.items() if k != key}
                                             for key in ("seq", "shape", "dtype")]),
    "bad_seq": _variants("bad_seq", [GOOD | {"seq": s} for s in (-1, 2.5, "3", True, None, -(2**63))]),
    "bad_shape": _variants("bad_shape", [GOOD | {"shape": s} for s in (
        [-1, 8], [8, -8], [0, 8], [8, 0], [8.0, 8.0], [100000, 100000], [16385, 1], [16384, 16384],
        [2**63, 2**63], [64], [2, 8, 8], "8x8", [True, 8], None, {"h": 8})]),
    "bad_dtype": _variants("bad_dtype", [GOOD | {"dtype": d} for d in (
        "|O", "O", "object", ">f8", ">u2", "V10", "|V10", "<f8", "<c8", "float32", "uint16", "",
        "<u2 ", "<U4", "|b1", "<M8[ns]", 5, None, ["<u2"])]),
    "size_mismatch": [([b"cam0", _h(GOOD), PX[:n] if n <= len(PX) else bytes(n)], "size_mismatch")
                      for n in (0, 1, 127, 129, 256, 100_000)],
    "bad_time": _variants("bad_time", [GOOD | {"t": t} for t in (float("nan"), float("inf"), "now", True, [1])]),
    "bad_meta": _variants("bad_meta", [GOOD | {"meta": m} for m in ([1], 3, "x", True)]),
    "header_too_large": _variants("header_too_large", [GOOD | {"meta": {"pad": "x" * 70_000}}]),
    "bad_topic": [([t, _h(GOOD), PX], "bad_topic") for t in (
        b"", b"bad topic", b"\xff\xfe", b"a" * 65, b"cam0/raw", b"cam0\x00", "caméra".encode())],
}
#: Categories whose rejection is not counted on a stream (their topic names none).
UNATTRIBUTED_CATEGORIES = {"bad_topic", "random_bytes"}


def random_message(rng: np.random.Generator, category: str) -> tuple[list[bytes], str]:
    """Random-content messages; their expected reason comes from the protocol's own decoder
    (what matters here is that the daemon survives and counts them)."""
    if category == "random_bytes":  # random part count, random content; a topic that is no name
        n = int(rng.integers(1, 7))
        parts = [b"\xff" + rng.bytes(int(rng.integers(0, 16)))]
        parts += [rng.bytes(int(rng.integers(0, 300))) for _ in range(n - 1)]
    else:  # random_header: a valid topic and pixels, random header bytes
        parts = [b"cam0", rng.bytes(int(rng.integers(0, 48))), PX]
    try:
        decode_frame(parts)
    except ProtocolError as exc:
        return parts, exc.reason
    return random_message(rng, category)  # random bytes that decode: astronomically rare; redraw


CATEGORIES = [*FIXED, "random_bytes", "random_header"]


@dataclass
class Plan:
    """What the fuzzer sends, in order, and what the daemon must report afterwards."""

    messages: list[list[bytes]] = field(default_factory=list)
    #: Sent once ``flt``'s model is live: NaN/Inf frames must not poison a trained model either.
    tail: list[list[bytes]] = field(default_factory=list)
    sent_by_category: Counter = field(default_factory=Counter)
    expected_rejections: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    valid: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # meta "i"
    expected_seq: dict[str, dict[str, int]] = field(default_factory=dict)
    nonfinite_frames: int = 0
    nonfinite_pixels: int = 0

    @property
    def malformed(self) -> int:
        return sum(sum(c.values()) for c in self.expected_rejections.values())


def build_plan(n_malformed: int, *, seed: int = 0, size: int = 64, valid_every: int = 12,
               float_every: int = 3) -> Plan:
    """``n_malformed`` malformed messages round-robin over the categories; a valid ``cam0``
    frame after every ``valid_every`` of them, a ``flt`` frame after every ``float_every`` cam0
    frames. The first two messages are valid, so both streams exist before any rejection."""
    rng = np.random.default_rng(seed)
    plan = Plan()
    yy, xx = np.mgrid[:size, :size]
    seqs = {"cam0": 0, "flt": 0}
    drops = jumps = restarts = 0
    counter = {"cam0": 0, "flt": 0}

    def valid(stream: str, out: list[list[bytes]] = plan.messages) -> None:
        nonlocal drops, jumps, restarts
        i = counter[stream]
        counter[stream] += 1
        clean = 200 * (1 + 0.5 * np.sin(xx / 5 + i / 10) * np.cos(yy / 7))
        seq = seqs[stream]
        if stream == "cam0":
            image = rng.poisson(clean).astype("<u2")
            if i == 60:  # frames lost upstream
                seq += 5
                drops += 5
            elif i == 120:  # a renumbering far ahead: not counted as drops
                seq += 2_000_000
                jumps += 1
            elif i == 180:  # the producer restarted
                seq = 0
                restarts += 1
        else:
            image = (rng.poisson(clean) / 7.0).astype("<f4")
            if i % 10 == 9:  # rare enough to leave clean 7-frame windows to train on
                kind = (i // 10) % 5
                if kind == 0:
                    image[5:9, 3:20] = np.nan
                elif kind == 1:
                    image[:, 10] = np.inf
                elif kind == 2:
                    image[rng.random(image.shape) < 0.05] = -np.inf
                elif kind == 3:
                    image[:] = np.nan  # a frame with no finite pixel at all
                else:
                    image[2:4, 7] = 1e30  # finite, but no measurement (a flat field's dead pixel)
                plan.nonfinite_frames += 1
                plan.nonfinite_pixels += int((~np.isfinite(image) | (np.abs(image) > 1e20)).sum())
        out.append([bytes(p) for p in encode_frame(stream, image, seq, t=i / 30.0, meta={"i": i})])
        plan.valid[stream].append(i)
        seqs[stream] = seq + 1

    valid("cam0")
    valid("flt")
    position = {c: 0 for c in FIXED}
    for k in range(n_malformed):
        category = CATEGORIES[k % len(CATEGORIES)]
        if category in FIXED:
            parts, reason = FIXED[category][position[category] % len(FIXED[category])]
            position[category] += 1
        else:
            parts, reason = random_message(rng, category)
        stream = UNATTRIBUTED if category in UNATTRIBUTED_CATEGORIES else "cam0"
        plan.messages.append(parts)
        plan.sent_by_category[category] += 1
        plan.expected_rejections[stream][reason] += 1
        if (k + 1) % valid_every == 0:
            valid("cam0")
            if counter["cam0"] % float_every == 0:
                valid("flt")
    for _ in range(30):
        valid("flt", plan.tail)
    plan.expected_seq["cam0"] = {"drops": drops, "seq_jumps": jumps, "seq_restarts": restarts}
    plan.expected_seq["flt"] = {"drops": 0, "seq_jumps": 0, "seq_restarts": 0}
    return plan


# ---- the daemon side ----------------------------------------------------------------------------
def private_input_endpoint() -> str:
    """A free loopback port below the kernel's ephemeral range, for the daemon's input.

    The fuzz figures count every rejection exactly. A socket another program (or an earlier test)
    left connecting to a port in the ephemeral range, which `tcp://127.0.0.1:*` binds draw from,
    would deliver its queued messages to a new daemon that happens to get that port; a port below
    the range is never handed out that way.
    """
    low = 20000
    try:
        low_eph = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low_eph = 32768
    rng = np.random.default_rng()
    for _ in range(100):
        port = int(rng.integers(low, max(low + 1, low_eph)))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return f"tcp://127.0.0.1:{port}"
    return "tcp://127.0.0.1:*"


class Daemon:
    """`python -m umvd_live serve` on loopback ports, logs to files."""

    def __init__(self, workdir: Path, extra: list[str] = ()):
        self.err_path = workdir / "daemon.err"
        self.model_dir = workdir / "models"
        ready = workdir / "ready.json"
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "umvd_live", "serve", "--input", private_input_endpoint(),
               "--output", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
               "--output-dir", str(self.model_dir), "--ready-file", str(ready), *ENGINE_ARGS, *extra]
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(workdir / "daemon.out", "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + 120
        while not ready.is_file():  # written whole once every socket is bound
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"daemon did not start:\n{self.err_path.read_text()}")
            time.sleep(0.05)
        endpoints = json.loads(ready.read_text())["endpoints"]
        self.input, self.output, self.control = (endpoints[k] for k in ("input", "output", "control"))
        self.ps = psutil.Process(self.proc.pid)

    def request(self, msg: dict, timeout_s: float = 60) -> dict:
        # A client per call: the sampler thread and the main thread ask concurrently.
        client = ControlClient(self.control, timeout_s)
        try:
            return client.request(**msg)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Collector(threading.Thread):
    """Subscribes to the daemon's output (waiting for the handshake first) and keeps the
    denoised frames' ``meta.i``, state and finiteness per stream."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 1_000_000)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.connect(endpoint)
        if not monitor.poll(30000):
            raise RuntimeError("no connection to the daemon's output")
        recv_monitor_message(monitor)
        self.sock.disable_monitor()
        monitor.close()
        time.sleep(0.3)  # the subscription follows the handshake
        self.denoised: dict[str, list[int]] = defaultdict(list)
        self.raw: Counter = Counter()
        self.nonfinite_outputs = 0
        self.states: Counter = Counter()
        self.state_of: dict[tuple[str, int], str] = {}
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._halt.is_set():
            if self.sock.poll(50):
                msg = decode_output(self.sock.recv_multipart())
                if msg.kind == "raw":
                    self.raw[msg.stream] += 1
                    continue
                i = (msg.header.get("meta") or {}).get("i", msg.header["seq"])
                self.denoised[msg.stream].append(i)
                self.states[msg.header["state"]] += 1
                self.state_of[(msg.stream, i)] = msg.header["state"]
                if not np.isfinite(msg.image).all():
                    self.nonfinite_outputs += 1
        self.sock.close(linger=0)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


class Sampler(threading.Thread):
    """Samples the daemon's RSS and thread count, and times status requests (one every
    ``status_every_s``, each on a connection made beforehand, so a reply's time is the daemon's),
    while it runs."""

    def __init__(self, daemon: Daemon, every_s: float = 0.05, status_every_s: float = 0.05):
        super().__init__(daemon=True)
        self.d = daemon
        self.every_s, self.status_every_s = every_s, status_every_s
        self.peak_rss = 0
        self.peak_threads = 0
        self.status_rtt_s: list[float] = []
        self.status_stale = 0  # replies sent from the last snapshot: the frame loop was busy
        self.status_failures = 0
        self.last_status: dict | None = None
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        client = ControlClient(self.d.control, 30)
        try:
            self._sample(client)
        finally:
            client.close()

    def _sample(self, client: ControlClient) -> None:
        next_status = 0.0
        while not self._halt.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self.d.ps.memory_info().rss)
                self.peak_threads = max(self.peak_threads, self.d.ps.num_threads())
            except psutil.Error:
                return
            if time.monotonic() >= next_status:
                t0 = time.perf_counter()
                try:
                    reply = client.request("status")
                    self.status_rtt_s.append(time.perf_counter() - t0)
                    self.status_stale += reply.get("status_age_s", 0) > 0
                    self.last_status = reply
                except DaemonUnavailable:
                    self.status_failures += 1
                next_status = time.monotonic() + self.status_every_s
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(40)


def _wait_until(predicate: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return predicate()


def run_fuzz(n_malformed: int = 5000, *, rate: float = 3000.0, seed: int = 0, size: int = 64,
             workdir: Path | None = None, settle_s: float = 180.0) -> dict[str, Any]:
    """Send the plan to a fresh daemon; return the figures and everything needed to check them."""
    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="umvd-fuzz-")
        workdir = Path(own_tmp.name)
    plan = build_plan(n_malformed, seed=seed, size=size)
    d = Daemon(workdir)
    result: dict[str, Any] = {"malformed_sent": plan.malformed,
                              "valid_sent": {s: len(v) for s, v in plan.valid.items()},
                              "messages_sent": len(plan.messages) + len(plan.tail),
                              "sent_by_category": dict(plan.sent_by_category),
                              "expected_rejections": {s: dict(c) for s, c in plan.expected_rejections.items()},
                              "expected_seq": plan.expected_seq,
                              "nonfinite_frames_sent": plan.nonfinite_frames,
                              "nonfinite_pixels_sent": plan.nonfinite_pixels,
                              "valid_indices": {s: list(v) for s, v in plan.valid.items()}}
    try:
        result["rss_start_mb"] = d.ps.memory_info().rss / 2**20
        collector = Collector(d.output)
        sampler = Sampler(d)
        sock = zmq.Context.instance().socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, 0)  # no limit: every message must reach the daemon
        sock.connect(d.input)
        if not sock.poll(30000):
            raise RuntimeError("the daemon never subscribed")
        sock.recv()
        t0 = time.perf_counter()
        for k, parts in enumerate(plan.messages):
            sock.send_multipart(parts)
            if rate:
                ahead = t0 + (k + 1) / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
        result["send_s"] = time.perf_counter() - t0
        sock.close(linger=10000)

        def received_all() -> bool:
            s = sampler.last_status  # the sampler's own requests: the flood's control latency
            if s is None:
                return False
            got = sum(s["streams"][n]["frames_in"] + s["streams"][n]["rejected_total"]
                      for n in s["streams"]) + sum(s["rejected_unattributed"].values())
            return got + s["inbox"]["overflow"] >= len(plan.messages)

        result["all_accounted"] = _wait_until(received_all, settle_s, every_s=0.02)
        result["process_s"] = time.perf_counter() - t0
        flood_rtt_s = list(sampler.status_rtt_s)  # the replies while the flood was sent and processed
        result["control_under_flood"] = {
            "replies": len(flood_rtt_s), "failures": sampler.status_failures,
            "from_last_snapshot": sampler.status_stale,
            "max_ms": 1000 * max(flood_rtt_s) if flood_rtt_s else None,
            "p99_ms": 1000 * float(np.percentile(flood_rtt_s, 99)) if flood_rtt_s else None,
            "p50_ms": 1000 * float(np.median(flood_rtt_s)) if flood_rtt_s else None,
        }

        def flt_trained() -> bool:  # the state turns live at the next frame pushed
            return d.request({"cmd": "status"})["streams"]["flt"]["model_step"] >= 20

        result["flt_trained_before_tail"] = _wait_until(flt_trained, settle_s)
        sock = zmq.Context.instance().socket(zmq.PUB)  # the subscription is there: plain PUB
        sock.connect(d.input)
        time.sleep(0.5)
        for parts in plan.tail:  # 30 frames at 30 Hz, every tenth with NaN/Inf pixels
            sock.send_multipart(parts)
            time.sleep(1 / 30)
        sock.close(linger=10000)
        result["tail_accounted"] = _wait_until(
            lambda: d.request({"cmd": "status"})["streams"]["flt"]["frames_in"] >= len(plan.valid["flt"]), 60)
        status = d.request({"cmd": "status"})
        saved = d.request({"cmd": "save_model", "stream": "flt", "path": "flt-after-fuzz.pt"})
        result["flt_weights_finite"] = False
        if saved.get("ok"):
            try:
                load_checkpoint(saved["path"])  # refuses non-finite tensors
                result["flt_weights_finite"] = True
            except Exception as exc:
                result["flt_weights_error"] = str(exc)
        sampler.stop()
        shutdown = d.request({"cmd": "shutdown"})
        result["exit_code"] = d.proc.wait(timeout=120)
        expected_out = sum(len(v) for v in plan.valid.values())
        _wait_until(lambda: sum(len(v) for v in collector.denoised.values()) >= expected_out, 10, 0.05)
        collector.stop()
        result.update(
            status=status, shutdown=shutdown,
            peak_rss_mb=sampler.peak_rss / 2**20, peak_threads=sampler.peak_threads,
            status_requests=len(sampler.status_rtt_s), status_failures=sampler.status_failures,
            status_rtt_max_ms=1000 * max(sampler.status_rtt_s, default=float("nan")),
            status_rtt_p50_ms=1000 * float(np.median(sampler.status_rtt_s)) if sampler.status_rtt_s else None,
            denoised={s: list(v) for s, v in collector.denoised.items()},
            raw_republished=dict(collector.raw), nonfinite_outputs=collector.nonfinite_outputs,
            output_states=dict(collector.states),
            tail_live_outputs=sum(collector.state_of.get(("flt", i)) == "live"
                                  for i in plan.valid["flt"][-len(plan.tail):]),
            tail_frames=len(plan.tail),
        )
        result["log_tail"] = d.err_path.read_text()[-3000:]
    finally:
        d.kill()
        if own_tmp is not None:
            own_tmp.cleanup()
    return result


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """The figures for docs/reliability.md (no per-frame lists)."""
    st = r["status"]
    got: Counter = Counter(st["rejected_unattributed"])
    for s in st["streams"].values():
        got.update(s["rejected"])
    expected: Counter = Counter()
    for c in r["expected_rejections"].values():
        expected.update(c)
    denoised = {s: len(v) for s, v in r["denoised"].items()}
    missing = {s: len(set(r["valid_indices"][s]) - set(r["denoised"].get(s, []))) for s in r["valid_indices"]}
    flt, cam0 = st["streams"]["flt"], st["streams"]["cam0"]
    return {
        "messages_sent": r["messages_sent"], "malformed_sent": r["malformed_sent"],
        "valid_frames_sent": r["valid_sent"], "send_s": round(r["send_s"], 2),
        "all_messages_accounted": r["all_accounted"], "rejected_by_reason": dict(sorted(got.items())),
        "rejections_match_expected": got == expected, "rejected_total": sum(got.values()),
        "valid_frames_denoised": denoised, "valid_frames_missing_output": missing,
        "nonfinite_outputs": r["nonfinite_outputs"],
        "nonfinite_frames": {"sent": r["nonfinite_frames_sent"], "counted": flt["nonfinite_frames"]},
        "nonfinite_pixels": {"sent": r["nonfinite_pixels_sent"], "counted": flt["nonfinite_pixels"]},
        "flt_trained_before_tail": r["flt_trained_before_tail"],
        "flt_tail_live_outputs": f"{r['tail_live_outputs']} of {r['tail_frames']}",
        "flt_loss": flt["loss"], "flt_model_step": flt["model_step"],
        "flt_weights_finite": r["flt_weights_finite"],
        "cam0_seq": {k: cam0[k] for k in ("drops", "seq_jumps", "seq_restarts")},
        "cam0_seq_expected": r["expected_seq"]["cam0"],
        "inbox_overflow": st["inbox"]["overflow"],
        "rss_start_mb": round(r["rss_start_mb"], 1), "peak_rss_mb": round(r["peak_rss_mb"], 1),
        "peak_threads": r["peak_threads"],
        "status_requests_during_run": r["status_requests"], "status_failures": r["status_failures"],
        "status_rtt_p50_ms": None if r["status_rtt_p50_ms"] is None else round(r["status_rtt_p50_ms"], 1),
        "status_rtt_max_ms": round(r["status_rtt_max_ms"], 1),
        "control_under_flood": {k: round(v, 1) if isinstance(v, float) else v
                                for k, v in r["control_under_flood"].items()},
        "exit_code": r["exit_code"], "shutdown": r["shutdown"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--malformed", type=int, default=20000, help="malformed messages (default 20000)")
    p.add_argument("--rate", type=float, default=3000.0, help="messages/s sent (0: as fast as possible)")
    p.add_argument("--size", type=int, default=64, help="side of the valid frames (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the summary here")
    args = p.parse_args(argv)
    summary = summarize(run_fuzz(args.malformed, rate=args.rate, seed=args.seed, size=args.size))
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = (summary["rejections_match_expected"] and summary["exit_code"] == 0
          and not any(summary["valid_frames_missing_output"].values()) and summary["nonfinite_outputs"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
