"""`umvd-live bench`: real-time speed and quality of the daemon's engine on a simulated stream.

What runs is the daemon itself (`daemon.service.Daemon`, with its `streams.LiveStream`): frames go through
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
  ground truth (`PsnrAccumulator`, bounded in memory) over the steady state: every output after
  the warm start (state ``live`` or ``adapting``, not ``warmup``), the network's own outputs
  after a detected change included.

The main figures (all in the JSON, strict: a figure that is not finite is null; `run` also prints a table):
- ``fps_in``: frames handed over per second; ``fps_out``: publications per second over the
  steady state, i.e. the outputs after the warm start (``live`` and ``adapting``: every one the
  span covers) less the last N//2 that only the final flush produces (over every output when the
  stream never went live).
- ``latency_ms_p50/p99/max``: the daemon's receipt-to-publication latency over that steady state;
  ``latency_ms_all`` over every published output, warm start included; ``latency_ms_worst``: the
  [seq, ms] of the ten slowest steady-state outputs (with ``first_live_seq``: where the tail is).
- ``skipped``: preview outputs the daemon skipped (compute behind); ``skipped_after_warmup``.
- ``warmup_s``: from the first frame's receipt to the engine's ``state`` turning ``live``.
- ``psnr_raw_db``/``psnr_denoised_db``: over the steady state's outputs (``live`` and
  ``adapting``), PSNR of the stacked frames against the ground truth (as `metrics.psnr`);
  ``frames_evaluated``: how many.
- ``gc``: the garbage collector's collections during the run, the full ones, and the longest
  pause (every thread stops for it: `runtime.freeze_startup_objects`).
- ``peak_rss_mb``: the process's peak resident memory, the pre-generated frames (``ring.mb``)
  and the denoised outputs kept for the activity metrics (``kept_outputs_mb``, as much again as
  the ring's truth at most) included, and the scoring at the end; ``peak_rss_streaming_mb``: the
  peak until the stream's end, before the scoring (the daemon's own memory, plus the ring).
- ``activity``: what users look at (issue 14), by `metrics.activity_report`, the one report that
  `umvd-live demo` and tools/bench_denoise.py give too: whole-movie and active-set PSNR, per-cell
  trace correlation, amplitude slope, peak ratio and lag of the denoised stream beside the raw
  frames, a 5-frame mean and the Gaussian whose sigma the truth picks for each metric
  (``--oracle``: searched after the stream, on the scored frames; ``reduced``, the default, on a
  coarser grid). Scored: every output, whatever its state, from the first live one to the end of
  the ring's first pass (a replayed ring is not one movie). A list of segments: one, or with
  ``--events`` one from the first live output and one from each change to the next (the cells'
  footprints follow the stage). Each row also holds those trace means per kind of source, the
  simulator's somata, puncta and thin processes (``by_kind``).
- ``activity_over_time`` (``--score-every S``; else null): the same report again over consecutive
  spans of S seconds of each segment (a last span under S/2 joins the one before it), with
  ``from_s``/``to_s`` in the stream's time and each span's own oracles: how the live output comes
  along as the network goes on training on the stream (a long run needs a ``--ring-mb`` that holds
  it, or only the ring's first pass is scored).
- ``first_output_s``: seconds from the first frame's hand-over to the publication of the first
  output in each state (``first_live_output_s``: of the first ``live`` one); ``states``: outputs
  per state; ``changes``: the changes the daemon detected (``status.streams[...].changes``, where
  the daemon reports it).

``--events`` scripts a session (issue 15): the simulator steps the laser power and moves the stage
at set times (`SimEvent`). ``events`` in the JSON has, from the stream's start and from each change,
bins of 0-0.25, 0.25-0.5, 0.5-1, 1-2, 2-4 and 4-8 s (cut at the next change): the PSNR of the raw
frames of each bin and of the denoised frames output in it (stacked, as above, whatever their
state; a skipped preview has none) and the outputs per state. The ring then holds the whole
session. In every run the PMT gain is set for the stream's brightest part (lowered in proportion
above 2 photons/pixel/frame, `harness.fit_gain`, as tools/bench_denoise.py does) so that nothing
clips.

With ``--streams N`` (N > 1) it streams N simulated channels at once, as the channels of a
Micro-Manager acquisition arrive: streams ``sim.c0`` … ``sim.c{N-1}``, each its own field of view
(simulator seed ``--seed + i``) and brightness (``--photons`` × `BRIGHTNESS`), one frame of each per
time point in that order, ``--rate`` time points per second. The daemon then serves N streams with
one CPU budget (`budget.CpuBudget`, ``--cpu-budget``). Every figure above is then given per stream
(``streams`` in the JSON, a row each in the table) and in total (the top level: rates and counts
summed, latency percentiles and PSNR over all streams' outputs together, the warm start of the
last stream to go live); ``capacity`` is the daemon's own verdict (`capacity.CapacityMonitor`)
at the end, with ``timeline``: [seconds since the producer started, over, load] at each change.

`measure(config)` returns the figures as a dict; `run(config)` prints them and writes ``--json``.
What `umvd-live demo` does alike (the simulator's set-up and scripted sessions, the output
subscriber, the printed figures) is `apps.harness`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import platform
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

from umvd_live.adapters.simulation import MOVE, SimConfig, SimEvent, TwoPhotonSimulator
from umvd_live.apps.checks import finite_positive
from umvd_live.apps.harness import OutputSubscriber, format_figure, sim_config
from umvd_live.apps.harness import activity_table as report_table
from umvd_live.daemon.config import DaemonConfig
from umvd_live.daemon.engines import engine_factory
from umvd_live.daemon.runtime import peak_rss_mb
from umvd_live.daemon.service import Daemon
from umvd_live.daemon.streams import monotonic
from umvd_live.daemon.transport import Inbox, Received
from umvd_live.engine import EngineConfig
from umvd_live.engine.budget import cpu_cores
from umvd_live.engine.checkpoint import check_model_flags
from umvd_live.engine.device import pick_device
from umvd_live.metrics import activity_report, finite_json
from umvd_live.wire.protocol import encode_frame
from umvd_live.wire.schema import DaemonStatus, StreamStatus, latency_summary

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
DEFAULT_FRAMES = 900
#: The bins after the stream's start and after each change, in seconds (issue 15's table).
EVENT_BINS_S = ((0.0, 0.25), (0.25, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, 8.0))


# ---- the simulated frames ---------------------------------------------------------------------------
@dataclass
class FrameRing:
    """Pre-generated noisy frames and their ground truth, replayed in a loop when the run is longer."""

    noisy: np.ndarray  # (R, H, W) uint16
    clean: np.ndarray  # (R, H, W) float32, the expected value of each noisy frame in ADU
    generate_s: float
    sim: TwoPhotonSimulator  # what made them: footprints for the trace metrics

    @classmethod
    def generate(cls, config: SimConfig, frames: int, budget_bytes: int | None) -> FrameRing:
        """``frames`` frames, or as many as ``budget_bytes`` hold (None: all of them)."""
        per_frame = config.height * config.width * (2 + 4)
        length = frames if budget_bytes is None else max(1, min(frames, budget_bytes // per_frame))
        started = time.perf_counter()
        sim = TwoPhotonSimulator(config)
        noisy, clean = sim.movie(length)
        noisy.flags.writeable = False
        clean.flags.writeable = False
        return cls(noisy, clean, time.perf_counter() - started, sim)

    def __len__(self) -> int:
        return len(self.noisy)

    @property
    def nbytes(self) -> int:
        return self.noisy.nbytes + self.clean.nbytes

    def noisy_of(self, seq: int) -> np.ndarray:
        return self.noisy[seq % len(self.noisy)]

    def clean_of(self, seq: int) -> np.ndarray:
        return self.clean[seq % len(self.clean)]


def stream_names(count: int) -> list[str]:
    """``bench`` for one stream (as before), ``sim.c0`` … for several."""
    if count < 1:
        raise ValueError(f"--streams must be >= 1, got {count}")
    return [STREAM] if count == 1 else [f"sim.c{i}" for i in range(count)]


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
        self.add_sse(float(diff @ diff), diff.size, truth)

    def add_sse(self, sse: float, count: int, truth: np.ndarray) -> None:
        """A frame whose squared error is already known."""
        self.add_sums(sse, count, float(truth.min()), float(truth.max()))

    def add_sums(self, sse: float, count: int, truth_min: float, truth_max: float) -> None:
        self.sse += sse
        self.count += count
        self.truth_min = min(self.truth_min, truth_min)
        self.truth_max = max(self.truth_max, truth_max)

    @classmethod
    def merged(cls, parts: list[PsnrAccumulator]) -> PsnrAccumulator:
        """The accumulator of all their frames together."""
        acc = cls()
        for part in parts:
            acc.sse += part.sse
            acc.count += part.count
            acc.truth_min = min(acc.truth_min, part.truth_min)
            acc.truth_max = max(acc.truth_max, part.truth_max)
        return acc

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
    """Hands the rings' frames to the daemon's inbox, as its input thread would, at the set pace:
    at each time point one frame of every stream, in order (as an MDA sends its channels)."""

    def __init__(self, sources: list[tuple[str, FrameRing]], inbox: Inbox, frames: int, rate_hz: float | None,
                 rss_every_s: float, backlog: int = 1):
        super().__init__(name="umvd-bench-producer", daemon=True)
        self.sources, self.inbox, self.frames, self.rate_hz = sources, inbox, frames, rate_hz
        #: --max: frames let wait in the inbox, the daemon's run length (batch × workers) for each
        #: stream: a full run each time, and never a backlog larger than one run to skip.
        self.backlog = backlog
        self.handed = np.full((len(sources), frames), np.nan)  # receipt time of each stream's seq
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
            for index, (name, ring) in enumerate(self.sources):
                encoded = encode_frame(name, ring.noisy_of(seq), seq, t=seq * period if period else None,
                                       meta={"source": "bench"})
                parts = [bytes(p) for p in encoded]  # fresh bytes, as a socket delivers them
                received = monotonic()
                self.handed[index, seq] = received
                if not self.inbox.put(Received(parts, received, sum(len(p) for p in parts))):
                    self.refused += 1
            if received >= next_rss:
                self.rss_timeline.append((received - start, self._process.memory_info().rss / 2**20))
                next_rss = received + self.rss_every_s


# ---- the viewer side -----------------------------------------------------------------------------
class OutputMonitor(threading.Thread):
    """Subscribes to the daemon's denoised output of every stream: latency, publication times and
    quality per stream and seq."""

    def __init__(self, endpoint: str, sources: list[tuple[str, FrameRing]], frames: int):
        super().__init__(name="umvd-bench-monitor", daemon=True)
        self.rings = [ring for _, ring in sources]
        self._index = {name: i for i, (name, _) in enumerate(sources)}
        self.latency_ms = np.full((len(sources), frames), np.nan)
        self.live = np.zeros((len(sources), frames), bool)  # state "live": where the activity is scored from
        self.steady = np.zeros((len(sources), frames), bool)  # past the warm start: "live" or "adapting"
        self.received_by = np.zeros(len(sources), int)
        self.errors = 0
        self.raw = [PsnrAccumulator() for _ in sources]
        self.denoised = [PsnrAccumulator() for _ in sources]
        # Every output, whatever its state: its squared error, its state, and (within the ring's
        # first pass) its image, for the activity metrics and the bins after changes.
        self.sse = np.full((len(sources), frames), np.nan)
        self.state = np.full((len(sources), frames), -1, np.int16)  # index in self.state_names
        self.state_names: list[str] = []
        self.model_step = np.full((len(sources), frames), -1, np.int64)  # the weights' step, per output
        self.amplitude_gain = np.full((len(sources), frames), np.nan, np.float32)
        self.images: list[dict[int, np.ndarray]] = [{} for _ in sources]
        self.subscribed = threading.Event()
        self._stop_event = threading.Event()
        # Bounded, so the viewer side cannot hide a leak; a lagging viewer shows up as
        # frames_received_by_viewer < frames_published.
        self._subscriber = OutputSubscriber(endpoint, [name for name, _ in sources], MONITOR_RCVHWM, (PROBE_TOPIC,))

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                for parts in self._subscriber.receive(0.05):
                    self._take(parts)
        finally:
            self._subscriber.close()

    def _take(self, parts: list[bytes]) -> None:
        if parts[0] == PROBE_TOPIC:
            self.subscribed.set()
            return
        msg = self._subscriber.decode(parts)
        if msg is None:
            self.errors += 1
            return
        try:
            seq = int(msg.header["seq"])
            latency_ms = float(msg.header["latency_ms"])
            s = self._index[msg.stream]
        except (KeyError, TypeError, ValueError):
            self.errors += 1
            return
        if not 0 <= seq < self.latency_ms.shape[1]:
            self.errors += 1
            return
        self.latency_ms[s, seq] = latency_ms
        self.received_by[s] += 1
        state = str(msg.header.get("state", ""))
        if state not in self.state_names:
            self.state_names.append(state)
        self.state[s, seq] = self.state_names.index(state)
        self.model_step[s, seq] = int(msg.header.get("model_step", -1))
        self.amplitude_gain[s, seq] = float(msg.header.get("amplitude_gain", np.nan))
        ring = self.rings[s]
        truth = ring.clean_of(seq)
        diff = (np.asarray(msg.image, np.float64) - truth).ravel()
        sse = float(diff @ diff)
        self.sse[s, seq] = sse
        if seq < len(ring):
            self.images[s][seq] = msg.image
        self.live[s, seq] = state == "live"
        if state != "warmup":  # the network's own output: a change's "adapting" ones count too
            self.steady[s, seq] = True
            self.denoised[s].add_sse(sse, diff.size, truth)
            self.raw[s].add(ring.noisy_of(seq), truth)

    @property
    def received(self) -> int:
        return int(self.received_by.sum())

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
    save_model: Path | None
    daemon: DaemonConfig
    streams: int = 1
    events: tuple[SimEvent, ...] = ()  # --events: the scripted session's changes
    events_spec: str | None = None
    oracle: str = "reduced"  # --oracle: the activity report's oracle grid
    json_path: Path | None = None  # --json: where the figures go
    save_outputs: Path | None = None  # --save-outputs: the frames, for pictures (`save_outputs`)
    score_every_s: float | None = None  # --score-every: the activity in spans of this many seconds as well

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"--frames must be >= 1, got {self.frames}")
        if self.ring_bytes <= 0:
            raise ValueError(f"--ring-mb must be > 0, got {self.ring_bytes / 2**20:g}")
        if self.score_every_s is not None:
            finite_positive("--score-every", self.score_every_s)
        stream_names(self.streams)  # refuses a count below 1

    def sim_config(self, index: int) -> SimConfig:
        """The simulator of stream ``index``: its own field (seed) and brightness (`harness.sim_config`)."""
        return sim_config(self.height, self.width, self.rate_hz or 30.0, self.photons, self.daemon.engine.seed + index,
                          stream=index, events=self.events)


def untrained_weights(config: EngineConfig, frame: np.ndarray, path: str) -> None:
    """Weights of a fresh network for `frame`'s size: what --inference-only runs without --init, so
    the inference path (not the warm-up's temporal mean) is what gets timed."""
    from umvd_live.engine import StreamDenoiser

    with StreamDenoiser(EngineConfig(preset=config.preset, device=config.device, window=config.window,
                                     context=config.context, train_mode="inline", seed=config.seed)) as den:
        den.push(frame, infer=False)
        den.save_weights(path)


def measure(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark ``cfg`` describes; return its figures."""
    sources = []
    for i, name in enumerate(stream_names(cfg.streams)):
        # A scripted session is one movie from start to end: its ring holds all of it.
        budget = None if cfg.events else cfg.ring_bytes // cfg.streams
        sources.append((name, FrameRing.generate(cfg.sim_config(i), cfg.frames, budget)))
    with tempfile.TemporaryDirectory(prefix="umvd-bench-") as tmp:
        daemon_cfg = cfg.daemon
        init_label = daemon_cfg.engine.init
        if cfg.inference_only and daemon_cfg.engine.init is None:
            path = os.path.join(tmp, "untrained.pt")
            untrained_weights(daemon_cfg.engine, sources[0][1].noisy[0], path)
            daemon_cfg = dataclasses.replace(daemon_cfg, engine=dataclasses.replace(daemon_cfg.engine, init=path))
            init_label = "untrained"
        return _measure(cfg, daemon_cfg, sources, init_label)


@dataclass
class _Progress:
    """When a stream went live, and its training steps and skips by then."""

    live_at: float | None = None
    steps_at_live: int = 0
    skipped_at_live: int = 0


def _measure(cfg: BenchConfig, daemon_cfg: DaemonConfig, sources: list[tuple[str, FrameRing]],
             init_label: str | None) -> dict[str, Any]:
    import torch

    load_start = psutil.getloadavg()[0]
    rss_start = psutil.Process().memory_info().rss / 2**20
    daemon = Daemon(daemon_cfg, engine_factory(daemon_cfg))
    inbox, router = daemon.transport.inbox, daemon.router
    monitor: OutputMonitor | None = None
    producer: FrameProducer | None = None
    gc_pauses = GcPauses()
    try:
        gc_pauses.start()
        daemon.start()
        if cfg.inference_only:
            daemon.set_training_paused(None, True)  # the control socket's pause: new streams start paused
        monitor = OutputMonitor(daemon.endpoints["output"], sources, cfg.frames)
        monitor.start()
        _await_subscription(daemon, monitor)
        producer = FrameProducer(sources, inbox, cfg.frames, cfg.rate_hz, cfg.rss_every_s,
                                 daemon.run_length * len(sources))
        producer.start()
        started = monotonic()
        names = [name for name, _ in sources]
        progress = {name: _Progress() for name in names}
        rss_live = None
        over_timeline: list[list[Any]] = []  # [s since start, over, load] at each change
        over = False
        while True:  # the daemon's own frame loop (`Daemon.serve`), one pass at a time
            daemon.run_once()
            producer.taken.set()
            for name, p in progress.items():
                stream = router.streams.get(name)
                if p.live_at is None and stream is not None and stream.denoiser is not None \
                        and stream.denoiser.state == "live":
                    p.live_at = monotonic()
                    p.steps_at_live = int(stream.denoiser.model_step)
                    p.skipped_at_live = stream.counters.skipped
                    if all(q.live_at is not None for q in progress.values()):
                        rss_live = psutil.Process().memory_info().rss / 2**20
            if router.capacity.over != over:
                over = router.capacity.over
                over_timeline.append([round(monotonic() - started, 2), over, round(router.capacity.load(), 3)])
            if producer.done.is_set() and len(inbox) == 0:
                break
        ended = monotonic()
        rss_end = psutil.Process().memory_info().rss / 2**20  # still streaming: before the flush
        peak_streaming = peak_rss_mb()  # before the scoring's own arrays
        status = daemon.status()
        engine_config = dict(status["engine"])  # what the engines were built from
        saved = daemon.save_model(names[0], cfg.save_model).result() \
            if cfg.save_model and names[0] in router.streams else None
        daemon.finish()  # flush the last N//2 outputs and stop the trainers
        counters = {name: dataclasses.asdict(router.streams[name].counters) if name in router.streams else {}
                    for name in names}
        published = sum(int(c.get("frames_out", 0)) for c in counters.values())
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
    if cfg.save_outputs is not None:
        save_outputs(cfg.save_outputs, sources, monitor, cfg.frames)
    per_stream = {
        name: _stream_figures(cfg, daemon_cfg, s, ring, producer, monitor, status["streams"].get(name, {}),
                              counters[name], progress[name], ended)
        for s, (name, ring) in enumerate(sources)
    }
    return _figures(cfg, daemon_cfg, sources, init_label, producer, monitor, per_stream, status, engine_config,
                    capacity_timeline=over_timeline, ended=ended, rss=(rss_start, rss_live, rss_end),
                    peak_streaming_mb=peak_streaming,
                    load=(load_start, psutil.getloadavg()[0]), published=published, saved=saved,
                    torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
                    gc_pauses=gc_pauses.summary(), batch=daemon.batch, workers=daemon.workers)


def _await_subscription(daemon: Daemon, monitor: OutputMonitor) -> None:
    """Send probes on the output until the monitor gets one: only then is nothing published lost."""
    output = daemon.transport.output
    assert output is not None
    deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
    while not monitor.subscribed.wait(0.02):
        if time.monotonic() > deadline:
            raise RuntimeError("the bench's output monitor could not subscribe to the daemon's output")
        output.send_multipart([PROBE_TOPIC, b"", b""], flags=zmq.NOBLOCK)


def _rate(times: np.ndarray) -> float | None:
    times = np.sort(times[np.isfinite(times)])
    if times.size < 2 or times[-1] <= times[0]:
        return None
    return float((times.size - 1) / (times[-1] - times[0]))


def _worst(latency_ms: np.ndarray, steady: np.ndarray, count: int = 10) -> list[tuple[int, float]]:
    """[seq, ms] of the slowest steady-state outputs, slowest first: where the tail comes from."""
    seqs = np.flatnonzero(steady & np.isfinite(latency_ms))
    order = seqs[np.argsort(latency_ms[seqs])[::-1][:count]]
    return [(int(i), round(float(latency_ms[i]), 1)) for i in order]


def _stream_figures(cfg: BenchConfig, daemon_cfg: DaemonConfig, s: int, ring: FrameRing, producer: FrameProducer,
                    monitor: OutputMonitor, snapshot: StreamStatus | dict[str, Any], counters: dict[str, Any],
                    progress: _Progress, ended: float) -> dict[str, Any]:
    """The figures of stream ``s`` (the module's docstring says what each one is)."""
    k = daemon_cfg.engine.window // 2
    handed = producer.handed[s]
    latency_ms = monitor.latency_ms[s]
    # Steady state: outputs after the warm start ("live" or "adapting": leaving the adapting ones out
    # would leave holes in the span fps_out is taken over), without the last N//2 that only the final
    # flush produces (they wait for no later frame, so they would flatter both latency and rate).
    streamed = np.arange(cfg.frames) < cfg.frames - k
    steady = monitor.steady[s] & streamed
    published_at = handed + latency_ms / 1000.0
    latency_live = latency_summary(latency_ms[steady])
    engine = snapshot.get("engine", {}) if isinstance(snapshot.get("engine"), dict) else {}
    steps = int(engine.get("train_steps", snapshot.get("model_step", 0)) or 0)
    live_at = progress.live_at
    live_span = ended - live_at if live_at is not None else 0.0
    first = handed[0] if np.isfinite(handed[0]) else None
    skipped = int(counters.get("skipped", 0))
    first_outputs = _first_outputs(handed, published_at, monitor, s)
    psnr_raw, psnr_den = monitor.raw[s].psnr(), monitor.denoised[s].psnr()
    return {
        "photons": ring_photons(cfg, s),
        "seed": daemon_cfg.engine.seed + s,
        "fps_in": _rate(handed),
        "fps_out": _rate(published_at[steady]) if steady.sum() >= 2 else _rate(published_at[streamed]),
        "frames_handed": int(np.isfinite(handed).sum()),
        "frames_published": int(counters.get("frames_out", 0)),
        "frames_received_by_viewer": int(monitor.received_by[s]),
        "latency_ms_p50": latency_live["p50"],
        "latency_ms_p99": latency_live["p99"],
        "latency_ms_max": latency_live["max"],
        "latency_ms_all": latency_summary(latency_ms),
        "latency_ms_worst": _worst(latency_ms, steady),
        "first_live_seq": int(np.argmax(monitor.live[s])) if monitor.live[s].any() else None,
        "skipped": skipped,
        "skipped_after_warmup": skipped - progress.skipped_at_live if live_at else None,
        "warmup_s": None if live_at is None or first is None else live_at - first,
        "train_steps": steps,
        "train_steps_per_s": engine.get("train_steps_per_s"),
        "train_steps_per_s_after_warmup": (steps - progress.steps_at_live) / live_span if live_span > 0 else None,
        "infer_ms": snapshot.get("infer_ms"),  # the daemon's running estimate of one inferred output
        "loss": engine.get("loss"),
        "rollbacks": engine.get("rollbacks"),
        "psnr_raw_db": psnr_raw,
        "psnr_denoised_db": psnr_den,
        "psnr_gain_db": psnr_den - psnr_raw if psnr_raw is not None and psnr_den is not None else None,
        "frames_evaluated": int(monitor.steady[s].sum()),
        "first_output_s": first_outputs,
        "first_live_output_s": first_outputs.get("live"),
        "states": {name: int((monitor.state[s] == code).sum()) for code, name in enumerate(monitor.state_names)
                   if (monitor.state[s] == code).any()},
        "changes": snapshot.get("changes"),  # the daemon's detected changes, where it reports them
        "activity": _activity(cfg, s, ring, monitor),
        "activity_over_time": _activity_over_time(cfg, s, ring, monitor),
        "counters": counters,
        "engine_stats": engine,
        "ring": {"frames": len(ring), "mb": ring.nbytes / 2**20, "generate_s": ring.generate_s,
                 "repeats": cfg.frames > len(ring)},
    }


def _first_outputs(handed: np.ndarray, published_at: np.ndarray, monitor: OutputMonitor, s: int) -> dict[str, float]:
    """Seconds from the first frame's hand-over to the first publication in each output state."""
    if not np.isfinite(handed[0]):
        return {}
    out = {}
    for code, name in enumerate(monitor.state_names):
        times = published_at[(monitor.state[s] == code) & np.isfinite(published_at)]
        if times.size:
            out[name] = round(float(times.min() - handed[0]), 3)
    return out


#: (label, change time, first seq, end seq, stage): a span the activity is scored on (`_segments`)
ScoredSpan = tuple[str, float | None, int, int, tuple[int, int]]


def _segments(cfg: BenchConfig, first_live: int | None, end: int) -> list[ScoredSpan]:
    """(label, change time, first seq, end seq, stage) of each span the activity is scored on:
    from the first live output, and with events from each change (or the first live output, if
    later) to the next; a stage move moves the footprints."""
    if not cfg.events:
        return [("live outputs", None, first_live if first_live is not None else end, end, (0, 0))]
    rate = cfg.rate_hz or 30.0
    starts: list[tuple[str, float | None, int, tuple[int, int]]] = [("stream start", 0.0, 0, (0, 0))]
    stage = (0, 0)
    for event in cfg.events:
        if event.kind == MOVE:
            stage = (stage[0] + event.shift_px[0], stage[1] + event.shift_px[1])
        starts.append((event.label(), event.at_s, event.first_frame(rate), stage))
    out = []
    for i, (label, at_s, first, stage) in enumerate(starts):
        stop = min(starts[i + 1][2] if i + 1 < len(starts) else end, end)
        begin = first if first_live is None else max(first, first_live)
        out.append((label, at_s, stop if first_live is None else min(begin, stop), stop, stage))
    return out


def save_outputs(path: Path, sources: list[tuple[str, FrameRing]], monitor: OutputMonitor, frames: int) -> None:
    """``--save-outputs``: per stream, over the ring's first pass (the frames the activity is
    scored on), ``<stream>.raw`` (uint16), ``<stream>.truth`` and ``<stream>.denoised`` (float32,
    NaN where no output came: a preview skip), ``<stream>.state`` (index into ``states``, -1
    without output), ``<stream>.model_step`` and ``<stream>.amplitude_gain`` of each output;
    ``offset_adu`` per stream. What a live run looked like, to be drawn (tools/figure_real.py
    live), not only scored."""
    arrays: dict[str, np.ndarray] = {"states": np.array(monitor.state_names)}
    for s, (name, ring) in enumerate(sources):
        end = min(frames, len(ring))
        denoised = np.full((end, *ring.noisy.shape[1:]), np.nan, np.float32)
        for seq, image in monitor.images[s].items():
            if seq < end:
                denoised[seq] = image
        arrays |= {f"{name}.raw": ring.noisy[:end], f"{name}.truth": ring.clean[:end],
                   f"{name}.denoised": denoised, f"{name}.state": monitor.state[s, :end],
                   f"{name}.model_step": monitor.model_step[s, :end],
                   f"{name}.amplitude_gain": monitor.amplitude_gain[s, :end],
                   f"{name}.offset_adu": np.array(ring.sim.config.offset_adu)}
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy stubs: the first **kwarg taken as allow_pickle


def _activity(cfg: BenchConfig, s: int, ring: FrameRing, monitor: OutputMonitor) -> list[dict[str, Any]]:
    """`metrics.activity_report` of each segment (`_segments`) of stream ``s``."""
    spans = _segments(cfg, _first_live(monitor, s), _scored_end(cfg, ring))
    return [_score_span(cfg, s, ring, monitor, span) for span in spans]


def _activity_over_time(cfg: BenchConfig, s: int, ring: FrameRing,
                        monitor: OutputMonitor) -> list[dict[str, Any]] | None:
    """``--score-every``: each segment's activity again in consecutive spans of that many seconds
    of the stream (`_pieces`), each beside its own oracles: how the live output comes along as the
    network goes on training on the stream, which one score over a whole run averages away."""
    if cfg.score_every_s is None:
        return None
    rate = cfg.rate_hz or 30.0
    step = max(1, round(cfg.score_every_s * rate))
    out = []
    for label, at_s, start, stop, stage in _segments(cfg, _first_live(monitor, s), _scored_end(cfg, ring)):
        for first, end in _pieces(start, stop, step):
            row = _score_span(cfg, s, ring, monitor, (label, at_s, first, end, stage))
            out.append(row | {"from_s": round(first / rate, 3), "to_s": round(end / rate, 3)})
    return out


def _pieces(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) in consecutive pieces of ``step`` frames; a last piece under half a step joins
    the one before it (too few frames to score on their own)."""
    cuts = list(range(start, stop, step))[1:]
    if cuts and stop - cuts[-1] < step / 2:
        cuts.pop()
    bounds = [start, *cuts, stop]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _first_live(monitor: OutputMonitor, s: int) -> int | None:
    live = np.flatnonzero(monitor.live[s])
    return int(live[0]) if live.size else None


def _scored_end(cfg: BenchConfig, ring: FrameRing) -> int:
    """The activity is scored on the ring's first pass: later frames repeat it, noise included."""
    return min(cfg.frames, len(ring))


def _score_span(cfg: BenchConfig, s: int, ring: FrameRing, monitor: OutputMonitor, span: ScoredSpan) -> dict[str, Any]:
    """`metrics.activity_report` of stream ``s``'s outputs over one `ScoredSpan`, or why it has none."""
    label, at_s, start, stop, stage = span
    row: dict[str, Any] = {"segment": label, "at_s": at_s}
    if stop <= start:
        return row | {"skipped": "no live output in it"}
    row["span"] = [start, stop - 1]
    images = monitor.images[s]
    estimate = np.zeros((stop - start, cfg.height, cfg.width), np.float32)
    scored = np.zeros(stop - start, bool)
    for i, seq in enumerate(range(start, stop)):
        if seq in images:
            estimate[i] = images[seq]
            scored[i] = True
    try:
        report = activity_report(ring.noisy[start:stop], ring.clean[start:stop], estimate,
                                 ring.sim.footprint_matrix(stage), offset=ring.sim.config.offset_adu,
                                 scored=scored, oracle=cfg.oracle, kinds=ring.sim.scene.kinds)
    except ValueError as exc:
        return row | {"skipped": str(exc)}
    return row | report


def _event_bins(cfg: BenchConfig, ring: FrameRing, monitor: OutputMonitor, s: int = 0) -> dict[str, Any]:
    """PSNR and output states in `EVENT_BINS_S` after the stream's start and after each change
    (each cut at the next change): raw over every frame of the bin (the input, whatever the daemon
    did), denoised over the frames that got an output."""
    rate = cfg.rate_hz or 30.0
    have = np.isfinite(monitor.sse[s])
    pixels = cfg.height * cfg.width
    raw_sse = np.empty(cfg.frames)
    for i in range(cfg.frames):
        diff = (ring.noisy_of(i).astype(np.float64) - ring.clean_of(i)).ravel()
        raw_sse[i] = float(diff @ diff)
    lo_truth = ring.clean.min(axis=(1, 2)).astype(np.float64)
    hi_truth = ring.clean.max(axis=(1, 2)).astype(np.float64)
    starts = [("stream start", 0.0, 0)] + [(e.label(), e.at_s, e.first_frame(rate)) for e in cfg.events]
    rows = []
    for i, (label, at_s, first) in enumerate(starts):
        end = min(starts[i + 1][2] if i + 1 < len(starts) else cfg.frames, cfg.frames)
        bins = []
        for lo_s, hi_s in EVENT_BINS_S:
            a = first + math.ceil(lo_s * rate - 1e-9)
            b = min(first + math.ceil(hi_s * rate - 1e-9), end)
            seqs = np.arange(a, max(a, b))
            got = seqs[have[seqs]]
            raw, den = PsnrAccumulator(), PsnrAccumulator()
            states: dict[str, int] = {}
            for seq in seqs:
                raw.add_sums(raw_sse[seq], pixels, lo_truth[seq % len(ring)], hi_truth[seq % len(ring)])
            for seq in got:
                den.add_sums(monitor.sse[s, seq], pixels, lo_truth[seq % len(ring)], hi_truth[seq % len(ring)])
                name = monitor.state_names[monitor.state[s, seq]]
                states[name] = states.get(name, 0) + 1
            bins.append({"from_s": lo_s, "to_s": hi_s, "frames": int(seqs.size), "outputs": int(got.size),
                         "psnr_raw_db": raw.psnr(), "psnr_denoised_db": den.psnr(), "states": states})
        rows.append({"change": label, "at_s": at_s, "first_seq": first, "bins": bins})
    return {"spec": cfg.events_spec, "events": [dataclasses.asdict(e) for e in cfg.events],
            "bins_s": [list(b) for b in EVENT_BINS_S], "rows": rows}


def ring_photons(cfg: BenchConfig, s: int) -> float:
    """Mean photons per pixel per frame of stream ``s`` (`harness.BRIGHTNESS`)."""
    return cfg.sim_config(s).photons


def _sum(values: list[Any]) -> Any:
    """The sum, or None when a value is missing."""
    return None if any(v is None for v in values) else sum(values)


def _totals(cfg: BenchConfig, daemon_cfg: DaemonConfig, producer: FrameProducer, monitor: OutputMonitor,
            per_stream: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures of all streams together: rates and counts summed, latency and PSNR over every
    stream's outputs, the warm start of the last stream to go live."""
    k = daemon_cfg.engine.window // 2
    rows = list(per_stream.values())
    names = list(per_stream)
    streamed = np.arange(cfg.frames) < cfg.frames - k
    steady = monitor.steady & streamed[None, :]
    latency = latency_summary(monitor.latency_ms[steady])
    worst = [(names[s], seq, ms) for s in range(len(names))
             for seq, ms in _worst(monitor.latency_ms[s], steady[s])]
    raw = PsnrAccumulator.merged(monitor.raw)
    den = PsnrAccumulator.merged(monitor.denoised)
    psnr_raw, psnr_den = raw.psnr(), den.psnr()
    infer = [r["infer_ms"] for r in rows if r["infer_ms"] is not None]
    lives = [r["first_live_seq"] for r in rows]
    return {
        "fps_in": _sum([r["fps_in"] for r in rows]),
        "fps_out": _sum([r["fps_out"] for r in rows]),
        "frames_handed": sum(r["frames_handed"] for r in rows),
        "frames_published": sum(r["frames_published"] for r in rows),
        "frames_received_by_viewer": monitor.received,
        "latency_ms_p50": latency["p50"],
        "latency_ms_p99": latency["p99"],
        "latency_ms_max": latency["max"],
        "latency_ms_all": latency_summary(monitor.latency_ms.ravel()),
        "latency_ms_worst": sorted(worst, key=lambda w: -w[2])[:10],
        "first_live_seq": None if any(v is None for v in lives) else max(lives),
        "skipped": sum(r["skipped"] for r in rows),
        "skipped_after_warmup": _sum([r["skipped_after_warmup"] for r in rows]),
        "warmup_s": None if any(r["warmup_s"] is None for r in rows) else max(r["warmup_s"] for r in rows),
        "train_steps": sum(r["train_steps"] for r in rows),
        "train_steps_per_s": _sum([r["train_steps_per_s"] for r in rows]),
        "train_steps_per_s_after_warmup": _sum([r["train_steps_per_s_after_warmup"] for r in rows]),
        "infer_ms": sum(infer) / len(infer) if infer else None,
        "loss": None,
        "rollbacks": _sum([r["rollbacks"] for r in rows]),
        "psnr_raw_db": psnr_raw,
        "psnr_denoised_db": psnr_den,
        "psnr_gain_db": psnr_den - psnr_raw if psnr_raw is not None and psnr_den is not None else None,
        "frames_evaluated": sum(r["frames_evaluated"] for r in rows),
        "first_live_output_s": None if any(r["first_live_output_s"] is None for r in rows)
        else max(r["first_live_output_s"] for r in rows),
        "changes": _sum([r["changes"] for r in rows]),
        "activity": None,  # per stream, in "streams"
        "activity_over_time": None,
    }


def _figures(cfg: BenchConfig, daemon_cfg: DaemonConfig, sources: list[tuple[str, FrameRing]],
             init_label: str | None, producer: FrameProducer, monitor: OutputMonitor,
             per_stream: dict[str, dict[str, Any]], status: DaemonStatus, engine_config: dict[str, Any] | None,
             *, capacity_timeline: list[list[Any]], ended: float, rss: tuple[float, float | None, float],
             peak_streaming_mb: float,
             load: tuple[float, float],
             published: int, saved: dict[str, Any] | None, torch_threads: int, torch_version: str,
             gc_pauses: dict[str, Any], batch: int, workers: int) -> dict[str, Any]:
    import torch

    k = daemon_cfg.engine.window // 2
    names = list(per_stream)
    single = len(names) == 1
    main = per_stream[names[0]] if single else _totals(cfg, daemon_cfg, producer, monitor, per_stream)
    engine = per_stream[names[0]]["engine_stats"]
    device = engine.get("device") or daemon_cfg.engine.device
    gpu = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(), "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20}
    handed = producer.handed
    first = float(np.nanmin(handed)) if np.isfinite(handed).any() else None
    rings = [ring for _, ring in sources]
    figures = {
        "mode": "max" if cfg.rate_hz is None else "paced",
        "size": [cfg.height, cfg.width],
        "frames": cfg.frames,
        "rate_hz": cfg.rate_hz,
        "photons": cfg.photons,
        "stream_count": len(names),
        "stream_names": names,
        "preset": engine.get("preset") or daemon_cfg.engine.preset,
        "preset_requested": daemon_cfg.engine.preset,
        "device": str(device),
        "precision": engine.get("precision"),
        "inference_only": cfg.inference_only,
        "init": init_label,
        **{key: value for key, value in main.items() if key not in ("counters", "engine_stats", "ring")},
        "gc": gc_pauses,
        "latency_target_ms": None if cfg.rate_hz is None else 1000.0 * k / cfg.rate_hz + LATENCY_SLACK_MS,
        "batch": batch,
        "workers": workers,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_streaming_mb": peak_streaming_mb,
        "rss_mb": {"start": rss[0], "live": rss[1], "end": rss[2]},
        "rss_mb_timeline": [[round(t, 2), round(m, 1)] for t, m in producer.rss_timeline],
        "gpu": gpu,
        "duration_s": ended - first if first is not None else None,
        "producer_late": producer.late,
        "inbox_refused": producer.refused,
        "viewer_errors": monitor.errors,
        "daemon": {"catchup_ms": 1000.0 * daemon_cfg.catchup_s,
                   "counters": per_stream[names[0]]["counters"] if single else
                   {name: row["counters"] for name, row in per_stream.items()},
                   "inbox_overflow": status.get("inbox", {}).get("overflow"),
                   "cpu_budget": daemon_cfg.cpu_budget},
        "capacity": {**status["capacity"], "timeline": capacity_timeline},  # the timeline: the bench's own
        "oracle": cfg.oracle,
        "kept_outputs_mb": sum(image.nbytes for images in monitor.images for image in images.values()) / 2**20,
        "events": _event_bins(cfg, rings[0], monitor) if cfg.events else None,
        "ring": {"frames": min(len(r) for r in rings), "mb": sum(r.nbytes for r in rings) / 2**20,
                 "generate_s": sum(r.generate_s for r in rings), "repeats": any(cfg.frames > len(r) for r in rings)},
        "saved_model": saved,
        "engine": engine_config,
        "engine_stats": engine,
        "streams": {name: {key: value for key, value in row.items() if key != "engine_stats"}
                    for name, row in per_stream.items()},
        "cpu_count": cpu_cores(),
        "torch_threads": torch_threads,
        "torch_version": torch_version,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "load_average": {"start": load[0], "end": load[1]},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return figures


# ---- presentation --------------------------------------------------------------------------------
def print_table(result: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    r = result
    several = r.get("stream_count", 1) > 1
    title = (f"umvd-live bench: {str(r['stream_count']) + ' streams × ' if several else ''}"
             f"{r['size'][0]}×{r['size'][1]}, {r['frames']} frames, "
             f"{'max rate' if r['mode'] == 'max' else format_figure(r['rate_hz'], '.1f', ' Hz')}, "
             f"{r['preset']} on {r['device']} ({r['precision']}){', inference only' if r['inference_only'] else ''}")
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("fps in / out (sustained)", f"{format_figure(r['fps_in'])} / {format_figure(r['fps_out'])}"),
        ("latency p50 / p99 / max (after warm start)",
         " / ".join(format_figure(r[f"latency_ms_{q}"]) for q in ("p50", "p99", "max")) + " ms"),
        ("latency p50 / p99 / max (every output)",
         " / ".join(format_figure(r["latency_ms_all"][q]) for q in ("p50", "p99", "max")) + " ms"),
        ("latency target (N//2 frames + 100 ms)", format_figure(r["latency_target_ms"], '.1f', " ms")),
        ("preview frames skipped (after warm start)", f"{r['skipped']} ({format_figure(r['skipped_after_warmup'])})"),
        ("warm start", format_figure(r["warmup_s"], '.2f', " s")),
        ("training steps (per s, after warm start)",
         f"{r['train_steps']} ({format_figure(r['train_steps_per_s'])}, "
         f"{format_figure(r['train_steps_per_s_after_warmup'])})"),
        ("PSNR raw → denoised (gain)",
         f"{format_figure(r['psnr_raw_db'], '.2f')} → {format_figure(r['psnr_denoised_db'], '.2f')} dB "
         f"({format_figure(r['psnr_gain_db'], '.2f', ' dB')}) over {r['frames_evaluated']} frames"),
        ("first live output (outputs per state)",
         f"{format_figure(r.get('first_live_output_s'), '.2f', ' s')} ({_states(r.get('states'))})"),
        ("changes detected by the daemon", format_figure(r.get("changes"))),
        ("garbage-collector pauses (full; longest)",
         f"{r['gc']['collections']} ({r['gc']['full_collections']}; {r['gc']['pause_ms_max']:.0f} ms)"),
        ("peak RSS streaming, with scoring (of which pre-generated frames)",
         f"{r['peak_rss_streaming_mb']:.0f} MB, {r['peak_rss_mb']:.0f} MB ({r['ring']['mb']:.0f} MB)"),
        ("frames handed / published / seen", f"{r['frames_handed']} / {r['frames_published']} / "
                                             f"{r['frames_received_by_viewer']}"),
        ("inference per frame (daemon's estimate; batch × workers)",
         f"{format_figure(r['infer_ms'], '.1f', ' ms')} ({r['batch']} × {r['workers']})"),
        ("producer late frames", str(r["producer_late"])),
        ("cores / torch threads", f"{r['cpu_count']} / {r['torch_threads']}"),
        ("load average (1 min) start → end",
         f"{r['load_average']['start']:.2f} → {r['load_average']['end']:.2f}"),
    ]
    capacity = r.get("capacity")
    if capacity:
        budget = capacity.get("budget") or {}
        rows.append(("capacity: over now (episodes, s over); load, lag at the end",
                     f"{'yes' if capacity['over'] else 'no'} ({capacity['episodes']}, "
                     f"{capacity['over_s_total']:.1f} s); {capacity['load']:.2f}, {capacity['lag_ms']:.0f} ms"))
        if budget:
            rows.append(("CPU budget: cores; train slots × threads (slot waits)",
                         f"{budget['cores']}; {budget['train_slots']} × {budget['train_threads']} "
                         f"({budget['slot_waits']})"))
    if r["gpu"]:
        rows.append(("GPU (peak memory)", f"{r['gpu']['name']} ({r['gpu']['peak_mem_mb']:.0f} MB)"))
    for name, value in rows:
        table.add_row(name + (", all streams" if several and name.startswith(
            ("fps", "latency p", "preview", "warm", "training", "PSNR", "frames", "inference")) else ""), value)
    console.print(table)
    if several:
        console.print(stream_table(r))
    else:
        for segment in r.get("activity") or []:
            console.print(activity_table(segment, r.get("oracle")))
        if r.get("activity_over_time"):
            console.print(over_time_table(r["activity_over_time"]))
    if r.get("events"):
        console.print(events_table(r["events"]))
    if r["warmup_s"] is None:
        console.print(f"[yellow]{'a' if several else 'the'} stream never left the warm start: no quality or "
                      "steady-state figures; give it more --frames or a smaller "
                      "--warmup-frames/--warmup-steps[/yellow]")
    if r["ring"]["repeats"]:
        console.print(f"[yellow]the run is longer than the pre-generated ring ({r['ring']['frames']} frames, "
                      "--ring-mb): frames repeat, noise included[/yellow]")


def _states(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{state} {n}" for state, n in (counts or {}).items()) or "—"


def activity_table(segment: dict[str, Any], oracle: str | None) -> Any:
    """One segment's `metrics.activity_report` (issue 14's metrics), or why it has none."""
    at = f" at {segment['at_s']:g} s" if segment.get("at_s") else ""
    title = f"activity, {segment['segment']}{at}"
    if "skipped" in segment:
        return f"{title}: not scored ({segment['skipped']})"
    return report_table(segment, title + f": frames {segment['span'][0]}–{segment['span'][1]}, {segment['frames']} "
                                         f"scored, {segment['cells']} cells; oracle grid {oracle} (searched after "
                                         f"the stream), {segment['seconds']:.0f} s")


def over_time_table(spans: list[dict[str, Any]]) -> Any:
    """``--score-every``: the output's activity scores span by span, beside each span's best
    Gaussian for each metric where the oracles were searched."""
    from rich.table import Table

    table = Table(title="activity over time (denoised; oracle: the best Gaussian of the span for that metric)",
                  title_justify="left", show_header=True, header_style="bold")
    for col in ("segment", "span (s)", "frames", "PSNR dB (oracle)", "active-set PSNR dB (oracle)",
                "trace corr (oracle)", "amplitude slope"):
        table.add_column(col, justify="left" if col == "segment" else "right")
    for span in spans:
        when = f"{span['from_s']:g}–{span['to_s']:g}"
        if "skipped" in span:
            table.add_row(span["segment"], when, "—", f"not scored: {span['skipped']}", "", "", "")
            continue
        table.add_row(span["segment"], when, str(span["frames"]), _beside_oracle(span, "psnr", ".2f"),
                      _beside_oracle(span, "active_psnr", ".2f"), _beside_oracle(span, "trace_corr", ".3f"),
                      format_figure(span["rows"]["denoised"].get("trace_slope"), ".2f"))
    return table


def _beside_oracle(span: dict[str, Any], metric: str, digits: str) -> str:
    """A scored span's ``metric``, and the best Gaussian's for it in brackets where searched."""
    value = format_figure(span["rows"]["denoised"].get(metric), digits)
    best = (span.get("oracle") or {}).get("best") or {}
    return f"{value} ({format_figure(best[metric][metric], digits)})" if metric in best else value


def events_table(events: dict[str, Any]) -> Any:
    """Issue 15's tables: PSNR raw/denoised in bins after the start and each change, then the
    outputs' states in the same bins."""
    from rich.console import Group
    from rich.table import Table

    tables = []
    for title, cell in (("PSNR raw/denoised (dB) in bins after the stream's start and each change",
                         lambda b: f"{format_figure(b['psnr_raw_db'])}/{format_figure(b['psnr_denoised_db'])}"),
                        ("outputs per state, same bins", lambda b: _states(b["states"]))):
        table = Table(title=title, show_header=True, header_style="bold")
        table.add_column("change (at)")
        for lo, hi in events["bins_s"]:
            table.add_column(f"{lo:g}–{hi:g} s", justify="right")
        for row in events["rows"]:
            cells = (cell(b) if b["frames"] else "" for b in row["bins"])
            table.add_row(f"{row['change']} ({row['at_s']:g} s)", *cells)
        tables.append(table)
    return Group(*tables)


def stream_table(result: dict[str, Any]) -> Any:
    """A row per stream, then the totals: what a capacity table needs."""
    from rich.table import Table

    table = Table(title="per stream (after the warm start)", show_header=True, header_style="bold")
    for col in ("stream", "photons", "fps in", "fps out", "skipped", "p50 ms", "p99 ms", "warm start s",
                "PSNR raw → denoised dB", "gain dB", "train steps"):
        table.add_column(col, justify="left" if col == "stream" else "right")

    def row(name: str, f: dict[str, Any], photons: str) -> list[str]:
        return [name, photons, format_figure(f["fps_in"]), format_figure(f["fps_out"]),
                f"{f['skipped']} ({format_figure(f['skipped_after_warmup'])})",
                format_figure(f["latency_ms_p50"]), format_figure(f["latency_ms_p99"]), format_figure(f["warmup_s"]),
                f"{format_figure(f['psnr_raw_db'], '.2f')} → {format_figure(f['psnr_denoised_db'], '.2f')}",
                format_figure(f["psnr_gain_db"], '.2f'),
                str(f["train_steps"])]

    for name, f in result["streams"].items():
        table.add_row(*row(name, f, format_figure(f["photons"], '.2f')))
    table.add_row(*row("total", result, ""), style="bold")
    return table


def run(config: BenchConfig) -> int:
    engine = config.daemon.engine
    try:
        # as `serve` does: a bad --prior is not silently replaced by training from scratch
        pick_device(engine.device)
        check_model_flags(engine.init, engine.prior)
        result = measure(config)
    except ValueError as exc:  # DeviceUnavailable and CheckpointError included
        print(f"umvd-live bench: {exc}", file=sys.stderr)
        return 2
    unwritten = None  # the JSON first: a table the terminal cannot print must not lose the run's figures
    if config.json_path is not None:
        path = config.json_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(finite_json(result), indent=2, default=str, allow_nan=False) + "\n")
        except OSError as exc:
            unwritten = f"umvd-live bench: cannot write {path}: {exc}"
    print_table(result)
    if unwritten is not None:
        print(unwritten, file=sys.stderr)
        return 2
    return 0 if result["frames_published"] > 0 else 1
