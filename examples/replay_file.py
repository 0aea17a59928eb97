"""Replay a recorded movie into `umvd-live serve`, as a library call (the CLI is
`umvd-live acquire replay --file MOVIE`).

    python examples/replay_file.py movie.ome.tif --file-timing --loop --frames 600
"""

from __future__ import annotations

import argparse
from pathlib import Path

from umvd_live.adapters.publisher import FramePublisher
from umvd_live.adapters.replay import ReplayConfig, replay
from umvd_live.recording.movie import TiffMovie


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("movie", type=Path)
    parser.add_argument("--to", default="tcp://127.0.0.1:5555")
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--file-timing", action="store_true")
    parser.add_argument("--loop", action="store_true")
    parser.add_argument("--frames", type=int)
    args = parser.parse_args()

    with TiffMovie(args.movie) as movie:  # reads one plane at a time
        times = movie.timestamps()
        print(f"{movie.kind}: {movie.n_frames} frames {movie.shape} {movie.dtype}, "
              f"timestamps: {'yes' if times is not None else 'none'}")
    publisher = FramePublisher(args.to, stream="replay")
    if not publisher.wait_for_subscriber(10):
        raise SystemExit(f"no daemon subscribed at {args.to}")
    config = ReplayConfig(args.movie, rate_hz=args.rate, file_timing=args.file_timing, loop=args.loop,
                          max_frames=args.frames)
    print(replay(publisher, config))
    publisher.close()


if __name__ == "__main__":
    main()
