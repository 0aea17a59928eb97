"""`umvd-live demo`: the whole product on any machine, no microscope: a simulated two-photon session
streamed through the real daemon, a live status display, and a quality summary against the truth.

The parts are the real ones, really started: `umvd-live serve` in a subprocess (its own GIL and
session, on ephemeral loopback ports, so it never clashes with a running daemon and a terminal
Ctrl-C reaches only the demo, which then shuts the daemon down in order), the simulator publishing
through `FramePublisher` at ``--rate``, and a subscriber on the daemon's output that scores every
denoised frame against the simulation's ground truth, matched by ``seq``.

Units: `harness.ServeProcess` (the daemon, started with ``--ready-file``, and its control socket),
`QualityTracker` (PSNR by seq, and the frames of the session's last `SCORED_MB` for the activity
metrics), `OutputCollector` (the output subscriber), `DemoDisplay` (the live view), `DemoSummary`
(figures, table, JSON), `run` (the session's order: start, stream, stop, flush, summarise). What
`umvd-live bench` does alike (the simulator's set-up, the output subscriber, the scoring, the
printed figures) is `apps.harness`.

The summary scores the activity as `umvd-live bench` and tools/bench_denoise.py do, with the same
function (`metrics.activity_report`: whole-movie and active-set PSNR, per-cell trace correlation and
amplitude slope, beside the raw frames, a 5-frame mean and the Gaussian whose sigma the truth picks
for each metric), after the stream, over its last live frames.
"""

from __future__ import annotations

import json
import math
import queue
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import psutil
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from umvd_live.adapters.publisher import FramePublisher
from umvd_live.adapters.simulation import SimConfig, StreamResult, TwoPhotonSimulator, stream_simulation
from umvd_live.apps.harness import (
    DaemonError,
    OutputSubscriber,
    ServeProcess,
    activity_table,
    format_figure,
    sim_config,
)
from umvd_live.daemon.status import render_lines, render_table
from umvd_live.engine.budget import cpu_cores
from umvd_live.engine.config import MAX_SEED, MAX_WINDOW  # the engine's bounds, checked before serve starts
from umvd_live.metrics import SessionFrames, finite_json, psnr
from umvd_live.portable import handle_stop_signals, restore_signals, signal_name
from umvd_live.wire.schema import EngineStats, StatusReply, StreamStatus, latency_summary

STREAM = "sim0"
#: The demo's warm start: shorter than serve's (`EngineConfig`'s defaults). A stream starts live on
#: the shipped prior; the warm start is the training that adapts it to the sample, while the referee
#: judges every frame (docs/demo.md has the measurements).
DEMO_WARMUP_FRAMES = 150
DEMO_WARMUP_STEPS = 100
TMEAN_FRAMES = 5
QUIET_S = 0.3  # after the daemon's exit: the output is done when it has been silent this long
#: Memory for the frames the activity metrics score (noisy, truth and denoised of the latest
#: frames): 600 frames (20 s at 30 Hz) of 256², all of a 64² demo.
SCORED_MB = 384


class DemoError(Exception):
    """The demo could not run (the daemon did not start, or died); the message says why."""


def _engine_default(name: str) -> Any:
    """`EngineConfig`'s default for ``name`` (serve's, unless the demo is told otherwise), for the
    summary."""
    from umvd_live.engine import EngineConfig

    return next(f.default for f in fields(EngineConfig) if f.name == name)


@dataclass(frozen=True)
class DemoConfig:
    duration_s: float = 60.0
    height: int = 256
    width: int = 256
    rate_hz: float = 30.0
    photons: float = 2.0
    preset: str = "auto"
    device: str = "auto"
    window: int | None = None  # None: the engine's
    warmup_frames: int = DEMO_WARMUP_FRAMES
    warmup_steps: int = DEMO_WARMUP_STEPS
    seed: int = 0
    json_path: Path | None = None
    oracle: str = "reduced"  # the activity report's oracle grid (`metrics.ORACLE_GRIDS`, or none)

    def __post_init__(self) -> None:
        if not self.duration_s > 0:
            raise ValueError(f"--duration must be > 0, got {self.duration_s}")
        if self.warmup_frames < 1 or self.warmup_steps < 0:
            raise ValueError("--warmup-frames must be >= 1 and --warmup-steps >= 0")
        if self.window is not None and (not 3 <= self.window <= MAX_WINDOW or self.window % 2 == 0):
            raise ValueError(f"--window must be odd, from 3 to {MAX_WINDOW}, got {self.window}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be in 0..2**63-1, got {self.seed}")
        self.sim_config()  # refuses a bad size, rate or photon count before anything starts

    def scored_frames(self) -> int:
        """How many of the latest frames the activity metrics keep (`SCORED_MB`)."""
        return max(1, SCORED_MB * 2**20 // (self.height * self.width * (2 + 4 + 4)))

    def sim_config(self) -> SimConfig:
        return sim_config(self.height, self.width, self.rate_hz, self.photons, self.seed)

    def serve_args(self) -> list[str]:
        """`umvd-live serve`'s engine flags for this demo."""
        window = [] if self.window is None else ["--window", str(self.window)]
        return ["--preset", self.preset, "--device", self.device, *window,
                "--warmup-frames", str(self.warmup_frames), "--warmup-steps", str(self.warmup_steps),
                "--seed", str(self.seed)]


# ---- quality ------------------------------------------------------------------------------------
class LiveQuality(TypedDict):
    """Mean per-frame PSNR (dB) of the frames output past the warm start, and how many
    (`QualityTracker.live_means`)."""

    frames: int
    raw_db: float | None
    tmean_db: float | None
    denoised_db: float | None


class QualityTracker:
    """PSNR against the ground truth, matched by seq: raw, the 5-frame temporal mean and denoised.

    The simulator hands each frame over with `add_truth` (from its own thread: a queue, nothing
    computed there, so the acquisition keeps its pace); `ingest` computes the raw and temporal-mean
    figures in the consumer's thread. A clean frame is kept only until its denoised output has
    come (outputs come in seq order), so memory stays at a few frames whatever the duration.
    """

    def __init__(self, tmean_frames: int = TMEAN_FRAMES, keep_frames: int | None = None):
        self._incoming: queue.SimpleQueue[tuple[int, np.ndarray, np.ndarray]] = queue.SimpleQueue()
        self.frames = SessionFrames(keep_frames)  # what the activity metrics score, at the end
        self._recent: deque[tuple[int, np.ndarray, np.ndarray]] = deque(maxlen=tmean_frames)
        self._half = tmean_frames // 2
        self.truth: dict[int, np.ndarray] = {}
        self.raw: dict[int, float] = {}
        self.tmean: dict[int, float] = {}
        self.denoised: dict[int, float] = {}  # past the warm start only ("live" or "adapting")
        self.warmup_outputs = 0
        self.unscored = 0  # outputs whose truth was not there (should stay 0)

    def add_truth(self, seq: int, noisy: np.ndarray, clean: np.ndarray) -> None:
        self._incoming.put((seq, noisy, clean))

    def ingest(self) -> None:
        while True:
            try:
                seq, noisy, clean = self._incoming.get_nowait()
            except queue.Empty:
                return
            self.truth[seq] = clean
            self.frames.add_input(seq, noisy, clean)
            self.raw[seq] = psnr(noisy, clean)
            self._recent.append((seq, noisy, clean))
            if len(self._recent) == self._recent.maxlen:
                self._score_tmean(self._half)

    def finish(self) -> None:
        """The last frames' temporal means, over the frames that exist (no later ones came)."""
        self.ingest()
        for centre in range(max(len(self._recent) - self._half, 0), len(self._recent)):
            if self._recent[centre][0] not in self.tmean:
                self._score_tmean(centre)

    def _score_tmean(self, centre: int) -> None:
        frames = list(self._recent)
        lo, hi = max(centre - self._half, 0), min(centre + self._half + 1, len(frames))
        seq, _, clean = frames[centre]
        mean = np.stack([f[1] for f in frames[lo:hi]]).mean(axis=0, dtype=np.float32)
        self.tmean[seq] = psnr(mean, clean)

    def add_output(self, seq: int, image: np.ndarray, state: str) -> None:
        self.ingest()
        clean = self.truth.get(seq)
        for old in [s for s in self.truth if s <= seq]:
            del self.truth[old]
        self.frames.add_output(seq, image, state)
        if state == "warmup":  # "adapting" outputs (after a detected change) are the network's own: scored
            self.warmup_outputs += 1
            return
        if clean is None:
            self.unscored += 1
            return
        self.denoised[seq] = psnr(image, clean)

    def live_means(self) -> LiveQuality:
        """Mean per-frame PSNR (dB) over the frames output past the warm start ("live" or "adapting"),
        all three on the same frames."""
        seqs = list(self.denoised)

        def mean(values: dict[int, float]) -> float | None:
            found = [values[s] for s in seqs if s in values]
            return round(float(np.mean(found)), 2) if found else None

        return LiveQuality(frames=len(seqs), raw_db=mean(self.raw), tmean_db=mean(self.tmean),
                           denoised_db=mean(self.denoised))


# ---- the daemon's output ------------------------------------------------------------------------
@dataclass
class OutputFigures:
    received: int = 0
    received_streaming: int = 0  # before the stream ended: the latency figures are over these
    latencies_ms: list[float] = field(default_factory=list)
    first_live_at: float | None = None  # monotonic() of the first live output's arrival
    first_live_seq: int | None = None
    last_model_step: int = 0
    bad_messages: int = 0


class OutputCollector:
    """The demo stream's denoised frames off the daemon's output (`harness.OutputSubscriber`),
    taken in the demo's main thread."""

    def __init__(self, endpoint: str, tracker: QualityTracker, stream: str = STREAM):
        self.tracker = tracker
        self.figures = OutputFigures()
        self.streaming = True
        self.subscriber = OutputSubscriber(endpoint, [stream], rcvhwm=4000)

    def pump(self, timeout_s: float) -> int:
        """Take every waiting message, after waiting up to ``timeout_s`` for the first."""
        n = 0
        for parts in self.subscriber.receive(timeout_s):
            self._take(parts, time.monotonic())
            n += 1
        return n

    def _take(self, parts: list[bytes], now: float) -> None:
        f = self.figures
        msg = self.subscriber.decode(parts)
        if msg is None:
            f.bad_messages += 1
            return
        head = msg.header
        state = str(head.get("state", ""))
        f.received += 1
        f.last_model_step = int(head.get("model_step", 0))
        if self.streaming:
            f.received_streaming += 1
            f.latencies_ms.append(float(head.get("latency_ms", math.nan)))
        if state == "live" and f.first_live_at is None:
            f.first_live_at, f.first_live_seq = now, int(head["seq"])
        self.tracker.add_output(int(head["seq"]), msg.image, state)

    def drain_until_exit(self, proc: subprocess.Popen, limit_s: float) -> None:
        """Take the rest of the output: the daemon publishes everything before its `shutdown`
        reply and its output socket lingers until delivered, so once it has exited, what is left
        is already here or on the wire (one last quiet interval takes that)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.pump(0.1) == 0 and proc.poll() is not None:
                while self.pump(QUIET_S):
                    pass
                return

    def close(self) -> None:
        self.subscriber.close()


# ---- the simulated acquisition ------------------------------------------------------------------
class SimulatedAcquisition(threading.Thread):
    """`stream_simulation` in its own thread, handing each frame's truth to the tracker."""

    def __init__(self, endpoint: str, config: DemoConfig, tracker: QualityTracker):
        super().__init__(name="umvd-demo-sim", daemon=True)
        self.publisher = FramePublisher(endpoint, STREAM)
        self.config = config
        self.tracker = tracker
        self.stop_event = threading.Event()
        self.started_at: float | None = None  # monotonic() of the first frame
        self.result: StreamResult | None = None
        self.error: BaseException | None = None

    def _on_frame(self, seq: int, noisy: np.ndarray, clean: np.ndarray) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()
        self.tracker.add_truth(seq, noisy, clean)

    def run(self) -> None:
        try:
            self.result = stream_simulation(self.publisher, self.config.sim_config(), stop=self.stop_event,
                                            on_frame=self._on_frame, wait_subscriber_s=20.0)
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.publisher.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)

    @property
    def sent(self) -> int:
        return self.publisher.sent


# ---- the live display ---------------------------------------------------------------------------
class DemoDisplay:
    """The daemon's status table (`daemon/status.py`) under a line of the demo's own figures; plain lines
    every ``interval_s`` when stdout is not a terminal."""

    def __init__(self, console: Console, interval_s: float = 5.0):
        self.console = console
        self.interactive = console.is_terminal
        self.interval_s = 0.5 if self.interactive else interval_s
        self._live: Live | None = None
        self._next = 0.0

    def __enter__(self) -> DemoDisplay:
        if self.interactive:
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.start()
        return self

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def show(self, headline: str, status: StatusReply | None) -> None:
        self._next = time.monotonic() + self.interval_s
        if self._live is not None:
            parts: list[Any] = [Text(headline, style="bold")]
            if status is not None:
                parts.append(render_table(status))
            self._live.update(Group(*parts), refresh=True)
        else:
            self.console.print(headline, highlight=False, soft_wrap=True)
            for line in render_lines(status) if status is not None else []:
                self.console.print("  " + line, highlight=False, soft_wrap=True)

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def headline(config: DemoConfig, elapsed_s: float, sent: int, figures: OutputFigures, tracker: QualityTracker) -> str:
    q = tracker.live_means()
    quality = (f"PSNR over {q['frames']} live frames: raw {q['raw_db']:.1f} dB, denoised {q['denoised_db']:.1f} dB"
               if q["frames"] else "PSNR: waiting for the first live frame")
    return (f"umvd-live demo · {config.height}x{config.width} at {config.rate_hz:g} Hz, "
            f"{config.photons:g} photons/px · {elapsed_s:.0f}/{config.duration_s:g} s · sent {sent} · "
            f"received {figures.received} · {quality}")


# ---- summary ------------------------------------------------------------------------------------
@dataclass
class DemoSummary:
    """The figures the demo ends with (printed as a table; `--json` writes them as they are)."""

    ended_by: str
    duration_s: float
    size: tuple[int, int]
    rate_hz: float
    photons: float
    preset: str | None
    device: str | None
    frames_sent: int
    frames_dropped_by_publisher: int
    frames_late: int
    frames_received: int
    frames_skipped_by_daemon: int | None
    daemon_infer_ms: float | None  # the daemon's estimate of one frame's inference
    fps_in: float
    fps_out: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    warmup_frames: int
    warmup_steps: int
    warmup_is_serve_default: bool
    live_after_s: float | None
    first_live_seq: int | None
    training_steps: int
    training_steps_per_s: float | None
    live_frames_scored: int
    psnr_raw_db: float | None
    psnr_tmean_db: float | None
    psnr_denoised_db: float | None
    load_average: tuple[float, float, float]
    cpu_count: int
    daemon_pid: int
    activity: dict[str, Any] | None = None  # `metrics.activity_report` of the last live frames
    activity_skipped: str | None = None  # why there is none

    @property
    def frames_unaccounted(self) -> int:
        """Sent but neither received nor skipped by the daemon: lost on the way (should be 0)."""
        return self.frames_sent - self.frames_received - (self.frames_skipped_by_daemon or 0)

    @property
    def psnr_gain_db(self) -> float | None:
        if self.psnr_denoised_db is None or self.psnr_raw_db is None:
            return None
        return round(self.psnr_denoised_db - self.psnr_raw_db, 2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"psnr_gain_db": self.psnr_gain_db, "frames_unaccounted": self.frames_unaccounted}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def render_summary(s: DemoSummary) -> Table:
    table = Table(title=f"umvd-live demo: summary ({s.ended_by})", title_justify="left")
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row("session", f"{s.duration_s:.1f} s",
                  f"{s.size[0]}x{s.size[1]} at {s.rate_hz:g} Hz, {s.photons:g} photons/px; "
                  f"preset {s.preset or '-'} on {s.device or '-'}")
    table.add_row("frames sent", str(s.frames_sent),
                  f"dropped at the publisher {s.frames_dropped_by_publisher}, late {s.frames_late}")
    pct = 100.0 * s.frames_received / s.frames_sent if s.frames_sent else 0.0
    table.add_row("frames received", f"{s.frames_received} ({pct:.1f}%)",
                  f"denoised frames on the output socket; sent but neither received nor skipped: "
                  f"{s.frames_unaccounted}")
    if s.frames_skipped_by_daemon:
        table.add_row("skipped by the daemon", str(s.frames_skipped_by_daemon),
                      f"inference took {format_figure(s.daemon_infer_ms, '.0f', ' ms')} per frame, "
                      f"{1000 / s.rate_hz:.0f} ms come between frames: the preview skipped to the newest "
                      "frame (skipped frames still train the model; a faster machine, a smaller --size "
                      "or a lower --rate avoid it)")
    table.add_row("fps in / out", f"{s.fps_in:.1f} / {s.fps_out:.1f}", "")
    table.add_row("latency p50 / p99",
                  f"{format_figure(s.latency_p50_ms, '.0f')} / {format_figure(s.latency_p99_ms, '.0f', ' ms')}",
                  "input taken off the socket -> denoised frame published")
    setting = ("serve's defaults" if s.warmup_is_serve_default else
               f"the demo's settings; serve's defaults are {_engine_default('warmup_frames')} frames, "
               f"{_engine_default('warmup_steps')} steps")
    if s.live_after_s is None:
        table.add_row("warm-up", "never live", f"{s.warmup_frames} frames, {s.warmup_steps} steps ({setting}): "
                                               "run longer (--duration) or shorten the warm start")
    else:
        table.add_row("warm-up", f"{s.live_after_s:.1f} s",
                      f"to live (first live output: frame {s.first_live_seq}); {s.warmup_frames} frames, "
                      f"{s.warmup_steps} steps ({setting})")
    table.add_row("training steps", str(s.training_steps), format_figure(s.training_steps_per_s, ".1f", " steps/s"))
    if s.live_frames_scored:
        over = (f"mean per-frame PSNR against the truth, over the {s.live_frames_scored} frames the network "
                "output (state live or adapting)")
        table.add_row("PSNR raw", format_figure(s.psnr_raw_db, ".2f", " dB"), over)
        table.add_row("PSNR 5-frame mean", format_figure(s.psnr_tmean_db, ".2f", " dB"), "temporal mean, for context")
        table.add_row("PSNR denoised", format_figure(s.psnr_denoised_db, ".2f", " dB"),
                      f"{format_figure(s.psnr_gain_db, '+.2f', ' dB')} over raw")
    else:
        table.add_row("PSNR", "-", "no frame was the network's output (all temporal means, state warmup)")
    table.add_row("machine load", f"{s.load_average[0]:.2f}",
                  f"load average (1 min; 5 and 15 min: {s.load_average[1]:.2f}, {s.load_average[2]:.2f}) "
                  f"on {s.cpu_count} cores")
    if s.activity_skipped:
        table.add_row("activity", "-", f"not scored: {s.activity_skipped}")
    return table


def render_activity(activity: dict[str, Any], oracle: str) -> Table | Group:
    """What users look at (issue 14), as `umvd-live bench` prints it: the calcium transients."""
    first, last = activity["span"]
    searched = "" if oracle == "none" else f"; oracle Gaussians on the {oracle} grid, searched after the stream"
    return activity_table(activity, f"activity against the truth: frames {first}-{last} ({activity['frames']} "
                                    f"scored, {activity['cells']} cells){searched}")


def score_activity(config: DemoConfig, tracker: QualityTracker) -> tuple[dict[str, Any] | None, str | None]:
    """(the activity report of the kept frames from the first live one, or None and why)."""
    sim = config.sim_config()
    simulator = TwoPhotonSimulator(sim)  # the same scene: the same seed
    try:
        return tracker.frames.report(simulator.footprint_matrix(), offset=sim.offset_adu, oracle=config.oracle,
                                     kinds=simulator.scene.kinds), None
    except ValueError as exc:
        return None, str(exc)


# ---- the session --------------------------------------------------------------------------------
class StopSignals:
    """While the stream runs, Ctrl-C (SIGINT), SIGTERM and, on Windows, Ctrl-Break (SIGBREAK) only
    note that they came (`portable.stop_signals`); the streaming loop ends at its next turn. A
    KeyboardInterrupt raised there could be lost: a signal handler that raises while the main
    thread is in a ``__del__`` or a garbage-collector callback has its exception printed and
    dropped, and the demo streamed on after a Ctrl-C. Outside this block they interrupt as usual
    (a second Ctrl-C while finishing still ends the demo)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __enter__(self) -> StopSignals:
        self._previous = handle_stop_signals(self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        restore_signals(self._previous)


def run(config: DemoConfig) -> int:
    """The demo's session. Outside `StopSignals` SIGTERM and (Windows) Ctrl-Break end it as Ctrl-C
    does, through its clean path (KeyboardInterrupt): `apps.cli.main` handles them so for every
    command (`portable.stop_signals_as_ctrl_c`)."""
    return _session(config, Console(), Path(tempfile.mkdtemp(prefix="umvd-demo-")))


def _session(config: DemoConfig, console: Console, log_dir: Path) -> int:
    daemon = ServeProcess(log_dir, config.serve_args())
    tracker = QualityTracker(keep_frames=config.scored_frames())
    collector: OutputCollector | None = None
    sim: SimulatedAcquisition | None = None
    keep_log = False
    try:
        console.print(f"umvd-live demo: starting the daemon (umvd-live serve, pid {daemon.pid}) ...",
                      highlight=False, soft_wrap=True)
        ready = daemon.wait_ready()
        collector = OutputCollector(ready.output, tracker)
        console.print(f"Watch it live in another terminal: umvd-live view --connect {ready.output} "
                      f"--control {ready.control}", highlight=False, soft_wrap=True)
        sim = SimulatedAcquisition(ready.input, config, tracker)
        sim.start()
        ended_by, streamed_s, engine = _stream(config, console, daemon, collector, tracker, sim)
        final_status = _finish(daemon, collector, tracker, sim)
        console.print("umvd-live demo: scoring the activity against the truth ...", highlight=False)
        activity, skipped = score_activity(config, tracker)
        summary = _summarise(config, ended_by, streamed_s, daemon, collector, tracker, sim, final_status, engine)
        summary.activity, summary.activity_skipped = activity, skipped
        unwritten = None  # the JSON first: a summary the terminal cannot print must not lose the run
        if config.json_path:
            try:
                config.json_path.write_text(json.dumps(finite_json(summary.to_dict()), indent=2, allow_nan=False))
            except OSError as exc:
                unwritten = f"umvd-live demo: cannot write {config.json_path}: {exc}"
        console.print(render_summary(summary))
        if activity is not None:
            console.print(render_activity(activity, config.oracle))
        if unwritten is not None:
            console.print(unwritten, highlight=False)
            return 2
        return 0 if summary.frames_received else 1
    except (DemoError, DaemonError) as exc:
        keep_log = True
        console.print(f"umvd-live demo: {exc}\n(daemon log: {daemon.log_path})", highlight=False)
        return 2
    except KeyboardInterrupt:  # before streaming, or a second Ctrl-C while finishing
        console.print("umvd-live demo: interrupted", highlight=False)
        return 130
    finally:
        if sim is not None and sim.is_alive():
            sim.stop()
        if collector is not None:
            collector.close()
        daemon.kill()
        if not keep_log:
            daemon.remove_files()
            try:
                log_dir.rmdir()
            except OSError:
                pass


def _engine_figures(status: StatusReply | None) -> EngineStats | None:
    """The demo stream's engine figures (preset, device, training rate) in ``status``, or None: there
    are none before the stream's first frame, nor once its end message has closed its engine."""
    stream = status["streams"].get(STREAM) if status is not None else None
    engine = stream.get("engine") if stream is not None else None
    return engine if engine and "error" not in engine else None


def _stream(config: DemoConfig, console: Console, daemon: ServeProcess, collector: OutputCollector,
            tracker: QualityTracker, sim: SimulatedAcquisition) -> tuple[str, float, EngineStats | None]:
    """Receive and show until the duration has passed since the first frame, or Ctrl-C. Returns
    how it ended, the seconds streamed and the engine's figures while the stream still ran (the
    last status that had them, taken before the stream's end closes its engine)."""
    ended_by = f"--duration {config.duration_s:g} s"
    status: StatusReply | None = None
    engine: EngineStats | None = None
    with DemoDisplay(console) as display, StopSignals() as stop:
        while stop.received is None:
            collector.pump(0.05)
            tracker.ingest()
            if sim.error is not None:
                raise DemoError(f"the simulated acquisition failed: {sim.error!r}")
            if daemon.proc.poll() is not None:
                raise DemoError(f"the daemon exited with status {daemon.proc.returncode}:\n{daemon.log_tail()}")
            started = sim.started_at
            elapsed = time.monotonic() - started if started is not None else 0.0
            if display.due():
                status = daemon.status()
                engine = _engine_figures(status) or engine
                display.show(headline(config, elapsed, sim.sent, collector.figures, tracker), status)
            if started is not None and elapsed >= config.duration_s:
                break
            if not sim.is_alive():
                raise DemoError("the simulated acquisition stopped on its own")
        if stop.received is not None:
            ended_by = "Ctrl-C" if stop.received == signal.SIGINT else signal_name(stop.received)
        if started is not None:  # the engine's figures as the stream ends, before its end message
            engine = _engine_figures(daemon.status()) or engine
    sim.stop()
    # The stream has ended: take what was published by now, then stop counting "while streaming" (as
    # bench leaves out the final flush): the catch-up wait and the flush would inflate fps_out.
    collector.pump(0.0)
    collector.streaming = False
    started = sim.started_at
    streamed = (sim.result.elapsed_s if sim.result is not None else
                (time.monotonic() - started if started is not None else 0.0))
    return ended_by, streamed, engine


def _finish(daemon: ServeProcess, collector: OutputCollector, tracker: QualityTracker,
            sim: SimulatedAcquisition) -> StatusReply:
    """Let the daemon take in every frame sent, read its final figures, then shut it down (it
    flushes the last window's outputs before replying) and collect the rest of the output."""
    deadline = time.monotonic() + 10.0
    status = daemon.status()
    while time.monotonic() < deadline:
        stream = status["streams"].get(STREAM)
        if stream is not None and stream["frames_in"] + stream["rejected_total"] >= sim.sent:
            break
        collector.pump(0.1)
        status = daemon.status()
    collector.pump(0.05)
    daemon.request("shutdown", timeout_s=60.0)
    collector.drain_until_exit(daemon.proc, limit_s=30.0)
    tracker.finish()
    daemon.stop()
    return status


def _summarise(config: DemoConfig, ended_by: str, streamed_s: float, daemon: ServeProcess,
               collector: OutputCollector, tracker: QualityTracker, sim: SimulatedAcquisition,
               status: StatusReply, running_engine: EngineStats | None = None) -> DemoSummary:
    """The summary's figures. ``status`` is the daemon's final one (its counters include every frame
    sent); the engine's figures (preset, device, training steps/s) come from ``running_engine``, the
    last ones taken while the stream ran: the stream's end message closes its engine, so a status
    taken after it has none."""
    f = collector.figures
    stream: StreamStatus | dict[str, Any] = status["streams"].get(STREAM) or {}
    engine: EngineStats | dict[str, Any] = _engine_figures(status) or running_engine or {}
    result = sim.result or StreamResult()
    quality = tracker.live_means()
    live_after = (f.first_live_at - sim.started_at if f.first_live_at is not None and sim.started_at is not None
                  else None)
    steps_per_s = engine.get("train_steps_per_s")
    latency = latency_summary(f.latencies_ms)
    return DemoSummary(
        ended_by=ended_by, duration_s=round(streamed_s, 2), size=(config.height, config.width),
        rate_hz=config.rate_hz, photons=config.photons, preset=engine.get("preset"), device=engine.get("device"),
        frames_sent=sim.sent, frames_dropped_by_publisher=result.dropped, frames_late=result.late,
        frames_received=f.received, frames_skipped_by_daemon=stream.get("skipped"),
        daemon_infer_ms=stream.get("infer_ms"),
        fps_in=round(sim.sent / streamed_s, 2) if streamed_s > 0 else 0.0,
        fps_out=round(f.received_streaming / streamed_s, 2) if streamed_s > 0 else 0.0,
        latency_p50_ms=_rounded(latency["p50"]), latency_p99_ms=_rounded(latency["p99"]),
        warmup_frames=config.warmup_frames, warmup_steps=config.warmup_steps,
        warmup_is_serve_default=(config.warmup_frames, config.warmup_steps)
        == (_engine_default("warmup_frames"), _engine_default("warmup_steps")),
        live_after_s=None if live_after is None else round(live_after, 2), first_live_seq=f.first_live_seq,
        training_steps=max(int(stream.get("model_step", 0)), f.last_model_step),
        training_steps_per_s=None if steps_per_s is None else round(float(steps_per_s), 2),
        live_frames_scored=int(quality["frames"]), psnr_raw_db=quality["raw_db"],
        psnr_tmean_db=quality["tmean_db"], psnr_denoised_db=quality["denoised_db"],
        load_average=tuple(round(x, 2) for x in psutil.getloadavg()),  # portable
        cpu_count=cpu_cores(),
        daemon_pid=daemon.pid,
    )
