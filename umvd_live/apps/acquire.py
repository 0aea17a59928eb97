"""`umvd-live acquire <source>`: stream frames from a source into the daemon.

The sources are the adapters' (`umvd_live.adapters`: simulation, replay, mmcore,
pycromanager_source); this module runs one of them as `AcquireConfig` says (the command line's
flags, turned into it by `apps.cli`) and prints its summary. Every source publishes through one
`FramePublisher`. Before acquiring anything the command waits for the daemon's subscription
(``PublishConfig.wait_s``): frames published before it would be lost silently.
Exit status: 0 done, 1 the acquisition failed (an MDA ended with a device's error, a tap stopped;
after the summary), 2 bad input, 3 no daemon subscribed, 4 Micro-Manager not reachable,
130 interrupted (after a clean stop and the summary).
"""

from __future__ import annotations

import gc
import math
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from umvd_live.apps.checks import finite_positive

if TYPE_CHECKING:  # imported when a source runs: the command line reads the defaults below
    from useq import MDASequence

    from umvd_live.adapters.handoff import HandoffStats
    from umvd_live.adapters.publisher import FramePublisher

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NO_DAEMON = 3
EXIT_NO_MICROMANAGER = 4
EXIT_INTERRUPTED = 130


Source = Literal["sim", "replay", "pymmcore-plus", "pycromanager"]
#: What ZeroMQ connects to: tcp://HOST:PORT, ipc://PATH or inproc://NAME.
_ENDPOINT = re.compile(r"tcp://\S+:\d+|(ipc|inproc)://\S+")


@dataclass(frozen=True)
class PublishConfig:
    """Where the frames go: the daemon's input endpoint, under which stream name."""

    to: str = "tcp://127.0.0.1:5555"
    stream: str = "cam0"  # with channels, planes or positions: the base name (docs/adapters.md)
    wait_s: float = 10.0  # for the daemon's subscription before giving up (0: do not wait)
    sndhwm: int = 2000

    def __post_init__(self) -> None:
        from umvd_live.wire.protocol import STREAM_NAME

        if not _ENDPOINT.fullmatch(self.to):
            raise ValueError(f"--to must be an endpoint such as tcp://127.0.0.1:5555, got {self.to!r}")
        if not (math.isfinite(self.wait_s) and self.wait_s >= 0):
            raise ValueError(f"--wait-s must be a finite number of seconds >= 0, got {self.wait_s:g}")
        # before waiting for the daemon: the publisher would refuse the name only then (a replayed
        # file's or an MDA's streams are this name and their axes, checked where they are known)
        if not STREAM_NAME.match(self.stream):
            raise ValueError(f"--stream must be 1 to 64 letters, digits, '_', '.' or '-', got {self.stream!r}")
        if self.sndhwm < 0:
            raise ValueError(f"--sndhwm must be >= 0 (0: no limit), got {self.sndhwm}")


@dataclass(frozen=True)
class AcquireConfig:
    """One `umvd-live acquire` run: the source and its options (each applies to the sources named)."""

    source: Source
    publish: PublishConfig = field(default_factory=PublishConfig)
    frames: int | None = None  # None: the source's own
    queue: int = 256  # pymmcore-plus, pycromanager owner: hand-off queue length
    rate_hz: float = 30.0  # sim, replay
    size: tuple[int, int] = (256, 256)  # sim
    photons: float = 2.0  # sim
    seed: int = 0  # sim
    file: Path | None = None  # replay
    loop: bool = False  # replay
    file_timing: bool = False  # replay: pace at the file's timestamps
    series: int | None = None  # replay: one series (position); None: all
    channel: int | None = None  # replay: one channel; None: all, a stream each
    mm_config: str | None = None  # pymmcore-plus, pycromanager owner: Micro-Manager configuration file
    mm_path: str | None = None  # Micro-Manager folder with the device adapters
    exposure_ms: float | None = None  # pymmcore-plus, pycromanager with mm_config
    interval_ms: float = 0.0  # pymmcore-plus, pycromanager owner: time-lapse interval
    live: bool = False  # pymmcore-plus: tap live mode instead of an MDA
    mda: str | None = None  # pymmcore-plus: a useq-schema MDA file
    mode: Literal["owner", "tap"] = "tap"  # pycromanager
    mm_port: int = 4827  # pycromanager: Micro-Manager's ZMQ port
    connect_attempts: int = 5  # pycromanager
    retry_s: float = 1.0  # pycromanager: first back-off delay, doubled per try
    poll_ms: float = 10.0  # pycromanager tap: polling period
    save_dir: str | None = None  # pycromanager owner: where pycromanager saves the raw data

    def __post_init__(self) -> None:
        # Checked here, before the daemon is waited for: each message names the flag typed.
        def at_least(flag: str, value: float | None, low: float, what: str = "a number") -> None:
            if value is not None and not (math.isfinite(value) and value >= low):
                raise ValueError(f"{flag} must be {what} >= {low:g}, got {value:g}")

        counts: tuple[tuple[str, int | None], ...] = (
            ("--frames", self.frames), ("--seed", self.seed), ("--series", self.series), ("--channel", self.channel))
        for flag, count in counts:
            at_least(flag, count, 0, "an integer")
        at_least("--queue", self.queue, 1, "an integer")
        at_least("--connect-attempts", self.connect_attempts, 1, "an integer")
        times: tuple[tuple[str, float | None], ...] = (
            ("--exposure-ms", self.exposure_ms), ("--interval-ms", self.interval_ms), ("--retry-s", self.retry_s),
            ("--poll-ms", self.poll_ms))
        for flag, duration in times:
            at_least(flag, duration, 0, "a finite number")
        finite_positive("--rate", self.rate_hz)
        finite_positive("--photons", self.photons)
        if min(self.size) < 1:
            raise ValueError(f"--size must be positive, got {self.size[0]} {self.size[1]}")
        if not 1 <= self.mm_port <= 65535:
            raise ValueError(f"--mm-port must be a TCP port, 1 to 65535, got {self.mm_port}")
        unused = self._ignored()
        if unused:
            raise ValueError(unused)

    def _ignored(self) -> str | None:
        """Why a flag given would be ignored by this source (or this mode), if one would be."""
        pycro_owner = self.source == "pycromanager" and self.mode == "owner"
        if self.save_dir is not None and not pycro_owner:
            return "--save-dir is where pycromanager's owner mode saves the raw data (--mode owner); " \
                   f"{self.source} does not save any"
        if self.mda is not None and self.frames is not None:
            return "--mda runs the sequence's own time points: give the frames in SEQUENCE.yaml, not --frames"
        if self.mda is not None and self.interval_ms:
            return "--mda runs the sequence's own time plan: give the interval in SEQUENCE.yaml, not --interval-ms"
        if self.source == "pycromanager" and self.exposure_ms is not None and not self.mm_config:
            return "--exposure-ms is set on pycromanager's own engine (--mode owner --config); " \
                   "connected to Micro-Manager, set the exposure there"
        return None


def _say(message: str) -> None:
    print(f"umvd-live acquire: {message}", file=sys.stderr, flush=True)


def _connect(config: PublishConfig) -> FramePublisher | None:
    from umvd_live.adapters.publisher import FramePublisher

    publisher = FramePublisher(config.to, config.stream, sndhwm=config.sndhwm)
    if config.wait_s > 0 and not publisher.wait_for_subscriber(config.wait_s):
        publisher.close()
        _say(f"no daemon subscribed at {config.to} within {config.wait_s:g} s: start `umvd-live serve` "
             "first (or point --to at its input)")
        return None
    return publisher


def _handed_over(stats: HandoffStats, errors: int) -> str:
    """The summary's account of every frame a source saw: sent, dropped, rejected, not read or
    published (``errors``, the source's own), or still queued when the sender stopped."""
    words = (f"{stats.sent} sent, {stats.handoff_dropped} dropped in the hand-off, {stats.publisher_dropped} "
             f"dropped by the publisher, {stats.rejected} rejected")
    if errors:
        words += f", {errors} not read or not published (see the log)"
    if stats.pending:
        words += f", {stats.pending} still queued when the sender stopped"
    return words


def _undelivered(publisher: FramePublisher) -> str:
    """The summary's words for frames that reached no daemon and stream ends that did not go."""
    lost = [f"{publisher.undelivered} sent while no daemon was subscribed"] if publisher.undelivered else []
    if publisher.ends_lost:
        lost.append(f"{publisher.ends_lost} stream end(s) not sent")
    return "".join(f", {words}" for words in lost)


def run(config: AcquireConfig) -> int:
    # logging: `umvd_live.apps.logs`, set up by the command line (--log-level)
    runners = {"sim": _run_sim, "replay": _run_replay, "pymmcore-plus": _run_pymmcore,
               "pycromanager": _run_pycromanager}
    try:
        return runners[config.source](config)
    finally:
        # A pymmcore(-plus) core left to the interpreter's final garbage collection can abort the
        # process ("FATAL: exception not rethrown"): its __del__ calls registerCallback(None),
        # whose C++ helper thread calls back into Python after finalization has begun. The
        # runner's locals are gone now: collect the core while Python is fully alive.
        gc.collect()


# ---------------------------------------------------------------------------------------- sim


def _run_sim(options: AcquireConfig) -> int:
    from umvd_live.adapters.simulation import SimConfig, stream_simulation

    try:
        config = SimConfig(height=options.size[0], width=options.size[1], rate_hz=options.rate_hz,
                           photons=options.photons, seed=options.seed)
    except ValueError as exc:
        _say(str(exc))
        return EXIT_BAD_INPUT
    publisher = _connect(options.publish)
    if publisher is None:
        return EXIT_NO_DAEMON
    stop = threading.Event()
    status = 0
    try:
        result = stream_simulation(publisher, config, frames=options.frames, rate_hz=options.rate_hz, stop=stop,
                                   wait_subscriber_s=0)
        print(f"sim: {result.frames} frames, {result.sent} sent, {result.dropped} dropped, "
              f"{result.late} late, {result.elapsed_s:.1f} s{_undelivered(publisher)}")
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
        print(f"sim: interrupted after {publisher.sent} frames sent, {publisher.dropped} dropped")
    finally:
        publisher.close()
    return status


# ------------------------------------------------------------------------------------- replay


def _run_replay(options: AcquireConfig) -> int:
    from umvd_live.adapters.replay import ReplayConfig, open_replay, replay
    from umvd_live.recording.movie import MovieError

    if not options.file:
        _say("replay needs --file MOVIE.tif (or MOVIE.ome.zarr)")
        return EXIT_BAD_INPUT
    config = ReplayConfig(path=options.file, rate_hz=options.rate_hz, file_timing=options.file_timing,
                          loop=options.loop, max_frames=options.frames, series=options.series, channel=options.channel)
    try:  # check the file before waiting for the daemon: a typo should not cost --wait-s
        with open_replay(config, group=options.publish.stream) as movie:
            streams = ", ".join(movie.streams[:6]) + (", ..." if len(movie.streams) > 6 else "")
            _say(f"replaying {movie.kind} file {config.path}: {movie.n_frames} frames "
                 f"{movie.shape[0]}x{movie.shape[1]} {movie.dtype} in {len(movie.streams)} stream(s): {streams}")
    except MovieError as exc:
        _say(str(exc))
        return EXIT_BAD_INPUT
    publisher = _connect(options.publish)
    if publisher is None:
        return EXIT_NO_DAEMON
    stop = threading.Event()
    try:
        stats = replay(publisher, config, stop=stop)
    except KeyboardInterrupt:
        print(f"replay: interrupted after {publisher.sent} frames sent, {publisher.dropped} dropped")
        return EXIT_INTERRUPTED
    except MovieError as exc:
        _say(str(exc))
        return EXIT_BAD_INPUT
    finally:
        publisher.close()
    print(f"replay: {stats.published} frames sent, {stats.dropped} dropped, {stats.loops} pass(es), "
          f"worst lateness {1000 * stats.late_max_s:.1f} ms, {stats.elapsed_s:.1f} s{_undelivered(publisher)}")
    return 0


# ------------------------------------------------------------------------------ pymmcore-plus


def _run_pymmcore(options: AcquireConfig) -> int:
    from umvd_live.adapters.mmcore import (
        LiveTap,
        MDAFailed,
        MMCoreSource,
        load_core,
        load_sequence,
        run_live,
        run_mda,
        time_lapse,
    )

    if not options.mm_config:
        _say("pymmcore-plus needs --config MMConfig.cfg")
        return EXIT_BAD_INPUT
    if options.live and options.mda:
        _say("--live taps live mode; --mda runs an MDA: choose one")
        return EXIT_BAD_INPUT
    if not options.live and not options.frames and not options.mda:
        _say("an MDA needs --frames N or --mda SEQUENCE.yaml (or use --live)")
        return EXIT_BAD_INPUT
    sequence = None
    if not options.live:
        try:
            if options.mda:
                sequence = load_sequence(options.mda)
            elif options.frames:  # one of the two, checked above
                sequence = time_lapse(options.frames, options.interval_ms)
            if sequence is not None:  # its streams' names, before any device moves
                _check_stream_names(sequence, options.publish.stream)
        except (OSError, ValueError) as exc:
            _say(str(exc))
            return EXIT_BAD_INPUT
    try:
        core = load_core(options.mm_config, mm_path=options.mm_path)
        if options.exposure_ms is not None:
            core.setExposure(options.exposure_ms)
    except Exception as exc:  # pymmcore raises RuntimeError/ValueError/OSError for a bad config
        _say(f"cannot load {options.mm_config}: {exc}")
        return EXIT_BAD_INPUT
    publisher = _connect(options.publish)
    if publisher is None:
        return EXIT_NO_DAEMON
    status = 0
    try:
        if options.live:
            tap = LiveTap(core, publisher)
            try:
                run_live(core, tap, options.frames, options.interval_ms)
            except KeyboardInterrupt:
                status = EXIT_INTERRUPTED
            tapped = tap.stats()
            print(f"pymmcore-plus live: {tapped.published} frames sent, {tapped.skipped} went by between "
                  f"polls, {tapped.publisher_dropped} dropped by the publisher{_undelivered(publisher)}")
        elif sequence is not None:  # made above for every MDA
            source = MMCoreSource(core, publisher, queue_size=options.queue).attach()
            failure = None
            try:
                run_mda(core, sequence)
            except KeyboardInterrupt:
                status = EXIT_INTERRUPTED
            except MDAFailed as exc:
                status, failure = EXIT_FAILED, exc
            finally:
                handed = source.detach()
            print(f"pymmcore-plus: {source.frames_seen} frames acquired in {len(source.streams_seen)} "
                  f"stream(s), {_handed_over(handed, source.errors)}{_undelivered(publisher)}")
            if failure is not None:
                _say(str(failure))
            elif status == 0 and source.frames_seen and handed.sent == 0 \
                    and source.errors + handed.rejected >= source.frames_seen:
                _say(f"none of the MDA's {source.frames_seen} frames could be published (see the log)")
                status = EXIT_FAILED
    finally:
        publisher.close()
    return status


#: Events of an MDA, without its time points, whose stream names are checked before it runs
#: (about 40 us each): more than (position, grid, channel, plane)s an MDA has.
_NAMES_CHECKED = 100_000


def _check_stream_names(sequence: MDASequence, group: str) -> None:
    """Raise ValueError if a stream of ``sequence`` (``group`` and the MDA's axes, as
    `MMCoreSource` names them) cannot be a stream name: too long for the protocol."""
    from itertools import islice

    from umvd_live.adapters.mmcore import event_axes
    from umvd_live.wire.axes import ChannelParts

    parts = ChannelParts()  # as MMCoreSource._on_sequence_started: the sequence's channels first
    for c, channel in enumerate(getattr(sequence, "channels", None) or ()):
        parts.part(getattr(channel, "config", None), c)
    untimed = getattr(sequence, "replace", None)
    events = untimed(time_plan=None) if untimed is not None else sequence  # names do not depend on t
    for event in islice(events, _NAMES_CHECKED):
        event_axes(group, event, parts).name  # noqa: B018 (raises ValueError for a bad name)


# ------------------------------------------------------------------------------- pycromanager


def _run_pycromanager(options: AcquireConfig) -> int:
    from umvd_live.adapters import pycromanager_source as pm

    if options.mode == "owner" and not options.frames:
        _say("owner mode runs an acquisition: give --frames N")
        return EXIT_BAD_INPUT
    if options.mode == "tap" and options.mm_config:
        _say("tap mode follows the Micro-Manager GUI's own acquisition; --config is for owner mode")
        return EXIT_BAD_INPUT
    backend_started = False
    try:
        if options.mm_config:  # owner mode on pycromanager's Python engine, in this process
            try:
                core = pm.start_python_backend(options.mm_config, mm_path=options.mm_path)
            except Exception as exc:
                _say(f"cannot load {options.mm_config}: {exc}")
                return EXIT_BAD_INPUT
            backend_started = True
            if options.exposure_ms is not None:
                core.setExposure(options.exposure_ms)
        else:
            try:
                core = pm.connect_core(options.mm_port, attempts=options.connect_attempts,
                                       first_delay_s=options.retry_s, report=_say)
            except pm.MicroManagerNotRunning as exc:
                _say(str(exc))
                return EXIT_NO_MICROMANAGER
        publisher = _connect(options.publish)
        if publisher is None:
            return EXIT_NO_DAEMON
        try:
            return _pycromanager_owner(options, pm, publisher) if options.mode == "owner" else \
                _pycromanager_tap(options, pm, core, publisher)
        finally:
            publisher.close()
    finally:
        if backend_started:
            pm.stop_python_backend()


def _pycromanager_owner(options: AcquireConfig, pm, publisher: FramePublisher) -> int:
    owner = pm.PycroManagerOwner(publisher, queue_size=options.queue)
    if options.save_dir is None:
        _say("no --save-dir: pycromanager keeps the raw frames in memory only")
    status = 0
    try:
        pm.run_owner_acquisition(owner, options.frames, options.interval_ms, directory=options.save_dir,
                                 name=options.publish.stream, port=options.mm_port)
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    finally:
        stats = owner.close()
    print(f"pycromanager owner: {owner.frames_seen} frames acquired in {len(owner.streams_seen)} stream(s), "
          f"{_handed_over(stats, owner.errors)}{_undelivered(publisher)}"
          + (f"; raw data saved under {options.save_dir}" if options.save_dir else ""))
    return status


def _pycromanager_tap(options: AcquireConfig, pm, core, publisher: FramePublisher) -> int:
    import time

    tap = pm.TaggedImageTap(core, publisher, poll_interval_s=options.poll_ms / 1000).start()
    _say("tapping Micro-Manager's live mode / acquisitions; Ctrl-C to stop")
    status = 0
    try:
        while options.frames is None or tap.published < options.frames:
            if not tap.is_alive():
                _say("the tap stopped following Micro-Manager (see the log)")
                status = EXIT_FAILED
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    stats = tap.stop()
    print(f"pycromanager tap: {stats.published} frames sent, {stats.skipped} went by between polls, "
          f"{stats.publisher_dropped} dropped by the publisher, {stats.rejected} rejected{_undelivered(publisher)}")
    return status
