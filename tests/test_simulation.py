"""The simulated two-photon session: its ground truth, its noise model, its pacing over ZeroMQ."""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import replace

import numpy as np
import pytest
import zmq
from skimage.registration import phase_cross_correlation
from tool_modules import load_tool

from umvd_live.adapters.publisher import FramePublisher
from umvd_live.adapters.simulation import (
    PROCESS,
    PUNCTUM,
    SOMA,
    CalciumActivity,
    SimConfig,
    SimEvent,
    TwoPhotonSimulator,
    _shifted_crop,
    _shifted_crop_cubic,
    expected_variance,
    motion_margin,
    noisy_from_clean,
    parse_events,
    stream_simulation,
)
from umvd_live.metrics import MovieScorer
from umvd_live.wire.protocol import StreamEnd, decode_frame, decode_message

SMALL = SimConfig(height=64, width=80, seed=3)


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


@pytest.mark.parametrize("photons", [0.5, 2.0, 4.0])
def test_mean_photon_level_is_the_requested_one(photons):
    # Bursty activity makes a short movie's mean wander by a few percent: 20 s of it.
    config = SimConfig(height=64, width=64, photons=photons, seed=1)
    noisy, clean = TwoPhotonSimulator(config).movie(600)
    measured = (clean.astype(np.float64) - config.offset_adu).mean() / config.gain_adu
    assert measured == pytest.approx(photons, rel=0.08)
    from_noisy = (noisy.astype(np.float64) - config.offset_adu).mean() / config.gain_adu
    assert from_noisy == pytest.approx(measured, rel=0.02)


def test_noise_is_temporally_white_and_correlated_along_the_fast_axis_only_by_default(small_movie):
    noisy, clean = small_movie
    noise = noisy.astype(np.float64) - clean
    lag1 = (noise[1:] * noise[:-1]).sum() / np.sqrt((noise[1:] ** 2).sum() * (noise[:-1] ** 2).sum())
    assert abs(lag1) < 0.01  # 1.5M samples: standard error ~0.001
    x = (noise[:, :, 1:] * noise[:, :, :-1]).sum() / (noise**2).sum()
    y = (noise[:, 1:, :] * noise[:, :-1, :]).sum() / (noise**2).sum()
    assert x == pytest.approx(SMALL.noise_corr_x, abs=0.02) and SMALL.noise_corr_x > 0.1
    assert abs(y) < 0.01
    # The minimal model's noise is white in space too.
    config = SimConfig.minimal(height=64, width=80, seed=3)
    noisy, clean = TwoPhotonSimulator(config).movie(60)
    noise = noisy.astype(np.float64) - clean
    assert abs((noise[:, :, 1:] * noise[:, :, :-1]).sum() / (noise**2).sum()) < 0.015
    # The clean movie is not white: calcium transients and neuropil are slow.
    noisy, clean = small_movie
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


@pytest.mark.parametrize("config", [SimConfig(photons=2.0), SimConfig.like_real_movie()], ids=["defaults", "x_and_y"])
def test_correlated_noise_is_the_same_at_the_edges_and_its_variance_is_modelled_there(config):
    """The correlated noise is drawn a pixel beyond each correlated edge and cropped: an edge
    pixel is a full kernel's sum of independent draws like any other, so its variance and
    neighbour correlation are the interior's (a reflected edge summed one draw twice: +18 % of
    variance in the first and last columns at 0.18), and `expected_variance` models every pixel."""
    rng = np.random.default_rng(5)
    rate = np.full((12, 16), 3.0, np.float32)
    rate[:, -1] = 12.0  # a bright last column: the noise drawn beyond it is at its rate
    draws = np.stack([noisy_from_clean(rate * config.gain_adu + config.offset_adu, config, rng).astype(np.float64)
                      for _ in range(4000)])
    noise = draws - draws.mean(axis=0)
    var = noise.var(axis=0)
    ratio = var / expected_variance(rate * config.gain_adu + config.offset_adu, config)
    for edge in (ratio[:, 0], ratio[:, -1], ratio[0, :], ratio[-1, :]):  # SE of each mean ~0.007
        assert edge.mean() == pytest.approx(1.0, abs=0.035)
    assert ratio.mean() == pytest.approx(1.0, abs=0.02)

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float((a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean()))

    for column in (0, 7, 13):  # the first column's correlation with the second is the interior's
        assert corr(noise[:, 1:-1, column], noise[:, 1:-1, column + 1]) == pytest.approx(config.noise_corr_x, abs=0.02)
    if config.noise_corr_y > 0:
        for row in (0, 5, 10):
            assert corr(noise[:, row, 1:-2], noise[:, row + 1, 1:-2]) == pytest.approx(config.noise_corr_y, abs=0.02)


def test_truth_is_the_mean_of_the_noisy_frames_the_simulator_draws():
    """Many copies of one simulator state, each drawing its own noise: their mean -> the truth.

    This goes through next_frame itself (motion, bleaching, correlated noise and all): only the
    noise stream differs between the copies, and the truth does not depend on it.
    """
    config = SimConfig(height=24, width=32, photons=1.0, seed=6)
    sim = TwoPhotonSimulator(config)
    sim.movie(40)  # somewhere into the movie, moving and active
    draws = 2000
    total = np.zeros((24, 32))
    truth = None
    for i in range(draws):
        twin = copy.deepcopy(sim)
        twin.noise_rng = np.random.default_rng([99, i])
        noisy, clean = twin.next_frame()
        if truth is None:
            truth = clean
        np.testing.assert_array_equal(clean, truth)
        total += noisy
    z = (total / draws - truth) / np.sqrt(expected_variance(truth, config) / draws)
    assert abs(z.mean()) < 0.1  # 768 pixels: standard error ~0.036
    assert np.mean(z**2) == pytest.approx(1.0, abs=0.15)
    assert np.abs(z).max() < 5.0


@pytest.mark.parametrize(
    "config",
    [SimConfig.minimal(height=64, width=80, seed=3), SMALL, replace(SMALL, noise_corr_x=0.2, noise_corr_y=0.2)],
    ids=["minimal", "defaults", "correlated"],
)
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
    noise_stats = load_tool("noise_stats")
    config = SimConfig(height=96, width=96, photons=3.0, noise_corr_x=0.2, seed=2)  # moving, bleaching
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


def test_bleaching():
    config = SimConfig.minimal(height=64, width=64, rate_hz=1.0, bleach_per_min=0.5, photons=3.0, seed=5)
    sim = TwoPhotonSimulator(config)
    rates = [sim.clean_photons().mean() for _ in range(121)]
    # After 60 s half the fluorescence is gone, after 120 s three quarters (activity adds noise).
    assert np.mean(rates[55:66]) / np.mean(rates[:6]) == pytest.approx(0.5, rel=0.1)
    assert np.mean(rates[115:]) / np.mean(rates[:6]) == pytest.approx(0.25, rel=0.15)
    assert SimConfig().bleach_per_min > 0  # on by default, slowly


def test_motion_moves_the_truth_by_the_reported_offset():
    config = SimConfig(height=96, width=96, drift_px=2.0, jitter_px=0.3, seed=4)
    sim = TwoPhotonSimulator(config)
    assert sim.scene.margin == motion_margin(config) >= 3
    frames, offsets = [], []
    for _ in range(300):
        _, clean = sim.next_frame()
        frames.append(clean)
        offsets.append(sim.offset)
    offsets = np.array(offsets)
    assert np.abs(offsets).max() <= sim.scene.margin - 1
    assert np.ptp(offsets[:, 0]) > 1.0 or np.ptp(offsets[:, 1]) > 1.0  # the slow drift
    assert 0.05 < np.abs(np.diff(offsets, axis=0)).mean() < 0.5  # and fast jitter, frame to frame
    # The truth itself moves: each frame registered on the mean frame is shifted by its offset
    # (up to the mean offset; activity adds a little scatter).
    frames = np.stack(frames)
    assert np.isfinite(frames).all()
    window = np.outer(np.hanning(96), np.hanning(96))  # so that the frame's edges do not pull to 0

    def tapered(image: np.ndarray) -> np.ndarray:
        return (image - image.mean()) * window

    template = tapered(frames.mean(axis=0))
    found = np.array([phase_cross_correlation(template, tapered(f), upsample_factor=20, normalization=None)[0]
                      for f in frames])
    for axis in (0, 1):
        slope, _ = np.polyfit(offsets[:, axis], found[:, axis], 1)
        assert slope == pytest.approx(1.0, abs=0.1)
        assert np.corrcoef(offsets[:, axis], found[:, axis])[0, 1] > 0.95
    # A still field stays still.
    still = TwoPhotonSimulator(SimConfig.minimal(height=32, width=32, seed=4))
    still.movie(5)
    assert still.offset == (0.0, 0.0) and still.scene.margin == 0


def test_drift_path_is_bounded_and_jitter_is_fast():
    sim = TwoPhotonSimulator(replace(SMALL, drift_px=2.5, jitter_px=0.0))
    offsets = np.array([sim.drift.offset(t) for t in np.linspace(0, 300, 3001)])
    assert np.abs(offsets).max() <= 2.5 and np.abs(offsets).max() > 1.0
    jittery = TwoPhotonSimulator(replace(SMALL, drift_px=0.0, jitter_px=0.5)).drift
    steps = np.array([jittery.step(i / 30.0) for i in range(3000)])
    rms = np.sqrt((steps**2).sum(axis=1).mean())
    assert rms == pytest.approx(0.5, rel=0.15)


def test_kinetics_of_the_truth_traces():
    """Isolated single spikes in the true dF/F: 10-90 % rise ~50 ms, decay 0.4-1.2 s, peak = A."""
    rate = 100.0
    activity = CalciumActivity(200, rate, np.random.default_rng(0))
    frames = int(60 * rate)
    dff = np.empty((frames, 200))
    spikes = np.empty((frames, 200))
    for i in range(frames):
        dff[i] = activity.step()[0]
        spikes[i] = activity.spikes
    window = int(2 * rate)
    rises, decays, peaks = [], [], []

    def crossing(y: np.ndarray, level: float) -> float:
        k = int(np.argmax(y >= level))
        return k - 1 + (level - y[k - 1]) / (y[k] - y[k - 1])

    for j in range(200):
        for t0 in np.nonzero(spikes[:, j] == 1)[0]:
            if t0 < window or t0 + window >= frames or spikes[t0 - window : t0 + window, j].sum() != 1:
                continue  # not an isolated single spike
            trace = dff[t0 - 1 : t0 + window, j] - dff[t0 - 1, j]
            top = int(trace.argmax())
            peak = trace[top]
            rises.append((crossing(trace[: top + 1], 0.9 * peak) - crossing(trace[: top + 1], 0.1 * peak)) / rate)
            decays.append(int(np.argmax(trace[top:] <= peak / np.e)) / rate)
            peaks.append(peak / activity.amplitude[j])
    assert len(rises) > 100
    assert 0.04 <= np.median(rises) <= 0.06 and 0.025 <= min(rises) and max(rises) <= 0.09
    assert 0.6 <= np.median(decays) <= 0.95 and 0.3 <= min(decays) and max(decays) <= 1.5
    assert np.median(peaks) == pytest.approx(1.0, abs=0.02)  # one spike's peak dF/F is A
    # Bursts: some frames carry several spikes, and big bursts saturate below linear.
    assert spikes.max() >= 3
    c = np.linspace(0, 60, 7)
    assert np.all(np.diff(activity._saturate(np.outer(c, np.ones(200))), axis=0) > 0)
    assert np.all(activity._saturate(np.full(200, 40.0)) < 40 * activity.amplitude)


def test_footprints_processes_and_truth_traces():
    sim = TwoPhotonSimulator(SMALL)
    kinds = sim.scene.kinds
    assert {SOMA, PUNCTUM, PROCESS} <= set(kinds)
    fp = sim.footprints()
    assert fp.shape == (sim.scene.n_cells, SMALL.height, SMALL.width) and fp.dtype == np.float32
    assert fp.min() >= 0 and (fp.reshape(len(fp), -1).max(axis=1) > 0).sum() >= 0.9 * len(fp)
    # Processes are thin and long: few pixels for their length.
    for k in np.nonzero(kinds == PROCESS)[0]:
        ys, xs = np.nonzero(fp[k] > 0.2 * fp[k].max())
        if len(ys) > 5:
            extent = max(np.ptp(ys), np.ptp(xs)) + 1
            assert len(ys) < 3.0 * extent + 12
    # In a still field, the footprint-weighted truth of a clearly active soma follows its dF/F
    # (the neuropil under it and its neighbours add the rest).
    still = replace(SMALL, drift_px=0.0, jitter_px=0.0)
    sim = TwoPhotonSimulator(still)
    fp = sim.footprints()
    clean, dff = [], []
    for _ in range(300):
        clean.append(sim.next_frame()[1])
        dff.append(sim.dff.copy())
    clean, dff = np.array(clean), np.array(dff)
    traces = np.einsum("thw,khw->tk", clean - still.offset_adu, fp) / np.einsum("khw->k", fp)
    active = [k for k in np.nonzero(sim.scene.kinds == SOMA)[0] if dff[:, k].max() > 0.5 and fp[k].sum() > 0]
    assert len(active) >= 3
    corr = [np.corrcoef(traces[:, k], dff[:, k])[0, 1] for k in active]
    assert np.median(corr) > 0.9 and min(corr) > 0.6  # the least: a soma that a process crosses


def test_neuropil_has_its_own_activity():
    """Away from every source the neuropil fluctuates with the population everywhere at once and,
    unless ``neuropil_activity`` is 0, with its own local activity, different from place to place."""

    def fluctuations(neuropil_activity: float) -> tuple[float, float]:
        config = SimConfig.minimal(height=64, width=64, seed=8, neuropil_activity=neuropil_activity, n_processes=0)
        sim = TwoPhotonSimulator(config)
        _, clean = sim.movie(600)
        empty = sim.footprints().sum(axis=0) == 0
        x = clean[:, empty] - config.offset_adu
        dff = x / x.mean(axis=0) - 1.0
        common = dff.mean(axis=1, keepdims=True)
        return float(common.std()), float(np.median((dff - common).std(axis=0)))

    (common_busy, local_busy), (common_quiet, local_quiet) = fluctuations(1.0), fluctuations(0.0)
    assert common_quiet > 0.01 and common_busy > 0.01  # the population term
    assert local_quiet < 0.002  # a static texture
    assert local_busy > 0.02


def test_same_seed_same_scene_and_activity():
    a, b = TwoPhotonSimulator(SMALL), TwoPhotonSimulator(SMALL)
    np.testing.assert_array_equal(a.footprints(), b.footprints())
    a.movie(30)
    b.movie(30)
    np.testing.assert_array_equal(a.dff, b.dff)
    assert a.offset == b.offset


def test_subpixel_shift_is_bilinear():
    canvas = np.arange(100.0).reshape(10, 10)
    np.testing.assert_array_equal(_shifted_crop(canvas, 2.0, 3.0, (4, 5)), canvas[2:6, 3:8])
    half = _shifted_crop(canvas, 2.5, 3.0, (4, 5))
    np.testing.assert_allclose(half, 0.5 * (canvas[2:6, 3:8] + canvas[3:7, 3:8]))
    quarter = _shifted_crop(canvas, 2.0, 3.25, (4, 5))
    np.testing.assert_allclose(quarter, 0.75 * canvas[2:6, 3:8] + 0.25 * canvas[2:6, 4:9])


def test_subpixel_shift_is_cubic_and_exact_on_smooth_data():
    canvas = np.arange(144.0).reshape(12, 12) ** 1.0
    np.testing.assert_array_equal(_shifted_crop_cubic(canvas, 3.0, 4.0, (4, 5)), canvas[3:7, 4:9])
    # Cubic convolution reproduces polynomials up to degree 2 exactly (Keys 1981): a ramp and a parabola.
    yy, xx = np.mgrid[0:12, 0:12].astype(np.float64)
    for image, truth in ((2 * yy + 3 * xx, lambda y, x: 2 * y + 3 * x), (xx**2, lambda y, x: x**2)):
        out = _shifted_crop_cubic(image, 3.25, 4.6, (4, 5))
        np.testing.assert_allclose(out, truth(yy[3:7, 4:9] + 0.25, xx[3:7, 4:9] + 0.6), atol=1e-9)
    # Half a pixel of shift keeps fine detail: a 4-pixel period keeps ~88 % of its amplitude at the
    # new sample points (bilinear: 71 %), and a constant stays constant.
    wave = np.cos(np.pi * yy / 2)
    true_amplitude = abs(np.cos(np.pi / 4))  # the wave's value half a pixel off its crests
    assert np.ptp(_shifted_crop_cubic(wave, 4.5, 4.0, (4, 5))) / 2 > 0.85 * true_amplitude
    assert np.ptp(_shifted_crop(wave, 4.5, 4.0, (4, 5))) / 2 < 0.75 * true_amplitude
    np.testing.assert_allclose(_shifted_crop_cubic(np.full((12, 12), 7.0), 3.5, 4.5, (4, 5)), 7.0)


def test_bad_config_is_refused():
    for bad in (dict(photons=0), dict(height=4), dict(rate_hz=0), dict(excess_noise=0.9),
                dict(noise_corr_x=0.8), dict(bleach_per_min=1.0), dict(read_noise_adu=-1),
                dict(jitter_px=-0.1), dict(neuropil_activity=-1), dict(n_processes=-1)):
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


def test_stream_stops_on_event_and_ends_the_stream():
    """Stopped (or done), the simulation ends its stream, so that the daemon hands out the last
    outputs at once instead of keeping them until it shuts down."""
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
                message = decode_message(sub.recv_multipart())
                received.append(message if isinstance(message, StreamEnd) else message.header.seq)
        worker.join(10)
    sub.close()
    assert result_box[0].frames == 10
    assert received == [*range(10), StreamEnd("sim1", 10)]


# ---- scripted sessions (issue 15): laser steps and stage moves ---------------------------------


def test_events_parse_in_seconds_or_fractions_of_the_session():
    issue = parse_events("laser=3@30s,move=40@40s,laser=1/3@50s", 60.0)
    assert issue == parse_events("laser=3@1/2, move=40@2/3, laser=1/3@5/6", 60.0)
    assert issue == (SimEvent.laser(30.0, 3.0), SimEvent.move(40.0, 0, 40), SimEvent.laser(50.0, 1 / 3))
    assert [e.label() for e in issue] == ["laser ×3", "stage move 40 px", "laser ×1/3"]
    assert [e.first_frame(30.0) for e in issue] == [900, 1200, 1500]
    assert parse_events("move=-3:5@0.5,laser=2@1s", 4.0) == (SimEvent.laser(1.0, 2.0), SimEvent.move(2.0, -3, 5))
    for bad in ("laser=3", "laser=0@1s", "zoom=2@1s", "move=1.5@1s", "move=1:2:3@1s", "laser=3@-1s", "laser=3@1/0"):
        with pytest.raises(ValueError, match="bad event"):
            parse_events(bad, 10.0)
    with pytest.raises(ValueError, match="SimEvent"):
        SimConfig(events=("laser=3@1s",))


def test_a_laser_step_scales_the_photons_and_the_truth_from_its_frame_on():
    base = SimConfig(height=32, width=40, seed=4)
    stepped = replace(base, events=(SimEvent.laser(1.0, 3.0),))  # frame 30 at 30 Hz
    plain_noisy, plain = TwoPhotonSimulator(base).movie(60)
    sim = TwoPhotonSimulator(stepped)
    noisy, clean = sim.movie(60)
    # The same scene, activity and motion; only the photons (and so the truth above the offset) scale.
    np.testing.assert_array_equal(clean[:30], plain[:30])
    np.testing.assert_allclose(clean[30:] - base.offset_adu, 3.0 * (plain[30:] - base.offset_adu), rtol=1e-5)
    assert sim.intensity == 3.0 and sim.stage == (0, 0)
    ratio = (noisy[30:].mean() - base.offset_adu) / (plain_noisy[30:].mean() - base.offset_adu)
    assert ratio == pytest.approx(3.0, rel=0.02)


def test_a_stage_move_shifts_the_field_and_its_footprints():
    config = SimConfig.minimal(height=32, width=48, seed=5, events=(SimEvent.move(0.5, 0, 12),))
    sim = TwoPhotonSimulator(config)
    _, clean = sim.movie(30)  # the move is in frame 15 on
    assert sim.stage == (0, 12) and sim.scene.margin >= 12 + 2
    before, after = clean[14], clean[15]
    moved = np.corrcoef(before[:, 12:].ravel(), after[:, :-12].ravel())[0, 1]
    still = np.corrcoef(before.ravel(), after.ravel())[0, 1]
    assert moved > 0.999 and still < 0.5, (moved, still)
    # The footprints of the new position are those of the old one, 12 px along.
    at_start, at_move = sim.footprints(), sim.footprints(stage=(0, 12))
    np.testing.assert_array_equal(at_move[:, :, :-12], at_start[:, :, 12:])
    with pytest.raises(ValueError, match="off the simulated tissue"):
        sim.footprints(stage=(0, 40))
    # The scores take them sparse (a GB dense at 512²): the same weights.
    matrix = sim.footprint_matrix(stage=(0, 12))
    assert matrix.dtype == np.float32 and matrix.shape == (at_move.shape[0], 32 * 48)
    np.testing.assert_array_equal(matrix.toarray().reshape(at_move.shape), at_move)


def test_without_events_the_scene_is_unchanged():
    config = SimConfig(height=32, width=32, seed=6)
    with_event = replace(config, events=(SimEvent.laser(100.0, 2.0),))  # never reached
    np.testing.assert_array_equal(TwoPhotonSimulator(config).movie(20)[0], TwoPhotonSimulator(with_event).movie(20)[0])
    assert TwoPhotonSimulator(config).scene.margin == motion_margin(config)


# ---- tools/independent_sim.py: a second model, for movies the engine was not tuned on ------------------------------


def test_independent_simulator_draws_the_detector_and_activity_it_describes():
    """Its truth is the noisy frames' expected value, its noise the model's (Poisson photons, gamma
    PMT charge, a low-pass along x, read noise), its sources active, and a seed gives one movie."""
    sim = load_tool("independent_sim")
    config = sim.configure(48, 64, 2.0, 3)
    movie = sim.simulate(config, 120)
    assert movie.noisy.dtype == np.uint16 and movie.truth.dtype == np.float32
    assert movie.noisy.shape == movie.truth.shape == (120, 48, 64)
    photons = (movie.truth - config.offset_adu) / movie.gain_adu
    assert photons.mean() == pytest.approx(2.0, rel=0.01)
    residual = movie.noisy - movie.truth.astype(np.float64)
    pole = config.fast_axis_pole
    # variance: shot noise times the excess factor, through the low-pass's white-noise gain, plus read noise
    model = movie.gain_adu**2 * photons.mean() * (1 + 1 / config.excess_shape) * (1 - pole) / (1 + pole) \
        + config.read_noise_adu**2
    assert residual.var() == pytest.approx(model, rel=0.05)
    assert abs(residual.mean()) < 0.01 * residual.std()
    lag_x = np.mean(residual[:, :, 1:] * residual[:, :, :-1]) / residual.var()
    lag_y = np.mean(residual[:, 1:] * residual[:, :-1]) / residual.var()
    lag_t = np.mean(residual[1:] * residual[:-1]) / residual.var()
    # the photons' part of the noise correlates at the pole along x; the read noise is white
    shot_share = 1 - config.read_noise_adu**2 / model
    assert lag_x == pytest.approx(pole * shot_share, abs=0.03)
    assert abs(lag_y) < 0.02 and abs(lag_t) < 0.02
    assert set(movie.kinds) == {SOMA, PROCESS, PUNCTUM}  # the labels of the per-kind tables
    assert movie.footprints.shape == (len(movie.kinds), 48 * 64)
    traces = MovieScorer(movie.truth, movie.footprints, offset=config.offset_adu, kinds=movie.kinds).traces
    assert traces is not None and traces.cells.size >= 10  # sources whose truth rises 10 % above its median
    again = sim.simulate(config, 120)
    assert np.array_equal(again.noisy, movie.noisy)
    assert not np.array_equal(sim.simulate(sim.configure(48, 64, 2.0, 4), 120).noisy, movie.noisy)
    # brighter movies: the gain is lowered so that the brightest bursts stay below 65535
    bright = sim.simulate(sim.configure(48, 64, 8.0, 3), 120)
    assert bright.gain_adu == pytest.approx(config.gain_adu * 2.0 / 8.0)
    assert np.mean(bright.noisy == 65535) == 0.0


def test_bench_denoise_draws_from_the_independent_simulator_when_asked():
    import argparse

    tool = load_tool("bench_denoise")
    args = argparse.Namespace(size=(32, 48), sim=["rate_hz=10", "motion=0"], simulator="independent", frames=40)
    movie = tool.simulate(args, 2.0, 1)
    assert movie.noisy.shape == (40, 32, 48) and movie.offset_adu == 1000.0
    assert tool.independent_config(args, 2.0, 1).rate_hz == 10.0
    for bad in (["drift_px=3"], ["motion"], ["motion=much"]):
        with pytest.raises(SystemExit, match="--sim"):
            tool.independent_config(argparse.Namespace(size=(32, 48), sim=bad), 2.0, 0)
    project = tool.simulate(argparse.Namespace(size=(32, 48), sim=[], simulator="project", frames=40), 2.0, 1)
    assert project.noisy.shape == (40, 32, 48) and set(project.kinds) == {SOMA, PROCESS, PUNCTUM}


def test_blind_ceiling_scores_the_independent_truth_without_its_own_jitter(tmp_path):
    """``jitter_px=0`` keeps every other draw (sources, activity, drift), so the tool's jitter-free
    truth is the same movie less each frame's own jitter: scored against the moving truth it keeps
    less than all of the amplitude, and exactly all of it where there is no jitter to lose."""
    sim, tool = load_tool("independent_sim"), load_tool("blind_ceiling")
    config = sim.configure(48, 64, 2.0, 3)
    moving, still = sim.simulate(config, 150), sim.simulate(replace(config, jitter_px=0.0), 150)
    assert moving.kinds == still.kinds and (moving.footprints != still.footprints).nnz == 0
    signal = moving.truth.mean() - config.offset_adu
    assert 0 < np.abs(moving.truth - still.truth).mean() < 0.1 * signal
    # the jitter was white: without it, consecutive frames differ less
    assert np.abs(np.diff(still.truth, axis=0)).mean() < 0.8 * np.abs(np.diff(moving.truth, axis=0)).mean()
    scores = tool.ceilings(config, 150)
    known, averaged = (scores[name] for name in tool.ESTIMATES)
    assert 0.6 < averaged["trace_slope"] <= known["trace_slope"] < 0.99
    assert 0.8 < known["trace_corr"] < 0.999
    exact = tool.ceilings(replace(config, jitter_px=0.0), 150)[tool.ESTIMATES[1]]
    assert exact["trace_slope"] == pytest.approx(1.0, abs=1e-6) and exact["trace_corr"] == pytest.approx(1.0, abs=1e-6)
    # the average over the shifts: a blur with the shift's variance, the frame's sum kept
    point = np.zeros((1, 21, 21))
    point[0, 10, 10] = 1.0
    for rms in (0.5, 1.5):  # the 3-tap kernel, then a sampled Gaussian, never a negative weight
        blurred = tool.jitter_average(point, rms)[0]
        assert blurred.sum() == pytest.approx(1.0) and blurred.min() >= 0
        assert (blurred.sum(axis=1) * (np.arange(21) - 10) ** 2).sum() == pytest.approx(rms**2, rel=0.02)
    out = tmp_path / "ceiling.json"
    argv = ["--size", "48", "64", "--frames", "150", "--photons", "2", "--seeds", "3", "--json", str(out)]
    assert tool.main(argv) == 0
    written = json.loads(out.read_text())["movies"][0]
    assert written["seed"] == 3 and written[tool.ESTIMATES[1]]["trace_slope"] == pytest.approx(averaged["trace_slope"])
