"""Per-stream weight checkpoints in ``--state-dir``, so a killed and restarted daemon skips the warm start.

One file per stream *and* frame format, in the state directory's ``checkpoints/`` folder, a folder
`save_model` and `load_model` cannot name (`control`), so a saved model never overwrites one:
``checkpoints/<name>-<hash>.<H>x<W>.<dtype>.pt`` (``cam0-63ba21b7.128x128.u2.pt``), ``<name>``
the stream's name in lower case with its dots as ``_`` and ``<hash>`` the start of the sha256 of
its exact name (`checkpoint_stem`): on a file system that ignores case (NTFS, APFS) ``Cam0`` and
``cam0`` still get a file each, and no stream's file is a Windows device name (``NUL``, ``COM1``).
A stream resumes only from weights learned on frames like the ones it now receives, and only from
a file that names it (each checkpoint holds its stream's name). A state directory of an earlier
version, ``<stream>.<H>x<W>.<dtype>.pt`` beside the saved models, is still read when the new file
is not there yet (`_legacy_files`).

Files are written by the engine's `save_weights` (weights only, temporary file + rename, so a kill
mid-write leaves the previous checkpoint intact; the temporaries such a kill leaves are removed
when the daemon starts) and validated with `load_checkpoint` before use; a corrupt file is moved
aside to ``*.corrupt`` with a logged error and the stream starts fresh. Only a stream whose warm
start is done is checkpointed: half-trained weights would make a restarted stream skip a warm
start it never finished. A `reset` forgets every checkpoint of the stream, of every format.

Writing a checkpoint waits for the stream's training step to end (the engine's training lock),
then serialises and ``fsync``s the weights: tens of milliseconds, far more on a slow disk. So the
frame loop only asks (`save_later`, `forget_later`) and the service's one worker thread writes,
in the order asked; a stream that starts waits only for the last job of its own still under way
(`find`), so it resumes from the newest weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from umvd_live.engine.checkpoint import TEMPORARY, CheckpointError, load_checkpoint
from umvd_live.portable import replace_file

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


#: The state directory's folder of checkpoints, which `save_model` and `load_model` cannot name.
CHECKPOINTS = "checkpoints"


def checkpoint_stem(stream: str) -> str:
    """What every checkpoint file name of ``stream`` starts with (the module's docstring says why)."""
    digest = hashlib.sha256(stream.encode()).hexdigest()[:8]
    return f"{stream.lower().replace('.', '_')}-{digest}"


def _format(shape: tuple[int, int], dtype: str) -> str:
    return f"{shape[0]}x{shape[1]}.{dtype.lstrip('<>|=')}"


class StateStore:
    """Finds, saves and forgets the checkpoints of the daemon's streams in one directory; saves
    and forgets run on ``worker`` (one thread: in order)."""

    def __init__(self, directory: Path, interval_s: float, worker: StateWorker):
        if interval_s <= 0:
            raise ValueError("the checkpoint interval must be > 0 s")
        self.directory = Path(directory)
        self.checkpoints = self.directory / CHECKPOINTS
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.interval_s = interval_s
        self.saved = 0  # checkpoints written this session
        self.failed = 0  # checkpoints that could not be written
        self.refused = 0  # corrupt checkpoints moved aside
        self.resumed = 0  # streams started from a checkpoint
        self.last_save_s: float | None = None  # how long the last write took
        self._worker = worker
        self._lock = threading.Lock()  # the loop and the worker both read and write what follows
        self._saved_step: dict[Path, int] = {}  # what is on disk, to skip saves that change nothing
        #: The last job asked for each stream: (the denoiser a save writes, None for a forget; its
        #: future). Weakly: a stream's last denoiser, closed, must not keep its weights in memory.
        self._queued: dict[str, tuple[weakref.ref[StreamEngine] | None, Future[None]]] = {}
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        """The full-size temporaries of checkpoint writes that were killed midway: nothing else
        removes them, and no write of this directory is under way before the daemon starts."""
        for folder in (self.directory, self.checkpoints):
            for path in folder.iterdir():
                match = TEMPORARY.match(path.name)
                if match is None or not match["target"].endswith(".pt") or not path.is_file():
                    continue
                try:
                    path.unlink()
                except OSError as exc:
                    log.error("cannot remove %s, left by a write that was killed: %s", path, exc)
                else:
                    log.warning("removed %s, left by a write that was killed", path)

    def path_for(self, stream: str, shape: tuple[int, int], dtype: str) -> Path:
        return self.checkpoints / f"{checkpoint_stem(stream)}.{_format(shape, dtype)}.pt"

    def _legacy_files(self, stream: str) -> list[Path]:
        """What an earlier version checkpointed ``stream`` to, beside the saved models,
        ``<stream>.<H>x<W>.<dtype>.pt``: by the exact name listed, never opened by name (a file
        system that ignores case would open ``cam0``'s file for ``Cam0``)."""
        pattern = re.compile(re.escape(stream) + r"\.\d+x\d+\.[a-z]+\d+\.pt")
        return [self.directory / name for name in os.listdir(self.directory) if pattern.fullmatch(name)]

    def find(self, stream: str, shape: tuple[int, int], dtype: str) -> str | None:
        """The checkpoint to resume ``stream`` from, if a valid one of this stream exists for
        this format (after the stream's jobs still queued, if any); an earlier version's if
        there is none of this version's."""
        with self._lock:
            queued = self._queued.get(stream)
        if queued is not None:
            queued[1].result()  # never raises: the jobs log their own failures
        path = self.path_for(stream, shape, dtype)
        if not path.is_file():
            legacy = f"{stream}.{_format(shape, dtype)}.pt"
            earlier = next((p for p in self._legacy_files(stream) if p.name == legacy), None)
            if earlier is None:
                return None
            path = earlier
        try:
            _, info = load_checkpoint(path)
        except CheckpointError as exc:
            aside = path.with_name(path.name + ".corrupt")
            try:
                replace_file(path, aside)
            except OSError:
                aside = path
            with self._lock:
                self.refused += 1
            log.error("stream %s: refusing checkpoint %s (%s); moved to %s; the stream starts fresh",
                      stream, path, exc, aside.name)
            return None
        owner = info.get("stream", stream)  # an earlier version's files do not say
        if owner != stream:
            log.warning("stream %s: checkpoint %s is stream %r's, not resumed; the stream starts fresh",
                        stream, path, owner)
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
        is), unless one of this denoiser is queued already (a slow disk: the next one catches up;
        one of the stream's previous denoiser, still queued, saves that one's weights)."""
        if denoiser is None or shape is None or dtype is None or not denoiser.warm:
            return
        path = self.path_for(stream, shape, dtype)
        with self._lock:
            queued = self._queued.get(stream)
            if queued is not None and queued[0] is not None and queued[0]() is denoiser and not queued[1].done():
                return
            self._queued[stream] = (weakref.ref(denoiser), self._worker.submit(self._save, stream, denoiser, path))

    def _save(self, stream: str, denoiser: StreamEngine, path: Path) -> None:
        """On the worker: write, unless nothing changed since the last save."""
        step = int(denoiser.model_step)
        with self._lock:
            if self._saved_step.get(path) == step and path.is_file():
                return
        began = time.perf_counter()
        try:
            denoiser.save_weights(str(path), {"stream": stream})  # `find` resumes only the stream it names
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

    def forget_later(self, stream: str) -> None:
        """After a `reset`: neither a restart nor a later frame of any format may bring back the
        model the operator dropped. Queued after the saves asked before, so none of them writes
        a file again afterwards."""
        with self._lock:
            self._queued[stream] = (None, self._worker.submit(self._forget, stream))

    def _forget(self, stream: str) -> None:
        """On the worker: every checkpoint of ``stream``, of every format, an earlier version's too."""
        for path in [*self.checkpoints.glob(f"{checkpoint_stem(stream)}.*.pt"), *self._legacy_files(stream)]:
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
