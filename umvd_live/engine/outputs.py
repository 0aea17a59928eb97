"""What the engine hands back for each frame, and how it chooses between network and mean.

Every input frame gets one `DenoisedFrame`, in order. A live output first waits, with its window,
in an `OutputBatch` for its forward pass (batched, `stream.StreamDenoiser._finish`); where the
network is not yet proven on this stream, its `Probe` lets the `BlindReferee` decide whether the
network's output or the window's temporal mean is shown, without a clean reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

#: warmup: a temporal mean (the network is not yet better than it); live: the network's;
#: adapting: the network's, within `adapt_frames` of an abrupt change (`changes`).
State = Literal["warmup", "live", "adapting"]


@dataclass(frozen=True)
class DenoisedFrame:
    index: int  # 0-based push order of the input frame this output belongs to
    image: np.ndarray | None  # float32 (H, W) in the input's units; None if inference was skipped
    state: State
    model_step: int  # training steps the weights that produced it had seen
    segment: int = 0  # abrupt changes (`changes`) before this frame in the stream
    tag: object = None  # what the caller gave with input frame `index` (`push`), returned untouched
    amplitude_gain: float = 1.0  # its deviation from the blind baseline was multiplied by it (`amplitude`); 1: as made
    jitter_shift_px: tuple[float, float] | None = None  # (y, x): moved with its frame's jitter (`jitter`); None: not


class RoundFailed(RuntimeError):
    """A pass of a round failed: the round's ``lost`` outputs will never come (the cause is
    chained). The outputs of other rounds are not lost (`StreamDenoiser.push_many`)."""

    def __init__(self, lost: int, cause: BaseException):
        super().__init__(f"{lost} outputs lost: a pass of their round failed ({cause!r})")
        self.lost = lost


#: A live output waiting for its pass: its slot in the batch, t, the window's N feature maps
#: (1, F, H, W) and its context block means (1, M, C, H, W) or None.
Window = tuple[int, int, list[torch.Tensor], torch.Tensor | None]


@dataclass
class OutputBatch:
    """The outputs of one `push_many` or `flush` in order; live ones wait with their windows."""

    outputs: list[DenoisedFrame | None] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    probes: dict[int, Probe] = field(default_factory=dict)  # by slot: outputs the referee judges
    tags: dict[int, object] = field(default_factory=dict)  # by slot: the tags of waiting outputs

    def wait(self, t: int, features: list[torch.Tensor], context: torch.Tensor | None,
             probe: Probe | None = None, tag: object = None) -> None:
        """Frame t's output, to be denoised from its window by `StreamDenoiser._finish`."""
        if probe is not None:
            self.probes[len(self.outputs)] = probe
        if tag is not None:
            self.tags[len(self.outputs)] = tag
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
    def of(cls, frames: Sequence[torch.Tensor], k: int) -> Probe:
        """From the window's N frames, (C, H, W) each, whose centre is at position k: summed one by
        one, not stacked first (a copy of the whole window for every frame, on the frame loop)."""
        total = frames[0].float().clone()
        for frame in frames[1:]:
            total += frame
        centre = frames[k].float()
        n = len(frames)
        return cls(centre, (total - centre).div_(n - 1), total / n)


def blind_distance(estimate: np.ndarray, noisy: np.ndarray) -> float:
    """Mean squared distance of an estimate of frame t that is blind to it to the noisy frame t: its
    distance to the truth plus the noise variance, the same for every blind estimate, so the
    smaller of two such distances marks the better estimate (`BlindReferee`)."""
    difference = np.subtract(estimate, noisy, dtype=np.float32)
    return float(np.vdot(difference, difference)) / max(difference.size, 1)


def mean_is_nearer(estimate: np.ndarray, mean: np.ndarray | None, noisy: np.ndarray) -> bool:
    """The referee's rule for a file's final pass, where each changed output is judged once more:
    whether the window's blind mean (None: none to judge by) lies at least as near the noisy frame
    as the estimate does, so the estimate is not taken (`amplitude`, `cellblend`)."""
    return mean is not None and blind_distance(mean, noisy) <= blind_distance(estimate, noisy)


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
        return self.network is not None and self.mean is not None and self.network < self.mean

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

