"""The viewer's connection to the daemon, as a loop one worker thread runs. No Qt.

Why: the GUI thread must never wait on a socket. `LiveSession` owns the sockets (the output SUB
and two control REQs; ZeroMQ sockets belong to one thread) and turns what arrives into plain
events: the newest raw/denoised frames of every channel of the shown site (`SiteFrames`, a site
being one group, position, grid tile and plane: `sites.py`) at most `max_fps` times a second,
and every `stats_period_s` the daemon's status, each shown channel's region trace, and the noise
fit and region SNR of the one channel the panel analyses. Every raw frame of a shown channel feeds
its noise history, whether or not it is drawn, so choosing another channel to analyse gives its
figures at once.

Frames of the streams not shown cost a receive and a dictionary slot: their newest raw and
denoised messages are kept undecoded, so a newly chosen site shows its last frames at once. The
GUI talks back only through thread-safe setters (`select`, `select_stream`, `set_region`,
`set_offset`, `submit`). `LatestOnly` is the hand-off that keeps just the newest frames when the
GUI is slower.

The status polls and the user's commands go through REQ sockets of their own: a command the
daemon answers only once done (`save_model` replies after the save) neither holds the status
back nor passes for the daemon being away; only status requests decide whether it is reachable.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar, cast

import numpy as np
import zmq

from umvd_live.viewer.noise import (
    DEFAULT_HISTORY,
    MIN_FRAMES,
    STATS_PIXELS,
    NoiseFit,
    RecentFrames,
    Region,
    fit_poisson_gaussian,
    region_mean,
    region_snr,
)
from umvd_live.viewer.sites import Site, SiteCatalog, StreamPlace
from umvd_live.wire.control_client import ControlClient, ControlReply, DaemonUnavailable
from umvd_live.wire.protocol import OutputMessage, ProtocolError, decode_output
from umvd_live.wire.schema import StatusReply, StreamStatus
from umvd_live.wire.security import enable_ipv6

T = TypeVar("T")


@dataclass(frozen=True)
class ViewerConfig:
    output: str = "tcp://127.0.0.1:5556"  # the daemon's output (PUB) endpoint
    control: str = "tcp://127.0.0.1:5557"  # the daemon's control (REP) endpoint
    stream: str | None = None  # stream (or group) to show first (None: the first one seen)
    max_fps: float = 30.0  # frames handed to the GUI per second, at most
    stats_period_s: float = 0.5  # status poll, noise fit and SNR every this often
    history_frames: int = DEFAULT_HISTORY  # frames the noise fit and SNR use
    trace_seconds: float = 10.0  # span of the region's mean trace
    request_timeout_s: float = 1.5  # a status request without reply past this: daemon away
    command_timeout_s: float = 60.0  # a user command (save_model replies once saved) without reply: failed
    offline_after_s: float = 3.0  # no reply and no frame for this long: shown as disconnected
    rcvhwm: int = 200  # output messages queued for the viewer before ZeroMQ drops (newest kept)
    region: Region | None = None  # region drawn at the first frame (row0, row1, col0, col1)
    follow_after_s: float = 2.0  # the site shown, unchosen, without frames this long: show the one receiving
    forget_after_s: float = 5.0  # a stream the daemon no longer lists (or lists idle), without frames: forgotten


@dataclass(frozen=True)
class Selection:
    """What the GUI asks to see: a site, or the site of ``stream`` (a stream or a group's name,
    which wins over ``site``); and the channel the panel analyses (a channel label; None: the
    stream named, else the site's first channel)."""

    site: Site | None = None
    stream: str | None = None
    channel: str | None = None


@dataclass(frozen=True)
class FramePair:
    """The newest raw and denoised frames of one stream (either may be None)."""

    stream: str
    raw: np.ndarray | None
    raw_header: dict[str, Any] | None
    denoised: np.ndarray | None
    denoised_header: dict[str, Any] | None
    superseded: int  # raw frames received since the previous hand-over and never handed over
    channel: str | None = None  # the channel's name; None: the stream has no channel axis
    label: str = ""  # the name of the channel's layers: unique in the site ("": the stream's)
    new_raw: bool = False  # ``raw`` was in no frames handed over before (the GUI has not seen it)

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.channel or self.stream)


@dataclass(frozen=True)
class SiteFrames:
    """The newest frames of every channel of the shown site, in channel order."""

    site: Site
    pairs: tuple[FramePair, ...]
    analysed: str | None  # the stream the panel analyses

    @property
    def analysed_pair(self) -> FramePair | None:
        return next((p for p in self.pairs if p.stream == self.analysed), self.pairs[0] if self.pairs else None)


@dataclass(frozen=True)
class ChannelFigures:
    """What is cheap enough to keep for every channel of the shown site: its region trace and
    the temporal mean of its recent raw frames (for contrast limits)."""

    stream: str
    label: str
    trace_raw: np.ndarray  # (N, 2): time (s, relative to the newest frame of the site), region mean
    trace_denoised: np.ndarray
    raw_mean: np.ndarray | None
    received_fps: float


@dataclass(frozen=True)
class LiveStats:
    """What the status panel shows, refreshed every `ViewerConfig.stats_period_s`. The figures
    without a channel in their name are the analysed channel's (``stream``)."""

    stream: str | None
    streams: tuple[str, ...]
    connected: bool
    error: str | None  # why the daemon is not reachable
    daemon: StatusReply | None  # the last `status` reply
    noise: NoiseFit | None
    snr_raw: float
    snr_denoised: float
    region: Region | None
    trace_raw: np.ndarray  # (N, 2): time (s, relative to now's newest frame), region mean
    trace_denoised: np.ndarray
    received_fps: float  # raw frames of the stream reaching the viewer per second
    superseded_total: int  # frames the viewer received but never showed (it shows the newest)
    raw_mean: np.ndarray | None = None  # temporal mean of the recent raw frames (for contrast)
    site: Site | None = None  # the site shown
    channel: str | None = None  # the analysed channel's label
    channels: tuple[ChannelFigures, ...] = ()  # every channel of the site, in channel order
    places: tuple[StreamPlace, ...] = ()  # where every stream seen belongs
    status_error: str | None = None  # why the last `status` reply was not used (malformed)
    live_sites: tuple[Site, ...] = ()  # the sites whose frames arrived in the last `follow_after_s`
    missing: str | None = None  # the stream (or group) asked for that no stream seen matches

    @property
    def stream_status(self) -> StreamStatus | None:
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
    item waits unread, later puts only replace it, so notifications never pile up. ``merge(unread,
    newer)``, when given, makes the replacement, so that what the unread item alone held (e.g. a
    count of what it replaced) is not lost with it.
    """

    def __init__(self, merge: Callable[[T, T], T] | None = None) -> None:
        self._lock = threading.Lock()
        self._item: T | None = None
        self._merge = merge
        self.replaced = 0

    def put(self, item: T) -> bool:
        with self._lock:
            unread = self._item
            if unread is not None:
                self.replaced += 1
                if self._merge is not None:
                    item = self._merge(unread, item)
            self._item = item
            return unread is None

    def take(self) -> T | None:
        with self._lock:
            item, self._item = self._item, None
            return item


@dataclass
class _Trace:
    """(time, value) points of the last ``span_s`` seconds of one acquisition."""

    span_s: float
    points: deque = field(default_factory=deque)

    def add(self, t: float, value: float) -> None:
        if self.points and t < self.points[-1][0]:  # a new acquisition: its clock started again
            self.points.clear()
        self.points.append((t, value))
        while self.points and self.points[0][0] < t - self.span_s:
            self.points.popleft()

    def array(self, now: float) -> np.ndarray:
        a = np.array(self.points, dtype=np.float64).reshape(-1, 2)
        a[:, 0] -= now
        return a


@dataclass
class ChannelFeed:
    """What the session keeps of one channel of the shown site."""

    place: StreamPlace
    label: str  # the channel's name, unique among the site's channels
    raw_history: RecentFrames
    den_history: RecentFrames
    trace_raw: _Trace
    trace_den: _Trace
    latest_raw: OutputMessage | None = None
    latest_den: OutputMessage | None = None
    raw_arrivals: deque = field(default_factory=deque)  # monotonic arrival times, last 2 s
    raw_pending: bool = False  # a raw frame arrived that was not handed over yet
    unshown: int = 0  # raw frames replaced before being handed over, since the last hand-over

    def received_fps(self, now: float) -> float:
        while self.raw_arrivals and self.raw_arrivals[0] < now - 2.0:
            self.raw_arrivals.popleft()
        span = now - self.raw_arrivals[0] if len(self.raw_arrivals) > 1 else 0.0
        return (len(self.raw_arrivals) - 1) / span if span > 0 else 0.0


class LiveSession:
    """Reads the daemon's output and control sockets; run `step` in a loop on one thread."""

    def __init__(self, config: ViewerConfig, context: zmq.Context | None = None):
        self.config = config
        self._ctx = context or zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.RCVHWM, config.rcvhwm)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")  # every stream: the stream list comes from it too
        self.control = ControlClient(config.control, config.request_timeout_s, self._ctx)  # status polls
        self.command_client = ControlClient(config.control, config.command_timeout_s, self._ctx)  # `submit`
        try:  # a malformed endpoint (no "tcp://") raises here, leaving no socket behind
            enable_ipv6(self._sub, [config.output])  # a daemon on tcp://[::1]
            self._sub.connect(config.output)
            self.control.connect()
        except zmq.ZMQError:
            self._sub.close(linger=0)
            self.control.close()
            raise
        self._commands: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        # Set from the GUI thread, read here: single assignments of immutable values.
        self._wanted = Selection(stream=config.stream)
        self._wanted_region: Region | None = None
        self._wanted_offset: float | None = None

        self.catalog = SiteCatalog()
        self._placed_by_frames: set[str] = set()  # streams whose place came from a frame's meta
        self._arrived: dict[str, float] = {}  # stream: when its newest frame arrived (monotonic)
        self._forgotten: set[str] = set()  # streams and groups forgotten (ended), for a pinned choice
        self._forgotten_sites: set[Site] = set()
        self._now = time.monotonic()
        self.missing: str | None = None  # the stream (or group) asked for that no stream seen matches
        self._newest: dict[tuple[str, str], list[bytes]] = {}  # (stream, kind): undecoded parts
        self.site: Site | None = None
        self.stream: str | None = None  # the analysed channel's stream
        self.streams: list[str] = []
        self.feeds: dict[str, ChannelFeed] = {}  # the shown site's channels, in channel order
        self.region: Region | None = None
        self.superseded_total = 0
        self.undecoded = 0  # messages of streams not shown, kept without decoding
        self._new_since_emit = False
        self._last_emit = 0.0
        self._last_stats = 0.0
        self._last_status_sent = 0.0
        self._last_frame_at: float | None = None
        self._status: StatusReply | None = None
        self._status_error: str | None = None
        self._error: str | None = None
        self._in_flight: dict[str, Any] = {}  # the user's command out on `command_client`
        self.bad_messages = 0
        self.bad_status_replies = 0

    # ---- called from the GUI thread ------------------------------------------------------------
    def select(self, selection: Selection) -> None:
        self._wanted = selection

    def select_stream(self, name: str | None) -> None:
        """Show the site of stream ``name`` (or the first site of group ``name``) and analyse it."""
        self._wanted = Selection(stream=name)

    def select_site(self, site: Site, channel: str | None = None) -> None:
        self._wanted = Selection(site=site, channel=channel)

    def select_channel(self, channel: str | None) -> None:
        """Analyse this channel (a label) of the site shown."""
        self._wanted = replace(self._wanted, channel=channel)

    def set_region(self, region: Region | None) -> None:
        self._wanted_region = region

    def set_offset(self, offset: float | None) -> None:
        """The detector's known offset (ADU), or None to take it from the fit."""
        self._wanted_offset = offset

    def submit(self, cmd: str, **fields: Any) -> None:
        """Queue a control command; its `ControlReply` (or `CommandFailed`) comes out of `step`."""
        self._commands.put({"cmd": cmd, **fields})

    # ---- the worker's loop ---------------------------------------------------------------------
    def step(self, timeout_ms: int = 20) -> list[SiteFrames | LiveStats | ControlReply | CommandFailed]:
        """Wait up to ``timeout_ms`` for traffic, take everything that arrived, return the events."""
        events: list[SiteFrames | LiveStats | ControlReply | CommandFailed] = []
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        for client in (self.control, self.command_client):
            ctl = client.socket()
            if ctl is not None:
                poller.register(ctl, zmq.POLLIN)
        poller.poll(timeout_ms)
        now = self._now = time.monotonic()
        self._apply_settings()
        self._drain_output(now)
        self._service_status(now)
        self._service_commands(events)
        if self.site is not None and self._new_since_emit and now - self._last_emit >= 1.0 / self.config.max_fps:
            events.append(self._site_frames(self.site))
            self._last_emit = now
        if now - self._last_stats >= self.config.stats_period_s:
            events.append(self._stats(now))
            self._last_stats = now
        return events

    def close(self) -> None:
        """Close the sockets and drop the frames kept: a closed session may outlive its worker."""
        self._sub.close(linger=0)
        self.control.close()
        self.command_client.close()
        self.feeds = {}
        self._newest.clear()

    def merge_unread(self, unread: SiteFrames, newer: SiteFrames) -> SiteFrames:
        """``newer`` replaces frames the GUI never took (the worker's `LatestOnly`): the raw frames
        of ``unread`` it does not carry count as not shown; one it carries stays new, so that a
        frame is counted once however often the frames holding it are replaced."""
        unread_pairs = {p.stream: p for p in unread.pairs}
        pairs = []
        for pair in newer.pairs:
            old = unread_pairs.pop(pair.stream, None)
            if old is not None and old.new_raw:
                if old.raw is pair.raw:
                    pair = replace(pair, new_raw=True)
                else:
                    self.superseded_total += 1
            pairs.append(pair)
        self.superseded_total += sum(p.new_raw for p in unread_pairs.values())  # no longer shown
        return replace(newer, pairs=tuple(pairs))

    def feed(self, stream: str) -> ChannelFeed | None:
        """The shown site's channel of ``stream`` (None when it is not shown)."""
        return self.feeds.get(stream)

    # ---- internals -----------------------------------------------------------------------------
    def live_sites(self) -> list[Site]:
        """The sites whose frames arrived in the last `follow_after_s`, newest first."""
        recent = sorted(((t, s) for s, t in self._arrived.items() if self._now - t < self.config.follow_after_s),
                        reverse=True)
        places = (self.catalog.get(s) for _, s in recent)
        return list(dict.fromkeys(p.site for p in places if p is not None))

    def _resolve_site(self, wanted: Selection) -> Site | None:
        """The site asked for: a stream's, a group's (one receiving frames, else its first), a
        site; when none is asked for, or what was asked for ended and was forgotten, the site
        shown while it receives frames, else the one receiving them (a new acquisition)."""
        self.missing = None
        live = self.live_sites()
        if wanted.stream is not None:
            place = self.catalog.get(wanted.stream)
            if place is not None:
                return place.site
            sites = self.catalog.sites(wanted.stream)  # a group's name
            if sites:
                return next((s for s in sites if s in live), sites[0])
            if wanted.stream not in self._forgotten:
                self.missing = wanted.stream  # not (yet) served: said in the panel
                return None
        elif wanted.site is not None and (wanted.site in self.catalog.sites() or (
                wanted.site not in self._forgotten_sites and wanted.site.group not in self._forgotten)):
            return wanted.site
        current = self.site if self.site is not None and self.site in self.catalog.sites() else None
        if current is not None and (current in live or not live):
            return current
        if live:
            group = live[0].group  # the acquisition whose frame came last; its first site receiving
            return next(s for s in self.catalog.sites(group) if s in live)
        places = self.catalog.places()
        return places[0].site if places else self.site

    def _resolve_analysed(self, wanted: Selection) -> str | None:
        if wanted.channel is not None:
            for stream, feed in self.feeds.items():
                if feed.label == wanted.channel:
                    return stream
        if wanted.stream in self.feeds:
            return wanted.stream
        return next(iter(self.feeds), None)

    def _apply_settings(self) -> None:
        wanted = self._wanted
        site = self._resolve_site(wanted)
        if site != self.site:
            self.site = site
            self.feeds = {}
            self._new_since_emit = False
        self._sync_feeds()
        self.stream = self._resolve_analysed(wanted)
        if self._wanted_region != self.region:
            self.region = self._wanted_region
            for feed in self.feeds.values():
                feed.trace_raw.points.clear()
                feed.trace_den.points.clear()

    def _sync_feeds(self) -> None:
        """One feed per stream of the shown site, in channel order; a new one starts from the
        stream's newest frames."""
        places = self.catalog.channels(self.site) if self.site is not None else []
        if [p.stream for p in places] == list(self.feeds) and all(
                self.feeds[p.stream].place == p for p in places):
            return
        feeds = {}
        labels = [p.label for p in places]
        for place in places:
            feed = self.feeds.get(place.stream)
            if feed is None:
                feed = self._new_feed(place)
            feed.place = place
            # Two channels of one name (a name and another's c{index}): the stream tells them apart.
            feed.label = place.label if labels.count(place.label) == 1 else place.stream
            feeds[place.stream] = feed
        self.feeds = feeds

    def _new_feed(self, place: StreamPlace) -> ChannelFeed:
        c = self.config
        feed = ChannelFeed(place, place.label, RecentFrames(c.history_frames), RecentFrames(c.history_frames),
                           _Trace(c.trace_seconds), _Trace(c.trace_seconds))
        for kind in ("raw", "denoised"):
            parts = self._newest.get((place.stream, kind))
            if parts is None:
                continue
            try:
                msg = decode_output(parts)
            except ProtocolError:
                continue
            if kind == "raw":
                feed.raw_history.push(msg.image)
                feed.latest_raw = msg
                feed.raw_pending = True
            else:
                feed.latest_den = msg
            self._new_since_emit = True
        return feed

    def _note_stream(self, name: str) -> None:
        if name not in self.streams:
            self.streams.append(name)
        self._forgotten.discard(name)

    def _place(self, place: StreamPlace) -> None:
        if self.catalog.note(place):
            self._forgotten.discard(place.site.group)
            self._forgotten_sites.discard(place.site)
            self._apply_settings()

    def _ended(self, stream: str, entry: Any) -> bool:
        """Whether ``stream`` is over: no frame of it for `forget_after_s`, and the daemon no
        longer lists it (``entry`` None), or lists it idle while other streams receive frames (a
        new acquisition; an idle stream alone is a paused one, and stays)."""
        if self._now - self._arrived.get(stream, -math.inf) < self.config.forget_after_s:
            return False
        if entry is None:
            return True
        return isinstance(entry, dict) and bool(entry.get("idle")) and any(
            self._now - t < self.config.follow_after_s for t in self._arrived.values())

    def _drain_output(self, now: float, max_messages: int = 1000) -> None:
        for _ in range(max_messages):
            try:
                parts = self._sub.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._last_frame_at = now
            stream, _, kind = bytes(parts[0]).decode("utf-8", errors="replace").rpartition("/")
            self._arrived[stream] = now
            if len(parts) == 3 and stream in self._placed_by_frames and stream not in self.feeds:
                self._newest[(stream, kind)] = parts  # not shown: no decoding, no copy
                self.undecoded += 1
                continue
            try:
                msg = decode_output(parts)
            except ProtocolError:
                self.bad_messages += 1
                continue
            self._note_stream(msg.stream)
            self._placed_by_frames.add(msg.stream)
            self._place(StreamPlace.from_meta(msg.stream, msg.header.get("meta")))
            feed = self.feeds.get(msg.stream)
            if feed is not None:
                self._take(feed, msg, now)
            self._newest[(msg.stream, msg.kind)] = parts

    def _take(self, feed: ChannelFeed, msg: OutputMessage, now: float) -> None:
        t = msg.header.get("t")
        t = float(t) if isinstance(t, (int, float)) and math.isfinite(t) else now
        if msg.kind == "raw":
            feed.raw_history.push(msg.image)
            feed.trace_raw.add(t, region_mean(msg.image, self.region))
            feed.raw_arrivals.append(now)
            if feed.raw_pending:
                feed.unshown += 1
            feed.raw_pending = True
            feed.latest_raw = msg
        else:
            feed.den_history.push(msg.image)
            feed.trace_den.add(t, region_mean(msg.image, self.region))
            feed.latest_den = msg
        self._new_since_emit = True

    def _service_status(self, now: float) -> None:
        """Poll ``status`` every `stats_period_s`: its replies and timeouts say whether the daemon
        is reachable."""
        if self.control.busy:
            try:
                reply = self.control.poll(0)
            except DaemonUnavailable as exc:
                self._error = str(exc)
                reply = None
            if reply is not None:
                self._error = None
                if reply.ok:
                    self._take_status(reply.reply)
        if self.control.busy or now - self._last_status_sent < self.config.stats_period_s:
            return
        self._last_status_sent = now
        try:
            self.control.send({"cmd": "status"})
        except DaemonUnavailable as exc:
            self._error = str(exc)

    def _take_status(self, reply: dict[str, Any]) -> None:
        """Keep a `status` reply whose maps are maps. One that is not (another daemon version, a
        proxy) is counted and reported, rather than raising at every poll and panel update."""
        problem = status_problem(reply)
        if problem is not None:
            self.bad_status_replies += 1
            self._status, self._status_error = None, problem
            return
        self._status, self._status_error = cast(StatusReply, reply), None
        self._note_status_streams(self._status.get("streams") or {})
        self._forget_ended(self._status.get("streams") or {})

    def _forget_ended(self, streams: dict[str, StreamStatus]) -> None:
        """Forget the streams the daemon no longer lists, or lists as idle (an acquisition that
        ended), that sent no frame for `forget_after_s`: their sites leave the panel, and a site
        not chosen by the user gives way to the one receiving frames."""
        gone = [p.stream for p in self.catalog.places() if self._ended(p.stream, streams.get(p.stream))]
        if not gone:
            return
        for stream in gone:
            place = self.catalog.get(stream)
            self.catalog.forget(stream)
            self._forgotten.add(stream)
            if place is not None and place.site not in self.catalog.sites():
                self._forgotten_sites.add(place.site)
            if place is not None and place.site.group not in self.catalog.groups():
                self._forgotten.add(place.site.group)
            self._placed_by_frames.discard(stream)
            self._arrived.pop(stream, None)
            for kind in ("raw", "denoised"):
                self._newest.pop((stream, kind), None)
            if stream in self.streams:
                self.streams.remove(stream)
        self._apply_settings()

    def _service_commands(self, events: list) -> None:
        """Send the user's commands one at a time; each gives a `ControlReply` or `CommandFailed`."""
        if self.command_client.busy:
            try:
                reply = self.command_client.poll(0)
            except DaemonUnavailable as exc:
                events.append(CommandFailed(self._in_flight, str(exc)))
                reply = None
            if reply is not None:
                events.append(reply)
        if self.command_client.busy:
            return
        try:
            request = self._commands.get_nowait()
        except queue.Empty:
            return
        self._in_flight = request
        try:
            self.command_client.send(request)
        except DaemonUnavailable as exc:
            events.append(CommandFailed(request, str(exc)))

    def _note_status_streams(self, streams: dict[str, StreamStatus]) -> None:
        """Streams the daemon serves: listed, and placed by their status ``axes`` until a frame
        of theirs says where they belong."""
        for name, entry in streams.items():
            if name in self._forgotten and self._ended(name, entry):
                continue  # forgotten: not shown again until frames of it come
            self._note_stream(name)
            if name not in self._placed_by_frames:
                axes = entry.get("axes") if isinstance(entry, dict) else None
                self._place(StreamPlace.from_status(name, axes))

    def _site_frames(self, site: Site) -> SiteFrames:
        pairs = []
        for stream, feed in self.feeds.items():
            raw, den = feed.latest_raw, feed.latest_den
            new_raw, superseded, feed.unshown, feed.raw_pending = feed.raw_pending, feed.unshown, 0, False
            self.superseded_total += superseded
            pairs.append(FramePair(
                stream=stream,
                raw=None if raw is None else raw.image,
                raw_header=None if raw is None else raw.header,
                denoised=None if den is None else den.image,
                denoised_header=None if den is None else den.header,
                superseded=superseded,
                channel=feed.place.channel,
                label=feed.label,
                new_raw=new_raw,
            ))
        self._new_since_emit = False
        return SiteFrames(site=site, pairs=tuple(pairs), analysed=self.stream)

    def _connected(self, now: float) -> bool:
        recent = [t for t in (self.control.last_reply_at, self._last_frame_at) if t is not None]
        return bool(recent) and now - max(recent) < self.config.offline_after_s and self._error is None

    def _stats(self, now: float) -> LiveStats:
        noise = None
        snr_raw = snr_den = float("nan")
        offset = self._wanted_offset
        analysed = self.feeds.get(self.stream) if self.stream is not None else None
        if analysed is not None and len(analysed.raw_history) >= MIN_FRAMES:
            # A regular sample of at most STATS_PIXELS pixels (of the frame, of the region): the
            # figures are per-pixel averages, and a megapixel stream must not slow the worker.
            frames = analysed.raw_history.frames(max_pixels=STATS_PIXELS)
            try:
                noise = fit_poisson_gaussian(frames, offset=offset, clip_range=analysed.raw_history.clip_range)
            except ValueError:
                noise = None
            ref = offset if offset is not None else (noise.offset if noise is not None else float("nan"))
            snr_raw = region_snr(analysed.raw_history.frames(self.region, STATS_PIXELS), ref)
            if len(analysed.den_history) >= 3:
                snr_den = region_snr(analysed.den_history.frames(self.region, STATS_PIXELS), ref)
        # One time axis for every channel of the site: their traces line up.
        newest = max((tr.points[-1][0] for f in self.feeds.values() for tr in (f.trace_raw, f.trace_den)
                      if tr.points), default=0.0)
        channels = tuple(
            ChannelFigures(
                stream=stream,
                label=feed.label,
                trace_raw=feed.trace_raw.array(newest),
                trace_denoised=feed.trace_den.array(newest),
                raw_mean=feed.raw_history.mean() if len(feed.raw_history) >= MIN_FRAMES else None,
                received_fps=feed.received_fps(now),
            )
            for stream, feed in self.feeds.items()
        )
        mine = next((c for c in channels if c.stream == self.stream), None)
        empty = np.empty((0, 2), np.float64)
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
            trace_raw=mine.trace_raw if mine else empty,
            trace_denoised=mine.trace_denoised if mine else empty,
            received_fps=mine.received_fps if mine else 0.0,
            superseded_total=self.superseded_total,
            raw_mean=mine.raw_mean if mine else None,
            site=self.site,
            channel=analysed.label if analysed is not None else None,
            channels=channels,
            places=self.catalog.places(),
            status_error=self._status_error,
            live_sites=tuple(self.live_sites()),
            missing=self.missing,
        )


def status_problem(reply: dict[str, Any]) -> str | None:
    """What makes a `status` reply unusable (None: nothing): the maps the viewer reads in it must
    be maps, whichever daemon version or proxy sent it."""
    streams = reply.get("streams") or {}
    if not isinstance(streams, dict):
        return f"'streams' is a {type(streams).__name__}, not a map"
    for name, entry in streams.items():
        if not isinstance(name, str) or not isinstance(entry, dict):
            return f"stream {name!r} is not a map"
        for key in ("engine", "latency_ms"):
            if not isinstance(entry.get(key) or {}, dict):
                return f"stream {name!r}: {key!r} is not a map"
    recording = reply.get("recording") or {}
    if not isinstance(recording, dict):
        return f"'recording' is a {type(recording).__name__}, not a map"
    files = recording.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(paths, list) for paths in files.values()):
        return "'recording': 'files' is not a map of lists"
    return None
