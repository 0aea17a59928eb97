"""`umvd-live acquire <source>`: stream frames from a source into the daemon.

Every source publishes through one `FramePublisher`. Before acquiring anything the command waits
for the daemon's subscription (``--wait-s``): frames published before it would be lost silently.
Exit status: 0 done, 2 bad input, 3 no daemon subscribed, 4 Micro-Manager not reachable,
130 interrupted (after a clean stop and the summary).
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
from pathlib import Path

from umvd_live.adapters.publisher import FramePublisher

EXIT_BAD_INPUT = 2
EXIT_NO_DAEMON = 3
EXIT_NO_MICROMANAGER = 4
EXIT_INTERRUPTED = 130


def _say(message: str) -> None:
    print(f"umvd-live acquire: {message}", file=sys.stderr, flush=True)


def _connect(args: argparse.Namespace) -> FramePublisher | None:
    publisher = FramePublisher(args.to, args.stream, sndhwm=args.sndhwm)
    if args.wait_s > 0 and not publisher.wait_for_subscriber(args.wait_s):
        publisher.close()
        _say(f"no daemon subscribed at {args.to} within {args.wait_s:g} s: start `umvd-live serve` "
             "first (or point --to at its input)")
        return None
    return publisher


def run(args: argparse.Namespace) -> int:
    # logging: `umvd_live.apps.logs`, set up by the command line (--log-level)
    runners = {"sim": _run_sim, "replay": _run_replay, "pymmcore-plus": _run_pymmcore,
               "pycromanager": _run_pycromanager}
    try:
        return runners[args.source](args)
    finally:
        # A pymmcore(-plus) core left to the interpreter's final garbage collection can abort the
        # process ("FATAL: exception not rethrown"): its __del__ calls registerCallback(None),
        # whose C++ helper thread calls back into Python after finalization has begun. The
        # runner's locals are gone now: collect the core while Python is fully alive.
        gc.collect()


# ---------------------------------------------------------------------------------------- sim


def _run_sim(args: argparse.Namespace) -> int:
    from umvd_live.adapters.simulation import SimConfig, stream_simulation

    try:
        config = SimConfig(height=args.size[0], width=args.size[1], rate_hz=args.rate,
                           photons=args.photons, seed=args.seed)
    except ValueError as exc:
        _say(str(exc))
        return EXIT_BAD_INPUT
    publisher = _connect(args)
    if publisher is None:
        return EXIT_NO_DAEMON
    stop = threading.Event()
    status = 0
    try:
        result = stream_simulation(publisher, config, frames=args.frames, rate_hz=args.rate, stop=stop,
                                   wait_subscriber_s=0)
        print(f"sim: {result.frames} frames, {result.sent} sent, {result.dropped} dropped, "
              f"{result.late} late, {result.elapsed_s:.1f} s")
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
        print(f"sim: interrupted after {publisher.sent} frames sent, {publisher.dropped} dropped")
    finally:
        publisher.close()
    return status


# ------------------------------------------------------------------------------------- replay


def _run_replay(args: argparse.Namespace) -> int:
    from umvd_live.adapters.replay import ReplayConfig, ReplayError, open_movie, replay

    if not args.file:
        _say("replay needs --file MOVIE.tif (or MOVIE.ome.zarr)")
        return EXIT_BAD_INPUT
    config = ReplayConfig(path=Path(args.file), rate_hz=args.rate, file_timing=args.file_timing,
                          loop=args.loop, max_frames=args.frames, series=args.series, channel=args.channel)
    try:  # check the file before waiting for the daemon: a typo should not cost --wait-s
        with open_movie(config.path, series=config.series, channel=config.channel, group=args.stream) as movie:
            if config.file_timing and movie.timestamps() is None:
                raise ReplayError(f"{config.path}: this {movie.kind} file carries no per-frame timestamps; "
                                  "drop --file-timing to replay it at --rate")
            streams = ", ".join(movie.streams[:6]) + (", ..." if len(movie.streams) > 6 else "")
            _say(f"replaying {movie.kind} file {config.path}: {movie.n_frames} frames "
                 f"{movie.shape[0]}x{movie.shape[1]} {movie.dtype} in {len(movie.streams)} stream(s): {streams}")
    except ReplayError as exc:
        _say(str(exc))
        return EXIT_BAD_INPUT
    publisher = _connect(args)
    if publisher is None:
        return EXIT_NO_DAEMON
    stop = threading.Event()
    try:
        stats = replay(publisher, config, stop=stop)
    except KeyboardInterrupt:
        print(f"replay: interrupted after {publisher.sent} frames sent, {publisher.dropped} dropped")
        return EXIT_INTERRUPTED
    except ReplayError as exc:
        _say(str(exc))
        return EXIT_BAD_INPUT
    finally:
        publisher.close()
    print(f"replay: {stats.published} frames sent, {stats.dropped} dropped, {stats.loops} pass(es), "
          f"worst lateness {1000 * stats.late_max_s:.1f} ms, {stats.elapsed_s:.1f} s")
    return 0


# ------------------------------------------------------------------------------ pymmcore-plus


def _run_pymmcore(args: argparse.Namespace) -> int:
    from umvd_live.adapters.mmcore import (
        LiveTap, MMCoreSource, load_core, load_sequence, run_live, run_mda, time_lapse,
    )

    if not args.config:
        _say("pymmcore-plus needs --config MMConfig.cfg")
        return EXIT_BAD_INPUT
    if args.live and args.mda:
        _say("--live taps live mode; --mda runs an MDA: choose one")
        return EXIT_BAD_INPUT
    if not args.live and not args.frames and not args.mda:
        _say("an MDA needs --frames N or --mda SEQUENCE.yaml (or use --live)")
        return EXIT_BAD_INPUT
    sequence = None
    if not args.live:
        try:
            sequence = load_sequence(args.mda) if args.mda else time_lapse(args.frames, args.interval_ms)
        except (OSError, ValueError) as exc:
            _say(str(exc))
            return EXIT_BAD_INPUT
    try:
        core = load_core(args.config, mm_path=args.mm_path)
        if args.exposure_ms is not None:
            core.setExposure(args.exposure_ms)
    except Exception as exc:  # pymmcore raises RuntimeError/ValueError/OSError for a bad config
        _say(f"cannot load {args.config}: {exc}")
        return EXIT_BAD_INPUT
    publisher = _connect(args)
    if publisher is None:
        return EXIT_NO_DAEMON
    status = 0
    try:
        if args.live:
            tap = LiveTap(core, publisher)
            try:
                run_live(core, tap, args.frames, args.interval_ms)
            except KeyboardInterrupt:
                status = EXIT_INTERRUPTED
            stats = tap.stats()
            print(f"pymmcore-plus live: {stats.published} frames sent, {stats.skipped} went by between "
                  f"polls, {stats.publisher_dropped} dropped by the publisher")
        else:
            source = MMCoreSource(core, publisher, queue_size=args.queue).attach()
            try:
                run_mda(core, sequence)
            except KeyboardInterrupt:
                status = EXIT_INTERRUPTED
            finally:
                stats = source.detach()
            print(f"pymmcore-plus: {source.frames_seen} frames acquired in {len(source.streams_seen)} "
                  f"stream(s), {stats.sent} sent, "
                  f"{stats.handoff_dropped} dropped in the hand-off, {stats.publisher_dropped} dropped by "
                  f"the publisher, {stats.rejected} rejected")
    finally:
        publisher.close()
    return status


# ------------------------------------------------------------------------------- pycromanager


def _run_pycromanager(args: argparse.Namespace) -> int:
    from umvd_live.adapters import pycromanager_source as pm

    if args.mode == "owner" and not args.frames:
        _say("owner mode runs an acquisition: give --frames N")
        return EXIT_BAD_INPUT
    if args.mode == "tap" and args.config:
        _say("tap mode follows the Micro-Manager GUI's own acquisition; --config is for owner mode")
        return EXIT_BAD_INPUT
    backend_started = False
    try:
        if args.config:  # owner mode on pycromanager's Python engine, in this process
            try:
                core = pm.start_python_backend(args.config, mm_path=args.mm_path)
            except Exception as exc:
                _say(f"cannot load {args.config}: {exc}")
                return EXIT_BAD_INPUT
            backend_started = True
            if args.exposure_ms is not None:
                core.setExposure(args.exposure_ms)
        else:
            try:
                core = pm.connect_core(args.mm_port, attempts=args.connect_attempts,
                                       first_delay_s=args.retry_s, report=_say)
            except pm.MicroManagerNotRunning as exc:
                _say(str(exc))
                return EXIT_NO_MICROMANAGER
        publisher = _connect(args)
        if publisher is None:
            return EXIT_NO_DAEMON
        try:
            return _pycromanager_owner(args, pm, publisher) if args.mode == "owner" else \
                _pycromanager_tap(args, pm, core, publisher)
        finally:
            publisher.close()
    finally:
        if backend_started:
            pm.stop_python_backend()


def _pycromanager_owner(args: argparse.Namespace, pm, publisher: FramePublisher) -> int:
    owner = pm.PycroManagerOwner(publisher, queue_size=args.queue)
    if args.save_dir is None:
        _say("no --save-dir: pycromanager keeps the raw frames in memory only")
    status = 0
    try:
        pm.run_owner_acquisition(owner, args.frames, args.interval_ms, directory=args.save_dir,
                                 name=args.stream, port=args.mm_port)
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    finally:
        stats = owner.close()
    print(f"pycromanager owner: {owner.frames_seen} frames acquired in {len(owner.streams_seen)} stream(s), "
          f"{stats.sent} sent, "
          f"{stats.handoff_dropped} dropped in the hand-off, {stats.publisher_dropped} dropped by the "
          f"publisher, {stats.rejected} rejected"
          + (f"; raw data saved under {args.save_dir}" if args.save_dir else ""))
    return status


def _pycromanager_tap(args: argparse.Namespace, pm, core, publisher: FramePublisher) -> int:
    import time

    tap = pm.TaggedImageTap(core, publisher, poll_interval_s=args.poll_ms / 1000).start()
    _say("tapping Micro-Manager's live mode / acquisitions; Ctrl-C to stop")
    status = 0
    try:
        while args.frames is None or tap.published < args.frames:
            time.sleep(0.05)
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    stats = tap.stop()
    print(f"pycromanager tap: {stats.published} frames sent, {stats.skipped} went by between polls, "
          f"{stats.publisher_dropped} dropped by the publisher")
    return status
