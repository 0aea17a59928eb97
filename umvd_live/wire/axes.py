"""How a multi-dimensional acquisition becomes streams: one per (position, grid, channel, z).

The daemon denoises along time: a window may hold consecutive time points of one place, one
channel and one plane, never frames of two channels or planes (their levels and content differ,
and a mixed window is wrong in every pixel). So each source splits its frames by the acquisition's
own non-time axes, with useq's axis keys (``p`` position, ``g`` grid, ``c`` channel, ``z``; any
other key the same way), and every source names its streams by one rule, `stream_name`:

    GROUP[.p{P}][.g{G}][.{CHANNEL}][.z{Z}][.{key}{i} for any other axis, in key order]

``GROUP`` is the source's base name (``--stream``, default ``cam0``). ``CHANNEL`` is the channel's
preset name with every run of characters outside ``A-Z a-z 0-9 _ -`` made one ``_`` and cut to
24 characters, or ``c{index}`` when the name is unknown; a channel whose part an earlier channel
of the acquisition already has (one preset at two exposures, or names alike but for characters a
stream name cannot hold) gets ``_c{index}`` after it (`channel_parts`), so two channels never
share a stream. Only axes the acquisition has appear: a
time-lapse of one channel stays ``cam0``. Names are for people and files; programs read
`StreamAxes.meta` from each frame's ``meta`` (``group``, ``index`` with ``t``, ``channel``,
``position``) instead of parsing names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from umvd_live.wire.protocol import STREAM_NAME

#: The time axis: what a stream's window runs along. Every other axis splits streams.
TIME = "t"
#: The order of the non-time axes in a stream name (others follow in key order).
NAME_ORDER = ("p", "g", "c", "z")
#: Longest channel part of a stream name, so that group and axes still fit in 64 characters.
MAX_CHANNEL_CHARS = 24
_NOT_NAME = re.compile(r"[^A-Za-z0-9_\-]+")


def name_part(text: str, limit: int = MAX_CHANNEL_CHARS) -> str:
    """``"FITC 1.5x"`` -> ``"FITC_1_5x"``: a free-text name made fit for a stream name."""
    return _NOT_NAME.sub("_", str(text)).strip("_")[:limit].strip("_")


def _axis_sort_key(axis: str) -> tuple[int, str]:
    return (NAME_ORDER.index(axis), "") if axis in NAME_ORDER else (len(NAME_ORDER), axis)


@dataclass(frozen=True)
class StreamAxes:
    """Where one stream sits in its acquisition: the group and the non-time indices."""

    group: str
    index: Mapping[str, int] = field(default_factory=dict)  # non-time axes only
    channel: str | None = None  # the channel's name as the acquisition gives it
    position: str | None = None  # the position's name, if the acquisition names it
    channel_part: str | None = None  # the channel's part of the name, where `channel_parts` set it

    @property
    def name(self) -> str:
        return stream_name(self.group, self.index, self.channel, self.channel_part)

    @property
    def short_name(self) -> str:
        """The name without its group (``GCaMP.z2``; "" for a group's only stream): what tells
        the streams of one file apart (`umvd-live denoise --stream`, its outputs' names)."""
        return self.name[len(self.group) + 1:]

    def meta(self, t_index: int | None = None) -> dict[str, Any]:
        """The frame ``meta`` keys every multi-dimensional source sends (docs/protocol.md)."""
        index = {k: int(v) for k, v in sorted(self.index.items(), key=lambda kv: _axis_sort_key(kv[0]))}
        if t_index is not None:
            index = {TIME: int(t_index), **index}
        meta: dict[str, Any] = {"group": self.group, "index": index}
        if self.channel is not None:
            meta["channel"] = self.channel
        if self.position is not None:
            meta["position"] = self.position
        return meta


def stream_name(group: str, index: Mapping[str, int], channel: str | None = None,
                channel_part: str | None = None) -> str:
    """The stream of one (p, g, c, z) of an acquisition (see the module docstring for the rule);
    ``channel_part``, from `channel_parts`, names the channel where its name alone may not.

    Raises ValueError when the name cannot be a stream name (a group with other characters, or
    too long to take the axes)."""
    parts = [group]
    for axis in sorted((a for a in index if a != TIME), key=_axis_sort_key):
        i = int(index[axis])
        if axis == "c":
            parts.append(channel_part or (name_part(channel) if channel else "") or f"c{i}")
        else:
            parts.append(f"{name_part(axis, 8) or 'x'}{i}")
    name = ".".join(parts)
    if not STREAM_NAME.match(name):
        raise ValueError(f"stream name {name!r} (group {group!r} and the acquisition's axes) must match "
                         f"{STREAM_NAME.pattern}; choose a shorter --stream")
    return name


def channel_parts(names: Sequence[str | None]) -> list[str]:
    """Each channel's part of its streams' names, in channel order: its name made fit
    (`name_part`), or ``c{index}`` without one; a part that an earlier channel already has gets
    ``_c{index}``, so that no two channels of one acquisition share a stream."""
    parts = ChannelParts()
    return [parts.part(name, i) for i, name in enumerate(names)]


class ChannelParts:
    """`channel_parts`, handed out as the channels appear: for a source that learns an
    acquisition's channels from its frames (an MDA run from a list of events, a position with its
    own channels). A channel is its (name, index): one name at two indices is two channels."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str | None, int], str] = {}
        self._taken: set[str] = set()

    def part(self, name: str | None, index: int) -> str:
        """The part of channel ``index`` named ``name``: the same each time it is asked for."""
        part = self._parts.get((name, index))
        if part is None:
            part = (name_part(name) if name else "") or f"c{index}"
            if part in self._taken:
                suffix = f"_c{index}"
                part = part[:MAX_CHANNEL_CHARS - len(suffix)].rstrip("_") + suffix
            while part in self._taken:  # another channel is named that: rare
                part += "_"
            self._taken.add(part)
            self._parts[(name, index)] = part
        return part


def split_index(index: Mapping[str, Any]) -> tuple[int | None, dict[str, int]]:
    """(time index or None, the other axes) of an acquisition index with integer values."""
    t = index.get(TIME)
    rest = {str(k): int(v) for k, v in index.items() if k != TIME}
    return (int(t) if t is not None else None), rest


class StreamNumbering:
    """Each stream's own ``seq``: consecutive within the stream, from 0.

    A source numbers a frame when the acquisition hands it over, before any queue, so a frame lost
    later shows up as a gap in its own stream. Numbering by the acquisition's time index instead
    would count a channel acquired every other time point (useq's ``acquire_every``) as drops."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def next(self, stream: str) -> int:
        seq = self._next.get(stream, 0)
        self._next[stream] = seq + 1
        return seq

    @property
    def streams(self) -> list[str]:
        """The streams numbered so far, in the order of their first frame."""
        return list(self._next)

    def forget(self, streams: Iterable[str]) -> None:
        """Start these streams from 0 again (their acquisition ended)."""
        for stream in streams:
            self._next.pop(stream, None)
