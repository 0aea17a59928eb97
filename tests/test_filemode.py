"""`umvd-live denoise`: the command line end to end, its errors, a quality floor, and files of
several streams (channels, planes, positions: every format `acquire replay` reads), each stream
denoised on its own engine into its own output."""

import logging

import numpy as np
import pytest
import tifffile
import torch
from command_line import run_umvd_live

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
from umvd_live.apps.denoise import DenoiseConfig, denoise_movie, run
from umvd_live.engine import EngineConfig
from umvd_live.metrics import psnr, temporal_mean
from umvd_live.recording.acquisition import read_acquisition
from umvd_live.recording.movie import MovieError, MovieFrames, movie_streams
from umvd_live.recording.ometiff import read_recording


@pytest.fixture(scope="module")
def sim_movie():
    return TwoPhotonSimulator(SimConfig(height=64, width=64, photons=2.0, seed=3)).movie(160)


def test_denoise_writes_one_float32_frame_per_input_with_provenance(tmp_path, sim_movie):
    noisy, _ = sim_movie
    src, out = tmp_path / "in.ome.tif", tmp_path / "out.ome.tif"
    tifffile.imwrite(src, noisy[:40], ome=True, metadata={"axes": "TYX"})
    done = run_umvd_live("denoise", src, out, "--preset", "lite", "--warmup-frames", "20",
                         "--save-model", tmp_path / "m.pt", timeout=None)  # a loaded machine: minutes
    assert done.returncode == 0, done.stderr
    frames = tifffile.imread(out)
    assert frames.shape == (40, 64, 64) and frames.dtype == np.float32
    frames2, infos, provenance = read_recording(out)
    np.testing.assert_array_equal(frames, frames2)
    assert [i.seq for i in infos] == list(range(40))
    # Every frame comes from the final pass: the network's output, or the window's mean where
    # the network lost to the neighbours' mean on that frame (none on a movie the prior knows).
    assert {i.state for i in infos} <= {"live", "warmup"}
    assert sum(i.state == "live" for i in infos) >= 30
    assert {i.amplitude_gain for i in infos} == {1.0}  # recorded; 40 frames are too few to measure a gain
    assert provenance["preset"] == "lite" and str(provenance["window"]) == "7"
    assert provenance["extra.context_blocks"] == "8,24,64" and provenance["extra.context_sides"] == "both"
    assert "too few frames" in provenance["extra.jitter"]  # recorded; 40 frames are too few to measure it
    assert (tmp_path / "m.pt").is_file()
    assert abs(float(frames.mean()) - float(noisy[:40].mean())) < 0.05 * float(noisy[:40].mean()), "input units"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"not a tiff at all", "not a readable TIFF"),
        (np.zeros((16, 16), np.uint16), "expected a T×H×W movie"),
        (np.zeros((5, 16, 16), bool), "unsupported pixel type"),
        (np.zeros((1, 16, 16), np.uint16), "expected a T×H×W movie"),
    ],
)
def test_bad_inputs_get_one_clear_line(tmp_path, content, message):
    src = tmp_path / "bad.tif"
    if isinstance(content, bytes):
        src.write_bytes(content)
    elif content is not None:
        tifffile.imwrite(src, content)
    done = run_umvd_live("denoise", src, tmp_path / "out.tif", timeout=None)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out.tif").exists()


def test_quality_floor_on_the_simulator(sim_movie):
    """Denoised beats the noisy input and a 5-frame temporal mean, with margin, over every frame."""
    noisy, clean = sim_movie
    config = EngineConfig(preset="lite", warmup_frames=80, warmup_steps=300, steps_per_frame=1.0)
    result = denoise_movie(noisy, config)
    assert result.frames.shape == noisy.shape
    raw, mean5, ours = psnr(noisy, clean), psnr(temporal_mean(noisy, 5), clean), psnr(result.frames, clean)
    print(f"PSNR raw {raw:.2f} dB, 5-frame mean {mean5:.2f} dB, umvd {ours:.2f} dB")
    assert ours > raw + 8.0
    assert ours > mean5 + 2.0
    # the final pass used the trainer's own weights, which are what a saved model holds: a file
    # keeps no running average (it cost the transients' slope; `file_config`)
    trainer = result.engine.trainer
    assert trainer.average is None
    saved = result.engine.weights_copy()
    assert saved is not None
    for name, weights in saved.state_dict.items():
        assert torch.equal(weights, trainer.model.state_dict()[name].cpu()), name


def test_a_lone_frame_is_passed_through_not_run_on_copies_of_itself(sim_movie):
    """A one-frame segment has no neighbours: a window of 7 copies of it would not be blind."""
    noisy = sim_movie[0][:1]
    result = denoise_movie(noisy, EngineConfig(preset="lite", prior="none", cpu_threads=1))
    assert [o.state for o in result.outputs] == ["warmup"]
    np.testing.assert_allclose(result.frames[0], noisy[0], atol=1e-3)  # (up to the normaliser's rounding)


def test_no_frame_is_worse_than_its_neighbours_mean(sim_movie):
    """The final pass judges every frame blind: an untrained network (random weights, no training)
    loses to the neighbours' mean on every frame, and each frame then gets the window's mean,
    never the network's garbage."""
    noisy, clean = sim_movie
    noisy, clean = noisy[:48], clean[:48]
    config = EngineConfig(preset="lite", prior="none", warmup_frames=8, warmup_steps=0, steps_per_frame=0.0)
    result = denoise_movie(noisy, config)
    assert result.engine.model_step == 0
    assert all(o.state == "warmup" for o in result.outputs)
    for t in range(3, len(noisy) - 3):
        neighbours = np.concatenate([noisy[t - 3:t], noisy[t + 1:t + 4]]).astype(np.float32).mean(0)
        assert psnr(result.frames[t], clean[t]) >= psnr(neighbours, clean[t]) - 0.1, t


# -- files of several streams -----------------------------------------------------------------------
#: Tiny and fast: few training steps, one torch thread; 40 frames of 32x32 per stream.
FAST = EngineConfig(preset="lite", warmup_frames=20, warmup_steps=20, steps_per_frame=1.0, context=(4, 8),
                    precision="fp32", cpu_threads=1, seed=7)


@pytest.fixture(scope="module")
def bright_and_dark():
    """Two channels of 40 frames: a bright simulated movie, and a dark one (a few photons)."""
    bright, _ = TwoPhotonSimulator(SimConfig(height=32, width=32, photons=2.0, seed=3)).movie(40)
    dark = np.random.default_rng(1).poisson(0.3, bright.shape).astype(bright.dtype)
    return bright, dark


def denoise_file(src, out, **options):
    return run(DenoiseConfig(src, out, FAST, **options))


def check_levels(outputs, inputs):
    """Each output keeps its own stream's level: channels never shared a window or an engine."""
    for frames, movie in zip(outputs, inputs, strict=True):
        assert frames.shape == movie.shape and frames.dtype == np.float32
        level = float(movie.mean())
        assert abs(float(frames.mean()) - level) < 0.05 * level + 0.1, (frames.mean(), level)


def test_multichannel_ome_denoises_each_channel_on_its_own_engine(tmp_path, bright_and_dark):
    src, out = tmp_path / "mouse.ome.tif", tmp_path / "den.ome.tif"
    tifffile.imwrite(src, np.stack(bright_and_dark, axis=1), ome=True, photometric="minisblack",
                     metadata={"axes": "TCYX", "Channel": {"Name": ["GCaMP", "tdTomato"]},
                               "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    assert movie_streams(src) == ["GCaMP", "tdTomato"]
    assert denoise_file(src, out) == 0
    assert not out.exists(), "a file of several streams writes one output per stream, beside the name given"
    outputs = [tmp_path / "den_GCaMP.ome.tif", tmp_path / "den_tdTomato.ome.tif"]
    check_levels([tifffile.imread(o) for o in outputs], bright_and_dark)
    for c, (path, name) in enumerate(zip(outputs, ["GCaMP", "tdTomato"])):
        with tifffile.TiffFile(path) as tif:
            assert f'Name="{name}"' in tif.ome_metadata  # the OME Channel
        _, infos, prov = read_recording(path)
        assert (prov["stream"], prov["source"], prov["channel"], prov["axis.c"]) == (f"mouse.{name}", str(src), name, c)
        assert prov["pixel_size_um"] == 0.5 and [i.t_index for i in infos] == list(range(40))
    (position,) = read_acquisition(out).values()  # the outputs put back together: T, C, Z, Y, X
    assert position.data.shape == (40, 2, 1, 32, 32) and position.channels == ("GCaMP", "tdTomato")
    assert denoise_file(src, out) == 2, "outputs are never overwritten"


def test_imagej_hyperstack_streams_are_picked_by_name(tmp_path, bright_and_dark, capsys):
    src, out = tmp_path / "hyper.tif", tmp_path / "den.ome.tif"
    tifffile.imwrite(src, np.stack(bright_and_dark, axis=1), imagej=True, metadata={"axes": "TCYX"})
    assert movie_streams(src) == ["c0", "c1"]
    assert denoise_file(src, out, streams=("c1",)) == 0
    assert [p.name for p in sorted(tmp_path.glob("den*"))] == ["den_c1.ome.tif"]
    check_levels([tifffile.imread(tmp_path / "den_c1.ome.tif")], bright_and_dark[1:])
    capsys.readouterr()
    assert denoise_file(src, tmp_path / "other.ome.tif", streams=("GCaMP",)) == 2
    assert "no stream 'GCaMP'; its streams: c0, c1" in capsys.readouterr().err
    assert not list(tmp_path.glob("other*"))


def test_every_position_of_a_multi_position_ome_is_denoised(tmp_path, bright_and_dark):
    src, out = tmp_path / "plate.ome.tif", tmp_path / "den.ome.tif"
    with tifffile.TiffWriter(src, ome=True) as tif:
        for p, frames in enumerate(bright_and_dark):
            tif.write(frames, photometric="minisblack", metadata={"axes": "TYX", "Name": f"well{p}"})
    assert denoise_file(src, out) == 0
    outputs = [tmp_path / "den_p0.ome.tif", tmp_path / "den_p1.ome.tif"]
    check_levels([tifffile.imread(o) for o in outputs], bright_and_dark)
    assert [read_recording(o)[2]["position"] for o in outputs] == ["well0", "well1"]


def test_ndtiff_channels_from_pycromanagers_writer(tmp_path, bright_and_dark):
    from ndstorage.ndtiff_dataset import NDTiffDataset

    dataset = NDTiffDataset(str(tmp_path), name="run", writable=True)
    dataset.initialize({"Width": 32, "Height": 32, "ChNames": ["GFP", "RFP"]})
    for t in range(40):
        for name, frames in zip(("GFP", "RFP"), bright_and_dark):
            dataset.put_image({"time": t, "channel": name}, frames[t],
                              {"ElapsedTime-ms": 100.0 * t, "Width": 32, "Height": 32, "PixelType": "GRAY16",
                               "BitDepth": 16})
    dataset.finish()
    (src,) = tmp_path.glob("run*/*.tif")
    assert denoise_file(src, tmp_path / "den.ome.tif") == 0
    check_levels([tifffile.imread(tmp_path / f"den_{c}.ome.tif") for c in ("GFP", "RFP")], bright_and_dark)


def test_multichannel_ome_zarr_to_ome_tiff(tmp_path, bright_and_dark):
    ome_writers = pytest.importorskip("ome_writers")
    src = tmp_path / "mda.ome.zarr"
    settings = ome_writers.AcquisitionSettings(
        root_path=str(src), dimensions=ome_writers.dims_from_standard_axes({"t": 40, "c": 2, "y": 32, "x": 32}),
        dtype="uint16", format=ome_writers.OmeZarrFormat(backend="tensorstore"))
    with ome_writers.create_stream(settings) as stream:
        for t in range(40):
            for frames in bright_and_dark:
                stream.append(frames[t])
    assert denoise_file(src, tmp_path / "den.ome.tif") == 0
    check_levels([tifffile.imread(tmp_path / f"den_c{c}.ome.tif") for c in (0, 1)], bright_and_dark)


def test_a_stack_without_a_time_axis_is_one_movie_but_a_snap_is_refused(tmp_path, caplog):
    """A 3-D stack labelled Z or C (Fiji saves a time-lapse as slices; tifffile calls an unlabelled
    OME stack's planes channels) reads as one movie, as it always did, with a warning; a file whose
    planes differ along two axes and none is time holds no movie."""
    frames = np.random.default_rng(0).integers(0, 1000, (12, 16, 16)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "slices.tif", frames, imagej=True, metadata={"axes": "ZYX"})
    with caplog.at_level(logging.WARNING), MovieFrames(tmp_path / "slices.tif") as movie:
        assert movie.streams == [""] and movie.shape == (12, 16, 16)
        np.testing.assert_array_equal(movie.read(3, 7), frames[3:7])
    assert "no time axis; its 12 planes along Z are read as the movie's frames" in caplog.text
    tifffile.imwrite(tmp_path / "snap.ome.tif", frames.reshape(3, 4, 16, 16), ome=True, metadata={"axes": "CZYX"})
    with pytest.raises(MovieError, match="expected a T×H×W movie, got 12 streams of one frame each"):
        MovieFrames(tmp_path / "snap.ome.tif")
    # a snapshot of named channels is not a movie: their levels and content differ
    tifffile.imwrite(tmp_path / "named.ome.tif", frames[:3], ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP", "RFP"]}})
    with pytest.raises(MovieError, match="got 3 streams of one frame each"):
        MovieFrames(tmp_path / "named.ome.tif")
    tifffile.imwrite(tmp_path / "unnamed.ome.tif", frames[:3], ome=True, photometric="minisblack",
                     metadata={"axes": "CYX"})
    with MovieFrames(tmp_path / "unnamed.ome.tif") as movie:  # unlabelled: read as a movie, as before
        assert movie.shape == (3, 16, 16)


@pytest.mark.parametrize("interrupt", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_leaves_no_output(tmp_path, bright_and_dark, monkeypatch, interrupt):
    """A disk full or a Ctrl-C mid-write leaves nothing under the output's name (a rerun would
    refuse it), nor a temporary."""
    from umvd_live.apps import denoise

    src, out = tmp_path / "in.ome.tif", tmp_path / "out.ome.tif"
    tifffile.imwrite(src, bright_and_dark[0], ome=True, metadata={"axes": "TYX"})
    write_movie = denoise.write_movie

    def failing(path, frames, infos, provenance):
        def some():
            for t, frame in enumerate(frames):
                if t == 5:
                    raise interrupt
                yield frame
        return write_movie(path, some(), infos, provenance)

    monkeypatch.setattr(denoise, "write_movie", failing)
    if isinstance(interrupt, OSError):
        assert denoise_file(src, out) == 2
    else:
        with pytest.raises(KeyboardInterrupt):
            denoise_file(src, out)
    assert [p.name for p in tmp_path.iterdir()] == ["in.ome.tif"]


def test_output_and_model_paths_are_checked_before_any_computing(tmp_path, bright_and_dark, monkeypatch, capsys):
    from umvd_live.apps import denoise

    src = tmp_path / "in.ome.tif"
    tifffile.imwrite(src, bright_and_dark[0], ome=True, metadata={"axes": "TYX"})
    (tmp_path / "file").write_text("")
    computed = denoise.denoise_movie
    monkeypatch.setattr(denoise, "denoise_movie", lambda *a, **k: pytest.fail("computed before the paths' check"))
    assert denoise_file(src, tmp_path / "missing" / "out.ome.tif") == 2
    assert denoise_file(src, tmp_path / "out.ome.tif", save_model=tmp_path / "file" / "m.pt") == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [f"umvd-live denoise: error: cannot write {tmp_path / 'missing' / 'out.ome.tif'}: "
                      f"{tmp_path / 'missing'} is not a folder",
                      f"umvd-live denoise: error: cannot write {tmp_path / 'file' / 'm.pt'}: "
                      f"{tmp_path / 'file'} is not a folder"]
    # a model that cannot be saved (its name is a folder) is said in one line, and is saved
    # before the output: no output without the model asked for
    monkeypatch.setattr(denoise, "denoise_movie", computed)
    (tmp_path / "m.pt").mkdir()
    assert denoise_file(src, tmp_path / "out.ome.tif", save_model=tmp_path / "m.pt") == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bars
    assert last.startswith(f"umvd-live denoise: error: cannot save the model to {tmp_path / 'm.pt'}: "), last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in.ome.tif", "m.pt"]


def test_every_stream_is_checked_before_any_is_denoised(tmp_path, bright_and_dark, monkeypatch):
    """A later position of one frame is refused before the first is denoised and written: a rerun
    would refuse the first's output."""
    from umvd_live.apps import denoise

    src = tmp_path / "plate.ome.tif"
    with tifffile.TiffWriter(src, ome=True) as tif:
        tif.write(bright_and_dark[0], photometric="minisblack", metadata={"axes": "TYX", "Name": "well0"})
        tif.write(bright_and_dark[0][0], photometric="minisblack", metadata={"axes": "YX", "Name": "well1"})
    monkeypatch.setattr(denoise, "denoise_movie", lambda *a, **k: pytest.fail("denoised before every stream's check"))
    assert denoise_file(src, tmp_path / "den.ome.tif") == 2
    assert [p.name for p in tmp_path.iterdir()] == ["plate.ome.tif"]


def test_a_movie_shorter_than_the_window_is_warned_about(tmp_path, bright_and_dark, caplog):
    """Five frames and a 7-frame window: no training, only the starting weights (the prior's);
    said, not a silent 0 steps."""
    src, out = tmp_path / "in.ome.tif", tmp_path / "out.ome.tif"
    tifffile.imwrite(src, bright_and_dark[0][:5], ome=True, metadata={"axes": "TYX"})
    with caplog.at_level(logging.WARNING, logger="umvd_live.apps.denoise"):
        assert denoise_file(src, out) == 0
    assert "5 frames are fewer than the 7-frame window" in caplog.text
    assert read_recording(out)[0].shape == (5, 32, 32)


def test_pixels_that_are_no_measurement_are_said_and_a_movie_of_none_is_refused(tmp_path, bright_and_dark, caplog,
                                                                                 capsys):
    """NaN and ±Inf pixels are replaced by their frame's median and counted in a warning, as the
    daemon counts a stream's; a movie without one measured pixel is refused in one line, not
    written as a movie of zeros."""
    frames = bright_and_dark[0][:10].astype(np.float32)
    frames[2, 3, 4], frames[5, 0, 0], frames[5, 1, 0] = np.nan, np.inf, -np.inf
    src, out = tmp_path / "holes.tif", tmp_path / "holes.ome.tif"
    tifffile.imwrite(src, frames)
    with caplog.at_level(logging.WARNING, logger="umvd_live.apps.denoise"):
        assert denoise_file(src, out) == 0
    assert "2 of 10 frames hold 3 NaN, ±Inf or out-of-range pixels" in caplog.text
    assert np.isfinite(read_recording(out)[0]).all()
    tifffile.imwrite(src := tmp_path / "none.tif", np.full((10, 32, 32), np.nan, np.float32))
    assert denoise_file(src, tmp_path / "none.ome.tif") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "umvd-live denoise: error: no pixel of the movie is a measurement: all are NaN, ±Inf or out of range")
    assert not (tmp_path / "none.ome.tif").exists()


@pytest.mark.parametrize("name", ["out.png", "out", "out.ome"])
def test_an_output_named_as_no_movie_file_is_refused(tmp_path, name):
    """The output's name says its format; an ending that names none is refused before any work
    (it was written as an OME-TIFF under a name no reader takes for one)."""
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.zeros((10, 16, 16), np.uint16))
    done = run_umvd_live("denoise", src, tmp_path / name, timeout=None)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    said = f"cannot write {tmp_path / name}: an output's name ends as an OME-TIFF's or an OME-Zarr's does"
    assert said in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]
    for good in ("a.ome.tif", "b.TIF", "c.ome.tiff", "d.ome.zarr", "e.zarr"):
        assert DenoiseConfig(src, tmp_path / good).output.name == good
