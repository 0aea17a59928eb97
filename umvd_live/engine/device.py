"""Where an engine computes and how: the device, the precision, the inference layout, its CPU threads.

Each choice has a default that depends on the hardware, measured rather than assumed
(docs/benchmarks.md): bf16 only where the hardware does it, batches on a GPU, two passes side by
side on a CPU that trains in the background. The values themselves are checked by `EngineConfig`;
this module only fills in what was left to the machine.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Literal

import torch

from umvd_live.engine.budget import CpuBudget, CpuShare, cpu_cores
from umvd_live.engine.config import EngineConfig

#: Windows per forward pass on a GPU, by default. On a CPU one window at a time: from 256² on, a
#: batch costs as much or more per window there (docs/benchmarks.md, "Batch size and workers").
GPU_BATCH = 16


class DeviceUnavailable(ValueError):
    """The device asked for is not there (`pick_device`): bad input, refused before anything starts."""


def pick_device(name: str) -> torch.device:
    """The device ``--device`` names, checked now: a GPU index beyond those torch sees would
    otherwise fail only at the first frame, deep in the engine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable(f"--device {name} was asked for, but torch sees no CUDA device")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise DeviceUnavailable(f"--device {name} was asked for, but torch sees {count} CUDA device(s): "
                                f"cuda:0 to cuda:{count - 1}")
    return device


def default_batch(device: torch.device) -> int:
    return GPU_BATCH if device.type == "cuda" else 1


def default_workers(device: torch.device, train_mode: str, cores: int | None = None) -> int:
    """D's forward passes run at once when several windows are ready: 2 on a CPU of 2 or more
    cores (``cores``: the CPU budget, default `cpu_cores`) that trains in the background, else 1.
    Once live, the trainer rests most of the time
    (`live_train_duty`), and a second pass on its own thread uses the trainer's cores meanwhile:
    at 512² on 2 cores beside the trainer, 23-26 passes/s against 15-16 for one pass on both
    cores (tools/bench_stages.py; docs/benchmarks.md). A GPU batches
    instead (`default_batch`)."""
    cores = cpu_cores() if cores is None else cores
    return 2 if device.type == "cpu" and train_mode == "background" and cores >= 2 else 1


def inference_layout(device: torch.device, train_mode: str, max_batch: int | None = None,
                     workers: int | None = None, cores: int | None = None) -> tuple[int, int]:
    """(windows per forward pass, passes at once): the values given, else the defaults for the
    device and training mode (`default_batch`, `default_workers`)."""
    batch = default_batch(device) if max_batch is None else max_batch
    passes = default_workers(device, train_mode, cores) if workers is None else workers
    return batch, passes


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (AVX512-BF16 or AMX on x86-64), where
    oneDNN's bf16 convolutions beat float32: a pass of lite's D at 512² took 56-68 instead of
    80-84 ms on the development machine's AMD EPYC, at the same PSNR (tools/bench_stages.py;
    docs/benchmarks.md). Elsewhere bf16 is
    emulated and buys nothing. torch's own CPU probes answer on every system (Windows included);
    /proc/cpuinfo is the fallback for a torch without them."""
    if not torch.backends.mkldnn.is_available():
        return False
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    probes = [probe for probe in (getattr(torch.cpu, name, None) for name in names) if callable(probe)]
    if len(probes) == len(names):
        return any(probe() for probe in probes)
    try:
        with open("/proc/cpuinfo") as f:  # Linux; other systems: no
            return lists_native_bf16(f.read())
    except OSError:
        return False


def lists_native_bf16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's flags name bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether the networks run under bfloat16 autocast: on request, or by default where the
    hardware has bf16 arithmetic: a GPU from Ampere on, or a CPU with AVX512-BF16 or AMX
    (`cpu_has_native_bf16`). Float32 elsewhere, where bf16 is no faster. A GPU's own compute
    capability decides, not `torch.cuda.is_bf16_supported`, which counts emulation (pre-Ampere GPUs)
    and asks the current device instead of ``device``."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.cuda.get_device_capability(device)[0] >= 8  # 8.0: Ampere
        return device.type == "cpu" and cpu_has_native_bf16()
    return precision == "bf16"


class CpuSeat:
    """One engine's place in a CPU budget (`budget.CpuBudget`): it joins when the engine is made
    and leaves when it closes; its share sets the torch threads of each of the engine's threads
    and its trainer's turns (`CpuBudget.acquire`)."""

    def __init__(self, budget: CpuBudget, device: torch.device, config: EngineConfig):
        self.budget = budget
        self.device = device
        self.background = config.train_mode == "background"
        self.live_train_duty = config.live_train_duty
        self.cpu_threads = config.cpu_threads
        self.member: int | None = budget.join(f"{config.preset} {config.train_mode}")

    def share(self) -> CpuShare:
        """This engine's share of its CPU budget now (`budget.divide`)."""
        return self.budget.share(self.background, self.live_train_duty, self.member)

    def set_threads(self, role: Literal["infer", "train"] = "infer") -> None:
        """Torch threads for the calling thread, from the CPU budget's share (`budget.divide`). In
        background mode on a CPU, inference and training each get half of the budget's cores:
        measured on 2 cores, that beats pausing the trainer during each push
        (docs/benchmarks.md), and it leaves the acquisition its share during the warm start too
        (a trainer on every core then was faster alone and far slower beside other work: OpenMP
        threads that wait on each other). Trainers of several engines share the training half
        (`budget.CpuBudget`). torch's count is per OS thread once that thread has run an
        operation, so each thread sets its own: the pushing thread, the trainer (again at each
        step: the share changes as streams come and go), and each inference worker."""
        if self.device.type != "cpu":
            return
        threads = self.cpu_threads
        if threads is None:
            share = self.share()
            threads = share.train_threads if role == "train" else share.infer_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def acquire(self, stop: threading.Event) -> bool:
        """Wait for a training slot (`CpuBudget.acquire`); False if ``stop`` was set first."""
        return self.budget.acquire(self._joined(), stop)

    def release(self) -> None:
        self.budget.release(self._joined())

    def _joined(self) -> int:
        if self.member is None:
            raise RuntimeError("this engine has left the CPU budget")
        return self.member

    def leave(self) -> None:
        """The engine closed: the others' shares grow back."""
        if self.member is not None:
            self.budget.leave(self.member)
            self.member = None
