"""`umvd-live` command line: one sub-command per capability, each delegating to its module.

The modules are imported only when their command runs, so `umvd-live --help` stays fast and the
core commands never import Qt or the Micro-Manager libraries.
"""

from __future__ import annotations

import argparse
import importlib
import sys

PRESETS = ("auto", "lite", "paper")
DEVICES = ("auto", "cpu", "cuda")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESETS, default="auto", help="network size (default: auto)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="compute device (default: auto)")
    p.add_argument("--window", type=int, default=7, metavar="N", help="frames per window, odd (default 7)")
    p.add_argument("--warmup-frames", type=int, default=300, metavar="F",
                   help="frames of the initial burst the warm start trains on (default 300)")
    p.add_argument("--init", metavar="PATH", help="start from weights saved by an earlier session")
    p.add_argument("--seed", type=int, default=0)


def _denoise(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("denoise", help="denoise a TIFF/OME-TIFF movie through the streaming engine")
    p.add_argument("input", help="T×H×W TIFF or OME-TIFF movie")
    p.add_argument("output", help="denoised OME-TIFF (float32, same frame count, input units)")
    _engine_args(p)
    p.add_argument("--offline", action="store_true",
                   help="train on the whole movie first (the paper's recipe), then denoise")
    p.add_argument("--save-model", metavar="PATH", help="save the final weights here")
    p.set_defaults(module="umvd_live.filemode")


def _serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the live denoising daemon")
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
    p.add_argument("--inbox-mb", type=float, default=1024.0,
                   help="memory for received frames not processed yet; past it frames are "
                        "dropped and counted (default 1024)")
    p.add_argument("--status-interval", type=float, default=5.0, metavar="S",
                   help="seconds between status log lines when stdout is not a terminal (default 5)")
    p.set_defaults(module="umvd_live.daemon")


def _acquire(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("acquire", help="stream frames from a source into the daemon")
    p.set_defaults(module="umvd_live.adapters.cli")
    p.add_argument("source", choices=("sim", "replay", "pymmcore-plus", "pycromanager"))
    p.add_argument("--to", default="tcp://127.0.0.1:5555", help="daemon input endpoint")
    p.add_argument("--stream", default="cam0", help="stream name (topic)")
    p.add_argument("--frames", type=int, help="number of frames (default: source's own)")
    p.add_argument("--rate", type=float, default=30.0, help="frames per second (sim, replay)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(256, 256))
    p.add_argument("--photons", type=float, default=2.0, help="sim: photons/pixel/frame")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--file", help="replay: the movie to replay")
    p.add_argument("--loop", action="store_true", help="replay: loop the file")
    p.add_argument("--file-timing", action="store_true", help="replay: pace at the file's timestamps")
    p.add_argument("--config", help="pymmcore-plus: Micro-Manager configuration file")
    p.add_argument("--interval-ms", type=float, default=0.0, help="pymmcore-plus: MDA interval")
    p.add_argument("--live", action="store_true", help="pymmcore-plus: tap live mode instead of an MDA")
    p.add_argument("--mode", choices=("owner", "tap"), default="tap", help="pycromanager: mode")


def _demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a simulated two-photon session through the daemon, with a summary")
    p.add_argument("--duration", type=float, default=60.0, help="seconds (default 60; Ctrl-C ends early)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(256, 256))
    p.add_argument("--rate", type=float, default=30.0)
    p.add_argument("--photons", type=float, default=2.0)
    p.add_argument("--preset", choices=PRESETS, default="auto")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(module="umvd_live.demo")


def _view(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("view", help="napari viewer: raw beside denoised, live status and controls")
    p.add_argument("--connect", default="tcp://127.0.0.1:5556", help="daemon output endpoint")
    p.add_argument("--control", default="tcp://127.0.0.1:5557", help="daemon control endpoint")
    p.add_argument("--stream", help="stream to show first (default: the first seen)")
    p.set_defaults(module="umvd_live.viewer.app")


def _bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure real-time speed and quality on a simulated stream")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(256, 256))
    p.add_argument("--rate", type=float, default=30.0)
    p.add_argument("--frames", type=int, default=900)
    p.add_argument("--photons", type=float, default=2.0)
    p.add_argument("--preset", choices=PRESETS, default="auto")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--init", metavar="PATH", help="start from saved weights")
    p.add_argument("--max", action="store_true", help="no pacing: frames as fast as they are taken")
    p.add_argument("--inference-only", action="store_true", help="no online training")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(module="umvd_live.bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="umvd-live", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_demo, _denoise, _serve, _acquire, _view, _bench):
        add(sub)
    return parser


def _version() -> str:
    from umvd_live import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args.module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
