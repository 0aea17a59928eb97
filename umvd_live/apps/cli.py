"""`umvd-live` command line: one sub-command per capability, each delegating to its module.

This is the one place that turns flags into configurations (`engine_config_from_args`,
`denoise_config`, `demo_config`, `bench_config`, `acquire_config`, `viewer_config`): every module past it takes a
config dataclass, never an `argparse.Namespace`. Flags a user leaves out that the engine has a
default for stay None here and the `EngineConfig` field default applies, so the defaults are
written once, in `EngineConfig`.

The modules are imported only when their command runs, so `umvd-live --help` stays fast (no torch)
and the core commands never import Qt or the Micro-Manager libraries.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from umvd_live.apps import logs
from umvd_live.apps.checks import finite_positive
from umvd_live.daemon.runtime import tune_process
from umvd_live.portable import stop_signals_as_ctrl_c

if TYPE_CHECKING:
    from umvd_live.adapters.simulation import SimEvent
    from umvd_live.apps.acquire import AcquireConfig
    from umvd_live.apps.bench import BenchConfig
    from umvd_live.apps.demo import DemoConfig
    from umvd_live.apps.denoise import DenoiseConfig
    from umvd_live.daemon.config import DaemonConfig
    from umvd_live.engine import EngineConfig
    from umvd_live.viewer.session import ViewerConfig

PRESETS = ("auto", "lite", "fast", "paper")
DEVICES = ("auto", "cpu", "cuda")


def user_path(text: str) -> str:
    """A path flag's value with a leading ``~`` expanded to the home folder: Windows shells and
    quoted paths leave it to the program (``--state-dir '~/umvd-state'`` made ./~/umvd-state)."""
    return os.path.expanduser(text)


def parse_context(text: str) -> tuple[int, ...]:
    """`--context`: comma-separated block lengths in frames, or `none`."""
    if text.strip().lower() in ("none", ""):
        return ()
    try:
        blocks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of frame counts like 8,24,64 (or none)") from None
    if any(b < 1 for b in blocks):
        raise argparse.ArgumentTypeError(f"context blocks need at least 1 frame each, got {text!r}")
    return blocks


def _engine_args(p: argparse.ArgumentParser, *, inference_workers: bool = True) -> None:
    """The engine's options; ``inference_workers=False`` leaves out ``--workers`` (batch's Dask workers)."""
    p.add_argument("--preset", choices=PRESETS, default="auto",
                   help="network size (default auto: paper on a GPU; on a CPU lite, and fast for live "
                        "streams of 512² and more)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="compute device (default: auto)")
    p.add_argument("--window", type=int, metavar="N", help="frames per window, odd, 3 to 101 (default: the engine's)")
    p.add_argument("--context", type=parse_context, metavar="A,B,..",
                   help="lengths of the blocks of earlier frames the network also sees, or 'none' "
                        "(default: the preset's; lite and fast 8,24,64, paper none)")
    p.add_argument("--warmup-frames", type=int, metavar="F",
                   help="frames of the initial burst the warm start trains on (default: the engine's)")
    p.add_argument("--init", type=user_path, metavar="PATH", help="start from weights saved by an earlier session")
    p.add_argument("--prior", type=user_path, default="auto", metavar="auto|none|PATH",
                   help="weights a new stream starts on, shown while they beat a temporal mean (default "
                        "auto: the prior shipped for the network; none: from scratch; --init wins)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="arithmetic of the networks (default auto: bf16 where the hardware has it, an "
                        "Ampere or later GPU or a CPU with AVX512-BF16 or AMX; else fp32)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="live streams: run the inference pass through torch.compile, built beside the "
                        "stream (the eager pass serves until it is ready, and wherever it cannot be built)")
    p.add_argument("--batch", type=int, metavar="B",
                   help="windows denoised per forward pass when frames wait (default: 16 on a GPU, "
                        "1 on a CPU, where batches are slower)")
    if inference_workers:
        p.add_argument("--workers", type=int, metavar="W",
                       help="forward passes run side by side when windows wait (default: 2 on a CPU when "
                            "training runs in the background, the second using the trainer's core while "
                            "it rests; 1 otherwise)")
    p.add_argument("--keep-amplitude", type=float, metavar="K",
                   help="the amplitude slope to restore where the network's outputs measurably shrink the "
                        "activity, measured on the movie or stream itself (gain K / measured slope, never below "
                        "1): 1 (default) undoes the measured shrinkage, 0 leaves the outputs as the network "
                        "makes them (the least squared error, smaller transients; docs/engine.md, "
                        "\"Amplitudes restored\")")
    p.add_argument("--follow-jitter", action=argparse.BooleanOptionalAction, default=None,
                   help="move each output with its own frame's rigid jitter, measured on the frame and scaled by "
                        "how surely the whole field moves as one (default: on; live streams once 96 frames "
                        "are measured; docs/engine.md, \"Jitter followed\")")
    p.add_argument("--seed", type=int, default=0, help="random seed of the network's start and training (default 0)")


def _budget_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-budget", type=int, metavar="CORES",
                   help="CPU cores the streams' engines share: inference (one stream at a time) "
                        "threads and workers are sized by it, and the trainers of all streams take "
                        "turns on half of it (default: the cores this process may use; docs/engine.md)")


def _file_args(p: argparse.ArgumentParser) -> None:
    """Options of a recorded movie's denoising, shared by `denoise` and `batch`."""
    p.add_argument("--offline", action="store_true",
                   help="train on the whole movie at once (the paper's recipe) instead of along it")
    p.add_argument("--steps-per-frame", type=float, default=10.0, metavar="S",
                   help="training steps after each frame as the movie is trained along (default 10: a file "
                        "need not keep pace; about 3 minutes for 600 frames of 128² on 2 CPU cores)")
    p.add_argument("--warmup-steps", type=int, default=None, metavar="S",
                   help="training steps of the warm start before the output goes live (default: the engine's)")
    p.add_argument("--blend-px", type=float, metavar="PX",
                   help="the scale (Gaussian sigma of a smoothing within the sources, pixels) at and above "
                        "which the outputs are blended with a blind temporal mean of the noisy frames, as far "
                        "as that measurably brings them closer to the truth (default 2; 0: off; docs/engine.md, "
                        "\"Cell-scale blend\")")
    p.add_argument("--threads", type=int, metavar="T",
                   help="torch threads on a CPU (default: every core this process may use; batch: "
                        "the cores divided among the tasks that run at once)")
    p.add_argument("--stream", action="append", default=[], metavar="NAME", dest="streams",
                   help="only this stream of a file of several (a channel, plane or position: GCaMP, "
                        "p1.c0, ...; repeatable; default: every stream, each on its own engine, an output each)")


def _denoise(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("denoise", help="denoise a movie file through the streaming engine",
                       description="Denoise a recorded movie with the live engine: train along the movie "
                                   "(or on all of it: --offline), then denoise every frame with the final "
                                   "weights and context from both sides of the window; write an OME-TIFF "
                                   "with the input's pixel size, interval, channel and date (docs/engine.md). "
                                   "A file of several channels, planes or positions is denoised stream by "
                                   "stream, each on its own engine: OUTPUT_<stream>.ome.tif each.")
    p.add_argument("input", type=user_path,
                   help="movie: TIFF, OME-TIFF, ImageJ, ScanImage, NDTiff/MMStack or OME-Zarr (.ome.zarr); "
                        "what `acquire replay` reads")
    p.add_argument("output", type=user_path,
                   help="denoised movie, OME-TIFF or OME-Zarr by its extension (float32, same frame count, "
                        "input units); a file of several streams: one per stream, OUTPUT's name + _STREAM")
    _engine_args(p)
    _file_args(p)
    p.add_argument("--save-model", type=user_path, metavar="PATH", help="save the final weights here")
    p.set_defaults(module="umvd_live.apps.denoise", run=_run_denoise)


def _batch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="denoise many movies on a Dask cluster: this machine's or an existing one",
                       description="Denoise movies (files and glob patterns) with `denoise`'s engine on "
                                   "dask.distributed: a local cluster (--workers) or an existing scheduler "
                                   "(--scheduler); long movies are split in time chunks (docs/batch.md).")
    p.add_argument("inputs", nargs="+", type=user_path, metavar="INPUT",
                   help="movies or quoted glob patterns ('raw/**/*.ome.tif'), in any format denoise reads")
    p.add_argument("--output-dir", type=user_path, required=True, metavar="DIR",
                   help="where each INPUT's output goes, under its name (workers must see it)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N",
                       help="a local cluster of N worker processes, the cores divided among them (default: "
                            "one per core up to 4 cores, then about √cores, as Dask's LocalCluster)")
    where.add_argument("--scheduler", type=user_path, metavar="ADDRESS",
                       help="an existing Dask scheduler: tcp://HOST:PORT, or its scheduler file")
    _engine_args(p, inference_workers=False)
    _file_args(p)
    p.add_argument("--chunk-frames", type=int, default=2000, metavar="F",
                   help="movies longer than this are split in time chunks of at most F frames that share "
                        "one trained model (default 2000)")
    p.add_argument("--format", choices=("ome-tiff", "ome-zarr"), default="ome-tiff", help="output format")
    p.add_argument("--resume", action="store_true", help="skip the inputs whose output already exists")
    p.add_argument("--manifest", type=user_path, metavar="PATH",
                   help="the batch's record (default DIR/batch-manifest.json)")
    p.add_argument("--retries", type=int, default=1, metavar="R",
                   help="reruns of a task that raised (a lost worker's tasks are rerun anyway; default 1)")
    p.add_argument("--save-models", action="store_true", help="save each movie's weights beside its output (NAME.pt)")
    p.set_defaults(module="umvd_live.apps.batch", run=_run_module)


def _serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the live denoising daemon",
                       description="Run the live denoising daemon: frames in over ZeroMQ, denoised frames "
                                   "out, a control socket, recording on request (docs/protocol.md).")
    p.add_argument("--input", default=None,
                   help="SUB endpoint the daemon binds for producers (default tcp://127.0.0.1:5555, "
                        "or none when --input-connect is given)")
    p.add_argument("--input-connect", metavar="ENDPOINT", action="append", default=[],
                   help="connect the input to a producer that binds (repeatable)")
    p.add_argument("--output", default="tcp://127.0.0.1:5556", help="PUB endpoint for viewers")
    p.add_argument("--control", default="tcp://127.0.0.1:5557",
                   help="ROUTER endpoint the daemon binds for control requests (a REQ client connects; "
                        "each request is answered as a REP would; default %(default)s)")
    _engine_args(p)
    p.add_argument("--record", type=user_path, metavar="PATH", help="record every denoised frame to this OME-TIFF")
    p.add_argument("--output-dir", type=user_path, default=".", metavar="DIR",
                   help="directory for paths given on the control socket (recordings; "
                        "models when there is no --state-dir; default: the working directory)")
    p.add_argument("--state-dir", type=user_path,
                   help="checkpoint each stream's weights here and reload at start; "
                        "save_model/load_model paths are confined to it")
    p.add_argument("--warmup-steps", type=int, default=None, metavar="S",
                   help="training steps of the warm start before the output goes live "
                        "(default: the engine's)")
    p.add_argument("--catchup-ms", type=float, default=100.0, metavar="MS",
                   help="backlog, in estimated inference time, the preview works through before "
                        "it skips to the newest window (default 100); more shows more frames of a "
                        "stream that falls behind, later (docs/engine.md)")
    p.add_argument("--max-streams", type=int, default=16, help="streams served at once (default 16)")
    p.add_argument("--ready-file", type=user_path, metavar="PATH",
                   help="once every socket is bound, write the endpoints here as JSON (for scripts and the "
                        "demo; docs/protocol.md)")
    _budget_arg(p)
    p.add_argument("--inbox-mb", type=float, default=1024.0,
                   help="memory for received frames not processed yet; past it frames are "
                        "dropped and counted (default 1024)")
    p.add_argument("--status-interval", type=float, default=5.0, metavar="S",
                   help="seconds between status log lines when stdout is not a terminal (default 5)")
    p.add_argument("--checkpoint-interval", type=float, default=60.0, metavar="S",
                   help="with --state-dir: seconds between checkpoints of every live stream "
                        "(also saved at shutdown; default 60)")
    p.add_argument("--idle-s", type=float, default=10.0, metavar="S",
                   help="a stream without frames this long is idle: its training pauses and its "
                        "latency figures are dropped until frames come again (default 10)")
    sec = p.add_argument_group("remote access (docs/security.md)")
    sec.add_argument("--allow-remote", action="store_true",
                     help="allow binding beyond loopback; needs --curve-server-key and --curve-clients")
    sec.add_argument("--curve-server-key", type=user_path, metavar="FILE",
                     help="the daemon's CURVE key pair (NAME.key_secret from `umvd-live keys`): "
                          "every socket then requires an allowed client key")
    sec.add_argument("--curve-clients", type=user_path, metavar="DIR",
                     help="directory of the client public keys (*.key) allowed to connect")
    p.set_defaults(module="umvd_live.daemon.service", run=_run_serve)


def _keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="create a CURVE key pair for remote, authenticated connections",
                       description="Create NAME.key (public) and NAME.key_secret (private) in DIR "
                                   "(docs/security.md).")
    p.add_argument("directory", type=user_path, help="where to write the two files (created if missing)")
    p.add_argument("name", help="key name, e.g. daemon, or the client's host name")
    p.set_defaults(module="umvd_live.wire.security", run=_run_keys)


def _acquire(sub: argparse._SubParsersAction) -> None:
    from umvd_live.apps.acquire import AcquireConfig as acq  # their defaults
    from umvd_live.apps.acquire import PublishConfig as pub

    p = sub.add_parser("acquire", help="stream frames from a source into the daemon",
                       description="Stream frames from a source into the daemon (docs/adapters.md).")
    p.set_defaults(module="umvd_live.apps.acquire", run=_run_acquire)
    p.add_argument("source", choices=("sim", "replay", "pymmcore-plus", "pycromanager"),
                   help="where frames come from: the simulator, a file, an in-process Micro-Manager core, "
                        "or Micro-Manager through pycromanager")
    p.add_argument("--to", default=pub.to, help="daemon input endpoint")
    p.add_argument("--stream", default=pub.stream,
                   help="stream name (topic); with channels, planes or positions the base name of one "
                        "stream per (position, channel, plane), e.g. cam0.GCaMP.z2 (docs/adapters.md)")
    p.add_argument("--frames", type=int, help="number of frames (default: source's own)")
    p.add_argument("--wait-s", type=float, default=pub.wait_s, metavar="S",
                   help="wait this long for the daemon's subscription before giving up (default %(default)g)")
    p.add_argument("--sndhwm", type=int, default=pub.sndhwm, help=argparse.SUPPRESS)
    p.add_argument("--queue", type=int, default=acq.queue, metavar="N",
                   help="pymmcore-plus, pycromanager owner: hand-off queue length (default %(default)d)")
    p.add_argument("--rate", type=float, default=acq.rate_hz, help="frames per second (sim, replay)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=acq.size,
                   help=f"sim: frame height and width in pixels (default {' '.join(map(str, acq.size))})")
    p.add_argument("--photons", type=float, default=acq.photons, help="sim: photons/pixel/frame")
    p.add_argument("--seed", type=int, default=acq.seed,
                   help="sim: random seed of the simulated session (default %(default)d)")
    p.add_argument("--file", type=user_path,
                   help="replay: the movie to replay: TIFF, ImageJ, OME-TIFF (multi-file too), ScanImage, "
                        "Micro-Manager NDTiff and MMStack, or an OME-Zarr store (docs/adapters.md)")
    p.add_argument("--loop", action="store_true", help="replay: loop the file")
    p.add_argument("--file-timing", action="store_true", help="replay: pace at the file's timestamps")
    p.add_argument("--series", type=int, metavar="INDEX",
                   help="replay: only the series (position) of this 0-based index in the file (default: all)")
    p.add_argument("--channel", type=int, metavar="INDEX",
                   help="replay: only the channel of this 0-based index, not a name (default: all, a stream each)")
    p.add_argument("--config", type=user_path,
                   help="pymmcore-plus, pycromanager owner: Micro-Manager configuration file")
    p.add_argument("--mm-path", type=user_path,
                   help="Micro-Manager folder with the C++ device adapters the config uses")
    p.add_argument("--exposure-ms", type=float, help="pymmcore-plus, pycromanager --config: exposure")
    p.add_argument("--interval-ms", type=float, default=acq.interval_ms,
                   help="pymmcore-plus, pycromanager owner: time-lapse interval (default %(default)g)")
    p.add_argument("--live", action="store_true", help="pymmcore-plus: tap live mode instead of an MDA")
    p.add_argument("--mda", type=user_path, metavar="SEQUENCE.yaml",
                   help="pymmcore-plus: run this useq-schema MDA (channels, z, positions, time) instead "
                        "of a --frames time-lapse; a stream per (position, channel, plane)")
    p.add_argument("--mode", choices=("owner", "tap"), default=acq.mode,
                   help="pycromanager: run our own acquisition (owner) or follow the GUI's (tap)")
    p.add_argument("--mm-port", type=int, default=acq.mm_port, help="pycromanager: Micro-Manager's ZMQ port")
    p.add_argument("--connect-attempts", type=int, default=acq.connect_attempts,
                   help="pycromanager: tries to reach Micro-Manager, with back-off (default %(default)d)")
    p.add_argument("--retry-s", type=float, default=acq.retry_s,
                   help="pycromanager: first back-off delay, doubled per try (default %(default)g)")
    p.add_argument("--poll-ms", type=float, default=acq.poll_ms, help="pycromanager tap: polling period")
    p.add_argument("--save-dir", type=user_path, help="pycromanager owner: where pycromanager saves the raw data")


def _demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a simulated two-photon session through the daemon, with a summary",
                       description="Stream a simulated two-photon session (ground truth known) through "
                                   "`umvd-live serve` on free loopback ports, show its live status and end "
                                   "with a summary: frames, fps, latency, PSNR of raw and denoised against "
                                   "the truth (docs/demo.md).")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds of streaming (default 60; Ctrl-C ends early, with the summary)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(256, 256),
                   help="frame height and width in pixels (default 256 256)")
    p.add_argument("--rate", type=float, default=30.0, help="frames per second (default 30)")
    p.add_argument("--photons", type=float, default=2.0,
                   help="mean detected photons per pixel per frame (default 2)")
    p.add_argument("--preset", choices=PRESETS, default="auto",
                   help="network size (default auto: paper on a GPU; on a CPU lite, fast from 512²)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="compute device (default: auto)")
    p.add_argument("--window", type=int, metavar="N", help="frames per window, odd, 3 to 101 (default: the engine's)")
    p.add_argument("--warmup-frames", type=int, metavar="F",
                   help="frames of the warm start (default: the demo's, shorter than serve's for a short demo)")
    p.add_argument("--warmup-steps", type=int, metavar="S",
                   help="training steps of the warm start (default: the demo's, fewer than serve's)")
    p.add_argument("--json", type=user_path, metavar="PATH", help="also write the summary's figures as JSON")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulation and the network (default 0)")
    p.add_argument("--oracle", choices=("reduced", "full", "none"), default="reduced",
                   help="the Gaussian filters the truth picks per metric, beside which the summary scores the "
                        "activity, searched after the stream (default reduced: a coarser sigma grid)")
    p.set_defaults(module="umvd_live.apps.demo", run=_run_demo)


def _view(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("view", help="napari viewer: raw beside denoised, live status and controls",
                       description="Open napari with the live dock widget, subscribed to a running daemon: "
                                   "raw beside denoised, status, noise estimate, controls (docs/viewer.md).")
    p.add_argument("--connect", default="tcp://127.0.0.1:5556", help="daemon output endpoint")
    p.add_argument("--control", default="tcp://127.0.0.1:5557", help="daemon control endpoint")
    p.add_argument("--stream",
                   help="stream, or acquisition (group such as cam0), to show first (default: the first seen)")
    p.add_argument("--region", type=int, nargs=4, metavar=("ROW0", "ROW1", "COL0", "COL1"),
                   help="draw this region (pixels, end excluded) at the first frame")
    p.add_argument("--quit-after", type=float, metavar="S",
                   help="close the window after S seconds (with --screenshot: for docs and smoke tests)")
    p.add_argument("--screenshot", type=user_path, metavar="PNG",
                   help="with --quit-after (needed): save the whole window first")
    p.set_defaults(module="umvd_live.viewer.qt.app", run=_run_view)


def _bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure real-time speed and quality on a simulated stream",
                       description="Run a simulated stream through the daemon in real time and measure "
                                   "fps, latency, skipped frames, training speed, memory and PSNR "
                                   "against the simulation's ground truth.")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(256, 256),
                   help="frame height and width in pixels (default 256 256)")
    p.add_argument("--rate", type=float, default=30.0, metavar="HZ", help="frames per second (default 30)")
    p.add_argument("--frames", type=int, default=None, metavar="N",
                   help="frames to stream (default 900; with --events, 60 s worth)")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="seconds to stream at --rate, instead of --frames")
    p.add_argument("--photons", type=float, default=2.0, help="photons/pixel/frame (default 2)")
    p.add_argument("--events", metavar="SPEC",
                   help="a scripted session, binned after each change: 'default' (issue 15: laser x3 at 1/2, "
                        "stage move 40 px at 2/3, laser x1/3 at 5/6 of the session) or a list such as "
                        "laser=3@30s,move=40@40s,laser=1/3@50s (times in s or as fractions)")
    p.add_argument("--oracle", choices=("reduced", "full", "none"), default="reduced",
                   help="the Gaussian filters the truth picks per metric, beside which the activity is "
                        "scored, searched after the stream (default reduced: a coarser sigma grid)")
    p.add_argument("--score-every", type=float, default=None, metavar="S",
                   help="score the activity again in spans of S seconds of the stream, each beside its own "
                        "oracles: how the live output comes along as the network trains (a run longer than "
                        "--ring-mb holds is scored on the ring's first pass only)")
    _engine_args(p)
    p.add_argument("--warmup-steps", type=int, default=None, metavar="S",
                   help="training steps of the warm start before the output goes live "
                        "(default: the engine's)")
    p.add_argument("--catchup-ms", type=float, default=100.0, metavar="MS",
                   help="the daemon's preview catch-up budget (default 100, as `serve`)")
    p.add_argument("--streams", type=int, default=1, metavar="N",
                   help="simulated streams at once, as the channels of an MDA: sim.c0, sim.c1, … with "
                        "their own fields and brightness, one frame of each per time point, --rate "
                        "time points per second (default 1: one stream, named bench)")
    _budget_arg(p)
    p.add_argument("--max", action="store_true",
                   help="no pacing: each frame as soon as the daemon took the previous one (throughput)")
    p.add_argument("--inference-only", action="store_true",
                   help="no online training: --init weights, or an untrained network (speed only)")
    p.add_argument("--save-model", type=user_path, metavar="PATH",
                   help="save the weights at the end (for a later --init)")
    p.add_argument("--save-outputs", type=user_path, metavar="PATH.npz",
                   help="save each stream's raw, truth and live output frames of the ring's first pass "
                        "(for pictures: tools/figure_real.py live)")
    p.add_argument("--ring-mb", type=float, default=512.0, metavar="MB",
                   help="memory for the pre-generated frames; longer runs replay them (default 512)")
    p.add_argument("--rss-every", type=float, default=10.0, metavar="S",
                   help="seconds between the resident-memory samples in the JSON (default 10)")
    p.add_argument("--json", type=user_path, metavar="PATH", help="write the figures as JSON")
    p.set_defaults(module="umvd_live.apps.bench", run=_run_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="umvd-live", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print umvd-live's version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_demo, _denoise, _batch, _serve, _acquire, _view, _bench, _keys):
        add(sub)
    for command in sub.choices.values():  # every command logs alike (umvd_live.apps.logs)
        logs.add_argument(command)
    return parser


def _version() -> str:
    from umvd_live import __version__

    return __version__


# ---- flags -> configurations ----------------------------------------------------------------------
Config = TypeVar("Config")


def _file_path(flag: str, text: str | None) -> Path | None:
    """A file flag's path; one that names an existing folder is refused now, not after the session."""
    if text is None:
        return None
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{flag}: {path} is a folder; give a file name (in it, for example)")
    return path


def _catchup_s(args: argparse.Namespace) -> float:
    """``--catchup-ms`` in seconds, refused below 0 in the flag's own unit."""
    if not args.catchup_ms >= 0:
        raise ValueError(f"--catchup-ms must be >= 0 ms, got {args.catchup_ms:g}")
    return float(args.catchup_ms) / 1000.0


def _naming_flags(make: Callable[[], Config], flags: dict[str, str]) -> Config:
    """``make()``; a refusal's message names the flags (``flags``: field -> flag), not the fields
    (``cpu_threads must be >= 1`` was all `--threads 0` said)."""
    try:
        return make()
    except ValueError as exc:
        message = str(exc)
        for name, flag in flags.items():
            message = re.sub(rf"\b{name}\b", flag, message)
        raise ValueError(message) from exc


def _given(args: argparse.Namespace, names: dict[str, str]) -> dict[str, Any]:
    """``{field: args.flag}`` for the flags given (not None): the others keep their field default."""
    return {field: getattr(args, flag) for flag, field in names.items() if getattr(args, flag, None) is not None}


#: Engine flags (argparse dest) -> `EngineConfig` fields.
ENGINE_FLAGS = {"preset": "preset", "device": "device", "window": "window", "context": "context",
                "warmup_frames": "warmup_frames", "warmup_steps": "warmup_steps", "init": "init",
                "prior": "prior", "seed": "seed", "batch": "max_batch", "workers": "workers",
                "precision": "precision", "compile": "compile", "steps_per_frame": "steps_per_frame",
                "threads": "cpu_threads", "keep_amplitude": "keep_amplitude",
                "blend_px": "blend_px", "follow_jitter": "follow_jitter"}
#: The fields named otherwise than their flag -> the flag, for the messages of `EngineConfig` and
#: `DaemonConfig` (same units; ``--catchup-ms`` is checked in its own, `_catchup_s`).
FIELD_FLAGS = {"cpu_threads": "--threads", "max_batch": "--batch", "status_interval_s": "--status-interval",
               "checkpoint_interval_s": "--checkpoint-interval", "idle_after_s": "--idle-s"}


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The engine flags of `denoise`, `batch`, `serve` and `bench` as an `EngineConfig`; flags not
    given keep the config's defaults."""
    from dataclasses import replace

    from umvd_live.engine import EngineConfig

    return _naming_flags(lambda: replace(EngineConfig(**_given(args, ENGINE_FLAGS)), **overrides), FIELD_FLAGS)


def denoise_config(args: argparse.Namespace) -> DenoiseConfig:
    from umvd_live.apps.denoise import DenoiseConfig

    return DenoiseConfig(input=Path(args.input), output=Path(args.output), engine=engine_config_from_args(args),
                         offline=args.offline, save_model=_file_path("--save-model", args.save_model),
                         streams=tuple(args.streams))


def demo_config(args: argparse.Namespace) -> DemoConfig:
    """`demo`'s flags as a `DemoConfig`; ``--json``'s folder is made now, so that a bad path is
    refused before the session, not after it."""
    from umvd_live.apps.demo import DemoConfig

    for flag in ("--duration", "--rate", "--photons"):
        finite_positive(flag, getattr(args, flag[2:]))
    json_path = _file_path("--json", args.json)
    if json_path is not None:
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--json: cannot create the folder {json_path.parent}: {exc}") from exc
    return DemoConfig(duration_s=args.duration, height=args.size[0], width=args.size[1], rate_hz=args.rate,
                      photons=args.photons, preset=args.preset, device=args.device, seed=args.seed,
                      json_path=json_path, oracle=args.oracle,
                      **_given(args, {"window": "window", "warmup_frames": "warmup_frames",
                                      "warmup_steps": "warmup_steps"}))


def daemon_config_from_args(args: argparse.Namespace) -> DaemonConfig:
    """`serve`'s flags as a `DaemonConfig` (its engine: `engine_config_from_args`, training in the
    background; ``--record``: a recording of every stream from the start, the operator's path)."""
    from umvd_live.daemon.config import DaemonConfig
    from umvd_live.wire.security import CurveServerConfig, SecurityError

    connect = tuple(args.input_connect or ())
    if args.input is not None:
        input_bind = args.input
    else:
        input_bind = None if connect else DaemonConfig.input_bind
    key, clients = args.curve_server_key, args.curve_clients
    if (key is None) != (clients is None):
        raise SecurityError("CURVE needs both --curve-server-key and --curve-clients")
    recording = None
    if args.record is not None:
        from umvd_live.recording.session import RecordingRequest

        recording = RecordingRequest(path=Path(args.record))
    engine = engine_config_from_args(args, train_mode="background")
    return _naming_flags(lambda: DaemonConfig(
        engine=engine, input_bind=input_bind, input_connect=connect, output=args.output, control=args.control,
        recording=recording, output_dir=Path(args.output_dir),
        state_dir=Path(args.state_dir) if args.state_dir else None,
        ready_file=Path(args.ready_file) if args.ready_file else None,
        max_streams=args.max_streams, inbox_bytes=int(finite_positive("--inbox-mb", args.inbox_mb) * 2**20),
        status_interval_s=args.status_interval, catchup_s=_catchup_s(args), cpu_budget=args.cpu_budget,
        checkpoint_interval_s=args.checkpoint_interval, idle_after_s=args.idle_s, allow_remote=args.allow_remote,
        curve=CurveServerConfig(Path(key), Path(clients)) if key is not None and clients is not None else None,
    ), FIELD_FLAGS)


def bench_config(args: argparse.Namespace) -> BenchConfig:
    from umvd_live.apps.bench import DEFAULT_FRAMES, BenchConfig
    from umvd_live.apps.harness import SESSION_S, session_events
    from umvd_live.daemon.config import DaemonConfig

    height, width = args.size
    if not args.max:
        finite_positive("--rate", args.rate)
    finite_positive("--rss-every", args.rss_every)
    finite_positive("--photons", args.photons)
    save_model, json_path = _file_path("--save-model", args.save_model), _file_path("--json", args.json)
    save_outputs = _file_path("--save-outputs", args.save_outputs)
    if save_outputs is not None and save_outputs.suffix != ".npz":
        raise ValueError(f"--save-outputs: {save_outputs} must end in .npz (numpy's np.load reads it)")
    frames, duration, spec = args.frames, args.duration, args.events
    if frames is not None and duration is not None:
        raise ValueError("give --frames or --duration, not both")
    if duration is not None:
        if args.max or not (math.isfinite(duration) and duration > 0):
            raise ValueError(f"--duration needs a paced stream (--rate) and a finite number > 0 s, got {duration:g}")
        frames = max(1, round(duration * args.rate))
    if frames is None:
        frames = round(SESSION_S * args.rate) if spec and not args.max else DEFAULT_FRAMES
    events: tuple[SimEvent, ...] = ()
    if spec:
        if args.max or args.streams != 1:
            raise ValueError("--events scripts one paced stream: no --max, no --streams")
        events = session_events(spec, frames / args.rate, args.rate)
    daemon = DaemonConfig(
        engine=engine_config_from_args(args, train_mode="background"), input_bind=None, input_connect=(),
        output="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*", catchup_s=_catchup_s(args),
        cpu_budget=args.cpu_budget,
    )
    return BenchConfig(height=height, width=width, frames=frames, rate_hz=None if args.max else float(args.rate),
                       photons=args.photons, inference_only=args.inference_only,
                       ring_bytes=int(finite_positive("--ring-mb", args.ring_mb) * 2**20), rss_every_s=args.rss_every,
                       save_model=save_model, daemon=daemon, streams=args.streams,
                       events=events, events_spec=spec, oracle=args.oracle, json_path=json_path,
                       save_outputs=save_outputs, score_every_s=args.score_every)


def acquire_config(args: argparse.Namespace) -> AcquireConfig:
    from umvd_live.apps.acquire import AcquireConfig, PublishConfig

    publish = PublishConfig(to=args.to, stream=args.stream, wait_s=args.wait_s, sndhwm=args.sndhwm)
    return AcquireConfig(
        source=args.source, publish=publish, frames=args.frames, queue=args.queue, rate_hz=args.rate,
        size=tuple(args.size), photons=args.photons, seed=args.seed,
        file=Path(args.file) if args.file else None, loop=args.loop, file_timing=args.file_timing,
        series=args.series, channel=args.channel, mm_config=args.config, mm_path=args.mm_path,
        exposure_ms=args.exposure_ms, interval_ms=args.interval_ms, live=args.live, mda=args.mda,
        mode=args.mode, mm_port=args.mm_port, connect_attempts=args.connect_attempts, retry_s=args.retry_s,
        poll_ms=args.poll_ms, save_dir=args.save_dir,
    )


def viewer_config(args: argparse.Namespace) -> ViewerConfig:
    """`view`'s flags as a `ViewerConfig`; ``--quit-after`` and ``--screenshot`` checked before the
    window opens."""
    from umvd_live.viewer.qt.app import MAX_QUIT_AFTER_S
    from umvd_live.viewer.session import ViewerConfig

    if args.quit_after is not None and finite_positive("--quit-after", args.quit_after) > MAX_QUIT_AFTER_S:
        raise ValueError(f"--quit-after must be at most {int(MAX_QUIT_AFTER_S)} s (about 24 days; Qt's timer), "
                         f"got {args.quit_after:.0f}")
    if args.screenshot is not None and args.quit_after is None:
        raise ValueError("--screenshot needs --quit-after S: the window is saved after S seconds, then closed")
    region = tuple(args.region) if args.region else None
    return ViewerConfig(output=args.connect, control=args.control, stream=args.stream, region=region)


# ---- the commands ---------------------------------------------------------------------------------
def _configured(args: argparse.Namespace, make: Callable[[argparse.Namespace], Config]) -> Config | None:
    """The command's configuration, or None after saying on stderr why the flags make none."""
    try:
        return make(args)
    except ValueError as exc:
        print(f"umvd-live {args.command}: {exc}", file=sys.stderr)
        return None


def _run_module(args: argparse.Namespace) -> int:
    """`batch` reads its flags in its own ``run``."""
    return int(sys.modules[args.module].run(args) or 0)


def _run_denoise(args: argparse.Namespace) -> int:
    from umvd_live.apps import denoise

    config = _configured(args, denoise_config)
    return 2 if config is None else denoise.run(config)


def _run_serve(args: argparse.Namespace) -> int:
    from umvd_live.daemon import service

    config = _configured(args, daemon_config_from_args)  # SecurityError is a ValueError
    return 2 if config is None else service.run(config)


def _run_demo(args: argparse.Namespace) -> int:
    from umvd_live.apps import demo

    config = _configured(args, demo_config)
    return 2 if config is None else demo.run(config)


def _run_bench(args: argparse.Namespace) -> int:
    from umvd_live.apps import bench

    config = _configured(args, bench_config)
    return 2 if config is None else bench.run(config)


def _run_acquire(args: argparse.Namespace) -> int:
    from umvd_live.apps import acquire

    config = _configured(args, acquire_config)
    return 2 if config is None else acquire.run(config)


def _run_view(args: argparse.Namespace) -> int:
    from umvd_live.viewer.qt import app

    config = _configured(args, viewer_config)
    if config is None:
        return 2
    return app.run(config, quit_after_s=args.quit_after, screenshot=Path(args.screenshot) if args.screenshot else None)


def _run_keys(args: argparse.Namespace) -> int:
    """``umvd-live keys DIR NAME``."""
    from umvd_live.wire.security import SecurityError, create_keypair

    try:
        public, secret = create_keypair(args.directory, args.name)
    except (SecurityError, OSError) as exc:
        print(f"umvd-live keys: {exc}", file=sys.stderr)
        return 2
    print(f"public key (copy to the other side): {public}")
    print(f"secret key (keep private):           {secret}")
    return 0


def tolerant_output() -> None:
    """Let stdout write what its encoding lacks as Python's stderr always does (``\\u2192`` for
    '→'): a redirected stdout on Windows is cp1252, and a summary's arrow or sigma raised
    UnicodeEncodeError at the very end of a run."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", None) == "strict":
            reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    tolerant_output()
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    try:
        # SIGTERM and (Windows) Ctrl-Break end every command as Ctrl-C does, through its
        # KeyboardInterrupt clean-up, from the start (docs/architecture.md, "Stop signals")
        with stop_signals_as_ctrl_c():
            tune_process(args.module)  # the command's module, imported with the process settings applied
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130

