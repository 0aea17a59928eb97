"""Per-stream weight checkpoints in ``--state-dir``, so a killed and restarted daemon skips the warm start.

One file per stream *and* frame format, ``<stream>.<H>x<W>.<dtype>.pt`` (``cam0.128x128.u2.pt``):
a stream resumes only from weights learned on frames like the ones it now receives. Files are
written by the engine's `save_weights` (weights only, temporary file + rename, so a kill mid-write
leaves the previous checkpoint intact) and validated with `load_checkpoint` before use; a corrupt
file is moved aside to ``*.corrupt`` with a logged error and the stream starts fresh.
Only a stream whose warm start is done is checkpointed: half-trained weights would make a
restarted stream skip a warm start it never finished.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from umvd_live.engine.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger("umvd_live.daemon")

#: Default seconds between periodic checkpoints of every live stream.
WEIGHTS_CHECKPOINT_INTERVAL_S = 60.0


class StateStore:
    """Finds, saves and forgets the checkpoints of the daemon's streams in one directory."""

    def __init__(self, directory: Path, interval_s: float = WEIGHTS_CHECKPOINT_INTERVAL_S):
        if interval_s <= 0:
            raise ValueError("the checkpoint interval must be > 0 s")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.interval_s = interval_s
        self.saved = 0  # checkpoints written this session
        self.refused = 0  # corrupt checkpoints moved aside
        self.resumed = 0  # streams started from a checkpoint
        self._saved_step: dict[Path, int] = {}  # what is on disk, to skip saves that change nothing

    def path_for(self, stream: str, shape: tuple[int, int], dtype: str) -> Path:
        """Stream names match ``[A-Za-z0-9_.-]{1,64}`` (protocol), so this stays one file name."""
        kind = dtype.lstrip("<>|=")
        return self.directory / f"{stream}.{shape[0]}x{shape[1]}.{kind}.pt"

    def find(self, stream: str, shape: tuple[int, int], dtype: str) -> str | None:
        """The checkpoint to resume ``stream`` from, if a valid one exists for this format."""
        path = self.path_for(stream, shape, dtype)
        if not path.is_file():
            return None
        try:
            _, info = load_checkpoint(path)
        except CheckpointError as exc:
            aside = path.with_name(path.name + ".corrupt")
            try:
                os.replace(path, aside)
            except OSError:
                aside = path
            self.refused += 1
            log.error("stream %s: refusing checkpoint %s (%s); moved to %s; the stream starts fresh",
                      stream, path, exc, aside.name)
            return None
        self.resumed += 1
        self._saved_step[path] = int(info.get("step", -1))
        log.info("stream %s: resuming from checkpoint %s (step %s): warm start skipped",
                 stream, path, info.get("step"))
        return str(path)

    def save(self, stream: str, denoiser: Any, shape: tuple[int, int] | None, dtype: str | None) -> Path | None:
        """Checkpoint the weights of a stream whose warm start is done (not those of a prior shown
        before it is), unless nothing changed since the last save."""
        if denoiser is None or shape is None or dtype is None or not denoiser.warm:
            return None
        path = self.path_for(stream, shape, dtype)
        step = int(denoiser.model_step)
        if self._saved_step.get(path) == step and path.is_file():
            return None
        try:
            denoiser.save_weights(str(path))
        except Exception as exc:  # a full disk must not end the stream: log, keep the old file
            log.error("stream %s: checkpoint to %s failed: %s", stream, path, exc)
            return None
        self._saved_step[path] = step
        self.saved += 1
        log.debug("stream %s: checkpoint %s (step %d)", stream, path.name, step)
        return path

    def forget(self, stream: str, shape: tuple[int, int] | None, dtype: str | None) -> None:
        """After a `reset`: a restart must not bring back the model the operator dropped."""
        if shape is None or dtype is None:
            return
        path = self.path_for(stream, shape, dtype)
        path.unlink(missing_ok=True)
        self._saved_step.pop(path, None)

    def summary(self) -> dict[str, Any]:
        return {"dir": str(self.directory.resolve()), "interval_s": self.interval_s,
                "saved": self.saved, "resumed": self.resumed, "refused": self.refused}
