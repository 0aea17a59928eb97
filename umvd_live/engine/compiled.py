"""D's live pass through `torch.compile`, built on a background thread, eager until it is ready.

Why: on a 2-core CPU a live stream's frame loop shares the interpreter with its trainer. An eager
pass of lite's D is ~25 module calls, each of which must take the GIL back from the trainer's
Python; compiled, the pass is one call into generated C++ around the same oneDNN kernels, so it
waits on the GIL once. Measured at 256² (bf16, one thread, beside a busy machine): 8.4-11.4 ms a
pass against 13.7-14.4 ms eager, with outputs equal to the last bit (docs/benchmarks.md).

Compiling takes seconds (~25 s the first time on one core of a 2-core Xeon, ~5-8 s once
inductor's on-disk cache holds the graph), so it runs beside the stream: the first frames go
through the eager pass, which stays the fallback for every other case (batches of more than one
window, a machine without the C++ compiler inductor needs — common on Windows —, or any error).
It is off by default (`EngineConfig.compile`, ``--compile``): on the 2-core machine the build
competes with the stream's start, where the preview then skipped more frames than the faster
pass saved later in a 30-s `bench` (docs/benchmarks.md); a long session gains from it.
Weights are updated in place (`load_state_dict`), which the compiled graph reads at each call, so
one compilation serves the whole stream.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

log = logging.getLogger(__name__)

PassFn = Callable[[Sequence[torch.Tensor], "torch.Tensor | None"], torch.Tensor]


class CompiledPass:
    """Calls ``eager(feats, context)``, or its compiled twin once that is built and the batch is one
    window (the only shape it was compiled for: a second shape would compile again, on the frame
    loop). `state`: "off", "compiling", "ready" or "failed"."""

    def __init__(self, eager: PassFn, enabled: bool):
        self.eager = eager
        self.state = "compiling" if enabled else "off"
        self.error: str | None = None
        self._compiled: PassFn | None = None
        self._thread: threading.Thread | None = None

    def start(self, example: Callable[[], tuple[list[torch.Tensor], torch.Tensor | None]],
              autocast: Callable[[], AbstractContextManager[object]]) -> None:
        """Build on a background thread: ``example()`` gives one window's inputs of the stream's
        shape, ``autocast()`` the context the stream runs its passes in. The graph's guards check
        the calling thread's state (grad mode, autocast, torch threads) and each input's dispatch
        keys and strides: the example is made and run as a live pass is, or the first live pass
        would compile again, on the frame loop."""
        if self.state != "compiling":
            return
        threads = torch.get_num_threads()  # the pushing thread's share, which the guards hold

        def build() -> None:
            torch.set_num_threads(threads)
            try:
                fn = torch.compile(self.eager, dynamic=False)
                with torch.inference_mode(), autocast():  # the example made as live windows are:
                    feats, context = example()  # inference tensors (another dispatch key: a guard)
                    fn(*_canonical(feats, context))
            except Exception as exc:  # no compiler, an unsupported op: the eager pass stays
                self.state, self.error = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                log.warning("the compiled inference pass is not available (%s); the eager pass is used", self.error)
                return
            self._compiled = fn
            self.state = "ready"
            log.info("compiled inference pass ready")

        self._thread = threading.Thread(target=build, name="umvd-compile", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the build has ended (tests, benchmarks that want the compiled pass from the start)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state != "compiling"

    def __call__(self, feats: Sequence[torch.Tensor], context: torch.Tensor | None) -> torch.Tensor:
        fn = self._compiled
        if fn is None or feats[0].shape[0] != 1:
            return self.eager(feats, context)
        return fn(*_canonical(feats, context))


def _canonical(feats: Sequence[torch.Tensor], context: torch.Tensor | None
               ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The same window as views with one stride along the batch of one: a frame's features
    taken from a batch (``batch[i][None]``) and a frame's own (``features(frame)``) differ only
    there, a difference that means nothing for one window but fails the graph's stride guard."""
    feats = [f.squeeze(0).unsqueeze(0) for f in feats]
    return feats, None if context is None else context.squeeze(0).unsqueeze(0)
