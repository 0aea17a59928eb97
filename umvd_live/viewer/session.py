"""The viewer's connection to the daemon, as a loop one worker thread runs. No Qt.

Why: the GUI thread must never wait on a socket. `LiveSession` owns both sockets (the output SUB
and the control REQ; ZeroMQ sockets belong to one thread) and turns what arrives into plain
events: the newest raw/denoised pair of the selected stream at most `max_fps` times a second,
and every `stats_period_s` the daemon's status, the noise fit, the region's SNR and mean traces.
Every raw frame of the selected stream feeds the noise history, whether or not it is shown. The
GUI talks back only through thread-safe setters (`select_stream`, `set_region`, `set_offset`,
`submit`). `LatestOnly` is the hand-off that keeps just the newest frames when the GUI is slower.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import zmq

from umvd_live.protocol import OutputMessage, ProtocolError, decode_output
from umvd_live.control_client import ControlClient, ControlReply, DaemonUnavailable
from umvd_live.viewer.noise import (
    DEFAULT_HISTORY,
    MIN_FRAMES,
    FrameHistory,
    NoiseFit,
    Region,
    fit_poisson_gaussian,
    region_mean,
    region_snr,
)

T = TypeVar("T")


@dataclass(frozen=True)
class ViewerConfig:
    output: str = "tcp://127.0.0.1:5556"  # the daemon's output (PUB) endpoint
    control: str = "tcp://127.0.0.1:5557"  # the daemon's control (REP) endpoint
    stream: str | None = None  # stream to show first (None: the first one seen)
    max_fps: float = 30.0  # frames handed to the GUI per second, at most
    stats_period_s: float = 0.5  # status poll, noise fit and SNR every this often
    history_frames: int = DEFAULT_HISTORY  # frames the noise fit and SNR use
    trace_seconds: float = 10.0  # span of the region's mean trace
    request_timeout_s: float = 1.5  # a control request without reply past this: daemon away
    offline_after_s: float = 3.0  # no reply and no frame for this long: shown as disconnected
    rcvhwm: int = 200  # output messages queued for the viewer before ZeroMQ drops (newest kept)
    region: Region | None = None  # region drawn at the first frame (row0, row1, col0, col1)


@dataclass(frozen=True)
class FramePair:
    """The newest raw and denoised frames of the selected stream (either may be None)."""

    stream: str
    raw: np.ndarray | None
    raw_header: dict[str, Any] | None
    denoised: np.ndarray | None
    denoised_header: dict[str, Any] | None
    superseded: int  # frames received since the previous pair and never handed over


@dataclass(frozen=True)
class LiveStats:
    """What the status panel shows, refreshed every `ViewerConfig.stats_period_s`."""

    stream: str | None
    streams: tuple[str, ...]
    connected: bool
    error: str | None  # why the daemon is not reachable
    daemon: dict[str, Any] | None  # the last `status` reply
    noise: NoiseFit | None
    snr_raw: float
    snr_denoised: float
    region: Region | None
    trace_raw: np.ndarray  # (N, 2): time (s, relative to now's newest frame), region mean
    trace_denoised: np.ndarray
    received_fps: float  # raw frames of the stream reaching the viewer per second
    superseded_total: int  # frames the viewer received but never showed (it shows the newest)
    raw_mean: np.ndarray | None = None  # temporal mean of the recent raw frames (for contrast)

    @property
    def stream_status(self) -> dict[str, Any] | None:
        if self.daemon is None or self.stream is None:
            return None
        return (self.daemon.get("streams") or {}).get(self.stream)


@dataclass(frozen=True)
class CommandFailed:
    """A control request that got no reply in time."""

    request: dict[str, Any]
    error: str


class LatestOnly(Generic[T]):
    """A one-slot mailbox between threads: a new item replaces an unread one.

    `put` returns True when the slot was empty, i.e. when the reader must be notified; while an
    item waits unread, later puts only replace it, so notifications never pile up.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._item: T | None = None
        self.replaced = 0

    def put(self, item: T) -> bool:
        with self._lock:
            was_empty = self._item is None
            if not was_empty:
                self.replaced += 1
            self._item = item
            return was_empty

    def take(self) -> T | None:
        with self._lock:
            item, self._item = self._item, None
            return item


@dataclass
class _Trace:
    """(time, value) points of the last ``span_s`` seconds."""

    span_s: float
    points: deque = field(default_factory=deque)

    def add(self, t: float, value: float) -> None:
        self.points.append((t, value))
        while self.points and self.points[0][0] < t - self.span_s:
            self.points.popleft()

    def array(self, now: float) -> np.ndarray:
        a = np.array(self.points, dtype=np.float64).reshape(-1, 2)
        a[:, 0] -= now
        return a


class LiveSession:
    """Reads the daemon's output and control sockets; run `step` in a loop on one thread."""

    def __init__(self, config: ViewerConfig, context: zmq.Context | None = None):
        self.config = config
        self._ctx = context or zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.RCVHWM, config.rcvhwm)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")  # every stream: the stream list comes from it too
        self._sub.connect(config.output)
        self.control = ControlClient(config.control, config.request_timeout_s, self._ctx)
        self._commands: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        # Set from the GUI thread, read here: single assignments of immutable values.
        self._wanted_stream: str | None = config.stream
        self._wanted_region: Region | None = None
        self._wanted_offset: float | None = None

        self.stream: str | None = None
        self.streams: list[str] = []
        self.region: Region | None = None
        self._raw_history = FrameHistory(config.history_frames)
        self._den_history = FrameHistory(config.history_frames)
        self._trace_raw = _Trace(config.trace_seconds)
        self._trace_den = _Trace(config.trace_seconds)
        self._latest_raw: OutputMessage | None = None
        self._latest_den: OutputMessage | None = None
        self._unshown = 0
        self.superseded_total = 0
        self._new_since_emit = False
        self._last_emit = 0.0
        self._last_stats = 0.0
        self._last_status_sent = 0.0
        self._last_frame_at: float | None = None
        self._raw_arrivals: deque[float] = deque()
        self._status: dict[str, Any] | None = None
        self._error: str | None = None
        self._in_flight: dict[str, Any] = {}
        self.bad_messages = 0

    # ---- called from the GUI thread ------------------------------------------------------------
    def select_stream(self, name: str | None) -> None:
        self._wanted_stream = name

    def set_region(self, region: Region | None) -> None:
        self._wanted_region = region

    def set_offset(self, offset: float | None) -> None:
        """The detector's known offset (ADU), or None to take it from the fit."""
        self._wanted_offset = offset

    def submit(self, cmd: str, **fields: Any) -> None:
        """Queue a control command; its `ControlReply` (or `CommandFailed`) comes out of `step`."""
        self._commands.put({"cmd": cmd, **fields})

    # ---- the worker's loop ---------------------------------------------------------------------
    def step(self, timeout_ms: int = 20) -> list[FramePair | LiveStats | ControlReply | CommandFailed]:
        """Wait up to ``timeout_ms`` for traffic, take everything that arrived, return the events."""
        events: list[FramePair | LiveStats | ControlReply | CommandFailed] = []
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        ctl = self.control.socket()
        if ctl is not None:
            poller.register(ctl, zmq.POLLIN)
        poller.poll(timeout_ms)
        now = time.monotonic()
        self._apply_settings()
        self._drain_output(now)
        self._service_control(now, events)
        if self._new_since_emit and now - self._last_emit >= 1.0 / self.config.max_fps:
            events.append(self._frame_pair())
            self._last_emit = now
        if now - self._last_stats >= self.config.stats_period_s:
            events.append(self._stats(now))
            self._last_stats = now
        return events

    def close(self) -> None:
        self._sub.close(linger=0)
        self.control.close()

    # ---- internals -----------------------------------------------------------------------------
    def _apply_settings(self) -> None:
        wanted = self._wanted_stream
        if wanted is None and self.streams:
            wanted = self.streams[0]
        if wanted != self.stream:
            self.stream = wanted
            self._restart_stream()
        if self._wanted_region != self.region:
            self.region = self._wanted_region
            self._trace_raw.points.clear()
            self._trace_den.points.clear()

    def _restart_stream(self) -> None:
        for h in (self._raw_history, self._den_history):
            h.clear()
        self._trace_raw.points.clear()
        self._trace_den.points.clear()
        self._latest_raw = self._latest_den = None
        self._raw_arrivals.clear()
        self._unshown = 0
        self._new_since_emit = False

    def _note_stream(self, name: str) -> None:
        if name not in self.streams:
            self.streams.append(name)

    def _drain_output(self, now: float, max_messages: int = 1000) -> None:
        for _ in range(max_messages):
            try:
                parts = self._sub.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            try:
                msg = decode_output(parts)
            except ProtocolError:
                self.bad_messages += 1
                continue
            self._note_stream(msg.stream)
            if self.stream is None and self._wanted_stream is None:
                self.stream = msg.stream
            if msg.stream != self.stream:
                continue
            self._last_frame_at = now
            t = msg.header.get("t")
            t = float(t) if isinstance(t, (int, float)) and math.isfinite(t) else now
            if msg.kind == "raw":
                self._raw_history.push(msg.image)
                self._trace_raw.add(t, region_mean(msg.image, self.region))
                self._raw_arrivals.append(now)
                if self._latest_raw is not None:
                    self._unshown += 1
                self._latest_raw = msg
            else:
                self._den_history.push(msg.image)
                self._trace_den.add(t, region_mean(msg.image, self.region))
                self._latest_den = msg
            self._new_since_emit = True

    def _service_control(self, now: float, events: list) -> None:
        if self.control.busy:
            try:
                reply = self.control.poll(0)
            except DaemonUnavailable as exc:
                self._error = str(exc)
                if self._in_flight.get("cmd") != "status":
                    events.append(CommandFailed(self._in_flight, str(exc)))
                reply = None
            if reply is not None:
                self._error = None
                if reply.request.get("cmd") == "status":
                    if reply.ok:
                        self._status = reply.reply
                        for name in reply.reply.get("streams") or {}:
                            self._note_stream(name)
                else:
                    events.append(reply)
        if self.control.busy:
            return
        try:
            request = self._commands.get_nowait()
        except queue.Empty:
            if now - self._last_status_sent < self.config.stats_period_s:
                return
            request = {"cmd": "status"}
            self._last_status_sent = now
        self._in_flight = request
        try:
            self.control.send(request)
        except DaemonUnavailable as exc:
            self._error = str(exc)
            if request.get("cmd") != "status":
                events.append(CommandFailed(request, str(exc)))

    def _frame_pair(self) -> FramePair:
        raw, den = self._latest_raw, self._latest_den
        superseded, self._unshown = self._unshown, 0
        self.superseded_total += superseded
        self._new_since_emit = False
        return FramePair(
            stream=self.stream or "",
            raw=None if raw is None else raw.image,
            raw_header=None if raw is None else raw.header,
            denoised=None if den is None else den.image,
            denoised_header=None if den is None else den.header,
            superseded=superseded,
        )

    def _connected(self, now: float) -> bool:
        recent = [t for t in (self.control.last_reply_at, self._last_frame_at) if t is not None]
        return bool(recent) and now - max(recent) < self.config.offline_after_s and self._error is None

    def _stats(self, now: float) -> LiveStats:
        noise = raw_mean = None
        snr_raw = snr_den = float("nan")
        offset = self._wanted_offset
        if len(self._raw_history) >= MIN_FRAMES:
            frames = self._raw_history.frames()
            raw_mean = frames.mean(axis=0)
            try:
                noise = fit_poisson_gaussian(frames, offset=offset, clip_range=self._raw_history.clip_range)
            except ValueError:
                noise = None
            ref = offset if offset is not None else (noise.offset if noise is not None else float("nan"))
            snr_raw = region_snr(frames, ref, self.region)
            if len(self._den_history) >= 3:
                snr_den = region_snr(self._den_history.frames(), ref, self.region)
        while self._raw_arrivals and self._raw_arrivals[0] < now - 2.0:
            self._raw_arrivals.popleft()
        span = now - self._raw_arrivals[0] if len(self._raw_arrivals) > 1 else 0.0
        fps = (len(self._raw_arrivals) - 1) / span if span > 0 else 0.0
        newest = max((tr.points[-1][0] for tr in (self._trace_raw, self._trace_den) if tr.points), default=0.0)
        return LiveStats(
            stream=self.stream,
            streams=tuple(self.streams),
            connected=self._connected(now),
            error=self._error,
            daemon=self._status,
            noise=noise,
            snr_raw=snr_raw,
            snr_denoised=snr_den,
            region=self.region,
            trace_raw=self._trace_raw.array(newest),
            trace_denoised=self._trace_den.array(newest),
            received_fps=fps,
            superseded_total=self.superseded_total,
            raw_mean=raw_mean,
        )
