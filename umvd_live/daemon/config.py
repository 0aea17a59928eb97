"""What `umvd-live serve` is asked to do, as one frozen, self-checking dataclass.

`DaemonConfig` holds the engine's configuration (`EngineConfig`, which checks its own fields) and
the recording to start with, instead of copying their fields: the engine settings the daemon's
status reports are the ones its engines are built from. It checks the daemon's own fields when it
is made, so a bad setting stops start-up with a message rather than the first frame. Flags become
a `DaemonConfig` in `apps/cli.py` only; nothing here knows argparse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from umvd_live.engine import EngineConfig

if TYPE_CHECKING:  # recording.session imports the file writers (tifffile, zarr): only when recording
    from umvd_live.recording.session import RecordingRequest
    from umvd_live.wire.security import CurveServerConfig

#: Default seconds between periodic checkpoints of every live stream (with a state directory).
WEIGHTS_CHECKPOINT_INTERVAL_S = 60.0
#: Default seconds without a frame after which a stream is idle (acquisition stopped).
IDLE_AFTER_S = 10.0


def _background_engine() -> EngineConfig:
    return EngineConfig(train_mode="background")


@dataclass(frozen=True)
class DaemonConfig:
    """The daemon's endpoints, limits and state, its engines' `EngineConfig`, and a recording
    to start with (``serve --record``: the operator's own path, not confined)."""

    #: Every stream's engine is built from this (with the stream's own ``init``); it trains in the
    #: background, so the frame loop never waits for a training step.
    engine: EngineConfig = field(default_factory=_background_engine)
    input_bind: str | None = "tcp://127.0.0.1:5555"  # None: producers are only connected to
    input_connect: tuple[str, ...] = ()
    output: str = "tcp://127.0.0.1:5556"
    control: str = "tcp://127.0.0.1:5557"
    recording: RecordingRequest | None = None
    output_dir: Path = Path(".")
    state_dir: Path | None = None
    ready_file: Path | None = None  # JSON with the bound endpoints, written once they are (`service`)
    max_streams: int = 16
    inbox_bytes: int = 1 << 30
    status_interval_s: float = 5.0
    catchup_s: float = 0.1  # backlog (in estimated inference time) worked through before skipping
    cpu_budget: int | None = None  # cores the engines share (`budget.CpuBudget`); None: the cores it may use
    checkpoint_interval_s: float = WEIGHTS_CHECKPOINT_INTERVAL_S  # with state_dir
    idle_after_s: float = IDLE_AFTER_S  # no frame for this long: the stream is idle
    allow_remote: bool = False  # bind beyond loopback (needs curve)
    curve: CurveServerConfig | None = None

    def __post_init__(self) -> None:
        if self.engine.train_mode != "background":
            raise ValueError("the daemon's engines train in the background (EngineConfig(train_mode='background'))")
        for name, count in (("max_streams", self.max_streams), ("inbox_bytes", self.inbox_bytes)):
            if count < 1:
                raise ValueError(f"{name} must be >= 1, got {count}")
        if self.cpu_budget is not None and self.cpu_budget < 1:
            raise ValueError(f"--cpu-budget must be >= 1, got {self.cpu_budget}")
        for name, value in (("status_interval_s", self.status_interval_s),
                            ("checkpoint_interval_s", self.checkpoint_interval_s),
                            ("idle_after_s", self.idle_after_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 s, got {value}")
        if not self.catchup_s >= 0:
            raise ValueError(f"catchup_s must be >= 0 s, got {self.catchup_s}")

    @property
    def model_dir(self) -> Path:
        """Where `save_model`/`load_model` paths live: the state directory, else the output one."""
        return self.state_dir if self.state_dir is not None else self.output_dir
