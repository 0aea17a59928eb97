"""Per-stream weight checkpoints in ``--state-dir``, so a killed and restarted daemon skips the warm start.

One file per stream *and* frame format, ``<stream>.<H>x<W>.<dtype>.pt`` (``cam0.128x128.u2.pt``):
a stream resumes only from weights learned on frames like the ones it now receives. Files are
written by the engine's `save_weights` (weights only, temporary file + rename, so a kill mid-write
leaves the previous checkpoint intact) and validated with `load_checkpoint` before use; a corrupt
file is moved aside to ``*.corrupt`` with a logged error and the stream starts fresh.
Only a stream whose warm start is done is checkpointed: half-trained weights would make a
restarted stream skip a warm start it never finished.

Writing a checkpoint waits for the stream's training step to end (the engine's training lock),
then serialises and ``fsync``s the weights: tens of milliseconds, far more on a slow disk. So the
frame loop only asks (`save_later`, `forget_later`) and the service's one worker thread writes,
in the order asked; a stream that starts waits only for a write of its own file still under way
(`find`), so it resumes from the newest weights.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from umvd_live.engine.checkpoint import CheckpointError, load_checkpoint

if TYPE_CHECKING:
    from umvd_live.daemon.streams import StreamEngine
    from umvd_live.wire.schema import StateDirStatus, WorkerStatus

log = logging.getLogger("umvd_live.daemon")

T = TypeVar("T")


class StateWorker:
    """The daemon's one thread for slow state I/O off the frame loop (``umvd-state``): checkpoints,
    `save_model`, weights hashes. Jobs run one at a time, in the order submitted; `shutdown`
    waits for the last of them (the final checkpoints)."""

    THREAD_NAME = "umvd-state"

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.THREAD_NAME)
        self._lock = threading.Lock()
        self.submitted = 0
        self.done = 0
        self.failed = 0  # jobs that raised (their caller sees the exception in the future)

    def submit(self, job: Callable[..., T], *args: object) -> Future[T]:
        future = self._pool.submit(job, *args)
        with self._lock:
            self.submitted += 1
        future.add_done_callback(self._finished)
        return future

    def _finished(self, future: Future) -> None:
        with self._lock:
            self.done += 1
            self.failed += not future.cancelled() and future.exception() is not None

    def shutdown(self) -> None:
        """Run what was submitted, then stop the thread."""
        self._pool.shutdown(wait=True)

    def summary(self) -> WorkerStatus:
        with self._lock:
            return {"thread": self.THREAD_NAME, "pending": self.submitted - self.done, "done": self.done,
                    "failed": self.failed}


class StateStore:
    """Finds, saves and forgets the checkpoints of the daemon's streams in one directory; saves
    and forgets run on ``worker`` (one thread: in order)."""

    def __init__(self, directory: Path, interval_s: float, worker: StateWorker):
        if interval_s <= 0:
            raise ValueError("the checkpoint interval must be > 0 s")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.interval_s = interval_s
        self.saved = 0  # checkpoints written this session
        self.failed = 0  # checkpoints that could not be written
        self.refused = 0  # corrupt checkpoints moved aside
        self.resumed = 0  # streams started from a checkpoint
        self.last_save_s: float | None = None  # how long the last write took
        self._worker = worker
        self._lock = threading.Lock()  # the loop and the worker both read and write what follows
        self._saved_step: dict[Path, int] = {}  # what is on disk, to skip saves that change nothing
        #: The last job asked for each file: ("save" | "forget", its future).
        self._queued: dict[Path, tuple[str, Future[None]]] = {}

    def path_for(self, stream: str, shape: tuple[int, int], dtype: str) -> Path:
        """Stream names match ``[A-Za-z0-9_.-]{1,64}`` (protocol), so this stays one file name."""
        kind = dtype.lstrip("<>|=")
        return self.directory / f"{stream}.{shape[0]}x{shape[1]}.{kind}.pt"

    def find(self, stream: str, shape: tuple[int, int], dtype: str) -> str | None:
        """The checkpoint to resume ``stream`` from, if a valid one exists for this format (after
        the write of that file still queued, if any)."""
        path = self.path_for(stream, shape, dtype)
        with self._lock:
            queued = self._queued.get(path)
        if queued is not None:
            queued[1].result()  # never raises: the jobs log their own failures
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
            with self._lock:
                self.refused += 1
            log.error("stream %s: refusing checkpoint %s (%s); moved to %s; the stream starts fresh",
                      stream, path, exc, aside.name)
            return None
        with self._lock:
            self.resumed += 1
            self._saved_step[path] = int(info.get("step", -1))
        log.info("stream %s: resuming from checkpoint %s (step %s): warm start skipped",
                 stream, path, info.get("step"))
        return str(path)

    def save_later(self, stream: str, denoiser: StreamEngine | None, shape: tuple[int, int] | None,
                   dtype: str | None) -> None:
        """Queue a checkpoint of a stream whose warm start is done (not of a prior shown before it
        is), unless one of that file is queued already (a slow disk: the next one catches up)."""
        if denoiser is None or shape is None or dtype is None or not denoiser.warm:
            return
        path = self.path_for(stream, shape, dtype)
        with self._lock:
            queued = self._queued.get(path)
            if queued is not None and queued[0] == "save" and not queued[1].done():
                return
            self._queued[path] = ("save", self._worker.submit(self._save, stream, denoiser, path))

    def _save(self, stream: str, denoiser: StreamEngine, path: Path) -> None:
        """On the worker: write, unless nothing changed since the last save."""
        step = int(denoiser.model_step)
        with self._lock:
            if self._saved_step.get(path) == step and path.is_file():
                return
        began = time.perf_counter()
        try:
            denoiser.save_weights(str(path))
        except Exception as exc:  # a full disk must not end the stream: log, keep the old file
            with self._lock:
                self.failed += 1
            log.error("stream %s: checkpoint to %s failed: %s", stream, path, exc)
            return
        with self._lock:
            self._saved_step[path] = step
            self.saved += 1
            self.last_save_s = time.perf_counter() - began
        log.debug("stream %s: checkpoint %s (step %d)", stream, path.name, step)

    def forget_later(self, stream: str, shape: tuple[int, int] | None, dtype: str | None) -> None:
        """After a `reset`: a restart must not bring back the model the operator dropped. Queued
        after the saves asked before, so none of them writes the file again afterwards."""
        if shape is None or dtype is None:
            return
        path = self.path_for(stream, shape, dtype)
        with self._lock:
            self._queued[path] = ("forget", self._worker.submit(self._forget, path))

    def _forget(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("cannot remove checkpoint %s: %s", path, exc)
        with self._lock:
            self._saved_step.pop(path, None)

    def summary(self) -> StateDirStatus:
        with self._lock:
            last = None if self.last_save_s is None else round(1000 * self.last_save_s, 1)
            return {"dir": str(self.directory.resolve()), "interval_s": self.interval_s,
                    "saved": self.saved, "resumed": self.resumed, "refused": self.refused,
                    "failed": self.failed, "pending": sum(not job.done() for _, job in self._queued.values()),
                    "last_save_ms": last}
