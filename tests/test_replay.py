"""File replay: real files written here with tifffile (plain TIFF, OME-TIFF with DeltaT, a multi-channel
OME-TIFF, ScanImage-style per-frame descriptions) and with ndstorage's NDTiff writer (what
pycromanager saves), read back through `TiffMovie` (the one movie reader, `umvd_live.recording.movie`),
scheduled, and streamed into a SUB receiver."""

from __future__ import annotations

import os
import struct
import threading

import numpy as np
import pytest
import tifffile
from command_line import run_umvd_live

from umvd_live.adapters.publisher import FramePublisher
from umvd_live.adapters.replay import ReplayConfig, ReplayError, open_replay, replay, replay_schedule
from umvd_live.recording.movie import MovieError, TiffMovie

pytestmark = pytest.mark.timeout(60)


def movie(n: int = 6, shape: tuple[int, int] = (12, 16), dtype: str = "u2") -> np.ndarray:
    rng = np.random.default_rng(n)
    data = rng.integers(0, 1000, size=(n, *shape)).astype(dtype)
    data[:, 0, 0] = np.arange(n)  # frame number in a corner, to check order at a glance
    return data


# ------------------------------------------------------------------------------ reading files


def test_plain_tiff_frames_in_order_without_timestamps(tmp_path):
    data = movie()
    tifffile.imwrite(tmp_path / "plain.tif", data, photometric="minisblack")
    with TiffMovie(tmp_path / "plain.tif") as m:
        assert (m.kind, m.n_frames, m.shape, m.dtype) == ("tiff", 6, (12, 16), np.dtype("<u2"))
        assert all(np.array_equal(m.frame(i), data[i]) for i in range(6))
        assert np.array_equal(np.stack(list(m)), data)
        assert m.timestamps() is None


def test_ome_tiff_deltat_becomes_frame_times(tmp_path):
    data = movie(4)
    delta_t = [10.0, 10.5, 11.5, 11.75]  # seconds, not starting at 0
    tifffile.imwrite(tmp_path / "m.ome.tif", data, ome=True,
                     metadata={"axes": "TYX", "Plane": {"DeltaT": delta_t, "DeltaTUnit": ["s"] * 4}})
    with TiffMovie(tmp_path / "m.ome.tif") as m:
        assert m.kind == "ome"
        np.testing.assert_allclose(m.timestamps(), [0.0, 0.5, 1.5, 1.75])
        assert np.array_equal(m.frame(3), data[3])


def test_ome_deltat_units_are_converted(tmp_path):
    tifffile.imwrite(tmp_path / "ms.ome.tif", movie(3), ome=True,
                     metadata={"axes": "TYX", "Plane": {"DeltaT": [0, 40, 80], "DeltaTUnit": ["ms"] * 3}})
    with TiffMovie(tmp_path / "ms.ome.tif") as m:
        np.testing.assert_allclose(m.timestamps(), [0.0, 0.04, 0.08])


def test_ome_deltat_that_does_not_increase_is_no_timing(tmp_path):
    # A sequenced pycromanager acquisition stamps every frame 0: that is no schedule.
    tifffile.imwrite(tmp_path / "zero.ome.tif", movie(3), ome=True,
                     metadata={"axes": "TYX", "Plane": {"DeltaT": [0, 0, 0], "DeltaTUnit": ["s"] * 3}})
    with TiffMovie(tmp_path / "zero.ome.tif") as m:
        assert m.timestamps() is None


def test_multichannel_ome_streams_one_channel(tmp_path):
    data = np.arange(3 * 2 * 4 * 5, dtype=np.uint16).reshape(3, 2, 4, 5)  # T C Y X
    delta_t = [0.0, 0.0, 0.2, 0.2, 0.4, 0.4]  # one Plane per (T, C), C fastest
    tifffile.imwrite(tmp_path / "tc.ome.tif", data, ome=True, photometric="minisblack",
                     metadata={"axes": "TCYX", "Plane": {"DeltaT": delta_t}})
    with TiffMovie(tmp_path / "tc.ome.tif", channel=1) as m:
        assert m.n_frames == 3
        assert all(np.array_equal(m.frame(t), data[t, 1]) for t in range(3))
        np.testing.assert_allclose(m.timestamps(), [0.0, 0.2, 0.4])
    with pytest.raises(MovieError, match="channel 2 does not exist"):
        TiffMovie(tmp_path / "tc.ome.tif", channel=2)


def test_ndtiff_from_pycromanagers_writer_has_elapsed_time(tmp_path):
    from ndstorage.ndtiff_dataset import NDTiffDataset

    data = movie(5, (16, 24))
    dataset = NDTiffDataset(str(tmp_path), name="run", writable=True)
    dataset.initialize({"Width": 24, "Height": 16})
    for t in range(5):
        dataset.put_image({"time": t}, data[t], {"ElapsedTime-ms": 1000.0 + 33.0 * t, "Width": 24,
                                                  "Height": 16, "PixelType": "GRAY16", "BitDepth": 16})
    dataset.finish()
    (stack,) = tmp_path.glob("run*/*.tif")
    with TiffMovie(stack) as m:
        assert m.kind == "ndtiff" and m.n_frames == 5
        assert all(np.array_equal(m.frame(i), data[i]) for i in range(5))
        np.testing.assert_allclose(m.timestamps(), 0.033 * np.arange(5))


@pytest.mark.parametrize("entry", [
    struct.pack("<HHIHH", 282, 3, 1, 5, 0),  # XResolution: one SHORT, not a RATIONAL
    struct.pack("<HHIHH", 296, 3, 2, 3, 3),  # ResolutionUnit: two SHORTs
], ids=["short_resolution", "two_units"])
def test_a_malformed_resolution_tag_is_ignored_and_the_file_still_reads(tmp_path, entry):
    data = movie(3)
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, data, photometric="minisblack", resolution=(2.0, 2.0), resolutionunit="CENTIMETER")
    code = struct.unpack_from("<H", entry)[0]
    with tifffile.TiffFile(path) as tif:
        offset = next(tag.offset for tag in tif.pages.first.tags if tag.code == code)
    with open(path, "r+b") as f:  # rewrite the first page's tag entry in place
        f.seek(offset)
        f.write(entry)
    with TiffMovie(path) as m:
        assert m.file_meta(0) == {}, "no pixel size from a tag that is not one"
        assert all(np.array_equal(m.frame(i), data[i]) for i in range(3))


def test_a_micromanager_summary_number_beyond_any_float_is_ignored(tmp_path):
    from ndstorage.ndtiff_dataset import NDTiffDataset

    data = movie(2, (16, 24))
    dataset = NDTiffDataset(str(tmp_path), name="run", writable=True)
    dataset.initialize({"Width": 24, "Height": 16, "PixelSizeUm": 0.5, "Interval_ms": 10**400})
    for t in range(2):
        dataset.put_image({"time": t}, data[t], {"ElapsedTime-ms": 33.0 * t, "Width": 24, "Height": 16,
                                                  "PixelType": "GRAY16", "BitDepth": 16})
    dataset.finish()
    (stack,) = tmp_path.glob("run*/*.tif")
    with TiffMovie(stack) as m:  # JSON's integers have no bound; float() of this one overflows
        assert m.file_meta(0) == {"pixel_size_um": 0.5}
        assert np.array_equal(m.frame(1), data[1])


def test_a_size_or_interval_that_overflows_in_its_unit_is_ignored(tmp_path):
    """OME's values are finite floats, but a huge one times its unit (hours to seconds, mm to µm)
    is inf: ignored, as any value that fails its check, not written into an output's metadata."""
    data = movie(3, (8, 8))
    tifffile.imwrite(tmp_path / "huge.ome.tif", data, ome=True, metadata={
        "axes": "TYX", "PhysicalSizeX": 1e308, "PhysicalSizeXUnit": "mm", "PhysicalSizeY": 1e308,
        "PhysicalSizeYUnit": "mm", "TimeIncrement": 1e308, "TimeIncrementUnit": "h"})
    tifffile.imwrite(tmp_path / "huge_ij.tif", data, imagej=True, metadata={"axes": "TYX", "finterval": 1e308,
                                                                         "tunit": "min"})
    for name in ("huge.ome.tif", "huge_ij.tif"):
        with TiffMovie(tmp_path / name) as m:
            assert m.file_meta(0) == {}, name
            assert np.array_equal(m.frame(2), data[2])


def test_scanimage_frame_timestamps(tmp_path):
    data = movie(4).astype(np.int16)
    stamps = [5.0, 5.033, 5.070, 5.1]
    with tifffile.TiffWriter(tmp_path / "si.tif") as w:
        for i, ts in enumerate(stamps):
            w.write(data[i], software="SI.test", metadata=None, contiguous=False,
                    description=f"frameNumbers = {i + 1}\nframeTimestamps_sec = {ts:.6f}\n"
                                "acqTriggerTimestamps_sec = \n")
    with TiffMovie(tmp_path / "si.tif") as m:
        assert m.kind == "scanimage" and m.n_frames == 4 and m.dtype == np.dtype("<i2")
        np.testing.assert_allclose(m.timestamps(), np.array(stamps) - 5.0, atol=1e-9)
        assert np.array_equal(m.frame(2), data[2])


def test_pixel_types(tmp_path):
    tifffile.imwrite(tmp_path / "f64.tif", np.linspace(0, 1, 2 * 6 * 7).reshape(2, 6, 7))
    with TiffMovie(tmp_path / "f64.tif") as m:  # float64 goes out as float32
        assert m.dtype == np.float32 and m.frame(1).dtype == np.float32
    tifffile.imwrite(tmp_path / "be.tif", movie(2).astype(">u2"), byteorder=">")
    with TiffMovie(tmp_path / "be.tif") as m:
        assert m.dtype == np.dtype("<u2") and np.array_equal(m.frame(1), movie(2)[1])
    tifffile.imwrite(tmp_path / "u32.tif", movie(2).astype(np.uint32))
    with TiffMovie(tmp_path / "u32.tif") as m:  # the reader takes it (denoise does); the protocol does not
        assert m.dtype == np.uint32
    with pytest.raises(ReplayError, match="uint32 is not one the stream protocol carries"):
        open_replay(ReplayConfig(tmp_path / "u32.tif"))
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((2, 8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(MovieError, match="RGB"):
        TiffMovie(tmp_path / "rgb.tif")
    tifffile.imwrite(tmp_path / "planar.tif", np.zeros((3, 8, 8), np.uint8), photometric="rgb", planarconfig="separate")
    with pytest.raises(MovieError, match="RGB"):
        TiffMovie(tmp_path / "planar.tif")


def test_unreadable_files_get_a_clear_error(tmp_path):
    with pytest.raises(MovieError, match="no such file"):
        TiffMovie(tmp_path / "nope.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(MovieError, match="not a readable TIFF"):
        TiffMovie(tmp_path / "junk.tif")


# ------------------------------------------------------------------------------ schedule


def test_rate_schedule_and_loops():
    items = list(replay_schedule(3, rate_hz=10, loop=True, max_frames=7))
    assert [(s.index, s.loop) for s in items] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2)]
    np.testing.assert_allclose([s.due_s for s in items], 0.1 * np.arange(7))
    assert len(list(replay_schedule(3, rate_hz=10))) == 3  # no loop: the file once
    assert len(list(replay_schedule(3, rate_hz=10, max_frames=2))) == 2


def test_file_timestamp_schedule_loops_one_median_interval_later():
    times = np.array([0.0, 0.5, 1.5, 1.75])  # median interval 0.5 s: loop length 2.25 s
    items = list(replay_schedule(4, timestamps=times, loop=True, max_frames=9))
    np.testing.assert_allclose([s.due_s for s in items], [0, 0.5, 1.5, 1.75, 2.25, 2.75, 3.75, 4.0, 4.5])
    assert [s.loop for s in items] == [0] * 4 + [1] * 4 + [2]


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError):
        list(replay_schedule(3, rate_hz=0))
    with pytest.raises(ValueError):
        list(replay_schedule(3, timestamps=np.zeros(2)))
    with pytest.raises(ValueError):
        list(replay_schedule(0))


# ------------------------------------------------------------------------------ streaming


def test_replay_streams_every_frame_in_order_with_seq_and_loops(tmp_path, receiver):
    data = movie(5)
    tifffile.imwrite(tmp_path / "plain.tif", data, photometric="minisblack")
    pub = FramePublisher(receiver.endpoint, "rehearsal")
    assert pub.wait_for_subscriber(10)
    seen = []
    stats = replay(pub, ReplayConfig(tmp_path / "plain.tif", rate_hz=500, loop=True, max_frames=12),
                   on_frame=seen.append)
    frames = receiver.wait_for(12)
    pub.close()
    assert (stats.published, stats.dropped, stats.loops) == (12, 0, 3)
    assert [f.header.seq for f in frames] == list(range(12))
    assert [f.header.meta["file_frame"] for f in frames] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert [f.header.meta["loop"] for f in frames] == [0] * 5 + [1] * 5 + [2] * 2
    assert all(f.stream == "rehearsal" for f in frames)
    for f in frames:
        assert np.array_equal(f.pixels, data[f.header.meta["file_frame"]])
    np.testing.assert_allclose([f.header.t for f in frames], [s.due_s for s in seen])
    np.testing.assert_allclose([f.header.t for f in frames], np.arange(12) / 500)


def test_replay_at_file_timing_stamps_frames_with_the_files_times(tmp_path, receiver):
    delta_t = [0.0, 0.01, 0.03, 0.035]
    tifffile.imwrite(tmp_path / "m.ome.tif", movie(4), ome=True,
                     metadata={"axes": "TYX", "Plane": {"DeltaT": delta_t}})
    pub = FramePublisher(receiver.endpoint, "cam0")
    assert pub.wait_for_subscriber(10)
    stats = replay(pub, ReplayConfig(tmp_path / "m.ome.tif", file_timing=True, loop=True, max_frames=6))
    frames = receiver.wait_for(6)
    pub.close()
    assert stats.published == 6
    np.testing.assert_allclose([f.header.t for f in frames], [0, 0.01, 0.03, 0.035, 0.045, 0.055])


def test_file_timing_on_a_file_without_times_is_refused(tmp_path, receiver):
    tifffile.imwrite(tmp_path / "plain.tif", movie(3), photometric="minisblack")
    pub = FramePublisher(receiver.endpoint, "cam0")
    with pytest.raises(ReplayError, match="no increasing per-frame timestamps"):
        replay(pub, ReplayConfig(tmp_path / "plain.tif", file_timing=True))
    pub.close()
    assert pub.sent == 0


def test_stop_event_ends_an_endless_loop(tmp_path, receiver):
    tifffile.imwrite(tmp_path / "plain.tif", movie(3), photometric="minisblack")
    pub = FramePublisher(receiver.endpoint, "cam0")
    assert pub.wait_for_subscriber(10)
    stop = threading.Event()
    stats = replay(pub, ReplayConfig(tmp_path / "plain.tif", rate_hz=200, loop=True), stop=stop,
                   on_frame=lambda item: item.loop == 2 and stop.set())
    pub.close()
    assert stats.loops == 3 and stats.published == 7


def test_cli_replay(tmp_path, receiver):
    data = movie(4)
    tifffile.imwrite(tmp_path / "m.ome.tif", data, ome=True,
                     metadata={"axes": "TYX", "Plane": {"DeltaT": [0, 0.01, 0.02, 0.03]}})
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    cmd = ("acquire", "replay")
    out = run_umvd_live(*cmd, "--file", tmp_path / "m.ome.tif", "--file-timing", "--loop", "--frames", "8",
                        "--to", receiver.endpoint, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "replay: 8 frames sent, 0 dropped, 2 pass(es)" in out.stdout
    frames = receiver.wait_for(8)
    assert [f.header.seq for f in frames] == list(range(8))
    assert all(np.array_equal(f.pixels, data[i % 4]) for i, f in enumerate(frames))

    out = run_umvd_live(*cmd, "--file", tmp_path / "missing.tif", "--wait-s", "0.2", timeout=60, env=env)
    assert out.returncode == 2 and "no such file" in out.stderr and "Traceback" not in out.stderr
    tifffile.imwrite(tmp_path / "plain.tif", data, photometric="minisblack")
    out = run_umvd_live(*cmd, "--file", tmp_path / "plain.tif", "--file-timing", "--wait-s", "0.2", timeout=60,
                        env=env)
    assert out.returncode == 2 and "no increasing per-frame timestamps" in out.stderr


# ------------------------------------------------------------------ multi-dimensional files


def test_multichannel_ome_replays_as_a_stream_per_channel_named_by_the_file(tmp_path, receiver):
    data = np.arange(3 * 2 * 4 * 5, dtype=np.uint16).reshape(3, 2, 4, 5)  # T C Y X
    tifffile.imwrite(tmp_path / "tc.ome.tif", data, ome=True, photometric="minisblack",
                     metadata={"axes": "TCYX", "Channel": {"Name": ["GCaMP", "tdTomato"]}})
    with TiffMovie(tmp_path / "tc.ome.tif") as m:
        assert m.streams == ["cam0.GCaMP", "cam0.tdTomato"]
        assert m.n_frames == 6
    pub = FramePublisher(receiver.endpoint, "cam0")
    assert pub.wait_for_subscriber(10)
    stats = replay(pub, ReplayConfig(tmp_path / "tc.ome.tif", rate_hz=200))
    frames = receiver.wait_for(6)
    pub.close()
    assert stats.published == 6
    # acquisition order: each time point's channels together, then the next time point
    assert [f.stream for f in frames] == ["cam0.GCaMP", "cam0.tdTomato"] * 3
    for c, name in enumerate(("GCaMP", "tdTomato")):
        got = [f for f in frames if f.stream == f"cam0.{name}"]
        assert [f.header.seq for f in got] == [0, 1, 2]
        assert [f.header.meta["index"] for f in got] == [{"t": t, "c": c} for t in range(3)]
        assert all(f.header.meta["channel"] == name for f in got)
        assert all(np.array_equal(f.pixels, data[t, c]) for t, f in enumerate(got))
        np.testing.assert_allclose([f.header.t for f in got], np.arange(3) / 200)  # per time point
    assert sorted((e.stream, e.seq) for e in receiver.ends) == [("cam0.GCaMP", 3), ("cam0.tdTomato", 3)]


def test_imagej_hyperstack_splits_channels_and_planes(tmp_path):
    data = np.arange(4 * 3 * 2 * 6 * 7, dtype=np.uint16).reshape(4, 3, 2, 6, 7)  # T Z C Y X
    tifffile.imwrite(tmp_path / "hyper.tif", data, imagej=True, metadata={"axes": "TZCYX"})
    with TiffMovie(tmp_path / "hyper.tif", group="stack") as m:
        assert m.kind == "imagej"
        assert sorted(m.streams) == sorted(f"stack.c{c}.z{z}" for c in range(2) for z in range(3))
        for i, plane in enumerate(m.planes):
            t, z, c = plane.time, plane.axes.index["z"], plane.axes.index["c"]
            assert np.array_equal(m.frame(i), data[t, z, c])
        assert [p.time for p in m.planes] == sorted(p.time for p in m.planes)


def test_multi_position_ome_replays_positions_as_streams(tmp_path):
    with tifffile.TiffWriter(tmp_path / "pos.ome.tif", ome=True) as w:
        for p in range(2):
            w.write(np.full((3, 4, 5), p, np.uint16), photometric="minisblack",
                    metadata={"axes": "TYX", "Name": f"well{p}"})
    with TiffMovie(tmp_path / "pos.ome.tif") as m:
        assert m.streams == ["cam0.p0", "cam0.p1"]
        assert [(p.time, p.axes.index["p"]) for p in m.planes] == [(t, p) for t in range(3) for p in range(2)]
        assert {p.axes.position for p in m.planes} == {"well0", "well1"}
        assert all(int(m.frame(i)[0, 0]) == p.axes.index["p"] for i, p in enumerate(m.planes))
    with TiffMovie(tmp_path / "pos.ome.tif", series=1) as m:
        assert m.streams == ["cam0"] and m.n_frames == 3


def test_a_z_stack_without_time_is_a_stream_of_one_frame_per_plane(tmp_path):
    tifffile.imwrite(tmp_path / "z.ome.tif", movie(4), ome=True, metadata={"axes": "ZYX"})
    with TiffMovie(tmp_path / "z.ome.tif") as m:
        assert m.streams == [f"cam0.z{z}" for z in range(4)]
        assert [p.time for p in m.planes] == [0, 0, 0, 0]


def test_ndtiff_channels_from_pycromanagers_writer_replay_as_streams(tmp_path):
    from ndstorage.ndtiff_dataset import NDTiffDataset

    data = movie(6, (16, 24))
    dataset = NDTiffDataset(str(tmp_path), name="run", writable=True)
    dataset.initialize({"Width": 24, "Height": 16, "ChNames": ["GFP", "RFP"]})
    for t in range(3):
        for c, name in enumerate(("GFP", "RFP")):
            dataset.put_image({"time": t, "channel": name}, data[2 * t + c],
                              {"ElapsedTime-ms": 1000.0 + 100.0 * t + 10 * c, "Width": 24, "Height": 16,
                               "PixelType": "GRAY16", "BitDepth": 16})
    dataset.finish()
    (stack,) = tmp_path.glob("run*/*.tif")
    with TiffMovie(stack) as m:
        assert m.kind == "ndtiff" and m.n_frames == 6 and len(m.streams) == 2
        times = m.timestamps()
        m.acquisition_order(times)
        assert [int(m.frame(i)[0, 0]) for i in range(6)] == list(range(6))  # the acquisition's order


def test_channels_whose_names_clash_stay_streams_of_their_own(tmp_path):
    """Two channels named alike (the same name twice, or names that differ only past the 24
    characters a stream name keeps) are two streams: the later one's name gets its index."""
    from umvd_live.recording.movie import MovieFrames
    from umvd_live.wire.axes import channel_parts

    assert channel_parts(["GFP", "GFP"]) == ["GFP", "GFP_c1"]
    assert channel_parts(["Confocal 488nm laser power 10%", "Confocal 488nm laser power 50%"]) == [
        "Confocal_488nm_laser_pow", "Confocal_488nm_laser_c1"]
    assert channel_parts([None, "c0", "GFP", "GFP_c1", "GFP"]) == ["c0", "c0_c1", "GFP", "GFP_c1", "GFP_c4"]
    for names in (["GFP", "GFP"], ["Confocal 488nm laser power 10%", "Confocal 488nm laser power 50%"]):
        data = np.stack([np.full((3, 4, 5), 100, np.uint16), np.full((3, 4, 5), 5000, np.uint16)], axis=1)
        path = tmp_path / f"{len(names[0])}.ome.tif"
        tifffile.imwrite(path, data, ome=True, photometric="minisblack",
                         metadata={"axes": "TCYX", "Channel": {"Name": names}})
        with TiffMovie(path) as m:
            assert len(m.streams) == 2 and m.n_frames == 6, m.streams
        for c, stream in enumerate(m.streams):
            frames = MovieFrames(path, stream=stream.split(".", 1)[1])
            try:
                movie = frames.read(0, len(frames))
            finally:
                frames.close()
            assert movie.shape == (3, 4, 5) and (movie == data[:, c]).all()
