"""Movie files that `denoise` and `batch` must refuse with one clear line, never a traceback:
files damaged in ways tifffile or zarr report with their own exceptions, and files whose metadata
says they hold one time point (a z-stack, a snapshot of channels), which are no movie."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
from command_line import run_umvd_live

from umvd_live.apps import denoise
from umvd_live.recording.movie import MovieError, MovieFrames, movie_streams, open_movie

#: Tiny and fast (the refusals come before any training).
ENGINE = ["--preset", "lite", "--warmup-frames", "10", "--warmup-steps", "5", "--steps-per-frame", "0.2",
          "--context", "4", "--threads", "1"]


def _truncated_ome_tiff(tmp_path: Path, fraction: float = 0.95) -> Path:
    """A two-channel OME-TIFF cut short (a copy or an acquisition that stopped): its first pages
    parse, its later IFDs do not."""
    movie = np.random.default_rng(0).poisson(50, (20, 2, 32, 32)).astype(np.uint16)
    full = tmp_path / "full.ome.tif"
    tifffile.imwrite(full, movie, ome=True, metadata={"axes": "TCYX"})
    raw = full.read_bytes()
    cut = tmp_path / f"cut{round(fraction * 100)}.ome.tif"
    cut.write_bytes(raw[: int(len(raw) * fraction)])
    return cut


def test_a_damaged_tiff_is_one_movie_error_never_a_traceback(tmp_path):
    """tifffile reports a file damaged past its first page from its series' parsing (a
    TiffFileError from ``len(tif.series)``), after the header opened: that used to escape
    `TiffMovie`, so one such file among a batch's inputs killed the batch, and `denoise` died
    with a traceback. Every way of opening it now gives MovieError naming the file."""
    from umvd_live.apps.batch import stream_items

    cut = _truncated_ome_tiff(tmp_path)
    for opening in (lambda: open_movie(cut), lambda: MovieFrames(cut), lambda: movie_streams(cut),
                    lambda: denoise.stream_outputs(cut, tmp_path / "o.ome.tif")):
        with pytest.raises(MovieError, match=r"cut95\.ome\.tif: not readable as a TIFF movie \(TiffFileError"):
            opening()
    (item,) = stream_items(cut, tmp_path / "o.ome.tif", [])
    assert item.status == "failed" and "not readable as a TIFF movie" in (item.error or "")
    # cut anywhere: a MovieError (or a movie that reads), never another exception
    for fraction in np.linspace(0.05, 0.99, 25):
        path = _truncated_ome_tiff(tmp_path, fraction)
        try:
            for stream, _ in denoise.stream_outputs(path, tmp_path / "o.ome.tif"):
                with MovieFrames(path, stream) as movie:
                    movie.read(0, len(movie))
        except MovieError:
            pass
    done = run_umvd_live("denoise", cut, tmp_path / "out.ome.tif", *ENGINE)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("umvd-live denoise: error:")]
    assert len(errors) == 1 and "not readable as a TIFF movie" in errors[0], done.stderr
    assert not (tmp_path / "out.ome.tif").exists()


def test_a_tiff_damaged_past_its_first_pages_fails_when_read_with_one_line(tmp_path):
    """A file whose header and pages parse but whose later frames' data is garbage opens (a chunk
    task reads only its span) and fails when those frames are read, with MovieError."""
    movie = np.random.default_rng(0).poisson(50, (12, 16, 16)).astype(np.uint16)
    path = tmp_path / "late.ome.tif"
    tifffile.imwrite(path, movie, ome=True, metadata={"axes": "TYX"}, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        spans = [(tif.pages[t].dataoffsets[0], tif.pages[t].databytecounts[0]) for t in range(6, 12)]
    with path.open("r+b") as f:
        for offset, size in spans:
            f.seek(offset)
            f.write(b"\xff" * size)
    with MovieFrames(path) as reader:
        np.testing.assert_array_equal(reader.read(0, 6), movie[:6])
        with pytest.raises(MovieError, match=r"late\.ome\.tif: frames 0-12 not readable"):
            reader.read(0, 12)


@pytest.mark.parametrize("damage", ["no datasets", "omero channels not a list"])
def test_malformed_ome_zarr_metadata_is_one_movie_error(tmp_path, damage):
    """OME-Zarr metadata that parses as JSON but not as OME (an empty ``datasets`` list, an
    ``omero.channels`` that is a string) raised IndexError or AttributeError from the store's
    reading, which escaped `ZarrMovie` (it caught only RecordingFormatError and RuntimeError)."""
    zarr = pytest.importorskip("zarr")
    from umvd_live.apps.batch import stream_items

    store = tmp_path / "bad.ome.zarr"
    group = zarr.open_group(str(store), mode="w", zarr_format=2)
    array = group.create_array("0", shape=(10, 32, 32), dtype="uint16", chunks=(1, 32, 32))
    array[...] = np.random.default_rng(0).poisson(50, (10, 32, 32)).astype(np.uint16)
    multiscale = {"version": "0.4", "axes": [{"name": "t", "type": "time"}, {"name": "y", "type": "space"},
                                             {"name": "x", "type": "space"}],
                  "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}]}]}
    attrs: dict = {"multiscales": [multiscale]}
    if damage == "no datasets":
        multiscale["datasets"] = []
    else:
        attrs["omero"] = {"channels": "GFP"}
    group.attrs.update(attrs)
    for opening in (lambda: open_movie(store), lambda: MovieFrames(store), lambda: movie_streams(store)):
        with pytest.raises(MovieError, match=r"bad\.ome\.zarr: not readable as an OME-Zarr movie"):
            opening()
    (item,) = stream_items(store, tmp_path / "o.ome.tif", [])
    assert item.status == "failed" and "not readable as an OME-Zarr movie" in (item.error or "")


def test_batch_stream_items_turns_any_error_into_a_failed_item(tmp_path, monkeypatch):
    """Whatever reading an input's streams raises, the batch gets a failed item for that input
    (one line, the others go on), not an exception that ends the batch before any work."""
    from umvd_live.apps import batch

    def broken(source, output, wanted=()):
        raise KeyError("Pixels")

    monkeypatch.setattr(batch.denoise, "stream_outputs", broken)
    (item,) = batch.stream_items(tmp_path / "x.tif", tmp_path / "out" / "x.ome.tif", [])
    assert item.status == "failed"
    assert item.error == f"{tmp_path / 'x.tif'}: not readable as a movie (KeyError: 'Pixels')"


def _one_time_point_files(tmp_path: Path) -> dict[str, Path]:
    """A z-stack (SizeZ=20) and a snapshot of 3 unnamed channels, each saying SizeT=1 in its
    OME-XML; tifffile squeezes the T of 1, leaving a ZYX or CYX stack."""
    rng = np.random.default_rng(0)
    zstack = tmp_path / "zstack.ome.tif"
    tifffile.imwrite(zstack, rng.poisson(50, (1, 1, 20, 32, 32)).astype(np.uint16), ome=True,
                     metadata={"axes": "TCZYX", "PhysicalSizeZ": 1.0})
    snap = tmp_path / "snap.ome.tif"
    levels = np.stack([rng.poisson(lam, (32, 32)) for lam in (100, 1000, 10000)]).astype(np.uint16)
    tifffile.imwrite(snap, levels[None, :, None], ome=True, metadata={"axes": "TCZYX"})
    return {"ZYX": zstack, "CYX": snap}


def test_an_ome_tiff_of_one_time_point_is_no_movie(tmp_path):
    """An OME-TIFF whose OME-XML says SizeT=1 with planes along Z or labelled channels was read as
    a time series along them (the exception for a single 3-D stack): a z-stack came back as a
    20-frame movie, a snapshot's channels were mixed in one window. It is refused, in `denoise`
    with one line and exit status 2; a stack that says nothing (tifffile's unlabelled default,
    SizeC = planes, unnamed, XYCZT) is still read as a movie."""
    for axes, path in _one_time_point_files(tmp_path).items():
        message = rf"{path.name}: expected a T×H×W movie, got \d+ streams of one frame each: the file says it has " \
                  rf"one time point \(axes {axes}\).*nothing to denoise over time"
        with pytest.raises(MovieError, match=message):
            MovieFrames(path)
        with pytest.raises(MovieError, match=message):
            movie_streams(path)
        done = run_umvd_live("denoise", path, tmp_path / f"{path.stem}_dn.ome.tif", *ENGINE)
        assert done.returncode == 2 and "one time point" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not (tmp_path / f"{path.stem}_dn.ome.tif").exists()
    unlabelled = tmp_path / "unlabelled.ome.tif"
    frames = np.random.default_rng(1).integers(0, 1000, (12, 16, 16)).astype(np.uint16)
    tifffile.imwrite(unlabelled, frames, ome=True)
    with MovieFrames(unlabelled) as movie:
        assert movie.shape == (12, 16, 16)
        np.testing.assert_array_equal(movie.read(0, 12), frames)


def test_an_ome_zarr_of_one_time_point_is_refused_as_the_tiff_is(tmp_path):
    """The same z-stack as OME-Zarr (a ``t`` axis of length 1) gets the TIFF's refusal; a store
    with no ``t`` axis says nothing of time and, a single 3-D stack, is still read as a movie."""
    zarr = pytest.importorskip("zarr")

    def store(name: str, axes: str, shape: tuple[int, ...]) -> Path:
        path = tmp_path / name
        group = zarr.open_group(str(path), mode="w", zarr_format=2)
        array = group.create_array("0", shape=shape, dtype="uint16", chunks=(1,) * (len(shape) - 2) + shape[-2:])
        array[...] = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
        kinds = {"t": "time", "c": "channel"}
        group.attrs.update({"multiscales": [{
            "version": "0.4", "axes": [{"name": a, "type": kinds.get(a, "space")} for a in axes],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * len(axes)}]}],
        }]})
        return path

    zstack = store("zstack.ome.zarr", "tczyx", (1, 1, 20, 16, 16))
    with pytest.raises(MovieError, match=r"got 20 streams of one frame each: the file says it has one time point"):
        MovieFrames(zstack)
    with pytest.raises(MovieError, match="one time point"):
        movie_streams(zstack)
    with MovieFrames(store("slices.ome.zarr", "zyx", (20, 16, 16))) as movie:
        assert movie.shape == (20, 16, 16)
