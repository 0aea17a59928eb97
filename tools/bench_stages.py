"""Where the time of one denoised frame goes on a CPU, stage by stage: the figures behind the
engine's layout choices in docs/engine.md and docs/benchmarks.md.

Three measurements, each on random data of one frame size (the time does not depend on it):

1. D's input from the window's N cached feature maps: stacked first and then concatenated
   channels-last (the engine's way until 2026-11-25), against one concatenation straight from
   the maps (its way now). One thread.
2. One pass of D, float32 against bf16 autocast. One thread.
3. Passes of D per second with the cores laid out three ways: one pass on one thread, one pass on
   two threads, two single-thread passes at once; each alone and beside a trainer thread that
   steps 30 % of the time (`EngineConfig.live_train_duty`), as once live.

    python tools/bench_stages.py --size 512 512
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable

import torch

from umvd_live.daemon.runtime import retain_freed_memory
from umvd_live.engine.model import PRESETS, UMVDNet
from umvd_live.engine.trainer import OnlineTrainer, ReplayBuffer, TrainerConfig


def ms_per_call(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - started) / repeats


def stacked_input(net: UMVDNet, feats: list[torch.Tensor], context: torch.Tensor) -> torch.Tensor:
    """D's input as the engine built it before: the window stacked, then weighted and concatenated
    (without the centre, as now: the comparison is of the stacking alone)."""
    window = torch.stack([f[0] for f in feats])[None]
    parts = [window[:, i].permute(0, 2, 3, 1) * net.gamma[i] for i in range(window.shape[1]) if net.gamma[i] != 0]
    parts += [context[:, j].permute(0, 2, 3, 1) for j in range(context.shape[1])]
    return torch.cat(parts, 3)


def direct_input(net: UMVDNet, feats: list[torch.Tensor], context: torch.Tensor) -> torch.Tensor:
    """D's input as `UMVDNet.denoise_features` builds it now: one concatenation of the maps."""
    parts = [f.permute(0, 2, 3, 1) if g == 1.0 else f.permute(0, 2, 3, 1) * g
             for f, g in zip(feats, net.gamma.tolist()) if g != 0.0]
    parts += [context[:, j].permute(0, 2, 3, 1) for j in range(context.shape[1])]
    return torch.cat(parts, 3)


def passes_per_second(net: UMVDNet, feats: list[torch.Tensor], context: torch.Tensor, workers: int,
                      threads: int, trainer: OnlineTrainer | None, replay: ReplayBuffer, seconds: float) -> float:
    stop = threading.Event()
    done = [0] * workers

    def denoise(i: int) -> None:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            net.denoise_features(feats, context)  # this thread's first pass: not counted
            while not stop.is_set():
                net.denoise_features(feats, context)
                done[i] += 1

    def train() -> None:
        torch.set_num_threads(1)
        while not stop.is_set():
            started = time.monotonic()
            trainer.step(replay)
            stop.wait((time.monotonic() - started) * (1 / 0.3 - 1))  # 30 % of the time

    jobs = [threading.Thread(target=denoise, args=(i,)) for i in range(workers)]
    if trainer is not None:
        jobs.append(threading.Thread(target=train))
    for job in jobs:
        job.start()
    time.sleep(1.0)
    before, started = sum(done), time.monotonic()
    time.sleep(seconds)
    rate = (sum(done) - before) / (time.monotonic() - started)
    stop.set()
    for job in jobs:
        job.join()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    p.add_argument("--preset", default="lite", choices=tuple(PRESETS))
    p.add_argument("--repeats", type=int, default=15, help="calls timed per one-thread figure (default 15)")
    p.add_argument("--seconds", type=float, default=8.0, help="timing per core layout (default 8)")
    args = p.parse_args()
    retain_freed_memory()  # as the command line runs: no page faults for each frame's tensors
    h, w = args.size
    spec = PRESETS[args.preset]()
    net = UMVDNet(spec).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    feats = [torch.randn(1, spec.g_channels, h, w).contiguous(memory_format=torch.channels_last)
             for _ in range(spec.window)]
    context = torch.randn(1, len(spec.context), 1, h, w)
    print(f"{args.preset}, {h}×{w}, N = {spec.window}")

    torch.set_num_threads(1)
    with torch.inference_mode():
        stacked = ms_per_call(lambda: stacked_input(net, feats, context), args.repeats)
        direct = ms_per_call(lambda: direct_input(net, feats, context), args.repeats)
        print(f"D's input, one thread: stacked then concatenated {stacked:.1f} ms; one concatenation {direct:.1f} ms")
        fp32 = ms_per_call(lambda: net.denoise_features(feats, context), args.repeats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = ms_per_call(lambda: net.denoise_features(feats, context), args.repeats)
        print(f"one pass of D, one thread: float32 {fp32:.1f} ms; bf16 autocast {bf16:.1f} ms")

    replay = ReplayBuffer(spec.window, 200, spec.context)
    for i in range(150):
        replay.add(i, torch.randn(1, h, w))
    trainer = OnlineTrainer(UMVDNet(spec).to(memory_format=torch.channels_last), TrainerConfig(), torch.device("cpu"))
    for beside in (None, trainer):
        for workers, threads in ((1, 1), (1, 2), (2, 1)):
            rate = passes_per_second(net, feats, context, workers, threads, beside, replay, args.seconds)
            print(f"passes of D per s (float32), {workers} × {threads} thread{'s' if threads > 1 else ''}"
                  f"{', beside the trainer at 30 %' if beside else ', alone'}: {rate:.2f}", flush=True)


if __name__ == "__main__":
    main()
