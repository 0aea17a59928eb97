"""Frame sources (installed as `umvd_live.adapters`): each speaks protocol v1 through `FramePublisher`."""
