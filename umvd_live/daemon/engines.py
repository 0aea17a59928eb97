"""How the daemon makes its engines: one `StreamDenoiser` per stream, all sharing one CPU budget.

Every engine is built from the daemon's one `EngineConfig` (`DaemonConfig.engine`), with the
stream's own starting weights (``init``: ``--init``, a `load_model`, or a state checkpoint).
`inference_layout` says how many windows those engines denoise side by side, which the router
needs to size the runs it hands them.
"""

from __future__ import annotations

from dataclasses import replace

from umvd_live.daemon.config import DaemonConfig
from umvd_live.daemon.runtime import enabled as runtime_enabled
from umvd_live.daemon.streams import StreamEngine
from umvd_live.engine import CpuBudget, StreamDenoiser, pick_device
from umvd_live.engine import inference_layout as engine_layout


def inference_layout(config: DaemonConfig) -> tuple[int, int]:
    """(windows per forward pass, passes at once) of the daemon's engines: ``--batch`` and
    ``--workers``, else the engine's defaults for the device and the CPU budget."""
    engine = config.engine
    return engine_layout(pick_device(engine.device), engine.train_mode, engine.max_batch, engine.workers,
                         config.cpu_budget)


class EngineFactory:
    """Makes the daemon's engines, one per stream, all sharing one CPU budget (`budget.CpuBudget`,
    ``--cpu-budget``), which re-divides its cores as engines are made and closed. ``budget``:
    the daemon's status reports it."""

    def __init__(self, config: DaemonConfig, budget: CpuBudget | None = None):
        self.config = config
        self.budget = budget if budget is not None else CpuBudget(config.cpu_budget)
        #: `UMVD_LIVE_SHARED_BUDGET=off`: every engine sizes its threads as if it were alone, as
        #: before the budget (to measure what sharing does: docs/benchmarks.md).
        self.shared = runtime_enabled("SHARED_BUDGET")

    def __call__(self, init: str | None) -> StreamEngine:
        return StreamDenoiser(replace(self.config.engine, init=init),
                              budget=self.budget if self.shared else CpuBudget(self.config.cpu_budget))


def engine_factory(config: DaemonConfig) -> EngineFactory:
    """The daemon's engine factory: StreamDenoisers training in the background (inference first),
    sharing one CPU budget."""
    return EngineFactory(config)
