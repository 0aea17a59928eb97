"""Which stream is which channel at which site of a multi-dimensional acquisition. No Qt.

Why: a Micro-Manager acquisition with positions, grid tiles, channels and z planes reaches the
daemon as one stream per (position, grid, channel, z), because a window must never mix them
(docs/protocol.md). The viewer shows one *site* at a time, a (group, position, grid, z), with all
of that site's channels. Where a stream belongs comes from its frames' ``meta`` (``group``,
``index``, ``channel``, ``position``), or, before its frames arrive, from the daemon's status
(``axes``). A stream without them (an older producer) is a site of its own with one unnamed
channel. Stream names are never parsed: in ``pmt.red`` the ``red`` is not an axis.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

TIME_AXIS = "t"
CHANNEL_AXIS = "c"
#: The order of a site's axes (others follow by key), and their names for people.
SITE_AXIS_ORDER = ("p", "g", "z")
AXIS_NAMES = {"p": "position", "g": "grid tile", "z": "plane (z)"}


def _axis_key(axis: str) -> tuple[int, str]:
    return (SITE_AXIS_ORDER.index(axis), "") if axis in SITE_AXIS_ORDER else (len(SITE_AXIS_ORDER), axis)


@dataclass(frozen=True)
class Site:
    """One place and plane of an acquisition: the group and its non-time, non-channel indices."""

    group: str
    coords: tuple[tuple[str, int], ...] = ()  # (axis, index) in SITE_AXIS_ORDER, then by key

    @classmethod
    def of(cls, group: str, index: Mapping[str, int]) -> Site:
        return cls(group, tuple(sorted(((a, int(i)) for a, i in index.items()
                                        if a not in (TIME_AXIS, CHANNEL_AXIS)), key=lambda c: _axis_key(c[0]))))

    def get(self, axis: str) -> int | None:
        return dict(self.coords).get(axis)

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.coords)

    def describe(self, position_name: str | None = None) -> str:
        """``cam0 · position 1 (Pos001) · plane (z) 3``: the site in words."""
        parts = [self.group]
        for axis, i in self.coords:
            text = f"{AXIS_NAMES.get(axis, axis)} {i}"
            if axis == "p" and position_name:
                text += f" ({position_name})"
            parts.append(text)
        return " · ".join(parts)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _placed(meta: Any) -> bool:
    return (isinstance(meta, Mapping) and isinstance(meta.get("group"), str) and bool(meta["group"])
            and isinstance(meta.get("index"), Mapping))


def _index(raw: Any) -> dict[str, int]:
    if not isinstance(raw, Mapping):
        return {}
    index = {}
    for axis, value in raw.items():
        i = _int(value)
        if isinstance(axis, str) and axis != TIME_AXIS and i is not None:
            index[axis] = i
    return index


@dataclass(frozen=True)
class StreamPlace:
    """Where one stream sits: its site and its channel (None: the stream has no channel axis)."""

    stream: str
    site: Site
    channel: str | None = None  # the channel's display name
    channel_index: int | None = None
    position_name: str | None = None

    @property
    def label(self) -> str:
        """The name the viewer gives the stream's layers: its channel's, else the stream's."""
        return self.channel if self.channel is not None else self.stream

    @classmethod
    def alone(cls, stream: str) -> StreamPlace:
        """A stream without axes: a site (group) of its own."""
        return cls(stream, Site(stream))

    @classmethod
    def from_meta(cls, stream: str, meta: Any) -> StreamPlace:
        """From a frame header's ``meta``; tolerant of producers that send none or other keys
        (without a ``group`` and an ``index`` map, as the daemon's status judges, it stands alone)."""
        if not _placed(meta):
            return cls.alone(stream)
        return cls._make(stream, meta["group"], _index(meta["index"]), meta.get("channel"), meta.get("position"))

    @classmethod
    def from_status(cls, stream: str, axes: Any) -> StreamPlace:
        """From the daemon's status entry ``axes`` (``group``, ``channel``, ``index``), or None."""
        if not _placed(axes):
            return cls.alone(stream)
        return cls._make(stream, axes["group"], _index(axes["index"]), axes.get("channel"), axes.get("position"))

    @classmethod
    def _make(cls, stream: str, group: str, index: dict[str, int], channel: Any, position: Any) -> StreamPlace:
        c = index.get(CHANNEL_AXIS)
        name = channel if isinstance(channel, str) and channel else None
        if name is None and c is not None:
            name = f"c{c}"
        return cls(stream, Site.of(group, index), name, c,
                   position if isinstance(position, str) and position else None)


class SiteCatalog:
    """Every stream seen, by site and channel; groups and sites keep the order they were seen in."""

    def __init__(self, places: Iterable[StreamPlace] = ()):
        self._places: dict[str, StreamPlace] = {}
        for place in places:
            self.note(place)

    def note(self, place: StreamPlace) -> bool:
        """Record (or correct) a stream's place; True when that changed anything."""
        if self._places.get(place.stream) == place:
            return False
        self._places[place.stream] = place
        return True

    def forget(self, stream: str) -> bool:
        """Drop a stream (it ended, or the daemon no longer serves it); True when it was known."""
        return self._places.pop(stream, None) is not None

    def __contains__(self, stream: str) -> bool:
        return stream in self._places

    def get(self, stream: str) -> StreamPlace | None:
        return self._places.get(stream)

    def places(self) -> tuple[StreamPlace, ...]:
        return tuple(self._places.values())

    def groups(self) -> list[str]:
        return list(dict.fromkeys(p.site.group for p in self._places.values()))

    def sites(self, group: str | None = None) -> list[Site]:
        """The sites of ``group`` (of every group for None), ordered by their indices."""
        sites = dict.fromkeys(p.site for p in self._places.values() if group is None or p.site.group == group)
        if group is None:
            return list(sites)
        return sorted(sites, key=lambda s: tuple((_axis_key(a), i) for a, i in s.coords))

    def channels(self, site: Site) -> list[StreamPlace]:
        """The streams of ``site``, one per channel, in the acquisition's channel order."""
        found = [p for p in self._places.values() if p.site == site]
        order = {p.stream: n for n, p in enumerate(found)}
        return sorted(found, key=lambda p: (p.channel_index is None, p.channel_index or 0, order[p.stream]))

    def group_channels(self, group: str) -> list[str]:
        """The labels of a group's channels, in channel order (one list for all its sites, so that
        a channel keeps its colour from site to site)."""
        places = [p for p in self._places.values() if p.site.group == group]
        places.sort(key=lambda p: (p.channel_index is None, p.channel_index or 0))
        return list(dict.fromkeys(p.label for p in places if p.channel is not None)) or \
            list(dict.fromkeys(p.label for p in places))

    def axis_values(self, group: str, axis: str) -> list[int]:
        return sorted({i for s in self.sites(group) for a, i in s.coords if a == axis})

    def group_axes(self, group: str) -> list[str]:
        axes = {a for s in self.sites(group) for a in s.axes}
        return sorted(axes, key=_axis_key)

    def position_name(self, group: str, position: int | None) -> str | None:
        for p in self._places.values():
            if p.site.group == group and p.site.get("p") == position and p.position_name:
                return p.position_name
        return None

    def nearest_site(self, group: str, wanted: Mapping[str, int], keep: str | None = None,
                     live: Iterable[Site] = ()) -> Site | None:
        """The site of ``group`` at ``wanted``'s indices, or, if the acquisition has none there
        (positions with different z ranges), the one that matches ``keep`` (the axis just
        chosen), then one of ``live`` (sites receiving frames: not one of an acquisition that
        ended), then as many other axes as possible, nearest first."""
        sites = self.sites(group)
        if not sites:
            return None
        receiving = set(live)

        def cost(site: Site) -> tuple:
            c = dict(site.coords)
            kept = keep is not None and c.get(keep) == wanted.get(keep)
            mismatched = sum(1 for a, i in wanted.items() if c.get(a) != i)
            distance = sum(abs(c.get(a, 0) - i) for a, i in wanted.items())
            return (not kept, site not in receiving, mismatched, distance)

        return min(sites, key=cost)
