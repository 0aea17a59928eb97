"""A small live line plot drawn with QPainter: the region's mean trace, raw and denoised, of each
channel of the shown site.

Why QPainter: a few short polylines at 2 Hz need no plotting library, and a second OpenGL canvas
(vispy) beside napari's would cost more than it draws. Why one lane per channel, each with its
own y range: channels differ in brightness by orders of magnitude, and on one shared axis the dim
channel's trace would be a flat line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from qtpy.QtCore import QPointF, QRectF, QSize, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

RAW_COLOR = QColor(170, 170, 170)
DENOISED_COLOR = QColor(80, 220, 120)
LANE_HEIGHT = 75  # pixels each further lane adds


@dataclass(frozen=True)
class TraceSeries:
    name: str  # "raw", "denoised"
    points: np.ndarray  # (N, 2): seconds relative to now, value
    color: QColor


@dataclass(frozen=True)
class TraceLane:
    """One channel's series, drawn on their own y range; ``label`` names the lane ('' for none)."""

    label: str
    color: QColor
    series: tuple[TraceSeries, ...]


class TracePlot(QWidget):
    """Plots (t, value) series over the last ``span_s`` seconds, in lanes stacked top to bottom;
    each lane's y range follows its data. It keeps only the points of that window: none older,
    and none later than now (another acquisition's, whose clock ran further), which would stretch
    the y range."""

    def __init__(self, span_s: float = 10.0, parent: QWidget | None = None):
        super().__init__(parent)
        self.span_s = span_s
        self.lanes: list[TraceLane] = []
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(300, 110 + LANE_HEIGHT * max(0, len(self.lanes) - 1))

    def set_lanes(self, lanes: list[TraceLane]) -> None:
        resized = len(lanes) != len(self.lanes)
        self.lanes = [TraceLane(lane.label, lane.color, tuple(
            TraceSeries(s.name, self._in_window(s.points), s.color) for s in lane.series)) for lane in lanes]
        if resized:
            self.setMinimumHeight(self.sizeHint().height())
            self.updateGeometry()
        self.update()

    def set_series(self, name: str, points: np.ndarray, color: QColor) -> None:
        """One series of a single, unlabelled lane; ``points``: (N, 2) of (seconds relative to now, value)."""
        lane = self.lanes[0] if len(self.lanes) == 1 and not self.lanes[0].label else TraceLane("", color, ())
        series = [s for s in lane.series if s.name != name] + [TraceSeries(name, points, color)]
        self.set_lanes([TraceLane("", lane.color, tuple(series))])

    def _in_window(self, points: np.ndarray) -> np.ndarray:
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        return pts[(pts[:, 0] >= -self.span_s) & (pts[:, 0] <= 0.0)]

    def clear(self) -> None:
        self.set_lanes([])

    def point_count(self) -> int:
        return sum(len(s.points) for lane in self.lanes for s in lane.series)

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        painter.fillRect(self.rect(), QColor(20, 22, 26))
        fm = painter.fontMetrics()
        ranges = [_value_range(lane) for lane in self.lanes]
        widest = max((fm.horizontalAdvance(_tick(v)) for r in ranges for v in r), default=0)
        left, top, bottom = max(widest, fm.horizontalAdvance("-10 s")) + 6, fm.height() + 4, fm.height() + 4
        area = QRectF(left, top, max(10, self.width() - left - 6), max(10, self.height() - top - bottom))
        painter.setPen(QColor(200, 200, 200))
        painter.drawText(QPointF(area.left(), area.bottom() + fm.ascent() + 2), f"-{self.span_s:g} s")
        painter.drawText(QPointF(area.right() - fm.horizontalAdvance("now"), area.bottom() + fm.ascent() + 2), "now")
        self._draw_legend(painter, area.left())
        if not any(len(s.points) for lane in self.lanes for s in lane.series):
            painter.setPen(QPen(QColor(90, 90, 90)))
            painter.drawRect(area)
            painter.setPen(QColor(150, 150, 150))
            painter.drawText(area, Qt.AlignmentFlag.AlignCenter, "no frames yet")
            painter.end()
            return
        gap = 6.0
        height = (area.height() - gap * (len(self.lanes) - 1)) / len(self.lanes)
        for n, (lane, (lo, hi)) in enumerate(zip(self.lanes, ranges)):
            rect = QRectF(area.left(), area.top() + n * (height + gap), area.width(), max(10.0, height))
            self._draw_lane(painter, rect, lane, lo, hi)
        painter.end()

    def _draw_legend(self, painter: QPainter, x: float) -> None:
        fm = painter.fontMetrics()
        names: dict[str, QColor] = {}
        for lane in self.lanes:
            for s in lane.series:
                names.setdefault(s.name, s.color)
        coloured = len(self.lanes) > 1  # denoised lines then take their channel's colour
        for name, color in names.items():
            text = f"{name} (channel colour)" if coloured and name != "raw" else name
            painter.setPen(color if not coloured or name == "raw" else QColor(220, 220, 220))
            painter.drawText(QPointF(x, fm.ascent() + 1), text)
            x += fm.horizontalAdvance(text) + 14

    def _draw_lane(self, painter: QPainter, rect: QRectF, lane: TraceLane, lo: float, hi: float) -> None:
        fm = painter.fontMetrics()
        painter.setPen(QPen(QColor(90, 90, 90)))
        painter.drawRect(rect)
        painter.setPen(QColor(200, 200, 200))
        painter.drawText(QPointF(2, rect.top() + fm.ascent()), _tick(hi))
        painter.drawText(QPointF(2, rect.bottom()), _tick(lo))
        for s in lane.series:
            pts = s.points[np.isfinite(s.points[:, 1])]
            if len(pts) < 2:
                continue
            xs = rect.left() + (pts[:, 0] + self.span_s) / self.span_s * rect.width()
            ys = rect.bottom() - (pts[:, 1] - lo) / (hi - lo) * rect.height()
            path = QPainterPath(QPointF(xs[0], ys[0]))
            for xi, yi in zip(xs[1:], ys[1:]):
                path.lineTo(QPointF(xi, yi))
            painter.setPen(QPen(s.color, 1.5))
            painter.drawPath(path)
        if lane.label:  # on a dark box, over the lines
            box = QRectF(rect.left() + 2, rect.top() + 2, fm.horizontalAdvance(lane.label) + 6, fm.height())
            painter.fillRect(box, QColor(20, 22, 26, 200))
            painter.setPen(lane.color)
            painter.drawText(QPointF(box.left() + 3, box.top() + fm.ascent()), lane.label)


def _value_range(lane: TraceLane) -> tuple[float, float]:
    """The lane's y range: its finite values, padded by 5 %."""
    values = [s.points[:, 1] for s in lane.series if len(s.points)]
    allv = np.concatenate(values) if values else np.empty(0)
    allv = allv[np.isfinite(allv)]
    lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 1.0, hi + 1.0
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _tick(value: float) -> str:
    """A y-axis label short enough for the margin: 12070, 3.91, 1.2e+06."""
    return f"{value:.5g}" if abs(value) < 1e5 else f"{value:.2g}"
