"""Process-wide settings for the long-running commands: no pauses, no page faults and no spinning
threads mid-stream.

`freeze_startup_objects`: after the imports (torch, numpy, scipy: ~300,000 objects), Python's
full garbage collections scanned all of them a few times a minute, stopping every thread of the
daemon for ~110-130 ms: with ~22 ms of inference per 33 ms frame at 256², one such pause makes a
backlog that takes half a second to drain. Frozen, those objects are never scanned again
(`gc.freeze`, meant for this); collections then see only what the session made.

`retain_freed_memory`: each frame's tensors (several MB at 256², ~30 MB at 512²) are allocated
and freed again, and glibc's malloc serves blocks that large with fresh `mmap`s and hands freed
heap back to the OS, so every frame paid its page faults again. Raising the two thresholds keeps
that memory mapped for reuse, as jemalloc or tcmalloc would, without a preload; resident memory
then stays near its peak instead of shrinking between frames (bounded: the soak in
docs/benchmarks.md).

`limit_blas_threads`: numpy's and scipy's OpenBLAS start a thread per core, and after each call
(a dot product of two frames in the live gain, `np.vdot` of 512² pixels) those threads spin for
work for a while before they sleep. With a few such calls per frame they never sleep: on 2 cores
one of them took ~70 % of a core away from the passes of D (512² at 30 Hz: 16 fps out; with one
BLAS thread 25). The vectors are too small for threads to pay, and torch's own threads are set
by the engine (`device.CpuSeat`), so BLAS gets one thread.

All three change the whole process, so only the command line applies them (`cli.main`), never the
library: an application that embeds `StreamDenoiser` keeps its own settings. Each can be turned
off from the environment, to measure what it does: `UMVD_LIVE_GC_FREEZE=off`,
`UMVD_LIVE_KEEP_MEMORY=off`, `UMVD_LIVE_BLAS_LIMIT=off`. docs/benchmarks.md has the figures with
and without.

`peak_rss_mb` is the process's peak resident memory on every platform (the bench reports it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import os
import sys
from types import ModuleType

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap and are reused; larger ones (the bench's pre-generated
#: movie) are still mapped on their own and returned when freed.
MMAP_THRESHOLD = 64 * 2**20
#: Free memory at the top of the heap kept for reuse before it is returned.
TRIM_THRESHOLD = 512 * 2**20


def enabled(setting: str) -> bool:
    """`UMVD_LIVE_<SETTING>` is not off/0/no/false."""
    return os.environ.get(f"UMVD_LIVE_{setting}", "on").lower() not in ("off", "0", "no", "false")


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds, unless the user set them (MALLOC_*_ variables)
    or this is not glibc. Returns whether it did."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


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


#: Thread counts a user may have set for the BLAS libraries: then theirs stands.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def limit_blas_threads() -> bool:
    """One thread for each BLAS library loaded now (threadpoolctl: OpenBLAS, MKL, BLIS on every
    platform), unless the user set a thread count in the environment. Returns whether it did."""
    if any(name in os.environ for name in BLAS_THREAD_VARIABLES):
        return False
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    return True


def tune_process(command_module: str) -> ModuleType:
    """Import a command's module with the settings applied around the import; returns it."""
    if enabled("KEEP_MEMORY"):
        retain_freed_memory()
    module = importlib.import_module(command_module)
    if enabled("BLAS_LIMIT"):
        limit_blas_threads()  # after the import: it limits the libraries loaded by then
    if enabled("GC_FREEZE"):
        freeze_startup_objects()
    return module


def peak_rss_mb() -> float:
    """The process's peak resident memory in MiB: ``getrusage`` where there is one (POSIX), else
    psutil's peak working set (Windows, where the ``resource`` module does not exist)."""
    try:
        import resource
    except ImportError:
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, else KiB
