"""Quality figures: the activity measure that whole-movie PSNR hides."""

import numpy as np
import pytest
from scipy.ndimage import uniform_filter1d

from umvd_live.metrics import activity_fidelity, psnr


def transient_movie(frames=200, size=16):
    """A flat field with one square that lights up for 10 frames, twice."""
    truth = np.full((frames, size, size), 100.0)
    for start in (50, 140):
        truth[start : start + 10, 4:8, 4:8] += 80.0
    return truth


def test_activity_fidelity_is_perfect_for_the_truth_and_flags_smoothing():
    truth = transient_movie()
    psnr_active, slope = activity_fidelity(truth + 1e-3, truth)
    assert slope == pytest.approx(1.0) and psnr_active > 80
    # A 31-frame running mean keeps the static field but flattens each transient to a third.
    smoothed = uniform_filter1d(truth, 31, axis=0, mode="reflect")
    psnr_active, slope = activity_fidelity(smoothed, truth)
    assert slope < 0.5 and psnr_active < psnr(smoothed, truth) - 10


def test_activity_fidelity_needs_activity():
    with pytest.raises(ValueError, match="no activity"):
        activity_fidelity(np.ones((5, 4, 4)), np.ones((5, 4, 4)))
