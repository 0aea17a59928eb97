"""The wire: what crosses a socket between a source, the daemon and a viewer (no torch here)."""

from umvd_live.wire.acqmeta import AcquisitionMeta
from umvd_live.wire.axes import StreamAxes, StreamNumbering, stream_name
from umvd_live.wire.channel_colors import channel_colormaps, ome_color
from umvd_live.wire.control_client import ControlClient, ControlReply, DaemonUnavailable
from umvd_live.wire.protocol import (
    DENOISED_SUFFIX,
    PROTOCOL_VERSION,
    RAW_SUFFIX,
    STREAM_NAME,
    SUPPORTED_DTYPES,
    Frame,
    FrameHeader,
    OutputMessage,
    ProtocolError,
    StreamEnd,
    decode_message,
    decode_output,
    encode_denoised,
    encode_end,
    encode_frame,
)
from umvd_live.wire.schema import DaemonStatus, StatusReply, StreamStatus
from umvd_live.wire.security import (
    CurveServer,
    CurveServerConfig,
    PathNotAllowed,
    SecurityError,
    apply_client,
    check_bind,
    confine_path,
    create_keypair,
    is_loopback,
)

__all__ = [
    "DENOISED_SUFFIX",
    "PROTOCOL_VERSION",
    "RAW_SUFFIX",
    "STREAM_NAME",
    "SUPPORTED_DTYPES",
    "AcquisitionMeta",
    "ControlClient",
    "ControlReply",
    "DaemonStatus",
    "CurveServer",
    "CurveServerConfig",
    "DaemonUnavailable",
    "Frame",
    "FrameHeader",
    "OutputMessage",
    "PathNotAllowed",
    "ProtocolError",
    "SecurityError",
    "StatusReply",
    "StreamAxes",
    "StreamEnd",
    "StreamNumbering",
    "StreamStatus",
    "apply_client",
    "channel_colormaps",
    "check_bind",
    "confine_path",
    "create_keypair",
    "decode_message",
    "decode_output",
    "encode_denoised",
    "encode_end",
    "encode_frame",
    "is_loopback",
    "ome_color",
    "stream_name",
]
