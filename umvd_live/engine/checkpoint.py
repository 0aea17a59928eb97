"""Model files: weights only, written atomically, validated before use.

A checkpoint is a `torch.save` of plain tensors, numbers and strings, read back with
`weights_only=True`: loading never unpickles arbitrary objects, so a model file from the network
cannot execute code. It is written to a temporary file and renamed (`write_atomically`), so a
crash mid-write never leaves a half checkpoint under the real name; the rename is retried while
Windows refuses it (`umvd_live.portable.replace_file`).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from umvd_live.engine.model import ModelSpec
from umvd_live.portable import replace_file

FORMAT = "umvd-live-weights/1"
#: The temporary file a write goes through, ``.<target>.<random>`` next to its target (also the
#: names `tempfile.mkstemp` gave them before): what a write killed midway leaves behind.
TEMPORARY = re.compile(r"\A\.(?P<target>.+)\.[0-9a-z_]{8,16}\Z")


class CheckpointError(ValueError):
    """A model file that is missing, corrupt, or for another network."""


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names and bytes: identifies the weights a recording started with."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@contextmanager
def write_atomically(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file to write ``path`` through: a temporary next to it, fsynced and renamed over
    ``path`` when the block ends, removed if it raises, so ``path`` is whole or as it was. The
    rename is retried for up to `portable.REPLACE_RETRY_S` while Windows refuses it (a virus
    scanner or a reader holds ``path`` open); still refused, PermissionError.

    The temporary is created with mode 0o666 less the umask, as `open` creates files (a
    `tempfile.mkstemp` file stays 0600, so a model or ready file would be the owner's only); on
    Windows that mode only leaves the file writable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        replace_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class SavedWeights:
    """A network's weights and the info a checkpoint file of them carries (its ``step`` included),
    kept in memory: `save_checkpoint` writes them."""

    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.info.get("step", 0))

    def write(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> tuple[int, str]:
        """Save them to ``path`` with ``extra`` beside their info (the daemon names the stream);
        returns the step and the weights hash of what was written."""
        save_checkpoint(path, self.state_dict, {**(extra or {}), **self.info})
        return self.step, weights_hash(self.state_dict)


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    path = Path(path)
    payload = {
        "format": FORMAT,
        "info": info,
        "state_dict": {k: v.detach().to("cpu").clone() for k, v in state_dict.items()},
    }
    with write_atomically(path) as fh:
        torch.save(payload, fh)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable umvd-live model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a umvd-live model file (format {FORMAT} expected)")
    state, info = payload.get("state_dict"), payload.get("info")
    if not isinstance(state, dict) or not isinstance(info, dict):
        raise CheckpointError(f"{path}: corrupt model file (missing weights or info)")
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: corrupt model file (tensor {name!r} is not finite)")
    return state, info


def read_spec(info: dict[str, Any], path: str | os.PathLike) -> ModelSpec:
    """The network a model file's weights are for (its info's ``spec``), or CheckpointError."""
    try:
        return ModelSpec.from_dict(info["spec"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: a model file without a readable network spec "
                              f"({type(exc).__name__}: {exc})") from None


def check_model_flags(init: str | None, prior: str) -> None:
    """Read the ``--init`` and ``--prior`` files once, so that a command refuses a bad one when it
    starts, not at each stream's first frame; CheckpointError names the flag. ``prior``'s ``auto``
    and ``none`` name no file."""
    for flag, path in (("--init", init), ("--prior", None if prior in ("auto", "none") else prior)):
        if path is not None:
            try:
                load_checkpoint(path)
            except CheckpointError as exc:
                raise CheckpointError(f"{flag}: {exc}") from None


def check_fits(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError unless ``state`` holds exactly the tensors of ``own`` (a model's state
    dict), of the same shapes: `load_state_dict` would copy those that fit before refusing."""
    missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    reshaped = sorted(k for k in own.keys() & state.keys() if state[k].shape != own[k].shape)
    wrong = [f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
             for what, names in (("missing", missing), ("unexpected", extra), ("other shapes", reshaped)) if names]
    if wrong:
        raise CheckpointError(f"weights for another network ({'; '.join(wrong)})")
