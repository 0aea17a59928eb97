"""A pure-Python Micro-Manager camera that images blinking cells in shot noise.

It lets a real pymmcore-plus core (``UniMMCore``) run without C++ device adapters: in tests, in
rehearsals, and for trying `umvd-live acquire pymmcore-plus` without a microscope. Load it from a
Micro-Manager configuration file::

    #py pyDevice,Cam,umvd_live.adapters.pycamera,NoisyPatternCamera
    #py Property,Core,Initialize,1
    #py Property,Core,Camera,Cam

Frame ``n`` since the device was loaded is a pure function of (``Seed``, ``n``, ``Photons``, focus
position) — `render` — so a receiver can check that what arrived is exactly what the camera
produced. ``Photons`` is a property a channel preset can set (a dim and a bright channel), and
`FocusStage` is a pure-Python focus drive: with the camera's ``FocusStage`` property naming it, each
focus position images its own plane of cells, so the planes of a z-stack differ as real ones do
(pure-Python devices cannot ask the core for the focus position, so the camera finds the drive by
its label, among the drives loaded in this process)::

    #py pyDevice,Z,umvd_live.adapters.pycamera,FocusStage
    #py Property,Core,Focus,Z
    #py Property,Cam,FocusStage,Z
    #py ConfigGroup,Channel,Dim,Cam,Photons,5
    #py ConfigGroup,Channel,Bright,Cam,Photons,400
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
from pymmcore_plus.experimental.unicore import SimpleCameraDevice, StageDevice, pymm_property

_N_CELLS = 12


def render(n: int, shape: tuple[int, int], seed: int = 0, photons: float = 20.0, z_um: float = 0.0) -> np.ndarray:
    """Frame ``n`` of the movie: Poisson counts (uint16) of blinking Gaussian cells on a background;
    the plane at focus position ``z_um`` (to 0.1 µm) has cells of its own."""
    h, w = shape
    plane = int(round(z_um * 10))
    layout = np.random.default_rng([seed, 0xCE11] + ([plane & 0xFFFFFFFF] if plane else []))
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
        self._focus_label = ""
        self.frames_snapped = 0

    def get_exposure(self) -> float:
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        self._exposure_ms = float(exposure)

    # Each setter redefines its property's name, as with `property`; mypy knows that idiom for
    # `property` only, hence the ignores below.
    @pymm_property(limits=(8, 4096), name="SensorWidth")
    def sensor_width(self) -> int:
        return self._shape[1]

    @sensor_width.setter  # type: ignore[no-redef]  # a pymm_property setter
    def sensor_width(self, value: int) -> None:
        self._shape = (self._shape[0], int(value))

    @pymm_property(limits=(8, 4096), name="SensorHeight")
    def sensor_height(self) -> int:
        return self._shape[0]

    @sensor_height.setter  # type: ignore[no-redef]  # a pymm_property setter
    def sensor_height(self, value: int) -> None:
        self._shape = (int(value), self._shape[1])

    @pymm_property(name="Seed")
    def seed(self) -> int:
        return self._seed

    @seed.setter  # type: ignore[no-redef]  # a pymm_property setter
    def seed(self, value: int) -> None:
        self._seed = int(value)

    @pymm_property(limits=(0.0, 10000.0), name="Photons")
    def photons(self) -> float:
        return self._photons

    @photons.setter  # type: ignore[no-redef]  # a pymm_property setter
    def photons(self, value: float) -> None:
        self._photons = float(value)

    @pymm_property(name="FocusStage")
    def focus_stage(self) -> str:
        return self._focus_label

    @focus_stage.setter  # type: ignore[no-redef]  # a pymm_property setter
    def focus_stage(self, value: str) -> None:
        self._focus_label = str(value)

    def _focus_um(self) -> float:
        """The position of the focus drive named by ``FocusStage``, or 0 without one."""
        stage = _FOCUS_STAGES.get(self._focus_label) if self._focus_label else None
        return stage.get_position_um() if stage is not None else 0.0

    def sensor_shape(self) -> tuple[int, int]:
        return self._shape

    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16)

    def snap(self, buffer: np.ndarray) -> Mapping:
        start = time.perf_counter()
        n = self.frames_snapped
        buffer[:] = render(n, self._shape, self._seed, self._photons, self._focus_um())
        self.frames_snapped += 1
        left = self._exposure_ms / 1000 - (time.perf_counter() - start)
        if left > 0:
            time.sleep(left)
        return {"PatternFrame": str(n)}


#: Focus drives by label, as loaded in this process (the newest of a label wins).
_FOCUS_STAGES: dict[str, FocusStage] = {}


class FocusStage(StageDevice):
    """A focus drive that moves at once: its position selects the plane `NoisyPatternCamera` images."""

    def __init__(self) -> None:
        super().__init__()
        self._position_um = 0.0

    def shutdown(self) -> None:
        if _FOCUS_STAGES.get(self.get_label()) is self:
            del _FOCUS_STAGES[self.get_label()]
        super().shutdown()

    def set_position_um(self, val: float) -> None:
        # Registered on its first move (a config may load it after initialising the others):
        # until then it is at 0, which is what the camera assumes without a drive.
        _FOCUS_STAGES[self.get_label()] = self
        self._position_um = float(val)

    def get_position_um(self) -> float:
        return self._position_um

    def set_origin(self) -> None:
        self._position_um = 0.0

    def home(self) -> None:
        self._position_um = 0.0

    def stop(self) -> None:
        pass
