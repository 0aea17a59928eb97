"""Priors: small weights-only models shipped in the package, so a new stream is useful at once.

A stream that starts from scratch shows a temporal mean until its warm start is done (tens of
seconds on a small CPU). A prior is a network already trained, the way the engine trains (blind,
self-supervised, on noisy frames only), on the project's simulator across photon levels,
structures and noise models (tools/train_prior.py makes them again). A stream starts on it from
its first full window and the warm start adapts it to the sample in front of the microscope. The
engine's referee (`engine.outputs.BlindReferee`) shows its output only while it beats the temporal mean
on the stream's own frames, so a prior that does not fit is dropped at once.

Files are `checkpoint` files named ``prior_weights/<preset>-w<N>.pt``; a prior serves a stream only if it was
made for exactly that network (`ModelSpec`: the preset's, with the stream's window and context).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from umvd_live.engine.checkpoint import CheckpointError, load_checkpoint, read_spec, weights_hash
from umvd_live.engine.model import ModelSpec

PRIOR_DIR = Path(__file__).parent / "prior_weights"


@dataclass(frozen=True)
class Prior:
    name: str  # the file's name for a shipped prior, else its path
    state_dict: dict[str, torch.Tensor]
    sha256: str  # `checkpoint.weights_hash` of its weights: goes into provenance
    info: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "trained": self.info.get("trained")}


def shipped_path(preset: str, window: int) -> Path:
    return PRIOR_DIR / f"{preset}-w{window}.pt"


def find_prior(choice: str, preset: str, spec: ModelSpec) -> Prior | None:
    """The prior a stream starts on: ``choice`` is ``auto`` (the shipped one for this network, if
    any), ``none``, or the path of a model file, which must then fit the network."""
    if choice == "none":
        return None
    explicit = choice != "auto"
    path = Path(choice) if explicit else shipped_path(preset, spec.window)
    if not explicit and not path.is_file():
        return None
    state, info = load_checkpoint(path)
    if read_spec(info, path) != spec:
        if explicit:
            raise CheckpointError(f"{path}: this prior is for another network than the stream's ({preset}, "
                                  f"N={spec.window}, context {spec.context})")
        return None  # e.g. a --context of one's own: no shipped prior fits, start from scratch
    return Prior(path.name if not explicit else str(path), state, weights_hash(state), info)
