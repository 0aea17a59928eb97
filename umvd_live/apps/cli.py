"""`umvd-live` command line: one sub-command per capability, each delegating to its module.

The modules are imported only when their command runs, so `umvd-live --help` stays fast and the
core commands never import Qt or the Micro-Manager libraries.
"""

from __future__ import annotations

import argparse
import sys

from umvd_live.apps import logs
from umvd_live.daemon.runtime import tune_process

PRESETS = ("auto", "lite", "fast", "paper")
DEVICES = ("auto", "cpu", "cuda")


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
    p.add_argument("--window", type=int, default=7, metavar="N", help="frames per window, odd (default 7)")
    p.add_argument("--context", type=parse_context, metavar="A,B,..",
                   help="lengths of the blocks of earlier frames the network also sees, or 'none' "
                        "(default: the preset's; lite and fast 8,24,64, paper none)")
    p.add_argument("--warmup-frames", type=int, default=300, metavar="F",
                   help="frames of the initial burst the warm start trains on (default 300)")
    p.add_argument("--init", metavar="PATH", help="start from weights saved by an earlier session")
    p.add_argument("--prior", default="auto", metavar="auto|none|PATH",
                   help="weights a new stream starts on, shown while they beat a temporal mean (default "
                        "auto: the prior shipped for the network; none: from scratch; --init wins)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="arithmetic of the networks (default auto: bf16 where the hardware has it, an "
                        "Ampere or later GPU or a CPU with AVX512-BF16 or AMX; else fp32)")
    p.add_argument("--batch", type=int, metavar="B",
                   help="windows denoised per forward pass when frames wait (default: 16 on a GPU, "
                        "1 on a CPU, where batches are slower)")
    if inference_workers:
        p.add_argument("--workers", type=int, metavar="W",
                       help="forward passes run side by side when windows wait (default: 2 on a CPU when "
                            "training runs in the background, the second using the trainer's core while "
                            "it rests; 1 otherwise)")
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
    p.add_argument("--steps-per-frame", type=float, default=4.0, metavar="S",
                   help="training steps after each frame as the movie is trained along (default 4: a file "
                        "need not keep pace)")
    p.add_argument("--warmup-steps", type=int, default=None, metavar="S",
                   help="training steps of the warm start before the output goes live (default: the engine's)")
    p.add_argument("--threads", type=int, metavar="T",
                   help="torch threads on a CPU (default: every core this process may use; batch: "
                        "the cores divided among the tasks that run at once)")


def _denoise(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("denoise", help="denoise a TIFF/OME-TIFF movie through the streaming engine",
                       description="Denoise a recorded movie with the live engine: train along the movie "
                                   "(or on all of it: --offline), then denoise every frame with the final "
                                   "weights and context from both sides of the window; write an OME-TIFF "
                                   "with the input's pixel size, interval, channel and date (docs/engine.md).")
    p.add_argument("input", help="T×H×W movie: TIFF, OME-TIFF, ImageJ, NDTiff/MMStack or OME-Zarr (.ome.zarr)")
    p.add_argument("output", help="denoised movie, OME-TIFF or OME-Zarr by its extension (float32, same frame count, input units)")
    _engine_args(p)
    _file_args(p)
    p.add_argument("--save-model", metavar="PATH", help="save the final weights here")
    p.set_defaults(module="umvd_live.apps.denoise")


def _batch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="denoise many movies on a Dask cluster: this machine's or an existing one",
                       description="Denoise movies (files and glob patterns) with `denoise`'s engine on "
                                   "dask.distributed: a local cluster (--workers) or an existing scheduler "
                                   "(--scheduler); long movies are split in time chunks (docs/batch.md).")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="movies or quoted glob patterns ('raw/**/*.ome.tif'), in any format denoise reads")
    p.add_argument("--output-dir", required=True, metavar="DIR",
                   help="where each INPUT's output goes, under its name (workers must see it)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N",
                       help="a local cluster of N worker processes, the cores divided among them (default: "
                            "one per core up to 4 cores, then about √cores, as Dask's LocalCluster)")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="an existing Dask scheduler: tcp://HOST:PORT, or its scheduler file")
    _engine_args(p, inference_workers=False)
    _file_args(p)
    p.add_argument("--chunk-frames", type=int, default=2000, metavar="F",
                   help="movies longer than this are split in time chunks of at most F frames that share "
                        "one trained model (default 2000)")
    p.add_argument("--format", choices=("ome-tiff", "ome-zarr"), default="ome-tiff", help="output format")
    p.add_argument("--resume", action="store_true", help="skip the inputs whose output already exists")
    p.add_argument("--manifest", metavar="PATH", help="the batch's record (default DIR/batch-manifest.json)")
    p.add_argument("--retries", type=int, default=1, metavar="R",
                   help="reruns of a task that raised (a lost worker's tasks are rerun anyway; default 1)")
    p.add_argument("--save-models", action="store_true", help="save each movie's weights beside its output (NAME.pt)")
    p.set_defaults(module="umvd_live.apps.batch")


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
    p.add_argument("--control", default="tcp://127.0.0.1:5557", help="REP endpoint for control")
    _engine_args(p)
    p.add_argument("--record", metavar="PATH", help="record every denoised frame to this OME-TIFF")
    p.add_argument("--output-dir", default=".",
                   help="directory for paths given on the control socket (recordings; models "
                        "when there is no --state-dir)")
    p.add_argument("--state-dir", help="checkpoint each stream's weights here and reload at start; "
                                       "save_model/load_model paths are confined to it")
    p.add_argument("--warmup-steps", type=int, default=None, metavar="S",
                   help="training steps of the warm start before the output goes live "
                        "(default: the engine's)")
    p.add_argument("--catchup-ms", type=float, default=100.0, metavar="MS",
                   help="backlog, in estimated inference time, the preview works through before "
                        "it skips to the newest window (default 100)")
    p.add_argument("--max-streams", type=int, default=16, help="streams served at once (default 16)")
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
    sec.add_argument("--curve-server-key", metavar="FILE",
                     help="the daemon's CURVE key pair (NAME.key_secret from `umvd-live keys`): "
                          "every socket then requires an allowed client key")
    sec.add_argument("--curve-clients", metavar="DIR",
                     help="directory of the client public keys (*.key) allowed to connect")
    p.set_defaults(module="umvd_live.daemon.service")


def _keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="create a CURVE key pair for remote, authenticated connections",
                       description="Create NAME.key (public) and NAME.key_secret (private) in DIR "
                                   "(docs/security.md).")
    p.add_argument("directory", help="where to write the two files (created if missing)")
    p.add_argument("name", help="key name, e.g. daemon, or the client's host name")
    p.set_defaults(module="umvd_live.wire.security")


def _acquire(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("acquire", help="stream frames from a source into the daemon",
                       description="Stream frames from a source into the daemon (docs/adapters.md).")
    p.set_defaults(module="umvd_live.adapters.cli")
    p.add_argument("source", choices=("sim", "replay", "pymmcore-plus", "pycromanager"),
                   help="where frames come from: the simulator, a file, an in-process Micro-Manager core, "
                        "or Micro-Manager through pycromanager")
    p.add_argument("--to", default="tcp://127.0.0.1:5555", help="daemon input endpoint")
    p.add_argument("--stream", default="cam0",
                   help="stream name (topic); with channels, planes or positions the base name of one "
                        "stream per (position, channel, plane), e.g. cam0.GCaMP.z2 (docs/adapters.md)")
    p.add_argument("--frames", type=int, help="number of frames (default: source's own)")
    p.add_argument("--wait-s", type=float, default=10.0, metavar="S",
                   help="wait this long for the daemon's subscription before giving up (default 10)")
    p.add_argument("--sndhwm", type=int, default=2000, help=argparse.SUPPRESS)
    p.add_argument("--queue", type=int, default=256, metavar="N",
                   help="pymmcore-plus, pycromanager owner: hand-off queue length (default 256)")
    p.add_argument("--rate", type=float, default=30.0, help="frames per second (sim, replay)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(256, 256),
                   help="sim: frame height and width in pixels (default 256 256)")
    p.add_argument("--photons", type=float, default=2.0, help="sim: photons/pixel/frame")
    p.add_argument("--seed", type=int, default=0, help="sim: random seed of the simulated session (default 0)")
    p.add_argument("--file", help="replay: the movie to replay (TIFF, OME-TIFF, ScanImage, NDTiff, MMStack)")
    p.add_argument("--loop", action="store_true", help="replay: loop the file")
    p.add_argument("--file-timing", action="store_true", help="replay: pace at the file's timestamps")
    p.add_argument("--series", type=int, help="replay: only this series (position) of the file (default: all)")
    p.add_argument("--channel", type=int, help="replay: only this channel (default: all, a stream each)")
    p.add_argument("--config", help="pymmcore-plus, pycromanager owner: Micro-Manager configuration file")
    p.add_argument("--mm-path", help="Micro-Manager folder with the C++ device adapters the config uses")
    p.add_argument("--exposure-ms", type=float, help="pymmcore-plus, pycromanager --config: exposure")
    p.add_argument("--interval-ms", type=float, default=0.0,
                   help="pymmcore-plus, pycromanager owner: time-lapse interval (default 0)")
    p.add_argument("--live", action="store_true", help="pymmcore-plus: tap live mode instead of an MDA")
    p.add_argument("--mda", metavar="SEQUENCE.yaml",
                   help="pymmcore-plus: run this useq-schema MDA (channels, z, positions, time) instead "
                        "of a --frames time-lapse; a stream per (position, channel, plane)")
    p.add_argument("--mode", choices=("owner", "tap"), default="tap",
                   help="pycromanager: run our own acquisition (owner) or follow the GUI's (tap)")
    p.add_argument("--mm-port", type=int, default=4827, help="pycromanager: Micro-Manager's ZMQ port")
    p.add_argument("--connect-attempts", type=int, default=5,
                   help="pycromanager: tries to reach Micro-Manager, with back-off (default 5)")
    p.add_argument("--retry-s", type=float, default=1.0,
                   help="pycromanager: first back-off delay, doubled per try (default 1)")
    p.add_argument("--poll-ms", type=float, default=10.0, help="pycromanager tap: polling period")
    p.add_argument("--save-dir", help="pycromanager owner: where pycromanager saves the raw data")


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
    p.add_argument("--window", type=int, default=7, metavar="N", help="frames per window, odd (default 7)")
    p.add_argument("--warmup-frames", type=int, default=150, metavar="F",
                   help="frames of the warm start (default 150, shorter than serve's 300 for a short demo)")
    p.add_argument("--warmup-steps", type=int, default=100, metavar="S",
                   help="training steps of the warm start (default 100; serve's default is 400)")
    p.add_argument("--json", metavar="PATH", help="also write the summary's figures as JSON")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulation and the network (default 0)")
    p.add_argument("--oracle", choices=("reduced", "full", "none"), default="reduced",
                   help="the Gaussian filters the truth picks per metric, beside which the summary scores the "
                        "activity, searched after the stream (default reduced: a coarser sigma grid)")
    p.set_defaults(module="umvd_live.apps.demo")


def _view(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("view", help="napari viewer: raw beside denoised, live status and controls",
                       description="Open napari with the live dock widget, subscribed to a running daemon: "
                                   "raw beside denoised, status, noise estimate, controls (docs/viewer.md).")
    p.add_argument("--connect", default="tcp://127.0.0.1:5556", help="daemon output endpoint")
    p.add_argument("--control", default="tcp://127.0.0.1:5557", help="daemon control endpoint")
    p.add_argument("--stream", help="stream, or acquisition (group such as cam0), to show first (default: the first seen)")
    p.add_argument("--region", type=int, nargs=4, metavar=("ROW0", "ROW1", "COL0", "COL1"),
                   help="draw this region (pixels, end excluded) at the first frame")
    p.add_argument("--quit-after", type=float, metavar="S",
                   help="close the window after S seconds (with --screenshot: for docs and smoke tests)")
    p.add_argument("--screenshot", metavar="PNG", help="with --quit-after: save the whole window first")
    p.set_defaults(module="umvd_live.viewer.qt.app")


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
    p.add_argument("--save-model", metavar="PATH", help="save the weights at the end (for a later --init)")
    p.add_argument("--ring-mb", type=float, default=512.0, metavar="MB",
                   help="memory for the pre-generated frames; longer runs replay them (default 512)")
    p.add_argument("--rss-every", type=float, default=10.0, metavar="S",
                   help="seconds between the resident-memory samples in the JSON (default 10)")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p.set_defaults(module="umvd_live.apps.bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="umvd-live", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_demo, _denoise, _batch, _serve, _acquire, _view, _bench, _keys):
        add(sub)
    for command in sub.choices.values():  # every command logs alike (umvd_live.apps.logs)
        logs.add_argument(command)
    return parser


def _version() -> str:
    from umvd_live import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    module = tune_process(args.module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
