"""The on-the-fly recorder: real files written, killed, filled up and read back with tifffile."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from umvd_live import __version__
from umvd_live.recording.acquisition import read_acquisition
from umvd_live.recording.ometiff import (
    FRAME_TAG,
    FRAMES_NS,
    PROVENANCE_NS,
    FrameInfo,
    Provenance,
    RecordingFile,
    read_recording,
    write_movie,
)
from umvd_live.recording.session import (
    RecordingError,
    RecordingRequest,
    RecordingSession,
    stream_path,
)
from umvd_live.recording.spillqueue import SpillError, SpillQueue
from umvd_live.wire.channel_colors import ome_color
from umvd_live.wire.protocol import FrameHeader
from umvd_live.wire.security import PathNotAllowed, confine_path

SHAPE = (64, 80)


def pattern(seq: int, shape=SHAPE, dtype=np.float32) -> np.ndarray:
    """A frame whose every pixel depends on its seq, so a misplaced frame cannot pass."""
    y, x = np.indices(shape)
    return ((y * 7 + x * 3 + seq * 11) % 251).astype(dtype) + (0.25 if dtype == np.float32 else 0)


def header(seq: int, t: float | None = None, **meta) -> FrameHeader:
    return FrameHeader(seq=seq, shape=SHAPE, dtype="<f4", t=t, meta=meta)


def validate_ome(path: Path) -> None:
    """The OME-XML parses and validates against the OME 2016-06 schema (what Bio-Formats reads)."""
    ome_types = pytest.importorskip("ome_types")
    with tifffile.TiffFile(path) as tif:
        ome_types.from_xml(tif.pages.first.description, validate=True)


# -- a clean recording ------------------------------------------------------------------------
def test_record_two_streams_with_raw_copy_read_back(tmp_path):
    errors: list[str] = []
    prov_calls: list[str] = []

    def provenance(stream: str) -> Provenance:
        prov_calls.append(stream)
        return Provenance(stream=stream, preset="lite", window=7, weights_sha256="ab" * 32,
                          device="cpu", source="tcp://127.0.0.1:5555")

    session = RecordingSession(RecordingRequest(path=tmp_path / "rec.ome.tif", raw=True),
                               provenance=provenance, on_error=errors.append)
    seqs = [0, 1, 2, 3, 4, 8, 9, 10, 15, 16]  # upstream lost 5-7 and 11-14
    gains = [1.0] * 4 + [1.0 + 0.125 * i for i in range(4, len(seqs))]  # the engine's amplitude gain per frame
    shifts = [None] * 6 + [(0.25 * i - 2.0, -0.125) for i in range(6, len(seqs))]  # its jitter shift, where it moved
    for i, seq in enumerate(seqs):
        for stream, offset in (("cam0", 0), ("cam1", 1000)):
            h = header(seq + offset, t=100.0 + 0.05 * seq, pixel_size_um=0.65, z=i)
            raw = pattern(seq + offset, dtype=np.uint16)
            assert session.submit_raw(stream, h, raw, t_received=5000.0 + i)
            state = "warmup" if i < 4 else "live"
            assert session.submit_denoised(stream, h, pattern(seq + offset), state=state,
                                           model_step=10 * i, t_received=5000.0 + i, amplitude_gain=gains[i],
                                           jitter_shift_px=shifts[i])
    assert session.stop(wait=True, timeout=30)
    st = session.status()
    assert st.error is None and errors == []
    assert st.frames_submitted == st.frames_written == 4 * len(seqs) and st.frames_lost == 0
    assert sorted(prov_calls) == ["cam0", "cam1"]  # once per stream
    assert st.files["cam0"] == [str(tmp_path / "rec_cam0.ome.tif")]
    assert st.files["cam1.raw"] == [str(tmp_path / "rec_cam1.raw.ome.tif")]
    assert not list(tmp_path.glob("*.spill"))  # spill file removed

    for stream, offset in (("cam0", 0), ("cam1", 1000)):
        path = tmp_path / f"rec_{stream}.ome.tif"
        frames, infos, prov = read_recording(path)
        assert frames.dtype == np.float32 and frames.shape == (len(seqs), *SHAPE)
        for i, seq in enumerate(seqs):
            np.testing.assert_array_equal(frames[i], pattern(seq + offset))
        assert [f.seq for f in infos] == [s + offset for s in seqs]
        assert [f.state for f in infos] == ["warmup"] * 4 + ["live"] * 6
        assert [f.model_step for f in infos] == [10 * i for i in range(len(seqs))]
        assert [f.amplitude_gain for f in infos] == gains
        assert [f.jitter_shift_px for f in infos] == shifts
        assert infos[3].t == pytest.approx(100.15) and infos[3].t_received == 5003.0
        assert infos[2].meta == {"pixel_size_um": 0.65, "z": 2}
        assert prov["seq_gaps"] == [(5 + offset, 7 + offset), (11 + offset, 14 + offset)]
        assert prov["first_live_frame"] == 4 and prov["warmup_frames"] == [0, 1, 2, 3]
        assert prov["complete"] is True and prov["frames_declared_in_ome"] == len(seqs)
        assert prov["software_version"] == __version__ and prov["preset"] == "lite"
        assert prov["window"] == 7 and prov["weights_sha256_at_start"] == "ab" * 32
        assert prov["stream"] == stream and prov["kind"] == "denoised"
        assert prov["pixel_size_um"] == 0.65
        assert "group" not in prov and "axis.z" not in prov  # no acquisition meta: as before
        # what any OME reader sees
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome and tif.is_bigtiff
            assert tif.series[0].shape == (len(seqs), *SHAPE) and tif.series[0].axes == "TYX"
            ome = tif.ome_metadata
        assert 'PhysicalSizeX="0.65"' in ome and 'DeltaT="0.4"' in ome  # seq 8: 100.4 - 100.0
        assert f'<M K="seq_gaps">{5 + offset}-{7 + offset},{11 + offset}-{14 + offset}</M>' in ome
        assert "state\tmodel_step\tamplitude_gain\tt_index\tshift_y_px\tshift_x_px" in ome  # the frame table
        assert "\tlive\t90\t2.125\tNone\t0.25\t-0.125" in ome and "\tlive\t50\t1.625\tNone\tNone\tNone" in ome
        validate_ome(path)

        raw, raw_infos, raw_prov = read_recording(tmp_path / f"rec_{stream}.raw.ome.tif")
        assert raw.dtype == np.uint16 and raw_prov["kind"] == "raw"
        for i, seq in enumerate(seqs):
            np.testing.assert_array_equal(raw[i], pattern(seq + offset, dtype=np.uint16))
        assert [f.state for f in raw_infos] == [None] * len(seqs)
        assert [f.amplitude_gain for f in raw_infos] == [None] * len(seqs)  # a raw copy was restored by nothing
        assert [f.jitter_shift_px for f in raw_infos] == [None] * len(seqs)  # nor moved


def test_a_stream_named_like_another_streams_raw_copy_keeps_its_own_file(tmp_path):
    """Stream names may hold dots: "cam0.raw" is a stream of its own, not cam0's raw copy."""
    session = RecordingSession(RecordingRequest(path=tmp_path / "rec.ome.tif", raw=True))
    for seq in range(3):
        assert session.submit_raw("cam0", header(seq), pattern(seq, dtype=np.uint16))
        assert session.submit_denoised("cam0.raw", header(seq), pattern(seq + 500), state="live", model_step=1)
    assert session.stop(wait=True, timeout=30)
    st = session.status()
    assert st.error is None and st.frames_written == 6
    paths = sorted(p for paths in st.files.values() for p in paths)
    assert len(paths) == 2  # two files, never one file with both streams' frames
    by_kind = {read_recording(p)[2]["kind"]: read_recording(p) for p in paths}
    raw, _, raw_prov = by_kind["raw"]
    denoised, _, prov = by_kind["denoised"]
    assert raw_prov["stream"] == "cam0" and prov["stream"] == "cam0.raw"
    assert raw.dtype == np.uint16 and raw.shape == (3, *SHAPE) and denoised.shape == (3, *SHAPE)
    for seq in range(3):
        np.testing.assert_array_equal(raw[seq], pattern(seq, dtype=np.uint16))
        np.testing.assert_array_equal(denoised[seq], pattern(seq + 500))


def test_only_selected_streams_are_recorded(tmp_path):
    session = RecordingSession(RecordingRequest(path=tmp_path / "sel.ome.tif",
                                                streams=frozenset({"cam1"})))
    assert session.records("cam1") and not session.records("cam0")
    assert not session.submit_denoised("cam0", header(0), pattern(0), state="live", model_step=0)
    assert not session.submit_raw("cam1", header(0), pattern(0))  # raw not requested
    assert session.submit_denoised("cam1", header(0), pattern(0), state="live", model_step=0)
    session.stop()
    assert [p.name for p in tmp_path.iterdir()] == ["sel_cam1.ome.tif"]
    assert not session.records("cam1")  # stopped


def test_existing_file_is_never_overwritten_and_shape_change_starts_a_part(tmp_path):
    (tmp_path / "x_cam0.ome.tif").write_bytes(b"precious")
    session = RecordingSession(RecordingRequest(path=tmp_path / "x.ome.tif"))
    session.submit_denoised("cam0", header(0), pattern(0), state="live", model_step=1)
    small = pattern(1, shape=(16, 16))
    session.submit_denoised("cam0", FrameHeader(1, (16, 16), "<f4"), small, state="live", model_step=2)
    session.stop()
    assert (tmp_path / "x_cam0.ome.tif").read_bytes() == b"precious"
    files = session.status().files["cam0"]
    assert [Path(f).name for f in files] == ["x_cam0-part2.ome.tif", "x_cam0-part3.ome.tif"]
    a, _, _ = read_recording(files[0])
    b, infos, _ = read_recording(files[1])
    np.testing.assert_array_equal(a[0], pattern(0))
    np.testing.assert_array_equal(b[0], small)
    assert infos[0].seq == 1


# -- backlog and spilling -----------------------------------------------------------------------
def spilled_to_budget(q: SpillQueue, timeout_s: float = 30) -> None:
    """Wait (``timeout_s`` at most) until the spill thread has brought memory within the budget."""
    deadline = time.monotonic() + timeout_s
    while q.stats().memory_bytes > q.budget and time.monotonic() < deadline:
        time.sleep(0.001)


def test_spill_queue_keeps_order_and_memory_budget(tmp_path):
    frame_bytes = np.zeros((32, 32), np.float32).nbytes
    q = SpillQueue(tmp_path, memory_budget_bytes=5 * frame_bytes, hard_limit_bytes=10**9)
    n = 60
    for i in range(n):  # the consumer takes nothing yet: a backlog of 60 frames
        q.put({"i": i}, np.full((32, 32), i, np.float32))
    spilled_to_budget(q)
    st = q.stats()
    assert st.queued == n and st.memory_bytes <= 5 * frame_bytes
    (spill,) = q.spill_paths
    assert st.spilled == n - 5 and spill.exists() and os.path.getsize(spill) == (n - 5) * frame_bytes
    out = [q.get(timeout=5) for _ in range(n)]
    assert [h["i"] for h, _ in out] == list(range(n))
    assert all((a == h["i"]).all() for h, a in out)
    assert q.get(timeout=0.05) is None
    q.close()
    assert not spill.exists() and not list(tmp_path.glob("*.spill"))


def test_spill_queue_keeps_its_budget_when_the_consumer_runs_before_the_spill_thread(tmp_path):
    """On a loaded machine the whole backlog can be queued, and the consumer reach the tail,
    before the spill thread first runs. What is left over the budget must still be spilled (it once
    went, whole, to the head, where the spill thread never looks: memory stayed over budget)."""
    frame_bytes = np.zeros((32, 32), np.float32).nbytes
    q = SpillQueue(tmp_path, memory_budget_bytes=5 * frame_bytes, hard_limit_bytes=10**9)
    n = 60
    with q._cond:  # the spill thread cannot look at the queue until this block ends: that order, forced
        for i in range(n):
            q.put({"i": i}, np.full((32, 32), i, np.float32))
        first = [q.get(timeout=0) for _ in range(6)]  # the budget's 5 from the head, then the tail's
    assert [item[0]["i"] for item in first if item is not None] == list(range(6))
    spilled_to_budget(q)
    st = q.stats()
    assert st.memory_bytes <= 5 * frame_bytes and st.spilled_total >= n - 6 - 5
    out = [q.get(timeout=5) for _ in range(n - 6)]
    assert [h["i"] for h, _ in out] == list(range(6, n))
    assert all((a == h["i"]).all() for h, a in out)
    q.close()


def test_a_standing_backlog_keeps_its_spill_files_to_its_size(tmp_path):
    """A writer that keeps pace with the camera but stays a burst behind: the spilled segment is
    never empty. The spill files hold about the backlog, not every frame that passed through."""
    frame_bytes = np.zeros((32, 32), np.float32).nbytes
    q = SpillQueue(tmp_path, memory_budget_bytes=4 * frame_bytes, hard_limit_bytes=10**9,
                   rotate_bytes=8 * frame_bytes)

    for i in range(20):  # a burst: 20 frames behind
        q.put({"i": i}, np.full((32, 32), i, np.float32))
    spilled_to_budget(q)
    on_disk = []
    for i in range(20, 420):  # then one written for each one taken
        header, image = q.get(timeout=5)
        assert header["i"] == i - 20 and (image == i - 20).all()
        q.put({"i": i}, np.full((32, 32), i, np.float32))
        spilled_to_budget(q)
        on_disk.append(sum(os.path.getsize(p) for p in q.spill_paths))
    assert q.stats().spilled_total > 300  # the frames did pass through the spill files
    # the backlog (16 spilled frames) and at most two files' worth beyond it; it was 400 frames
    assert max(on_disk) <= (16 + 2 * 8) * frame_bytes, max(on_disk) // frame_bytes
    out = [q.get(timeout=5) for _ in range(20)]
    assert [h["i"] for h, _ in out] == list(range(400, 420))
    q.close()
    assert not list(tmp_path.glob("*.spill"))


def test_a_spill_thread_error_of_any_kind_keeps_every_item(tmp_path, monkeypatch):
    """Writing the spill file fails with something other than an OSError: the item stays queued,
    in order, the error is reported, and `get` never hangs on the item that was being written."""
    from umvd_live.recording import spillqueue

    def fails(*args):
        raise MemoryError("no buffer for the write")

    monkeypatch.setattr(spillqueue, "pwrite_all", fails)
    frame_bytes = np.zeros((32, 32), np.float32).nbytes
    q = SpillQueue(tmp_path, memory_budget_bytes=2 * frame_bytes, hard_limit_bytes=10**9)
    for i in range(10):
        q.put({"i": i}, np.full((32, 32), i, np.float32))
    deadline = time.monotonic() + 20
    while q.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(q.error, SpillError) and "MemoryError" in str(q.error)
    out = [q.get(timeout=5) for _ in range(10)]
    assert [h["i"] for h, _ in out] == list(range(10)) and q.get(timeout=0.05) is None
    q.close()


def test_backlog_beyond_memory_budget_spills_and_recording_is_complete(tmp_path):
    shape = (256, 256)
    n = 300
    session = RecordingSession(RecordingRequest(path=tmp_path / "burst.ome.tif",
                                                memory_budget_bytes=64 * 1024,  # < one frame
                                                hard_limit_bytes=4 * 10**9))
    peak_queue = 0
    for seq in range(n):  # a burst far faster than the file writer
        img = pattern(seq, shape=shape)
        assert session.submit_denoised("cam0", FrameHeader(seq, shape, "<f4"), img,
                                       state="live", model_step=seq)
        peak_queue = max(peak_queue, session.status().queued_frames)
    assert session.stop(wait=True, timeout=60)
    st = session.status()
    assert st.error is None and st.frames_written == n and st.frames_lost == 0
    assert st.spilled_total > 0, "a 300-frame burst against a 64 KiB budget should spill"
    print(f"peak queue {peak_queue} frames, spilled {st.spilled_total}")
    frames, infos, _ = read_recording(tmp_path / "burst_cam0.ome.tif")
    assert [f.seq for f in infos] == list(range(n))
    for seq in (0, 1, 137, n - 1):
        np.testing.assert_array_equal(frames[seq], pattern(seq, shape=shape))
    assert not list(tmp_path.glob("*.spill"))


def test_a_stop_while_a_frame_is_being_spilled_writes_every_frame(tmp_path, monkeypatch):
    """The recording stops while the spill thread writes a frame to a slow disk: `get` times out
    for that frame's sake, yet the queue is not empty. Every accepted frame is written before the
    file says complete (the writer once took the timeout for the end: 12 of 40 written, the rest
    dropped, complete=true and no error)."""
    from umvd_live.recording import spillqueue

    write, append = spillqueue.pwrite_all, RecordingFile.append

    def slow_spill(fd, data, offset):  # longer per frame than the writer waits for one (0.2 s)
        time.sleep(0.3)
        write(fd, data, offset)

    def slow_append(self, image, info):  # a disk slower than the camera: a backlog builds up
        time.sleep(0.02)
        append(self, image, info)

    monkeypatch.setattr(spillqueue, "pwrite_all", slow_spill)
    monkeypatch.setattr(RecordingFile, "append", slow_append)
    shape, n = (32, 32), 40
    session = RecordingSession(RecordingRequest(path=tmp_path / "slow.ome.tif", hard_limit_bytes=10**9,
                                                memory_budget_bytes=10 * pattern(0, shape=shape).nbytes))
    for seq in range(n):
        assert session.submit_denoised("cam0", FrameHeader(seq, shape, "<f4"), pattern(seq, shape=shape),
                                       state="live", model_step=seq)
    deadline = time.monotonic() + 20
    while session.status().spilled_frames == 0 and time.monotonic() < deadline:
        time.sleep(0.005)  # until a frame is on its way to the spill file
    assert session.stop(wait=True, timeout=60)
    st = session.status()
    assert st.error is None and st.frames_written == n and st.frames_lost == 0 and st.spilled_total > 0
    frames, infos, prov = read_recording(tmp_path / "slow_cam0.ome.tif")
    assert prov["complete"] and [f.seq for f in infos] == list(range(n))
    for seq in range(n):
        np.testing.assert_array_equal(frames[seq], pattern(seq, shape=shape))
    assert not list(tmp_path.glob("*.spill"))


def test_a_base_name_near_the_name_limit_still_spills(tmp_path, monkeypatch):
    """The spill files have a short name of their own, with the recording's id: one made from the
    base name (fine for the recording's files) was too long, and the first spill ended the
    recording with ENAMETOOLONG."""
    append = RecordingFile.append

    def slow_append(self, image, info):  # a disk slower than the camera: the backlog spills
        time.sleep(0.02)
        append(self, image, info)

    monkeypatch.setattr(RecordingFile, "append", slow_append)
    base = tmp_path / ("m" * 228 + ".ome.tif")
    assert len(stream_path(base, "cam0").name) == 241  # within the usual 255-byte limit
    shape, n = (32, 32), 30
    session = RecordingSession(RecordingRequest(path=base, memory_budget_bytes=1, hard_limit_bytes=10**9))
    for seq in range(n):  # a budget below one frame: what the writer has not taken yet spills
        assert session.submit_denoised("cam0", FrameHeader(seq, shape, "<f4"), pattern(seq, shape=shape),
                                       state="live", model_step=seq)
    deadline = time.monotonic() + 20
    while (st := session.status()).spilled_total == 0 and st.error is None and time.monotonic() < deadline:
        time.sleep(0.005)
    spills = [p.name for p in tmp_path.glob(".umvd-recorder-*.spill")]
    assert session.stop(wait=True, timeout=60)
    st = session.status()
    assert st.error is None and st.frames_written == n and st.spilled_total > 0
    assert spills and all(name.startswith(f".umvd-recorder-{session.recording_id[:8]}-") for name in spills)
    frames, infos, _ = read_recording(stream_path(base, "cam0"))
    assert [f.seq for f in infos] == list(range(n))
    np.testing.assert_array_equal(frames, np.stack([pattern(seq, shape=shape) for seq in range(n)]))
    assert not list(tmp_path.glob("*.spill"))


# -- path confinement -----------------------------------------------------------------------------
def test_confine_path(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (out / "escape").symlink_to(outside, target_is_directory=True)
    (out / "inside").symlink_to(out / ".", target_is_directory=True)

    assert confine_path("a.ome.tif", out) == out.resolve() / "a.ome.tif"
    assert confine_path("mouse1/day2/a.ome.tif", out) == out.resolve() / "mouse1/day2/a.ome.tif"
    assert confine_path(str(out / "b.ome.tif"), out) == out.resolve() / "b.ome.tif"
    assert confine_path("inside/c.ome.tif", out) == out.resolve() / "c.ome.tif"
    for bad in ("../a.ome.tif", "x/../../a.ome.tif", "x/../a.ome.tif", str(outside / "a.ome.tif"),
                "/etc/passwd", "escape/a.ome.tif", "escape", "", "   ", "a\x00b", ".", str(out)):
        with pytest.raises(PathNotAllowed):
            confine_path(bad, out)
    with pytest.raises(PathNotAllowed):
        confine_path(123, out)  # type: ignore[arg-type]

    # a confined path records where it says, creating the missing sub-directories
    target = confine_path("mouse1/rec.ome.tif", out)
    session = RecordingSession(RecordingRequest(path=target))
    session.submit_denoised("cam0", header(0), pattern(0), state="live", model_step=0)
    session.stop()
    assert (out / "mouse1" / "rec_cam0.ome.tif").exists()


def test_stream_path_and_bad_requests(tmp_path):
    assert stream_path("/d/rec.ome.tif", "cam0").name == "rec_cam0.ome.tif"
    assert stream_path("/d/rec.OME.TIFF", "cam0", raw=True).name == "rec_cam0.raw.ome.tif"
    assert stream_path("/d/rec", "c.1").name == "rec_c.1.ome.tif"
    with pytest.raises(RecordingError):
        stream_path("/d/rec.ome.tif", "../x")
    with pytest.raises(RecordingError):
        RecordingSession(RecordingRequest(path=tmp_path / "r.ome.tif", streams=frozenset({"a/b"})))
    (tmp_path / "file").write_text("")
    with pytest.raises(RecordingError):
        RecordingSession(RecordingRequest(path=tmp_path / "file" / "r.ome.tif"))


# -- kill -9 ----------------------------------------------------------------------------------
_SESSION_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from test_recorder import pattern, header, SHAPE
    from umvd_live.recording.session import RecordingRequest, RecordingSession
    s = RecordingSession(RecordingRequest(path=Path(sys.argv[1]), raw=True,
                                          checkpoint_interval_s=0.2))
    seq = 0
    while True:
        h = header(seq, t=seq * 0.01)
        s.submit_raw("cam0", h, pattern(seq, dtype=np.uint16))
        s.submit_denoised("cam0", h, pattern(seq), state="warmup" if seq < 20 else "live",
                          model_step=seq)
        seq += 1
        if seq % 5 == 0:
            print(s.status().frames_written, flush=True)
        time.sleep(0.002)
""")


def _run_until(cmd: list[str], written_at_least: int) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        written = 0
        for line in proc.stdout:
            written = int(line)
            if written >= written_at_least:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        return written
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_session_killed_with_sigkill_leaves_readable_files(tmp_path):
    base = tmp_path / "killed.ome.tif"
    written = _run_until([sys.executable, "-c", _SESSION_CHILD, str(base), str(Path(__file__).parent)],
                         written_at_least=60)
    for name, dtype in (("killed_cam0.ome.tif", np.float32), ("killed_cam0.raw.ome.tif", np.uint16)):
        path = tmp_path / name
        frames, infos, prov = read_recording(path)
        n = len(infos)
        assert n >= written // 2 - 1  # the writer had written `written` frames over both files
        assert [f.seq for f in infos] == list(range(n))
        for i in range(n):
            np.testing.assert_array_equal(frames[i], pattern(i, dtype=dtype))
        assert prov["complete"] is False and prov["seq_gaps"] == []
        assert 1 <= prov["frames_declared_in_ome"] <= n
        if dtype == np.float32:
            assert prov["first_live_frame"] == 20 and prov["warmup_frames"] == list(range(20))
        with tifffile.TiffFile(path) as tif:  # a generic OME reader sees the checkpointed frames
            assert tif.is_ome
            series = tif.series[0].asarray().reshape(-1, *SHAPE)  # one plane: no T axis
        assert series.shape[0] == prov["frames_declared_in_ome"]
        np.testing.assert_array_equal(series, frames[: series.shape[0]])
        validate_ome(path)


_FILE_CHILD = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, sys.argv[2])
    from test_recorder import pattern
    from umvd_live.recording.ometiff import FrameInfo, Provenance, RecordingFile
    shape = (300, 301)
    rec = RecordingFile.create(sys.argv[1], pattern(0, shape), FrameInfo(seq=0), Provenance("k"))
    seq = 1
    print(0, flush=True)
    while True:
        rec.append(pattern(seq, shape), FrameInfo(seq=seq, state="live", model_step=seq))
        if seq % 7 == 0:
            rec.checkpoint()
        if seq % 25 == 0:
            print(seq, flush=True)
        seq += 1
""")


@pytest.mark.parametrize("frames_before_kill", [0, 30, 75, 140])
def test_file_killed_mid_write_reads_up_to_last_complete_frame(tmp_path, frames_before_kill):
    """SIGKILL a writer that appends as fast as it can: whatever instant it dies at, every linked
    page is complete and correct."""
    path = tmp_path / "fast.ome.tif"
    written = _run_until([sys.executable, "-c", _FILE_CHILD, str(path), str(Path(__file__).parent)],
                         written_at_least=frames_before_kill)
    frames, infos, prov = read_recording(path)
    assert len(infos) >= written + 1
    assert [f.seq for f in infos] == list(range(len(infos)))
    for i in range(len(infos)):
        np.testing.assert_array_equal(frames[i], pattern(i, (300, 301)))
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == len(infos)
        assert all(FRAME_TAG in p.tags for p in tif.pages)
        declared = tif.series[0].asarray().reshape(-1, 300, 301)
        assert declared.shape[0] == prov["frames_declared_in_ome"] <= len(infos)
        np.testing.assert_array_equal(declared, frames[: declared.shape[0]])


def test_a_file_killed_before_its_header_was_written_reads_as_an_empty_recording(tmp_path):
    """`create` opens the file before it writes the header: a kill (or a reader polling a
    recording as it starts) finds it empty or holding part of the header. That is a recording
    with no frames, not a corrupt file; anything else short of a BigTIFF header still raises."""
    from umvd_live.recording.ometiff import RecordingFormatError, read_provenance

    path = tmp_path / "early.ome.tif"
    rec = RecordingFile.create(path, pattern(0), FrameInfo(seq=0, t=0.0), Provenance("cam0"))
    rec.close()
    unlinked = path.read_bytes()[:8] + b"\0" * 8  # its header before page 0 was linked
    for cut in (0, 1, 7, 15, 16):  # 16: the header whole, no page linked yet
        path.write_bytes(unlinked[:cut])
        frames, infos, prov = read_recording(path)
        assert frames.shape[0] == 0 and infos == [] and not prov["complete"], cut
        assert read_provenance(path) == {"frames": 0, "complete": False}, cut
    for junk in (b"MM", b"II*\0", b"\x89PNG\r\n\x1a\n" + b"\0" * 8):  # big-endian, classic TIFF, PNG
        path.write_bytes(junk)
        with pytest.raises(RecordingFormatError, match="not a little-endian BigTIFF"):
            read_recording(path)


def test_replay_and_denoise_read_a_killed_recordings_frames_past_its_last_checkpoint(tmp_path):
    """The readers of `acquire replay`, `denoise` and `batch` take every frame a killed recorder
    linked, with its time, not just those its OME-XML declared at the last checkpoint."""
    from umvd_live.recording.movie import MovieFrames, open_movie

    path = tmp_path / "killed.ome.tif"
    rec = RecordingFile.create(path, pattern(0), FrameInfo(seq=0, t=10.0), Provenance("cam0"))
    for seq in range(1, 8):
        rec.append(pattern(seq), FrameInfo(seq=seq, t=10.0 + 0.5 * seq))
        if seq == 3:
            rec.checkpoint()
    os.close(rec._fd)  # killed: frames 4-7 linked, the OME-XML still declares 4
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].shape[0] == 4
    with open_movie(path) as movie:
        assert movie.n_frames == 8 and movie.streams == ["cam0"]
        for seq in range(8):
            np.testing.assert_array_equal(movie.frame(seq), pattern(seq))
        np.testing.assert_allclose(movie.timestamps(), 0.5 * np.arange(8))
    with MovieFrames(path) as frames:
        np.testing.assert_array_equal(frames.read(0, 8), np.stack([pattern(seq) for seq in range(8)]))


# -- disk full ---------------------------------------------------------------------------------
_DISK_FULL_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from test_recorder import pattern, header
    from umvd_live.recording.session import RecordingRequest, RecordingSession
    limit = 2 * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past 2 MiB: EFBIG
    errors = []
    s = RecordingSession(RecordingRequest(path=Path(sys.argv[1])), on_error=errors.append)
    accepted = refused = 0
    for seq in range(200):  # 200 frames x 20 KiB = 4 MiB > limit
        ok = s.submit_denoised("cam0", header(seq), pattern(seq), state="live", model_step=seq)
        accepted += ok
        refused += not ok
        time.sleep(0.002)
    s.stop(wait=True, timeout=30)
    st = s.status()
    print(json.dumps({"errors": errors, "error": st.error, "written": st.frames_written,
                      "lost": st.frames_lost, "submitted": st.frames_submitted,
                      "accepted": accepted, "refused": refused, "finished": st.finished,
                      "still_serving": True}))
""")


def test_disk_full_stops_recording_with_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-c", _DISK_FULL_CHILD, str(tmp_path / "full.ome.tif"),
                          str(Path(__file__).parent)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["still_serving"] and result["finished"]
    assert result["errors"] == [result["error"]]  # the callback fired once
    assert "EFBIG" in result["error"] and "File too large" in result["error"]
    assert result["refused"] > 0 and 0 < result["written"] < 200
    # every accepted frame is written or counted lost: the one whose write failed too (it was not)
    assert result["submitted"] == result["accepted"] == result["written"] + result["lost"]
    assert result["lost"] >= 1
    frames, infos, prov = read_recording(tmp_path / "full_cam0.ome.tif")
    assert len(infos) == result["written"] or len(infos) == result["written"] - 1
    assert [f.seq for f in infos] == list(range(len(infos)))
    for i in range(len(infos)):
        np.testing.assert_array_equal(frames[i], pattern(i))
    assert prov["complete"] is False
    assert not list(tmp_path.glob("*.spill"))


def test_a_recording_that_fails_unexpectedly_still_finishes(tmp_path, monkeypatch):
    """A write fails with an unexpected error and abandoning the file fails too: the recording
    reports the error and `stop` returns (the daemon's shutdown waits on it without a timeout)."""

    append, calls = RecordingFile.append, []

    def append_fails(self, image, info):
        calls.append(info.seq)
        if len(calls) > 1:  # the file is made (with its first frame), then the bug
            raise ValueError("a bug while appending")
        return append(self, image, info)

    def abandon_fails(self):
        raise TypeError("abandoning fails too")

    monkeypatch.setattr(RecordingFile, "append", append_fails)
    monkeypatch.setattr(RecordingFile, "abandon", abandon_fails)
    session = RecordingSession(RecordingRequest(path=tmp_path / "bug.ome.tif"))
    for seq in range(2):
        assert session.submit_denoised("cam0", FrameHeader(seq, (16, 16), "<f4"), pattern(seq, shape=(16, 16)),
                                       state="live", model_step=seq)
    assert session.stop(wait=True, timeout=20)
    status = session.status()
    assert status.finished and "a bug while appending" in status.error
    assert not list(tmp_path.glob("*.spill"))


# -- offline parity --------------------------------------------------------------------------------
def test_write_movie_whole_file_api(tmp_path):
    movie = np.stack([pattern(i) for i in range(12)])
    infos = [FrameInfo(seq=i, t=0.1 * i, state="warmup" if i < 3 else "live", model_step=i)
             for i in range(12)]
    prov = Provenance(stream="movie.tif", preset="paper", window=7, weights_sha256="f" * 64,
                      source="movie.tif", pixel_size_um=1.2, extra={"mode": "offline"})
    path = write_movie(tmp_path / "den.ome.tif", (f for f in movie), infos, prov)
    frames, back, meta = read_recording(path)
    np.testing.assert_array_equal(frames, movie)
    assert back == infos
    assert meta["extra.mode"] == "offline" and meta["pixel_size_um"] == 1.2
    assert meta["complete"] and meta["first_live_frame"] == 3
    np.testing.assert_array_equal(tifffile.imread(path), movie)
    validate_ome(path)
    with pytest.raises(FileExistsError):
        write_movie(path, movie, infos, prov)
    with pytest.raises(ValueError):
        write_movie(tmp_path / "short.ome.tif", movie, infos[:5], prov)


def test_napari_builtin_reader_opens_a_recording(tmp_path):
    io = pytest.importorskip("napari_builtins.io")
    movie = np.stack([pattern(i) for i in range(5)])
    path = write_movie(tmp_path / "n.ome.tif", movie, [FrameInfo(seq=i) for i in range(5)],
                       Provenance(stream="cam0"))
    reader = io.napari_get_reader(str(path))
    assert reader is not None
    layers = reader(str(path))
    np.testing.assert_array_equal(np.asarray(layers[0][0]), movie)


def test_many_gaps_grow_the_ome_xml_beyond_its_slot(tmp_path):
    """Checkpointed XML that outgrows its reserved slot moves to a larger one; nothing breaks."""
    seqs = list(range(0, 6000, 2)) + [5, 7]  # 2999 gaps, then a producer restart
    path = tmp_path / "gaps.ome.tif"
    rec = RecordingFile.create(path, pattern(seqs[0], (8, 8)), FrameInfo(seq=seqs[0]), Provenance("g"))
    for i, seq in enumerate(seqs[1:], start=1):
        rec.append(pattern(seq, (8, 8)), FrameInfo(seq=seq, state="live"))
        if i % 500 == 0:
            rec.checkpoint()
            _, infos, prov = read_recording(path)
            assert prov["frames_declared_in_ome"] == len(infos) == i + 1
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages.first.description) > 8192  # larger than the first slot
    rec.close()
    frames, infos, prov = read_recording(path)
    assert [f.seq for f in infos] == seqs
    assert prov["seq_gaps"][:2] == [(1, 1), (3, 3)] and len(prov["seq_gaps"]) == 3000
    assert prov["seq_gaps"][-1] == (6, 6)  # after the restart (5 -> 7)
    assert prov["seq_restarts"] == [3000] and prov["seq_restarts_at_frame"] == "3000"
    assert prov["complete"] and prov["frames_declared_in_ome"] == len(seqs)
    validate_ome(path)


def test_a_recording_holds_no_frame_meta_in_memory(tmp_path):
    """The producer's meta goes on each frame's page; a recording keeps in memory, for every frame
    until it closes, only the columns of the final frame table. It once held each frame's whole
    meta: ~2 KB a frame with a pymmcore-plus-like meta, GiBs over a day."""
    import tracemalloc

    def meta(t: int) -> dict:
        return {"group": "cam0", "index": {"t": t, "c": 0}, "channel": "GFP",
                "property_values": {f"Dev{k}-Prop": f"value {k} of {t}" for k in range(20)}}

    img = np.zeros((4, 4), np.uint16)
    path = tmp_path / "meta.ome.tif"
    rec = RecordingFile.create(path, img, FrameInfo(seq=0, t=0.0, meta=meta(0)), Provenance(stream="cam0"))
    n = 2000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1, n):
            rec.append(img, FrameInfo(seq=i, t=0.5 * i, t_received=1000.0 + i, state="live", model_step=i,
                                      amplitude_gain=1.5, meta=meta(i)))
        per_frame = (tracemalloc.get_traced_memory()[0] - before) / (n - 1)
    finally:
        tracemalloc.stop()
    rec.close()
    assert per_frame < 500, f"{per_frame:.0f} bytes held per frame"
    _, infos, _ = read_recording(path)
    assert [i.meta for i in infos] == [meta(t) for t in range(n)]  # every page keeps its meta
    with tifffile.TiffFile(path) as tif:
        ome = tif.pages.first.description
    assert FRAMES_NS in ome and "\n7\t7\t3.5\t1007.0\tlive\t7\t1.5\t7\tNone\tNone\n" in ome  # the frame table


def test_a_failing_provenance_callback_does_not_stop_the_recording(tmp_path):
    def provenance(stream: str) -> Provenance:
        raise RuntimeError("no denoiser yet")

    session = RecordingSession(RecordingRequest(path=tmp_path / "p.ome.tif"), provenance=provenance)
    assert session.submit_denoised("cam0", header(0), pattern(0), state="warmup", model_step=0)
    session.stop()
    assert session.status().error is None
    _, infos, prov = read_recording(tmp_path / "p_cam0.ome.tif")
    assert len(infos) == 1 and prov["extra.provenance_error"] == "RuntimeError: no denoiser yet"


@pytest.mark.parametrize("fmt", ["tif", "zarr"])
def test_a_weights_hash_computed_after_the_first_frame_is_written_once_known(tmp_path, fmt):
    """The daemon hashes a recording's weights on its state worker (`Provenance.weights_sha256_future`),
    so the file exists before the hash does: until then it says ``pending`` (a recording killed
    then stays readable, and says so); the next checkpoint names the hash, new frames or not; a
    close waits for a hash still being computed; a hash that failed is ``None``, with the error."""
    from concurrent.futures import Future

    if fmt == "zarr":
        pytest.importorskip("tensorstore")
        pytest.importorskip("yaozarrs")
        from umvd_live.recording.omezarr import ZarrRecording, read_zarr_recording

        create, read, suffix = ZarrRecording.create, read_zarr_recording, ".ome.zarr"
    else:
        create, read, suffix = RecordingFile.create, read_recording, ".ome.tif"

    def start(name: str, future: Future) -> RecordingFile:
        rec = create(tmp_path / f"{name}{suffix}", pattern(0), FrameInfo(seq=0),
                     Provenance(stream=name, weights_sha256_future=future))
        rec.checkpoint()
        return rec

    known: Future[str] = Future()
    rec = start("known", known)
    frames, infos, prov = read(tmp_path / f"known{suffix}")  # as a kill now would leave it
    assert len(infos) == 1 and prov["weights_sha256_at_start"] == "pending" and not prov["complete"]
    known.set_result("cd" * 32)
    rec.checkpoint()  # no new frame: the hash alone is news
    assert read(tmp_path / f"known{suffix}")[2]["weights_sha256_at_start"] == "cd" * 32
    rec.append(pattern(1), FrameInfo(seq=1))
    rec.close()
    _, infos, prov = read(tmp_path / f"known{suffix}")
    assert len(infos) == 2 and prov["complete"] and prov["weights_sha256_at_start"] == "cd" * 32

    late: Future[str] = Future()
    rec = start("late", late)
    timer = threading.Timer(0.3, late.set_result, ("ef" * 32,))
    timer.start()
    rec.close()  # waits for it: the final metadata names the hash
    timer.join()
    _, _, prov = read(tmp_path / f"late{suffix}")
    assert prov["complete"] and prov["weights_sha256_at_start"] == "ef" * 32

    failed: Future[str] = Future()
    rec = start("failed", failed)
    failed.set_exception(RuntimeError("out of memory"))
    rec.close()
    _, _, prov = read(tmp_path / f"failed{suffix}")
    assert prov["complete"] and prov["weights_sha256_at_start"] is None
    assert prov["weights_sha256_error"] == "RuntimeError: out of memory"


def test_a_part_left_at_a_shape_change_is_closed_once_its_hash_is_known_without_holding_up_the_writer(tmp_path):
    """After a shape change a stream goes on in a new part, which names the provenance its stream
    was given after `renew_provenance` (the daemon's new engine); the part left behind names the
    one it began with. The writer writes every stream: a part whose weights hash is still being
    computed must not hold it up, so it stays open (checkpointed) until the hash is known, and is
    closed then, with the hash in its final metadata."""
    from concurrent.futures import Future

    hashes: list[Future[str | None]] = []

    def provenance(stream: str) -> Provenance:
        hashes.append(Future())
        return Provenance(stream=stream, weights_sha256_future=hashes[-1])

    def until(done, what: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    session = RecordingSession(RecordingRequest(path=tmp_path / "x.ome.tif", checkpoint_interval_s=0.1),
                               provenance=provenance)
    small = (16, 16)
    for seq in range(2):
        assert session.submit_denoised("cam0", header(seq), pattern(seq), state="live", model_step=1)
    session.renew_provenance("cam0")  # a new network: the next frame takes a new provenance
    for seq in range(2, 4):
        assert session.submit_denoised("cam0", FrameHeader(seq, small, "<f4"), pattern(seq, shape=small),
                                       state="live", model_step=1)
    until(lambda: session.status().frames_written == 4, "the new part's frames were held up by the old one's hash")
    assert len(hashes) == 2
    old, new = (tmp_path / f"x_cam0{part}.ome.tif" for part in ("", "-part2"))
    _, infos, prov = read_recording(old)  # (as a kill now would leave it: readable, every frame)
    assert [f.seq for f in infos] == [0, 1] and not prov["complete"] and prov["weights_sha256_at_start"] == "pending"
    hashes[0].set_result("ab" * 32)
    until(lambda: read_recording(old)[2]["complete"], "the old part was not closed once its hash was known")
    assert read_recording(old)[2]["weights_sha256_at_start"] == "ab" * 32
    hashes[1].set_result("cd" * 32)
    assert session.stop(wait=True, timeout=60)
    _, infos, prov = read_recording(new)
    assert [f.seq for f in infos] == [2, 3] and prov["complete"] and prov["weights_sha256_at_start"] == "cd" * 32


# -- multi-dimensional acquisitions (issue 16): one file per position, channel and plane -----------
CHANNELS = ("GCaMP", "mCherry λ561")  # display names; the second is not ASCII
PLANES = 3
POSITIONS = ("A1", "B µ2")


def acq_stream(p: int, c: int, z: int) -> str:
    """The stream name the sources give one (p, c, z): GROUP.pP.CHANNEL.zZ (docs/adapters.md)."""
    return f"cam0.p{p}.{re.sub(r'[^A-Za-z0-9_-]+', '_', CHANNELS[c])}.z{z}"


def acq_header(t: int, p: int, c: int, z: int) -> FrameHeader:
    meta = {"group": "cam0", "index": {"t": t, "p": p, "c": c, "z": z}, "channel": CHANNELS[c],
            "position": POSITIONS[p], "pixel_size_um": 0.5}
    return FrameHeader(seq=t, shape=SHAPE, dtype="<f4", t=10.0 + t + 0.01 * (c * PLANES + z), meta=meta)


def acq_id(t: int, p: int, c: int, z: int) -> int:
    """Distinct for every frame of the acquisition (< 251), so a misplaced frame cannot pass."""
    return ((t * len(POSITIONS) + p) * len(CHANNELS) + c) * PLANES + z


def ome_of(path: Path):
    """The file's OME-XML, validated against the schema, as ome-types objects."""
    ome_types = pytest.importorskip("ome_types")
    with tifffile.TiffFile(path) as tif:
        return ome_types.from_xml(tif.pages.first.description, validate=True)


def provenance_map_of(ome) -> dict[str, str]:
    (ann,) = [a for a in ome.structured_annotations.map_annotations if a.namespace == PROVENANCE_NS]
    return {m.k: m.value for m in ann.value.ms}


def test_acquisition_records_one_file_per_stream_with_its_axes_in_ome(tmp_path):
    """2 positions x 2 channels x 3 planes x 5 time points, denoised and raw; one stream loses a
    frame upstream. Every file names its channel and its place in the acquisition, and
    read_acquisition puts every frame back where it was taken."""
    frames_t = 5
    lost = (2, 1, 0, 2)  # (t, p, c, z): never arrives
    session = RecordingSession(RecordingRequest(path=tmp_path / "rec.ome.tif", raw=True))
    for t in range(frames_t):  # acquisition order: t, p, c, z
        for p in range(len(POSITIONS)):
            for c in range(len(CHANNELS)):
                for z in range(PLANES):
                    if (t, p, c, z) == lost:
                        continue
                    h, k = acq_header(t, p, c, z), acq_id(t, p, c, z)
                    assert session.submit_raw(acq_stream(p, c, z), h, pattern(k, dtype=np.uint16))
                    assert session.submit_denoised(acq_stream(p, c, z), h, pattern(k),
                                                   state="live", model_step=t)
    assert session.stop(wait=True, timeout=60)
    st = session.status()
    assert st.error is None and st.frames_written == 2 * (frames_t * 12 - 1)
    assert len(st.files) == 24
    assert Path(st.files["cam0.p1.mCherry_561.z2.raw"][0]).name == "rec_cam0.p1.mCherry_561.z2.raw.ome.tif"

    for p, c, z in np.ndindex(len(POSITIONS), len(CHANNELS), PLANES):
        stream = acq_stream(p, c, z)
        times = [t for t in range(frames_t) if (t, p, c, z) != lost]
        for kind, suffix, dtype in (("denoised", "", np.float32), ("raw", ".raw", np.uint16)):
            path = tmp_path / f"rec_{stream}{suffix}.ome.tif"
            with tifffile.TiffFile(path) as tif:  # what any OME reader sees: one T series
                assert tif.series[0].axes == "TYX" and tif.series[0].shape == (len(times), *SHAPE)
            ome = ome_of(path)
            (image,) = ome.images
            assert image.name == f"{stream} {kind}"
            (channel,) = image.pixels.channels
            assert channel.name == CHANNELS[c]
            assert channel.color.as_rgb_tuple() == ((0, 255, 0) if c == 0 else (255, 0, 255))
            assert image.pixels.size_t == len(times) and image.pixels.size_c == image.pixels.size_z == 1
            assert [(pl.the_t, pl.the_c, pl.the_z) for pl in image.pixels.planes] == \
                [(i, 0, 0) for i in range(len(times))]
            m = provenance_map_of(ome)
            assert {k: m[k] for k in ("group", "acquisition_axes", "axis.p", "axis.c", "axis.z",
                                      "channel", "position", "recording_id", "kind")} == {
                "group": "cam0", "acquisition_axes": "t,p,c,z", "axis.p": str(p), "axis.c": str(c),
                "axis.z": str(z), "channel": CHANNELS[c], "position": POSITIONS[p],
                "recording_id": session.recording_id, "kind": kind}
            assert "axis.g" not in m  # the acquisition has no grid axis

            frames, infos, prov = read_recording(path)
            assert frames.dtype == dtype and prov["axis.z"] == z and prov["channel"] == CHANNELS[c]
            assert [i.t_index for i in infos] == times and [i.seq for i in infos] == times
            for i, t in enumerate(times):
                np.testing.assert_array_equal(frames[i], pattern(acq_id(t, p, c, z), dtype=dtype))

    for kind, dtype in (("denoised", np.float32), ("raw", np.uint16)):
        stacks = read_acquisition(tmp_path / "rec.ome.tif", kind=kind)
        assert list(stacks) == ["cam0.p0", "cam0.p1"]
        for p, s in enumerate(stacks.values()):
            assert s.position == POSITIONS[p] and s.axes == "TCZYX"
            assert s.data.shape == (frames_t, len(CHANNELS), PLANES, *SHAPE) and s.data.dtype == dtype
            assert s.channels == CHANNELS and s.c_indices == (0, 1) and s.z_indices == (0, 1, 2)
            assert s.t_indices == tuple(range(frames_t)) and s.pixel_size_um == 0.5
            assert s.streams[(1, 2)] == acq_stream(p, 1, 2)
            for t, c, z in np.ndindex(frames_t, len(CHANNELS), PLANES):
                if (t, p, c, z) == lost:
                    assert not s.present[t, c, z] and not s.data[t, c, z].any()
                    assert np.isnan(s.times[t, c, z])
                    continue
                assert s.present[t, c, z] and s.times[t, c, z] == pytest.approx(acq_header(t, p, c, z).t)
                np.testing.assert_array_equal(s.data[t, c, z], pattern(acq_id(t, p, c, z), dtype=dtype))


def test_channel_colours_are_defaults_from_the_name():
    rgba = {name: ome_color(name) for name in ("DAPI", "EGFP", "mCherry", "Cy5", "BF", "Alexa 647",
                                                   "far red", "iRFP", "Pos1", "bfp", "Indicator", "561 nm")}
    assert rgba["EGFP"] == 0x00FF00FF and rgba["DAPI"] == rgba["bfp"] == 0x0000FFFF
    assert rgba["mCherry"] == rgba["561 nm"] == 0xFF00FFFF - (1 << 32)  # OME's signed 32-bit RGBA
    assert rgba["Cy5"] == rgba["Alexa 647"] == rgba["far red"] == rgba["iRFP"] == 0xFF0000FF - (1 << 32)
    assert rgba["BF"] == -1  # white: a grey scale
    assert rgba["Pos1"] is None and rgba["Indicator"] is None  # "dic" only as a word


def test_read_acquisition_keeps_recordings_that_share_a_base_path_apart(tmp_path):
    """A second recording into the same base path gets part numbers; the reader never mixes the
    two. An older producer's stream (no acquisition meta) reads as one channel and plane."""
    base = tmp_path / "same.ome.tif"
    first = RecordingSession(RecordingRequest(path=base))
    for t in range(3):
        first.submit_denoised(acq_stream(0, 1, 0), acq_header(t, 0, 1, 0), pattern(t),
                              state="live", model_step=t)
    first.stop()
    second = RecordingSession(RecordingRequest(path=base))
    for seq in range(4):
        second.submit_denoised("cam0", header(seq), pattern(100 + seq), state="live", model_step=seq)
    second.stop()
    with pytest.raises(ValueError, match="2 recordings") as err:
        read_acquisition(base)
    assert first.recording_id in str(err.value) and second.recording_id in str(err.value)

    (only,) = read_acquisition(base, recording_id=first.recording_id).values()
    assert only.key == "cam0.p0" and only.data.shape == (3, 1, 1, *SHAPE)
    assert only.channels == (CHANNELS[1],) and only.c_indices == (1,) and only.z_indices == (0,)
    np.testing.assert_array_equal(only.data[:, 0, 0], np.stack([pattern(t) for t in range(3)]))

    stacks = read_acquisition(base, recording_id=second.recording_id)
    assert list(stacks) == ["cam0"]
    old = stacks["cam0"]
    assert old.data.shape == (4, 1, 1, *SHAPE) and old.channels == ("",) and old.position is None
    assert old.files == {"cam0": (tmp_path / "same_cam0.ome.tif",)}
    np.testing.assert_array_equal(old.data[:, 0, 0], np.stack([pattern(100 + s) for s in range(4)]))
    with pytest.raises(FileNotFoundError):
        read_acquisition(base, kind="raw")


def test_read_acquisition_takes_no_file_of_a_recording_whose_name_starts_with_its_own(tmp_path):
    """``exp.ome.tif`` and ``exp_ctrl.ome.tif`` in one folder: ``exp_*`` matches the control's
    files too. Only the names the recorder gives a file of ``exp`` count (the control's raw copies
    were once read as exp's, which has none, and exp's own files refused as "2 recordings")."""
    from umvd_live.recording.acquisition import recording_files

    def record(base: str, offset: int, raw: bool) -> None:
        session = RecordingSession(RecordingRequest(path=tmp_path / base, raw=raw))
        for seq in range(3):
            px = pattern(seq + offset, dtype=np.uint16)
            session.submit_raw("cam0", header(seq), px)
            session.submit_denoised("cam0", header(seq), px.astype(np.float32), state="live", model_step=seq)
        assert session.stop(wait=True, timeout=30)

    record("exp.ome.tif", 0, raw=False)
    record("exp_ctrl.ome.tif", 100, raw=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "exp_cam0.ome.tif", "exp_ctrl_cam0.ome.tif", "exp_ctrl_cam0.raw.ome.tif"]
    exp, ctrl = tmp_path / "exp.ome.tif", tmp_path / "exp_ctrl.ome.tif"
    assert recording_files(exp) == [tmp_path / "exp_cam0.ome.tif"]
    (stack,) = read_acquisition(exp).values()
    np.testing.assert_array_equal(stack.data[:, 0, 0],
                                  np.stack([pattern(s, dtype=np.uint16).astype(np.float32) for s in range(3)]))
    with pytest.raises(FileNotFoundError):
        read_acquisition(exp, kind="raw")
    (raw,) = read_acquisition(ctrl, kind="raw").values()
    np.testing.assert_array_equal(raw.data[:, 0, 0], np.stack([pattern(100 + s, dtype=np.uint16) for s in range(3)]))


def test_further_axes_make_positions_and_unnamed_channels_their_index(tmp_path):
    """An acquisition axis besides t, p, g, c, z (useq allows any key) keys positions of its own;
    a channel the producer does not name is called by its index, as in its stream name."""
    session = RecordingSession(RecordingRequest(path=tmp_path / "x.ome.tif"))
    for t, a, z in np.ndindex(2, 2, 2):
        h = FrameHeader(seq=t, shape=SHAPE, dtype="<f4",
                        meta={"group": "cam0", "index": {"t": t, "p": 3, "c": 1, "z": z, "a": a}})
        session.submit_denoised(f"cam0.p3.c1.z{z}.a{a}", h, pattern(t * 4 + a * 2 + z),
                                state="live", model_step=t)
    session.stop()
    _, _, prov = read_recording(tmp_path / "x_cam0.p3.c1.z1.a1.ome.tif")
    assert (prov["axis.a"], prov["axis.p"], prov["acquisition_axes"]) == (1, 3, "t,p,c,z,a")
    stacks = read_acquisition(tmp_path / "x.ome.tif")
    assert list(stacks) == ["cam0.p3.a0", "cam0.p3.a1"]
    for a, s in enumerate(stacks.values()):
        assert s.channels == ("c1",) and s.data.shape == (2, 1, 2, *SHAPE) and s.present.all()
        for t, z in np.ndindex(2, 2):
            np.testing.assert_array_equal(s.data[t, 0, z], pattern(t * 4 + a * 2 + z))


def test_napari_shows_an_acquisition_as_named_channels(tmp_path):
    """The napari recipe of docs/recording.md: one layer per channel, named after it."""
    components = pytest.importorskip("napari.components")
    session = RecordingSession(RecordingRequest(path=tmp_path / "n.ome.tif"))
    for t, c, z in np.ndindex(2, len(CHANNELS), PLANES):
        session.submit_denoised(acq_stream(0, c, z), acq_header(t, 0, c, z), pattern(acq_id(t, 0, c, z)),
                                state="live", model_step=t)
    session.stop()
    s = read_acquisition(tmp_path / "n.ome.tif")["cam0.p0"]
    viewer = components.ViewerModel()
    layers = viewer.add_image(s.data, channel_axis=1, name=list(s.channels))
    assert [layer.name for layer in layers] == list(CHANNELS)
    assert layers[1].data.shape == (2, PLANES, *SHAPE)  # T, Z, Y, X: sliders for time and plane


_ACQUISITION_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from test_recorder import pattern, acq_header, acq_id, acq_stream, CHANNELS, PLANES
    from umvd_live.recording.session import RecordingRequest, RecordingSession
    s = RecordingSession(RecordingRequest(path=Path(sys.argv[1]), raw=True,
                                          checkpoint_interval_s=0.2))
    t = 0
    while True:
        for c in range(len(CHANNELS)):
            for z in range(PLANES):
                h, k = acq_header(t, 0, c, z), acq_id(t, 0, c, z)
                s.submit_raw(acq_stream(0, c, z), h, pattern(k, dtype=np.uint16))
                s.submit_denoised(acq_stream(0, c, z), h, pattern(k), state="live", model_step=t)
        print(s.status().frames_written, flush=True)
        t += 1
        time.sleep(0.01)
""")


def test_acquisition_killed_with_sigkill_leaves_files_with_their_axes(tmp_path):
    """Six streams (2 channels x 3 planes), denoised and raw, killed mid-recording: every file
    reads back to its last linked frame, and its OME-XML (the last checkpoint's) names its
    channel and axes, so the killed recording still assembles."""
    base = tmp_path / "k.ome.tif"
    written = _run_until([sys.executable, "-c", _ACQUISITION_CHILD, str(base), str(Path(__file__).parent)],
                         written_at_least=12 * 8)
    counts = {}
    for c, z in np.ndindex(len(CHANNELS), PLANES):
        stream = acq_stream(0, c, z)
        for kind, suffix, dtype in (("denoised", "", np.float32), ("raw", ".raw", np.uint16)):
            path = tmp_path / f"k_{stream}{suffix}.ome.tif"
            frames, infos, prov = read_recording(path)
            n = counts[(c, z, kind)] = len(infos)
            assert n >= 1 and prov["complete"] is False
            assert [i.t_index for i in infos] == list(range(n))
            for t in range(n):
                np.testing.assert_array_equal(frames[t], pattern(acq_id(t, 0, c, z), dtype=dtype))
            ome = ome_of(path)
            assert ome.images[0].pixels.channels[0].name == CHANNELS[c]
            m = provenance_map_of(ome)
            assert (m["complete"], m["group"], m["axis.c"], m["axis.z"], m["channel"]) == (
                "false", "cam0", str(c), str(z), CHANNELS[c])
            with tifffile.TiffFile(path) as tif:  # tifffile, napari, Fiji: the checkpointed frames
                declared = tif.series[0].asarray().reshape(-1, *SHAPE)
            assert 1 <= declared.shape[0] == prov["frames_declared_in_ome"] <= n
            np.testing.assert_array_equal(declared, frames[: declared.shape[0]])
    assert sum(counts.values()) >= written  # every frame the writer had finished is there

    for kind in ("denoised", "raw"):
        s = read_acquisition(base, kind=kind)["cam0.p0"]
        assert s.channels == CHANNELS and s.z_indices == (0, 1, 2)
        assert s.data.shape[:3] == (max(n for (_, _, k), n in counts.items() if k == kind),
                                    len(CHANNELS), PLANES)
        for c, z in np.ndindex(len(CHANNELS), PLANES):
            n = counts[(c, z, kind)]
            assert s.present[:n, c, z].all() and not s.present[n:, c, z].any()


def test_a_channel_named_with_a_control_character_keeps_the_file_readable(tmp_path):
    """A frame's meta may name its channel with any string; XML cannot hold control characters,
    so the OME-XML drops them (it was not well-formed, and the reader refused the file)."""
    path = tmp_path / "ctl.ome.tif"
    image = np.zeros((8, 8), np.float32)
    rec = RecordingFile.create(path, image, FrameInfo(seq=0, meta={"channel": "GFP\x01 & <b>"}),
                               Provenance(stream="cam0"))
    rec.append(image, FrameInfo(seq=1, meta={"channel": "GFP\x01 & <b>"}))
    rec.close()
    frames, infos, provenance = read_recording(path)
    assert frames.shape == (2, 8, 8) and provenance["complete"]
    with tifffile.TiffFile(path) as tif:
        channel = tif.ome_metadata.split("<Channel ", 1)[1].split(">", 1)[0]
    assert 'Name="GFP &amp; &lt;b&gt;"' in channel
