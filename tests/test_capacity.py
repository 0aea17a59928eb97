"""Several streams in one daemon (issue #16): the CPU budget shared by their engines, the fair
preview when the daemon is over capacity, and how it says so. No timing is asserted: the slow
engine is the real one, made slow on purpose (the paper preset), and every check is on counts,
flags and log lines."""

from __future__ import annotations

import logging
import threading
import time

import msgpack
import numpy as np
import pytest
import torch
import zmq

from umvd_live.adapters.publisher import FramePublisher
from umvd_live.daemon.capacity import CapacityMonitor, plan_inference
from umvd_live.daemon.config import DaemonConfig
from umvd_live.daemon.engines import engine_factory
from umvd_live.daemon.service import Daemon
from umvd_live.daemon.status import render_lines
from umvd_live.engine import EngineConfig, StreamDenoiser
from umvd_live.engine.budget import LOAD_EASY, LOAD_FULL, LOADED_TRAIN_DUTY, CpuBudget, PushLoad, divide, train_duty_cap

pytestmark = pytest.mark.timeout(300)


# ---- the budget's division ------------------------------------------------------------------------
@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16])
def test_one_engine_gets_the_layout_engines_had_before_the_budget(cores):
    """Before the budget: torch threads cores // 2 (at least 1) for the pushing thread, each of the
    two workers (from 2 cores on) and the trainer, at 0.3 duty once live; inline every core."""
    share = divide(cores)
    half = max(1, cores // 2)
    assert (share.infer_threads, share.train_threads) == (half, half)
    assert share.workers == (2 if cores >= 2 else 1)
    assert share.train_slots == 1 and share.train_duty == pytest.approx(0.3)
    inline = divide(cores, background=False)
    assert (inline.infer_threads, inline.workers) == (cores, 1)


def test_the_training_half_is_divided_among_engines():
    # 2 cores: one slot of one thread however many streams, and the live duty shared.
    for engines in (2, 3, 4):
        share = divide(2, engines)
        assert (share.infer_threads, share.workers, share.train_threads, share.train_slots) == (1, 2, 1, 1)
        assert share.train_duty == pytest.approx(0.3 / engines)
    # 8 cores: the training half (4) in slots of 4 // streams threads.
    assert [(divide(8, n).train_slots, divide(8, n).train_threads) for n in (1, 2, 3, 4, 6)] == \
        [(1, 4), (2, 2), (4, 1), (4, 1), (4, 1)]
    # Inference is time-shared (one engine pushes at a time): its layout does not shrink.
    assert {(divide(8, n).infer_threads, divide(8, n).workers) for n in (1, 2, 6)} == {(4, 2)}
    # Only trainers that train count for the duty: 6 engines, 2 of them training, 4 slots.
    assert divide(8, 6, active_trainers=2).train_duty == pytest.approx(0.3)
    assert divide(2, 3, active_trainers=1).train_duty == pytest.approx(0.3)
    assert divide(2, 3, active_trainers=2).train_duty == pytest.approx(0.15)
    with pytest.raises(ValueError, match="CPU budget"):
        divide(0)


def test_budget_redivides_as_engines_come_and_go():
    budget = CpuBudget(8)
    first = budget.join("a")
    assert (budget.share().train_threads, budget.share().train_slots) == (4, 1)
    second = budget.join("b")
    assert (budget.share().train_threads, budget.share().train_slots) == (2, 2)
    budget.leave(first)
    assert budget.engines == 1 and (budget.share().train_threads, budget.share().train_slots) == (4, 1)
    budget.leave(second)
    assert budget.engines == 0 and budget.summary()["cores"] == 8


def test_training_slots_are_taken_in_turn():
    """One slot (2 cores): whoever asked first gets it next; a stop request ends a wait."""
    budget = CpuBudget(2)
    a, b, c = (budget.join(name) for name in "abc")
    assert budget.acquire(a)
    order: list[str] = []

    def wait_for_slot(member: int, name: str) -> None:
        assert budget.acquire(member)
        order.append(name)
        budget.release(member)

    waiters = []
    for member, name in ((b, "b"), (c, "c")):  # b queues first, then c
        waiters.append(threading.Thread(target=wait_for_slot, args=(member, name)))
        waiters[-1].start()
        while len(budget._waiting) < len(waiters):
            time.sleep(0.001)
    assert order == [] and budget.summary()["train_slots_busy"] == 1
    budget.release(a)
    for w in waiters:
        w.join(10)
    assert order == ["b", "c"]
    stop = threading.Event()
    assert budget.acquire(a)
    stop.set()
    assert budget.acquire(b, stop) is False  # the slot is taken and b was told to stop
    budget.release(a)


class CountingBudget(CpuBudget):
    """A real budget that also records how many trainers ever held a slot at once."""

    def __init__(self, cores: int):
        super().__init__(cores)
        self.most_at_once = 0

    def acquire(self, member, stop=None):
        got = super().acquire(member, stop)
        if got:
            with self._cond:
                self.most_at_once = max(self.most_at_once, len(self._holders))
        return got


def test_engines_sharing_a_budget_train_in_turn_with_their_share_of_threads():
    budget = CountingBudget(2)
    config = EngineConfig(preset="lite", device="cpu", train_mode="background", warmup_frames=8,
                          warmup_steps=1000, min_train_frames=8)
    engines = [StreamDenoiser(config, budget=budget) for _ in range(3)]
    try:
        assert budget.engines == 3
        rng = np.random.default_rng(0)
        for den in engines:
            den.push_many([rng.poisson(20.0, (32, 32)).astype(np.uint16) for _ in range(12)])
        deadline = time.monotonic() + 120
        while min(den.model_step for den in engines) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert min(den.model_step for den in engines) >= 3, "every stream's trainer gets its turns"
        assert budget.most_at_once == 1, "one training slot on 2 cores: trainers never step at once"
        share = engines[0].stats()["cpu_share"]
        assert (share["engines"], share["train_slots"], share["train_threads"]) == (3, 1, 1)
    finally:
        for den in engines:
            den.close()
    assert budget.engines == 0


def test_an_engine_without_a_budget_sizes_its_threads_as_before():
    torch.set_num_threads(1)
    with StreamDenoiser(EngineConfig(preset="lite", device="cpu", train_mode="background")) as den:
        half = max(1, den.budget.cores // 2)
        assert torch.get_num_threads() == half  # the pushing thread's
        assert den.workers == (2 if den.budget.cores >= 2 else 1)
        assert den.stats()["cpu_share"]["train_threads"] == half
    with StreamDenoiser(EngineConfig(preset="lite", device="cpu", cpu_threads=1)) as den:
        assert torch.get_num_threads() == 1  # an explicit count wins


# ---- training that yields to the frame loop -------------------------------------------------------
def test_push_load_is_the_busy_share_of_the_last_second():
    load = PushLoad(span_s=1.0)
    assert load.utilisation(now=10.0) == 0.0
    load.record(9.0, 9.3)
    load.record(9.5, 9.6)
    assert load.utilisation(now=9.6) == pytest.approx(0.4)
    assert load.utilisation(now=10.2) == pytest.approx(0.1 + 0.1)  # only what lies in the last second
    assert load.utilisation(now=11.0) == 0.0
    load.record(10.9, 10.95, behind=True)  # a push that brought a backlog: the loop is behind
    assert load.utilisation(now=10.95) == 1.0
    overlapping = PushLoad(span_s=1.0)  # a push, and the passes it left running on two workers
    overlapping.record(20.0, 20.1)
    overlapping.record(20.05, 20.3)
    overlapping.record(20.05, 20.25)
    assert overlapping.utilisation(now=20.5) == pytest.approx(0.3)  # each instant counted once


def test_the_trainer_duty_falls_as_the_frame_loop_fills():
    assert train_duty_cap(0.0) == train_duty_cap(LOAD_EASY) == 1.0
    assert train_duty_cap(LOAD_FULL) == train_duty_cap(1.0) == LOADED_TRAIN_DUTY
    caps = [train_duty_cap(u) for u in np.linspace(LOAD_EASY, LOAD_FULL, 7)]
    assert all(a > b for a, b in zip(caps, caps[1:]))


def test_a_trainer_rests_while_the_frame_loop_is_busy():
    """The warm start trains flat out and a live trainer at its duty, unless the pushing thread of
    the budget is near its limit: then the trainer rests for the loop (`TrainingLoop.rest_after`)."""
    config = EngineConfig(preset="lite", device="cpu", train_mode="background", warmup_frames=1000)
    budget = CpuBudget(2)
    with StreamDenoiser(config, budget=budget) as den:
        rest = den.training.rest_after
        assert not den.warm and rest(0.05) == 0.0  # warm start, idle loop: flat out
        now = time.monotonic()
        budget.push_load.record(now - 0.95, now)  # a loop busy for 95 % of the last second
        assert rest(0.05) == pytest.approx(0.05 * (1 / LOADED_TRAIN_DUTY - 1), rel=0.05)
        assert den.stats()["push_load"] >= 0.9
        assert budget.summary()["push_load"] >= 0.9


# ---- the fair preview -----------------------------------------------------------------------------
def interleaved(names: str, points: int) -> list[str]:
    return [name for _ in range(points) for name in names]


def inferred(plan, streams: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for stream, infer in zip(streams, plan.infer):
        counts[stream] = counts.get(stream, 0) + infer
    return counts


def test_one_stream_is_planned_as_by_the_old_per_stream_rule():
    """Before: a frame with `newer` frames behind it was inferred when newer < run_length or
    (newer // run_length) * round_cost <= catch-up budget."""
    for n, run_length, cost, budget in [(10, 1, 0.03, 0.1), (9, 2, 0.05, 0.1), (5, 1, 0.5, 0.1), (40, 4, 0.01, 0.1)]:
        plan = plan_inference(["s"] * n, {"s": cost}, lambda s: False, run_length, budget)
        old = [(n - 1 - i) < run_length or ((n - 1 - i) // run_length) * cost <= budget for i in range(n)]
        assert plan.infer == old, (n, run_length, cost, budget)
        assert plan.skipped == ({"s": old.count(False)} if False in old else {})


def test_streams_share_the_catchup_budget_evenly_and_none_starves():
    streams = interleaved("abc", 10)
    plan = plan_inference(streams, {"a": 0.01, "b": 0.01, "c": 0.01}, lambda s: False, 1, 0.05)
    counts = inferred(plan, streams)
    assert sum(counts.values()) == 3 + 5  # every newest frame, then 0.05 s of older ones
    assert max(counts.values()) - min(counts.values()) <= 1
    for name in "abc":  # the newest frame of each stream is inferred
        assert plan.infer[max(i for i, s in enumerate(streams) if s == name)]
    # No budget at all: still every stream's newest round.
    plan = plan_inference(streams, {"a": 1.0, "b": 1.0, "c": 1.0}, lambda s: False, 2, 0.0)
    assert inferred(plan, streams) == {"a": 2, "b": 2, "c": 2}
    # Ties go to the streams in turn, not always to the first.
    favoured = set()
    for turn in range(3):
        counts = inferred(plan_inference(streams, {s: 0.01 for s in "abc"}, lambda s: False, 1, 0.05,
                                         rotate=turn), streams)
        favoured.add(frozenset(name for name, n in counts.items() if n == 3))
    assert len(favoured) == 3


def test_a_stream_with_more_frames_gets_a_proportional_share():
    """30 Hz and 10 Hz in one batch: each shows about the same fraction of its frames."""
    streams = ["fast"] * 12 + ["slow"] * 4
    plan = plan_inference(streams, {"fast": 0.01, "slow": 0.01}, lambda s: False, 1, 0.06)
    counts = inferred(plan, streams)
    assert counts == {"fast": 6, "slow": 2}


def test_recorded_streams_get_every_frame_and_their_backlog_is_charged_first():
    streams = interleaved(["rec", "a", "b"], 8)
    plan = plan_inference(streams, {"rec": 0.02, "a": 0.01, "b": 0.01}, lambda s: s == "rec", 1, 0.1)
    counts = inferred(plan, streams)
    assert counts["rec"] == 8 and "rec" not in plan.skipped
    # rec's 7 older frames cost 0.14 s > the 0.1 s budget: the previews keep their newest only.
    assert counts["a"] == counts["b"] == 1 and plan.skipped == {"a": 7, "b": 7}
    assert plan.skipped_cost_s == pytest.approx(14 * 0.01)
    # A stream not measured yet (its warm start) is never skipped.
    plan = plan_inference(streams, {"rec": None, "a": None, "b": 0.01}, lambda s: False, 1, 0.0)
    assert inferred(plan, streams) == {"rec": 8, "a": 8, "b": 1}


# ---- over capacity: the verdict -------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_capacity_monitor_goes_over_once_and_recovers_once():
    clock = Clock()
    mon = CapacityMonitor(clock=clock)
    transitions = []

    def batch(busy: float, idle: float, skipped_cost: float = 0.0, lag: float = 0.0) -> None:
        start = clock.now
        clock.now += busy
        mon.note_batch(start, clock.now, skipped_cost, lag, {"a": 1} if skipped_cost else None)
        clock.now += idle
        change = mon.update()
        if change is not None:
            transitions.append(change)

    for _ in range(20):  # 50 % busy: within capacity
        batch(0.05, 0.05)
    assert not mon.over and transitions == [] and mon.load() == pytest.approx(0.5, abs=0.05)
    for _ in range(100):  # busy all the time, but nothing skipped and no lag: at capacity, not past it
        batch(0.1, 0.0)
    assert not mon.over and transitions == [] and mon.load() == pytest.approx(1.0, abs=0.03)
    for _ in range(100):  # fully busy and skipping as much again: load about 2
        batch(0.1, 0.0, skipped_cost=0.1)
    assert mon.over and len(transitions) == 1 and transitions[0].over
    snap = mon.snapshot()
    assert snap["over"] and snap["load"] == pytest.approx(2.0, abs=0.1) and snap["since"] is not None
    assert 0 < snap["skipped_while_over"]["a"] <= 100
    for _ in range(80):  # 95 %: under 1, over the recovery threshold: still over (no flapping)
        batch(0.095, 0.005)
    assert mon.over and len(transitions) == 1 and mon.load() == pytest.approx(0.95, abs=0.02)
    for _ in range(100):
        batch(0.02, 0.08)
    assert not mon.over and [t.over for t in transitions] == [True, False]
    assert transitions[1].duration_s > 0 and transitions[1].skipped == snap["skipped_while_over"]
    # A backlog that may not be skipped (recordings) shows as lag.
    for _ in range(20):
        batch(0.02, 0.08, lag=1.5)
    assert mon.over and mon.snapshot()["episodes"] == 2


def test_a_load_read_mid_batch_counts_the_batch_so_far_as_busy():
    """`status` is answered between pieces of a batch: the batch under way is work, not idle time."""
    clock = Clock()
    mon = CapacityMonitor(clock=clock)
    for _ in range(30):  # busy all the time, in batches of 0.1 s
        mon.note_batch(clock.now, clock.now + 0.1, 0.0, 0.0)
        clock.now += 0.1
    mon.begin_batch(clock.now)
    clock.now += 0.8  # a long batch, read before it ends
    assert mon.load() == pytest.approx(1.0, abs=0.01)
    mon.note_batch(clock.now - 0.8, clock.now, 0.0, 0.0)
    clock.now += 0.8  # idle since: that is idle time
    assert mon.load() == pytest.approx(3.8 / 4.6, abs=0.01)  # 3.8 s busy of 4.6


def test_a_short_stall_at_start_up_is_not_over_capacity():
    clock = Clock()
    mon = CapacityMonitor(clock=clock)
    mon.note_batch(clock.now, clock.now + 0.5, 0.3, 0.0)  # one slow first batch
    clock.now += 0.5
    assert mon.update() is None and not mon.over


# ---- the daemon over capacity, end to end ---------------------------------------------------------
class CollectingSink:
    def __init__(self, owed: set[str]):
        self.owed = owed
        self.denoised: list = []
        self.raw: list = []

    def owes(self, stream: str) -> bool:
        return stream in self.owed

    def on_stream_started(self, event):
        pass

    def on_raw(self, arrival):
        self.raw.append((arrival.frame.stream, arrival.frame.header.seq))

    def on_denoised(self, output):
        self.denoised.append(output)

    def close(self):
        pass


def test_three_streams_over_capacity_degrade_fairly_and_keep_the_recording(tmp_path, caplog):
    """Three 64² streams, one recorded, at 60 frames/s each through the paper network (tens of
    ms per output on a CPU: slow on purpose): the daemon goes over capacity, says so in its status
    and once in its log, both preview streams keep getting outputs in even shares, the recorded
    stream gets every frame, and it says once that it is back within capacity when the frames stop."""
    with StreamDenoiser(EngineConfig(preset="paper", device="cpu", train_mode="inline")) as den:
        den.push(np.zeros((64, 64), np.uint16), infer=False)
        den.save_weights(tmp_path / "paper.pt")
    config = DaemonConfig(engine=EngineConfig(preset="paper", device="cpu", train_mode="background",
                                              init=str(tmp_path / "paper.pt")),
                          input_bind="tcp://127.0.0.1:*", output="tcp://127.0.0.1:*",
                          control="tcp://127.0.0.1:*", output_dir=tmp_path,
                          catchup_s=0.001)  # any backlog beyond the newest window is skipped
    sink = CollectingSink(owed={"rec"})
    names = ("a", "b", "rec")
    caplog.set_level(logging.INFO, logger="umvd_live.daemon")
    d = Daemon(config, engine_factory(config), [sink])
    d.set_training_paused(None, True)  # inference load only: the budget's trainers are tested above
    d.start()
    loop = threading.Thread(target=d.serve)
    loop.start()
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 120000)
    req.connect(d.endpoints["control"])

    def status() -> dict:
        req.send(msgpack.packb({"cmd": "status"}))
        return msgpack.unpackb(req.recv())

    first, points = 10, 100
    try:
        pubs = [FramePublisher(d.endpoints["input"], name, sndhwm=10000) for name in names]
        for p in pubs:
            assert p.wait_for_subscriber(10)
        rng = np.random.default_rng(0)

        def publish(count: int) -> None:
            started = time.perf_counter()
            for i in range(count):  # as an MDA sends its channels: one frame of each per time point
                for p in pubs:
                    assert p.publish(rng.poisson(20.0, (64, 64)).astype(np.uint16))
                time.sleep(max(0.0, started + (i + 1) / 60 - time.perf_counter()))

        # The first frames build the networks (not load); once each stream has measured what its
        # outputs cost, the rest comes at the same pace.
        publish(first)
        deadline = time.monotonic() + 120
        while not all(status()["streams"].get(s, {}).get("infer_ms") for s in names):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        publish(points - first)
        over_seen = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            now = status()
            if now["capacity"]["over"] and over_seen is None:
                over_seen = now
            if all(now["streams"].get(s, {}).get("frames_in") == points for s in names) \
                    and over_seen is not None and not now["capacity"]["over"]:
                break
            time.sleep(0.2)
        final = now
        req.send(msgpack.packb({"cmd": "shutdown"}))
        assert msgpack.unpackb(req.recv())["ok"]
        for p in pubs:
            p.close()
    finally:
        req.close(linger=0)
        d.request_stop("test over")
        loop.join(120)
        d.close()

    assert over_seen is not None, "the status never said over capacity"
    cap = over_seen["capacity"]
    assert cap["load"] >= 1.0 or cap["lag_ms"] >= 1000.0
    assert cap["since"] is not None and set(cap["skipped"]) == set(names) and cap["skipped"]["rec"] == 0
    assert cap["budget"]["engines"] == 3
    assert any(line.startswith("daemon: OVER CAPACITY") for line in render_lines(over_seen))
    assert not final["capacity"]["over"] and final["capacity"]["episodes"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "umvd_live.daemon"]
    assert sum(m.startswith("over capacity") for m in warnings) == 1, warnings
    assert sum(m.startswith("back within capacity") for m in warnings) == 1, warnings
    assert "recorded streams (rec) still get every frame" in next(m for m in warnings if m.startswith("over"))

    published = {name: [o for o in sink.denoised if o.stream == name and o.image is not None] for name in names}
    # The recording lost nothing: every frame of rec, in order, denoised.
    recorded = [o for o in sink.denoised if o.stream == "rec"]
    assert [o.header.seq for o in recorded] == list(range(points))
    assert all(o.image is not None for o in recorded) and final["streams"]["rec"]["skipped"] == 0
    # The previews were degraded, both of them, and evenly: neither starved.
    for name in ("a", "b"):
        outputs = [o for o in sink.denoised if o.stream == name]
        assert [o.header.seq for o in outputs] == list(range(points))  # skipped ones without an image
        assert final["streams"][name]["skipped"] > 0 and len(published[name]) >= 3
        assert published[name][-1].header.seq == points - 1  # the newest window is shown
    pa, pb = len(published["a"]), len(published["b"])
    assert min(pa, pb) * 3 >= max(pa, pb), (pa, pb)
    assert len(sink.raw) == 3 * points


def test_a_chain_of_runs_left_running_is_measured_whole(monkeypatch):
    """The daemon's cost of a round, from pushes that leave their passes running
    (`push_many(wait=False)`): the first push of a chain returns no output, and its time is billed
    to the next push, so the estimate is the chain's time per round. Pushes whose outputs are a
    warm start's temporal means measure nothing and bill nothing forward (else the first live
    push would carry the whole warm start, and the preview would skip what it need not)."""
    from umvd_live.daemon import streams
    from umvd_live.engine.outputs import DenoisedFrame
    from umvd_live.wire.protocol import decode_message, encode_frame

    clock = [100.0]
    monkeypatch.setattr(streams, "monotonic", lambda: clock[0])

    class Engine:  # each push takes 1 s; a round left running comes out with the next push
        frames_in = 0
        round_ended, on_pass_end = False, None

        def __init__(self):
            self.running: list = []
            self.state = "live"

        def push_many(self, frames, infer=None, tags=None, wait=True):
            clock[0] += 1.0
            done = [DenoisedFrame(self.frames_in + i, np.zeros((4, 4), np.float32), self.state, 1, tag=tag)
                    for i, tag in enumerate(tags)]
            self.frames_in += len(frames)
            out, self.running = self.running, ([] if wait else done)
            return out + (done if wait else [])

    live = streams.LiveStream("s", lambda init: Engine(), idle_after_s=5.0, run_length=2)
    live.denoiser = Engine()
    live.denoiser.frames_in = 10  # not the stream's first push, which also builds the network
    frames = [decode_message(encode_frame("s", np.zeros((4, 4), np.uint16), seq)) for seq in range(40)]
    run = lambda first: [streams.Arrival(f, clock[0], True) for f in frames[first:first + 2]]  # noqa: E731
    # the warm start: three chains of pushes left running, their outputs all temporal means
    live.denoiser.state = "warmup"
    for first in range(0, 24, 8):
        assert live.push(run(first), wait=False) == []
        for i in (2, 4):
            assert len(live.push(run(first + i), wait=False)) == 2
        assert len(live.push(run(first + 6), wait=True)) == 4
    assert live.round_cost_s is None and live.pending == 0
    live.denoiser.state = "live"
    assert live.push(run(24), wait=False) == [] and live.round_cost_s is None
    assert len(live.push(run(26), wait=True)) == 4
    assert live.round_cost_s == pytest.approx(1.0)  # 2 s for 2 rounds (the first push's second included)
    assert live.infer_cost_s == pytest.approx(0.5)
    assert live.pending == 0
