"""Abrupt changes (`umvd_live.engine.changes`) and what the engine does at one: a new segment whose
windows and context never hold a frame from before it, a normaliser fitted again, outputs marked
`adapting`; and the referee that shows the network only while it beats the temporal mean."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from umvd_live.adapters.simulation import SimConfig, SimEvent, TwoPhotonSimulator
from umvd_live.engine import BlindReferee, EngineConfig, StreamDenoiser
from umvd_live.engine.changes import ChangeConfig, ChangeDetector
from umvd_live.engine.trainer import ReplayBuffer

RATE = 30.0


def _movie(frames: int, *events: SimEvent, size: int = 96, photons: float = 2.0, seed: int = 0) -> np.ndarray:
    config = SimConfig(height=size, width=size, photons=photons, seed=seed, events=tuple(events))
    return TwoPhotonSimulator(config).movie(frames)[0]


def _changes(movie: np.ndarray) -> list:
    detector = ChangeDetector()
    for frame in movie:
        detector.observe(frame)
    return detector.changes


@pytest.mark.parametrize("scale", [3.0, 1 / 3])
def test_a_laser_step_is_a_change_within_two_frames(scale: float) -> None:
    at = 60
    changes = _changes(_movie(90, SimEvent.laser(at / RATE, scale)))
    assert len(changes) == 1, changes
    assert at <= changes[0].index <= at + 1 and changes[0].reason == "intensity"
    assert (changes[0].level_ratio > 1) == (scale > 1)


def test_a_stage_move_is_a_change_within_two_frames() -> None:
    at = 60
    changes = _changes(_movie(90, SimEvent.move(at / RATE, 0, 40)))
    assert len(changes) == 1, changes
    assert at <= changes[0].index <= at + 1 and changes[0].reason == "content"


@pytest.mark.parametrize("photons, seed", [(0.5, 1), (2.0, 2), (8.0, 3)])
def test_a_steady_stream_raises_no_change(photons: float, seed: int) -> None:
    """Activity, bursts, motion and bleaching (the simulator's defaults), 20 s of them (the
    10-minute soak, tools/soak.py, runs longer)."""
    movie = _movie(600, size=128, photons=photons, seed=seed)
    assert _changes(movie) == []


@pytest.mark.parametrize("size, sources, level, background", [(32, 4, 80.0, 20.0), (128, 3, 3000.0, 100.0)])
@pytest.mark.parametrize("length", [1, 3])
def test_a_hot_pixel_is_no_change_and_a_move_still_is(size: int, sources: int, level: float,
                                                      background: float, length: int) -> None:
    """One pixel at 65535 (a PMT spike) in a dim field, or in a sparse one (three beads on a flat
    background), or a readout spike of 3 along a row: its block alone once made the frame
    decorrelate from the reference as a stage move does. The sources themselves still move the
    grid."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    spots = sum(level * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 2.88) for y, x in rng.uniform(0, size, (sources, 2)))
    movie = rng.poisson(background + spots, (90, size, size)).astype(np.uint16)
    movie[40, 11, 13:13 + length] = 65535
    assert _changes(movie) == []
    movie[60:] = np.roll(movie[60:], (size // 5, size // 7), (1, 2))
    assert [(c.index, c.reason) for c in _changes(movie)] == [(60, "content")]


@pytest.mark.parametrize("photons", [0.05, 0.3, 3.0])
def test_a_dim_photon_counting_stream_raises_no_change(photons: float) -> None:
    """Counts without offset: block means of a few photons are coarse steps, so their median
    jumps by a step from frame to frame; a level test applied to them (every block above zero)
    found a laser step every few frames."""
    movie = np.random.default_rng(0).poisson(photons, (600, 64, 64)).astype(np.uint16)
    assert _changes(movie) == []


def test_slow_drifts_are_followed_without_a_change() -> None:
    """Bleaching to half in 40 s and a slow ramp of offset: the reference moves along."""
    movie = _movie(1200, size=96).astype(np.float32)
    fade = np.linspace(1.0, 0.5, len(movie), dtype=np.float32)[:, None, None]
    assert _changes(movie * fade + np.linspace(0, 300, len(movie), dtype=np.float32)[:, None, None]) == []


def test_detection_can_be_turned_off() -> None:
    detector = ChangeDetector(ChangeConfig(enabled=False))
    for frame in _movie(90, SimEvent.laser(2.0, 3.0)):
        assert detector.observe(frame) is None


def _engine(**overrides) -> StreamDenoiser:
    settings = dict(preset="lite", device="cpu", train_mode="inline", warmup_frames=16, warmup_steps=4,
                    steps_per_frame=0.0, prior="none", precision="fp32")
    config = EngineConfig(**{**settings, **overrides})
    return StreamDenoiser(config)


def _denoised(movie: np.ndarray) -> tuple[dict, list]:
    """Every output of an untrained (fixed) network, live from frame 16: only the frames decide."""
    with _engine(warmup_steps=0) as den:
        outputs = {o.index: o for o in den.push_many(list(movie))}
        outputs.update({o.index: o for o in den.flush()})
        return outputs, den.changes


def test_no_frame_from_before_a_change_reaches_a_later_output() -> None:
    """Blindness across a change, as for the centre frame: redraw the noise of every frame before
    a laser step and no output after it moves; redraw every frame after it and no output before
    it moves. Windows and context blocks stop at the change, both ways."""
    at = 30
    config = SimConfig(height=32, width=32, photons=2.0, seed=4, events=(SimEvent.laser(at / RATE, 3.0),))
    noisy, clean = TwoPhotonSimulator(config).movie(60)
    redrawn = TwoPhotonSimulator(config.__class__(**{**config.__dict__, "seed": 9})).movie(60)[0]
    before = np.concatenate([redrawn[:at], noisy[at:]])
    after = np.concatenate([noisy[:at], redrawn[at:]])
    base, changes = _denoised(noisy)
    assert [c.index for c in changes] == [at]
    # after the change: the network's outputs are adapting, the referee's means warmup
    assert {o.state for i, o in base.items() if i >= at} <= {"adapting", "warmup"}
    assert {o.segment for i, o in base.items()} == {0, 1}
    moved_before, _ = _denoised(before)
    moved_after, _ = _denoised(after)
    for t in range(60):
        same = np.array_equal(base[t].image, moved_before[t].image)
        assert same == (t >= at), t
        same = np.array_equal(base[t].image, moved_after[t].image)
        assert same == (t < at), t


def test_the_normaliser_is_fitted_again_at_a_laser_step() -> None:
    movie = _movie(40, SimEvent.laser(20 / RATE, 3.0), size=32)
    with _engine() as den:
        den.push_many(list(movie))
        before, after = den._normalizers
        assert after.scale > 2 * before.scale
        assert den.stats()["changes"][0]["reason"] == "intensity"


def test_replay_windows_never_straddle_a_segment() -> None:
    replay = ReplayBuffer(window=3, capacity=100)
    for i in range(20):
        # 1000 x the segment, plus a flicker that the active sampling sees as activity
        replay.add(i, torch.full((1, 16, 16), 1000.0 * (i // 10) + (i % 3)), segment=i // 10)
    assert replay.centres() == [*range(1, 9), *range(11, 19)]
    rng = np.random.default_rng(0)
    for favour in (None, 1):
        for active_share in (0.0, 1.0):  # patches drawn uniformly, or where the activity is
            batch = replay.sample(rng, 64, 8, fresh_start=0.5, favour=favour, favour_share=1.0,
                                  active_share=active_share)
            segment = torch.div(batch.flatten(2), 1000, rounding_mode="floor")
            assert torch.equal(segment.amin((1, 2)), segment.amax((1, 2)))  # one segment each
            if favour == 1:
                assert bool((segment == 1).all())
    rows = replay._activity_rows(rng, replay.centres())
    assert replay._active_picks(rng, replay._block_means, *rows, 8, (16, 16), (8, 8))  # the active path ran


def test_past_context_blocks_never_hold_frames_after_the_window() -> None:
    """Live inference has no frame after t + k (`ContextHistory`): a training window whose past
    block is empty (after a change) falls back to the neighbours too, never to later frames."""
    k, spans = 3, (8, 24)
    replay = ReplayBuffer(window=7, capacity=200, context=spans, both_sides=False)
    for i in range(120):  # each frame holds its index: a block's mean says which frames it took
        replay.add(i, torch.full((1, 8, 8), float(i)), segment=i // 60)
    rng = np.random.default_rng(0)
    batch = replay.sample(rng, 256, 8, fresh_start=0.0)
    centres = batch[:, k, 0, 0, 0]
    assert bool((batch[:, 2 * k + 1:, 0, 0, 0] <= centres[:, None] + k).all())


class _AddsBetweenTheLocks:
    """Stands in for a replay buffer's lock: before the sampling thread's second hold of it (the
    lock is let go between the two while the active search runs), the pushing thread's `add`s run."""

    def __init__(self, lock, adds) -> None:
        self.lock, self.adds, self.holds = lock, adds, 0

    def __enter__(self):
        self.holds += 1
        if self.holds == 2:
            self.adds()
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


@pytest.mark.parametrize("active_share", [0.0, 1.0])
def test_replay_sample_survives_frames_dropped_while_it_searched(active_share: float) -> None:
    """A full buffer drops its oldest frames as the stream pushes; a sample whose centres were
    listed before that takes its windows from the frames still held (it once raised KeyError,
    which ended the trainer thread: the stream never trained again)."""
    for dropped in (24, 32):  # most of the listed centres gone; every one of them gone
        replay = ReplayBuffer(window=5, capacity=32)
        rng = np.random.default_rng(dropped)
        for i in range(32):
            replay.add(i, torch.from_numpy(rng.poisson(2.0, (1, 32, 32)).astype(np.float32)) + i)

        def adds(replay=replay, dropped=dropped) -> None:
            thread = threading.Thread(target=lambda: [replay.add(32 + j, torch.full((1, 32, 32), 1000.0 + j))
                                                      for j in range(dropped)])
            thread.start()
            thread.join()

        replay._lock = _AddsBetweenTheLocks(replay._lock, adds)  # type: ignore[assignment]
        batch = replay.sample(rng, 8, 16, active_share=active_share)
        if dropped == 32:
            assert batch is None  # no listed centre is left: no sample this step
        else:
            assert batch is not None and batch.shape == (8, 5, 1, 16, 16)
            # every centre one of the frames still held (frame i is i + Poisson(2), some pixel i)
            assert bool((batch[:, 2].amin((1, 2, 3)) >= 24).all())


def test_active_sampling_finds_the_transients_by_the_neighbours_alone() -> None:
    """`TrainerConfig.active_share` draws patches where the window's neighbours rise above the
    median, never where only the centre frame does: selecting on the centre (the target) would
    teach the network to overshoot."""
    rng = np.random.default_rng(0)
    replay = ReplayBuffer(window=7, capacity=400)
    for i in range(200):
        frame = torch.from_numpy(rng.poisson(2.0, (1, 64, 64)).astype(np.float32))
        if 100 <= i < 112:
            frame[0, 8:16, 40:48] += 8.0  # a transient of 12 frames
        if i == 150:
            frame[0, 8:16, 8:16] += 30.0  # one bright frame: seen only as a centre's neighbour
        replay.add(i, frame)
    centres = replay.centres()
    picks = [p for _ in range(200)
             for p in replay._active_picks(rng, replay._block_means, *replay._activity_rows(rng, centres), 8, (64, 64),
                                           (16, 16))]
    t, y, x = (np.array(v) for v in zip(*picks))
    on_transient = (t >= 97) & (t <= 114) & (y <= 8) & (y + 16 >= 16) & (x <= 40) & (x + 16 >= 48)
    assert on_transient.mean() > 0.4  # uniform patches: 18 of 194 centres x 9 of 2,401 corners = 0.03 %
    assert (t == 150).mean() < 0.01  # the bright frame itself is never why a centre is drawn
    assert ((abs(t - 150) <= 3) & (t != 150)).mean() > 0.1  # but its neighbours' windows are (uniform: 3 %)
    batch = replay.sample(rng, 16, 16, active_share=1.0)
    assert batch is not None and batch.shape == (16, 7, 1, 16, 16)


def test_the_referee_trusts_the_smaller_blind_distance() -> None:
    referee = BlindReferee()
    assert not referee.trusted
    assert referee.judge(network=1.0, mean=2.0)
    for _ in range(5):
        referee.judge(network=3.0, mean=2.0)
    assert not referee.trusted
    referee.reset()
    assert referee.network is None and not referee.trusted
