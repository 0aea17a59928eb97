"""The daemon's terminal status: a `rich` live table on a terminal, plain log lines otherwise.

Both render the same `status` snapshot that the control socket replies, so what the operator sees
and what a client reads cannot disagree.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from umvd_live.wire.schema import DaemonStatus, StreamStatus


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _loss(value: object) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.4g}"


def _state(snap: StreamStatus) -> str:
    state = snap["state"]
    if state == "warmup":
        state = f"warmup {100 * float(snap.get('warmup_progress') or 0):.0f}%"
    return state + (" (paused)" if snap.get("training_paused") else "") + (" (idle)" if snap.get("idle") else "")


def capacity_line(status: DaemonStatus) -> str | None:
    """One line while the daemon is over capacity (`capacity.CapacityMonitor`), else None."""
    cap = status.get("capacity") or {}
    if not cap.get("over"):
        return None
    return (f"OVER CAPACITY for {cap['over_s']:.0f} s: load {cap['load']:.2f}, lag {cap['lag_ms']:.0f} ms; "
            f"the preview skips evenly across streams (skipped: "
            + ", ".join(f"{name} {n}" for name, n in cap.get("skipped", {}).items()) + ")")


def errors_line(status: DaemonStatus) -> str | None:
    """One line once a socket thread's loop or a command failed (each logged with its traceback:
    the daemon went on, but the operator should look), else None."""
    inbox, control = status.get("inbox") or {}, status.get("control") or {}
    counts = {"input thread": inbox.get("errors", 0), "control thread": control.get("errors", 0),
              "commands failed": control.get("failed", 0)}
    if not any(counts.values()):
        return None
    return "errors (see the log): " + ", ".join(f"{what} {n}" for what, n in counts.items())


def render_table(status: DaemonStatus) -> Table:
    table = Table(title=f"umvd-live serve  ·  input {status['endpoints']['input']}  ·  "
                        f"output {status['endpoints']['output']}  ·  up {status['uptime_s']:.0f} s",
                  title_justify="left", expand=False)
    for col in ("stream", "shape", "fps in", "fps out", "p50 ms", "p99 ms", "state", "step",
                "loss", "in", "out", "drops", "skipped", "rejected"):
        table.add_column(col, justify="left" if col in ("stream", "state", "shape") else "right")
    for name, s in status["streams"].items():
        lat = s["latency_ms"]
        table.add_row(
            name, "x".join(map(str, s["shape"])) + f" {s['dtype']}" if s["shape"] else "-",
            f"{s['fps_in']:.1f}", f"{s['fps_out']:.1f}", _ms(lat["p50"]), _ms(lat["p99"]),
            _state(s), str(s["model_step"]), _loss(s["loss"]), str(s["frames_in"]),
            str(s["frames_out"]), str(s["drops"]), str(s["skipped"]), str(s["rejected_total"]),
        )
    glob = status["rejected_unattributed"]
    if glob or status["inbox"]["overflow"]:
        table.caption = (f"rejected without a stream: {sum(glob.values())} {glob or ''}  ·  "
                         f"inbox overflow: {status['inbox']['overflow']}")
    elif not status["streams"]:
        table.caption = "waiting for frames"
    for line in (errors_line(status), capacity_line(status)):
        if line is not None:
            table.caption = line + (f"  ·  {table.caption}" if table.caption else "")
    return table


def render_lines(status: DaemonStatus) -> list[str]:
    lines = []
    for name, s in status["streams"].items():
        lat = s["latency_ms"]
        lines.append(
            f"stream {name}: in {s['frames_in']} ({s['fps_in']:.1f} fps) out {s['frames_out']} "
            f"({s['fps_out']:.1f} fps) latency p50 {_ms(lat['p50'])} ms p99 {_ms(lat['p99'])} ms "
            f"state {_state(s)} step {s['model_step']} loss {_loss(s['loss'])} drops {s['drops']} "
            f"skipped {s['skipped']} rejected {s['rejected_total']}"
            + (f" {s['rejected']}" if s["rejected"] else "")
            + (f" nan/inf frames {s['nonfinite_frames']}" if s.get("nonfinite_frames") else "")
            + (f" seq restarts {s['seq_restarts']}" if s.get("seq_restarts") else "")
        )
    for line in (capacity_line(status), errors_line(status)):
        if line is not None:
            lines.append(f"daemon: {line}")
    glob = status["rejected_unattributed"]
    if glob or status["inbox"]["overflow"] or not lines:
        lines.append(f"daemon: streams {len(status['streams'])} rejected without a stream "
                     f"{sum(glob.values())} {glob or ''} inbox overflow {status['inbox']['overflow']}")
    return lines


class StatusDisplay:
    """Refreshes a live table (terminal) or prints log lines every ``interval_s`` (pipe, file)."""

    def __init__(self, interval_s: float = 5.0, stream: TextIO | None = None, interactive: bool | None = None):
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.interval_s = 0.25 if self.interactive else interval_s
        self.console = Console(file=self.stream)
        self._live: Live | None = None
        self._next = 0.0

    def __enter__(self) -> StatusDisplay:
        if self.interactive:
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.start()
        return self

    def due(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self._next

    def show(self, status: DaemonStatus) -> None:
        self._next = time.monotonic() + self.interval_s
        if self._live is not None:
            self._live.update(render_table(status), refresh=True)
        else:
            for line in render_lines(status):
                print(line, file=self.stream, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
