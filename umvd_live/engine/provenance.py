"""What an output says of the network that made it, for its provenance (`recording.ometiff.Provenance`).

Why one function: a live recording (`daemon.service`) and a denoised file (`apps.denoise`, `batch`)
describe their network alike, so a recording and a file made with the same network say the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from umvd_live.engine.stream import StreamDenoiser

__all__ = ["network_provenance"]


def network_provenance(engine: StreamDenoiser) -> dict[str, str]:
    """The network's context blocks (``context_blocks``: frame counts, or ``none``) and the prior it
    started on (``prior``: its name, ``prior_sha256``: its weights' hash), when it started on one."""
    extra = {"context_blocks": ",".join(map(str, engine.spec.context)) or "none"}
    if engine.prior is not None:
        extra.update(prior=engine.prior.name, prior_sha256=engine.prior.sha256)
    return extra
