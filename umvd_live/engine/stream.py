"""`StreamDenoiser`: frames in, denoised centre frames out, learning online from the stream.

Data flow: a pushed frame is sanitised and normalised, its G features are computed once and
cached in the sliding window, it joins the frame history whose block means are the network's
long-range context (`window.ContextHistory`), and it joins the trainer's replay buffer. The output for frame t is
ready when frame t + N//2 has arrived; `flush` ends the stream and emits the rest. A stream
starts on a shipped prior (`priors`); until the warm start is done, `BlindReferee` shows the
network's output only while it beats the window's temporal mean (else that mean, marked `warmup`).
Each frame is first tested for an abrupt change of the acquisition (`changes`): a frame that
starts a new segment is treated like a stream's first frame (`_begin_segment`). `push_many` takes several waiting
frames at once and denoises their windows in batched forward passes (`max_batch`), for a GPU,
and runs passes side by side on worker threads (`workers`), for a CPU whose trainer rests
between its steps.

Training runs either inline (a fixed number of steps per pushed frame: reproducible, for files)
or in a background thread (for live streams: `push` then only does inference, so the output keeps
the acquisition's pace). The inference network is a separate copy of the weights; the trainer
publishes new weights every few steps and the pushing thread adopts them between frames, so
inference never sees a half-updated model.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from umvd_live.engine.budget import CpuBudget, CpuShare, cpu_cores
from umvd_live.engine.changes import Change, ChangeConfig, ChangeDetector
from umvd_live.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, weights_hash
from umvd_live.engine.model import PRESETS, ModelSpec, UMVDNet, resolve_preset
from umvd_live.engine.normalization import Normalizer, sanitize
from umvd_live.engine.priors import Prior, find_prior
from umvd_live.engine.trainer import OnlineTrainer, ReplayBuffer, TrainerConfig
from umvd_live.engine.window import ContextHistory, SlidingWindow, block_means, context_blocks, window_indices

log = logging.getLogger(__name__)

#: warmup: a temporal mean (the network is not yet better than it); live: the network's;
#: adapting: the network's, within `adapt_frames` of an abrupt change (`changes`).
State = Literal["warmup", "live", "adapting"]


@dataclass(frozen=True)
class EngineConfig:
    preset: str = "auto"  # auto | lite | fast | paper (`model.resolve_preset`)
    device: str = "auto"  # auto | cpu | cuda
    window: int = 7
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
    init: str | None = None  # weights from an earlier session: skips the warm start
    prior: str = "auto"  # auto: the shipped prior for the network (`priors`), none, or a model file; init wins
    probe_from_steps: int = 50  # from scratch: the network's output is judged against the mean from this step on
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the hardware has it (`uses_bf16`)
    cpu_threads: int | None = None  # torch threads on CPU; None: the CPU budget's share (`budget.divide`)
    max_batch: int | None = None  # windows (and frames through G) per forward pass; None: `default_batch`
    workers: int | None = None  # D's forward passes run at once; None: `default_workers`
    seed: int = 0


@dataclass(frozen=True)
class DenoisedFrame:
    index: int  # 0-based push order of the input frame this output belongs to
    image: np.ndarray | None  # float32 (H, W) in the input's units; None if inference was skipped
    state: State
    model_step: int  # training steps the weights that produced it had seen
    segment: int = 0  # abrupt changes (`changes`) before this frame in the stream


#: Windows per forward pass on a GPU, by default. On a CPU one window at a time: from 256² on, a
#: batch costs as much or more per window there (docs/benchmarks.md, "Batch size and workers").
GPU_BATCH = 16


def default_batch(device: torch.device) -> int:
    return GPU_BATCH if device.type == "cuda" else 1


def default_workers(device: torch.device, train_mode: str, cores: int | None = None) -> int:
    """D's forward passes run at once when several windows are ready: 2 on a CPU of 2 or more
    cores (``cores``: the CPU budget, default `cpu_cores`) that trains in the background, else 1.
    Once live, the trainer rests most of the time
    (`live_train_duty`), and a second pass on its own thread uses the trainer's cores meanwhile:
    at 512² on 2 cores beside the trainer, 23-26 passes/s against 15-16 for one pass on both
    cores (tools/bench_stages.py; docs/benchmarks.md). A GPU batches
    instead (`default_batch`)."""
    cores = cpu_cores() if cores is None else cores
    return 2 if device.type == "cpu" and train_mode == "background" and cores >= 2 else 1


def inference_layout(device: torch.device, train_mode: str, max_batch: int | None = None,
                     workers: int | None = None, cores: int | None = None) -> tuple[int, int]:
    """(windows per forward pass, passes at once): the values given, else the defaults for the
    device and training mode (`default_batch`, `default_workers`). Refuses values below 1."""
    batch = default_batch(device) if max_batch is None else max_batch
    passes = default_workers(device, train_mode, cores) if workers is None else workers
    if batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {batch}")
    if passes < 1:
        raise ValueError(f"workers must be >= 1, got {passes}")
    return batch, passes


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (AVX512-BF16 or AMX on x86-64), where
    oneDNN's bf16 convolutions beat float32: a pass of lite's D at 512² took 56-68 instead of
    80-84 ms on the development machine's AMD EPYC, at the same PSNR (tools/bench_stages.py;
    docs/benchmarks.md). Elsewhere bf16 is
    emulated and buys nothing. torch's own CPU probes answer on every system (Windows included);
    /proc/cpuinfo is the fallback for a torch without them."""
    if not torch.backends.mkldnn.is_available():
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(probe) for probe in probes):
        return any(probe() for probe in probes)
    try:
        with open("/proc/cpuinfo") as f:  # Linux; other systems: no
            return lists_native_bf16(f.read())
    except OSError:
        return False


def lists_native_bf16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's flags name bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether the networks run under bfloat16 autocast: on request, or by default where the
    hardware has bf16 arithmetic: a GPU from Ampere on, or a CPU with AVX512-BF16 or AMX
    (`cpu_has_native_bf16`). Float32 elsewhere, where bf16 is no faster."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; choose auto, bf16 or fp32")
    if precision == "auto":
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return device.type == "cpu" and cpu_has_native_bf16()
    return precision == "bf16"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


#: A live output waiting for its pass: its slot in the batch, t, the window's N feature maps
#: (1, F, H, W) and its context block means (1, M, C, H, W) or None.
_Window = tuple[int, int, list[torch.Tensor], torch.Tensor | None]


@dataclass
class _OutputBatch:
    """The outputs of one `push_many` or `flush` in order; live ones wait with their windows."""

    outputs: list[DenoisedFrame | None] = field(default_factory=list)
    windows: list[_Window] = field(default_factory=list)
    probes: dict[int, "Probe"] = field(default_factory=dict)  # by slot: outputs the referee judges

    def wait(self, t: int, features: list[torch.Tensor], context: torch.Tensor | None,
             probe: "Probe | None" = None) -> None:
        """Frame t's output, to be denoised from its window by `StreamDenoiser._finish`."""
        if probe is not None:
            self.probes[len(self.outputs)] = probe
        self.windows.append((len(self.outputs), t, features, context))
        self.outputs.append(None)


@dataclass(frozen=True)
class Probe:
    """What the referee needs of frame t's window (normalised, (C, H, W)): the noisy centre, the
    mean of its neighbours (a blind estimate, as the network's is) and the mean of the whole window
    (the fallback output)."""

    centre: torch.Tensor
    neighbours: torch.Tensor
    window: torch.Tensor

    @classmethod
    def of(cls, frames: torch.Tensor, k: int) -> "Probe":
        """From (N, C, H, W) window frames whose centre is at position k."""
        total = frames.float().sum(0)
        centre = frames[k].float()
        n = len(frames)
        return cls(centre, (total - centre) / (n - 1), total / n)


class BlindReferee:
    """Whether the network's output beats the temporal mean on this stream, told without truth.

    Both are blind to frame t: its noise is independent of them, so the mean squared distance of
    either to the noisy frame t is its distance to the truth plus the same noise variance, and the
    smaller one is the better estimate (docs/engine.md). The referee keeps a short running mean of
    both and trusts the network while its is smaller: a prior or a young model is used from the
    first frame it beats the mean, and one that is worse than the mean, on data unlike its
    training or after a change, is not shown."""

    def __init__(self, memory: float = 0.7):
        self.memory = memory
        self.network: float | None = None
        self.mean: float | None = None
        self.judged = 0

    @property
    def trusted(self) -> bool:
        return self.network is not None and self.network < self.mean

    def judge(self, network: float, mean: float) -> bool:
        """Score one frame's pair of squared distances; returns whether the network is trusted now."""
        m = self.memory
        self.network = network if self.network is None else m * self.network + (1 - m) * network
        self.mean = mean if self.mean is None else m * self.mean + (1 - m) * mean
        self.judged += 1
        return self.trusted

    def reset(self) -> None:
        self.network = self.mean = None

    def to_dict(self) -> dict:
        return {"trusted": self.trusted, "judged": self.judged, "network_mse": self.network, "mean_mse": self.mean}


def _batched(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the batch; a batch of one is used as it is (no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


class StreamDenoiser:
    """Denoises one stream of equally shaped frames. Not thread-safe: push from one thread.

    ``budget``: the CPU budget this engine shares with others (a daemon's streams,
    `umvd_live.engine.budget`); its threads and its trainer's steps follow the budget's share. Without
    one, the engine has a budget of the machine's cores to itself."""

    def __init__(self, config: EngineConfig | None = None, budget: CpuBudget | None = None):
        self.config = config or EngineConfig()
        if self.config.window < 3 or self.config.window % 2 == 0:
            raise ValueError(f"window must be odd and >= 3, got {self.config.window}")
        self.device = pick_device(self.config.device)
        self.bf16 = uses_bf16(self.config.precision, self.device)
        self.budget = budget if budget is not None else CpuBudget()
        self.max_batch, self.workers = inference_layout(self.device, self.config.train_mode, self.config.max_batch,
                                                        self.config.workers, self.budget.cores)
        self._member: int | None = self.budget.join(f"{self.config.preset} {self.config.train_mode}")
        self._set_threads()
        self._pool: ThreadPoolExecutor | None = None  # made with the network, if workers > 1
        self.k = self.config.window // 2
        self.frames_in = 0
        self.frames_out = 0
        self.shape: tuple[int, int] | None = None
        self.dtype: np.dtype | None = None
        self.normalizer: Normalizer | None = None
        self.preset: str | None = None
        self.spec: ModelSpec | None = None
        self._window = SlidingWindow(self.config.window)
        self._history: ContextHistory | None = None  # made with the network: its context decides its size
        self._replay: ReplayBuffer | None = None
        self._net: UMVDNet | None = None  # inference copy
        self.trainer: OnlineTrainer | None = None
        self._live = False
        self._net_step = 0
        self._paused = False
        self._ended = False
        self._step_credit = 0.0
        self._published: tuple[int, dict] | None = None
        self._publish_lock = threading.Lock()
        self._train_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._train_started: float | None = None
        self.start_hash: str | None = None
        self.prior: Prior | None = None  # the shipped or given weights the stream started on
        self.referee = BlindReferee()  # network or temporal mean, while the network is unproven
        self._detector = ChangeDetector(self.config.changes)
        self.changes: list[Change] = []  # the abrupt changes seen, each starting a segment
        self.segment = 0  # the current segment: len(changes)
        self._segment_start = 0  # index of its first frame

    # -- public state -------------------------------------------------------------------------
    @property
    def state(self) -> State:
        """What the outputs are now: ``warmup`` (the temporal mean), ``live`` or ``adapting`` (the
        network's; adapting within `adapt_frames` of a change). `warm` tells whether the warm
        start is done."""
        if not self._shows_network():
            return "warmup"
        return "adapting" if self.adapting else "live"

    def _probing(self) -> bool:
        """Whether the referee judges the network now: before the warm start is done (if there is a
        prior, or enough steps to hope) and while adapting to a change."""
        if self._net is None or (self._live and not self.adapting):
            return False
        return self._live or self.prior is not None or self._net_step >= self.config.probe_from_steps

    def _shows_network(self) -> bool:
        return self.referee.trusted if self._probing() else self._live

    @property
    def model_step(self) -> int:
        return self.trainer.steps if self.trainer else 0

    @property
    def last_loss(self) -> float | None:
        return self.trainer.last_loss if self.trainer else None

    @property
    def warmup_progress(self) -> float:
        if self._live:
            return 1.0
        c = self.config
        frames = min(self.frames_in / max(c.warmup_frames, 1), 1.0)
        steps = min(self.model_step / max(c.warmup_steps, 1), 1.0)
        return 0.5 * (frames + steps)

    @property
    def warm(self) -> bool:
        """The warm start is done (or weights were loaded): the state worth checkpointing."""
        return self._live

    @property
    def adapting(self) -> bool:
        """Within `adapt_frames` of the last change: the model is catching up, trained harder."""
        return self._adapting_at(self.frames_in)

    @property
    def training_paused(self) -> bool:
        return self._paused

    def pause_training(self) -> None:
        self._paused = True

    def resume_training(self) -> None:
        self._paused = False

    def stats(self) -> dict:
        t = self.trainer
        elapsed = time.monotonic() - self._train_started if self._train_started else 0.0
        return {
            "state": self.state,
            "preset": self.preset,
            "device": str(self.device),
            "precision": "bf16" if self.bf16 else "fp32",
            "window": self.config.window,
            "batch": self.max_batch,
            "workers": self.workers,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "train_steps": t.steps if t else 0,
            "train_steps_per_s": (t.steps / elapsed) if t and elapsed > 0 else 0.0,
            "loss": t.last_loss if t else None,
            "lr": t.lr if t else self.config.trainer.lr,
            "rollbacks": t.rollbacks if t else 0,
            "training_paused": self._paused,
            "warmup_progress": self.warmup_progress,
            "prior": self.prior.to_dict() if self.prior else None,
            "referee": self.referee.to_dict(),
            "segment": self.segment,
            "adapting": self.adapting,
            "changes": [change.to_dict() for change in self.changes[-8:]],
            "cpu_share": self._share().to_dict() if self.device.type == "cpu" else None,
        }

    # -- set-up -------------------------------------------------------------------------------
    def _share(self) -> CpuShare:
        """This engine's share of its CPU budget now (`budget.divide`)."""
        return self.budget.share(self.config.train_mode == "background", self.config.live_train_duty, self._member)

    def _set_threads(self, role: Literal["infer", "train"] = "infer") -> None:
        """Torch threads for the calling thread, from the CPU budget's share (`budget.divide`). In
        background mode on a CPU, inference and training each get half of the budget's cores:
        measured on 2 cores, that beats pausing the trainer during each push
        (docs/benchmarks.md), and it leaves the acquisition its share during the warm start too
        (a trainer on every core then was faster alone and far slower beside other work: OpenMP
        threads that wait on each other). Trainers of several engines share the training half
        (`budget.CpuBudget`). torch's count is per OS thread once that thread has run an
        operation, so each thread sets its own: the pushing thread, the trainer (again at each
        step: the share changes as streams come and go), and each inference worker."""
        if self.device.type != "cpu":
            return
        threads = self.config.cpu_threads
        if threads is None:
            share = self._share()
            threads = share.train_threads if role == "train" else share.infer_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def _start(self, frame: np.ndarray) -> None:
        """Build the network on the first frame: the preset may depend on the frame size."""
        self.shape = frame.shape
        self.dtype = frame.dtype
        state_dict, info = (None, None)
        if self.config.init:
            state_dict, info = load_checkpoint(self.config.init)
        preset = resolve_preset(self.config.preset, self.device, *frame.shape,
                                live=self.config.train_mode == "background")
        if info is not None:
            spec = ModelSpec.from_dict(info["spec"])
            if self.config.preset != "auto" and info.get("preset") != self.config.preset:
                raise CheckpointError(
                    f"{self.config.init}: weights are for preset {info.get('preset')!r}, not {self.config.preset!r}"
                )
            preset = info.get("preset", "custom")
            if spec.window != self.config.window:
                raise CheckpointError(f"{self.config.init}: weights are for N={spec.window}, not {self.config.window}")
            if self.config.context is not None and spec.context != tuple(self.config.context):
                raise CheckpointError(
                    f"{self.config.init}: weights are for context blocks {spec.context}, not {tuple(self.config.context)}"
                )
        else:
            spec = PRESETS[preset](self.config.window)
            if self.config.context is not None:
                spec = replace(spec, context=tuple(self.config.context))
            try:
                self.prior = find_prior(self.config.prior, preset, spec)
            except CheckpointError as exc:
                if self.config.train_mode != "background":
                    raise  # a file: the user hears it and the run stops
                # a live stream must not stall on it: say so, and start from scratch
                log.error("%s; this stream starts from scratch", exc)
            if self.prior is not None:
                state_dict = self.prior.state_dict
                log.info("starting on the prior %s (%s)", self.prior.name, self.prior.sha256[:12])
        self.preset, self.spec = preset, spec
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # a stream's shapes are fixed: pick the fastest kernels once
        torch.manual_seed(self.config.seed)
        train_net = UMVDNet(spec).to(self.device)
        if state_dict is not None:
            train_net.load_state_dict(state_dict)
        train_net = train_net.to(memory_format=torch.channels_last)
        self._net = UMVDNet(spec).to(self.device).to(memory_format=torch.channels_last).eval()
        self._net.load_state_dict(train_net.state_dict())
        self._net.requires_grad_(False)
        tc = self.config.trainer
        frame_bytes = frame.size * 4
        capacity = min(tc.replay_frames, max(tc.replay_bytes // frame_bytes, self.config.window))
        self._replay = ReplayBuffer(self.config.window, capacity, spec.context, self.config.context_sides == "both")
        self._history = ContextHistory(spec.window // 2, spec.context)
        self.trainer = OnlineTrainer(train_net, tc, self.device, seed=self.config.seed, bf16=self.bf16)
        if info is not None:
            self.trainer.steps = int(info.get("step", 0))
            self._net_step = self.trainer.steps
            self._live = True
            log.info("loaded %s (step %d): warm start skipped", self.config.init, self.trainer.steps)
        self.start_hash = weights_hash(train_net.state_dict())
        self.normalizer = Normalizer.fit(frame)
        self._normalizers = [self.normalizer]  # each segment's, by segment
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, "umvd-infer", initializer=self._set_threads)
        self._prepare_kernels()
        if self.config.train_mode == "background":
            self._thread = threading.Thread(target=self._train_loop, name="umvd-trainer", daemon=True)
            self._thread.start()

    # -- streaming ----------------------------------------------------------------------------
    def push(self, frame: np.ndarray, infer: bool = True) -> list[DenoisedFrame]:
        """Add the next frame; return the outputs that became ready (at most one, in order).

        With `infer=False` the frame still joins the window and the replay buffer, but the output
        that becomes ready is returned without an image: a live preview that fell behind skips
        to the newest window this way.
        """
        return self.push_many([frame], [infer])

    def push_many(self, frames: Sequence[np.ndarray], infer: Sequence[bool] | None = None) -> list[DenoisedFrame]:
        """Add several frames in order, as `push` each would; return the outputs that became ready.

        The frames' G features are computed as one batch, and the live windows that become ready
        are denoised as batches of up to `max_batch`, all with the weights in use when the call
        began: a GPU that would idle on one window at a time then works on many. `infer[i]` is
        `push`'s `infer` for frame i (default: all True).
        """
        if self._ended:
            raise RuntimeError("this stream was flushed; start a new StreamDenoiser")
        flags = [True] * len(frames) if infer is None else list(infer)
        if len(flags) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(flags)} infer flags")
        frames = [self._check(frame) for frame in frames]
        if not frames:
            return []
        self._adopt_published_weights()
        self._update_state()
        cleaned = [sanitize(frame) for frame in frames]
        # Tested before normalising; a frame that had NaN/Inf pixels is no evidence of a change
        # (a frame of none, sanitised to a constant, would look like the laser turned off).
        starts = [self._detector.observe(clean) if clean_ok else None for clean, clean_ok in cleaned]
        bounds = [i for i, change in enumerate(starts) if change is not None and i > 0] + [len(frames)]
        outputs: list[DenoisedFrame] = []
        batch = _OutputBatch()
        begin = 0
        for end in bounds:
            if starts[begin] is not None:
                outputs += self._finish(batch)  # the old segment's, under its own normaliser
                batch = _OutputBatch()
                outputs += self._begin_segment(starts[begin], cleaned[begin][0])
            self._append(cleaned[begin:end], flags[begin:end], batch)
            begin = end
        outputs += self._finish(batch)
        if self.config.train_mode == "inline":
            for _ in frames:
                self._train_inline()
        self._update_state()
        return outputs

    def _append(self, cleaned: list[tuple[np.ndarray, bool]], flags: list[bool], batch: _OutputBatch) -> None:
        """Add frames of one segment: their G features as one batch, then each to the window, the
        history and the replay buffer, producing the outputs that become ready into ``batch``."""
        host = torch.stack([torch.from_numpy(self.normalizer.forward(clean)) for clean, _ in cleaned])[:, None]
        xs = host.to(self.device)  # (B, 1, H, W); the replay buffer keeps the host copy
        with torch.inference_mode():
            feats = [f for chunk in xs.split(self.max_batch) for f in self._features(chunk)]
        for x, x_host, f, (_, trainable), wanted in zip(xs, host, feats, cleaned, flags):
            index = self.frames_in
            self._window.append(index, x, f)
            self._history.append(index, x)
            if trainable:
                self._replay.add(index, x_host, self.segment)
            self.frames_in += 1
            if index >= self._segment_start + self.k:
                self._produce(index - self.k, wanted, batch)

    def _begin_segment(self, change: Change, frame: np.ndarray) -> list[DenoisedFrame]:
        """Frame `frames_in` starts a new segment (`changes`): the old segment's last outputs are
        made from its own frames, mirrored at its end as at a stream's end; then the window and
        the context history start again, as at a stream's start, and the normaliser is fitted
        again to the new frame, so the network sees the new scene in the range it knows."""
        change = replace(change, index=self.frames_in)
        batch = _OutputBatch()
        for t in range(self.frames_out, self.frames_in):
            self._produce(t, True, batch)
        outputs = self._finish(batch)
        self._window.clear()
        self._history.clear()
        self.referee.reset()
        self.normalizer = Normalizer.fit(frame)
        self._normalizers.append(self.normalizer)
        self.changes.append(change)
        self.segment += 1
        self._segment_start = change.index
        log.info("frame %d: %s change (level x%.2f, correlation %.2f): a new segment", change.index,
                 change.reason, change.level_ratio, change.correlation)
        return outputs

    def _check(self, frame: np.ndarray) -> np.ndarray:
        """Validate one frame against the stream; the first one builds the network."""
        frame = np.asarray(frame)
        if frame.ndim != 2:
            raise ValueError(f"a frame must be 2-D (H, W), got shape {frame.shape}")
        if frame.dtype.kind not in "uif":
            raise ValueError(f"unsupported frame dtype {frame.dtype}")
        if self._net is None:
            self._start(frame)
        elif frame.shape != self.shape or frame.dtype != self.dtype:
            raise ValueError(
                f"frame {frame.shape} {frame.dtype} differs from the stream's {self.shape} {self.dtype}: "
                "a new shape or dtype needs a new StreamDenoiser"
            )
        return frame

    def flush(self) -> list[DenoisedFrame]:
        """End the stream: the outputs of the last N//2 frames, from mirrored windows."""
        if self._ended or self._net is None:
            self._ended = True
            return []
        self._adopt_published_weights()
        batch = _OutputBatch()
        for t in range(self.frames_out, self.frames_in):
            self._produce(t, True, batch)
        self._ended = True
        return self._finish(batch)

    def _features(self, frames: torch.Tensor) -> torch.Tensor:
        """G's features of (B, C, H, W) frames, channels-last. Under bf16 they stay bf16: D's
        autocast would round them to bf16 again anyway, and the window holds and moves half the
        bytes."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self._net.features(frames.contiguous(memory_format=torch.channels_last))

    def _denoise(self, feats: Sequence[torch.Tensor], context: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self._net.denoise_features(feats, context)

    def _prepare_kernels(self) -> None:
        """Run the inference network on a blank window of the stream's size, on this thread and on
        every worker at once: the first call of each convolution shape prepares its kernels (tens
        of ms on a CPU), and a worker thread's first pass also starts its OpenMP team and fills
        its allocator's pool (the first pair of 512² passes took 0.7 s). That belongs to the start
        of the stream, not to its first live outputs."""
        h, w = self.shape
        with torch.inference_mode():
            feats = self._features(torch.zeros(1, 1, h, w, device=self.device))
        n = len(self.spec.context)
        context = torch.zeros(1, n, 1, h, w, device=self.device) if n else None
        blank: _Window = (0, 0, [feats] * self.spec.window, context)
        self._denoise_chunk([blank])
        if self._pool is not None:
            everyone = threading.Barrier(self.workers, timeout=60)  # no worker takes two of them

            def first_pass(chunk: list[_Window]) -> np.ndarray:
                everyone.wait()
                return self._denoise_chunk(chunk)

            list(self._pool.map(first_pass, [[blank]] * self.workers))

    def _produce(self, t: int, infer: bool, batch: _OutputBatch) -> None:
        """Add frame t's output to `batch`: a live window's feature maps are taken now, while the
        window still holds t's neighbours, and denoised with the others of the batch by `_finish`."""
        self.frames_out += 1
        state: State = "live" if self._shows_network() else "warmup"
        image = None
        if infer:
            if len(self._window) < 2:
                # A single frame cannot be denoised blind: pass it through, marked as warm-up.
                state = "warmup"
                image = self.normalizer.inverse(self._window.frames(t)[0, 0].float().cpu().numpy())
            elif self._probing():
                batch.wait(t, self._window.features(t), self._context(t), Probe.of(self._window.frames(t), self.k))
                return
            elif self._live:
                batch.wait(t, self._window.features(t), self._context(t))
                return
            else:
                image = self.normalizer.inverse(self._window.frames(t).mean(0)[0].float().cpu().numpy())
        if state == "live" and self._adapting_at(t):
            state = "adapting"
        batch.outputs.append(DenoisedFrame(index=t, image=image, state=state, model_step=self._net_step,
                                           segment=self.segment))

    def _adapting_at(self, t: int) -> bool:
        """Whether frame t (of the current segment) is within `adapt_frames` of its change."""
        return self.segment > 0 and t < self._segment_start + self.config.adapt_frames

    def _finish(self, batch: _OutputBatch, normalizer: Normalizer | None = None,
                referee: BlindReferee | None = None) -> list[DenoisedFrame]:
        """Denoise the batch's windows, `max_batch` per forward pass and `workers` passes
        at once, into the units of ``normalizer`` (default: the current segment's); return its
        outputs. Probed windows are judged by ``referee`` (default: the stream's)."""
        outputs = batch.outputs
        normalizer = normalizer or self.normalizer
        step = self.max_batch
        chunks = [batch.windows[start:start + step] for start in range(0, len(batch.windows), step)]
        if self._pool is not None and len(chunks) > 1:
            results = list(self._pool.map(self._denoise_chunk, chunks))
        else:
            results = [self._denoise_chunk(chunk) for chunk in chunks]
        for chunk, images in zip(chunks, results):
            for (slot, t, _, _), image in zip(chunk, images):
                state: State = "adapting" if self._adapting_at(t) else "live"
                probe = batch.probes.get(slot)
                if probe is not None and not self._judge(image, probe, referee or self.referee):
                    image, state = probe.window[0].cpu().numpy(), "warmup"  # the mean: the network lost
                outputs[slot] = DenoisedFrame(index=t, image=normalizer.inverse(image), state=state,
                                              model_step=self._net_step, segment=self.segment)
        return outputs  # type: ignore[return-value]  # every slot is filled now

    @staticmethod
    def _judge(image: np.ndarray, probe: Probe, referee: BlindReferee) -> bool:
        """Whether frame t gets the network's output (normalised ``image``): the referee scores it
        and the neighbours' mean against the noisy centre (`BlindReferee`)."""
        centre = probe.centre[0].cpu().numpy()
        network = float(np.mean(np.square(image - centre)))
        mean = float(np.mean(np.square(probe.neighbours[0].cpu().numpy() - centre)))
        return referee.judge(network, mean)

    def _denoise_chunk(self, chunk: list[_Window]) -> np.ndarray:
        """One forward pass of D over windows -> (B, H, W) normalised images.
        Runs on a worker thread too: inference mode and autocast are per thread, so both are set here."""
        context = _batched([c for *_, c in chunk]) if self.spec.context else None
        feats = [_batched([w[i] for _, _, w, _ in chunk]) for i in range(self.spec.window)]
        with torch.inference_mode():
            y = self._denoise(feats, context)
        return y[:, 0].float().cpu().numpy()

    def _context(self, t: int) -> torch.Tensor | None:
        """The means of the context blocks of the window centred on t, if the network takes them."""
        return self._history.block_means(t) if self.spec.context else None

    def _update_state(self) -> None:
        if self._live or self.trainer is None:
            return
        c = self.config
        if self.frames_in >= c.warmup_frames and self._net_step >= c.warmup_steps:
            self._live = True
            log.info("warm start done after %d frames and %d steps: live", self.frames_in, self._net_step)

    # -- training -----------------------------------------------------------------------------
    def _can_train(self) -> bool:
        return not self._paused and self.frames_in >= min(self.config.min_train_frames, self.config.warmup_frames)

    def _train_steps(self, n: int) -> int:
        done = 0
        with self._train_lock:
            if self._train_started is None:
                self._train_started = time.monotonic()
            for _ in range(n):
                if self.trainer.step(self._replay, self.segment if self.adapting else None) is not None:
                    done += 1
                if self.trainer.steps % self.config.sync_every == 0:
                    self._publish_weights()
        return done

    def _train_inline(self) -> None:
        if not self._can_train():
            return
        c = self.config
        if not self._live and self.frames_in >= c.warmup_frames and self.model_step < c.warmup_steps:
            # The initial burst is in: finish the warm start before going on.
            self._train_steps(c.warmup_steps - self.model_step)
            self._publish_weights()
            self._adopt_published_weights()
            return
        self._step_credit += c.steps_per_frame * (2.0 if self.adapting else 1.0)
        n = int(self._step_credit)
        self._step_credit -= n
        if n:
            self._train_steps(n)

    def _train_loop(self) -> None:
        shared = self.device.type == "cpu"  # on a CPU trainers take turns in the budget's slots
        while not self._stop.is_set():
            self._set_threads("train")
            if not self._can_train() or self._replay is None:
                self._stop.wait(0.01)
                continue
            if shared and not self.budget.acquire(self._member, self._stop):
                break
            try:
                started = time.monotonic()
                done = self._train_steps(1)
                busy = time.monotonic() - started
            finally:
                if shared:
                    self.budget.release(self._member)
            duty = self._share().train_duty if shared else self.config.live_train_duty
            if self.adapting:  # catch up with a change: a larger share for a few seconds
                duty = max(duty, min(1.0, duty * self.config.adapt_train_duty / max(self.config.live_train_duty, 0.01)))
            if done == 0:
                self._stop.wait(0.005)
            elif self._live and duty < 1.0:
                # The training budget: once live, leave the rest of the time to inference and
                # to the acquisition's other work on the machine; the warm start runs flat out.
                # With more active trainers than slots, each one's duty is their share of it.
                self._stop.wait(busy * (1.0 / max(duty, 0.01) - 1.0))

    def train_for(self, steps: int) -> int:
        """Run `steps` training steps now (offline pre-training, tests) and publish the weights."""
        done = self._train_steps(steps)
        self._publish_weights()
        self._adopt_published_weights()
        self._update_state()
        return done

    def _publish_weights(self) -> None:
        state = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}
        with self._publish_lock:
            self._published = (self.trainer.steps, state)

    def _adopt_published_weights(self) -> None:
        with self._publish_lock:
            published, self._published = self._published, None
        if published is None:
            return
        step, state = published
        self._net.load_state_dict(state)
        self._net_step = step
        with torch.inference_mode():
            self._window.refresh(self._features)

    # -- offline use of the same engine --------------------------------------------------------
    def pretrain(self, movie: np.ndarray, steps: int, progress: Callable[[int, float | None], None] | None = None) -> None:
        """The paper's recipe: train on a whole recorded movie before denoising it.

        Frames are not pushed: the movie fills the replay buffer at once, so training sees every
        window of it, cut into the segments that pushing it will find (`changes`), each in its own
        units. The stream then starts live. `progress(steps_done, loss)` is called as it goes.
        """
        if self._net is not None:
            raise RuntimeError("pretrain must be called before the first push")
        movie = np.asarray(movie)
        self._start(movie[0])
        self._replay.capacity = len(movie)
        detector, segment, normalizer = ChangeDetector(self.config.changes), 0, self.normalizer
        for i, frame in enumerate(movie):
            clean, trainable = sanitize(frame)
            if trainable and detector.observe(clean) is not None:  # as `push_many` will see it
                segment, normalizer = segment + 1, Normalizer.fit(clean)
            if trainable:
                self._replay.add(i, torch.from_numpy(normalizer.forward(clean))[None], segment)
        for done in range(0, steps, 50):
            self._train_steps(min(50, steps - done))
            if progress:
                progress(self.model_step, self.last_loss)
        self._replay.clear()
        self._publish_weights()
        self._adopt_published_weights()
        self._live = True

    def denoise_frames(self, movie: np.ndarray, indices: list[int],
                       progress: Callable[[], None] | None = None) -> list[DenoisedFrame]:
        """Denoise frames of an in-memory movie with the newest weights, the trainer's (what
        `save_weights` saves), with the same edge rule. A movie pushed through this engine keeps
        its segments (`changes`): each frame's window and context stay within its segment, in
        that segment's units. `progress()` is called after each output."""
        if self._net is None:
            raise RuntimeError("no model yet: push frames or pretrain first")
        with self._train_lock:
            self._publish_weights()
        self._adopt_published_weights()
        starts = [0] + [change.index for change in self.changes]
        ends = starts[1:] + [len(movie)]
        out: list[DenoisedFrame] = []
        for segment, (first, end) in enumerate(zip(starts, ends)):
            chunk = [t for t in indices if first <= t < end]
            if chunk:
                out += self._denoise_segment(movie, chunk, first, end - 1, segment, progress)
        order = {t: i for i, t in enumerate(indices)}
        return sorted(out, key=lambda o: order[o.index])

    def _denoise_segment(self, movie: np.ndarray, indices: list[int], first: int, last: int,
                         segment: int, progress: Callable[[], None] | None) -> list[DenoisedFrame]:
        normalizer = self._normalizers[segment]
        spans = self.spec.context
        both_sides = self.config.context_sides == "both"
        reach = self.k + sum(spans)
        frames: dict[int, torch.Tensor] = {}  # normalised frames near the current t
        feats: dict[int, torch.Tensor] = {}  # G once per frame, shared by the windows it is in

        def frame(i: int) -> torch.Tensor:
            if i not in frames:
                frames[i] = torch.from_numpy(normalizer.forward(sanitize(movie[i])[0])).to(self.device)[None]
            return frames[i]

        # Each frame is judged alone, blind, as the referee judges a live stream's: where the
        # network's output is farther from the noisy frame than its neighbours' mean is (a frame
        # unlike what the network learned, e.g. a sudden jolt of the sample), the window's mean
        # is output instead (state `warmup`), so no frame comes out worse than that blind mean.
        referee = BlindReferee(memory=0.0)
        out: list[DenoisedFrame] = []
        for start in range(0, len(indices), self.max_batch):
            batch = _OutputBatch()
            chunk = indices[start:start + self.max_batch]
            with torch.inference_mode():
                for t in chunk:
                    idx = window_indices(t, first, last, self.k)
                    for i in idx:
                        if i not in feats:
                            feats[i] = self._features(frame(i)[None])[0]
                    context = None
                    if spans:
                        blocks = context_blocks(t, self.k, spans, lambda j: first <= j <= last, both_sides)
                        context = block_means(blocks, frame)[None]
                    probe = Probe.of(torch.stack([frame(i) for i in idx]), self.k) if len(set(idx)) > 1 else None
                    batch.wait(t, [feats[i][None] for i in idx], context, probe)
            out += [replace(o, segment=segment, state="warmup" if o.state == "warmup" else "live")
                    for o in self._finish(batch, normalizer, referee)]
            for _ in range(len(chunk) if progress else 0):
                progress()
            # What no later window needs can go (indices usually come in order; an evicted
            # frame that is needed again is simply recomputed).
            for cache, keep in ((feats, self.k), (frames, reach)):
                for i in [i for i in cache if i < chunk[-1] - keep]:
                    del cache[i]
        return out

    # -- weights ------------------------------------------------------------------------------
    def weights_hash(self) -> str | None:
        return weights_hash(self.trainer.model.state_dict()) if self.trainer else None

    def save_weights(self, path: str | os.PathLike) -> None:
        if self.trainer is None:
            raise RuntimeError("no model yet: nothing to save before the first frame")
        with self._train_lock:
            state = self.trainer.model.state_dict()
            info = {"preset": self.preset, "spec": self.spec.to_dict(), "step": self.trainer.steps}
            save_checkpoint(path, state, info)

    def load_weights(self, path: str | os.PathLike) -> None:
        """Adopt saved weights mid-stream; they must be for the same network."""
        state, info = load_checkpoint(path)
        if self.trainer is None:
            self.config = replace(self.config, init=str(path))
            return
        if ModelSpec.from_dict(info["spec"]) != self.spec:
            raise CheckpointError(f"{path}: weights are for another network ({info.get('preset')})")
        with self._train_lock:
            self.trainer.model.load_state_dict(state)
            self.trainer.steps = int(info.get("step", self.trainer.steps))
            self._publish_weights()
        self._adopt_published_weights()
        self._live = True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._member is not None:  # the others' shares grow back
            self.budget.leave(self._member)
            self._member = None

    def __enter__(self) -> "StreamDenoiser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
