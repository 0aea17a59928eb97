"""`umvd-live bench`: real-time speed and quality of the daemon's engine on a simulated stream.

What runs is the daemon itself (`daemon.Daemon`, with its `streams.LiveStream`): frames go through
its inbox, its `process` (validation, the stale-preview skip, the engine's `push` with online
training in the engine's background thread) and its output PUB socket on loopback, so the figures
are the daemon's, not a re-implementation's. The parts around it:

- `FrameRing`: the simulated frames (noisy uint16 and ground truth float32), generated *before*
  the clock starts so the simulator's cost (6 ms per 256² frame, 56 ms per 512² one on the 2-core
  development machine under load: more than a 30 Hz period) is not counted. It is a ring bounded
  in memory (``--ring-mb``): a run longer than the ring replays it from the start, noise included,
  so frames repeat every ``ring.frames`` (in the JSON). Runs that fit in the ring (900 frames at
  256² do, with the default 512 MB) measure quality on a never-repeating stream.
- `FrameProducer`: a thread that hands frames to the daemon's inbox paced at ``--rate`` (frame i
  due at start + i/rate, so lateness never accumulates), or with ``--max`` as fast as the daemon
  takes them, with at most one run (``--batch`` × ``--workers`` frames) waiting: the daemon then
  has a full run at each turn, and skips only if a run takes longer than its catch-up budget. The receipt time
  is stamped at the hand-over, as the daemon's
  `InputReceiver` stamps it when it takes a message off its socket.
- `OutputMonitor`: a viewer on the daemon's output socket. Latency is the daemon's own figure
  (receipt to publication, carried in each denoised message); quality is PSNR against the
  ground truth (`PsnrAccumulator`, bounded in memory) over the outputs marked ``live``, i.e. after
  the warm start.

The main figures (all in the JSON; `run` also prints a table):
- ``fps_in``: frames handed over per second; ``fps_out``: publications per second over the
  steady state, i.e. the outputs after the warm start less the last N//2 that only the final flush
  produces (over every output when the stream never went live).
- ``latency_ms_p50/p99/max``: the daemon's receipt-to-publication latency over that steady state;
  ``latency_ms_all`` over every published output, warm start included; ``latency_ms_worst``: the
  [seq, ms] of the ten slowest steady-state outputs (with ``first_live_seq``: where the tail is).
- ``skipped``: preview outputs the daemon skipped (compute behind); ``skipped_after_warmup``.
- ``warmup_s``: from the first frame's receipt to the engine's ``state`` turning ``live``.
- ``psnr_raw_db``/``psnr_denoised_db``: over the live outputs, PSNR of the stacked frames
  against the ground truth (as `metrics.psnr`).
- ``gc``: the garbage collector's collections during the run, the full ones, and the longest
  pause (every thread stops for it: `runtime.freeze_startup_objects`).
- ``peak_rss_mb``: the process's peak resident memory, the pre-generated frames (``ring.mb``)
  included.

`measure(args)` returns the figures as a dict; `run(args)` prints them and writes ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zmq

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
from umvd_live.checkpoint import load_checkpoint
from umvd_live.daemon import IDLE_WAIT_S, Daemon, DaemonConfig, Inbox, Received, engine_factory
from umvd_live.protocol import DENOISED_SUFFIX, ProtocolError, decode_output, encode_frame
from umvd_live.streams import Denoiser, LiveStream, monotonic

STREAM = "bench"
#: Topic of the messages that prove the monitor's subscription has arrived (a PUB drops what it
#: sends before that). Not a stream topic: the protocol's stream names cannot contain a space.
PROBE_TOPIC = b"umvd bench probe"
#: Longest wait for the monitor's subscription, and for the last outputs after the end.
SUBSCRIBE_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 10.0
#: Denoised frames the viewer side may hold unread (the daemon's PUB holds as many again).
MONITOR_RCVHWM = 1000
#: Extra latency on top of the N//2 frames the output must wait for, in the latency target.
LATENCY_SLACK_MS = 100.0


# ---- the simulated frames ---------------------------------------------------------------------------
@dataclass
class FrameRing:
    """Pre-generated noisy frames and their ground truth, replayed in a loop when the run is longer."""

    noisy: np.ndarray  # (R, H, W) uint16
    clean: np.ndarray  # (R, H, W) float32, the expected value of each noisy frame in ADU
    generate_s: float

    @classmethod
    def generate(cls, config: SimConfig, frames: int, budget_bytes: int) -> "FrameRing":
        per_frame = config.height * config.width * (2 + 4)
        length = max(1, min(frames, budget_bytes // per_frame))
        started = time.perf_counter()
        noisy, clean = TwoPhotonSimulator(config).movie(length)
        noisy.flags.writeable = False
        clean.flags.writeable = False
        return cls(noisy, clean, time.perf_counter() - started)

    def __len__(self) -> int:
        return len(self.noisy)

    @property
    def nbytes(self) -> int:
        return self.noisy.nbytes + self.clean.nbytes

    def noisy_of(self, seq: int) -> np.ndarray:
        return self.noisy[seq % len(self.noisy)]

    def clean_of(self, seq: int) -> np.ndarray:
        return self.clean[seq % len(self.clean)]


# ---- quality -------------------------------------------------------------------------------------
class PsnrAccumulator:
    """PSNR of many frames taken together, without keeping them: `metrics.psnr` of the stacked
    frames (peak = the ground truth's max - min over all of them), from running sums."""

    def __init__(self) -> None:
        self.sse = 0.0
        self.count = 0
        self.truth_min = math.inf
        self.truth_max = -math.inf

    def add(self, estimate: np.ndarray, truth: np.ndarray) -> None:
        diff = (np.asarray(estimate, np.float64) - truth).ravel()
        self.sse += float(diff @ diff)
        self.count += diff.size
        self.truth_min = min(self.truth_min, float(truth.min()))
        self.truth_max = max(self.truth_max, float(truth.max()))

    def psnr(self) -> float | None:
        if self.count == 0 or self.sse == 0.0:
            return None
        peak = self.truth_max - self.truth_min
        return 10.0 * math.log10(peak * peak / (self.sse / self.count))


# ---- garbage-collector pauses ----------------------------------------------------------------------
class GcPauses:
    """The garbage collector's pauses while the bench runs: every thread of the daemon stops for
    them, so a long one shows up as a latency spike (`runtime.freeze_startup_objects`)."""

    def __init__(self) -> None:
        self.pauses_ms: list[tuple[int, float]] = []  # (generation, ms)
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses_ms.append((int(info["generation"]), 1000.0 * (time.perf_counter() - self._started)))

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, Any]:
        full = [ms for generation, ms in self.pauses_ms if generation == 2]
        return {
            "collections": len(self.pauses_ms),
            "full_collections": len(full),
            "pause_ms_max": round(max((ms for _, ms in self.pauses_ms), default=0.0), 1),
            "frozen_objects": gc.get_freeze_count(),
        }


# ---- the producer --------------------------------------------------------------------------------
class FrameProducer(threading.Thread):
    """Hands the ring's frames to the daemon's inbox, as its input thread would, at the set pace."""

    def __init__(self, ring: FrameRing, inbox: Inbox, frames: int, rate_hz: float | None,
                 rss_every_s: float, backlog: int = 1):
        super().__init__(name="umvd-bench-producer", daemon=True)
        self.ring, self.inbox, self.frames, self.rate_hz = ring, inbox, frames, rate_hz
        #: --max: frames let wait in the inbox, the daemon's run length (batch × workers): a full
        #: run each time, and never a backlog larger than one run to skip.
        self.backlog = backlog
        self.handed = np.full(frames, np.nan)  # receipt time of each seq
        self.refused = 0  # the inbox was full (its byte budget)
        self.late = 0  # frames handed over more than one period after their due time
        self.done = threading.Event()
        self.taken = threading.Event()  # set by the main loop each time it drains the inbox
        self.stop_requested = threading.Event()
        self.rss_every_s = rss_every_s
        self.rss_timeline: list[tuple[float, float]] = []
        self._process = psutil.Process()

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.done.set()

    def _run(self) -> None:
        period = 1.0 / self.rate_hz if self.rate_hz else 0.0
        start = monotonic()
        next_rss = start
        for seq in range(self.frames):
            if self.stop_requested.is_set():
                break
            if period:
                due = start + seq * period
                wait = due - monotonic()
                if wait > 0:
                    time.sleep(wait)
                elif wait < -period:
                    self.late += 1
            else:
                while len(self.inbox) >= self.backlog and not self.stop_requested.is_set():
                    self.taken.wait(0.01)
                    self.taken.clear()
            parts = encode_frame(STREAM, self.ring.noisy_of(seq), seq, t=seq * period if period else None,
                                 meta={"source": "bench"})
            parts = [bytes(p) for p in parts]  # fresh bytes, as a socket delivers them
            received = monotonic()
            self.handed[seq] = received
            if not self.inbox.put(Received(parts, received, sum(len(p) for p in parts))):
                self.refused += 1
            if received >= next_rss:
                self.rss_timeline.append((received - start, self._process.memory_info().rss / 2**20))
                next_rss = received + self.rss_every_s


# ---- the viewer side -----------------------------------------------------------------------------
class OutputMonitor(threading.Thread):
    """Subscribes to the daemon's denoised output: latency, publication times and quality per seq."""

    def __init__(self, endpoint: str, ring: FrameRing, frames: int):
        super().__init__(name="umvd-bench-monitor", daemon=True)
        self.ring = ring
        self.latency_ms = np.full(frames, np.nan)
        self.live = np.zeros(frames, bool)
        self.received = 0
        self.errors = 0
        self.raw = PsnrAccumulator()
        self.denoised = PsnrAccumulator()
        self.subscribed = threading.Event()
        self._stop_event = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        # Bounded, so the viewer side cannot hide a leak; a lagging viewer shows up as
        # frames_received_by_viewer < frames_published.
        self._sock.setsockopt(zmq.RCVHWM, MONITOR_RCVHWM)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, (STREAM + DENOISED_SUFFIX).encode())
        self._sock.setsockopt(zmq.SUBSCRIBE, PROBE_TOPIC)
        self._sock.connect(endpoint)

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                if self._sock.poll(50, zmq.POLLIN):
                    self._take(self._sock.recv_multipart())
        finally:
            self._sock.close()
            self._ctx.term()

    def _take(self, parts: list[bytes]) -> None:
        if parts[0] == PROBE_TOPIC:
            self.subscribed.set()
            return
        try:
            msg = decode_output(parts)
            seq = int(msg.header["seq"])
            latency_ms = float(msg.header["latency_ms"])
        except (ProtocolError, KeyError, TypeError, ValueError):
            self.errors += 1
            return
        if not 0 <= seq < len(self.latency_ms):
            self.errors += 1
            return
        self.latency_ms[seq] = latency_ms
        self.received += 1
        if msg.header.get("state") == "live":
            self.live[seq] = True
            truth = self.ring.clean_of(seq)
            self.denoised.add(msg.image, truth)
            self.raw.add(self.ring.noisy_of(seq), truth)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


# ---- the run -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    height: int
    width: int
    frames: int
    rate_hz: float | None  # None: --max
    photons: float
    inference_only: bool
    ring_bytes: int
    rss_every_s: float
    save_model: str | None
    daemon: DaemonConfig

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchConfig":
        height, width = args.size
        if args.frames < 1:
            raise ValueError(f"--frames must be >= 1, got {args.frames}")
        if not args.max and not args.rate > 0:
            raise ValueError(f"--rate must be > 0, got {args.rate}")
        if args.ring_mb <= 0:
            raise ValueError(f"--ring-mb must be > 0, got {args.ring_mb}")
        daemon = DaemonConfig(
            input_bind=None, input_connect=(), output="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
            preset=args.preset, device=args.device, window=args.window, context=args.context,
            warmup_frames=args.warmup_frames,
            init=args.init, seed=args.seed, catchup_s=args.catchup_ms / 1000.0, warmup_steps=args.warmup_steps,
            batch=args.batch, workers=args.workers, precision=args.precision,
        )
        return cls(height=height, width=width, frames=args.frames, rate_hz=None if args.max else float(args.rate),
                   photons=args.photons, inference_only=args.inference_only,
                   ring_bytes=int(args.ring_mb * 2**20), rss_every_s=args.rss_every,
                   save_model=args.save_model, daemon=daemon)


class _RecordingFactory:
    """The daemon's engine factory, keeping the engines it made so their config can be reported."""

    def __init__(self, config: DaemonConfig):
        self._make = engine_factory(config)
        self.made: list[Denoiser] = []

    def __call__(self, init: str | None) -> Denoiser:
        den = self._make(init)
        self.made.append(den)
        return den


def untrained_weights(config: DaemonConfig, frame: np.ndarray, path: str) -> None:
    """Weights of a fresh network for `frame`'s size: what --inference-only runs without --init, so
    the inference path (not the warm-up's temporal mean) is what gets timed."""
    from umvd_live.engine import EngineConfig, StreamDenoiser

    with StreamDenoiser(EngineConfig(preset=config.preset, device=config.device, window=config.window,
                                     context=config.context, train_mode="inline", seed=config.seed)) as den:
        den.push(frame, infer=False)
        den.save_weights(path)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by the `bench` arguments; return its figures."""
    cfg = BenchConfig.from_args(args)
    sim = SimConfig(height=cfg.height, width=cfg.width, rate_hz=cfg.rate_hz or 30.0, photons=cfg.photons,
                    seed=cfg.daemon.seed)
    ring = FrameRing.generate(sim, cfg.frames, cfg.ring_bytes)
    with tempfile.TemporaryDirectory(prefix="umvd-bench-") as tmp:
        daemon_cfg = cfg.daemon
        init_label = daemon_cfg.init
        if cfg.inference_only and daemon_cfg.init is None:
            path = os.path.join(tmp, "untrained.pt")
            untrained_weights(daemon_cfg, ring.noisy[0], path)
            daemon_cfg = dataclasses.replace(daemon_cfg, init=path)
            init_label = "untrained"
        return _measure(cfg, daemon_cfg, ring, init_label)


def _measure(cfg: BenchConfig, daemon_cfg: DaemonConfig, ring: FrameRing, init_label: str | None) -> dict[str, Any]:
    import torch

    load_start = os.getloadavg()[0]
    rss_start = psutil.Process().memory_info().rss / 2**20
    factory = _RecordingFactory(daemon_cfg)
    daemon = Daemon(daemon_cfg, factory)
    monitor: OutputMonitor | None = None
    producer: FrameProducer | None = None
    gc_pauses = GcPauses()
    try:
        gc_pauses.start()
        daemon.start()
        if cfg.inference_only:
            daemon.set_training_paused(None, True)  # the control socket's pause: new streams start paused
        monitor = OutputMonitor(daemon.endpoints["output"], ring, cfg.frames)
        monitor.start()
        _await_subscription(daemon, monitor)
        producer = FrameProducer(ring, daemon.inbox, cfg.frames, cfg.rate_hz, cfg.rss_every_s, daemon.run_length)
        producer.start()
        live_at, steps_at_live, skipped_at_live, rss_live = None, 0, 0, None
        stream: LiveStream | None = None
        while True:  # the daemon's `serve` loop, minus the control socket nobody uses here
            items = daemon.inbox.drain(IDLE_WAIT_S)
            producer.taken.set()
            if items:
                daemon.process(items)
            stream = stream or daemon.streams.get(STREAM)
            if live_at is None and stream is not None and stream.denoiser is not None \
                    and stream.denoiser.state == "live":
                live_at = monotonic()
                steps_at_live = int(stream.denoiser.model_step)
                skipped_at_live = stream.counters.skipped
                rss_live = psutil.Process().memory_info().rss / 2**20
            if producer.done.is_set() and len(daemon.inbox) == 0:
                break
        ended = monotonic()
        rss_end = psutil.Process().memory_info().rss / 2**20  # still streaming: before the flush
        status = daemon.status()
        snapshot = status["streams"].get(STREAM, {})
        engine_config = dataclasses.asdict(factory.made[-1].config) if factory.made else None
        saved = daemon.save_model(STREAM, Path(cfg.save_model)) if cfg.save_model and STREAM in daemon.streams else None
        daemon.finish()  # flush the last N//2 outputs and stop the trainer
        counters = dataclasses.asdict(stream.counters) if stream is not None else {}
        published = int(counters.get("frames_out", 0))
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while monitor.received < published and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        if producer is not None:
            producer.stop_requested.set()
            producer.join(timeout=5)
        if monitor is not None:
            monitor.stop()
        daemon.close()
        gc_pauses.stop()
    assert producer is not None and monitor is not None
    return _figures(cfg, daemon_cfg, ring, init_label, producer, monitor, snapshot, counters, status, engine_config,
                    live_at=live_at, ended=ended, steps_at_live=steps_at_live, skipped_at_live=skipped_at_live,
                    rss=(rss_start, rss_live, rss_end),
                    load=(load_start, os.getloadavg()[0]), published=published, saved=saved,
                    torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
                    gc_pauses=gc_pauses.summary(), batch=daemon.batch, workers=daemon.workers)


def _await_subscription(daemon: Daemon, monitor: OutputMonitor) -> None:
    """Send probes on the output until the monitor gets one: only then is nothing published lost."""
    assert daemon.output is not None
    deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
    while not monitor.subscribed.wait(0.02):
        if time.monotonic() > deadline:
            raise RuntimeError("the bench's output monitor could not subscribe to the daemon's output")
        daemon.output.send_multipart([PROBE_TOPIC, b"", b""], flags=zmq.NOBLOCK)


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "max": float(values.max())}


def _rate(times: np.ndarray) -> float | None:
    times = np.sort(times[np.isfinite(times)])
    if times.size < 2 or times[-1] <= times[0]:
        return None
    return float((times.size - 1) / (times[-1] - times[0]))


def _worst(latency_ms: np.ndarray, steady: np.ndarray, count: int = 10) -> list[list[float]]:
    """[seq, ms] of the slowest steady-state outputs, slowest first: where the tail comes from."""
    seqs = np.flatnonzero(steady & np.isfinite(latency_ms))
    order = seqs[np.argsort(latency_ms[seqs])[::-1][:count]]
    return [[int(i), round(float(latency_ms[i]), 1)] for i in order]


def _figures(cfg: BenchConfig, daemon_cfg: DaemonConfig, ring: FrameRing, init_label: str | None,
             producer: FrameProducer, monitor: OutputMonitor, snapshot: dict[str, Any],
             counters: dict[str, Any], status: dict[str, Any],
             engine_config: dict[str, Any] | None, *, live_at: float | None, ended: float, steps_at_live: int,
             skipped_at_live: int, rss: tuple[float, float | None, float], load: tuple[float, float],
             published: int, saved: dict[str, Any] | None, torch_threads: int, torch_version: str,
             gc_pauses: dict[str, Any], batch: int, workers: int) -> dict[str, Any]:
    import torch

    k = daemon_cfg.window // 2
    handed = producer.handed
    first = handed[0] if np.isfinite(handed[0]) else None
    # Steady state: outputs after the warm start, without the last N//2 that only the final flush
    # produces (they wait for no later frame, so they would flatter both latency and rate).
    streamed = np.arange(cfg.frames) < cfg.frames - k
    steady = monitor.live & streamed
    published_at = handed + monitor.latency_ms / 1000.0
    latency_live = _percentiles(monitor.latency_ms[steady])
    engine = snapshot.get("engine", {}) if isinstance(snapshot.get("engine"), dict) else {}
    steps = int(engine.get("train_steps", snapshot.get("model_step", 0)) or 0)
    live_span = ended - live_at if live_at is not None else 0.0
    device = engine.get("device") or daemon_cfg.device
    gpu = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(), "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20}
    psnr_raw, psnr_den = monitor.raw.psnr(), monitor.denoised.psnr()
    return {
        "mode": "max" if cfg.rate_hz is None else "paced",
        "size": [cfg.height, cfg.width],
        "frames": cfg.frames,
        "rate_hz": cfg.rate_hz,
        "photons": cfg.photons,
        "preset": engine.get("preset") or daemon_cfg.preset,
        "preset_requested": daemon_cfg.preset,
        "device": str(device),
        "precision": engine.get("precision"),
        "inference_only": cfg.inference_only,
        "init": init_label,
        "fps_in": _rate(handed),
        "fps_out": _rate(published_at[steady]) if steady.sum() >= 2 else _rate(published_at[streamed]),
        "frames_handed": int(np.isfinite(handed).sum()),
        "frames_published": published,
        "frames_received_by_viewer": monitor.received,
        "latency_ms_p50": latency_live["p50"],
        "latency_ms_p99": latency_live["p99"],
        "latency_ms_max": latency_live["max"],
        "latency_ms_all": _percentiles(monitor.latency_ms),
        "latency_ms_worst": _worst(monitor.latency_ms, steady),
        "gc": gc_pauses,
        "first_live_seq": int(np.argmax(monitor.live)) if monitor.live.any() else None,
        "latency_target_ms": None if cfg.rate_hz is None else 1000.0 * k / cfg.rate_hz + LATENCY_SLACK_MS,
        "skipped": int(counters.get("skipped", 0)),
        "skipped_after_warmup": int(counters.get("skipped", 0)) - skipped_at_live if live_at else None,
        "warmup_s": None if live_at is None or first is None else live_at - first,
        "train_steps": steps,
        "train_steps_per_s": engine.get("train_steps_per_s"),
        "train_steps_per_s_after_warmup": (steps - steps_at_live) / live_span if live_span > 0 else None,
        "infer_ms": snapshot.get("infer_ms"),  # the daemon's running estimate of one inferred output
        "batch": batch,
        "workers": workers,
        "loss": engine.get("loss"),
        "rollbacks": engine.get("rollbacks"),
        "psnr_raw_db": psnr_raw,
        "psnr_denoised_db": psnr_den,
        "psnr_gain_db": psnr_den - psnr_raw if psnr_raw is not None and psnr_den is not None else None,
        "frames_evaluated": int(monitor.live.sum()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "rss_mb": {"start": rss[0], "live": rss[1], "end": rss[2]},
        "rss_mb_timeline": [[round(t, 2), round(m, 1)] for t, m in producer.rss_timeline],
        "gpu": gpu,
        "duration_s": ended - first if first is not None else None,
        "producer_late": producer.late,
        "inbox_refused": producer.refused,
        "viewer_errors": monitor.errors,
        "daemon": {"catchup_ms": 1000.0 * daemon_cfg.catchup_s, "counters": counters,
                   "inbox_overflow": status.get("inbox", {}).get("overflow")},
        "ring": {"frames": len(ring), "mb": ring.nbytes / 2**20, "generate_s": ring.generate_s,
                 "repeats": cfg.frames > len(ring)},
        "saved_model": saved,
        "engine": engine_config,
        "engine_stats": engine,
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch_threads,
        "torch_version": torch_version,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "load_average": {"start": load[0], "end": load[1]},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---- presentation --------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def print_table(result: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    r = result
    title = (f"umvd-live bench: {r['size'][0]}×{r['size'][1]}, {r['frames']} frames, "
             f"{'max rate' if r['mode'] == 'max' else _fmt(r['rate_hz'], 1, ' Hz')}, "
             f"{r['preset']} on {r['device']} ({r['precision']}){', inference only' if r['inference_only'] else ''}")
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("fps in / out (sustained)", f"{_fmt(r['fps_in'])} / {_fmt(r['fps_out'])}"),
        ("latency p50 / p99 / max (after warm start)",
         f"{_fmt(r['latency_ms_p50'])} / {_fmt(r['latency_ms_p99'])} / {_fmt(r['latency_ms_max'])} ms"),
        ("latency p50 / p99 / max (every output)",
         " / ".join(_fmt(r["latency_ms_all"][q]) for q in ("p50", "p99", "max")) + " ms"),
        ("latency target (N//2 frames + 100 ms)", _fmt(r["latency_target_ms"], 1, " ms")),
        ("preview frames skipped (after warm start)", f"{r['skipped']} ({_fmt(r['skipped_after_warmup'])})"),
        ("warm start", _fmt(r["warmup_s"], 2, " s")),
        ("training steps (per s, after warm start)",
         f"{r['train_steps']} ({_fmt(r['train_steps_per_s'])}, {_fmt(r['train_steps_per_s_after_warmup'])})"),
        ("PSNR raw → denoised (gain)",
         f"{_fmt(r['psnr_raw_db'], 2)} → {_fmt(r['psnr_denoised_db'], 2)} dB ({_fmt(r['psnr_gain_db'], 2, ' dB')}) "
         f"over {r['frames_evaluated']} frames"),
        ("garbage-collector pauses (full; longest)",
         f"{r['gc']['collections']} ({r['gc']['full_collections']}; {r['gc']['pause_ms_max']:.0f} ms)"),
        ("peak RSS (of which pre-generated frames)", f"{r['peak_rss_mb']:.0f} MB ({r['ring']['mb']:.0f} MB)"),
        ("frames handed / published / seen", f"{r['frames_handed']} / {r['frames_published']} / "
                                             f"{r['frames_received_by_viewer']}"),
        ("inference per frame (daemon's estimate; batch × workers)",
         f"{_fmt(r['infer_ms'], 1, ' ms')} ({r['batch']} × {r['workers']})"),
        ("producer late frames", str(r["producer_late"])),
        ("cores / torch threads", f"{r['cpu_count']} / {r['torch_threads']}"),
        ("load average (1 min) start → end",
         f"{r['load_average']['start']:.2f} → {r['load_average']['end']:.2f}"),
    ]
    if r["gpu"]:
        rows.append(("GPU (peak memory)", f"{r['gpu']['name']} ({r['gpu']['peak_mem_mb']:.0f} MB)"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if r["warmup_s"] is None:
        console.print("[yellow]the stream never left the warm start: no quality or steady-state figures; "
                      "give it more --frames or a smaller --warmup-frames/--warmup-steps[/yellow]")
    if r["ring"]["repeats"]:
        console.print(f"[yellow]the run is longer than the pre-generated ring ({r['ring']['frames']} frames, "
                      "--ring-mb): frames repeat, noise included[/yellow]")


def run(args: argparse.Namespace) -> int:
    try:
        if args.init is not None:
            load_checkpoint(args.init)  # a bad file is refused now, not silently at the first frame
        result = measure(args)
    except ValueError as exc:  # CheckpointError included
        print(f"umvd-live bench: {exc}", file=sys.stderr)
        return 2
    print_table(result)
    if args.json:
        path = Path(args.json)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        except OSError as exc:
            print(f"umvd-live bench: cannot write {path}: {exc}", file=sys.stderr)
            return 2
    return 0 if result["frames_published"] > 0 else 1
