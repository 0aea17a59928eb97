"""umvd-live: real-time UMVD denoising of microscopy video, learned online from the stream."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("umvd-live")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["StreamDenoiser", "EngineConfig", "DenoisedFrame", "__version__"]


def __getattr__(name: str):
    # Lazy, so that producers importing `umvd_live.wire.protocol` do not pay for importing torch.
    if name in ("StreamDenoiser", "EngineConfig", "DenoisedFrame"):
        from umvd_live import engine

        return getattr(engine, name)
    raise AttributeError(name)
