"""`umvd-live batch` on real Dask clusters: a LocalCluster of 2 worker processes, and an external
scheduler with two worker processes on loopback, one of them killed mid-run.

Outputs are compared with single-file `umvd-live denoise` run with the same options and seed:
a movie of one piece bit for bit; a chunked movie (trained once as `denoise` trains it, its
chunks sharing the weights for the final pass) within 1e-4 of the output's range (fp32: the
chunks' forward passes batch other windows together, so their float rounding differs).
"""

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from command_line import run_umvd_live

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
from umvd_live.apps.batch import (
    BatchOptions,
    Chunk,
    Failed,
    WarmModel,
    default_workers,
    denoise_chunk,
    plan_chunks,
    start_movie,
    stream_items,
    train_movie,
    write_chunks,
)
from umvd_live.engine import EngineConfig
from umvd_live.recording.movie import MovieError, MovieFrames, read_movie
from umvd_live.recording.ometiff import FrameInfo, Provenance, read_provenance, read_recording, write_movie

pytest.importorskip("distributed")  # the cluster extra

#: Tiny and fast: few training steps, fp32 (exact comparisons), one torch thread per task.
ENGINE = ["--preset", "lite", "--warmup-frames", "20", "--warmup-steps", "20", "--steps-per-frame", "1",
          "--context", "4,8", "--precision", "fp32", "--threads", "1", "--seed", "7"]
LENGTHS = {"a": 40, "b": 40, "c": 90}  # c is split: --chunk-frames 40


@pytest.fixture(scope="module")
def movies(tmp_path_factory):
    root = tmp_path_factory.mktemp("movies")
    for seed, (name, frames) in enumerate(LENGTHS.items()):
        noisy, _ = TwoPhotonSimulator(SimConfig(height=32, width=32, photons=2.0, seed=seed)).movie(frames)
        tifffile.imwrite(root / f"{name}.ome.tif", noisy, ome=True, metadata={"axes": "TYX"})
    ref = root / "ref_a.ome.tif"
    done = run_umvd_live("denoise", root / "a.ome.tif", ref, *ENGINE)
    assert done.returncode == 0, done.stderr
    return root


#: `ENGINE` as an engine configuration, for the tests that call the batch's tasks in this process.
TINY = EngineConfig(preset="lite", warmup_frames=20, warmup_steps=20, steps_per_frame=1.0, context=(4, 8),
                    precision="fp32", cpu_threads=1, seed=7)


def two_channel_movie(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """``m.ome.tif``: 50 frames of 32² in two named channels, a simulated GCaMP and a dark one."""
    bright, _ = TwoPhotonSimulator(SimConfig(height=32, width=32, photons=2.0, seed=3)).movie(50)
    dark = np.random.default_rng(1).poisson(0.3, bright.shape).astype(bright.dtype)
    src = tmp_path / "m.ome.tif"
    tifffile.imwrite(src, np.stack([bright, dark], axis=1), ome=True, photometric="minisblack",
                     metadata={"axes": "TCYX", "Channel": {"Name": ["GCaMP", "dark"]}})
    return src, bright, dark


def check_outputs(movies: Path, out: Path) -> None:
    """Every output whole; a equals `denoise`; c, denoised in chunks, equals `denoise` too."""
    for name, frames in LENGTHS.items():
        images, infos, prov = read_recording(out / f"{name}.ome.tif")
        assert images.shape == (frames, 32, 32) and prov["complete"] and [i.seq for i in infos] == list(range(frames))
    ours, ours_infos, _ = read_recording(out / "a.ome.tif")
    ref, ref_infos, _ = read_recording(movies / "ref_a.ome.tif")
    np.testing.assert_array_equal(ours, ref)
    assert [(i.state, i.model_step) for i in ours_infos] == [(i.state, i.model_step) for i in ref_infos]
    one_piece = out / "ref_c.ome.tif"
    done = run_umvd_live("denoise", movies / "c.ome.tif", one_piece, *ENGINE)
    assert done.returncode == 0, done.stderr
    chunked, _, prov = read_recording(out / "c.ome.tif")
    whole, _, _ = read_recording(one_piece)
    assert int(prov["extra.chunks"]) >= 3  # more if the change detector starts segments
    assert prov["extra.amplitude_gain"].count("too few frames") >= 3  # each chunk's own, recorded (too short here)
    assert prov["extra.cell_blend"].count("too few frames") >= 3  # likewise
    assert prov["extra.jitter"].count("too few frames") >= 3  # likewise
    assert np.abs(chunked - whole).max() <= 1e-4 * float(whole.max() - whole.min())
    assert not list(out.glob(".partial-*")), "temporaries are renamed or removed"


def test_plan_chunks_cover_every_frame_once_within_segments():
    chunks = plan_chunks(100, 30, 3, (4, 8), changes=(50,))
    assert [(c.start, c.stop) for c in chunks] == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert chunks[1] == Chunk(1, 25, 50, 10, 50, 0, 0, 50)  # 3 + 12 frames before and after, not past 50
    assert chunks[2] == Chunk(2, 50, 75, 50, 90, 1, 50, 100)  # a segment starts afresh
    assert plan_chunks(40, 2000, 3, (8, 24, 64)) == [Chunk(0, 0, 40, 0, 40, 0, 0, 40)]
    with pytest.raises(ValueError, match="chunk_frames"):
        plan_chunks(40, 0, 3, ())


def test_default_workers_one_per_core_then_dasks_split():
    assert [default_workers(n) for n in (1, 2, 3, 4, 8, 16, 64)] == [1, 2, 3, 4, 4, 4, 8]


def _damage_tiff_pages(path: Path, frames: range) -> None:
    """Garbage in the zlib data of these frames' pages: reading them raises."""
    with tifffile.TiffFile(path) as tif:
        spans = [(tif.pages[t].dataoffsets[0], tif.pages[t].databytecounts[0]) for t in frames]
    with path.open("r+b") as f:
        for offset, size in spans:
            f.seek(offset)
            f.write(b"\xff" * size)


def test_movie_frames_reads_only_its_span(tmp_path):
    movie = np.random.default_rng(0).integers(0, 4000, (12, 16, 16)).astype(np.uint16)
    tif = tmp_path / "m.ome.tif"
    tifffile.imwrite(tif, movie[:, None, None], ome=True, metadata={"axes": "TZCYX"}, compression="zlib")
    wide = tmp_path / "int32.tif"
    tifffile.imwrite(wide, movie.astype(np.int32))
    with MovieFrames(wide) as reader:  # read_movie's dtype rule: int32 -> float32
        np.testing.assert_array_equal(reader.read(2, 5), read_movie(wide)[2:5])
        assert reader.read(2, 5).dtype == np.float32 and reader.read(11, 20).shape == (1, 16, 16)
    _damage_tiff_pages(tif, [*range(4), *range(8, 12)])
    with pytest.raises(MovieError, match="frames 0-12 not readable"):
        read_movie(tif)
    with MovieFrames(tif) as reader:
        assert reader.shape == (12, 16, 16)
        np.testing.assert_array_equal(reader.read(4, 8), movie[4:8])
        with pytest.raises(MovieError, match="frames 3-5 not readable"):
            reader.read(3, 5)
    bad_movies = (("one.tif", movie[:1]), ("tiny.tif", movie[:, :3, :3]),
                  ("rgb.tif", movie[:, :, :, None][..., [0, 0]]))
    for name, bad in bad_movies:
        tifffile.imwrite(tmp_path / name, bad)
        with pytest.raises(MovieError) as expected:
            read_movie(tmp_path / name)
        with pytest.raises(MovieError, match=f"^{re.escape(str(expected.value))}$"):
            MovieFrames(tmp_path / name)

    pytest.importorskip("zarr")
    from umvd_live.recording.omezarr import write_zarr_movie

    store = tmp_path / "m.ome.zarr"
    write_zarr_movie(store, movie, (FrameInfo(seq=t) for t in range(len(movie))), Provenance("m"))
    for t in [*range(4), *range(8, 12)]:
        for chunk in (store / "0" / "c" / str(t)).rglob("*"):
            if chunk.is_file():
                chunk.write_bytes(b"garbage")
    with pytest.raises(ValueError):
        read_movie(store)
    with MovieFrames(store) as reader:
        assert reader.shape == (12, 16, 16)
        np.testing.assert_array_equal(reader.read(4, 8), movie[4:8])


def test_chunk_task_reads_only_its_chunk(tmp_path):
    """A chunk's task needs its frames (N//2 + context before and after) and its segment's first:
    the same output from a copy of the movie whose other frames cannot be read."""
    noisy, _ = TwoPhotonSimulator(SimConfig(height=32, width=32, photons=2.0, seed=3)).movie(90)
    whole, damaged = tmp_path / "whole.ome.tif", tmp_path / "damaged.ome.tif"
    for path in (whole, damaged):
        tifffile.imwrite(path, noisy, ome=True, metadata={"axes": "TYX"}, compression="zlib")
    options = BatchOptions(engine=TINY, chunk_frames=30)
    with MovieFrames(whole) as reader:
        model = train_movie(reader, TINY, options)
    chunk = plan_chunks(90, 30, model.k, model.context, model.changes)[1]
    assert (chunk.start, chunk.read_start, chunk.read_stop, chunk.segment_start) == (30, 15, 75, 0)
    _damage_tiff_pages(damaged, [*range(1, chunk.read_start), *range(chunk.read_stop, 90)])
    with pytest.raises(MovieError):
        read_movie(damaged)
    ours = denoise_chunk(str(damaged), model, chunk, options)
    np.testing.assert_array_equal(ours.frames, denoise_chunk(str(whole), model, chunk, options).frames)
    assert ours.frames.shape == (30, 32, 32) and [o.index for o in ours.outputs] == list(range(30, 60))


def test_a_file_of_several_streams_is_an_input_per_stream(tmp_path):
    """Each channel is its own input: its own engine, chunks and output, named as `denoise` names it."""
    src, bright, dark = two_channel_movie(tmp_path)
    items = stream_items(src, tmp_path / "out" / "m.ome.tif", [])
    assert [(i.stream, i.output.name) for i in items] == [("GCaMP", "m_GCaMP.ome.tif"), ("dark", "m_dark.ome.tif")]
    (refused,) = stream_items(src, tmp_path / "out" / "m.ome.tif", ["GFP"])
    assert refused.status == "failed" and refused.error.endswith("no stream 'GFP'; its streams: GCaMP, dark")
    (tmp_path / "out").mkdir()
    options = BatchOptions(engine=TINY, chunk_frames=30)
    for item, movie in zip(items, (bright, dark), strict=True):
        model = start_movie(str(src), item.stream, str(item.output), options)
        assert isinstance(model, WarmModel) and model.stream == item.stream  # 50 frames > 30: chunks
        parts = [denoise_chunk(str(src), model, c, options)
                 for c in plan_chunks(model.frames, 30, model.k, model.context, model.changes)]
        write_chunks(str(src), str(item.output), model, options, *parts)
        frames, infos, prov = read_recording(item.output)
        assert frames.shape == (50, 32, 32) and prov["channel"] == item.stream == prov["stream"].split(".")[-1]
        assert abs(float(frames.mean()) - float(movie.mean())) < 0.05 * float(movie.mean()) + 0.1, "levels kept"


def test_the_streams_of_one_file_on_a_cluster_each_get_their_own_chunks(tmp_path, monkeypatch):
    """Two channels of one file, each trained and chunked on the cluster: every task has a key of
    its own, and each output is its own channel's (a key reused while its first task was pending
    once gave one channel's output the other's chunks: Dask returns the existing future). Held
    back so that the second channel's chunks are submitted after the first's first chunk ended
    and while its others run: where the old keys met."""
    import logging

    from distributed import Client, LocalCluster

    from umvd_live.apps import batch
    from umvd_live.apps.batch import _Manifest, run_batch

    def chunk_held_back(source, model, chunk, options):
        if model.stream == "GCaMP" and chunk.index > 0:
            time.sleep(4.0)
        return denoise_chunk(source, model, chunk, options)

    def start_held_back(source, stream, output, options):
        if stream == "dark":
            time.sleep(2.0)
        return start_movie(source, stream, output, options)

    monkeypatch.setattr(batch, "denoise_chunk", chunk_held_back)
    monkeypatch.setattr(batch, "start_movie", start_held_back)

    src, bright, dark = two_channel_movie(tmp_path)
    (tmp_path / "out").mkdir()
    items = stream_items(src, tmp_path / "out" / "m.ome.tif", [])
    with LocalCluster(n_workers=1, threads_per_worker=4, processes=False, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        keys: list[str] = []
        submit = client.submit

        def recorded(fn, *args, key=None, **kwargs):
            keys.append(key)
            return submit(fn, *args, key=key, **kwargs)

        client.submit = recorded  # type: ignore[method-assign]
        run_batch(client, items, BatchOptions(engine=TINY, chunk_frames=20), _Manifest(tmp_path / "m.json", {}, []))
    assert len(keys) == len(set(keys)) > 4, keys  # two trainings, their chunks, two writes
    for item, movie in zip(items, (bright, dark), strict=True):
        assert item.status == "done", item.error
        frames, _, prov = read_recording(item.output)
        assert frames.shape == (50, 32, 32) and prov["channel"] == item.stream
        assert abs(float(frames.mean()) - float(movie.mean())) < 0.05 * float(movie.mean()) + 0.1, "its own channel"


def test_local_cluster_three_movies_one_missing_then_resume(movies, tmp_path):
    out = tmp_path / "out"
    done = run_umvd_live("batch", movies / "[abc].ome.tif", movies / "missing.tif", "--output-dir", out,
                         "--workers", "2", "--chunk-frames", "40", "--save-models", *ENGINE)
    assert done.returncode == 1, done.stderr  # one input failed, the others were denoised
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == [f"umvd-live batch: error: {(movies / 'missing.tif').resolve()}: no such file"], done.stderr
    assert "Traceback" not in done.stderr
    # the progress bar, fed by the futures, ends with every movie and the frames per second;
    # the dashboard's link only where the scheduler serves one (bokeh)
    assert re.search(r"denoising .*4/4 movies 170 frames, [0-9.]+ frames/s", done.stderr), done.stderr
    assert ("dashboard http" in done.stderr) == (importlib.util.find_spec("bokeh") is not None), done.stderr
    check_outputs(movies, out)
    manifest = json.loads((out / "batch-manifest.json").read_text())
    entries = {Path(e["input"]).name: e for e in manifest["inputs"]}
    assert {n: e["status"] for n, e in entries.items()} == {"a.ome.tif": "done", "b.ome.tif": "done",
                                                            "c.ome.tif": "done", "missing.tif": "failed"}
    assert entries["c.ome.tif"]["chunks"] >= 3 and entries["a.ome.tif"]["chunks"] == 1
    assert entries["a.ome.tif"]["provenance"]["extra"]["mode"] == "streamed"
    assert entries["c.ome.tif"]["provenance"]["extra"]["context_sides"] == "both"
    assert entries["c.ome.tif"]["seconds"]["train"] > 0 and entries["a.ome.tif"]["seconds"]["denoise"] > 0
    assert manifest["summary"]["frames"] == sum(LENGTHS.values()) and manifest["cluster"]["workers"] == 2

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.ome.tif")}
    again = run_umvd_live("batch", movies / "[abc].ome.tif", "--output-dir", out, "--resume", *ENGINE)
    assert again.returncode == 0, again.stderr
    resumed = {Path(e["input"]).name: e for e in json.loads((out / "batch-manifest.json").read_text())["inputs"]}
    assert {n: e["status"] for n, e in resumed.items()} == {"a.ome.tif": "skipped", "b.ome.tif": "skipped",
                                                            "c.ome.tif": "skipped", "missing.tif": "failed"}
    assert resumed["a.ome.tif"]["frames"] == 40, "a skipped input keeps what the earlier run recorded"
    assert resumed["missing.tif"] == entries["missing.tif"], "so does an input of the earlier run alone"
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.ome.tif")} == before
    refused = run_umvd_live("batch", movies / "a.ome.tif", "--output-dir", out, *ENGINE)
    assert refused.returncode == 1 and "output exists" in refused.stderr


def test_ome_zarr_in_and_out(movies, tmp_path):
    """An OME-Zarr input (a's frames) gives a's output, written as OME-Zarr (--format ome-zarr)."""
    pytest.importorskip("zarr")
    from umvd_live.recording.omezarr import read_zarr_recording, write_zarr_movie

    source = tmp_path / "a.ome.zarr"
    frames = read_movie(movies / "a.ome.tif")
    write_zarr_movie(source, frames, (FrameInfo(seq=t) for t in range(len(frames))), Provenance("a"))
    out = tmp_path / "out"
    done = run_umvd_live("batch", tmp_path / "*.ome.zarr", "--output-dir", out, "--workers", "1",
                         "--format", "ome-zarr", *ENGINE)
    assert done.returncode == 0, done.stderr
    ours, infos, _ = read_zarr_recording(out / "a.ome.zarr")
    np.testing.assert_array_equal(ours, read_recording(movies / "ref_a.ome.tif")[0])
    assert [i.seq for i in infos] == list(range(len(frames)))


def _start(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_external_scheduler_survives_a_killed_worker(movies, tmp_path):
    from distributed import Client

    file = tmp_path / "scheduler.json"
    procs = [_start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(file),
                    log=tmp_path / "scheduler.log")]
    try:
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = {}
        for name in ("w0", "w1"):
            workers[name] = _start("worker", "--scheduler-file", str(file), "--host", "127.0.0.1", "--no-nanny",
                                   "--nthreads", "1", "--name", name, log=tmp_path / f"{name}.log")
            procs.append(workers[name])
        address = json.loads(file.read_text())["address"]
        with Client(address, timeout="60s") as watcher:
            watcher.wait_for_workers(2, timeout=60)
            out = tmp_path / "out"
            batch = subprocess.Popen(
                [sys.executable, "-m", "umvd_live", "batch", str(movies / "[abc].ome.tif"),
                 "--output-dir", str(out), "--scheduler", address, "--chunk-frames", "40", "--save-models", *ENGINE],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(batch)
            killed = None
            while killed is None and batch.poll() is None:  # the first worker seen with a task dies
                names = {a: w["name"] for a, w in watcher.scheduler_info()["workers"].items()}
                busy = [names[a] for a, keys in watcher.processing().items() if keys and a in names]
                if busy:
                    killed = busy[0]
                    workers[killed].kill()
                time.sleep(0.05)
            assert killed is not None, "a worker was killed while the batch ran"
            _, stderr = batch.communicate(timeout=300)
        assert batch.returncode == 0, stderr
        check_outputs(movies, out)
        manifest = json.loads((out / "batch-manifest.json").read_text())
        assert {e["status"] for e in manifest["inputs"]} == {"done"} and not manifest["cluster"]["local"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def test_an_output_that_would_be_an_input_is_refused_even_with_resume(tmp_path):
    """`--output-dir` the inputs' own folder: `x.ome.tif`'s output would be `x.ome.tif` itself. It
    is refused (raw data is never replaced), not reported as done by `--resume`."""
    tifffile.imwrite(tmp_path / "x.ome.tif", np.zeros((4, 8, 8), np.uint16), ome=True, metadata={"axes": "TYX"})
    for resume in ([], ["--resume"]):
        done = run_umvd_live("batch", tmp_path / "x.ome.tif", "--output-dir", tmp_path, *resume, *ENGINE)
        assert done.returncode == 1, done.stderr
        assert "its output would be an input" in done.stderr
        entries = json.loads((tmp_path / "batch-manifest.json").read_text())["inputs"]
        assert [e["status"] for e in entries] == ["failed"]


def test_save_models_writes_the_model_before_the_output(tmp_path):
    """A model that cannot be saved (its name is a folder here) leaves no output, for one piece and
    for chunks alike: `--resume` would otherwise take the input as done, without its model."""
    src, bright, _ = two_channel_movie(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for chunk_frames in (2000, 30):
        (out / "m_GCaMP.pt").mkdir(exist_ok=True)
        output = out / "m_GCaMP.ome.tif"
        options = BatchOptions(engine=TINY, chunk_frames=chunk_frames, save_models=True)
        with pytest.raises(IsADirectoryError):
            model = start_movie(str(src), "GCaMP", str(output), options)
            assert isinstance(model, WarmModel)  # 50 frames > 30: chunks
            parts = [denoise_chunk(str(src), model, c, options)
                     for c in plan_chunks(model.frames, 30, model.k, model.context, model.changes)]
            write_chunks(str(src), str(output), model, options, *parts)
        assert sorted(p.name for p in out.iterdir()) == ["m_GCaMP.pt"], "no output, no temporary"


def test_resume_with_save_models_needs_the_model_too(tmp_path):
    src = tmp_path / "x.ome.tif"
    tifffile.imwrite(src, np.zeros((4, 8, 8), np.uint16), ome=True, metadata={"axes": "TYX"})
    out = tmp_path / "out"
    out.mkdir()
    # an output of this input (its provenance says so) whose model is missing
    write_movie(out / "x.ome.tif", np.zeros((4, 8, 8), np.float32), (FrameInfo(seq=t) for t in range(4)),
                Provenance("x", source=str(src.resolve())))
    done = run_umvd_live("batch", src, "--output-dir", out, "--resume", "--save-models", *ENGINE)
    assert done.returncode == 1 and "output exists without its model x.pt" in done.stderr, done.stderr
    (out / "x.pt").write_bytes(b"weights")
    done = run_umvd_live("batch", src, "--output-dir", out, "--resume", "--save-models", *ENGINE)
    assert done.returncode == 0 and "1 skipped" in done.stderr, done.stderr


def test_bad_engine_flags_and_a_manifest_that_cannot_be_written_get_one_line_before_any_work(tmp_path):
    src = tmp_path / "x.ome.tif"
    tifffile.imwrite(src, np.zeros((4, 8, 8), np.uint16), ome=True, metadata={"axes": "TYX"})
    (tmp_path / "file").write_text("")
    for flags, message in ((["--window", "6"], "window must be odd"), (["--threads", "0"], "must be >= 1"),
                           (["--keep-amplitude", "2"], "keep_amplitude"),
                           (["--manifest", tmp_path / "file" / "m.json"], "cannot create")):
        done = run_umvd_live("batch", src, "--output-dir", tmp_path / "out", *ENGINE, *flags)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        (line,) = [line for line in done.stderr.splitlines() if "error:" in line]
        assert line.startswith("umvd-live batch: error: ") and message in line, line
        assert not (tmp_path / "out" / "x.ome.tif").exists()


def test_the_manifest_keeps_the_records_and_header_through_resumes(tmp_path):
    """Each `--resume` that finds everything done keeps what the run that did it recorded, in a
    manifest folder it creates."""
    src = tmp_path / "x.ome.tif"
    tifffile.imwrite(src, np.zeros((4, 8, 8), np.uint16), ome=True, metadata={"axes": "TYX"})
    out = tmp_path / "out"
    out.mkdir()
    output = out / "x.ome.tif"  # made from x.ome.tif, its provenance says
    write_movie(output, np.zeros((4, 8, 8), np.float32), (FrameInfo(seq=t) for t in range(4)),
                Provenance("x", source=str(src.resolve())))
    manifest = tmp_path / "records" / "m.json"
    manifest.parent.mkdir()
    record = {"input": str(src), "output": str(output.resolve()), "status": "done", "frames": 4,
              "provenance": {"preset": "lite"}}
    header = {"format": "umvd-live-batch/1", "command": ["umvd-live", "batch"], "cluster": {"workers": 2}}
    manifest.write_text(json.dumps({**header, "summary": {}, "inputs": [record]}))
    for _ in range(2):
        done = run_umvd_live("batch", src, "--output-dir", out, "--resume", "--manifest", manifest, *ENGINE)
        assert done.returncode == 0, done.stderr
        data = json.loads(manifest.read_text())
        assert {k: data[k] for k in header} == header
        assert data["inputs"][0] == {**record, "status": "skipped"}
    fresh = tmp_path / "new" / "m.json"  # a folder that does not exist yet
    done = run_umvd_live("batch", src, "--output-dir", out, "--resume", "--manifest", fresh, *ENGINE)
    assert done.returncode == 0, done.stderr
    assert json.loads(fresh.read_text())["inputs"][0]["status"] == "skipped"


def test_chunked_offline_provenance_names_the_segments_changes(tmp_path):
    """`--offline` trains without pushing frames, so its engine sees no change; the provenance
    says the ones the chunks were planned by."""
    movie, _ = TwoPhotonSimulator(SimConfig(height=32, width=32, photons=2.0, seed=4)).movie(90)
    movie = movie.astype(np.float32)
    movie[50:] *= 3  # a laser step: a new segment
    src = tmp_path / "s.ome.tif"
    tifffile.imwrite(src, np.round(movie).astype(np.uint16), ome=True, metadata={"axes": "TYX"})
    options = BatchOptions(engine=TINY, chunk_frames=40, offline=True, offline_steps=2)
    model = start_movie(str(src), None, str(tmp_path / "out.ome.tif"), options)
    assert isinstance(model, WarmModel) and 50 in model.changes
    assert model.provenance.extra["changes"] == ",".join(f"{c}:intensity" for c in model.changes)


def test_inputs_named_with_brackets_and_outputs_differing_by_case(tmp_path):
    """An existing ``cell[1].tif`` is that file, not a pattern; two inputs whose outputs differ only
    by case would be one file on macOS: refused."""
    from umvd_live.apps.batch import expand_inputs

    for name in ("cell[1].ome.tif", "cell1.ome.tif"):
        tifffile.imwrite(tmp_path / name, np.zeros((4, 8, 8), np.uint16), ome=True, metadata={"axes": "TYX"})
    root = tmp_path.resolve()
    assert expand_inputs([str(tmp_path / "cell[1].ome.tif")]) == ([root / "cell[1].ome.tif"], [])
    assert expand_inputs([str(tmp_path / "cell[12].ome.tif")]) == ([root / "cell1.ome.tif"], [])  # a pattern
    (tmp_path / "A").mkdir()
    upper = tmp_path / "A" / "Cell1.ome.tif"
    tifffile.imwrite(upper, np.zeros((4, 8, 8), np.uint16), ome=True, metadata={"axes": "TYX"})
    done = run_umvd_live("batch", tmp_path / "cell1.ome.tif", upper, "--output-dir", tmp_path / "out", *ENGINE)
    assert done.returncode == 2 and "would both write" in done.stderr, done.stderr


def test_a_finished_output_is_never_replaced(tmp_path):
    """The last step of an atomic write never replaces a file that appeared meanwhile (another
    case of its name, on a case-insensitive file system)."""
    from umvd_live.apps.denoise import write_atomic

    output = tmp_path / "x.ome.tif"
    output.write_bytes(b"earlier")
    with pytest.raises(FileExistsError):
        write_atomic(output, lambda tmp: tmp.write_bytes(b"later"))
    assert output.read_bytes() == b"earlier" and [p.name for p in tmp_path.iterdir()] == ["x.ome.tif"]


def test_an_interrupted_batch_leaves_no_temporaries(tmp_path, monkeypatch):
    """Ctrl-C while tasks write: their outputs' and models' temporaries are removed on the way out."""
    from umvd_live.apps import batch
    from umvd_live.apps.cli import build_parser

    src = tmp_path / "x.ome.tif"
    tifffile.imwrite(src, np.zeros((4, 8, 8), np.uint16), ome=True, metadata={"axes": "TYX"})
    out = tmp_path / "out"

    def interrupted(client, items, options, manifest, console=None):
        (out / ".partial-0123456789ab.x.ome.tif").write_bytes(b"half")
        (out / ".partial-0123456789ab.x.pt").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "run_batch", interrupted)
    args = build_parser().parse_args(["batch", str(src), "--output-dir", str(out), "--workers", "1",
                                      "--save-models", *ENGINE])
    with pytest.raises(KeyboardInterrupt):
        batch.run(args)
    assert list(out.iterdir()) == []


def _tiny_movie(path: Path, frames: int = 20, seed: int = 0) -> Path:
    """A small OME-TIFF movie (frames × 32 × 32, uint16), its folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    movie = np.random.default_rng(seed).poisson(50, (frames, 32, 32)).astype(np.uint16)
    tifffile.imwrite(path, movie, ome=True, metadata={"axes": "TYX"}, compression="zlib")
    return path


#: Fewer frames to train on than `ENGINE`: these tests are about the batch, not the outputs.
QUICK = ["--preset", "lite", "--warmup-frames", "10", "--warmup-steps", "5", "--steps-per-frame", "0.2",
         "--context", "4", "--threads", "1", "--seed", "7"]


def test_damaged_inputs_fail_one_line_each_and_the_others_go_on(tmp_path):
    """One damaged input used to crash the whole batch with a traceback before any work (tifffile's
    TiffFileError from a file cut short escaped the reader, and `stream_items` caught MovieError
    only; malformed OME-Zarr metadata raised IndexError). Now each bad input gets its line: one
    cut short (its header reads, its series do not), one whose later frames are garbage (it
    fails in its task, on the worker), a store whose metadata is malformed; the good one is
    denoised and the exit status is 1."""
    good = _tiny_movie(tmp_path / "in" / "good.ome.tif")
    full = tmp_path / "full.ome.tif"  # two channels, uncompressed: the cut falls in its later IFDs
    tifffile.imwrite(full, np.zeros((20, 2, 32, 32), np.uint16), ome=True, metadata={"axes": "TCYX"})
    raw = full.read_bytes()
    cut = tmp_path / "in" / "cut.ome.tif"
    cut.write_bytes(raw[: int(len(raw) * 0.95)])
    late = _tiny_movie(tmp_path / "in" / "late.ome.tif")
    _damage_tiff_pages(late, range(10, 20))
    bad = [cut]  # found by the client, before any work; `late` by its task, on a worker
    if importlib.util.find_spec("zarr") is not None:
        import zarr

        store = tmp_path / "in" / "bad.ome.zarr"
        group = zarr.open_group(str(store), mode="w", zarr_format=2)
        group.create_array("0", shape=(20, 32, 32), dtype="uint16", chunks=(1, 32, 32))
        group.attrs.update({"multiscales": [{"version": "0.4", "axes": ["t", "y", "x"], "datasets": []}]})
        bad.append(store)
    bad.append(late)
    out = tmp_path / "out"
    done = run_umvd_live("batch", good, *bad, "--output-dir", out, "--workers", "1", *QUICK)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("umvd-live batch: error:")]
    assert len(errors) == len(bad), done.stderr
    for path, line in zip(bad, errors, strict=True):  # the client's lines first, then the task's
        assert line.startswith(f"umvd-live batch: error: {path.resolve()}: "), line
    assert "not readable as a TIFF movie (TiffFileError" in errors[0] and "frames 0-20 not readable" in errors[-1]
    if len(bad) == 3:
        assert "not readable as an OME-Zarr movie (IndexError" in errors[1]
    assert read_recording(out / "good.ome.tif")[0].shape == (20, 32, 32)
    statuses = {Path(e["input"]).name: e["status"]
                for e in json.loads((out / "batch-manifest.json").read_text())["inputs"]}
    assert statuses == {"good.ome.tif": "done", **{p.name: "failed" for p in bad}}


def test_resume_never_takes_another_movies_output_for_its_own(tmp_path):
    """`--resume` skipped an input whenever an output of its name existed: night 2's
    ``day2/cell1.tif`` was never denoised because night 1's ``day1/cell1.tif`` had written
    ``cell1.ome.tif`` (exit 0, and the manifest named only the old input). An output counts as
    an input's only when its provenance says it was made from that input (a batch task's output
    here); else the input fails with a line naming the other."""
    day1 = _tiny_movie(tmp_path / "raw" / "day1" / "cell1.tif")
    day2 = _tiny_movie(tmp_path / "raw" / "day2" / "cell1.tif", seed=1)
    out = tmp_path / "denoised"
    out.mkdir()
    written = start_movie(str(day1.resolve()), None, str(out / "cell1.ome.tif"), BatchOptions(engine=TINY))
    assert not isinstance(written, (Failed, WarmModel)), written  # one piece, written whole
    for resume in (["--resume"], []):
        done = run_umvd_live("batch", day2, "--output-dir", out, *resume, *QUICK)
        assert done.returncode == 1, done.stderr
        (line,) = [line for line in done.stderr.splitlines() if "error:" in line]
        assert line == (f"umvd-live batch: error: {day2.resolve()}: {out.resolve() / 'cell1.ome.tif'} exists, "
                        f"made from {day1.resolve()}: outputs are never overwritten; remove it or choose another "
                        "--output-dir")
        entries = json.loads((out / "batch-manifest.json").read_text())["inputs"]
        assert [(Path(e["input"]).parent.name, e["status"]) for e in entries] == [("day2", "failed")]
    assert read_provenance(out / "cell1.ome.tif")["source"] == str(day1.resolve())
    done = run_umvd_live("batch", day1, "--output-dir", out, "--resume", *QUICK)  # its own output: skipped
    assert done.returncode == 0 and "1 skipped" in done.stderr, done.stderr
    # an output that says nothing of its input (no provenance, no manifest record) is not taken as done;
    # one whose manifest record names the input is
    other = _tiny_movie(tmp_path / "raw" / "other.tif")
    tifffile.imwrite(out / "other.ome.tif", np.zeros((4, 8, 8), np.float32))
    done = run_umvd_live("batch", other, "--output-dir", out, "--resume", *QUICK)
    assert done.returncode == 1 and "says nothing of the input it was made from" in done.stderr, done.stderr
    records = tmp_path / "records.json"
    records.write_text(json.dumps({"format": "umvd-live-batch/1", "inputs": [
        {"input": str(other.resolve()), "output": str((out / "other.ome.tif").resolve()), "status": "done"}]}))
    done = run_umvd_live("batch", other, "--output-dir", out, "--resume", "--manifest", records, *QUICK)
    assert done.returncode == 0 and "1 skipped" in done.stderr, done.stderr


def test_a_later_batch_keeps_the_earlier_batchs_records(tmp_path):
    """Two nightly batches into one --output-dir: the second's manifest replaced the first's, so
    the first night's provenance and timings were lost. The earlier entries of outputs the later
    batch has no input for are carried forward; a later failure to replace an output keeps the
    record of the output that is there."""
    a = _tiny_movie(tmp_path / "raw" / "day1" / "a.tif")
    b = _tiny_movie(tmp_path / "raw" / "day2" / "b.tif", seed=1)
    other_a = _tiny_movie(tmp_path / "raw" / "day2" / "a.tif", seed=2)
    out = tmp_path / "denoised"
    manifest = out / "batch-manifest.json"
    assert run_umvd_live("batch", a, "--output-dir", out, "--workers", "1", *QUICK).returncode == 0
    (night1,) = json.loads(manifest.read_text())["inputs"]
    assert night1["status"] == "done" and night1["provenance"]["source"] == str(a.resolve())
    done = run_umvd_live("batch", b, "--output-dir", out, "--workers", "1", *QUICK)
    assert done.returncode == 0, done.stderr
    data = json.loads(manifest.read_text())
    assert [(Path(e["input"]).name, e["status"]) for e in data["inputs"]] == [("a.tif", "done"), ("b.tif", "done")]
    assert data["inputs"][0] == night1, "the first night's record, as it was"
    assert data["summary"]["done"] == 1  # the summary is this batch's
    night2 = data["inputs"][1]
    done = run_umvd_live("batch", other_a, "--output-dir", out, "--resume", *QUICK)  # a.ome.tif is day1/a.tif's
    assert done.returncode == 1 and "made from" in done.stderr, done.stderr
    entries = json.loads(manifest.read_text())["inputs"]
    assert entries[:2] == [night1, night2] and len(entries) == 3, "the record of the a.ome.tif that is there"
    assert (Path(entries[2]["input"]), entries[2]["status"]) == (other_a.resolve(), "failed")


def test_a_file_that_is_no_scheduler_file_gets_one_line_and_status_2(tmp_path):
    """`--scheduler FILE` where FILE is not a scheduler file (empty, ``{}``, YAML, a number for
    the address) ended in Dask's AssertionError or TypeError traceback and exit status 1 (which
    says an input failed); it gets one line and status 2, as an unreachable scheduler does."""
    src = _tiny_movie(tmp_path / "x.ome.tif")
    files = {"empty.json": ("", "it is empty"), "nokey.json": ("{}", 'it has no "address"'),
             "dask.yaml": ("scheduler: {}\n", "it is not JSON"),
             "int.json": ('{"address": 8786}', 'its "address" is not a scheduler address')}
    for name, (text, why) in files.items():
        (tmp_path / name).write_text(text)
        done = run_umvd_live("batch", src, "--output-dir", tmp_path / "out", "--scheduler", tmp_path / name, *QUICK)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        (line,) = [line for line in done.stderr.splitlines() if "error:" in line]
        assert line == (f"umvd-live batch: error: --scheduler {tmp_path / name} is not a Dask scheduler "
                        f"file ({why}; dask scheduler --scheduler-file writes one)"), done.stderr
    assert not (tmp_path / "out" / "x.ome.tif").exists()


def test_remove_partials_takes_the_outputs_name_literally(tmp_path):
    """The end of a batch removes its outputs' temporaries. A glob made of the output's name missed
    ``cell[1].ome.tif``'s (``[1]`` a character class) and removed ``cell1.ome.tif``'s, another
    writer's, and ``x.cell[1].ome.tif``'s (``*`` spans the dot): only exactly `_partial_name`'s
    names of this output go."""
    from umvd_live.apps.denoise import _partial_name, remove_partials

    output = tmp_path / "cell[1].ome.tif"
    ours = [_partial_name(output), tmp_path / ".partial-0123456789ab.cell[1].ome.tif"]
    others = [tmp_path / ".partial-ba5eba11ba5e.cell1.ome.tif", tmp_path / ".partial-0123456789ab.x.cell[1].ome.tif",
              tmp_path / ".partial-nothex000000.cell[1].ome.tif", tmp_path / "cell[1].ome.tif"]
    for path in ours + others:
        path.write_bytes(b"x")
    store = tmp_path / "m.ome.zarr"
    (_partial_name(store) / "0").mkdir(parents=True)  # a store's temporary: a folder
    remove_partials(output)
    remove_partials(store)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in others)
    remove_partials(tmp_path / "missing" / "x.ome.tif")  # no folder: nothing to do
