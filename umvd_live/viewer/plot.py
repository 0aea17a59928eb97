"""A small live line plot drawn with QPainter: the region's mean trace, raw and denoised.

Why QPainter: two short polylines at 2 Hz need no plotting library, and a second OpenGL canvas
(vispy) beside napari's would cost more than it draws.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

RAW_COLOR = QColor(170, 170, 170)
DENOISED_COLOR = QColor(80, 220, 120)


class TracePlot(QWidget):
    """Plots (t, value) series over the last ``span_s`` seconds; the y range follows the data."""

    def __init__(self, span_s: float = 10.0, parent: QWidget | None = None):
        super().__init__(parent)
        self.span_s = span_s
        self.series: dict[str, tuple[np.ndarray, QColor]] = {}
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)

    def set_series(self, name: str, points: np.ndarray, color: QColor) -> None:
        """``points``: (N, 2) array of (seconds relative to now, value)."""
        self.series[name] = (np.asarray(points, np.float64).reshape(-1, 2), color)
        self.update()

    def clear(self) -> None:
        self.series.clear()
        self.update()

    def point_count(self) -> int:
        return sum(len(p) for p, _ in self.series.values())

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        painter.fillRect(self.rect(), QColor(20, 22, 26))
        fm = painter.fontMetrics()
        left, top, bottom = fm.horizontalAdvance("000000") + 6, fm.height() + 4, fm.height() + 4
        plot = QRectF(left, top, max(10, self.width() - left - 6), max(10, self.height() - top - bottom))
        painter.setPen(QPen(QColor(90, 90, 90)))
        painter.drawRect(plot)
        painter.setPen(QColor(200, 200, 200))
        painter.drawText(QPointF(plot.left(), plot.bottom() + fm.ascent() + 2), f"-{self.span_s:g} s")
        painter.drawText(QPointF(plot.right() - fm.horizontalAdvance("now"), plot.bottom() + fm.ascent() + 2), "now")
        x = 4.0
        for name, (_, color) in self.series.items():
            painter.setPen(color)
            painter.drawText(QPointF(plot.left() + x, fm.ascent() + 1), name)
            x += fm.horizontalAdvance(name) + 14
        values = [p[:, 1] for p, _ in self.series.values() if len(p)]
        if not values:
            painter.setPen(QColor(150, 150, 150))
            painter.drawText(plot, Qt.AlignCenter, "no frames yet")
            painter.end()
            return
        allv = np.concatenate(values)
        allv = allv[np.isfinite(allv)]
        lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
        if hi - lo < 1e-9:
            lo, hi = lo - 1.0, hi + 1.0
        pad = 0.05 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        painter.setPen(QColor(200, 200, 200))
        painter.drawText(QPointF(2, plot.top() + fm.ascent()), f"{hi:.4g}")
        painter.drawText(QPointF(2, plot.bottom()), f"{lo:.4g}")
        for points, color in self.series.values():
            pts = points[np.isfinite(points[:, 1]) & (points[:, 0] >= -self.span_s)]
            if len(pts) < 2:
                continue
            xs = plot.left() + (pts[:, 0] + self.span_s) / self.span_s * plot.width()
            ys = plot.bottom() - (pts[:, 1] - lo) / (hi - lo) * plot.height()
            path = QPainterPath(QPointF(xs[0], ys[0]))
            for xi, yi in zip(xs[1:], ys[1:]):
                path.lineTo(QPointF(xi, yi))
            painter.setPen(QPen(color, 1.5))
            painter.drawPath(path)
        painter.end()
