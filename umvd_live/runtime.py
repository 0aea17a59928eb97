"""Process-wide settings for the long-running commands: latency without pauses.

They change the whole process, so only the command line applies them (`cli.main`), never the
library: an application that embeds `StreamDenoiser` keeps its own settings.

`retain_freed_memory`: keep freed memory in the process instead of handing it back to the OS
after every frame. Each frame's tensors (several MB at 256², tens at 512²) are allocated and freed again. glibc's
malloc serves blocks that large with fresh `mmap`s and trims freed heap back to the OS, so every
frame pays its page faults again (docs/benchmarks.md has the figures with and without). Raising
the two thresholds keeps the memory mapped for reuse; resident memory then stays at its peak instead of shrinking between frames, which the
memory soak in docs/benchmarks.md shows is flat. This is what jemalloc or tcmalloc would do,
without a preload.

`freeze_startup_objects`: after the imports (torch, numpy, scipy: ~300,000 objects), Python's
full garbage collections scanned all of them, pausing the pushing thread for up to ~125 ms a few
times a minute, long enough to make the preview fall behind. Frozen, those objects are never
scanned again (`gc.freeze`, meant for this); collections then see only what the session made.

`UMVD_LIVE_TUNING=off` in the environment leaves both alone, to measure what they do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap; larger ones (the bench's pre-generated movie) are
#: still mapped on their own and returned when freed.
MMAP_THRESHOLD = 64 * 2**20
#: Free memory at the top of the heap kept for reuse before it is returned.
TRIM_THRESHOLD = 512 * 2**20


def tuning_enabled() -> bool:
    return os.environ.get("UMVD_LIVE_TUNING", "on").lower() not in ("off", "0", "no", "false")


def retain_freed_memory() -> bool:
    """Set glibc's thresholds, unless the user set them (MALLOC_*_ environment variables) or this
    is not glibc. Returns whether it did."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("malloc thresholds %s", "raised" if done else "left as they were")
    return done


def freeze_startup_objects() -> None:
    """Move every object alive now out of the garbage collector's reach: call after the imports.

    If the command imported torch, an optimizer is made first: torch imports its compiler stack
    (~800 modules, ~120,000 objects) when the first one is made, which would otherwise happen
    when the first stream starts, after the freeze.
    """
    if "torch" in sys.modules:
        import torch

        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    gc.collect()
    gc.freeze()
