"""`EngineConfig`: how one engine denoises and learns, as a frozen dataclass that checks itself.

The defaults are written here once: the daemon's configuration holds an `EngineConfig`
(`daemon.config.DaemonConfig.engine`), and the command line leaves a field at its default when
its flag is not given (`apps.cli.engine_config_from_args`). A bad value stops at construction,
with the field's name, rather than at the stream's first frame.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from umvd_live.engine.changes import ChangeConfig
from umvd_live.engine.model import PRESETS
from umvd_live.engine.trainer import TrainerConfig

#: `EngineConfig.device`: a torch device name (`device.pick_device`); auto: a GPU if torch sees one.
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
#: The widest window: the models and priors use 7; each frame more costs G features and D input for
#: every window, and a stream holds N frames before its first output.
MAX_WINDOW = 101
#: The largest seed: a signed 64-bit integer (a larger one overflowed in torch long after start-up).
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class EngineConfig:
    preset: str = "auto"  # auto | lite | fast | paper (`model.resolve_preset`)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    window: int = 7  # frames per window N, odd
    context: tuple[int, ...] | None = None  # context blocks (model.ModelSpec.context); None: the preset's
    # Where the context blocks lie: "past" (a live stream has nothing later) or "both" (recorded
    # movies: training windows and `denoise_frames` take half of each block from after the window).
    context_sides: Literal["past", "both"] = "past"
    warmup_frames: int = 300  # the initial burst the warm start trains on
    warmup_steps: int = 400  # training steps before the output goes live
    train_mode: Literal["inline", "background"] = "inline"
    steps_per_frame: float = 1.0  # inline mode: training steps after each pushed frame
    min_train_frames: int = 32  # training starts once this many frames are buffered
    sync_every: int = 8  # trainer steps between publications of new inference weights
    live_train_duty: float = 0.3  # background mode, once live: the trainer's share of its core
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    changes: ChangeConfig = field(default_factory=ChangeConfig)  # abrupt changes of the acquisition
    adapt_frames: int = 90  # after a change: frames marked `adapting`, trained on harder (3 s at 30 Hz)
    adapt_train_duty: float = 0.6  # background mode: the trainer's share of its core while adapting
    # The amplitude slope restored where the network's outputs measurably shrink the activity (`amplitude`:
    # gain keep / measured slope, never below 1), by a file's final pass and along a live stream; 0: off.
    keep_amplitude: float = 1.0
    # A file's final pass: the outputs' structure at and above this scale (the Gaussian sigma of a
    # smoothing within the sources, pixels; with the filter's two passes about a soma's radius) is
    # blended with a blind temporal mean of the noisy frames where that brings it measurably closer
    # to the truth (`cellblend`); 0: off.
    blend_px: float = 2.0
    # A file's final pass: each output moved with its frame's own rigid jitter, measured on the frame
    # and scaled by how surely the field moves as one (`jitter`).
    follow_jitter: bool = True
    init: str | None = None  # weights from an earlier session: skips the warm start
    prior: str = "auto"  # auto: the shipped prior for the network (`priors`), none, or a model file; init wins
    probe_from_steps: int = 50  # from scratch: the network's output is judged against the mean from this step on
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the hardware has it (`device.uses_bf16`)
    compile: bool = False  # live streams: D's pass through torch.compile, built beside the stream (`compiled`)
    cpu_threads: int | None = None  # torch threads on CPU; None: the CPU budget's share (`budget.divide`)
    max_batch: int | None = None  # windows (and frames through G) per forward pass; None: `device.default_batch`
    workers: int | None = None  # D's forward passes run at once; None: `device.default_workers`
    seed: int = 0

    def __post_init__(self) -> None:
        _choose("preset", self.preset, ("auto", *PRESETS))
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"unknown device {self.device!r}; choose auto, cpu, cuda or cuda:N")
        if not 3 <= self.window <= MAX_WINDOW or self.window % 2 == 0:
            raise ValueError(f"window must be odd, from 3 to {MAX_WINDOW}, got {self.window}")
        if self.context is not None:
            object.__setattr__(self, "context", tuple(self.context))  # a list from a caller: hashable, comparable
            if any(n < 1 for n in self.context):
                raise ValueError(f"context blocks need at least 1 frame each, got {self.context}")
        _choose("context_sides", self.context_sides, ("past", "both"))
        _choose("train_mode", self.train_mode, ("inline", "background"))
        _choose("precision", self.precision, ("auto", "bf16", "fp32"))
        for name in ("warmup_frames", "warmup_steps", "min_train_frames", "adapt_frames", "probe_from_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.steps_per_frame) and self.steps_per_frame >= 0):
            raise ValueError(f"steps_per_frame must be a finite number >= 0, got {self.steps_per_frame}")
        for name in ("sync_every", "cpu_threads", "max_batch", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not (math.isfinite(self.blend_px) and self.blend_px >= 0):
            raise ValueError(f"blend_px is a scale in pixels, finite and >= 0, got {self.blend_px}")
        if not 0.0 <= self.keep_amplitude <= 1.0:
            raise ValueError(f"keep_amplitude is an amplitude slope in [0, 1], got {self.keep_amplitude}")
        for name in ("live_train_duty", "adapt_train_duty"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a share of the time in (0, 1], got {getattr(self, name)}")
        if not isinstance(self.trainer, TrainerConfig) or not isinstance(self.changes, ChangeConfig):
            raise TypeError("trainer and changes must be a TrainerConfig and a ChangeConfig")
        for name in ("compile", "follow_jitter"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} is True or False, got {getattr(self, name)!r}")
        if not self.prior:
            raise ValueError("prior must be auto, none or a model file")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..2**63-1, got {self.seed}")


def _choose(name: str, value: str, names: tuple[str, ...]) -> None:
    if value not in names:
        raise ValueError(f"unknown {name} {value!r}; choose {', '.join(names)}")
