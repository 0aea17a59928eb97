"""A pure-Python Micro-Manager camera that images blinking cells in shot noise.

It lets a real pymmcore-plus core (``UniMMCore``) run without C++ device adapters: in tests, in
rehearsals, and for trying `umvd-live acquire pymmcore-plus` without a microscope. Load it from a
Micro-Manager configuration file::

    #py pyDevice,Cam,umvd_live.adapters.pycamera,NoisyPatternCamera
    #py Property,Core,Initialize,1
    #py Property,Core,Camera,Cam

Frame ``n`` since the device was loaded is a pure function of (``Seed``, ``n``) — `render` — so a
receiver can check that what arrived is exactly what the camera produced.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
from pymmcore_plus.experimental.unicore import SimpleCameraDevice, pymm_property

_N_CELLS = 12


def render(n: int, shape: tuple[int, int], seed: int = 0, photons: float = 20.0) -> np.ndarray:
    """Frame ``n`` of the movie: Poisson counts (uint16) of blinking Gaussian cells on a background."""
    h, w = shape
    layout = np.random.default_rng([seed, 0xCE11])
    cy, cx = layout.uniform(0, h, _N_CELLS), layout.uniform(0, w, _N_CELLS)
    radius = layout.uniform(1.5, 4.0, _N_CELLS) * max(1.0, min(h, w) / 64)
    period = layout.uniform(20.0, 80.0, _N_CELLS)
    phase = layout.uniform(0, 2 * np.pi, _N_CELLS)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rate = np.full((h, w), 0.2 * photons, np.float32)
    activity = 0.5 * (1 + np.sin(2 * np.pi * n / period + phase)) ** 2
    for i in range(_N_CELLS):
        rate += photons * activity[i] * np.exp(-((yy - cy[i]) ** 2 + (xx - cx[i]) ** 2) / (2 * radius[i] ** 2))
    noise = np.random.default_rng([seed, n])
    return np.minimum(noise.poisson(rate), 65535).astype(np.uint16)


class NoisyPatternCamera(SimpleCameraDevice):
    """uint16 camera; each snap takes ``Exposure`` ms, like a real one (so live mode is paced)."""

    def __init__(self) -> None:
        super().__init__()
        self._exposure_ms = 1.0
        self._shape = (64, 64)
        self._seed = 0
        self._photons = 20.0
        self.frames_snapped = 0

    def get_exposure(self) -> float:
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        self._exposure_ms = float(exposure)

    @pymm_property(limits=(8, 4096), name="SensorWidth")
    def sensor_width(self) -> int:
        return self._shape[1]

    @sensor_width.setter
    def sensor_width(self, value: int) -> None:
        self._shape = (self._shape[0], int(value))

    @pymm_property(limits=(8, 4096), name="SensorHeight")
    def sensor_height(self) -> int:
        return self._shape[0]

    @sensor_height.setter
    def sensor_height(self, value: int) -> None:
        self._shape = (int(value), self._shape[1])

    @pymm_property(name="Seed")
    def seed(self) -> int:
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed = int(value)

    @pymm_property(limits=(0.0, 10000.0), name="Photons")
    def photons(self) -> float:
        return self._photons

    @photons.setter
    def photons(self, value: float) -> None:
        self._photons = float(value)

    def sensor_shape(self) -> tuple[int, int]:
        return self._shape

    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16)

    def snap(self, buffer: np.ndarray) -> Mapping:
        start = time.perf_counter()
        n = self.frames_snapped
        buffer[:] = render(n, self._shape, self._seed, self._photons)
        self.frames_snapped += 1
        left = self._exposure_ms / 1000 - (time.perf_counter() - start)
        if left > 0:
            time.sleep(left)
        return {"PatternFrame": str(n)}
