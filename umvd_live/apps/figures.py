"""How the command-line reports (bench, demo) print one figure: a measured value, or a dash."""

from __future__ import annotations

from typing import Any

#: Printed for a figure that was not measured (no frames, no samples).
MISSING = "—"


def format_figure(value: Any, spec: str = ".1f", unit: str = "") -> str:
    """A float in ``spec`` with ``unit``; a count as it is; None as `MISSING`."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:{spec}}{unit}"
    return f"{value}{unit}"
