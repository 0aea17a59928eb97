"""Checks of flag values shared by the command line (`apps.cli`) and the configurations that check
their own fields (`apps.acquire.AcquireConfig`), so that a flag is refused with the same words
wherever it is checked. Standard library only: `apps.acquire` imports it without the parser and
without torch.
"""

from __future__ import annotations

import math


def finite_positive(flag: str, value: float) -> float:
    """``value``, refused unless a finite number > 0: inf would overflow in int()/round() into a
    traceback, or (``--rate inf``) run unpaced while reported as paced."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{flag} must be a finite number > 0, got {value:g}")
    return value
