"""OME-Zarr (issue 18): recordings, `denoise` output and input, replay input. Real stores written
by the recorder and by ome-writers (what pymmcore-plus writes), read back by zarr-python,
ome-zarr-py, napari's OME-Zarr reader and yaozarrs' validator; a recorder killed with SIGKILL."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorstore")
zarr = pytest.importorskip("zarr")
yaozarrs = pytest.importorskip("yaozarrs")

from command_line import run_umvd_live

from umvd_live.adapters.publisher import FramePublisher
from umvd_live.adapters.replay import ReplayConfig, replay
from umvd_live.recording.movie import ZarrMovie, open_movie
from umvd_live.recording.ometiff import FrameInfo, Provenance
from umvd_live.recording.omezarr import FRAMES_FILE, ZarrRecording, read_zarr_recording, write_zarr_movie
from umvd_live.recording.session import RecordingRequest, RecordingSession, stream_path
from umvd_live.wire.protocol import FrameHeader

pytestmark = pytest.mark.timeout(120)
SHAPE = (24, 32)


def pattern(seq: int, shape=SHAPE, dtype=np.float32) -> np.ndarray:
    """A frame whose every pixel depends on its seq, so a misplaced frame cannot pass."""
    y, x = np.indices(shape)
    return ((y * 7 + x * 3 + seq * 11) % 251).astype(dtype) + (0.25 if dtype == np.float32 else 0)


def ome_zarr_nodes(path: Path) -> list:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    return list(Reader(parse_url(str(path)))())


META = {"group": "cam0", "channel": "GCaMP", "pixel_size_um": 0.65, "interval_ms": 50.0,
        "acquisition_datetime": "2026-01-02T03:04:05"}


def test_session_records_a_store_per_stream_raw_beside_denoised(tmp_path):
    session = RecordingSession(RecordingRequest(path=tmp_path / "rec.ome.zarr", raw=True),
                               provenance=lambda s: Provenance(stream=s, preset="lite", window=7))
    seqs = [0, 1, 2, 3, 7, 8, 9]  # upstream lost 4-6
    for i, seq in enumerate(seqs):
        for z in (0, 1):
            stream = f"cam0.GCaMP.z{z}"
            h = FrameHeader(seq=seq, shape=SHAPE, dtype="<u2", t=0.05 * seq,
                            meta={**META, "index": {"t": seq, "c": 0, "z": z}})
            assert session.submit_raw(stream, h, pattern(seq + 100 * z, dtype=np.uint16))
            assert session.submit_denoised(stream, h, pattern(seq + 100 * z), state="warmup" if i < 3 else "live",
                                           model_step=i, amplitude_gain=1.0 if i < 3 else 1.5 + 0.25 * i,
                                           jitter_shift_px=None if i < 5 else (0.5, -0.25 * i))
    assert session.stop(wait=True, timeout=30)
    st = session.status()
    assert st.error is None and st.frames_written == 4 * len(seqs)
    assert st.files["cam0.GCaMP.z1.raw"] == [str(tmp_path / "rec_cam0.GCaMP.z1.raw.ome.zarr")]
    assert stream_path(tmp_path / "rec.ome.zarr", "cam0") == tmp_path / "rec_cam0.ome.zarr"

    for z in (0, 1):
        path = tmp_path / f"rec_cam0.GCaMP.z{z}.ome.zarr"
        frames, infos, prov = read_zarr_recording(path)
        assert frames.dtype == np.float32 and frames.shape == (len(seqs), *SHAPE)
        assert all(np.array_equal(frames[i], pattern(s + 100 * z)) for i, s in enumerate(seqs))
        assert [f.seq for f in infos] == seqs and infos[4].meta["index"] == {"t": 7, "c": 0, "z": z}
        assert [f.amplitude_gain for f in infos] == [1.0] * 3 + [1.5 + 0.25 * i for i in range(3, len(seqs))]
        assert [f.jitter_shift_px for f in infos] == [None] * 5 + [(0.5, -0.25 * i) for i in range(5, len(seqs))]
        assert prov["seq_gaps"] == [(4, 6)] and prov["first_live_frame"] == 3
        assert prov["complete"] is True and prov["frames_declared"] == len(seqs)
        assert prov["kind"] == "denoised" and prov["preset"] == "lite" and prov["axis.z"] == z
        assert prov["acquisition_datetime"] == "2026-01-02T03:04:05"
        # the raw copy keeps the input's dtype and values: never replaced by denoised data
        raw, raw_infos, raw_prov = read_zarr_recording(tmp_path / f"rec_cam0.GCaMP.z{z}.raw.ome.zarr")
        assert raw.dtype == np.uint16 and raw_prov["kind"] == "raw"
        assert all(np.array_equal(raw[i], pattern(s + 100 * z, dtype=np.uint16)) for i, s in enumerate(seqs))
        assert [f.state for f in raw_infos] == [None] * len(seqs)
        assert [f.amplitude_gain for f in raw_infos] == [None] * len(seqs)
        # what other readers see: valid OME-Zarr 0.5, T x C x Y x X, the calibration on the axes
        yaozarrs.validate_zarr_store(str(path))
        (node,) = ome_zarr_nodes(path)
        assert node.data[0].shape == (len(seqs), 1, *SHAPE)
        assert node.metadata["channel_names"] == ["GCaMP"] and node.metadata["name"] == f"cam0.GCaMP.z{z} denoised"
        assert node.metadata["coordinateTransformations"][0][0]["scale"] == [0.05, 1.0, 0.65, 0.65]
        np.testing.assert_array_equal(np.asarray(zarr.open_group(str(path), mode="r")["0"])[:, 0], frames)


def test_napari_opens_a_recording_with_its_scale(tmp_path):
    pytest.importorskip("napari")
    pytest.importorskip("napari_ome_zarr")
    from napari.components import ViewerModel

    path = tmp_path / "n.ome.zarr"
    rec = ZarrRecording.create(path, pattern(0), FrameInfo(seq=0, meta=META), Provenance("cam0"))
    for i in range(1, 5):
        rec.append(pattern(i), FrameInfo(seq=i, meta=META))
    rec.close()
    import npe2

    npe2.PluginManager.instance().discover()  # napari leaves plugin discovery to its app, not to tests
    viewer = ViewerModel()
    layers = viewer.open(str(path), plugin="napari-ome-zarr")
    assert [(layer.name, layer.data.shape) for layer in layers] == [("cam0 denoised: GCaMP", (5, *SHAPE))]
    np.testing.assert_allclose(layers[0].scale[-2:], [0.65, 0.65])
    np.testing.assert_array_equal(np.asarray(layers[0].data[3]), pattern(3))


def test_a_store_is_never_overwritten_and_a_shape_change_starts_a_part(tmp_path):
    (tmp_path / "x_cam0.ome.zarr").mkdir()
    (tmp_path / "x_cam0.ome.zarr" / "precious").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        ZarrRecording.create(tmp_path / "x_cam0.ome.zarr", pattern(0), FrameInfo(seq=0), Provenance("cam0"))
    session = RecordingSession(RecordingRequest(path=tmp_path / "x.ome.zarr"))
    session.submit_denoised("cam0", FrameHeader(0, SHAPE, "<f4"), pattern(0), state="live", model_step=0)
    session.submit_denoised("cam0", FrameHeader(1, (8, 8), "<f4"), pattern(1, (8, 8)), state="live", model_step=1)
    session.stop(wait=True)
    assert session.status().files["cam0"] == [str(tmp_path / "x_cam0-part2.ome.zarr"),
                                              str(tmp_path / "x_cam0-part3.ome.zarr")]
    assert (tmp_path / "x_cam0.ome.zarr" / "precious").read_bytes() == b"keep"


_KILL_CHILD = textwrap.dedent("""
    import sys, time, numpy as np
    sys.path.insert(0, sys.argv[2])
    from test_zarr import pattern, META
    from umvd_live.wire.protocol import FrameHeader
    from umvd_live.recording.session import RecordingRequest, RecordingSession
    s = RecordingSession(RecordingRequest(path=sys.argv[1], raw=True, checkpoint_interval_s=0.2))
    seq = 0
    while True:
        h = FrameHeader(seq=seq, shape=(24, 32), dtype="<u2", t=seq * 0.01, meta=META)
        s.submit_raw("cam0", h, pattern(seq, dtype=np.uint16))
        s.submit_denoised("cam0", h, pattern(seq), state="warmup" if seq < 20 else "live", model_step=seq)
        seq += 1
        if seq % 5 == 0:
            print(s.status().frames_written, flush=True)
        time.sleep(0.002)
""")


def test_a_session_killed_with_sigkill_is_readable_up_to_the_last_flushed_chunk(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(tmp_path / "k.ome.zarr"),
                             str(Path(__file__).parent)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if int(line) >= 150:
                time.sleep(0.13)  # between two checkpoints
                break
        proc.kill()  # SIGKILL
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    for name, dtype in (("k_cam0.ome.zarr", np.float32), ("k_cam0.raw.ome.zarr", np.uint16)):
        path = tmp_path / name
        frames, infos, prov = read_zarr_recording(path)
        n = len(infos)
        assert n >= 60 and [f.seq for f in infos] == list(range(n))
        assert all(np.array_equal(frames[i], pattern(i, dtype=dtype)) for i in range(n))
        assert prov["complete"] is False and 1 <= prov["frames_declared"] <= n
        # OME readers see the frames declared at the last checkpoint, each of them written
        yaozarrs.validate_zarr_store(str(path))
        declared = np.asarray(ome_zarr_nodes(path)[0].data[0])[:, 0]
        assert declared.shape[0] == prov["frames_declared"]
        np.testing.assert_array_equal(declared, frames[: declared.shape[0]])


_BARE_CHILD = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, sys.argv[2])
    from test_zarr import pattern
    from umvd_live.recording.ometiff import FrameInfo, Provenance
    from umvd_live.recording.omezarr import ZarrRecording
    shape = (200, 201)
    rec = ZarrRecording.create(sys.argv[1], pattern(0, shape), FrameInfo(seq=0), Provenance("k"))
    print(0, flush=True)
    seq = 1
    while True:
        rec.append(pattern(seq, shape), FrameInfo(seq=seq, state="live", model_step=seq))
        if seq % 7 == 0:
            rec.checkpoint()
        if seq % 25 == 0:
            print(seq, flush=True)
        seq += 1
""")


@pytest.mark.parametrize("frames_before_kill", [0, 75])
def test_a_writer_killed_at_full_speed_leaves_only_whole_frames(tmp_path, frames_before_kill):
    path = tmp_path / "w.ome.zarr"
    proc = subprocess.Popen([sys.executable, "-c", _BARE_CHILD, str(path), str(Path(__file__).parent)],
                            stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if int(line) >= frames_before_kill:
                break
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    frames, infos, prov = read_zarr_recording(path)
    n = len(infos)
    assert n >= max(1, frames_before_kill - 16)  # at most IN_FLIGHT writes were running
    assert prov["complete"] is False and prov["frames_declared"] <= n
    assert [f.seq for f in infos] == list(range(n))
    assert all(np.array_equal(frames[i], pattern(i, (200, 201))) for i in range(n))
    lines = (path / FRAMES_FILE).read_bytes().split(b"\n")
    assert len(lines) - 1 == n and json.loads(lines[n - 1])["seq"] == n - 1
    yaozarrs.validate_zarr_store(str(path))


# -- OME-Zarr as input --------------------------------------------------------------------------
def write_ome_writers_store(path: Path, sizes: dict[str, int], dtype: str = "uint16") -> np.ndarray:
    """A store as pymmcore-plus writes it (ome-writers); frame i is filled with i."""
    from ome_writers import (
        AcquisitionSettings,
        OmeZarrFormat,
        create_stream,
        dims_from_standard_axes,
    )

    settings = AcquisitionSettings(root_path=str(path), dimensions=dims_from_standard_axes(sizes), dtype=dtype,
                                   format=OmeZarrFormat(backend="tensorstore"))
    n = int(np.prod([v for k, v in sizes.items() if k not in "yx"]))
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, (n, sizes["y"], sizes["x"])).astype(dtype)
    data[:, 0, 0] = np.arange(n)
    with create_stream(settings) as stream:
        for frame in data:
            stream.append(frame)
    return data


def test_replay_splits_a_multi_position_store_into_streams(tmp_path, receiver):
    path = tmp_path / "mda.ome.zarr"
    data = write_ome_writers_store(path, {"t": 3, "p": 2, "c": 2, "z": 2, "y": 12, "x": 16})
    with open_movie(path) as movie:
        assert isinstance(movie, ZarrMovie)
        assert movie.streams == [f"cam0.p{p}.c{c}.z{z}" for p in (0, 1) for c in (0, 1) for z in (0, 1)]
        assert movie.n_frames == 24
        # acquisition order: time point by time point, each in file order (t, p, c, z)
        assert [int(movie.frame(i)[0, 0]) for i in range(24)] == list(range(24))
    pub = FramePublisher(receiver.endpoint, "cam0")
    assert pub.wait_for_subscriber(10)
    stats = replay(pub, ReplayConfig(path=path, rate_hz=500, series=1, channel=1))
    frames = receiver.wait_for(6)
    pub.close()
    assert stats.published == 6
    assert {f.stream for f in frames} == {"cam0.p1.c1.z0", "cam0.p1.c1.z1"}
    got = {(f.stream, f.header.seq): f.pixels for f in frames}
    # series 1 (p1), channel 1, z: frame index t*8 + 1*4 + 1*2 + z
    for t in range(3):
        for z in (0, 1):
            np.testing.assert_array_equal(got[(f"cam0.p1.c1.z{z}", t)], data[t * 8 + 6 + z])


def test_a_recording_replays_at_its_own_times_as_one_stream(tmp_path):
    path = tmp_path / "r.ome.zarr"
    rec = ZarrRecording.create(path, pattern(0, dtype=np.uint16), FrameInfo(seq=0, t=10.0, meta=META),
                               Provenance("cam0.GCaMP"))
    for i in range(1, 6):
        rec.append(pattern(i, dtype=np.uint16), FrameInfo(seq=i, t=10.0 + 0.1 * i, meta=META))
    rec.close()
    with ZarrMovie(path) as movie:
        assert movie.streams == ["cam0"] and movie.n_frames == 6
        np.testing.assert_allclose(movie.timestamps(), [0.1 * i for i in range(6)])
        meta = movie.acquisition_meta(2)
        assert meta["channel"] == "GCaMP" and meta["pixel_size_um"] == 0.65 and meta["interval_ms"] == 50.0
        np.testing.assert_array_equal(movie.frame(4), pattern(4, dtype=np.uint16))


@pytest.mark.parametrize("meta", [{"pixel_size_um": 1.0, "interval_ms": 1000.0}, {"pixel_size_um": 1.0}, {}])
def test_a_one_micron_one_second_recording_keeps_its_calibration(tmp_path, meta):
    """1 µm pixels and 1-s frames are calibrations like any other in the recorder's own stores;
    a store that knew none reads back as uncalibrated."""
    path = tmp_path / "one.ome.zarr"
    rec = ZarrRecording.create(path, pattern(0), FrameInfo(seq=0, t=0.0, meta=meta), Provenance("cam0"))
    for i in range(1, 4):
        rec.append(pattern(i), FrameInfo(seq=i, t=float(i), meta=meta))
    rec.close()
    with ZarrMovie(path) as movie:
        got = movie.acquisition_meta(0)
    assert got.get("pixel_size_um") == meta.get("pixel_size_um")
    assert got.get("interval_ms") == 1000.0  # given, or measured from the frames' times


def test_an_unmeasured_time_axis_is_not_read_as_one_second(tmp_path):
    path = tmp_path / "single.ome.zarr"
    ZarrRecording.create(path, pattern(0), FrameInfo(seq=0), Provenance("cam0")).close()
    with ZarrMovie(path) as movie:
        got = movie.acquisition_meta(0)
    assert got.get("interval_ms") is None and got.get("pixel_size_um") is None


@pytest.mark.timeout(600)  # the denoising itself: seconds on an idle machine
def test_denoise_reads_and_writes_ome_zarr(tmp_path):
    from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator

    noisy, _ = TwoPhotonSimulator(SimConfig(height=32, width=32, photons=2.0, seed=3)).movie(20)
    src, out = tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr"
    rec = ZarrRecording.create(src, noisy[0].astype(np.float32), FrameInfo(seq=0, meta=META),
                               Provenance("in", kind="raw"))
    for i in range(1, 20):
        rec.append(noisy[i].astype(np.float32), FrameInfo(seq=i, meta=META))
    rec.close()
    done = run_umvd_live("denoise", src, out, "--preset", "lite", "--warmup-frames", "10", timeout=550)
    assert done.returncode == 0, done.stderr
    frames, infos, prov = read_zarr_recording(out)
    assert frames.shape == (20, 32, 32) and frames.dtype == np.float32
    assert [i.seq for i in infos] == list(range(20)) and prov["complete"] is True
    assert prov["source"] == str(src) and prov["pixel_size_um"] == 0.65
    yaozarrs.validate_zarr_store(str(out))
    # input units: normalised ones would be off by orders of magnitude; the level of 20 frames after a
    # warm start on 10 moves by a few percent with the training's draws (-3.6 to +5.6 % over seeds 1-3
    # and the default, before and after session 30's change of the draws)
    assert abs(float(frames.mean()) - float(noisy.mean())) < 0.1 * float(noisy.mean()), "input units"
    again = run_umvd_live("denoise", src, out, timeout=550)
    assert again.returncode == 2 and "exists" in again.stderr
    (tmp_path / "empty.ome.zarr").mkdir()
    bad = run_umvd_live("denoise", tmp_path / "empty.ome.zarr", tmp_path / "o2.ome.zarr", timeout=550)
    assert bad.returncode == 2 and "not a readable Zarr group" in bad.stderr and "Traceback" not in bad.stderr


# -- an acquisition's stores read back together; errors; Windows' refused replace ----------------
def test_read_acquisition_assembles_the_stores_of_a_multi_channel_recording(tmp_path):
    """`serve --record rec.ome.zarr` of 2 channels x 2 planes writes a store per stream; one frame
    lost upstream. read_acquisition puts every frame back in (T, C, Z, Y, X), as for OME-TIFF,
    and a TIFF recording beside it with the same name is not mixed in."""
    channels, lost = ("GCaMP", "mCherry"), (2, 1, 0)  # (t, c, z) never arrives
    session = RecordingSession(RecordingRequest(path=tmp_path / "rec.ome.zarr", raw=True))
    tiff = RecordingSession(RecordingRequest(path=tmp_path / "rec.ome.tif"))

    def key(t, c, z):
        return 100 * t + 10 * c + z

    for t in range(4):
        for c, z in np.ndindex(2, 2):
            if (t, c, z) == lost:
                continue
            stream = f"cam0.{channels[c]}.z{z}"
            h = FrameHeader(seq=t, shape=SHAPE, dtype="<u2", t=0.05 * t + 0.001 * (2 * c + z),
                            meta={**META, "channel": channels[c], "index": {"t": t, "c": c, "z": z}})
            assert session.submit_raw(stream, h, pattern(key(t, c, z), dtype=np.uint16))
            assert session.submit_denoised(stream, h, pattern(key(t, c, z)), state="live", model_step=t)
            assert tiff.submit_denoised(stream, h, pattern(key(t, c, z)), state="live", model_step=t)
    assert session.stop(wait=True, timeout=30) and tiff.stop(wait=True, timeout=30)
    assert session.status().error is None and len(session.status().files) == 8

    from umvd_live.recording.acquisition import read_acquisition, recording_files

    assert recording_files(tmp_path / "rec.ome.zarr") == sorted(
        tmp_path / f"rec_cam0.{ch}.z{z}.ome.zarr" for ch in channels for z in (0, 1))
    for kind, dtype in (("denoised", np.float32), ("raw", np.uint16)):
        (s,) = read_acquisition(tmp_path / "rec.ome.zarr", kind=kind).values()
        assert s.key == "cam0" and s.data.shape == (4, 2, 2, *SHAPE) and s.data.dtype == dtype
        assert s.channels == channels and s.z_indices == (0, 1) and s.pixel_size_um == 0.65
        suffix = ".raw" if kind == "raw" else ""
        assert s.files[f"cam0.{channels[1]}.z1"] == (tmp_path / f"rec_cam0.{channels[1]}.z1{suffix}.ome.zarr",)
        for t, c, z in np.ndindex(4, 2, 2):
            if (t, c, z) == lost:
                assert not s.present[t, c, z] and not s.data[t, c, z].any()
                continue
            assert s.present[t, c, z] and s.times[t, c, z] == pytest.approx(0.05 * t + 0.001 * (2 * c + z))
            np.testing.assert_array_equal(s.data[t, c, z], pattern(key(t, c, z), dtype=dtype))
    # the OME-TIFF recording of the same name: its own files, the same acquisition
    (from_tif,) = read_acquisition(tmp_path / "rec.ome.tif").values()
    (from_zarr,) = read_acquisition(tmp_path / "rec.ome.zarr").values()
    assert all(p.suffix == ".tif" for files in from_tif.files.values() for p in files)
    np.testing.assert_array_equal(from_tif.data, from_zarr.data)
    np.testing.assert_array_equal(from_tif.present, from_zarr.present)


def test_a_failed_chunk_write_ends_the_recording_with_a_clear_error(tmp_path):
    """tensorstore reports a failed write as ValueError; the recorder gets an OSError with the
    store and the errno, stops with a message (no traceback), and the store keeps every frame
    written before, declared to OME readers."""
    errors: list[str] = []
    session = RecordingSession(RecordingRequest(path=tmp_path / "e.ome.zarr"), on_error=errors.append)
    for seq in range(5):
        session.submit_denoised("cam0", FrameHeader(seq, SHAPE, "<f4", t=0.1 * seq), pattern(seq),
                                state="live", model_step=seq)
    deadline = time.monotonic() + 30
    while session.status().frames_written < 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    store = tmp_path / "e_cam0.ome.zarr"
    (store / "0" / "c").mkdir(exist_ok=True)
    (store / "0" / "c" / "5").write_bytes(b"")  # a file where frame 5's chunk directory goes
    for seq in range(5, 40):
        session.submit_denoised("cam0", FrameHeader(seq, SHAPE, "<f4", t=0.1 * seq), pattern(seq),
                                state="live", model_step=seq)
    assert session.stop(wait=True, timeout=30)
    status = session.status()
    assert errors == [status.error]
    assert "recording stopped: writing" in status.error and str(store) in status.error
    assert "[ENOTDIR]" in status.error and "ValueError" not in status.error
    # the frames whose chunk writes had started are not counted written: every accepted frame is
    # written or lost (frame 5 and those in flight behind it once counted written)
    assert status.frames_written == 5 and status.frames_written + status.frames_lost == status.frames_submitted
    frames, infos, prov = read_zarr_recording(store)
    assert [i.seq for i in infos] == list(range(5)) and prov["complete"] is False
    assert prov["frames_declared"] == 5  # abandon declared what was on disk
    np.testing.assert_array_equal(frames, np.stack([pattern(s) for s in range(5)]))
    yaozarrs.validate_zarr_store(str(store))


def test_append_copies_the_frame_so_the_caller_may_reuse_its_buffer(tmp_path):
    """A camera reader hands over the same buffer for every frame: `append` returns once
    tensorstore has copied it, as `RecordingFile.append` once it has written it (tensorstore once
    read the buffer later, and later frames overwrote earlier ones in the store)."""
    n = 40

    def frames():
        buf = np.zeros((256, 256), np.uint16)
        for i in range(n):
            buf[:] = i + 1
            yield buf

    store = tmp_path / "ring.ome.zarr"
    write_zarr_movie(store, frames(), (FrameInfo(seq=i, t=0.1 * i) for i in range(n)), Provenance(stream="cam0"))
    stored, infos, prov = read_zarr_recording(store)
    assert [i.seq for i in infos] == list(range(n)) and prov["complete"]
    np.testing.assert_array_equal(stored, np.broadcast_to(np.arange(1, n + 1, dtype=np.uint16)[:, None, None],
                                                          (n, 256, 256)))


@pytest.mark.parametrize("bad", ["nan", "inf", "all-nan"])
def test_a_first_frame_with_nan_or_inf_pixels_keeps_the_metadata_json(tmp_path, bad):
    """The omero display window comes from the first frame's finite pixels (none finite: 0..1):
    a NaN from np.percentile once went into zarr.json, which strict JSON readers (JavaScript
    viewers, Java) refuse whole. The pixels themselves are stored as they are."""
    first = pattern(0)
    if bad == "all-nan":
        first[:] = np.nan
    else:
        first[3, 3] = np.nan if bad == "nan" else np.inf
    store = tmp_path / f"{bad}.ome.zarr"
    write_zarr_movie(store, [first, pattern(1)], [FrameInfo(seq=i, meta={"channel": "GFP"}) for i in range(2)],
                     Provenance(stream="cam0"))

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    doc = json.loads((store / "zarr.json").read_text(encoding="utf-8"), parse_constant=refuse)
    window = doc["attributes"]["ome"]["omero"]["channels"][0]["window"]
    finite = first[np.isfinite(first)].astype(np.float64)
    if finite.size:
        assert window["start"] == pytest.approx(np.percentile(finite, 0.1))
        assert window["end"] == pytest.approx(np.percentile(finite, 99.9))
        assert (window["min"], window["max"]) == (finite.min(), finite.max())
    else:
        assert window == {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}
    stored, _, _ = read_zarr_recording(store)
    np.testing.assert_array_equal(stored, np.stack([first, pattern(1)]))  # NaN where it was NaN
    yaozarrs.validate_zarr_store(str(store))


def test_a_refused_replace_is_retried_then_reported(tmp_path, monkeypatch):
    """On Windows a reader holding zarr.json open makes os.replace fail (PermissionError) until it
    lets go: the checkpoint retries, briefly; a replace refused for good is an OSError."""
    import os

    from umvd_live import portable

    rec = ZarrRecording.create(tmp_path / "r.ome.zarr", pattern(0), FrameInfo(seq=0, t=0.0), Provenance("cam0"))
    real, calls = os.replace, []

    def refused_once(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process",
                                  str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", refused_once)
    for i in range(1, 4):
        rec.append(pattern(i), FrameInfo(seq=i, t=0.1 * i))
    rec.checkpoint()
    assert len(calls) == 2
    group = json.loads((tmp_path / "r.ome.zarr" / "zarr.json").read_text())
    assert group["attributes"]["umvd-live"]["frames"] == "4"
    # no interval from the producer: the frames' own step on T from this checkpoint on, not only at close
    dataset = group["attributes"]["ome"]["multiscales"][0]["datasets"][0]
    assert dataset["coordinateTransformations"][0]["scale"][0] == pytest.approx(0.1)

    def refused(src, dst):
        raise PermissionError(13, "in use", str(dst))

    monkeypatch.setattr(os, "replace", refused)
    monkeypatch.setattr(portable, "REPLACE_RETRY_S", 0.2)
    rec.append(pattern(4), FrameInfo(seq=4, t=0.4))
    started = time.monotonic()
    with pytest.raises(PermissionError):
        rec.checkpoint()
    assert 0.15 < time.monotonic() - started < 2
    monkeypatch.setattr(os, "replace", real)
    rec.close()
    frames, infos, prov = read_zarr_recording(tmp_path / "r.ome.zarr")
    assert len(infos) == 5 and prov["complete"] is True and prov["frames_declared"] == 5
    np.testing.assert_array_equal(frames, np.stack([pattern(i) for i in range(5)]))
