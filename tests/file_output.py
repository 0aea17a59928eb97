"""A file's final pass written as `denoise` writes it and read back, for the tests of what each
frame's record keeps (`test_amplitude`, `test_jitter`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from umvd_live.apps.denoise import DenoiseResult, write_denoised
from umvd_live.recording.movie import MovieFrames
from umvd_live.recording.ometiff import FrameInfo, Provenance, read_recording


def written_infos(folder: Path, noisy: np.ndarray, result: DenoiseResult) -> list[FrameInfo]:
    """The per-frame records of ``result`` written beside its input movie ``noisy`` (an OME-TIFF)."""
    src, out = folder / "in.ome.tif", folder / "out.ome.tif"
    tifffile.imwrite(src, noisy, ome=True, metadata={"axes": "TYX"})
    with MovieFrames(src) as movie:
        write_denoised(out, movie, result.frames, result.outputs, Provenance("in"))
    return read_recording(out)[1]
