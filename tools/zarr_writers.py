"""Which OME-Zarr writer to record with: throughput of appends and what a SIGKILL leaves.

Candidates (issue 18): ome-writers (its tensorstore backend; it has no other here), acquire-zarr,
tensorstore driven directly (the way `umvd_live.recording.omezarr` does: chunks written past the declared
shape, the shape grown at each checkpoint), and the crash-safe OME-TIFF writer for reference.
Every writer appends frames of an unknown count along T, one chunk per frame, uncompressed.

* ``throughput``: frames/s of ``--frames`` appends, the close included, for 256² and 512²
  uint16 and float32 frames; median of ``--repeats`` runs, configurations alternated.
* ``kill``: a child process appends frames as fast as it can (each frame filled with its
  index), the parent SIGKILLs it 0.3-1.3 s after its first frame, then reads the store back with
  zarr-python: the T the metadata declares, how many of those read back right, how many read as
  fill (0: a declared frame whose chunk never landed), whether yaozarrs validates the store.

    python tools/zarr_writers.py throughput --frames 400 --repeats 3
    python tools/zarr_writers.py kill --runs 5
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WRITERS = ("tiff", "ome-writers", "tensorstore", "acquire-zarr")
SUFFIX = {"tiff": ".ome.tif"}


class Writer:
    """One recording: `append` frames, `close`."""

    def __init__(self, kind: str, path: Path, shape: tuple[int, int], dtype: np.dtype):
        self.kind, self.path, self.shape, self.dtype = kind, path, shape, np.dtype(dtype)
        self.n = 0
        getattr(self, "_open_" + kind.replace("-", "_"))()

    # -- the candidates -----------------------------------------------------------------------
    def _open_tiff(self) -> None:
        from umvd_live.recording.ometiff import FrameInfo, Provenance, RecordingFile

        self._info, self._prov, self._cls = FrameInfo, Provenance("bench"), RecordingFile
        self._rec = None

    def _open_ome_writers(self) -> None:
        from ome_writers import (
            AcquisitionSettings,
            Dimension,
            OmeZarrFormat,
            create_stream,
        )

        h, w = self.shape
        self._stream = create_stream(AcquisitionSettings(
            root_path=str(self.path), dtype=self.dtype.name, format=OmeZarrFormat(backend="tensorstore"),
            dimensions=[Dimension(name="t", count=None, type="time", chunk_size=1),
                        Dimension(name="y", count=h, type="space"), Dimension(name="x", count=w, type="space")]))

    def _open_tensorstore(self) -> None:
        from umvd_live.recording.ometiff import FrameInfo, Provenance
        from umvd_live.recording.omezarr import ZarrRecording

        self._info, self._prov, self._cls = FrameInfo, Provenance("bench"), ZarrRecording
        self._rec = None

    def _open_acquire_zarr(self) -> None:
        import acquire_zarr as aqz

        h, w = self.shape
        dims = [aqz.Dimension(name="t", kind=aqz.DimensionType.TIME, array_size_px=0, chunk_size_px=1,
                              shard_size_chunks=1),
                aqz.Dimension(name="y", kind=aqz.DimensionType.SPACE, array_size_px=h, chunk_size_px=h,
                              shard_size_chunks=1),
                aqz.Dimension(name="x", kind=aqz.DimensionType.SPACE, array_size_px=w, chunk_size_px=w,
                              shard_size_chunks=1)]
        dtype = {np.dtype("uint16"): aqz.DataType.UINT16, np.dtype("float32"): aqz.DataType.FLOAT32}[self.dtype]
        self._aq = aqz.ZarrStream(aqz.StreamSettings(
            store_path=str(self.path), version=aqz.ZarrVersion.V3,
            arrays=[aqz.ArraySettings(dimensions=dims, data_type=dtype)]))

    # -- the common interface -----------------------------------------------------------------
    def append(self, frame: np.ndarray) -> None:
        if self.kind in ("tiff", "tensorstore"):
            info = self._info(seq=self.n)
            if self._rec is None:
                self._rec = self._cls.create(self.path, frame, info, self._prov)
            else:
                self._rec.append(frame, info)
        elif self.kind == "ome-writers":
            self._stream.append(frame)
        else:
            self._aq.append(frame)
        self.n += 1

    def checkpoint(self) -> None:
        if self.kind in ("tiff", "tensorstore"):
            self._rec.checkpoint()
        # ome-writers and acquire-zarr have no flush short of closing

    def close(self) -> None:
        if self.kind in ("tiff", "tensorstore"):
            self._rec.close()
        elif self.kind == "ome-writers":
            self._stream.close()
        else:
            self._aq.close()


def frames_for(shape: tuple[int, int], dtype: str) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        return [rng.random(shape, dtype=np.float32) for _ in range(8)]
    return [rng.integers(0, 4096, shape, dtype=np.uint16) for _ in range(8)]


def throughput(args: argparse.Namespace) -> None:
    results: dict[tuple[str, int, str], list[float]] = {}
    configs = [(w, s, d) for s in args.sizes for d in ("uint16", "float32") for w in args.writers]
    for _ in range(args.repeats):
        for writer, size, dtype in configs:
            frames = frames_for((size, size), dtype)
            directory = Path(tempfile.mkdtemp(prefix="zarr-writers-", dir=args.dir))
            try:
                t0 = time.perf_counter()
                w = Writer(writer, directory / ("t" + SUFFIX.get(writer, ".ome.zarr")), (size, size), np.dtype(dtype))
                next_checkpoint = t0 + 1.0
                for i in range(args.frames):
                    w.append(frames[i % 8])
                    if time.perf_counter() >= next_checkpoint:  # as the recorder does, every second
                        w.checkpoint()
                        next_checkpoint += 1.0
                w.close()
                results.setdefault((writer, size, dtype), []).append(args.frames / (time.perf_counter() - t0))
            finally:
                shutil.rmtree(directory, ignore_errors=True)
    print(f"{args.frames} frames per run, one chunk per frame, uncompressed; median of {args.repeats} (each run)\n")
    print("| writer | frame | frames/s | MiB/s | runs |")
    print("|---|---|---|---|---|")
    for (writer, size, dtype), rates in results.items():
        mib = size * size * np.dtype(dtype).itemsize / 2**20
        med = statistics.median(rates)
        print(f"| {writer} | {size}² {dtype} | {med:.0f} | {med * mib:.0f} | {', '.join(f'{r:.0f}' for r in rates)} |")


CHILD = """
import sys, time, numpy as np
sys.path.insert(0, sys.argv[3])
from zarr_writers import Writer
w = Writer(sys.argv[1], __import__("pathlib").Path(sys.argv[2]), (128, 128), np.dtype("uint16"))
i = 0
next_checkpoint = time.perf_counter() + 0.25
while True:
    w.append(np.full((128, 128), i + 1, np.uint16))
    if i == 0:
        print("first", flush=True)
    if time.perf_counter() >= next_checkpoint:
        w.checkpoint(); next_checkpoint += 0.25
    i += 1
"""


def read_back(writer: str, path: Path) -> tuple[int, int, int, str]:
    """(declared T, frames right, frames reading as fill, yaozarrs verdict)."""
    import zarr

    if writer == "tiff":
        import tifffile

        with tifffile.TiffFile(path) as tif:
            data = tif.series[0].asarray().reshape(-1, 128, 128)
        valid = "n/a"
    else:
        try:
            group = zarr.open_group(path, mode="r")
            data = np.asarray(group["0"])
        except Exception as exc:  # noqa: BLE001 - a killed store may be anything: report it
            return -1, 0, 0, f"unreadable: {type(exc).__name__}"
        try:
            import yaozarrs

            yaozarrs.validate_zarr_store(str(path))
            valid = "valid"
        except Exception as exc:  # noqa: BLE001 - the verdict is the output
            valid = f"invalid ({type(exc).__name__})"
    right = sum(bool(np.all(data[i] == i + 1)) for i in range(len(data)))
    fill = sum(bool(np.all(data[i] == 0)) for i in range(len(data)))
    return len(data), right, fill, valid


def kill(args: argparse.Namespace) -> None:
    random.seed(1)
    here = str(Path(__file__).resolve().parent)
    print("| writer | run | killed after (s) | declared T | read right | read as fill (0) | other | yaozarrs |")
    print("|---|---|---|---|---|---|---|---|")
    for run in range(args.runs):
        for writer in args.writers:
            directory = Path(tempfile.mkdtemp(prefix="zarr-kill-", dir=args.dir))
            path = directory / ("k" + SUFFIX.get(writer, ".ome.zarr"))
            try:
                p = subprocess.Popen([sys.executable, "-c", CHILD, writer, str(path), here], stdout=subprocess.PIPE)
                assert p.stdout is not None and p.stdout.readline().strip() == b"first"
                delay = random.uniform(0.3, 1.3)
                time.sleep(delay)
                p.kill()  # SIGKILL on POSIX, TerminateProcess on Windows
                p.wait()
                declared, right, fill, valid = read_back(writer, path)
                print(f"| {writer} | {run} | {delay:.2f} | {declared} | {right} | {fill} "
                      f"| {max(declared, 0) - right - fill} | {valid} |")
            finally:
                shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("throughput", "kill"))
    ap.add_argument("--writers", nargs="+", default=list(WRITERS), choices=WRITERS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("."))
    args = ap.parse_args()
    (throughput if args.what == "throughput" else kill)(args)


if __name__ == "__main__":
    main()
