"""Simulate -> daemon -> score: the harness that `umvd-live demo` and `umvd-live bench` share.

Why one: both commands stream the simulator (`adapters.simulation`) through the real daemon and
score its output against the simulation's truth with the same report (`metrics.activity_report`),
so the set-up of the simulation (a scripted session included), the subscriber on the daemon's
output, the scoring and the printed figures must not drift apart between them. What differs stays
in each command: the demo runs `umvd-live serve` as a subprocess (`ServeProcess`, started with
``--ready-file``) and streams live, the bench drives the daemon in-process on pre-generated frames.

- simulation: `sim_config` (a session's simulator), `fit_gain` (the PMT gain lowered for a bright
  one: the rule tools/bench_denoise.py uses too), `session_events` (``--events``: a named session
  or a list), `BRIGHTNESS` of the channels of several streams; `movie_config` and `sim_overrides`
  (a file benchmark's movie, with ``--sim FIELD=VALUE``: tools/bench_denoise.py and
  tools/figure_real.py);
- the daemon: `ServeProcess` and its `ReadySignal` (the JSON ``serve --ready-file`` writes);
- the output: `OutputSubscriber`, a SUB socket on the daemon's denoised frames;
- report formatting: `format_figure` (one figure, or a dash) and `activity_table` (the rows of
  `metrics.activity_report`, the score both print).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import zmq

from umvd_live.adapters.simulation import LASER, SimConfig, SimEvent, parse_events
from umvd_live.metrics import REPORT_HEADERS, REPORT_METRICS, format_kind, format_score, report_rows
from umvd_live.wire.control_client import ControlClient, DaemonUnavailable
from umvd_live.wire.protocol import DENOISED_SUFFIX, OutputMessage, ProtocolError, decode_output
from umvd_live.wire.schema import StatusReply
from umvd_live.wire.security import enable_ipv6

# ---- the simulation -----------------------------------------------------------------------------
#: Brightness of the simulated channels of several streams, relative to ``photons``, in turn.
BRIGHTNESS = (1.0, 0.5, 2.0, 0.75)
#: Named scripted sessions for ``--events``; "default" is issue 15's (60 s: laser x3 at 30 s, stage
#: move 40 px at 40 s, laser x1/3 at 50 s), its times fractions so that it scales with the duration.
SESSIONS = {"default": "laser=3@1/2,move=40@2/3,laser=1/3@5/6"}
SESSION_S = 60.0  # a scripted session's default length
#: Above this many photons/pixel/frame at the brightest, the PMT gain is lowered (`fit_gain`).
GAIN_PHOTONS = 2.0


def session_events(spec: str, duration_s: float, rate_hz: float) -> tuple[SimEvent, ...]:
    """The events of ``--events SPEC``: a name in `SESSIONS` or a list (`simulation.parse_events`),
    each on one of the session's ``round(duration_s * rate_hz)`` frames. An event takes effect from
    its first frame (`SimEvent.first_frame`, the first at or after its time): one after the last
    frame's time would never happen, yet would still count for the session's brightest part
    (`fit_gain`)."""
    events = parse_events(SESSIONS.get(spec, spec), duration_s)
    frames = round(duration_s * rate_hz)
    for event in events:
        if event.at_s >= duration_s:
            where = f"at or after the session's end ({duration_s:g} s)"
        elif event.first_frame(rate_hz) >= frames:
            where = f"after the session's last frame (frame {frames - 1}), so it would never happen"
        else:
            continue
        # The last frame's time, rounded down to the millisecond so that the time named is allowed.
        latest = f" (the last time allowed is {math.floor((frames - 1) / rate_hz * 1000 + 1e-6) / 1000:g} s)" \
            if frames > 0 else ""
        raise ValueError(f"--events: an event at {event.at_s:g} s is {where}: give it an earlier time{latest}, "
                         "or more --frames or --duration")
    return events


def max_intensity(events: tuple[SimEvent, ...]) -> float:
    """The largest laser factor the session reaches (1 before any step)."""
    level = peak = 1.0
    for event in sorted(events, key=lambda e: e.at_s):
        if event.kind == LASER:
            level *= event.scale
            peak = max(peak, level)
    return peak


def fit_gain(config: SimConfig) -> SimConfig:
    """``config`` with the PMT gain (ADU per photon) lowered in proportion when its brightest part,
    ``photons`` times the largest laser factor its events reach (`max_intensity`), is above
    `GAIN_PHOTONS`, as an experimenter would set it; else ``config`` itself.

    Why: at the default gain the brightest transients clip at 65535 above ~3 photons/pixel/frame,
    and a clipped frame's expected value is no longer the truth the scores compare with. One rule
    for `umvd-live bench`, `umvd-live demo` and tools/bench_denoise.py, with or without events and
    for every stream's brightness; at or below `GAIN_PHOTONS` (the defaults) nothing changes."""
    brightest = config.photons * max_intensity(config.events)
    if brightest > GAIN_PHOTONS:
        return dataclasses.replace(config, gain_adu=config.gain_adu * GAIN_PHOTONS / brightest)
    return config


def sim_config(height: int, width: int, rate_hz: float, photons: float, seed: int, *, stream: int = 0,
               events: tuple[SimEvent, ...] = ()) -> SimConfig:
    """The simulator of one stream (``stream``: its index among several, with its own brightness,
    `BRIGHTNESS`; the caller gives it its own seed), the PMT gain set for its brightest part so
    that nothing clips (`fit_gain`)."""
    photons = photons * BRIGHTNESS[stream % len(BRIGHTNESS)]
    return fit_gain(SimConfig(height=height, width=width, rate_hz=rate_hz, photons=photons, seed=seed,
                              events=events))


#: The `SimConfig` fields a file benchmark's ``--sim FIELD=VALUE`` may set (its movie's size,
#: brightness and seed have their own options).
SIM_FIELDS = frozenset(f.name for f in dataclasses.fields(SimConfig)) - {"height", "width", "photons", "seed", "events"}


def sim_overrides(items: Sequence[str], fields: Collection[str] = SIM_FIELDS) -> dict[str, Any]:
    """``["rate_hz=10", "n_cells=40"]`` -> ``{"rate_hz": 10.0, "n_cells": 40}``: numbers only,
    the counts (n_cells, n_processes) as int, the rest as float; ValueError names a bad item.
    ``fields``: the names allowed (another simulator's, tools/independent_sim.py)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--sim {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}")
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"--sim {item!r}: {text!r} is not a number") from None
        out[name] = int(value) if name in ("n_cells", "n_processes") else value
    return out


def movie_config(height: int, width: int, photons: float, seed: int, sim: Sequence[str] = ()) -> SimConfig:
    """The simulator of a file benchmark's movie (tools/bench_denoise.py, tools/figure_real.py): the
    PMT gain fitted to its brightness (`fit_gain`), then ``sim``'s fields (`sim_overrides`; a
    ``gain_adu`` there wins), so that a figure and a score of the same movie see the same frames."""
    config = fit_gain(SimConfig(height=height, width=width, photons=photons, seed=seed))
    return dataclasses.replace(config, **sim_overrides(sim))


# ---- the daemon as a subprocess -----------------------------------------------------------------
#: Importing torch on a loaded machine is slow.
DAEMON_START_S = 90.0
CONTROL_TIMEOUT_S = 10.0
#: The version of the ready file's JSON this harness reads.
READY_VERSION = 1


class DaemonError(Exception):
    """The daemon could not be used (it did not start, died or refused); the message says why."""


@dataclass(frozen=True)
class ReadySignal:
    """What ``serve --ready-file`` writes once every socket is bound (docs/protocol.md)."""

    pid: int
    version: str  # the daemon's umvd_live version
    input: str
    output: str
    control: str

    @classmethod
    def read(cls, path: Path) -> ReadySignal | None:
        """The signal, or None while the file is not there (it is written whole, by a rename;
        Windows refuses to open a file while it is being renamed over: PermissionError, for a
        moment, also read as not there yet)."""
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, PermissionError):
            return None
        if data.get("version") != READY_VERSION:
            raise DaemonError(f"{path}: ready file version {data.get('version')!r}, expected {READY_VERSION}")
        endpoints = data["endpoints"]
        return cls(pid=int(data["pid"]), version=str(data["umvd_live"]), input=endpoints["input"],
                   output=endpoints["output"], control=endpoints["control"])


def _end_with_parent() -> None:
    """In the daemon's child process (Linux): SIGTERM when its parent dies, even by SIGKILL, so that
    no daemon outlives it (SIGTERM makes `serve` flush and exit)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


#: How long `ServeProcess.kill` waits, on Windows, for the daemon's clean exit after Ctrl-Break.
CLEAN_EXIT_S = 5.0


class ServeProcess:
    """`umvd-live serve` as a subprocess on ephemeral loopback ports, its log and ready file in
    ``log_dir``; ``serve_args``: its engine options; ``umvd_live``: the command that runs
    umvd-live (default: this Python's ``-m umvd_live``).

    It runs in its own session so that the terminal's Ctrl-C reaches only the parent, which ends
    the daemon with the `shutdown` command (everything received is denoised and published first)."""

    def __init__(self, log_dir: Path, serve_args: list[str], umvd_live: list[str] | None = None):
        self.log_path = log_dir / "daemon.log"
        self.ready_path = log_dir / "ready.json"
        launcher = umvd_live if umvd_live is not None else [sys.executable, "-m", "umvd_live"]
        cmd = [*launcher, "serve",
               "--input", "tcp://127.0.0.1:*", "--output", "tcp://127.0.0.1:*",
               "--control", "tcp://127.0.0.1:*", "--output-dir", str(log_dir),
               "--ready-file", str(self.ready_path), "--status-interval", "3600", *serve_args]
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        # Its own session or process group, so a Ctrl-C meant for the parent reaches the daemon
        # only through the parent's orderly stop; preexec_fn exists on POSIX only.
        own_group: dict[str, Any]
        if sys.platform == "win32":
            own_group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            own_group = {"start_new_session": True, "preexec_fn": _end_with_parent}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, **own_group)
        self.ready: ReadySignal | None = None
        self._ctx = zmq.Context()
        self._control: ControlClient | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def endpoints(self) -> ReadySignal:
        if self.ready is None:
            raise DaemonError("the daemon is not ready yet (wait_ready first)")
        return self.ready

    def wait_ready(self, timeout_s: float = DAEMON_START_S) -> ReadySignal:
        """Wait for the ready file: every socket is bound, the endpoints are in it."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = ReadySignal.read(self.ready_path)
            if ready is not None:
                self.ready = ready
                return ready
            if self.proc.poll() is not None:
                raise DaemonError(f"the daemon exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DaemonError(f"the daemon did not start within {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def request(self, cmd: str, timeout_s: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        """One control request (the shared client re-creates its socket after a timeout)."""
        try:
            reply = self._client().request(cmd, timeout_s)
        except DaemonUnavailable:
            raise DaemonError(f"the daemon did not answer {cmd!r} within {timeout_s:.0f} s") from None
        if not reply.get("ok"):
            raise DaemonError(f"the daemon refused {cmd!r}: {reply.get('error')}")
        return reply

    def status(self, timeout_s: float = CONTROL_TIMEOUT_S) -> StatusReply:
        """The daemon's status (`wire.schema`)."""
        return cast(StatusReply, self.request("status", timeout_s))

    def _client(self) -> ControlClient:
        """The shared control client (it re-creates its socket after a timeout)."""
        if self._control is None:
            self._control = ControlClient(self.endpoints.control, CONTROL_TIMEOUT_S, self._ctx)
        return self._control

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """Wait for the exit that `shutdown` started; kill it if it does not come."""
        if self._control is not None:
            self._control.close()
            self._control = None
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._ctx.term()

    def kill(self, clean_exit_s: float = CLEAN_EXIT_S) -> None:
        """End the daemon now. On Windows it is first sent Ctrl-Break (``CTRL_BREAK_EVENT``, which
        reaches it as it runs in its own process group) and given ``clean_exit_s`` to stop cleanly
        (streams flushed, recordings finished, final checkpoints written, the ready file
        removed), as `serve` does on Ctrl-C; only then is it terminated (TerminateProcess, with
        nothing flushed). Elsewhere it is killed at once."""
        if self.proc.poll() is not None:
            return
        if sys.platform == "win32":
            try:
                self.proc.send_signal(signal.CTRL_BREAK_EVENT)
                self.proc.wait(timeout=clean_exit_s)
                return
            except (OSError, subprocess.TimeoutExpired):  # no console to send it on, or no clean exit
                pass
        self.proc.kill()
        self.proc.wait()

    def remove_files(self) -> None:
        """The log and the ready file (kept when something went wrong: the log says what)."""
        self.log_path.unlink(missing_ok=True)
        self.ready_path.unlink(missing_ok=True)


# ---- the daemon's output ------------------------------------------------------------------------
class OutputSubscriber:
    """A SUB socket on the daemon's output, subscribed to the denoised frames of ``streams``
    (and to ``extra_topics``), at most ``rcvhwm`` messages held unread: a viewer that lags shows up
    as frames missing, not as memory growing."""

    def __init__(self, endpoint: str, streams: list[str], rcvhwm: int, extra_topics: tuple[bytes, ...] = ()):
        self.bad_messages = 0
        self._ctx = zmq.Context()
        self.socket = self._ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        for name in streams:
            self.socket.setsockopt(zmq.SUBSCRIBE, (name + DENOISED_SUFFIX).encode())
        for topic in extra_topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        enable_ipv6(self.socket, [endpoint])  # a daemon on tcp://[::1]
        self.socket.connect(endpoint)

    def receive(self, timeout_s: float) -> Iterator[list[bytes]]:
        """Every message waiting, after waiting up to ``timeout_s`` for the first."""
        if not self.socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            return
        while True:
            try:
                yield self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return

    def decode(self, parts: list[bytes]) -> OutputMessage | None:
        """A denoised frame, or None (counted in ``bad_messages``) when it is not one."""
        try:
            return decode_output(parts)
        except ProtocolError:
            self.bad_messages += 1
            return None

    def close(self) -> None:
        self.socket.close()
        self._ctx.term()


# ---- report formatting --------------------------------------------------------------------------
#: Printed for a figure that was not measured (no frames, no samples).
MISSING = "—"


def format_figure(value: Any, spec: str = ".1f", unit: str = "") -> str:
    """A float in ``spec`` with ``unit``; a count as it is; None as `MISSING`."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:{spec}}{unit}"
    return f"{value}{unit}"


def activity_table(report: dict[str, Any], title: str) -> Any:  # a rich Table, or a Group with the kinds
    """An activity report (`metrics.activity_report`): a row per method, a column per metric;
    below it, where the report was scored per kind of source, the amplitude slope and trace
    correlation of each kind (the means over every source hide which ones fall short)."""
    from rich.console import Group
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=True, header_style="bold")
    table.add_column("method", style="bold")
    for header in REPORT_HEADERS:
        table.add_column(header, justify="right")
    rows = report_rows(report)
    for label, scores in rows:
        table.add_row(label, *(format_score(m, scores.get(m)) for m in REPORT_METRICS))
    kinds = list(dict.fromkeys(k for _, scores in rows for k in scores.get("by_kind", {})))
    if not kinds:
        return table
    counts = rows[0][1].get("by_kind", {})
    per_kind = Table(title="amplitude slope / trace corr per kind of source", title_justify="left",
                     show_header=True, header_style="bold")
    per_kind.add_column("method", style="bold")
    for kind in kinds:
        per_kind.add_column(f"{kind} ({counts.get(kind, {}).get('cells', 0)})", justify="right")
    for label, scores in rows:
        per_kind.add_row(label, *(format_kind(scores.get("by_kind", {}).get(kind)) for kind in kinds))
    return Group(table, per_kind)
