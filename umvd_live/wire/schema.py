"""The shape of the control socket's ``status`` reply, as TypedDicts (like pymmcore-plus's
``metadata/schema.py`` for per-frame metadata).

Why: the reply is a plain msgpack map that the daemon builds (`daemon.service.Daemon.status`, one
`StreamStatus` per stream from `daemon.streams.LiveStream.snapshot`) and several clients read (the
viewer, the demo, the benchmark, scripts). Typing both ends against one schema lets a type checker
catch a renamed or missing key instead of a ``KeyError`` at run time. Nothing here is checked at
run time: a reply is still a dict. ``total=False`` (or `NotRequired`) marks keys that may be absent;
``| None`` marks keys that are present with no value yet. Wire format: docs/protocol.md.

`latency_summary` is the one way a latency figure is summarised, for the status and for what the
demo and the benchmark measure on their side of the socket, so their percentiles agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NotRequired, TypedDict

import numpy as np

__all__ = [
    "AmplitudeStatus",
    "BudgetStatus",
    "CapacityStatus",
    "ChangeStatus",
    "ControlStatus",
    "CpuShareStatus",
    "DaemonStatus",
    "EndpointsStatus",
    "EngineSettings",
    "EngineStats",
    "InboxStatus",
    "LatencyStatus",
    "PriorStatus",
    "RecordingStatus",
    "RefereeStatus",
    "StateDirStatus",
    "StatusReply",
    "StreamAxes",
    "StreamStatus",
    "WorkerStatus",
    "latency_summary",
]


class LatencyStatus(TypedDict):
    """Receipt -> publication latency of a stream's recent outputs, in ms (None before the first)."""

    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None
    count: int


def latency_summary(values_ms: Iterable[float]) -> LatencyStatus:
    """Percentiles 50, 90 and 99 and the maximum of the finite ``values_ms``; None for each (and a
    count of 0) when there is none."""
    values = np.fromiter(values_ms, np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None, "count": 0}
    p50, p90, p99 = (float(v) for v in np.percentile(finite, [50, 90, 99]))
    return {"p50": p50, "p90": p90, "p99": p99, "max": float(finite.max()), "count": int(finite.size)}


class StreamAxes(TypedDict):
    """Where a stream sits in its acquisition, from its frames' ``meta`` (docs/protocol.md)."""

    group: str
    channel: str | None
    index: dict[str, int]  # non-time axes -> index


class ChangeStatus(TypedDict):
    """An abrupt change of the acquisition (`engine.changes.Change`): frame ``index`` starts a segment."""

    index: int
    reason: str
    level_ratio: float
    correlation: float


class PriorStatus(TypedDict):
    """The prior a stream's network started from (`engine.priors.Prior.to_dict`)."""

    name: str
    sha256: str
    trained: object  # what the prior file says of its training (free form)


class RefereeStatus(TypedDict):
    """Whether the network beats the temporal mean, judged without truth (`engine.outputs.BlindReferee`)."""

    trusted: bool
    judged: int
    network_mse: float | None
    mean_mse: float | None


class AmplitudeStatus(TypedDict):
    """A live stream's amplitude restoration (`engine.amplitude.LiveAmplitude.to_dict`)."""

    gain: float  # 1 until the shrinkage is measured, and after each change
    slope: float | None  # the outputs' measured slope on the truth


class CpuShareStatus(TypedDict):
    """One engine's share of its CPU budget (`engine.budget.CpuShare`)."""

    cores: int
    engines: int
    infer_threads: int
    workers: int
    train_threads: int
    train_slots: int
    train_duty: float


class EngineStats(TypedDict, total=False):
    """A stream engine's own figures (`engine.stream.StreamDenoiser.stats`); only ``error`` when
    they could not be read."""

    state: str
    preset: str
    device: str
    precision: str  # "bf16" | "fp32"
    window: int
    batch: int
    workers: int
    frames_in: int
    frames_out: int
    train_steps: int
    train_steps_per_s: float
    push_load: float  # the CPU budget's `PushLoad`: the trainer yields past 0.6
    loss: float | None
    lr: float
    rollbacks: int
    impulses: int  # pixels replaced as isolated impulses (`normalization.remove_impulses`) in the stream's frames
    failed_steps: int  # background training steps that raised (logged; training went on)
    training_paused: bool
    warmup_progress: float
    prior: PriorStatus | None
    referee: RefereeStatus
    segment: int
    adapting: bool
    changes: list[ChangeStatus]  # the last few
    amplitude: AmplitudeStatus | None  # None with keep_amplitude 0
    cpu_share: CpuShareStatus | None  # None off the CPU
    error: str  # instead of everything above when stats() failed


class StreamStatus(TypedDict):
    """One live stream (`daemon.streams.LiveStream.snapshot`)."""

    frames_in: int
    frames_out: int
    skipped: int
    drops: int
    rejected: dict[str, int]  # reason -> count
    rejected_total: int
    seq_restarts: int
    seq_jumps: int
    nonfinite_frames: int
    nonfinite_pixels: int
    pauses: int
    resumed: int
    started_from: str | None
    idle: bool
    idle_s: float | None
    restarts: int
    resets: int
    ends: int
    axes: StreamAxes | None
    last_seq: int | None
    fps_in: float
    fps_out: float
    latency_ms: LatencyStatus
    shape: list[int] | None
    dtype: str | None
    pending: int
    infer_ms: float | None
    training_paused: bool
    state: str  # the engine's state ("warmup", "live", ...), "idle" before its first frame
    model_step: int
    loss: float | None
    warmup_progress: float
    changes: int
    last_change: ChangeStatus | None
    engine: NotRequired[EngineStats]  # once the stream has an engine


class EndpointsStatus(TypedDict):
    """The bound (or connected) endpoints; ``input`` joins several with ", "."""

    input: str
    output: str
    control: str


class EngineSettings(TypedDict, total=False):
    """The `engine.config.EngineConfig` the daemon builds every stream's engine from (its fields,
    as `dataclasses.asdict` gives them; a stream's own starting weights aside): what is in use,
    not what was asked for on the command line. ``total=False``: a newer engine may add fields."""

    preset: str
    device: str
    window: int
    context: list[int] | None  # None: the preset's
    context_sides: str
    warmup_frames: int
    warmup_steps: int
    train_mode: str  # "background" in the daemon
    steps_per_frame: float
    min_train_frames: int
    sync_every: int
    live_train_duty: float
    trainer: dict[str, object]  # `engine.trainer.TrainerConfig`
    changes: dict[str, object]  # `engine.changes.ChangeConfig`
    adapt_frames: int
    adapt_train_duty: float
    keep_amplitude: float
    init: str | None
    prior: str
    probe_from_steps: int
    precision: str
    cpu_threads: int | None
    max_batch: int | None
    workers: int | None
    seed: int


class StateDirStatus(TypedDict):
    """Checkpoints of ``--state-dir`` (`daemon.statestore.StateStore.summary`)."""

    dir: str
    interval_s: float
    saved: int
    resumed: int
    refused: int
    failed: int  # checkpoints that could not be written (logged; the previous file is kept)
    pending: int  # saves and removals asked for, not done yet (they run on the state worker)
    last_save_ms: float | None  # how long the last write took, off the frame loop


class WorkerStatus(TypedDict):
    """The daemon's one thread for slow state I/O (`daemon.statestore.StateWorker`): checkpoints,
    `save_model`, weights hashes, off the frame loop."""

    thread: str
    pending: int
    done: int
    failed: int


class BudgetStatus(TypedDict):
    """The CPU budget the engines share (`engine.budget.CpuBudget.summary`)."""

    cores: int
    engines: int
    active_trainers: int
    infer_threads: int
    workers: int
    train_threads: int
    train_slots: int
    train_slots_busy: int
    trainers_waiting: int
    train_duty: float
    push_load: float  # the share of the last second the pushing thread spent pushing
    slot_waits: int
    slot_wait_s: float


class CapacityStatus(TypedDict):
    """Whether the daemon keeps up (`daemon.capacity.CapacityMonitor.snapshot`), plus the skips
    and the budget."""

    over: bool
    load: float
    lag_ms: float
    since: float | None  # wall-clock time it went over, None while within capacity
    over_s: float
    episodes: int
    over_s_total: float
    skipped_while_over: dict[str, int]
    skipped: dict[str, int]  # stream -> preview outputs skipped so far
    budget: BudgetStatus | None  # None off the CPU


class InboxStatus(TypedDict):
    """The byte-bounded queue between the input socket and the main loop, and the thread that
    fills it (``umvd-input``, `daemon.transport.InputReceiver`)."""

    depth: int
    bytes: int
    overflow: int  # messages refused because it was full
    errors: int  # unexpected errors of the input thread's loop (logged; it went on)


class ControlStatus(TypedDict):
    """The control socket: its thread (``umvd-control``, `daemon.transport.ControlServer`) and the
    commands it handed to the frame loop (`daemon.control.ControlHandler`)."""

    waiting: int  # requests taken whose reply is not sent yet
    busy: int  # requests answered ``busy`` at once (too many waiting)
    late: int  # ``status`` replies sent from the last snapshot (the frame loop was late)
    failed: int  # commands that failed, not refusals (answered naming the command and the exception; logged)
    errors: int  # unexpected errors on the control thread (logged; it went on, the client got an error reply)


class RecordingStatus(TypedDict):
    """How a recording is doing (`recording.session.RecorderStatus.to_dict`)."""

    recording: bool
    finished: bool
    files: dict[str, list[str]]  # "cam0" / "cam0.raw" -> paths
    frames_submitted: int
    frames_written: int
    queued_frames: int
    queued_bytes_in_memory: int
    spilled_frames: int
    spilled_total: int
    behind_s: float
    frames_lost: int
    error: str | None


class DaemonStatus(TypedDict):
    """What `daemon.service.Daemon.status` returns."""

    version: str
    uptime_s: float
    #: 0 when made for this request; else the age of the last snapshot, which the control thread
    #: sent because the frame loop did not come to answer within `daemon.service.STATUS_WAIT_S`.
    status_age_s: float
    endpoints: EndpointsStatus
    engine: EngineSettings
    catchup_ms: float
    model_dir: str
    training_paused: bool
    state_dir: StateDirStatus | None
    worker: WorkerStatus
    curve: bool
    streams: dict[str, StreamStatus]
    capacity: CapacityStatus
    rejected_unattributed: dict[str, int]
    inbox: InboxStatus
    control: ControlStatus
    recording: RecordingStatus | None
    commands: list[str]


class StatusReply(DaemonStatus):
    """The control socket's reply to ``{"cmd": "status"}``: the status with ``ok`` (`daemon.control`)."""

    ok: bool
