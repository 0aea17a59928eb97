"""The acquisition's physical metadata: pixel size, frame interval, channel, acquisition start.

Every source puts them into each frame's protocol ``meta`` under pymmcore-plus's names
(docs/protocol.md): ``pixel_size_um`` (FrameMetaV1), ``interval_ms`` (the useq time plan's
interval; Micro-Manager's ``Interval_ms``), ``channel``, ``acquisition_datetime`` (SummaryMetaV1
``datetime``: ISO 8601). Every writer turns them into OME: ``PhysicalSizeX/Y``,
``TimeIncrement``, the ``Channel`` name, ``AcquisitionDate``. This module is the one place that
knows the other spellings (Micro-Manager's tags, OME, ImageJ, TIFF resolution tags) and checks the
values, so a bad value from a producer is dropped here, never written into a file.

A file's non-square pixels keep their height too: ``pixel_size_y_um`` (``PhysicalSizeY``), in
``meta`` only where it differs from ``pixel_size_um`` (the width, and the live protocol's one size).
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import tifffile

#: The ``meta`` keys, as pymmcore-plus names them (``interval_ms`` after its ``*_ms`` style).
PIXEL_SIZE_UM = "pixel_size_um"
PIXEL_SIZE_Y_UM = "pixel_size_y_um"
INTERVAL_MS = "interval_ms"
CHANNEL = "channel"
ACQUISITION_DATETIME = "acquisition_datetime"
EXPOSURE_MS = "exposure_ms"
CAMERA_DEVICE = "camera_device"

#: OME length units -> µm, OME time units -> s.
_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "\\u00B5m": 1.0, "nm": 1e-3, "mm": 1e3,
       "cm": 1e4, "m": 1e6}
_S = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9, "min": 60.0, "h": 3600.0}
#: ImageJ's time units (its ``tunit``, written only when not "sec"): seconds per unit.
_IMAGEJ_S = _S | {"sec": 1.0, "second": 1.0, "seconds": 1.0, "msec": 1e-3, "\\u00B5s": 1e-6,
                  "minute": 60.0, "minutes": 60.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0}
#: "2024-01-18 15:36:20.123 +0100" (Micro-Manager's StartTime), "2024/01/18 15:36:20" (pycromanager)
_DATETIME = re.compile(r"^(\d{4})[-/](\d{2})[-/](\d{2})[T ](\d{2}:\d{2}:\d{2}(?:\.\d+)?)\s*(Z|[+-]\d{2}:?\d{2})?$")


def positive(value: Any) -> float | None:
    """A finite number > 0 (numbers, or their text as Micro-Manager's tags give them), else None."""
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond any float
        return None
    return x if math.isfinite(x) and x > 0 else None


def iso_datetime(value: Any) -> str | None:
    """An acquisition time as OME's ``xsd:dateTime`` (ISO 8601), from the spellings the sources
    use; None for anything else. A time without a UTC offset stays without one (the instrument's
    local time)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if not isinstance(value, str):
        return None
    match = _DATETIME.match(value.strip())
    if match is None:
        return None
    y, mo, d, time, tz = match.groups()
    if tz and tz != "Z" and ":" not in tz:
        tz = tz[:3] + ":" + tz[3:]
    try:
        return datetime.fromisoformat(f"{y}-{mo}-{d}T{time}{tz or ''}").isoformat()
    except ValueError:
        return None


@dataclass(frozen=True)
class AcquisitionMeta:
    """What an OME writer needs to know about an acquisition, checked; None: unknown."""

    pixel_size_um: float | None = None  # a pixel's width (X), and its height unless pixel_size_y_um says
    pixel_size_y_um: float | None = None  # a pixel's height (Y) where it differs; None: square
    interval_ms: float | None = None  # nominal time between time points; 0 or None: unknown
    channel: str | None = None
    acquisition_datetime: str | None = None  # ISO 8601

    @classmethod
    def from_meta(cls, meta: Any) -> AcquisitionMeta:
        """From a frame's protocol ``meta``; values that fail their check are left out."""
        if not isinstance(meta, dict):
            return cls()
        channel = meta.get(CHANNEL)
        return cls(pixel_size_um=positive(meta.get(PIXEL_SIZE_UM, meta.get("PixelSizeUm"))),
                   pixel_size_y_um=positive(meta.get(PIXEL_SIZE_Y_UM)),
                   interval_ms=positive(meta.get(INTERVAL_MS)),
                   channel=channel if isinstance(channel, str) and channel else None,
                   acquisition_datetime=iso_datetime(meta.get(ACQUISITION_DATETIME)))

    @classmethod
    def from_micromanager(cls, tags: Any) -> AcquisitionMeta:
        """From Micro-Manager's tags or summary metadata (Java GUI: ``PixelSizeUm``,
        ``StartTime``; pycromanager's engine: ``PixelSize_um``, ``DateAndTime``)."""
        if not isinstance(tags, dict):
            return cls()
        pixel = positive(tags.get("PixelSizeUm", tags.get("PixelSize_um")))
        names = tags.get("ChNames")
        channel = names[0] if isinstance(names, list) and len(names) == 1 else None
        return cls(pixel_size_um=pixel, interval_ms=positive(tags.get("Interval_ms")),
                   channel=str(channel) if channel else None,
                   acquisition_datetime=iso_datetime(tags.get("StartTime", tags.get("DateAndTime"))))

    @classmethod
    def from_tiff(cls, tif: tifffile.TiffFile, series: int = 0) -> AcquisitionMeta:
        """From a TIFF-family file: its OME-XML, else Micro-Manager's summary, else ImageJ's
        metadata and the resolution tags (in cm or µm only: an inch resolution is a scanner's
        DPI, never a pixel size)."""
        found = cls()
        if tif.is_ome and tif.ome_metadata:
            found = found.filled(_from_ome(tif.ome_metadata, series))
        mm = getattr(tif, "micromanager_metadata", None)
        if isinstance(mm, dict):
            found = found.filled(cls.from_micromanager(mm.get("Summary")))
        if tif.is_imagej and isinstance(tif.imagej_metadata, dict):
            ij = tif.imagej_metadata
            # finterval is in ImageJ's time unit, seconds unless it says otherwise; an unknown
            # unit (a "frame") gives no interval rather than a wrong one
            finterval = positive(ij.get("finterval"))
            per_unit = _IMAGEJ_S.get(str(ij.get("tunit", "sec")).strip())
            interval_ms = positive(finterval * per_unit * 1e3) if finterval and per_unit else None
            found = found.filled(cls(interval_ms=interval_ms))
            scale = _UM.get(str(ij.get("unit", "")).strip())
            found = found.filled(_resolution(tif, scale))
        return found.filled(_resolution(tif, None))

    def filled(self, other: AcquisitionMeta) -> AcquisitionMeta:
        """These values, with ``other``'s where these are unknown; a pixel's height always from
        the source of its width (one source's square pixel is never given another's height)."""
        values = {f.name: getattr(self, f.name) if getattr(self, f.name) is not None else getattr(other, f.name)
                  for f in fields(self)}
        values["pixel_size_y_um"] = (self if self.pixel_size_um is not None else other).pixel_size_y_um
        return AcquisitionMeta(**values)

    def to_meta(self) -> dict[str, Any]:
        """The protocol ``meta`` keys of the values known (the height only where not the width)."""
        height = self.pixel_size_y_um if self.pixel_size_y_um != self.pixel_size_um else None
        return {k: v for k, v in ((PIXEL_SIZE_UM, self.pixel_size_um), (PIXEL_SIZE_Y_UM, height),
                                  (INTERVAL_MS, self.interval_ms), (CHANNEL, self.channel),
                                  (ACQUISITION_DATETIME, self.acquisition_datetime))
                if v is not None}

    def ome(self, *, time_increment_s: float | None = None) -> dict[str, Any]:
        """``tifffile.OmeXml.addimage`` keyword arguments (the channel name is the caller's: it
        goes with the channel's colour). ``time_increment_s`` is used when no interval is known."""
        out: dict[str, Any] = {}
        if self.pixel_size_um:
            out.update(PhysicalSizeX=self.pixel_size_um, PhysicalSizeXUnit="µm",
                       PhysicalSizeY=self.pixel_size_y_um or self.pixel_size_um, PhysicalSizeYUnit="µm")
        increment = self.interval_ms / 1e3 if self.interval_ms else time_increment_s
        if increment:
            out.update(TimeIncrement=round(increment, 9), TimeIncrementUnit="s")
        if self.acquisition_datetime:
            out["AcquisitionDate"] = self.acquisition_datetime
        return out


def local_name(element: ET.Element) -> str:
    """An XML element's name without its namespace (``{http://...OME/2016-06}Image`` -> ``Image``)."""
    return element.tag.rpartition("}")[2]


def _from_ome(xml: str, series: int) -> AcquisitionMeta:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return AcquisitionMeta()
    images = [el for el in root if local_name(el) == "Image"]
    if series >= len(images):
        return AcquisitionMeta()
    image = images[series]
    pixels = next((el for el in image if local_name(el) == "Pixels"), None)
    date = next((el.text for el in image if local_name(el) == "AcquisitionDate"), None)
    if pixels is None:
        return AcquisitionMeta(acquisition_datetime=iso_datetime(date))
    a = pixels.attrib

    def physical_size(axis: str) -> float | None:
        size, unit = positive(a.get(f"PhysicalSize{axis}")), _UM.get(a.get(f"PhysicalSize{axis}Unit", "µm"))
        return positive(size * unit) if size and unit else None  # huge × its unit: inf, ignored

    width = physical_size("X")
    increment = positive(a.get("TimeIncrement"))
    t_unit = _S.get(a.get("TimeIncrementUnit", "s"))
    channels = [el.attrib.get("Name") for el in pixels if local_name(el) == "Channel"]
    return AcquisitionMeta(
        pixel_size_um=width, pixel_size_y_um=physical_size("Y") if width else None,
        interval_ms=positive(increment * t_unit * 1e3) if increment and t_unit else None,
        channel=channels[0] if len(channels) == 1 and channels[0] else None,
        acquisition_datetime=iso_datetime(date))


def _resolution(tif: tifffile.TiffFile, unit_um: float | None) -> AcquisitionMeta:
    """The pixel size from the first page's X and YResolution: in ``unit_um`` (ImageJ's unit) when
    given, else by the ResolutionUnit tag when it is centimetres (TIFF's only metric unit)."""
    tags = tif.pages.first.tags
    if unit_um is None:
        unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
        if unit != 3:  # 3: centimetre; 2 (inch) and 1 (none) say nothing of the sample; nor does junk
            return AcquisitionMeta()
        unit_um = 1e4

    def size(tag: str) -> float | None:
        value = tags[tag].value if tag in tags else None
        if not isinstance(value, tuple) or len(value) != 2:
            return None  # not one RATIONAL (a SHORT, several values): a malformed tag is ignored
        num, den = (positive(v) for v in value)
        return positive(unit_um * den / num) if num and den else None

    width = size("XResolution")
    return AcquisitionMeta(pixel_size_um=width, pixel_size_y_um=size("YResolution") if width else None)
