"""Wire protocol v1: every message is multipart ``[topic, header, pixels]``.

The header is a msgpack map; the pixels are raw C-order bytes. `docs/protocol.md` is the
normative description, so that any producer can be written without this code base. Decoding
validates everything *before* allocating: a hostile header cannot make us reserve memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
#: Every message, input or output: [topic, header, pixels].
MESSAGE_PARTS = 3

#: dtype strings a producer may send, as numpy writes them (``np.dtype(x).str``).
SUPPORTED_DTYPES: dict[str, np.dtype] = {
    "|u1": np.dtype("|u1"),
    "<u2": np.dtype("<u2"),
    "<i2": np.dtype("<i2"),
    "<f4": np.dtype("<f4"),
}
#: Largest accepted frame side and pixel count (16384 px side, 64 Mpx): anything larger is absurd
#: for a live microscope stream and is refused before any allocation.
MAX_SIDE = 16384
MAX_PIXELS = 64 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
#: A frame's ``meta``: JSON-like values only (it is written into recordings as JSON), at most this
#: deep and this many values (64 KiB of empty maps would decode to ~5 MB, held per queued frame).
MAX_META_DEPTH = 8
MAX_META_VALUES = 4096
_META_SCALARS = (str, int, float, bool, type(None))
#: ``\Z``, not ``$``: "$" matches before a final newline, and "cam0\n" is not a stream name.
STREAM_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}\Z")

DENOISED_SUFFIX = "/denoised"
RAW_SUFFIX = "/raw"


class ProtocolError(ValueError):
    """A message that does not follow protocol v1. ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FrameHeader:
    seq: int
    shape: tuple[int, int]
    dtype: str
    t: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "seq": self.seq,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }
        if self.t is not None:
            out["t"] = self.t
        if self.meta:
            out["meta"] = self.meta
        return out


@dataclass(frozen=True)
class Frame:
    """One decoded input frame. ``pixels`` may be a read-only view on the message buffer."""

    stream: str
    header: FrameHeader
    pixels: np.ndarray


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack_map(data: bytes | memoryview, max_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Decode a msgpack map with bounded sizes; raise ProtocolError otherwise."""
    if len(data) > max_bytes:
        raise ProtocolError("header_too_large", f"{len(data)} bytes > {max_bytes}")
    try:
        # The size was checked above; unpackb bounds every container by the buffer's length.
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError("bad_msgpack", type(exc).__name__) from None
    if not isinstance(obj, dict):
        raise ProtocolError("header_not_map", type(obj).__name__)
    return obj


def _as_int(value: Any) -> int | None:
    # bool is an int subclass; a shape of [True, 1] is not a shape.
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def parse_header(obj: dict[str, Any]) -> FrameHeader:
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"v={obj.get('v')!r}")
    for key in ("seq", "shape", "dtype"):
        if key not in obj:
            raise ProtocolError("missing_key", key)
    seq = _as_int(obj["seq"])
    if seq is None or seq < 0:
        raise ProtocolError("bad_seq", repr(obj["seq"])[:40])
    shape = obj["shape"]
    if not isinstance(shape, (list, tuple)) or len(shape) != 2:
        raise ProtocolError("bad_shape", repr(shape)[:40])
    h, w = (_as_int(s) for s in shape)
    if h is None or w is None or h < 1 or w < 1 or h > MAX_SIDE or w > MAX_SIDE or h * w > MAX_PIXELS:
        raise ProtocolError("bad_shape", repr(shape)[:40])
    dtype = obj["dtype"]
    if not isinstance(dtype, str) or dtype not in SUPPORTED_DTYPES:
        raise ProtocolError("bad_dtype", repr(dtype)[:40])
    t = obj.get("t")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ProtocolError("bad_time", repr(t)[:40])
        t = float(t)
    meta = obj.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ProtocolError("bad_meta", type(meta).__name__)
    _check_meta(meta)
    return FrameHeader(seq=seq, shape=(h, w), dtype=dtype, t=t, meta=meta)


def _check_meta(meta: dict[str, Any]) -> None:
    """Refuse a ``meta`` that a recording could not write as JSON, or that is absurdly deep or
    large: one such frame stopped the whole recording (every stream's) before it was checked."""
    values = 0
    todo: list[tuple[dict[str, Any] | list[Any], int]] = [(meta, 1)]  # (a map or a list, its depth)
    while todo:
        node, depth = todo.pop()
        if depth > MAX_META_DEPTH:
            raise ProtocolError("bad_meta", f"nested deeper than {MAX_META_DEPTH}")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            values += 1
            if values > MAX_META_VALUES:
                raise ProtocolError("bad_meta", f"more than {MAX_META_VALUES} values")
            if isinstance(node, dict) and not isinstance(key, str):
                raise ProtocolError("bad_meta", f"a key of type {type(key).__name__}")
            if isinstance(value, (dict, list)):
                todo.append((value, depth + 1))
            elif not isinstance(value, _META_SCALARS):
                raise ProtocolError("bad_meta", f"a value of type {type(value).__name__}")


def decode_stream_name(topic: bytes | memoryview) -> str:
    try:
        name = bytes(topic).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("bad_topic", "not UTF-8") from None
    if not STREAM_NAME.match(name):
        raise ProtocolError("bad_topic", repr(name)[:70])
    return name


@dataclass(frozen=True)
class StreamEnd:
    """The producer's word that a stream is over (its acquisition finished or was cancelled).

    Without it the last N//2 frames of a stream wait for their right-hand neighbours until the
    daemon shuts down; with it the daemon flushes them at once. A stream of one time point (one
    plane of a z-stack) gets its frame back at once too. ``seq`` is the number the next frame would
    have had, so frames lost just before the end still count as drops."""

    stream: str
    seq: int


def decode_message(parts: Sequence[bytes | memoryview]) -> Frame | StreamEnd:
    """Validate and decode one input message: a frame, or a stream's end (``"end": true``, an
    empty third part). Raises ProtocolError with a counter reason."""
    if len(parts) != MESSAGE_PARTS:
        raise ProtocolError("part_count", f"{len(parts)} parts, expected {MESSAGE_PARTS}")
    stream = decode_stream_name(parts[0])
    obj = unpack_map(parts[1])
    if obj.get("end") is True:
        if obj.get("v") != PROTOCOL_VERSION:
            raise ProtocolError("bad_version", f"v={obj.get('v')!r}")
        seq = _as_int(obj.get("seq"))
        if seq is None or seq < 0:
            raise ProtocolError("bad_seq", repr(obj.get("seq"))[:40])
        if len(parts[2]) != 0:
            raise ProtocolError("size_mismatch", f"{len(parts[2])} bytes in an end message")
        return StreamEnd(stream, seq)
    return _frame(stream, obj, parts[2])


def decode_frame(parts: Sequence[bytes | memoryview]) -> Frame:
    """Validate and decode one input frame. Raises ProtocolError with a counter reason (an end
    message is not a frame: `decode_message` takes both)."""
    message = decode_message(parts)
    if isinstance(message, StreamEnd):
        raise ProtocolError("not_a_frame", f"end of stream {message.stream}")
    return message


def _frame(stream: str, obj: dict[str, Any], payload: bytes | memoryview) -> Frame:
    header = parse_header(obj)
    dtype = SUPPORTED_DTYPES[header.dtype]
    h, w = header.shape
    expected = h * w * dtype.itemsize
    if len(payload) != expected:
        raise ProtocolError("size_mismatch", f"{len(payload)} bytes for {h}x{w} {header.dtype}")
    pixels = np.frombuffer(payload, dtype=dtype).reshape(h, w)
    return Frame(stream=stream, header=header, pixels=pixels)


def encode_frame(
    stream: str,
    image: np.ndarray,
    seq: int,
    t: float | None = None,
    meta: dict[str, Any] | None = None,
) -> list[bytes | memoryview]:
    """Build the multipart message for one raw frame (zero-copy for C-contiguous images)."""
    if not STREAM_NAME.match(stream):
        raise ValueError(f"stream name {stream!r} must match {STREAM_NAME.pattern}")
    if image.ndim != 2:
        raise ValueError(f"a frame is 2-D (H, W), got shape {image.shape}")
    dtype = image.dtype.newbyteorder("<") if image.dtype.byteorder == ">" else image.dtype
    image = np.ascontiguousarray(image, dtype=dtype)
    if image.dtype.str not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {image.dtype} is not one of {sorted(SUPPORTED_DTYPES)}")
    header = FrameHeader(seq=seq, shape=image.shape, dtype=image.dtype.str, t=t, meta=meta or {})
    return [stream.encode(), pack(header.to_map()), image.data.cast("B")]


def encode_end(stream: str, seq: int) -> list[bytes]:
    """The message that ends ``stream`` (`StreamEnd`); ``seq``: the next frame's number."""
    if not STREAM_NAME.match(stream):
        raise ValueError(f"stream name {stream!r} must match {STREAM_NAME.pattern}")
    return [stream.encode(), pack({"v": PROTOCOL_VERSION, "seq": int(seq), "end": True}), b""]


def encode_denoised(
    stream: str,
    header: FrameHeader,
    image: np.ndarray,
    *,
    state: str,
    latency_ms: float,
    model_step: int,
    amplitude_gain: float = 1.0,
    jitter_shift_px: tuple[float, float] | None = None,
) -> list[bytes | memoryview]:
    """The ``<stream>/denoised`` message: float32 pixels, the input's seq/t/meta plus engine state
    (``amplitude_gain``: the factor the engine restored the frame's amplitude by, 1.0 for none;
    ``jitter_shift_px``: the (y, x) pixels it moved the frame by with its jitter, None for none)."""
    image = np.ascontiguousarray(image, dtype="<f4")
    out = FrameHeader(seq=header.seq, shape=image.shape, dtype="<f4", t=header.t, meta=header.meta)
    head = out.to_map() | {"state": state, "latency_ms": float(latency_ms), "model_step": int(model_step),
                           "amplitude_gain": float(amplitude_gain),
                           "jitter_shift_px": None if jitter_shift_px is None else [float(v) for v in jitter_shift_px]}
    return [(stream + DENOISED_SUFFIX).encode(), pack(head), image.data.cast("B")]


@dataclass(frozen=True)
class OutputMessage:
    """A decoded message from the daemon's output socket (for viewers and tests)."""

    stream: str
    kind: str  # "denoised" or "raw"
    header: dict[str, Any]
    image: np.ndarray


def decode_output(parts: Sequence[bytes | memoryview]) -> OutputMessage:
    if len(parts) != MESSAGE_PARTS:
        raise ProtocolError("part_count", f"{len(parts)} parts, expected {MESSAGE_PARTS}")
    topic = bytes(parts[0]).decode("utf-8", errors="replace")
    stream, _, kind = topic.rpartition("/")
    if kind not in ("denoised", "raw"):
        raise ProtocolError("bad_topic", topic[:70])
    obj = unpack_map(parts[1])
    header = parse_header(obj)
    dtype = SUPPORTED_DTYPES[header.dtype]
    if len(parts[2]) != header.shape[0] * header.shape[1] * dtype.itemsize:
        raise ProtocolError("size_mismatch", topic[:70])
    image = np.frombuffer(parts[2], dtype=dtype).reshape(header.shape)
    return OutputMessage(stream=stream, kind=kind, header=obj, image=image)
