"""The command line's process settings: start-up objects frozen, freed memory kept mapped, one BLAS thread."""

import json
import os
import subprocess
import sys

CHECK = """
import gc, sys
import torch
from umvd_live.daemon.runtime import freeze_startup_objects
freeze_startup_objects()
frozen, modules = gc.get_freeze_count(), len(sys.modules)
torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))])  # what the first stream does
print(frozen, len(sys.modules) - modules)
"""


def test_freeze_covers_what_torch_imports_when_the_first_stream_starts():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120, check=True)
    frozen, new_modules = map(int, out.stdout.split())
    assert frozen > 50_000, "the imports' objects are frozen"
    assert new_modules == 0, "torch's lazy imports happened before the freeze"


def test_the_command_line_freezes_unless_told_not_to(tmp_path):
    code = (f"import gc; from umvd_live.apps import cli; cli.main(['keys', {str(tmp_path)!r}, 'k']); "
            "print(gc.get_freeze_count() > 0)")
    for env, frozen in (({}, "True"), ({"UMVD_LIVE_GC_FREEZE": "off"}, "False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env=os.environ | env, check=True)
        assert out.stdout.strip().splitlines()[-1] == frozen
        (tmp_path / "k.key").unlink()
        (tmp_path / "k.key_secret").unlink()


def test_malloc_thresholds_are_raised_on_glibc_unless_the_user_set_them():
    import platform

    code = "from umvd_live.daemon.runtime import retain_freed_memory; print(retain_freed_memory())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == "True"
    user = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=env | {"MALLOC_ARENA_MAX": "2"})
    assert user.stdout.strip() == "False", "the user's own malloc settings win"


BLAS_THREADS = """
from umvd_live.daemon.runtime import tune_process
tune_process("umvd_live.daemon.service")  # imports numpy and scipy, as `serve` does
from threadpoolctl import threadpool_info
print(sorted({info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}))
"""


def test_the_command_line_gives_blas_one_thread_unless_the_user_chose():
    """numpy's OpenBLAS threads spin between calls and took most of a core from the network's
    passes (docs/benchmarks.md): the commands' processes give BLAS one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                            "MKL_NUM_THREADS", "BLIS_NUM_THREADS")}

    def blas_threads(extra: dict[str, str]) -> list[int]:
        out = subprocess.run([sys.executable, "-c", BLAS_THREADS], capture_output=True, text=True, timeout=120,
                             env=env | extra, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert blas_threads({}) == [1]
    assert blas_threads({"OPENBLAS_NUM_THREADS": "2"}) == [2], "the user's own count stands"
    if (os.cpu_count() or 1) > 1:
        assert blas_threads({"UMVD_LIVE_BLAS_LIMIT": "off"}) != [1], "off leaves the libraries' default"
