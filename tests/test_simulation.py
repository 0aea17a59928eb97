"""The simulated two-photon session: its ground truth, its noise model, its pacing over ZeroMQ."""

from __future__ import annotations

import importlib.util
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zmq

from umvd_live.adapters.publisher import FramePublisher
from umvd_live.adapters.simulation import (
    SimConfig,
    TwoPhotonSimulator,
    _shifted_crop,
    expected_variance,
    noisy_from_clean,
    stream_simulation,
)
from umvd_live.protocol import decode_frame

SMALL = SimConfig(height=64, width=80, seed=3)


def _load_noise_stats():
    path = Path(__file__).resolve().parents[1] / "tools" / "noise_stats.py"
    spec = importlib.util.spec_from_file_location("noise_stats", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["noise_stats"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_movie() -> tuple[np.ndarray, np.ndarray]:
    return TwoPhotonSimulator(SMALL).movie(300)


def test_dtype_shape_and_ground_truth_units(small_movie):
    noisy, clean = small_movie
    assert noisy.shape == clean.shape == (300, 64, 80)
    assert noisy.dtype == np.uint16 and clean.dtype == np.float32
    assert clean.min() >= SMALL.offset_adu  # offset + gain * (photons >= 0)
    frame_noisy, frame_clean = TwoPhotonSimulator(SMALL).next_frame()
    assert frame_noisy.shape == (64, 80) and frame_noisy.dtype == np.uint16
    assert frame_clean.dtype == np.float32


def test_deterministic_for_a_seed():
    a = TwoPhotonSimulator(SMALL).movie(20)
    b = TwoPhotonSimulator(SMALL).movie(20)
    c = TwoPhotonSimulator(replace(SMALL, seed=4)).movie(20)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    # Streaming in pieces gives the same frames as one call.
    sim = TwoPhotonSimulator(SMALL)
    first, _ = sim.movie(12)
    rest, _ = sim.movie(8)
    np.testing.assert_array_equal(np.concatenate([first, rest]), a[0])


@pytest.mark.parametrize("photons", [0.5, 2.0, 6.0])
def test_mean_photon_level_is_the_requested_one(photons):
    config = SimConfig(height=96, width=96, photons=photons, seed=1)
    noisy, clean = TwoPhotonSimulator(config).movie(200)
    measured = (clean.astype(np.float64) - config.offset_adu).mean() / config.gain_adu
    assert measured == pytest.approx(photons, rel=0.10)
    from_noisy = (noisy.astype(np.float64) - config.offset_adu).mean() / config.gain_adu
    assert from_noisy == pytest.approx(measured, rel=0.02)


def test_noise_is_temporally_white_and_spatially_independent_by_default(small_movie):
    noisy, clean = small_movie
    noise = noisy.astype(np.float64) - clean
    lag1 = (noise[1:] * noise[:-1]).sum() / np.sqrt((noise[1:] ** 2).sum() * (noise[:-1] ** 2).sum())
    assert abs(lag1) < 0.01  # 1.5M samples: standard error ~0.001
    x = (noise[:, :, 1:] * noise[:, :, :-1]).sum() / (noise**2).sum()
    assert abs(x) < 0.01
    # The clean movie is not white: calcium transients and neuropil are slow.
    dc = clean - clean.mean(axis=0)
    assert (dc[1:] * dc[:-1]).sum() / (dc**2).sum() > 0.5


def test_spatially_correlated_noise_option():
    config = replace(SMALL, noise_corr_x=0.22, noise_corr_y=0.1)
    noisy, clean = TwoPhotonSimulator(config).movie(100)
    noise = noisy.astype(np.float64) - clean
    noise -= noise.mean()
    cx = (noise[:, :, 1:] * noise[:, :, :-1]).sum() / (noise**2).sum()
    cy = (noise[:, 1:, :] * noise[:, :-1, :]).sum() / (noise**2).sum()
    assert cx == pytest.approx(0.22, abs=0.02)
    assert cy == pytest.approx(0.10, abs=0.02)
    lag1 = (noise[1:] * noise[:-1]).sum() / (noise**2).sum()
    assert abs(lag1) < 0.01


@pytest.mark.parametrize("config", [SMALL, replace(SMALL, noise_corr_x=0.2, noise_corr_y=0.2)], ids=["plain", "correlated"])
def test_clean_is_the_expected_value_and_variance_follows_the_model(config):
    """Many independent noise draws of one clean frame: mean -> clean, variance -> PMT model."""
    config = replace(config, photons=1.0)  # keep far from clipping at 65535
    _, clean = TwoPhotonSimulator(config).next_frame()
    rng = np.random.default_rng(11)
    draws = 1500
    total = np.zeros(clean.shape)
    total_sq = np.zeros(clean.shape)
    for _ in range(draws):
        x = noisy_from_clean(clean, config, rng).astype(np.float64)
        total += x
        total_sq += x * x
    mean = total / draws
    var = total_sq / draws - mean**2
    model_var = expected_variance(clean, config)
    z = (mean - clean) / np.sqrt(model_var / draws)
    assert abs(z.mean()) < 0.1  # no bias overall (5120 pixels: standard error ~0.014)
    assert np.mean(z**2) == pytest.approx(1.0, abs=0.1)
    assert np.abs(z).max() < 5.5
    ratio = var / model_var
    assert ratio.mean() == pytest.approx(1.0, abs=0.02)
    # The excess noise matters: a plain Poisson-Gaussian model (F = 1) would be ~30% off.
    plain = expected_variance(clean, replace(config, excess_noise=1.0))
    assert (var / plain).mean() > 1.2


def test_noise_stats_tool_recovers_the_simulated_detector():
    noise_stats = _load_noise_stats()
    config = SimConfig(height=96, width=96, photons=3.0, noise_corr_x=0.2, seed=2)
    noisy, clean = TwoPhotonSimulator(config).movie(300)
    stats = noise_stats.noise_statistics(noisy, offset=config.offset_adu)
    f = config.excess_noise
    assert stats.gain_adu == pytest.approx(f * config.gain_adu, rel=0.05)
    true_apparent = ((clean - config.offset_adu) / (f * config.gain_adu)).mean()
    assert stats.photons == pytest.approx(true_apparent, rel=0.05)
    assert stats.read_noise_adu == pytest.approx(config.read_noise_adu, abs=250)
    assert abs(stats.temporal_rho1) < 0.02
    assert stats.spatial_corr_x == pytest.approx(0.2, abs=0.03)
    assert abs(stats.spatial_corr_y) < 0.03


def test_bleaching_and_drift():
    config = SimConfig(height=64, width=64, rate_hz=1.0, bleach_per_min=0.5, photons=3.0, seed=5)
    sim = TwoPhotonSimulator(config)
    rates = [sim.clean_photons().mean() for _ in range(121)]
    # After 60 s half the fluorescence is gone, after 120 s three quarters (activity adds noise).
    assert np.mean(rates[55:66]) / np.mean(rates[:6]) == pytest.approx(0.5, rel=0.1)
    assert np.mean(rates[115:]) / np.mean(rates[:6]) == pytest.approx(0.25, rel=0.15)

    moving = TwoPhotonSimulator(replace(SMALL, drift_px=2.5, photons=2.0))
    offsets = np.array([moving.drift.offset(t) for t in np.linspace(0, 300, 3001)])
    assert np.abs(offsets).max() <= 2.5 and np.abs(offsets).max() > 1.0
    frames = np.stack([moving.clean_photons() for _ in range(60)])
    assert frames.shape == (60, 64, 80) and np.isfinite(frames).all() and frames.min() >= 0
    assert frames.mean() == pytest.approx(2.0, rel=0.15)


def test_subpixel_shift_is_bilinear():
    canvas = np.arange(100.0).reshape(10, 10)
    np.testing.assert_array_equal(_shifted_crop(canvas, 2.0, 3.0, (4, 5)), canvas[2:6, 3:8])
    half = _shifted_crop(canvas, 2.5, 3.0, (4, 5))
    np.testing.assert_allclose(half, 0.5 * (canvas[2:6, 3:8] + canvas[3:7, 3:8]))
    quarter = _shifted_crop(canvas, 2.0, 3.25, (4, 5))
    np.testing.assert_allclose(quarter, 0.75 * canvas[2:6, 3:8] + 0.25 * canvas[2:6, 4:9])


def test_bad_config_is_refused():
    for bad in (dict(photons=0), dict(height=4), dict(rate_hz=0), dict(excess_noise=0.9),
                dict(noise_corr_x=0.8), dict(bleach_per_min=1.0), dict(read_noise_adu=-1)):
        with pytest.raises(ValueError):
            SimConfig(**bad)


def _subscriber() -> tuple[zmq.Socket, str]:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind("tcp://127.0.0.1:*")
    return sub, sub.getsockopt(zmq.LAST_ENDPOINT).decode()


def test_stream_delivers_every_frame_in_order_over_zeromq():
    sub, endpoint = _subscriber()
    config = SimConfig(height=32, width=48, seed=9)
    frames, rate = 40, 200.0
    published: dict[int, np.ndarray] = {}
    result_box: list = []
    with FramePublisher(endpoint, stream="sim0") as pub:
        worker = threading.Thread(
            target=lambda: result_box.append(
                stream_simulation(pub, config, frames, rate, keep_clean=True,
                                  on_frame=lambda seq, noisy, clean: published.__setitem__(seq, noisy.copy()))
            )
        )
        worker.start()
        received = []
        while len(received) < frames and sub.poll(5000):
            received.append(decode_frame(sub.recv_multipart()))
        worker.join(10)
    sub.close()
    result = result_box[0]
    assert result.subscribed and result.frames == result.sent == frames and result.dropped == 0
    assert [f.header.seq for f in received] == list(range(frames))
    times = [f.header.t for f in received]
    assert all(b >= a for a, b in zip(times, times[1:]))
    assert result.elapsed_s >= (frames - 1) / rate  # paced, never ahead of the frame clock
    for f in received:
        assert f.stream == "sim0" and f.header.shape == (32, 48) and f.header.dtype == "<u2"
        assert f.header.meta["source"] == "sim" and f.header.meta["photons"] == 2.0
        np.testing.assert_array_equal(f.pixels, published[f.header.seq])
    assert sorted(result.clean) == list(range(frames))
    assert result.clean[0].dtype == np.float32


def test_stream_stops_on_event():
    sub, endpoint = _subscriber()
    stop = threading.Event()

    def on_frame(seq, noisy, clean):
        if seq == 9:
            stop.set()

    result_box: list = []
    with FramePublisher(endpoint, stream="sim1") as pub:
        worker = threading.Thread(target=lambda: result_box.append(
            stream_simulation(pub, SimConfig(height=16, width=16), None, 500.0, stop=stop, on_frame=on_frame)))
        worker.start()
        received = []
        # A bound SUB sends its subscription only while its owner uses it: keep polling.
        while worker.is_alive() or sub.poll(200):
            if sub.poll(100):
                received.append(decode_frame(sub.recv_multipart()).header.seq)
        worker.join(10)
    sub.close()
    assert result_box[0].frames == 10
    assert received == list(range(10))
