"""The live viewer: the Qt-free noise estimator and control client, then the napari widget end to
end against a real daemon subprocess fed by the simulator, under Xvfb with Mesa's OpenGL.

The GUI test (`-m gui`) starts its own Xvfb when no DISPLAY is set (``Xvfb -displayfd``: the X
server picks a free display number itself, so parallel test runs never collide) and is skipped,
with the reason, when napari or Xvfb is missing. Set UMVD_VIEWER_SCREENSHOT=PATH to keep a copy
of its screenshot (docs/img/viewer.png is made that way).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
from umvd_live.viewer.noise import (
    RecentFrames,
    clip_region,
    fit_poisson_gaussian,
    region_mean,
    region_snr,
)
from umvd_live.viewer.session import (
    LatestOnly,
    LiveSession,
    LiveStats,
    Selection,
    SiteFrames,
    ViewerConfig,
    status_problem,
)
from umvd_live.viewer.sites import Site, SiteCatalog, StreamPlace
from umvd_live.wire.channel_colors import channel_colormaps, preferred_colors
from umvd_live.wire.control_client import ControlClient, DaemonUnavailable
from umvd_live.wire.protocol import encode_frame

# ------------------------------------------------------------------------------ Qt-free parts


def _sim_movie(frames: int = 30, **overrides) -> tuple[SimConfig, np.ndarray]:
    cfg, noisy, _ = _sim_movie_and_photons(frames, **overrides)
    return cfg, noisy


def _sim_movie_and_photons(frames: int = 30, **overrides) -> tuple[SimConfig, np.ndarray, float]:
    """A simulated movie and the apparent photons per pixel per frame its truth holds: over a
    second of bursty activity the truth's mean strays from the requested level by several %."""
    cfg = SimConfig(**({"height": 96, "width": 96, "seed": 3} | overrides))
    noisy, clean = TwoPhotonSimulator(cfg).movie(frames)
    photons = float(((clean - cfg.offset_adu) / cfg.gain_adu).mean()) / cfg.excess_noise
    return cfg, noisy, photons


@pytest.mark.parametrize("photons", [0.5, 2.0, 6.0])
def test_fit_recovers_the_simulators_gain_offset_and_photons(photons):
    # No read noise: the line's zero-variance point is the offset itself.
    cfg, movie, true_photons = _sim_movie_and_photons(photons=photons, read_noise_adu=0.0)
    fit = fit_poisson_gaussian(movie)
    apparent_gain = cfg.gain_adu * cfg.excess_noise  # what any variance-vs-mean fit sees
    assert fit.valid and fit.r2 > 0.95 and fit.frames == 30
    assert fit.gain == pytest.approx(apparent_gain, rel=0.06)
    assert fit.offset == pytest.approx(cfg.offset_adu, abs=0.04 * photons * cfg.gain_adu + 60)
    assert fit.photons == pytest.approx(true_photons, rel=0.08)


def test_fit_with_a_known_offset_gives_the_read_noise():
    # A strong read noise and an offset high enough that nothing clips at 0.
    cfg, movie = _sim_movie(40, height=128, width=128, read_noise_adu=1500.0, offset_adu=6000.0)
    fit = fit_poisson_gaussian(movie, offset=cfg.offset_adu)
    assert fit.offset_given and fit.offset == cfg.offset_adu
    assert fit.gain == pytest.approx(cfg.gain_adu * cfg.excess_noise, rel=0.06)
    assert fit.read_noise == pytest.approx(1500.0, rel=0.1)
    assert fit.photons == pytest.approx(2.0 / cfg.excess_noise, rel=0.08)
    # Without the offset, the read noise is folded into it: the zero-variance point lies
    # read_var / gain below the true offset.
    blind = fit_poisson_gaussian(movie)
    expected = cfg.offset_adu - 1500.0**2 / (cfg.gain_adu * cfg.excess_noise)
    assert blind.offset == pytest.approx(expected, abs=250) and blind.read_noise == pytest.approx(0.0, abs=1e-3)


def test_fit_follows_the_light_level_and_ignores_global_flicker():
    fits = {}
    for photons in (1.0, 4.0):
        _, movie = _sim_movie(photons=photons, read_noise_adu=0.0)
        fits[photons] = fit_poisson_gaussian(movie)
    assert fits[4.0].photons / fits[1.0].photons == pytest.approx(4.0, rel=0.12)
    # A laser that flickers frame to frame by +-5% of the signal is not pixel noise.
    cfg, movie = _sim_movie(read_noise_adu=0.0)
    flicker = np.random.default_rng(1).normal(0, 0.05, (30, 1, 1)) * (movie.mean() - cfg.offset_adu)
    flickering = np.clip(movie + flicker, 0, 65535).astype(np.uint16)
    assert fit_poisson_gaussian(flickering).gain == pytest.approx(cfg.gain_adu * cfg.excess_noise, rel=0.08)


def test_saturated_pixels_are_left_out_of_the_fit():
    cfg, movie = _sim_movie(photons=2.0, read_noise_adu=0.0)
    saturating = movie.copy()
    saturating[:, :30, :] = np.minimum(saturating[:, :30, :].astype(np.int64) * 3, 65535).astype(np.uint16)
    saturating[:, :30, :][saturating[:, :30, :] > 12000] = 65535  # a third of the frame clips
    fit = fit_poisson_gaussian(saturating[:, 30:, :])
    clipped_in = fit_poisson_gaussian(np.where(saturating == 65535, 65535, movie).astype(np.uint16))
    assert clipped_in.gain == pytest.approx(fit.gain, rel=0.06)


def test_fit_refuses_too_little_data_and_flags_flat_frames():
    with pytest.raises(ValueError, match="T >= 6"):
        fit_poisson_gaussian(np.zeros((4, 32, 32)))
    with pytest.raises(ValueError, match="pixels"):
        fit_poisson_gaussian(np.zeros((10, 4, 4)))
    assert not fit_poisson_gaussian(np.full((10, 32, 32), 100, np.uint16)).valid


def test_frame_history_keeps_the_newest_in_order_and_restarts_on_a_new_shape():
    h = RecentFrames(4)
    for i in range(6):
        h.push(np.full((3, 5), i, np.uint16))
    assert len(h) == 4 and [f[0, 0] for f in h.frames()] == [2, 3, 4, 5]
    assert h.clip_range == (0.0, 65535.0)
    h.push(np.zeros((4, 4), np.float32))
    assert len(h) == 1 and h.frames().shape == (1, 4, 4) and h.clip_range is None
    with pytest.raises(ValueError):
        h.push(np.zeros(5))


def test_region_snr_rises_with_light_and_regions_clip_to_the_frame():
    cfg, dim = _sim_movie(photons=0.5, read_noise_adu=0.0)
    _, bright = _sim_movie(photons=8.0, read_noise_adu=0.0)
    snr_dim, snr_bright = region_snr(dim, cfg.offset_adu), region_snr(bright, cfg.offset_adu)
    # Photon-limited: SNR ~ sqrt(photons / F), up 4x for 16x the light.
    assert snr_bright / snr_dim == pytest.approx(4.0, rel=0.2)
    assert snr_dim == pytest.approx(math.sqrt(0.5 / cfg.excess_noise), rel=0.3)
    assert clip_region((-5, 10, 90, 200), (96, 96)) == (0, 10, 90, 96)
    assert clip_region((50, 40, 0, 10), (96, 96)) == (0, 96, 0, 96)  # empty: whole frame
    frame = np.arange(16.0).reshape(4, 4)
    assert region_mean(frame, (0, 2, 0, 2)) == pytest.approx(2.5) and region_mean(frame) == 7.5
    assert math.isnan(region_snr(dim[:2], cfg.offset_adu))


def test_latest_only_keeps_the_newest_and_notifies_once():
    box: LatestOnly[int] = LatestOnly()
    assert box.put(1) is True  # empty: notify the reader
    assert box.put(2) is False and box.put(3) is False  # unread: replace, no new notification
    assert box.take() == 3 and box.take() is None and box.replaced == 2


def test_control_client_times_out_recreates_its_socket_and_recovers():
    ctx = zmq.Context.instance()
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    client = ControlClient(f"tcp://127.0.0.1:{port}", timeout_s=0.3, context=ctx)
    try:
        with pytest.raises(DaemonUnavailable, match="status"):
            client.request("status")  # the "daemon" reads but never answers
        assert client.timeouts == 1 and not client.busy
        rep.recv()  # the lost request; a new REP socket stands for the restarted daemon
        rep.close(linger=0)
        rep = ctx.socket(zmq.REP)
        rep.setsockopt(zmq.LINGER, 0)
        deadline = time.monotonic() + 5
        while True:  # the old socket's port is released asynchronously by ZeroMQ's I/O thread
            try:
                rep.bind(f"tcp://127.0.0.1:{port}")
                break
            except zmq.ZMQError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

        def answer() -> None:
            req = msgpack.unpackb(rep.recv())
            rep.send(msgpack.packb({"ok": True, "echo": req["cmd"], "stream": req.get("stream")}))

        t = threading.Thread(target=answer)
        t.start()
        reply = client.request("reset", stream="cam0")
        t.join(5)
        assert reply == {"ok": True, "echo": "reset", "stream": "cam0"}
        assert client.last_reply_at is not None
    finally:
        client.close()
        rep.close(linger=0)


def test_session_shows_the_newest_frame_and_follows_a_laser_power_change():
    """LiveSession (Qt-free) on a real SUB socket: a publisher speaking the daemon's output topics."""
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    session = LiveSession(ViewerConfig(output=f"tcp://127.0.0.1:{port}", control="tcp://127.0.0.1:1",
                                       stats_period_s=0.0, request_timeout_s=0.2), ctx)
    seq = 0

    def publish(frames: np.ndarray) -> None:
        nonlocal seq
        for frame in frames:
            parts = encode_frame("cam0", frame, seq, t=seq / 30)
            pub.send_multipart([b"cam0/raw", *parts[1:]])
            seq += 1

    def photons_after(frames: np.ndarray) -> float:
        publish(frames)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = [e for e in session.step(20) if isinstance(e, LiveStats)]
            if stats and stats[-1].noise is not None and session.feed("cam0").raw_history.pushed >= seq:
                return stats[-1].noise.photons
        raise AssertionError("no noise figure")

    try:
        assert pub.poll(5000) and pub.recv()[:1] == b"\x01"  # the session's subscription
        _, bright, bright_photons = _sim_movie_and_photons(40, photons=4.0, seed=1)
        _, dim, dim_photons = _sim_movie_and_photons(30, photons=1.0, seed=1)  # the laser turned down to a quarter
        assert photons_after(bright) == pytest.approx(bright_photons, rel=0.1)
        # One history (30 frames: 1 s at 30 Hz) later the figure is the new light level's.
        assert photons_after(dim) == pytest.approx(dim_photons, rel=0.1)
        # Ten frames at once: one pair, the newest, with the nine it replaced counted.
        session.step(0)
        publish(dim[:10])
        pairs = []
        deadline = time.monotonic() + 5
        while session.feed("cam0").raw_history.pushed < seq and time.monotonic() < deadline:
            time.sleep(0.05)  # let all ten arrive before the session reads them
            pairs += [p for e in session.step(20) if isinstance(e, SiteFrames) for p in e.pairs]
        pairs += [p for e in session.step(50) if isinstance(e, SiteFrames) for p in e.pairs]
        assert pairs[-1].raw_header["seq"] == seq - 1 and pairs[-1].stream == "cam0"
        assert sum(p.superseded for p in pairs) + len(pairs) >= 10
        assert session.streams == ["cam0"]
    finally:
        session.close()
        pub.close(linger=0)


def _site_meta(group: str, index: dict[str, int], channel: str | None = None, position: str | None = None) -> dict:
    """A frame's meta as a multi-dimensional source sends it (docs/protocol.md)."""
    return {"group": group, "index": index} | ({"channel": channel} if channel else {}) | (
        {"position": position} if position else {})


def test_stream_places_come_from_meta_or_status_and_tolerate_old_producers():
    place = StreamPlace.from_meta("cam0.p1.GCaMP.z2", {
        "group": "cam0", "index": {"t": 7, "p": 1, "c": 0, "z": 2}, "channel": "GCaMP", "position": "Pos001"})
    assert place.site == Site("cam0", (("p", 1), ("z", 2))) and place.channel == "GCaMP"
    assert place.channel_index == 0 and place.position_name == "Pos001" and place.label == "GCaMP"
    assert place.site.describe("Pos001") == "cam0 · position 1 (Pos001) · plane (z) 2"
    # No channel name: c{index}, as in the stream name.
    assert StreamPlace.from_meta("cam0.c1", {"group": "cam0", "index": {"c": 1}}).label == "c1"
    # Old producers, odd meta: a site of its own, labelled with the stream's name.
    for meta in (None, {}, {"pixel_size_um": 0.8}, {"group": 3, "index": {}}, "text", {"group": "g", "index": "x"},
                 {"group": "g"}):
        alone = StreamPlace.from_meta("pmt.red", meta)
        assert alone == StreamPlace.alone("pmt.red") and alone.label == "pmt.red" and alone.site == Site("pmt.red")
    # A group whose index has no site axes (a time-lapse of one channel): its site is the group.
    assert StreamPlace.from_meta("cam0", {"group": "cam0", "index": {"t": 4}}).site == Site("cam0")
    # Indices that are not ints are left out; the status form has no time axis.
    odd = StreamPlace.from_meta("s", {"group": "cam0", "index": {"z": True, "p": "1", "g": 2.0}})
    assert odd.site == Site("cam0", (("g", 2),))
    status = StreamPlace.from_status("cam0.tdTomato.z1", {"group": "cam0", "channel": "tdTomato",
                                                          "index": {"c": 1, "z": 1}})
    assert status.site == Site.of("cam0", {"z": 1}) and status.channel == "tdTomato" and status.channel_index == 1
    assert StreamPlace.from_status("cam0", None) == StreamPlace.alone("cam0")


def test_the_catalog_orders_sites_and_channels_and_finds_the_nearest_site():
    places = [StreamPlace.from_meta(name, meta) for name, meta in [
        ("cam0.p1.tdTomato.z0", _site_meta("cam0", {"t": 0, "p": 1, "c": 1, "z": 0}, "tdTomato")),
        ("cam0.p1.GCaMP.z0", _site_meta("cam0", {"t": 0, "p": 1, "c": 0, "z": 0}, "GCaMP", position="B2")),
        ("cam0.p0.GCaMP.z0", _site_meta("cam0", {"t": 0, "p": 0, "c": 0, "z": 0}, "GCaMP")),
        ("cam0.p0.GCaMP.z1", _site_meta("cam0", {"t": 0, "p": 0, "c": 0, "z": 1}, "GCaMP")),
        ("cam0.p0.GCaMP.z2", _site_meta("cam0", {"t": 0, "p": 0, "c": 0, "z": 2}, "GCaMP")),
        ("red", None),
    ]]
    catalog = SiteCatalog(places)
    assert catalog.groups() == ["cam0", "red"]
    assert [s.coords for s in catalog.sites("cam0")] == [
        (("p", 0), ("z", 0)), (("p", 0), ("z", 1)), (("p", 0), ("z", 2)), (("p", 1), ("z", 0))]
    p1z0 = Site.of("cam0", {"p": 1, "z": 0})
    assert [c.stream for c in catalog.channels(p1z0)] == ["cam0.p1.GCaMP.z0", "cam0.p1.tdTomato.z0"]
    assert catalog.group_channels("cam0") == ["GCaMP", "tdTomato"] and catalog.group_channels("red") == ["red"]
    assert catalog.axis_values("cam0", "z") == [0, 1, 2] and catalog.group_axes("cam0") == ["p", "z"]
    assert catalog.position_name("cam0", 1) == "B2" and catalog.position_name("cam0", 0) is None
    # Position 1 has no plane 2: choosing position 1 at z 2 keeps the position, nearest plane.
    assert catalog.nearest_site("cam0", {"p": 1, "z": 2}, keep="p") == p1z0
    # Choosing plane 2 at position 1 keeps the plane instead.
    assert catalog.nearest_site("cam0", {"p": 1, "z": 2}, keep="z") == Site.of("cam0", {"p": 0, "z": 2})
    assert catalog.nearest_site("red", {}) == Site("red") and catalog.nearest_site("none", {}) is None
    # Sites receiving frames come first after the axis chosen: re-picking the group, a position.
    live = [Site.of("cam0", {"p": 0, "z": 2})]
    assert catalog.nearest_site("cam0", {"p": 0, "z": 0}, live=live) == live[0]
    assert catalog.nearest_site("cam0", {"p": 1, "z": 2}, keep="z", live=live) == live[0]
    assert catalog.nearest_site("cam0", {"p": 1, "z": 0}, keep="p", live=live) == p1z0
    # An ended stream is forgotten, and its site with it.
    assert catalog.forget("cam0.p1.tdTomato.z0") and catalog.forget("cam0.p1.GCaMP.z0")
    assert catalog.axis_values("cam0", "p") == [0] and not catalog.forget("cam0.p1.GCaMP.z0")


def test_channel_colormaps_follow_the_names_and_never_collide():
    assert channel_colormaps(["GCaMP", "tdTomato"]) == {"GCaMP": "green", "tdTomato": "magenta"}
    assert channel_colormaps(["DAPI", "FITC", "TRITC", "Cy5"]) == {
        "DAPI": "blue", "FITC": "green", "TRITC": "magenta", "Cy5": "red"}
    assert channel_colormaps(["488nm", "561 nm", "640"]) == {"488nm": "green", "561 nm": "magenta", "640": "red"}
    # Names that say nothing take the cycle; a taken colour passes on.
    assert list(channel_colormaps(["A", "B", "C", "D"]).values()) == ["green", "magenta", "cyan", "yellow"]
    assert channel_colormaps(["GFP", "EGFP"]) == {"GFP": "green", "EGFP": "magenta"}
    assert channel_colormaps(["mCherry", "Cy5", "x"]) == {"mCherry": "magenta", "Cy5": "red", "x": "green"}
    assert channel_colormaps(["DIC", "GFP"])["DIC"] == "gray"
    assert preferred_colors("jGCaMP8 indicator") == ("green",)  # "dic" only as a word
    assert preferred_colors("Hoechst") == ("blue", "cyan") and preferred_colors("iRFP720")[0] == "red"
    assert channel_colormaps(["GCaMP"]) == {"GCaMP": "gray"} and channel_colormaps([]) == {}


@contextlib.contextmanager
def stand_in_daemon(streams: Callable[[], dict]) -> Iterator[tuple[zmq.Socket, int, int]]:
    """An XPUB to publish frames on and a REP socket that answers every status request with
    ``streams()`` (the daemon's "streams" entry): yields (the XPUB, its port, the REP's port)."""
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    rep_port = rep.bind_to_random_port("tcp://127.0.0.1")
    halt = threading.Event()

    def answer_status() -> None:
        while not halt.is_set():
            if rep.poll(20):
                rep.recv()
                rep.send(msgpack.packb({"ok": True, "streams": streams()}))

    responder = threading.Thread(target=answer_status, daemon=True)
    responder.start()
    try:
        yield pub, port, rep_port
    finally:
        halt.set()
        responder.join(5)
        pub.close(linger=0)
        rep.close(linger=0)


def test_session_shows_one_site_with_all_its_channels_and_switches_without_new_frames():
    """LiveSession on a real SUB socket: 2 channels x 2 planes of one acquisition and an old stream
    without meta; a stand-in daemon's REP socket reports one more plane by its status axes only."""
    status_axes = {"group": "cam0", "channel": "GCaMP", "index": {"c": 0, "z": 5}}
    streams = {"cam0.GCaMP.z5": {"axes": status_axes}, "legacy": {"axes": None}}
    ctx = zmq.Context.instance()
    with stand_in_daemon(lambda: streams) as (pub, port, rep_port):
        session = LiveSession(ViewerConfig(output=f"tcp://127.0.0.1:{port}", control=f"tcp://127.0.0.1:{rep_port}",
                                           stats_period_s=0.0, max_fps=1000.0), ctx)
        channels = [(1, "tdTomato"), (0, "GCaMP")]  # sent in this order; shown in channel-index order
        seq = 0

        def value(c: int, z: int) -> int:
            return 1000 + 100 * z + 10 * c

        def publish_round() -> None:
            nonlocal seq
            for z in (0, 1):
                for c, name in channels:
                    stream = f"cam0.{name}.z{z}"
                    parts = encode_frame(stream, np.full((16, 16), value(c, z), np.uint16), seq, t=seq / 10,
                                         meta=_site_meta("cam0", {"t": seq, "c": c, "z": z}, name))
                    pub.send_multipart([f"{stream}/raw".encode(), *parts[1:]])
            parts = encode_frame("legacy", np.full((16, 16), 7, np.uint16), seq, t=seq / 10)
            pub.send_multipart([b"legacy/raw", *parts[1:]])
            seq += 1

        def frames_until(cond, what: str) -> SiteFrames:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                for event in session.step(20):
                    if isinstance(event, SiteFrames) and cond(event):
                        return event
            raise AssertionError(f"timed out waiting for {what}")

        def values(frames: SiteFrames) -> list[int]:
            return [int(p.raw[0, 0]) for p in frames.pairs if p.raw is not None]

        try:
            assert pub.poll(5000) and pub.recv()[:1] == b"\x01"
            for _ in range(3):
                publish_round()
            # The first stream seen was tdTomato at z 0: its site is shown, channels in index order.
            first = frames_until(lambda f: len(f.pairs) == 2 and all(p.raw is not None for p in f.pairs), "a site")
            assert first.site == Site.of("cam0", {"z": 0})
            assert [p.label for p in first.pairs] == ["GCaMP", "tdTomato"]
            assert values(first) == [value(0, 0), value(1, 0)]
            assert first.analysed == "cam0.GCaMP.z0"  # the first channel, by default
            assert session.undecoded > 0  # the other plane and the old stream: kept, not decoded
            # Another plane, analysing tdTomato: shown at once from the newest frames kept.
            session.select(Selection(site=Site.of("cam0", {"z": 1}), channel="tdTomato"))
            plane1 = frames_until(lambda f: f.site.get("z") == 1, "plane 1 without new frames")
            assert values(plane1) == [value(0, 1), value(1, 1)] and plane1.analysed == "cam0.tdTomato.z1"
            assert plane1.analysed_pair.label == "tdTomato"
            # New frames keep coming for the plane shown; the stats describe every channel.
            publish_round()
            frames_until(lambda f: f.site.get("z") == 1 and f.pairs[0].raw_header["seq"] == seq - 1, "new frames")
            deadline = time.monotonic() + 10
            while True:
                stats = [e for e in session.step(20) if isinstance(e, LiveStats)]
                if stats and stats[-1].daemon is not None and "cam0.GCaMP.z5" in session.catalog:
                    break
                assert time.monotonic() < deadline, "no status"
            stats = stats[-1]
            assert stats.site == Site.of("cam0", {"z": 1}) and stats.channel == "tdTomato"
            assert stats.stream == "cam0.tdTomato.z1" and [c.label for c in stats.channels] == ["GCaMP", "tdTomato"]
            assert len(stats.channels[0].trace_raw) >= 1
            # The plane the status alone reports is a site before any frame of it arrives.
            assert Site.of("cam0", {"z": 5}) in session.catalog.sites("cam0")
            assert {p.stream for p in stats.places} >= {"cam0.GCaMP.z0", "cam0.tdTomato.z1", "legacy", "cam0.GCaMP.z5"}
            # The old stream, by name: a site of its own, one channel labelled with the stream.
            session.select_stream("legacy")
            old = frames_until(lambda f: f.site == Site("legacy"), "the old stream")
            assert [p.label for p in old.pairs] == ["legacy"] and values(old) == [7] and old.analysed == "legacy"
            # A group's name picks its first site.
            session.select_stream("cam0")
            assert frames_until(lambda f: f.site.group == "cam0", "the group").site == Site.of("cam0", {"z": 0})
        finally:
            session.close()


def test_the_session_moves_on_to_a_new_acquisition_and_forgets_the_ended_one():
    """An MDA with positions (cam0.p0, cam0.p1), then a plain time-lapse (cam0), then another
    group (exp2), each once the previous one ended (the daemon lists its streams idle, or not at
    all): the session shows each new acquisition's frames, even over a site the user chose in
    the first one, and forgets the ended ones' sites."""
    listed: dict[str, dict] = {}  # what the stand-in daemon's status says
    ctx = zmq.Context.instance()
    with stand_in_daemon(lambda: dict(listed)) as (pub, port, rep_port):
        session = LiveSession(ViewerConfig(output=f"tcp://127.0.0.1:{port}", control=f"tcp://127.0.0.1:{rep_port}",
                                           stats_period_s=0.05, max_fps=1000.0, follow_after_s=0.3,
                                           forget_after_s=0.5), ctx)
        seq = 0

        def publish(streams: dict[str, tuple[dict, int]]) -> None:
            nonlocal seq
            for stream, (meta, value) in streams.items():
                parts = encode_frame(stream, np.full((16, 16), value, np.uint16), seq, t=seq / 10, meta=meta)
                pub.send_multipart([f"{stream}/raw".encode(), *parts[1:]])
            seq += 1

        def shown_while(streams: dict[str, tuple[dict, int]], cond, what: str) -> SiteFrames:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                publish(streams)
                for event in session.step(20):
                    if isinstance(event, SiteFrames) and cond(event):
                        return event
            raise AssertionError(f"timed out waiting for {what}; shown: {session.site}")

        mda = {f"cam0.p{p}": (_site_meta("cam0", {"t": 0, "p": p}), 100 + p) for p in (0, 1)}
        lapse = {"cam0": (_site_meta("cam0", {"t": 0}), 200)}
        exp2 = {"exp2": (_site_meta("exp2", {"t": 0}), 300)}
        try:
            assert pub.poll(5000) and pub.recv()[:1] == b"\x01"
            listed.update({name: {"idle": False} for name in mda})
            shown_while(mda, lambda f: f.site == Site.of("cam0", {"p": 0}), "the MDA")
            session.select(Selection(site=Site.of("cam0", {"p": 1})))  # the user's choice
            shown_while(mda, lambda f: f.site == Site.of("cam0", {"p": 1}) and f.pairs[0].raw[0, 0] == 101, "p1")
            # The MDA ends (its streams idle); a time-lapse of the same group starts.
            listed.update({name: {"idle": True} for name in mda} | {"cam0": {"idle": False}})
            frames = shown_while(lapse, lambda f: f.site == Site("cam0") and f.pairs[0].raw is not None
                                 and f.pairs[0].raw[0, 0] == 200, "the time-lapse")
            assert frames.pairs[0].stream == "cam0"
            deadline = time.monotonic() + 5
            while session.catalog.sites("cam0") != [Site("cam0")]:
                publish(lapse)
                session.step(20)
                assert time.monotonic() < deadline, f"the MDA's sites stay: {session.catalog.sites('cam0')}"
            # The time-lapse ends and the daemon drops it; another group starts.
            listed.clear()
            listed.update({"exp2": {"idle": False}})
            shown_while(exp2, lambda f: f.site == Site("exp2") and f.pairs[0].raw[0, 0] == 300, "exp2")
            deadline = time.monotonic() + 5
            while session.catalog.groups() != ["exp2"]:
                publish(exp2)
                session.step(20)
                assert time.monotonic() < deadline, f"the old groups stay: {session.catalog.groups()}"
            stats = None
            while stats is None:
                stats = next((e for e in session.step(20) if isinstance(e, LiveStats)), None)
            assert stats.site == Site("exp2") and stats.streams == ("exp2",) and stats.missing is None
        finally:
            session.close()


RAMP = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)  # pixel (r, c) = 32 r + c


class StandInDaemon(threading.Thread):
    """The daemon's two sockets on loopback: a PUB sending ``cam0`` raw frames when told (`publish`)
    or ``rate_hz`` times a second (`RAMP`, t = seq / rate_hz); and, as the daemon's ROUTER does, a
    control socket answering each request when it is done (``status`` with ``status_reply`` at
    once, another command after ``delays_s[cmd]``), so that replies to several clients overlap."""

    def __init__(self, status_reply: dict | None = None, delays_s: dict[str, float] | None = None,
                 rate_hz: float = 0.0):
        super().__init__(daemon=True)
        ctx = zmq.Context.instance()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.output = f"tcp://127.0.0.1:{self.pub.bind_to_random_port('tcp://127.0.0.1')}"
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.control = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.status_reply = status_reply or {"ok": True, "streams": {}}
        self.delays_s = delays_s or {}
        self.rate_hz = rate_hz
        self.done: list[str] = []  # the commands other than status, as carried out
        self._publish: queue.SimpleQueue = queue.SimpleQueue()
        self._halt = threading.Event()
        self.start()

    def publish(self, frame: np.ndarray, seq: int, t: float) -> None:
        self._publish.put((frame, seq, t))

    def run(self) -> None:
        due: list[tuple[float, list[bytes], dict]] = []  # (when, envelope, request)
        seq, t0 = 0, time.monotonic()
        while not self._halt.is_set():
            if self.rate_hz and time.monotonic() >= t0 + seq / self.rate_hz:
                self.publish(RAMP, seq, seq / self.rate_hz)
                seq += 1
            while not self._publish.empty():
                frame, seq, t = self._publish.get()
                parts = encode_frame("cam0", frame, seq, t=t)
                self.pub.send_multipart([b"cam0/raw", *parts[1:]])
            if self.router.poll(10):
                *envelope, body = self.router.recv_multipart()
                request = msgpack.unpackb(body)
                if request["cmd"] == "status":
                    self.router.send_multipart([*envelope, msgpack.packb(self.status_reply)])
                else:
                    due.append((time.monotonic() + self.delays_s.get(request["cmd"], 0.0), envelope, request))
            for item in [d for d in due if d[0] <= time.monotonic()]:
                due.remove(item)
                self.done.append(item[2]["cmd"])
                self.router.send_multipart([*item[1], msgpack.packb({"ok": True, "cmd": item[2]["cmd"]})])
        self.pub.close(linger=0)
        self.router.close(linger=0)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def test_the_live_noise_figures_of_a_megapixel_stream_use_a_sample_of_its_pixels(monkeypatch):
    """1024x1024 frames: the fit and the SNRs see at most 256x256 pixels (a regular stride), so
    that the worker keeps up, and find the detector's gain as from every pixel."""
    from umvd_live.viewer import noise

    seen: list[int] = []
    variance = noise.temporal_noise_variance
    monkeypatch.setattr(noise, "temporal_noise_variance",
                        lambda frames: seen.append(frames.shape[1] * frames.shape[2]) or variance(frames))
    session = LiveSession(ViewerConfig(output="tcp://127.0.0.1:9", control="tcp://127.0.0.1:9"))
    try:
        rng = np.random.default_rng(3)
        light = rng.uniform(20, 400, (1024, 1024))
        feed = session._new_feed(StreamPlace.alone("big"))
        for _ in range(12):
            frame = (1000 + 3.0 * rng.poisson(light)).astype(np.uint16)  # gain 3 ADU per photon
            feed.raw_history.push(frame)
            feed.den_history.push(frame)
        session.feeds, session.stream, session.region = {"big": feed}, "big", (0, 1024, 0, 1000)
        stats = session._stats(time.monotonic())
        assert stats.noise is not None and stats.noise.gain == pytest.approx(3.0, rel=0.05)
        assert math.isfinite(stats.snr_raw) and math.isfinite(stats.snr_denoised)
        assert seen and max(seen) <= 256 * 256, seen  # two halves for the fit, the two SNRs
        assert min(seen) > 200 * 200
        full = fit_poisson_gaussian(feed.raw_history.frames(), max_pixels=None)
        assert stats.noise.photons == pytest.approx(full.photons, rel=0.02)
    finally:
        session.close()


def test_a_stream_asked_for_that_no_stream_matches_is_said():
    """`view --stream TYPO`: nothing is shown, and the stats say which name matched nothing."""
    daemon = StandInDaemon(rate_hz=30)
    session = LiveSession(ViewerConfig(output=daemon.output, control=daemon.control, stream="TYPO",
                                       stats_period_s=0.0))
    try:
        deadline = time.monotonic() + 10
        while "cam0" not in session.catalog:
            assert time.monotonic() < deadline, "no frames"
            session.step(20)
        stats = [e for e in session.step(20) if isinstance(e, LiveStats)][-1]
        assert stats.missing == "TYPO" and stats.site is None and stats.stream is None
        session.select_stream("cam0")
        session.step(20)
        stats = [e for e in session.step(20) if isinstance(e, LiveStats)][-1]
        assert stats.missing is None and stats.site == Site("cam0")
    finally:
        session.close()
        daemon.stop()


def _open_sockets(ctx: zmq.Context) -> list[zmq.Socket]:
    return [o for o in gc.get_objects() if isinstance(o, zmq.Socket) and o.context is ctx and not o.closed]


def test_a_command_slower_than_the_status_deadline_gets_its_reply_and_the_daemon_stays_reachable():
    """save_model replies once the model is saved: past the status deadline, not a failure, and
    the status polls (on a socket of their own) keep saying the daemon is there."""
    daemon = StandInDaemon(delays_s={"save_model": 1.0})
    session = LiveSession(ViewerConfig(output=daemon.output, control=daemon.control, stats_period_s=0.1,
                                       request_timeout_s=0.3))
    try:
        session.submit("save_model", stream="cam0", path="m.pt")
        replies, stats = [], []
        deadline = time.monotonic() + 5
        while not replies and time.monotonic() < deadline:
            for event in session.step(20):
                (stats if isinstance(event, LiveStats) else replies).append(event)
        assert [type(r).__name__ for r in replies] == ["ControlReply"] and replies[0].ok
        assert daemon.done == ["save_model"]
        assert all(s.error is None for s in stats) and stats[-1].connected
        assert session.control.timeouts == session.command_client.timeouts == 0
    finally:
        session.close()
        daemon.stop()


def test_a_malformed_endpoint_raises_at_once_and_leaves_no_socket_open():
    """An endpoint typed without its scheme: ZMQError from the constructor (the widget shows it),
    not a half-made session, nor a socket per status poll."""
    ctx = zmq.Context()
    try:
        for output, control in (("127.0.0.1:5556", "tcp://127.0.0.1:5557"), ("tcp://127.0.0.1:5556", "127.0.0.1:5557")):
            with pytest.raises(zmq.ZMQError) as raised:  # kept, as an error report keeps it
                LiveSession(ViewerConfig(output=output, control=control), ctx)
            assert _open_sockets(ctx) == [], raised
        client = ControlClient("127.0.0.1:5557", context=ctx)
        for _ in range(3):
            with pytest.raises(DaemonUnavailable, match="Invalid argument"):
                client.send({"cmd": "status"})
        assert _open_sockets(ctx) == []
    finally:
        ctx.destroy(linger=0)


def test_a_restarted_acquisition_starts_its_region_trace_again():
    """t goes back to 0 (an acquisition started again on the stream): the old acquisition's points
    would be dated in the future; the trace holds the new one's only."""
    daemon = StandInDaemon()
    session = LiveSession(ViewerConfig(output=daemon.output, control=daemon.control, stats_period_s=0.0))
    seq = 0

    def trace_after(times: list[float], level: int) -> np.ndarray:
        nonlocal seq
        for t in times:
            daemon.publish(np.full((16, 16), level, np.uint16), seq, t)
            seq += 1
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stats = [e for e in session.step(20) if isinstance(e, LiveStats)]
            feed = session.feed("cam0")
            if stats and feed is not None and feed.raw_history.pushed == seq:
                return stats[-1].trace_raw
        raise AssertionError("the frames did not arrive")

    try:
        deadline = time.monotonic() + 5
        while session.feed("cam0") is None and time.monotonic() < deadline:  # until the SUB is connected
            daemon.publish(np.full((16, 16), 1000, np.uint16), seq, 100.0)
            seq += 1
            session.step(50)
        first = trace_after([100.1 + 0.1 * i for i in range(20)], 1000)
        assert len(first) > 20 and first[:, 0].max() == 0.0
        again = trace_after([0.1 * i for i in range(5)], 100)
        assert again[:, 0].tolist() == pytest.approx([-0.4, -0.3, -0.2, -0.1, 0.0])
        assert set(again[:, 1]) == {100.0}
    finally:
        session.close()
        daemon.stop()


def test_a_malformed_status_reply_is_reported_not_raised():
    """Another daemon version or a proxy: 'streams' not a map. step() goes on (frames keep coming),
    the reply is counted and its problem reported, and nothing of it reaches the panel."""
    daemon = StandInDaemon(status_reply={"ok": True, "streams": ["cam0"]})
    session = LiveSession(ViewerConfig(output=daemon.output, control=daemon.control, stats_period_s=0.05))
    try:
        stats: list[LiveStats] = []
        deadline = time.monotonic() + 1.0  # about 20 polls
        while time.monotonic() < deadline:
            stats += [e for e in session.step(20) if isinstance(e, LiveStats)]
        assert session.bad_status_replies >= 3
        assert stats[-1].status_error == "'streams' is a list, not a map" and stats[-1].connected
        assert stats[-1].daemon is None and stats[-1].stream_status is None
        bad_engine = {"ok": True, "streams": {"cam0": {"engine": 3}}}
        assert status_problem(bad_engine) == "stream 'cam0': 'engine' is not a map"
        good = {"ok": True, "streams": {"cam0": {}}, "recording": {"files": {"cam0": ["a.tif"]}}}
        assert status_problem(good) is None
    finally:
        session.close()
        daemon.stop()


def test_frames_replaced_unread_in_the_workers_mailbox_count_as_not_shown():
    """A GUI that never takes the frames: every frame received but the newest, still in the
    mailbox, is not shown, whether the session or the mailbox replaced it."""
    pytest.importorskip("qtpy", reason="no Qt binding installed")
    from umvd_live.viewer.qt.worker import SessionWorker

    daemon = StandInDaemon()
    worker = SessionWorker(ViewerConfig(output=daemon.output, control=daemon.control, max_fps=1000.0,
                                        stats_period_s=0.05))
    worker.start()
    try:
        for seq in range(80):
            daemon.publish(RAMP, seq, seq / 50)
            time.sleep(0.02)
        time.sleep(0.3)
        received = worker.session.feed("cam0").raw_history.pushed
        stats = None
        deadline = time.monotonic() + 5
        while not (stats and stats.superseded_total == received - 1) and time.monotonic() < deadline:
            stats = worker.stats.take() or stats
            time.sleep(0.05)
        assert received > 40 and worker.frames.replaced > 20
        assert stats is not None and stats.superseded_total == received - 1
        assert worker.frames.take().pairs[0].raw_header["seq"] == 79
    finally:
        worker.stop()
        daemon.stop()


def test_the_viewer_package_imports_no_qt():
    code = ("import sys, umvd_live.viewer, umvd_live.viewer.noise, umvd_live.viewer.session, "
            "umvd_live.viewer.sites, umvd_live.wire.channel_colors, "
            "umvd_live.wire.control_client, umvd_live.apps.cli; "
            "bad = [m for m in ('qtpy', 'PyQt5', 'napari', 'vispy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_napari_manifest_is_valid():
    npe2 = pytest.importorskip("npe2", reason="npe2 (the viewer extra) is not installed")
    manifest = npe2.PluginManifest.from_file(Path(__file__).parents[1] / "umvd_live/viewer/napari.yaml")
    (widget,) = manifest.contributions.widgets
    (command,) = manifest.contributions.commands
    assert widget.command == command.id
    assert command.python_name == "umvd_live.viewer.qt.widget:LiveViewerWidget"


# ------------------------------------------------------------------------------ the GUI, end to end

READY = re.compile(r"ready: input=(\S+) output=(\S+) control=(\S+)")
ENGINE_ARGS = ["--preset", "lite", "--device", "cpu", "--window", "7", "--warmup-frames", "40",
               "--warmup-steps", "10", "--status-interval", "1"]
SIZE = 64


@pytest.fixture(scope="session")
def x_display():
    """A DISPLAY for napari's OpenGL canvas: the one given, or a private Xvfb started here."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb) and no DISPLAY is set")
    read_fd, write_fd = os.pipe()
    # The X server must outlive Qt's own clean-up at interpreter exit (a QApplication cannot be
    # destroyed earlier): it is told to die with this process (Linux PR_SET_PDEATHSIG) instead
    # of being stopped at the end of the session.
    proc = subprocess.Popen([xvfb, "-displayfd", str(write_fd), "-screen", "0", "1600x1000x24",
                             "-nolisten", "tcp"], pass_fds=(write_fd,), preexec_fn=_die_with_parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    number = b""
    with os.fdopen(read_fd, "rb") as pipe:  # Xvfb writes the display number once it is ready
        while not number.endswith(b"\n"):
            chunk = pipe.read(1)
            if not chunk:
                break
            number += chunk
    if not number.strip().isdigit():
        proc.kill()
        pytest.skip(f"Xvfb did not start (exit status {proc.poll()})")
    os.environ["DISPLAY"] = f":{number.strip().decode()}"
    yield os.environ["DISPLAY"]
    if "PyQt5.QtWidgets" not in sys.modules or sys.modules["PyQt5.QtWidgets"].QApplication.instance() is None:
        proc.terminate()
        proc.wait(10)
        del os.environ["DISPLAY"]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent (this pytest process) exits."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Daemon:
    """`umvd-live serve` in a subprocess; ``endpoints`` pins them (for a restart), else ephemeral."""

    def __init__(self, tmp_path: Path, endpoints: tuple[str, str, str] | None = None):
        self.output_dir = tmp_path / "out"
        self.err_path = tmp_path / f"daemon-{time.monotonic_ns()}.err"
        inp, out, ctl = endpoints or ("tcp://127.0.0.1:*",) * 3
        cmd = [sys.executable, "-m", "umvd_live", "serve", "--input", inp, "--output", out,
               "--control", ctl, "--output-dir", str(self.output_dir), *ENGINE_ARGS]
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.monotonic() + 60
        while not (match := READY.search(self.err_path.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"daemon did not start:\n{self.err_path.read_text()}")
            time.sleep(0.05)
        self.input, self.output, self.control = match.groups()

    def status(self) -> dict:
        client = ControlClient(self.control, timeout_s=10)
        try:
            return client.request("status")
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _start_simulator(endpoint: str, stream: str = "cam0", rate: float = 20) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "umvd_live", "acquire", "sim", "--to", endpoint, "--stream", stream,
           "--rate", str(rate),
           "--size", str(SIZE), str(SIZE), "--photons", "2", "--frames", "100000", "--wait-s", "30"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


@pytest.mark.gui
@pytest.mark.timeout(150)
def test_viewer_shows_the_live_stream_and_controls_the_daemon(tmp_path, x_display):
    pytest.importorskip("napari", reason="napari is not installed (pip install 'umvd-live[viewer]')")

    from umvd_live.viewer.qt.app import open_viewer
    from umvd_live.viewer.session import ViewerConfig

    daemon = Daemon(tmp_path)
    sim = _start_simulator(daemon.input)
    viewer = widget = None

    def wait_until(cond, what: str, timeout_s: float = 30.0):
        return _wait_until(cond, what, timeout_s, lambda: f"daemon log:\n{daemon.err_path.read_text()[-3000:]}")

    def stream_status(d: Daemon = daemon) -> dict:
        return d.status()["streams"].get("cam0") or {}

    try:
        viewer, widget = open_viewer(ViewerConfig(output=daemon.output, control=daemon.control))

        # Raw and denoised, side by side, labelled, updating. The daemon publishes each raw frame
        # and each denoised one as messages of their own, so a viewer joining a running stream
        # may be handed a denoised frame before any raw one: wait for both.
        wait_until(lambda: (pair := widget.last_pair) is not None and pair.raw is not None
                   and pair.denoised is not None, "the first raw and denoised frames", 40)
        names = [layer.name for layer in viewer.layers]
        assert names == ["raw · cam0", "region", "denoised · cam0", "region (on denoised)"]
        grid = widget.grid
        assert grid.enabled and grid.position(0, viewer.layers) == (0, 0) and grid.position(2, viewer.layers) == (0, 1)
        assert widget.raw_layer.data.shape == widget.denoised_layer.data.shape == (SIZE, SIZE)
        assert widget.raw_layer.name_overlay.visible and widget.denoised_layer.name_overlay.visible
        seq0 = widget.last_pair.raw_header["seq"]
        wait_until(lambda: widget.last_pair.raw_header["seq"] >= seq0 + 10, "newer frames on screen")
        assert widget.frames_shown > 1
        # Contrast: linked, stable, and re-autoscaled only on request.
        wait_until(lambda: widget.contrast_settled, "the first automatic contrast")
        limits = widget.raw_layer.contrast_limits
        assert tuple(widget.denoised_layer.contrast_limits) == tuple(limits)
        widget.raw_layer.contrast_limits = (limits[0], limits[1] * 2)
        assert tuple(widget.denoised_layer.contrast_limits) == tuple(widget.raw_layer.contrast_limits)
        wait_until(lambda: widget.frames_shown > 20, "more frames")
        assert tuple(widget.raw_layer.contrast_limits) == (limits[0], limits[1] * 2)  # no autoscale flicker
        widget.autoscale_button.click()
        assert widget.raw_layer.contrast_limits[1] < limits[1] * 2

        # The noise estimate recovers the simulator's detector (apparent gain = gain x F).
        sim_cfg = SimConfig()
        fit = wait_until(lambda: widget.last_stats and widget.last_stats.noise and
                         widget.last_stats.noise.frames == 30 and widget.last_stats.noise, "a noise fit on 30 frames")
        assert fit.gain == pytest.approx(sim_cfg.gain_adu * sim_cfg.excess_noise, rel=0.15)
        assert fit.photons == pytest.approx(2.0 / sim_cfg.excess_noise, rel=0.2)
        assert widget.photons_label.text() not in ("", "–")
        assert "connected" in widget.connection_label.text()

        # A region: mirrored onto the denoised image, its SNR and mean trace.
        region = (10, 40, 12, 52)
        widget.set_region(region)
        wait_until(lambda: len(widget.mirror_layer.data) == 1, "the region mirrored on the denoised image")
        assert widget.current_region() == region
        stats = wait_until(lambda: widget.last_stats if widget.last_stats.region == region
                           and len(widget.last_stats.trace_raw) > 10
                           and len(widget.last_stats.trace_denoised) > 10 else None, "the region's figures")
        # (Not snr_denoised > snr_raw: a model after a 10-step warm start is far from trained.)
        assert stats.snr_raw > 0 and math.isfinite(stats.snr_denoised)
        assert "region 30×40" in widget.snr_label.text() and widget.trace_plot.point_count() > 20
        # A rectangle drawn on the denoised image replaces the region on both.
        widget.mirror_layer.add_rectangles(np.array([[4.5, 5.5], [24.5, 29.5]]))  # along pixel edges
        wait_until(lambda: widget.current_region() == (5, 25, 6, 30) and len(widget.mirror_layer.data) == 1
                   and widget.last_stats.region == (5, 25, 6, 30), "the region redrawn on the denoised image")

        # Pause and resume training.
        widget.pause_button.click()
        wait_until(lambda: stream_status().get("training_paused") is True, "the daemon to pause training")
        wait_until(lambda: "Resume" in widget.pause_button.text() and "paused" in widget.state_label.text(),
                   "the widget to show the pause")
        widget.pause_button.click()
        wait_until(lambda: stream_status().get("training_paused") is False, "the daemon to resume")

        # Record: a file appears in the daemon's output directory; then stop.
        widget.record_edit.setText("viewer-test.ome.tif")
        widget.record_button.click()
        target = daemon.output_dir / "viewer-test_cam0.ome.tif"
        wait_until(lambda: target.exists() and widget.record_button.text() == "Stop recording",
                   "the recording file")
        assert "● recording" in widget.record_label.text()
        widget.record_button.click()
        wait_until(lambda: daemon.status()["recording"] is None, "the recording to stop")
        wait_until(lambda: widget.record_button.text() == "Start recording", "the widget to show the stop")

        # Status moves: the model goes live and trains.
        wait_until(lambda: (widget.last_stats.stream_status or {}).get("state") == "live",
                   "the model to go live", 40)
        step0 = widget.last_stats.stream_status["model_step"]
        wait_until(lambda: widget.last_stats.stream_status["model_step"] > step0 and widget.warmup_bar.value() == 100
                   and widget.state_label.text() == "live", "training steps to grow")
        assert re.search(r"in \d+\.\d", widget.fps_label.text())
        assert re.search(r"\d+ ms now", widget.latency_label.text())

        # Save the model.
        widget.save_button.click()
        saved = wait_until(lambda: [r for r in widget.command_log
                                    if getattr(r, "request", {}).get("cmd") == "save_model"], "save_model")
        assert saved[0].ok and Path(saved[0].reply["path"]).is_file()
        assert "saved" in widget.message_label.text()

        # The screenshot, with everything on it.
        shot = tmp_path / "viewer.png"
        image = viewer.screenshot(str(shot), canvas_only=False)
        assert shot.stat().st_size > 10_000 and image.std() > 10
        if os.environ.get("UMVD_VIEWER_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["UMVD_VIEWER_SCREENSHOT"])

        # Reset: the model step drops, the warm start begins again.
        before = stream_status()["model_step"]
        widget.reset_button.click()
        after = wait_until(lambda: (s := stream_status()).get("resets") == 1 and s, "the reset")
        assert after["model_step"] < before
        wait_until(lambda: "resets 1" in widget.steps_label.text(), "the widget to show the reset")

        # A second stream (a red PMT channel): listed, selectable, shown under its own name.
        red = _start_simulator(daemon.input, "red", rate=5)
        try:
            wait_until(lambda: widget.stream_combo.findText("red") >= 0, "the second stream in the list")
            widget.stream_combo.setCurrentText("red")
            wait_until(lambda: widget.last_pair.stream == "red" and widget.last_stats.stream == "red",
                       "the red stream on screen")
            assert widget.raw_layer.name == "raw · red" and widget.denoised_layer.name == "denoised · red"
            widget.stream_combo.setCurrentText("cam0")
            wait_until(lambda: widget.last_pair.stream == "cam0", "cam0 again")
        finally:
            red.kill()
            red.wait()

        # The daemon goes away: the widget says so; it comes back: the widget reconnects by itself.
        endpoints = (daemon.input, daemon.output, daemon.control)
        daemon.kill()
        wait_until(lambda: not widget.last_stats.connected and "not reachable" in widget.connection_label.text(),
                   "the widget to notice the daemon is gone", 15)
        daemon = Daemon(tmp_path, endpoints)
        shown = widget.frames_shown
        wait_until(lambda: widget.last_stats.connected and widget.frames_shown > shown + 5,
                   "the widget to reconnect", 40)
        assert "connected" in widget.connection_label.text()
    finally:
        if widget is not None:
            widget.close_session()
        if viewer is not None:
            viewer.close()
        sim.send_signal(signal.SIGINT)
        try:
            sim.wait(10)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()
        daemon.kill()


# ------------------------------------------------------------------------------ channels and planes, end to end

CHANNELS = (("GCaMP", 4.0), ("tdTomato", 1.0))  # (name, photons per pixel per frame): 4x apart
PLANES = (0, 1)
GAIN, OFFSET, READ_NOISE = 1500.0, 1000.0, 150.0  # ADU per photon (no excess noise), ADU, ADU


def _scene_frames(photons: float, seed: int):
    """Endless frames of a static scene (bright blobs on a background) with Poisson-Gaussian noise
    of a known detector: the truth the per-channel noise fit must find, whatever the simulator's
    realism (motion, correlated noise) adds to its own movies."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    pattern = np.full((SIZE, SIZE), 0.3)
    for _ in range(12):
        cy, cx, r, a = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(3, 7), rng.uniform(1, 4)
        pattern += a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    expected = photons * pattern / pattern.mean()
    while True:
        frame = OFFSET + GAIN * rng.poisson(expected) + rng.normal(0, READ_NOISE, expected.shape)
        yield np.clip(np.rint(frame), 0, 65535).astype(np.uint16)


def _stamp(c: int, z: int) -> np.ndarray:
    """Four pixels (row 0, columns 0-3) that say which channel and plane a frame is of."""
    return np.array([61000, 60000 + 1000 * c, 60000 + 100 * z, 60000 + 10 * c + z], np.uint16)


class SitePublisher(threading.Thread):
    """A two-channel, two-plane acquisition: one real `FramePublisher` per stream, frames of a
    known detector (a different photon level per channel), each stamped with its channel and plane."""

    def __init__(self, endpoint: str, rate_hz: float = 10.0):
        super().__init__(daemon=True)
        from umvd_live.adapters.publisher import FramePublisher

        self.rate_hz = rate_hz
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.streams = []
        for z in PLANES:
            for c, (name, photons) in enumerate(CHANNELS):
                frames = _scene_frames(photons, seed=10 * z + c)
                self.streams.append((FramePublisher(endpoint, stream=f"cam0.{name}.z{z}"), frames, name, c, z))

    def run(self) -> None:
        try:
            for publisher, *_ in self.streams:
                if not publisher.wait_for_subscriber(30):
                    raise RuntimeError("the daemon did not subscribe")
            t0 = time.monotonic()
            seq = 0
            while not self.halt.is_set():
                for publisher, frames, name, c, z in self.streams:
                    frame = next(frames)
                    frame[0, :4] = _stamp(c, z)
                    publisher.publish(frame, t=seq / self.rate_hz, seq=seq,
                                      meta=_site_meta("cam0", {"t": seq, "c": c, "z": z}, name))
                seq += 1
                self.halt.wait(max(0.0, t0 + seq / self.rate_hz - time.monotonic()))
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            for publisher, *_ in self.streams:
                publisher.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


@pytest.mark.gui
@pytest.mark.timeout(150)
def test_viewer_shows_each_channel_as_a_layer_and_switches_planes(tmp_path, x_display):
    pytest.importorskip("napari", reason="napari is not installed (pip install 'umvd-live[viewer]')")
    from qtpy.QtWidgets import QApplication

    from umvd_live.viewer.qt.app import open_viewer

    daemon = Daemon(tmp_path)
    # Inference only: four models training on a shared 2-core machine would starve the GUI, and
    # what is checked here (layers, planes, per-channel figures) does not need trained models.
    assert daemon.status()["ok"]
    client = ControlClient(daemon.control, timeout_s=10)
    try:
        assert client.request("pause_training")["training_paused"] is True
    finally:
        client.close()
    source = SitePublisher(daemon.input)
    source.start()
    viewer = widget = None

    def wait_until(cond, what: str, timeout_s: float = 40.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            QApplication.processEvents()
            assert source.error is None, source.error
            value = cond()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; daemon log:\n{daemon.err_path.read_text()[-3000:]}")

    def plane_on_screen(z: int) -> bool:
        frames = widget.last_frames
        if frames is None or frames.site.get("z") != z or len(widget.channel_layers) != 2:
            return False
        layers = list(widget.channel_layers.values())
        return all(np.array_equal(ch.raw.data[0, :4], _stamp(c, z)) for c, ch in enumerate(layers)) and all(
            p.denoised_header is not None and p.denoised_header["meta"]["index"]["z"] == z for p in frames.pairs)

    def fit_of(channel: str):
        widget.channel_combo.setCurrentText(channel)
        stats = wait_until(lambda: (s := widget.last_stats) and s.channel == channel and s.noise is not None
                           and s.noise.frames == 30 and s, f"a noise fit of {channel}")
        assert f"Raw noise · {channel}" in widget.noise_box.title()
        return stats

    try:
        viewer, widget = open_viewer(ViewerConfig(output=daemon.output, control=daemon.control))

        # One layer per channel, named after it, coloured after it, blended additively.
        wait_until(lambda: len(widget.channel_layers) == 2 and widget.last_frames is not None
                   and all(p.raw is not None and p.denoised is not None for p in widget.last_frames.pairs),
                   "both channels' raw and denoised frames")
        assert [layer.name for layer in viewer.layers] == [
            "raw · GCaMP", "raw · tdTomato", "region", "denoised · GCaMP", "denoised · tdTomato",
            "region (on denoised)"]
        gcamp, tdtomato = widget.channel_layers["GCaMP"], widget.channel_layers["tdTomato"]
        for ch, colormap in ((gcamp, "green"), (tdtomato, "magenta")):
            assert ch.raw.colormap.name == ch.denoised.colormap.name == colormap
        assert tdtomato.raw.blending == tdtomato.denoised.blending == "additive"
        grid = widget.grid
        assert grid.enabled and grid.stride == 3
        assert grid.position(0, viewer.layers) == grid.position(1, viewer.layers) == (0, 0)
        assert grid.position(3, viewer.layers) == grid.position(4, viewer.layers) == (0, 1)
        # The acquisition's planes are offered; its channels are analysable one by one.
        wait_until(lambda: widget.plane_combo.count() == 2 and widget.channel_combo.count() == 2, "the combos")
        assert widget.plane_combo.isVisibleTo(widget) and not widget.position_combo.isVisibleTo(widget)
        assert [widget.plane_combo.itemData(i) for i in range(2)] == [0, 1]
        assert [widget.channel_combo.itemText(i) for i in range(2)] == ["GCaMP", "tdTomato"]
        assert [widget.stream_combo.itemText(i) for i in range(widget.stream_combo.count())] == ["cam0"]

        # Choosing a plane shows that plane's frames, in every channel, raw and denoised.
        for z in (1, 0, 1):
            widget.plane_combo.setCurrentIndex(widget.plane_combo.findData(z))
            wait_until(lambda: plane_on_screen(z), f"plane {z} on screen")
            wait_until(lambda: widget.last_stats.site == Site.of("cam0", {"z": z}), f"the stats of plane {z}")
        assert widget.last_stats.stream == "cam0.GCaMP.z1" and "cam0.GCaMP.z1" in widget.analysed_label.text()

        # Per channel: the noise fit sees one detector (same gain) at two light levels, 4x apart.
        g = fit_of("GCaMP")
        t = fit_of("tdTomato")
        assert t.stream == "cam0.tdTomato.z1"  # the plane stays, the channel changes
        assert g.noise.photons == pytest.approx(CHANNELS[0][1], rel=0.2)
        assert t.noise.photons == pytest.approx(CHANNELS[1][1], rel=0.2)
        assert g.noise.gain == pytest.approx(GAIN, rel=0.1) and t.noise.gain == pytest.approx(GAIN, rel=0.1)
        assert g.snr_raw / t.snr_raw == pytest.approx(2.0, rel=0.25)  # shot noise: sqrt(4)
        # The analysed channel stays analysed on another plane.
        widget.plane_combo.setCurrentIndex(widget.plane_combo.findData(0))
        wait_until(lambda: widget.last_stats.stream == "cam0.tdTomato.z0" and plane_on_screen(0),
                   "tdTomato analysed on plane 0")
        # Each channel its own contrast and its own trace lane, in its colour.
        wait_until(lambda: widget.contrast_settled, "every channel's automatic contrast")
        assert gcamp.raw.contrast_limits[1] > tdtomato.raw.contrast_limits[1]
        assert tuple(gcamp.raw.contrast_limits) == tuple(gcamp.denoised.contrast_limits)
        widget.set_region((8, 56, 8, 56))
        stats = wait_until(lambda: (s := widget.last_stats).region == (8, 56, 8, 56)
                           and all(len(c.trace_raw) > 10 and len(c.trace_denoised) > 5 for c in s.channels)
                           and s, "both channels' region traces")
        means = {c.label: float(np.mean(c.trace_raw[:, 1])) for c in stats.channels}
        assert means["GCaMP"] - OFFSET > 2 * (means["tdTomato"] - OFFSET)  # 4x the light, other blobs
        assert [lane.label for lane in widget.trace_plot.lanes] == ["GCaMP", "tdTomato"]
        assert widget.trace_plot.lanes[0].color != widget.trace_plot.lanes[1].color

        shot = tmp_path / "channels.png"
        image = viewer.screenshot(str(shot), canvas_only=False)
        assert shot.stat().st_size > 10_000 and image.std() > 10
        if os.environ.get("UMVD_VIEWER_SCREENSHOT_CHANNELS"):
            shutil.copyfile(shot, os.environ["UMVD_VIEWER_SCREENSHOT_CHANNELS"])
    finally:
        if widget is not None:
            widget.close_session()
        if viewer is not None:
            viewer.close()
        source.stop()
        daemon.kill()


def _wait_until(cond, what: str, timeout_s: float = 20.0, detail=None):
    """Run the Qt event loop until ``cond()`` is true; its value. ``detail()``, if given, is said
    with a timeout (a daemon's log)."""
    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        QApplication.processEvents()
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}" + (f"; {detail()}" if detail is not None else ""))


@pytest.mark.gui
@pytest.mark.timeout(60)
def test_connect_stops_and_releases_the_previous_worker(x_display):
    """Each Connect replaces the worker: the old one's thread ends, its sockets close, and nothing
    keeps it (its frame histories) alive. A widget deleted while docked stops its worker too."""
    pytest.importorskip("napari", reason="napari is not installed (pip install 'umvd-live[viewer]')")
    import gc
    import weakref

    from umvd_live.viewer.qt.app import open_viewer

    daemon = StandInDaemon(rate_hz=30)
    viewer, widget = open_viewer(ViewerConfig(output=daemon.output, control=daemon.control), show=False)
    try:
        old_workers = []
        for _ in range(2):
            _wait_until(lambda: widget.last_frames is not None and widget.worker.session.feed("cam0"), "frames")
            old = widget.worker
            old_workers.append(weakref.ref(old))
            session = old.session
            widget.connect_button.click()
            assert widget.worker is not old and widget.worker.isRunning() and not old.isRunning()
            assert session._sub.closed and session.feeds == {}
            del old
            widget.last_frames = None
        gc.collect()
        assert [ref() for ref in old_workers] == [None, None]
        worker = widget.worker
    finally:
        viewer.close()  # deletes the docked widget
        daemon.stop()
    _wait_until(lambda: not worker.isRunning(), "the worker of the deleted widget to stop", 5)
    assert worker.session._sub.closed


@pytest.mark.gui
@pytest.mark.timeout(60)
def test_a_malformed_endpoint_keeps_the_running_session_and_says_why(x_display):
    pytest.importorskip("napari", reason="napari is not installed (pip install 'umvd-live[viewer]')")
    from umvd_live.viewer.qt.app import open_viewer

    daemon = StandInDaemon(rate_hz=30)
    viewer, widget = open_viewer(ViewerConfig(output=daemon.output, control=daemon.control), show=False)
    try:
        _wait_until(lambda: widget.last_stats is not None and widget.last_stats.connected, "connected")
        running = widget.worker
        widget.output_edit.setText(daemon.output.removeprefix("tcp://"))  # the scheme forgotten
        widget._reconnect_clicked()  # what Connect does (an exception in a Qt slot would abort)
        assert widget.worker is running and running.isRunning()
        assert "cannot connect" in widget.message_label.text() and "tcp://HOST:PORT" in widget.message_label.text()
        assert widget.config.output == daemon.output
        shown = widget.frames_shown
        _wait_until(lambda: widget.frames_shown > shown + 5, "frames from the running session")
    finally:
        widget.close_session()
        viewer.close()
        daemon.stop()


@pytest.mark.gui
@pytest.mark.timeout(60)
def test_the_region_is_the_pixels_whose_centres_the_rectangle_holds(x_display):
    """napari draws pixel i over [i - 0.5, i + 0.5]: a rectangle along the edges of pixels 10-19
    measures those pixels, and a region set in pixels is drawn along their edges."""
    pytest.importorskip("napari", reason="napari is not installed (pip install 'umvd-live[viewer]')")
    from umvd_live.viewer.qt.app import open_viewer
    from umvd_live.viewer.qt.widget import rectangle_region

    assert rectangle_region(np.array([[9.5, 4.5], [19.5, 24.5]])) == (10, 20, 5, 25)
    assert rectangle_region(np.array([[9.8, 4.6], [19.8, 24.9]])) == (10, 20, 5, 25)  # drawn by hand
    assert rectangle_region(np.array([[10.2, 4.9], [10.4, 5.3]])) == (10, 11, 5, 6)  # a click: its pixel
    daemon = StandInDaemon(rate_hz=30)
    viewer, widget = open_viewer(ViewerConfig(output=daemon.output, control=daemon.control), show=False)
    try:
        _wait_until(lambda: widget.region_layer is not None, "the region layer")
        widget.region_layer.add_rectangles(np.array([[9.5, 4.5], [19.5, 24.5]]))
        stats = _wait_until(lambda: (s := widget.last_stats) and s.region == (10, 20, 5, 25)
                            and len(s.trace_raw) and s, "the region's figures")
        assert stats.trace_raw[-1, 1] == RAMP[10:20, 5:25].mean()
        widget.set_region((2, 6, 3, 9))
        _wait_until(lambda: len(widget.region_layer.data) == 1 == len(widget.mirror_layer.data), "one region")
        corners = widget.region_layer.data[-1]
        assert corners.min(axis=0).tolist() == [1.5, 2.5] and corners.max(axis=0).tolist() == [5.5, 8.5]
        assert widget.current_region() == (2, 6, 3, 9)
    finally:
        widget.close_session()
        viewer.close()
        daemon.stop()


@pytest.mark.gui
def test_the_trace_plot_keeps_only_the_points_of_its_window(x_display):
    """Points later than now (an earlier acquisition's, whose clock ran further) or older than its
    span are left out, and do not stretch the y range."""
    pytest.importorskip("napari", reason="napari is not installed (pip install 'umvd-live[viewer]')")
    from napari.qt import get_qapp

    from umvd_live.viewer.qt.plot import RAW_COLOR, TraceLane, TracePlot, TraceSeries

    get_qapp()
    plot = TracePlot(10.0)
    points = np.array([[-12.0, 1e6], [-5.0, 100.0], [0.0, 110.0], [30.0, 1e6]])
    plot.set_lanes([TraceLane("", RAW_COLOR, (TraceSeries("raw", points, RAW_COLOR),))])
    assert plot.point_count() == 2 and plot.lanes[0].series[0].points[:, 1].tolist() == [100.0, 110.0]
    plot.resize(300, 110)
    assert not plot.grab().isNull()


@pytest.mark.gui
@pytest.mark.timeout(90)
def test_view_refuses_a_screenshot_folder_that_is_missing_and_closes_when_saving_fails(tmp_path, x_display):
    """`umvd-live view --quit-after S --screenshot PNG`: a folder that does not exist is said at
    once (exit status 2, no window); a screenshot that cannot be written still closes the window
    (exit status 1) rather than leaving it open with a traceback."""
    pytest.importorskip("napari", reason="napari is not installed (pip install 'umvd-live[viewer]')")
    from napari.qt import get_qapp
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from umvd_live.viewer.qt import app

    get_qapp()  # before the watchdog's timer: a QTimer needs the application
    config = ViewerConfig(output="tcp://127.0.0.1:9", control="tcp://127.0.0.1:9")

    def run(screenshot: Path) -> tuple[int, float]:
        """The exit status and how long it took; fails if the window stays open (the Qt loop is
        then quit by a watchdog)."""
        hung: list[bool] = []
        watchdog = QTimer()
        watchdog.setSingleShot(True)
        watchdog.timeout.connect(lambda: (hung.append(True), QApplication.instance().quit()))
        watchdog.start(20_000)
        started = time.monotonic()
        try:
            status = app.run(config, quit_after_s=0.5, screenshot=screenshot)
        finally:
            watchdog.stop()
        assert not hung, f"the window stayed open ({screenshot})"
        return status, time.monotonic() - started

    status, took_s = run(tmp_path / "missing" / "x.png")
    assert status == 2 and took_s < 1.0
    unwritable = tmp_path / "a-folder.png"
    unwritable.mkdir()  # a PNG path that is a folder: the screenshot fails
    assert run(unwritable)[0] == 1


class AcquisitionStandIn(threading.Thread):
    """The daemon as the viewer sees it, scripted: ``streams`` (name: (meta, value)) published
    ``rate_hz`` times a second, frames filled with their value; ``listed`` (name: status entry)
    answered to every ``status`` request (`stand_in_daemon`)."""

    def __init__(self, rate_hz: float = 20.0):
        super().__init__(daemon=True)
        self.streams: dict[str, tuple[dict, int]] = {}
        self.listed: dict[str, dict] = {}
        self._sockets = contextlib.ExitStack()
        self.pub, port, rep_port = self._sockets.enter_context(stand_in_daemon(lambda: dict(self.listed)))
        self.output, self.control = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{rep_port}"
        self.rate_hz = rate_hz
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        seq = 0
        while not self._halt.wait(1 / self.rate_hz):
            for stream, (meta, value) in dict(self.streams).items():
                parts = encode_frame(stream, np.full((16, 16), value, np.uint16), seq, t=seq / self.rate_hz, meta=meta)
                self.pub.send_multipart([f"{stream}/raw".encode(), *parts[1:]])
            seq += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self._sockets.close()


@pytest.mark.gui
@pytest.mark.timeout(90)
def test_the_viewer_moves_on_to_each_new_acquisition(x_display):
    """An MDA with positions, a time-lapse of the same group once it ended, then another group:
    the viewer shows each new acquisition's frames (over the position the user picked in the
    first), and its stream and position lists hold only what is being acquired."""
    pytest.importorskip("napari", reason="napari is not installed (pip install 'umvd-live[viewer]')")
    from umvd_live.viewer.qt.app import open_viewer

    daemon = AcquisitionStandIn()
    mda = {f"cam0.p{p}": (_site_meta("cam0", {"t": 0, "p": p}), 100 + p) for p in (0, 1)}
    daemon.streams, daemon.listed = dict(mda), {name: {"idle": False} for name in mda}
    viewer, widget = open_viewer(ViewerConfig(output=daemon.output, control=daemon.control, stats_period_s=0.1,
                                              follow_after_s=0.3, forget_after_s=0.5), show=False)

    def showing(site: Site, value: int) -> bool:
        frames = widget.last_frames
        return (frames is not None and frames.site == site and frames.pairs[0].raw is not None
                and int(frames.pairs[0].raw[0, 0]) == value
                and int(widget.channel_layers[frames.pairs[0].label].raw.data[0, 0]) == value)

    try:
        _wait_until(lambda: showing(Site.of("cam0", {"p": 0}), 100), "the MDA's first position")
        _wait_until(lambda: widget.position_combo.count() == 2, "the positions")
        widget.position_combo.setCurrentIndex(widget.position_combo.findData(1))  # the user's pick
        _wait_until(lambda: showing(Site.of("cam0", {"p": 1}), 101), "position 1")
        # The MDA ends; a time-lapse of the same camera starts.
        daemon.streams = {"cam0": (_site_meta("cam0", {"t": 0}), 200)}
        daemon.listed = {name: {"idle": True} for name in mda} | {"cam0": {"idle": False}}
        _wait_until(lambda: showing(Site("cam0"), 200), "the time-lapse", detail=lambda: widget.last_frames)
        _wait_until(lambda: not widget.position_combo.isVisibleTo(widget), "no positions offered")
        # It ends and the daemon drops it; another group starts.
        daemon.streams = {"exp2": (_site_meta("exp2", {"t": 0}), 300)}
        daemon.listed = {"exp2": {"idle": False}}
        _wait_until(lambda: showing(Site("exp2"), 300), "exp2", detail=lambda: widget.last_frames)
        _wait_until(lambda: [widget.stream_combo.itemText(i) for i in range(widget.stream_combo.count())]
                    == ["exp2"], "exp2 alone in the stream list")
        assert [layer.name for layer in viewer.layers] == ["raw · exp2", "region", "denoised · exp2",
                                                           "region (on denoised)"]
    finally:
        widget.close_session()
        viewer.close()
        daemon.stop()


@pytest.mark.gui
@pytest.mark.timeout(90)
def test_closing_the_panel_takes_its_layers_and_a_new_panel_builds_its_own(x_display):
    """The panel's X (napari unparents the widget): its layers leave the viewer; a panel docked
    afterwards (napari builds a new widget) shows the stream under the same layer names."""
    pytest.importorskip("napari", reason="napari is not installed (pip install 'umvd-live[viewer]')")
    from umvd_live.viewer.qt.app import open_viewer
    from umvd_live.viewer.qt.widget import LiveViewerWidget

    daemon = StandInDaemon(rate_hz=30)
    config = ViewerConfig(output=daemon.output, control=daemon.control)
    viewer, widget = open_viewer(config, show=False)
    names = ["raw · cam0", "region", "denoised · cam0", "region (on denoised)"]
    new = None
    try:
        _wait_until(lambda: widget.last_frames is not None and len(viewer.layers) == 4, "the layers")
        assert [layer.name for layer in viewer.layers] == names
        viewer.window.remove_dock_widget(widget)
        _wait_until(lambda: widget.worker is None, "the session to stop")
        assert len(viewer.layers) == 0
        new = LiveViewerWidget(viewer, config)
        viewer.window.add_dock_widget(new, name="umvd-live", area="right")
        _wait_until(lambda: new.last_frames is not None and len(viewer.layers) == 4, "the new panel's layers")
        assert [layer.name for layer in viewer.layers] == names
    finally:
        widget.close_session()
        if new is not None:
            new.close_session()
        viewer.close()
        daemon.stop()


@pytest.mark.gui
@pytest.mark.timeout(60)
def test_a_stream_name_that_matches_nothing_is_said_in_the_panel(x_display):
    pytest.importorskip("napari", reason="napari is not installed (pip install 'umvd-live[viewer]')")
    from umvd_live.viewer.qt.app import open_viewer

    daemon = StandInDaemon(rate_hz=30)
    viewer, widget = open_viewer(ViewerConfig(output=daemon.output, control=daemon.control, stream="TYPO"),
                                 show=False)
    try:
        _wait_until(lambda: "TYPO" in widget.analysed_label.text() and "cam0" in widget.analysed_label.text(),
                    "the panel to say so", detail=lambda: widget.analysed_label.text())
        assert "no stream or group named" in widget.analysed_label.text() and widget.last_frames is None
    finally:
        widget.close_session()
        viewer.close()
        daemon.stop()
