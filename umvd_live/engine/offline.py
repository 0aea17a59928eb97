"""Offline use of a stream's engine: a whole recorded movie at once (`denoise`, `batch`).

A file need not arrive frame by frame. `pretrain` trains on every window of the movie before any
frame is pushed (the paper's recipe), and `denoise_frames` denoises any frames of it with the
newest weights, with context from both sides where the config asks for it (the final pass of
`denoise`), blends their coarse part with a blind temporal mean (`cellblend`) and undoes the
network's measured shrinkage of the activity there (`amplitude`), then moves each output with its
frame's own measured jitter (`jitter`).
Both use the stream's own network, windows, segments and referee (`stream.StreamDenoiser`, whose
`pretrain` and `denoise_frames` call these), so a file gets the engine a live stream gets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from umvd_live.engine.amplitude import AmplitudeGain, restore_amplitude
from umvd_live.engine.cellblend import CellBlend, blend_blind_mean
from umvd_live.engine.changes import ChangeDetector
from umvd_live.engine.jitter import JitterFollowed, follow_jitter
from umvd_live.engine.normalization import (
    IMPULSE_RANGES,
    ImpulseScreen,
    Normalizer,
    Screened,
    sanitize,
)
from umvd_live.engine.outputs import BlindReferee, DenoisedFrame, OutputBatch, Probe
from umvd_live.engine.window import block_means, context_blocks, context_reach, window_indices

if TYPE_CHECKING:
    from umvd_live.engine.stream import StreamDenoiser
    from umvd_live.engine.trainer import ReplayBuffer

#: Training steps between two calls of `pretrain`'s progress callback.
PROGRESS_EVERY = 50


def pretrain(den: StreamDenoiser, movie: np.ndarray, steps: int,
             progress: Callable[[int, float | None], None] | None = None) -> None:
    """Train ``den`` on the whole ``movie`` before its first push (`StreamDenoiser.pretrain`)."""
    if den.trainer is not None:
        raise RuntimeError("pretrain must be called before the first push")
    movie = np.asarray(movie)
    den._start(movie[0])
    den._fit_normalizer(movie)  # on the first frame with finite pixels, as pushing will
    training = den.training
    replay = training.replay
    if replay is None:
        raise RuntimeError("the first frame began no training")
    # the whole movie where the byte limit allows (a stream's `replay_frames` bound does not apply)
    streamed, tc = replay.capacity, den.config.trainer
    replay.capacity = max(streamed, min(len(movie), tc.replay_bytes // (4 * movie[0].size)))
    detector, segment, normalizer = ChangeDetector(den.config.changes), 0, den.normalizer
    screen: ImpulseScreen[int] = ImpulseScreen(where="for training")  # against the frames beside each in its run
    for i, frame in enumerate(movie):
        clean, trainable = sanitize(frame)
        change = trainable and detector.observe(clean) is not None  # as `push_many` will see it
        if change or not trainable:  # a run of frames ends: its last tested against its own
            _hold(replay, screen.end())
        if change:
            segment, normalizer = segment + 1, Normalizer.fit(clean)
        if trainable:
            _hold(replay, screen.add_recorded(i, normalizer.forward(clean), segment))
    _hold(replay, screen.end())
    den.pretrain_impulses += screen.impulses
    for done in range(0, steps, PROGRESS_EVERY):
        training.run(min(PROGRESS_EVERY, steps - done))
        if progress:
            progress(den.model_step, den.last_loss)
    replay.clear()
    replay.capacity = streamed
    training.publish()
    den._adopt_published_weights()
    den._live = True


def _hold(replay: ReplayBuffer, tested: Screened[int] | None) -> None:
    """A frame tested for impulses (`normalization.ImpulseScreen`, with its segment), into the replay buffer."""
    if tested is not None:
        replay.add(tested.index, torch.from_numpy(tested.frame)[None], tested.held)


def _measured_frames(movie: np.ndarray, first: int, last: int, normalizer: Normalizer) -> list[np.ndarray]:
    """Frames ``first``..``last`` (a segment) as a file's final pass takes them, in the movie's
    units: sanitised, their isolated impulses replaced against the frames beside each in the
    segment, as they were for training (the same screen's tests for good as `pretrain`'s and the
    stream's, in the movie's units; those logged them). Made once per segment: the network's pass
    reads them, and the blend and the restoration read them all again."""
    screen: ImpulseScreen[None] = ImpulseScreen(IMPULSE_RANGES * normalizer.scale, where=None)
    tested = [screen.add_recorded(i, sanitize(movie[i])[0], None) for i in range(first, last + 1)]
    return [t.frame for t in [*tested, screen.end()] if t is not None]


def denoise_frames(den: StreamDenoiser, movie: np.ndarray, indices: list[int],
                   progress: Callable[[], None] | None = None) -> list[DenoisedFrame]:
    """Frames ``indices`` of ``movie`` denoised by ``den``'s newest weights, each within its
    segment (`StreamDenoiser.denoise_frames`)."""
    if den.trainer is None:
        raise RuntimeError("no model yet: push frames or pretrain first")
    with den.training.lock:
        den.training.publish()
    den._adopt_published_weights()
    starts = [0] + [change.index for change in den.changes]
    ends = starts[1:] + [len(movie)]
    out: list[DenoisedFrame] = []
    den.amplitude_gains, den.cell_blends, den.jitter_follows = [], [], []
    for segment, (first, end) in enumerate(zip(starts, ends)):
        chunk = [t for t in indices if first <= t < end]
        if chunk:
            noisy = _measured_frames(movie, first, end - 1, den._normalizers[segment])
            done = _denoise_segment(den, noisy, chunk, first, segment, progress)
            blend, restored, followed = _final_steps(den, noisy, done, first)
            den.cell_blends.append(blend)
            den.amplitude_gains.append(restored)
            den.jitter_follows.append(followed)
            if restored.gain != 1.0:  # the network's outputs were restored; the referee's means were not
                left = set(restored.unrestored)
                done = [replace(o, amplitude_gain=restored.gain) if o.state == "live" and o.index not in left else o
                        for o in done]
            if followed.shifts:
                done = [replace(o, jitter_shift_px=followed.shifts.get(o.index)) for o in done]
            out += done
    order = {t: i for i, t in enumerate(indices)}
    return sorted(out, key=lambda o: order[o.index])


def _denoise_segment(den: StreamDenoiser, noisy: list[np.ndarray], indices: list[int], first: int,
                     segment: int, progress: Callable[[], None] | None) -> list[DenoisedFrame]:
    """Frames ``indices`` of the segment whose frames from ``first`` on are ``noisy``
    (`_measured_frames`), through the network, each judged by the referee."""
    normalizer = den._normalizers[segment]
    last = first + len(noisy) - 1
    spans = den.spec.context
    both_sides = den.config.context_sides == "both"
    k = den.k
    reach = context_reach(k, spans, both_sides)
    frames: dict[int, torch.Tensor] = {}  # normalised frames near the current t
    feats: dict[int, torch.Tensor] = {}  # G once per frame, shared by the windows it is in

    def frame(i: int) -> torch.Tensor:
        if i not in frames:
            frames[i] = torch.from_numpy(normalizer.forward(noisy[i - first])).to(den.device)[None]
        return frames[i]

    # Each frame is judged alone, blind, as the referee judges a live stream's: where the
    # network's output is farther from the noisy frame than its neighbours' mean is (a frame
    # unlike what the network learned, e.g. a sudden jolt of the sample), the window's mean
    # (all N frames, t included: not blind) is output instead (state `warmup`).
    referee = BlindReferee(memory=0.0)
    out: list[DenoisedFrame] = []
    for start in range(0, len(indices), den.max_batch):
        batch = OutputBatch()
        chunk = indices[start:start + den.max_batch]
        with torch.inference_mode():
            for t in chunk:
                if first == last:  # one frame cannot be denoised blind: passed through, as `_produce` does
                    batch.outputs.append(DenoisedFrame(index=t, image=normalizer.inverse(frame(t)[0].cpu().numpy()),
                                                       state="warmup", model_step=den._net_step, segment=segment))
                    continue
                idx = window_indices(t, first, last, k)
                for i in idx:
                    if i not in feats:
                        feats[i] = den._features(frame(i)[None])[0]
                context = None
                if spans:
                    blocks = context_blocks(t, k, spans, lambda j: first <= j <= last, both_sides)
                    context = block_means(blocks, frame)[None]
                probe = Probe.of([frame(i) for i in idx], k) if len(set(idx)) > 1 else None
                batch.wait(t, [feats[i][None] for i in idx], context, probe)
        out += [replace(o, segment=segment, state="warmup" if o.state == "warmup" else "live")
                for o in den._finish(batch, normalizer, referee, live=False)]
        if progress is not None:
            for _ in chunk:
                progress()
        # What no later window needs can go (indices usually come in order; an evicted
        # frame that is needed again is simply recomputed).
        for cache, keep in ((feats, k), (frames, reach)):
            for i in [i for i in cache if i < chunk[-1] - keep]:
                del cache[i]
    return out


def _final_steps(den: StreamDenoiser, noisy: list[np.ndarray], outputs: list[DenoisedFrame],
                 first: int) -> tuple[CellBlend, AmplitudeGain, JitterFollowed]:
    """Blend one segment's outputs at the scale of cells with the blind mean of its noisy frames
    (`cellblend`), undo their shrinkage (`amplitude`), then move each with its frame's jitter
    (`jitter`), in place: over a run of consecutive frames, the network's outputs only (not the
    referee's neighbour means), each judged again by the referee's rule after each step.
    ``noisy``: the whole segment's frames, around the outputs too, from frame ``first`` on
    (`_measured_frames`)."""
    last = first + len(noisy) - 1
    ordered = sorted(outputs, key=lambda o: o.index)
    start, frames = ordered[0].index, len(ordered)
    images = [o.image for o in ordered]
    if ordered[-1].index - start + 1 != frames or any(image is None for image in images):
        why = "frames not consecutive" if ordered[-1].index - start + 1 != frames else "an output without its image"
        return (CellBlend(start, frames, reason=why), AmplitudeGain(start, frames, None, 1.0, why),
                JitterFollowed(start, frames, reason=why))
    outs = [image for image in images if image is not None]  # all of them (checked above)
    ours = noisy[start - first:start - first + frames]
    scored = np.array([o.state == "live" for o in ordered])

    def neighbours(t: int) -> np.ndarray:  # the referee's blind mean of output t's window (`Probe`)
        return np.mean([noisy[i - first] for i in window_indices(start + t, first, last, den.k) if i != start + t],
                       axis=0)

    network_reach = context_reach(den.k, den.spec.context, den.config.context_sides == "both")
    blend = blend_blind_mean(noisy, outs, scale_px=den.config.blend_px, reach=network_reach, scored=scored,
                             first=start, offset=start - first, neighbours=neighbours)
    # a blended output depends on the frames within the blind mean's reach as well
    reach = max(network_reach, blend.reach)
    restored = restore_amplitude(ours, outs, reach=reach, keep=den.config.keep_amplitude, scored=scored,
                                 first=start, neighbours=neighbours)
    followed = (follow_jitter(ours, outs, scored=scored, first=start, neighbours=neighbours)
                if den.config.follow_jitter else JitterFollowed(start, frames, reason="off"))
    return blend, restored, followed
