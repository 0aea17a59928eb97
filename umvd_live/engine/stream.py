"""`StreamDenoiser`: frames in, denoised centre frames out, learning online from the stream.

Data flow: a pushed frame is sanitised and normalised, its G features are computed once and
cached in the sliding window, it joins the frame history whose block means are the network's
long-range context (`window.ContextHistory`); its isolated impulses are replaced there
(`normalization.ImpulseScreen`), and once the next frame has come it joins the trainer's replay
buffer. The output for frame t is ready when frame t + N//2 has arrived; `flush` ends the stream
and emits the rest. A stream starts on a shipped prior (`priors`); until the warm start is done,
`BlindReferee` shows the network's output only while it beats the window's temporal mean (else
that mean, marked `warmup`).
Each frame is first tested for an abrupt change of the acquisition (`changes`): a frame that
starts a new segment is treated like a stream's first frame (`_begin_segment`). `push_many` takes several waiting
frames at once and denoises their windows in batched forward passes (`max_batch`), for a GPU,
and runs passes side by side on worker threads (`workers`), for a CPU whose trainer rests
between its steps.

This module is the streaming inference. The rest of the engine is beside it: its configuration
(`config`), the device, precision and CPU threads (`device`), the training loop, inline or in
the background, with the weight double-buffer that hands its weights to the inference copy
between frames (`training`), what is returned for each frame and the referee (`outputs`), and a
whole recorded movie at once (`offline`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import torch

from umvd_live.engine import offline
from umvd_live.engine.amplitude import AmplitudeGain, LiveAmplitude
from umvd_live.engine.budget import CpuBudget
from umvd_live.engine.cellblend import CellBlend
from umvd_live.engine.changes import Change, ChangeDetector
from umvd_live.engine.checkpoint import (
    CheckpointError,
    SavedWeights,
    check_fits,
    load_checkpoint,
    read_spec,
    weights_hash,
)
from umvd_live.engine.compiled import CompiledPass
from umvd_live.engine.config import EngineConfig
from umvd_live.engine.device import CpuSeat, inference_layout, pick_device, uses_bf16
from umvd_live.engine.jitter import JitterFollowed, LiveJitter
from umvd_live.engine.model import PRESETS, ModelSpec, RowBand, UMVDNet, resolve_preset, row_bands
from umvd_live.engine.normalization import ImpulseScreen, Normalizer, Screened, measurable, sanitize
from umvd_live.engine.outputs import (
    BlindReferee,
    DenoisedFrame,
    OutputBatch,
    Probe,
    RoundFailed,
    State,
    Window,
    blind_distance,
)
from umvd_live.engine.priors import Prior, find_prior
from umvd_live.engine.trainer import OnlineTrainer, ReplayBuffer
from umvd_live.engine.training import TrainingLoop
from umvd_live.engine.window import ContextHistory, SlidingWindow

log = logging.getLogger(__name__)

T = TypeVar("T")


def _built(part: T | None) -> T:
    """A part of the stream that its first frame builds (`StreamDenoiser._start`)."""
    if part is None:
        raise RuntimeError("the stream has had no frame yet: its first frame builds the network")
    return part


def _has_range(frame: np.ndarray) -> bool:
    """Whether ``frame`` has measurable pixels (`normalization.measurable`) of more than one value
    to fit a normaliser on: a dropped frame is all NaN, a garbled one may be all 1e30, and a
    camera's frame before the shutter opens all one value (fitted on that, the range would be the
    fallback of 1 unit and the whole segment would run in raw units)."""
    values = frame[measurable(frame)] if frame.dtype.kind == "f" else frame
    return values.size > 0 and bool(values.max() > values.min())


def _batched(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the batch; a batch of one is used as it is (no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _run_here(denoise: Callable[[list[Window]], np.ndarray], chunk: list[Window]) -> Future[np.ndarray]:
    """A pass run on the caller's thread, as a finished future like the workers' passes: its
    failure too surfaces when its round is completed."""
    future: Future[np.ndarray] = Future()
    try:
        future.set_result(denoise(chunk))
    except Exception as exc:
        future.set_exception(exc)
    return future


class _LostRounds:
    """The rounds a call lost (`RoundFailed`), gathered so that the call still does all of its
    work: takes every frame, starts the segments its changes start, completes its other rounds.
    Stopped half-way, a stream would skip frames or leave a segment half begun."""

    def __init__(self) -> None:
        self.failures: list[RoundFailed] = []

    def guard(self, complete: Callable[..., list[DenoisedFrame]], *args: Any) -> list[DenoisedFrame]:
        """``complete(*args)``'s outputs; none if its round failed (remembered)."""
        try:
            return complete(*args)
        except RoundFailed as exc:
            self.failures.append(exc)
            return []

    def raise_any(self) -> None:
        """Raise one `RoundFailed` for all the outputs lost, if any were."""
        if self.failures:
            cause = self.failures[0].__cause__ or self.failures[0]
            raise RoundFailed(sum(f.lost for f in self.failures), cause) from cause


@dataclass
class _Round:
    """A batch whose forward passes were started (`StreamDenoiser._submit`): what its outputs
    are completed with, as it was when the passes began."""

    batch: OutputBatch
    chunks: list[list[Window]]  # `max_batch` windows per pass
    passes: list[list[Future[np.ndarray]]]  # each chunk's (B, H, W) normalised images, by row band
    normalizer: Normalizer
    model_step: int

    @property
    def futures(self) -> list[Future[np.ndarray]]:
        """Every pass of the round, band by band."""
        return [p for parts in self.passes for p in parts]


class StreamDenoiser:
    """Denoises one stream of equally shaped frames. Not thread-safe: push from one thread.

    ``budget``: the CPU budget this engine shares with others (a daemon's streams,
    `umvd_live.engine.budget`); its threads and its trainer's steps follow the budget's share. Without
    one, the engine has a budget of the machine's cores to itself."""

    def __init__(self, config: EngineConfig | None = None, budget: CpuBudget | None = None):
        self.config = config or EngineConfig()
        self.device = pick_device(self.config.device)
        self.bf16 = uses_bf16(self.config.precision, self.device)
        self.budget = budget if budget is not None else CpuBudget()
        self.max_batch, self.workers = inference_layout(self.device, self.config.train_mode, self.config.max_batch,
                                                        self.config.workers, self.budget.cores)
        self.seat = CpuSeat(self.budget, self.device, self.config)
        self.seat.set_threads()
        self._pool: ThreadPoolExecutor | None = None  # made with the network, if workers > 1
        self._bands: list[RowBand] = []  # a lone window's pass as row bands side by side (`_submit`)
        self.k = self.config.window // 2
        self.frames_in = 0
        self.frames_out = 0
        self.shape: tuple[int, int] | None = None
        self.dtype: np.dtype | None = None
        self._normalizer: Normalizer | None = None  # the current segment's (`normalizer`)
        self._unfitted = False  # no frame with a range of pixels yet: the normaliser waits for one
        self.preset: str | None = None
        self._spec: ModelSpec | None = None  # the network's (`spec`)
        self._window = SlidingWindow(self.config.window)
        # each frame's impulses, as it comes and once the next has come; with its own units' copy
        # (for the live amplitude) and whether it joins the replay buffer
        self._screen: ImpulseScreen[tuple[np.ndarray | None, bool]] = ImpulseScreen()
        self.pretrain_impulses = 0  # pixels `pretrain` replaced as isolated impulses
        self._history: ContextHistory | None = None  # made with the network: its context decides its size
        self._net: UMVDNet | None = None  # inference copy
        self._pass: CompiledPass | None = None  # D's pass over it, compiled once that is ready
        self.training = TrainingLoop(self.config, self.seat, self)  # trains the other copy
        self._live = False
        self._net_step = 0  # the step of the inference copy's weights
        self._ended = False
        self.start_hash: str | None = None
        self._init_weights: SavedWeights | None = None  # `config.init`'s, if `load_weights` had them already
        self.prior: Prior | None = None  # the shipped or given weights the stream started on
        self.referee = BlindReferee()  # network or temporal mean, while the network is unproven
        self._detector = ChangeDetector(self.config.changes)
        self.changes: list[Change] = []  # the abrupt changes seen, each starting a segment
        self.amplitude_gains: list[AmplitudeGain] = []  # per segment, by the last `denoise_frames`
        self.cell_blends: list[CellBlend] = []  # likewise
        self.jitter_follows: list[JitterFollowed] = []  # likewise
        # live outputs: the activity's amplitude restored as in a file's final pass, running (`amplitude`)
        self._amplitude = LiveAmplitude(self.config.keep_amplitude, self.k) \
            if self.config.keep_amplitude > 0 else None
        # and then moved with their frames' jitter, as a file's (`jitter`)
        self._jitter = LiveJitter() if self.config.follow_jitter else None
        self.segment = 0  # the current segment: len(changes)
        self._segment_start = 0  # index of its first frame
        self._tags: dict[int, object] = {}  # by frame index: the tags of frames whose output is not out yet
        self._running: _Round | None = None  # a round left running by `push_many(wait=False)`
        # Outputs made by a call that then failed (a later pass of it raised): the next call
        # returns them first. Each call gathers its outputs here, so a failure loses only the
        # outputs of the round whose pass failed, never those already made.
        self._undelivered: list[DenoisedFrame] = []
        self._unobserved: list[tuple[int, np.ndarray]] = []  # frames pushed while it ran, for `_amplitude`
        #: Called, on a worker thread, as each pass of a round left running ends: a caller that
        #: waits for its next frames meanwhile can take that round's outputs once it ended
        #: (`round_ended`), not only with its next push (the daemon: its inbox's `wake`).
        self.on_pass_end: Callable[[], None] | None = None

    # -- public state -------------------------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        """The network's widths, depths and context blocks, once the first frame has built it."""
        return _built(self._spec)

    @property
    def normalizer(self) -> Normalizer:
        """The current segment's normaliser, fitted on its first frame."""
        return _built(self._normalizer)

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
    def trainer(self) -> OnlineTrainer | None:
        """The trainer of the network, once the first frame has built it."""
        return self.training.trainer

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
    def round_ended(self) -> bool:
        """A round left running (`push_many` with ``wait=False``) has ended its passes:
        `push_many([])` hands out its outputs without waiting."""
        running = self._running
        return running is not None and all(f.done() for f in running.futures)

    @property
    def training_paused(self) -> bool:
        return self.training.paused

    def pause_training(self) -> None:
        self.training.paused = True

    def resume_training(self) -> None:
        self.training.paused = False

    def stats(self) -> dict:
        t = self.trainer
        return {
            "state": self.state,
            "preset": self.preset,
            "device": str(self.device),
            "precision": "bf16" if self.bf16 else "fp32",
            "compiled": self._pass.state if self._pass is not None else None,  # engine.compiled.CompiledPass
            "window": self.config.window,
            "batch": self.max_batch,
            "workers": self.workers,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "train_steps": t.steps if t else 0,
            "train_steps_per_s": self.training.steps_per_s,
            "push_load": round(self.budget.push_load.utilisation(), 3),
            "loss": t.last_loss if t else None,
            "lr": t.lr if t else self.config.trainer.lr,
            "rollbacks": t.rollbacks if t else 0,
            "impulses": self._screen.impulses + self.pretrain_impulses,
            "failed_steps": self.training.failed_steps,
            "training_paused": self.training.paused,
            "warmup_progress": self.warmup_progress,
            "prior": self.prior.to_dict() if self.prior else None,
            "referee": self.referee.to_dict(),
            "segment": self.segment,
            "adapting": self.adapting,
            "changes": [change.to_dict() for change in self.changes[-8:]],
            "amplitude": self._amplitude.to_dict() if self._amplitude is not None else None,
            "jitter": self._jitter.to_dict() if self._jitter is not None else None,
            "cpu_share": self.seat.share().to_dict() if self.device.type == "cpu" else None,
        }

    # -- set-up -------------------------------------------------------------------------------
    def _start(self, frame: np.ndarray) -> None:
        """Build the network on the first frame: the preset may depend on the frame size."""
        self.shape = frame.shape
        self.dtype = frame.dtype
        state_dict, info = (None, None)
        if self._init_weights is not None:  # given to `load_weights` before this frame: not read again
            state_dict, info = self._init_weights.state_dict, self._init_weights.info
            self._init_weights = None
        elif self.config.init:
            state_dict, info = load_checkpoint(self.config.init)
        height, width = frame.shape
        preset = resolve_preset(self.config.preset, self.device, height, width,
                                live=self.config.train_mode == "background")
        if info is not None:
            spec = read_spec(info, str(self.config.init))
            if self.config.preset != "auto" and info.get("preset") != self.config.preset:
                raise CheckpointError(
                    f"{self.config.init}: weights are for preset {info.get('preset')!r}, not {self.config.preset!r}"
                )
            preset = info.get("preset", "custom")
            if spec.window != self.config.window:
                raise CheckpointError(f"{self.config.init}: weights are for N={spec.window}, not {self.config.window}")
            if self.config.context is not None and spec.context != tuple(self.config.context):
                raise CheckpointError(f"{self.config.init}: weights are for context blocks {spec.context}, "
                                      f"not {tuple(self.config.context)}")
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
        self.preset, self._spec = preset, spec
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # a stream's shapes are fixed: pick the fastest kernels once
        torch.manual_seed(self.config.seed)
        train_net = UMVDNet(spec).to(self.device)
        if state_dict is not None:
            try:  # a file whose spec fits may still hold other tensors: refused before any is copied
                check_fits(state_dict, train_net.state_dict())
            except CheckpointError as exc:
                source = self.config.init or (self.prior.name if self.prior is not None else "the prior")
                if self.config.init or self.config.train_mode != "background":
                    raise CheckpointError(f"{source}: {exc}") from None
                log.error("%s: %s; this stream starts from scratch", source, exc)  # as for a prior of another network
                self.prior, state_dict = None, None
        if state_dict is not None:
            train_net.load_state_dict(state_dict)
        # (torch's stubs leave out Module.to's memory_format, which it takes: hence the ignores)
        train_net = train_net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        net: UMVDNet = UMVDNet(spec).to(self.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._net = net.eval()
        net.load_state_dict(train_net.state_dict())
        net.requires_grad_(False)
        # compiled for one window per pass: a live stream's (a file's passes are batched)
        self._pass = CompiledPass(net.denoise_features,
                                  self.config.compile and self.config.train_mode == "background")
        tc = self.config.trainer
        frame_bytes = frame.size * 4
        capacity = min(tc.replay_frames, max(tc.replay_bytes // frame_bytes, self.config.window))
        replay = ReplayBuffer(self.config.window, capacity, spec.context, self.config.context_sides == "both")
        self._history = ContextHistory(spec.window // 2, spec.context)
        trainer = OnlineTrainer(train_net, tc, self.device, seed=self.config.seed, bf16=self.bf16)
        if info is not None:
            trainer.steps = int(info.get("step", 0))
            self._net_step = trainer.steps
            self._live = True
            log.info("loaded %s (step %d): warm start skipped", self.config.init, trainer.steps)
        self.start_hash = weights_hash(train_net.state_dict())
        self._normalizer = Normalizer.fit(frame)
        self._normalizers = [self._normalizer]  # each segment's, by segment
        self._unfitted = not _has_range(frame)
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, "umvd-infer", initializer=self.seat.set_threads)
        # A lone window (a live stream that keeps up) takes one pass of D: cut in as many row
        # bands as workers, it takes both cores of a small CPU where one would do it all
        # (docs/engine.md, "Batches, workers and arithmetic").
        # A compiled pass (``--compile``) runs whole: it is built for the whole frame's shape.
        if self._pool is not None and self._pass.state == "off":
            bands = row_bands(spec, height, self.workers)
            self._bands = bands if len(bands) > 1 else []
        self._prepare_kernels()
        self.training.begin(trainer, replay)

    # -- streaming ----------------------------------------------------------------------------
    def push(self, frame: np.ndarray, infer: bool = True, tag: object = None) -> list[DenoisedFrame]:
        """Add the next frame; return the outputs that became ready (at most one, in order).

        With `infer=False` the frame still joins the window and the replay buffer, but the output
        that becomes ready is returned without an image: a live preview that fell behind skips
        to the newest window this way. ``tag`` comes back, untouched, as this frame's output's
        `DenoisedFrame.tag` (e.g. the frame's header), whenever that output is ready: the caller
        need not match outputs to inputs itself.
        """
        return self.push_many([frame], [infer], [tag])

    def push_many(self, frames: Sequence[np.ndarray], infer: Sequence[bool] | None = None,
                  tags: Sequence[object] | None = None, wait: bool = True) -> list[DenoisedFrame]:
        """Add several frames in order, as `push` each would; return the outputs that became ready.

        The frames' G features are computed as one batch, and the live windows that become ready
        are denoised as batches of up to `max_batch`, all with the weights in use when the call
        began: a GPU that would idle on one window at a time then works on many. `infer[i]` and
        `tags[i]` are `push`'s `infer` and `tag` for frame i (default: all True, all None).

        ``wait=False`` (with `workers` > 1): the windows' passes are left running on the workers
        and their outputs come, in order, from the next call (or `flush`), so that the caller's
        thread takes the next frames while the workers denoise these: a stream that fell behind
        catches up faster on a small CPU (docs/engine.md, "Passes left running"). The daemon asks
        for it only when more frames are already waiting; at most one round is left running.
        """
        if self._ended:
            raise RuntimeError("this stream was flushed; start a new StreamDenoiser")
        flags = [True] * len(frames) if infer is None else list(infer)
        if len(flags) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(flags)} infer flags")
        labels: list[object] = [None] * len(frames) if tags is None else list(tags)
        if len(labels) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(labels)} tags")
        frames = [self._check(frame) for frame in frames]
        if not frames:
            outputs = self._undelivered
            if wait:
                outputs += self._complete_running()
            return self._delivered(outputs)
        started = time.monotonic()
        try:
            return self._push_checked(frames, flags, labels, wait)
        finally:
            self.budget.push_load.record(started, time.monotonic(), behind=len(frames) > 1 or not all(flags))

    def _push_checked(self, frames: list[np.ndarray], flags: list[bool], labels: list[object],
                      wait: bool) -> list[DenoisedFrame]:
        self._adopt_published_weights()
        self._update_state()
        self._fit_normalizer(frames)
        cleaned = [sanitize(frame) for frame in frames]
        # Tested before normalising; a frame that had bad pixels (NaN, Inf, 1e30) is no evidence
        # of a change (a frame of none, sanitised to a constant, would look like the laser turned
        # off; one pixel of 1e30 overflowed the detector's correlation: a false "content" change).
        starts = [self._detector.observe(clean) if clean_ok else None for clean, clean_ok in cleaned]
        bounds = [i for i, change in enumerate(starts) if change is not None and i > 0] + [len(frames)]
        outputs = self._undelivered  # grows in place: what a failure below leaves made is kept
        lost = _LostRounds()
        if any(change is not None for change in starts):
            outputs += lost.guard(self._complete_running)  # completed in its own segment's state
        batch = OutputBatch()
        begin = 0
        for end in bounds:
            change = starts[begin]
            if change is not None:
                outputs += lost.guard(self._finish, batch)  # the old segment's, under its own normaliser
                batch = OutputBatch()
                outputs += lost.guard(self._begin_segment, change, cleaned[begin][0])
            self._append(cleaned[begin:end], flags[begin:end], labels[begin:end], batch)
            begin = end
        # Left running if asked and there is a pass to run (outputs that need none wait for none).
        defer = not wait and self._pool is not None and bool(batch.windows)
        # This round is kept before the round before is completed: a failure of that one must
        # not lose this one's outputs, nor leave its passes running untracked.
        before, self._running = self._running, self._submit(batch, on_workers=defer)
        if defer:
            for future in self._running.futures:
                future.add_done_callback(functools.partial(self._pass_ended, time.monotonic()))
        if before is not None:
            outputs += lost.guard(self._complete, before)  # done while G ran on these frames
        self._observe_deferred()
        if not defer:
            outputs += lost.guard(self._complete_running)
        if self.config.train_mode == "inline":
            for _ in frames:
                if self.training.after_push():
                    self._adopt_published_weights()
        self._update_state()
        lost.raise_any()  # what was made waits in `_undelivered` for the next call
        return self._delivered(outputs)

    def _delivered(self, outputs: list[DenoisedFrame]) -> list[DenoisedFrame]:
        """``outputs`` (gathered in `_undelivered`), handed out: the next call gathers afresh."""
        self._undelivered = []
        return outputs

    def _fit_normalizer(self, frames: Iterable[np.ndarray]) -> None:
        """Fit the first segment's normaliser on the first of ``frames`` with a range of measurable
        pixels (`_has_range`), if the stream has had none: fitted on a dropped (all-NaN) or
        constant first frame, it would be (0, 1) and the whole segment would run in raw units."""
        if not self._unfitted:
            return
        for frame in frames:
            if _has_range(frame):
                self._normalizer = self._normalizers[0] = Normalizer.fit(frame)
                self._unfitted = False
                return

    def _append(self, cleaned: list[tuple[np.ndarray, bool]], flags: list[bool], tags: list[object],
                batch: OutputBatch) -> None:
        """Add frames of one segment: their G features as one batch, then each to the window, the
        history and the replay buffer, producing the outputs that become ready into ``batch``."""
        host = torch.stack([torch.from_numpy(self.normalizer.forward(clean)) for clean, _ in cleaned])[:, None]
        xs = host.to(self.device)  # (B, 1, H, W); the replay buffer keeps the host copy
        with torch.inference_mode():
            feats = [f for chunk in xs.split(self.max_batch) for f in self._features(chunk)]
        for x, x_host, f, (clean, trainable), wanted, tag in zip(xs, host, feats, cleaned, flags, tags):
            index = self.frames_in
            if tag is not None:
                self._tags[index] = tag
            self._window.append(index, x, f)
            _built(self._history).append(index, x)
            # the live amplitude's and jitter's own float32 copy (the caller may reuse its frame), made once
            needs_copy = self._amplitude is not None or (self._jitter is not None and self._jitter.follows(clean))
            own_units = np.array(clean, np.float32) if needs_copy else None
            tested, newest = self._screen.add(index, x_host[0].numpy(), (own_units, trainable))
            self._screened(tested)
            self._show(newest)
            self.frames_in += 1
            if index >= self._segment_start + self.k:
                self._produce(index - self.k, wanted, batch)

    def _show(self, tested: Screened[tuple[np.ndarray | None, bool]]) -> None:
        """Hold a frame as the impulse screen (`ImpulseScreen`) tested it, where the window and the
        context history hold another copy: with its features, before any output's context holds it."""
        if tested.reshow:
            x = torch.from_numpy(tested.frame)[None].to(self.device)
            with torch.inference_mode():
                self._window.replace(tested.index, x, self._features(x[None])[0])
            _built(self._history).replace(tested.index, x)

    def _screened(self, tested: Screened[tuple[np.ndarray | None, bool]] | None) -> None:
        """A frame tested for impulses for good (`ImpulseScreen`): held so in the window and the
        context history (`_show`); then it joins the replay buffer and the live amplitude's sums."""
        if tested is None:
            return
        self._show(tested)
        index = tested.index
        own_units, trainable = tested.held
        if tested.replaced and own_units is not None:
            own_units = self.normalizer.inverse(tested.frame)
        if trainable:
            _built(self.training.replay).add(index, torch.from_numpy(tested.frame)[None], self.segment)
        if self._jitter is not None and own_units is not None:  # a copy where the amplitude's sums change theirs
            self._jitter.observe(index, own_units, copy=self._amplitude is not None)
        if self._amplitude is not None and own_units is not None:
            if self._running is None:
                self._amplitude.observe(index, own_units)
            else:  # observed once the running round is restored: the order of waiting pushes
                self._unobserved.append((index, own_units))

    def _begin_segment(self, change: Change, frame: np.ndarray) -> list[DenoisedFrame]:
        """Frame `frames_in` starts a new segment (`changes`): the old segment's last outputs are
        made from its own frames, mirrored at its end as at a stream's end; then the window and
        the context history start again, as at a stream's start, and the normaliser is fitted
        again to the new frame, so the network sees the new scene in the range it knows."""
        self._screened(self._screen.end())  # the old segment's last frame, tested against its own
        change = replace(change, index=self.frames_in)
        batch = OutputBatch()
        for t in range(self.frames_out, self.frames_in):
            self._produce(t, True, batch)
        lost = _LostRounds()
        outputs = lost.guard(self._finish, batch)  # lost or not, the new segment begins
        if self._amplitude is not None:
            self._amplitude.reset()
        if self._jitter is not None:
            self._jitter.reset()
        self._window.clear()
        _built(self._history).clear()
        self.referee.reset()
        self._normalizer = Normalizer.fit(frame)
        self._normalizers.append(self._normalizer)
        self.changes.append(change)
        self.segment += 1
        self._segment_start = change.index
        log.info("frame %d: %s change (level x%.2f, correlation %.2f): a new segment", change.index,
                 change.reason, change.level_ratio, change.correlation)
        lost.raise_any()
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
        if self._ended or self._net is None:  # (after a failed flush: the outputs it had made)
            self._ended = True
            return self._delivered(self._undelivered)
        outputs = self._undelivered
        lost = _LostRounds()
        outputs += lost.guard(self._complete_running)
        self._adopt_published_weights()
        self._screened(self._screen.end())
        batch = OutputBatch()
        for t in range(self.frames_out, self.frames_in):
            self._produce(t, True, batch)
        self._ended = True
        outputs += lost.guard(self._finish, batch)
        lost.raise_any()
        return self._delivered(outputs)

    def _features(self, frames: torch.Tensor) -> torch.Tensor:
        """G's features of (B, C, H, W) frames, channels-last. Under bf16 they stay bf16: D's
        autocast would round them to bf16 again anyway, and the window holds and moves half the
        bytes. Where D's pass is cut in bands, G's is too, side by side."""
        frames = frames.contiguous(memory_format=torch.channels_last)
        pool = self._idle_pool()
        if pool is None or not self._bands:
            return self._band_features(frames)
        reach, height = self.spec.g_layers, frames.shape[-2]
        bands = [RowBand.around(b.lo, b.hi, reach, height) for b in self._bands]
        parts = [pool.submit(self._band_features, frames, band) for band in bands[1:]]
        first = self._band_features(frames, bands[0])
        return torch.cat([first, *(part.result() for part in parts)], 2)

    def _idle_pool(self) -> ThreadPoolExecutor | None:
        """The inference workers, where none has a pass to run (else None): the frame loop's side
        work (G's bands, half of a restoration) would wait behind a round left running."""
        if self._pool is None or (self._running is not None and not self.round_ended):
            return None
        return self._pool

    def _band_features(self, frames: torch.Tensor, band: RowBand | None = None) -> torch.Tensor:
        """G's features of ``band``'s rows of the frames (all of them by default). Runs on a
        worker thread too: inference mode and autocast are per thread, so both are set here."""
        with torch.inference_mode(), self._autocast():
            if band is None:
                return _built(self._net).features(frames)
            return band.crop(_built(self._net).features(frames[..., band.start:band.stop, :]))

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _denoise(self, feats: Sequence[torch.Tensor], context: torch.Tensor | None) -> torch.Tensor:
        assert self._pass is not None
        with self._autocast():
            return self._pass(feats, context)

    def _prepare_kernels(self) -> None:
        """Run the inference network on a blank window of the stream's size, each thread the passes
        it will run (`_submit`): the first call of each convolution shape prepares its kernels (tens
        of ms on a CPU), and a thread's first pass also fills its allocator's pool (the first pair
        of 512² passes took 0.7 s). That belongs to the start of the stream, not to its first live
        outputs. The workers and this thread warm up side by side, each once per shape: frames
        arriving meanwhile wait, so the start is the first outputs' latency (at 512² on 2 cores,
        a start of 126-143 ms instead of 194-249 when this thread also ran whole windows' passes
        and every band, before the workers; docs/benchmarks.md)."""
        h, w = _built(self.shape)
        spec = self.spec
        with torch.inference_mode():
            feats = self._features(torch.zeros(1, 1, h, w, device=self.device))
        n = len(spec.context)
        context = torch.zeros(1, n, 1, h, w, device=self.device) if n else None
        blank: Window = (0, 0, [feats] * spec.window, context)
        if not self._bands or self.max_batch > 1:  # passes of whole windows run on this thread too
            self._denoise_chunk([blank])
        # distinct tensors, as a live window has: inputs that alias each other would compile a
        # graph whose guards every real window fails (a second compilation, on the frame loop)
        _built(self._pass).start(lambda: ([feats.clone() for _ in range(spec.window)], context), self._autocast)
        if self._pool is not None:
            everyone = threading.Barrier(self.workers, timeout=60)  # no worker takes two of them
            band_shapes = list({band.stop - band.start: band for band in self._bands}.values())

            def first_pass(chunk: list[Window]) -> np.ndarray:
                everyone.wait()
                for band in band_shapes:  # a band's shape is a shape of its own
                    self._denoise_chunk(chunk, band)
                return self._denoise_chunk(chunk)

            warming = [self._pool.submit(first_pass, [blank]) for _ in range(self.workers)]
            if self._bands:  # beside them, the one pass of a lone window this thread runs (`_submit`)
                self._denoise_chunk([blank], self._bands[0])
            for future in warming:
                future.result()

    def _produce(self, t: int, infer: bool, batch: OutputBatch) -> None:
        """Add frame t's output to `batch`: a live window's feature maps are taken now, while the
        window still holds t's neighbours, and denoised with the others of the batch by `_finish`."""
        self.frames_out += 1
        tag = self._tags.pop(t, None)
        state: State = "live" if self._shows_network() else "warmup"
        image = None
        if infer:
            if len(self._window) < 2:
                # A single frame cannot be denoised blind: pass it through, marked as warm-up.
                state = "warmup"
                image = self.normalizer.inverse(self._window.frames(t)[0, 0].float().cpu().numpy())
            elif self._probing():
                probe = Probe.of(self._window.frame_list(t), self.k)
                batch.wait(t, self._window.features(t), self._context(t), probe, tag)
                return
            elif self._live:
                batch.wait(t, self._window.features(t), self._context(t), tag=tag)
                return
            else:
                image = self.normalizer.inverse(self._window.frames(t).mean(0)[0].float().cpu().numpy())
        if state == "live" and self._adapting_at(t):
            state = "adapting"
        batch.outputs.append(DenoisedFrame(index=t, image=image, state=state, model_step=self._net_step,
                                           segment=self.segment, tag=tag))

    def _adapting_at(self, t: int) -> bool:
        """Whether frame t (of the current segment) is within `adapt_frames` of its change."""
        return self.segment > 0 and t < self._segment_start + self.config.adapt_frames

    def _finish(self, batch: OutputBatch, normalizer: Normalizer | None = None,
                referee: BlindReferee | None = None, live: bool = True) -> list[DenoisedFrame]:
        """Denoise the batch's windows, `max_batch` per forward pass and `workers` passes
        at once, into the units of ``normalizer`` (default: the current segment's); return its
        outputs. Probed windows are judged by ``referee`` (default: the stream's). ``live``: the
        stream's own outputs, whose amplitude is restored as they come (a file's final pass
        restores its own, `offline`)."""
        return self._complete(self._submit(batch, normalizer), referee, live)

    def _submit(self, batch: OutputBatch, normalizer: Normalizer | None = None,
                on_workers: bool = False) -> _Round:
        """Start the batch's passes, `max_batch` windows each: on the workers where there are
        several passes (side by side) or ``on_workers`` (beside the caller), else here, now. A
        lone window's pass runs as row bands side by side where the frame has them (`_bands`)."""
        step = self.max_batch
        chunks = [batch.windows[start:start + step] for start in range(0, len(batch.windows), step)]
        passes: list[list[Future[np.ndarray]]]
        if self._pool is not None and len(chunks) == 1 and len(chunks[0]) == 1 and self._bands:
            # A lone window: its bands side by side, the first here unless it is left running.
            chunk = chunks[0]
            parts = [self._pool.submit(self._denoise_chunk, chunk, band) for band in self._bands[1:]]
            first = self._bands[0]
            here = self._pool.submit(self._denoise_chunk, chunk, first) if on_workers \
                else _run_here(lambda c: self._denoise_chunk(c, first), chunk)
            passes = [[here, *parts]]
        elif self._pool is not None and (on_workers or len(chunks) > 1):
            passes = [[self._pool.submit(self._denoise_chunk, chunk)] for chunk in chunks]
        else:
            passes = [[_run_here(self._denoise_chunk, chunk)] for chunk in chunks]
        return _Round(batch, chunks, passes, normalizer or self.normalizer, self._net_step)

    def _pass_ended(self, started: float, _: Future[np.ndarray]) -> None:
        """(On a worker.) A pass left running ended: its time counts as the frame loop's in the
        budget's load, which the trainer yields to (a push that returns at once would hide it),
        and `on_pass_end` hears of it."""
        self.budget.push_load.record(started, time.monotonic())
        if self.on_pass_end is not None:
            self.on_pass_end()

    def _complete_running(self) -> list[DenoisedFrame]:
        """The outputs of the round `push_many(wait=False)` left running, once its passes end."""
        running, self._running = self._running, None
        try:
            return self._complete(running) if running is not None else []
        finally:
            self._observe_deferred()

    def _observe_deferred(self) -> None:
        """The live gain sees the frames pushed while a round ran only after that round's outputs
        were restored, as it would have had the push waited: the same gains, the same outputs."""
        if self._amplitude is not None:
            for index, clean in self._unobserved:
                self._amplitude.observe(index, clean)
        self._unobserved.clear()

    def _complete(self, run: _Round, referee: BlindReferee | None = None, live: bool = True) -> list[DenoisedFrame]:
        """The round's outputs in order, once its passes end (`_finish` has the arguments)."""
        batch, normalizer = run.batch, run.normalizer
        outputs = batch.outputs
        networks: set[int] = set()  # the slots of the network's own outputs
        try:
            results = [np.concatenate([p.result() for p in parts], 1) if len(parts) > 1 else parts[0].result()
                       for parts in run.passes]
        except Exception as exc:
            wait_for(run.futures)  # none of its passes left running beside the next round
            raise RoundFailed(len(outputs), exc) from exc
        for chunk, images in zip(run.chunks, results):
            for (slot, t, _, _), image in zip(chunk, images):
                state: State = "adapting" if self._adapting_at(t) else "live"
                probe = batch.probes.get(slot)
                if probe is not None and not self._judge(image, probe, referee or self.referee):
                    image, state = probe.window[0].cpu().numpy(), "warmup"  # the mean: the network lost
                else:
                    networks.add(slot)
                outputs[slot] = DenoisedFrame(index=t, image=normalizer.inverse(image), state=state,
                                              model_step=run.model_step, segment=self.segment,
                                              tag=batch.tags.get(slot))
        done = [o for o in outputs if o is not None]
        if len(done) != len(outputs):
            raise RuntimeError(f"{len(outputs) - len(done)} outputs of the batch were never made")
        if live and self._amplitude is not None:
            for slot, o in enumerate(done):
                gain = self._amplitude.restore(o.index, o.image, network=slot in networks, pool=self._idle_pool())
                if gain != 1.0:
                    done[slot] = replace(o, amplitude_gain=gain)
        if live and self._jitter is not None:  # last, as in a file's final pass
            for slot, o in enumerate(done):
                shift = self._jitter.follow(o.index, o.image, network=slot in networks)
                if shift is not None:
                    done[slot] = replace(o, jitter_shift_px=shift)
        return done

    @staticmethod
    def _judge(image: np.ndarray, probe: Probe, referee: BlindReferee) -> bool:
        """Whether frame t gets the network's output (normalised ``image``): the referee scores it
        and the neighbours' mean against the noisy centre (`BlindReferee`)."""
        centre = probe.centre[0].cpu().numpy()
        return referee.judge(blind_distance(image, centre), blind_distance(probe.neighbours[0].cpu().numpy(), centre))

    def _denoise_chunk(self, chunk: list[Window], band: RowBand | None = None) -> np.ndarray:
        """One forward pass of D over windows -> (B, H, W) normalised images; of ``band``'s rows
        only, from its input rows (`model.row_bands`), where given.
        Runs on a worker thread too: inference mode and autocast are per thread, so both are set here."""
        context = None
        if self.spec.context:
            contexts = [c for *_, c in chunk if c is not None]
            if len(contexts) != len(chunk):
                raise ValueError("a network with context blocks needs them with every window")
            context = _batched(contexts)
        feats = [_batched([w[i] for _, _, w, _ in chunk]) for i in range(self.spec.window)]
        if band is not None:
            feats = [f[..., band.start:band.stop, :] for f in feats]
            context = None if context is None else context[..., band.start:band.stop, :]
        with torch.inference_mode():
            y = self._denoise(feats, context)
            if band is not None:
                y = band.crop(y)
        return y[:, 0].float().cpu().numpy()

    def _context(self, t: int) -> torch.Tensor | None:
        """The means of the context blocks of the window centred on t, if the network takes them."""
        return _built(self._history).block_means(t) if self.spec.context else None

    def _update_state(self) -> None:
        if self._live or self.trainer is None:
            return
        c = self.config
        if self.frames_in >= c.warmup_frames and self._net_step >= c.warmup_steps:
            self._live = True
            log.info("warm start done after %d frames and %d steps: live", self.frames_in, self._net_step)

    # -- training ------------------------------------------------------------------------------
    def train_for(self, steps: int) -> int:
        """Run `steps` training steps now (offline pre-training, tests) and publish the weights."""
        done = self.training.run(steps)
        self.training.publish()
        self._adopt_published_weights()
        self._update_state()
        return done

    def _adopt_published_weights(self) -> None:
        """Take the trainer's newest published weights into the inference copy, if there are any
        (`training.TrainingLoop.publish`), and the window's features with them."""
        published = self.training.take_published()
        if published is None:
            return
        if self._running is not None:
            wait_for(self._running.futures)  # a pass still running must not see its weights change
        step, state = published
        _built(self._net).load_state_dict(state)
        self._net_step = step
        with torch.inference_mode():
            self._window.refresh(self._features)

    # -- offline use of the same engine (`offline`) ------------------------------------------
    def pretrain(self, movie: np.ndarray, steps: int,
                 progress: Callable[[int, float | None], None] | None = None) -> None:
        """The paper's recipe: train on a whole recorded movie before denoising it.

        Frames are not pushed: the movie fills the replay buffer at once, so training sees every
        window of it, cut into the segments that pushing it will find (`changes`), each in its own
        units. The stream then starts live. `progress(steps_done, loss)` is called as it goes.
        """
        offline.pretrain(self, movie, steps, progress)

    def denoise_frames(self, movie: np.ndarray, indices: list[int],
                       progress: Callable[[], None] | None = None) -> list[DenoisedFrame]:
        """Denoise frames of an in-memory movie with the newest weights, the trainer's (what
        `save_weights` saves), with the same edge rule. A movie pushed through this engine keeps
        its segments (`changes`): each frame's window and context stay within its segment, in
        that segment's units. `progress()` is called after each output."""
        return offline.denoise_frames(self, movie, indices, progress)

    # -- weights ------------------------------------------------------------------------------
    def weights_hash(self) -> str | None:
        """The trainer's weights now, taken between two of its steps (never half updated)."""
        return weights_hash(self.training.snapshot()[1]) if self.trainer else None

    def save_weights(self, path: str | os.PathLike, info: Mapping[str, Any] | None = None) -> tuple[int, str]:
        """Write the trainer's weights, with ``info`` beside the network's own (the daemon names the
        stream a file belongs to); returns the step and the weights hash of what was written."""
        weights = self.weights_copy()
        if weights is None:
            raise RuntimeError("no model yet: nothing to save before the first frame")
        return weights.write(path, dict(info or {}))

    def weights_copy(self) -> SavedWeights | None:
        """A copy of the trainer's weights and the info a file of them carries (None before the
        first frame): what `save_weights` writes, and what the daemon keeps of a stream whose
        engine closes at its end, so that ``save_model`` still has the model to save."""
        if self.trainer is None:
            return None
        step, state = self.training.snapshot()
        return SavedWeights({k: v.to("cpu") for k, v in state.items()},
                            {"preset": self.preset, "spec": self.spec.to_dict(), "step": step})

    def load_weights(self, path: str | os.PathLike, weights: SavedWeights | None = None) -> None:
        """Adopt saved weights mid-stream; they must be for the same network. ``weights``: the
        file's, already read by the caller (`checkpoint.load_checkpoint`), so that it is read once
        and the weights adopted are those the caller checked and hashed; ``path`` then only names them."""
        if weights is None:
            weights = SavedWeights(*load_checkpoint(path))
        state, info = weights.state_dict, weights.info
        if self.trainer is None:  # the first frame builds the network from them (`_start`)
            self.config = replace(self.config, init=str(path))
            self._init_weights = weights
            return
        if read_spec(info, path) != self.spec:
            raise CheckpointError(f"{path}: weights are for another network ({info.get('preset')})")
        try:
            self.training.load(state, int(info.get("step", self.trainer.steps)))
        except CheckpointError as exc:  # (the stream keeps its own weights)
            raise CheckpointError(f"{path}: {exc}") from None
        self._adopt_published_weights()
        self._live = True

    def close(self) -> None:
        if self._pass is not None:
            # a build still inside inductor's C++ when the interpreter exits aborts the process
            self._pass.wait(timeout=120)
        self.training.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.seat.leave()

    def __enter__(self) -> StreamDenoiser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
