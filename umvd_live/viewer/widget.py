"""The napari dock widget: raw beside denoised, the daemon's status, noise figures and controls.

Everything here runs on the GUI thread and only touches napari layers and Qt widgets; the sockets
live in the `SessionWorker` thread. Layers, bottom to top: raw, its region (Shapes), denoised,
the region's mirror. Grid mode with stride 2 puts each image with its region in one cell, raw on
the left; the layer-name overlay labels each cell. The two images share contrast limits, set once
from the data (at the first frame of a stream, or with "Autoscale") and then left alone, so the
display does not flicker; changing one image's limits in napari changes the other's.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from umvd_live.control_client import ControlReply
from umvd_live.viewer.noise import Region
from umvd_live.viewer.plot import DENOISED_COLOR, RAW_COLOR, TracePlot
from umvd_live.viewer.session import CommandFailed, FramePair, LiveStats, ViewerConfig
from umvd_live.viewer.worker import SessionWorker

LAYOUTS = ("side by side", "raw only", "denoised only")
REGION_COLOR = "yellow"


def _fmt(value: Any, spec: str = ".1f", unit: str = "") -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:{spec}}{unit}"


def rectangle_region(vertices: np.ndarray) -> Region:
    """The pixel box (row0, row1, col0, col1) around a shape's (row, col) vertices."""
    v = np.asarray(vertices, np.float64)[:, -2:]
    r0, c0 = np.floor(v.min(axis=0)).astype(int)
    r1, c1 = np.ceil(v.max(axis=0)).astype(int)
    return (int(r0), int(r1), int(c0), int(c1))


def robust_limits(image: np.ndarray) -> tuple[float, float]:
    """Contrast limits that ignore the few darkest and brightest pixels (noise, hot pixels)."""
    lo, hi = np.percentile(np.asarray(image, np.float32), [0.5, 99.8])
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


class LiveViewerWidget(QWidget):
    """Subscribes to `umvd-live serve` and shows one stream live; see docs/viewer.md."""

    def __init__(self, napari_viewer, config: ViewerConfig | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.config = config or ViewerConfig()
        self.worker: SessionWorker | None = None
        self.raw_layer = self.denoised_layer = None
        self.region_layer = self.mirror_layer = None
        self.layer_stream: str | None = None
        self.last_pair: FramePair | None = None
        self.last_stats: LiveStats | None = None
        self.frames_shown = 0
        self.command_log: list[ControlReply | CommandFailed] = []
        self._shown_at: deque[float] = deque()
        self._needs_autoscale = True
        self._syncing = False
        self._chosen_stream: str | None = self.config.stream
        self._build_ui()
        self.connect_daemon(self.config)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.close_session)

    # ---- UI ------------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        outer.addWidget(scroll)
        panel = QWidget()
        scroll.setWidget(panel)
        root = QVBoxLayout(panel)
        root.setContentsMargins(4, 4, 4, 4)
        self.setMinimumWidth(380)
        self.setMaximumWidth(520)  # leave the canvas most of the window

        box = QGroupBox("Daemon")
        form = QFormLayout(box)
        self.connection_label = QLabel("connecting…")
        self.connection_label.setWordWrap(True)
        form.addRow(self.connection_label)
        self.output_edit = QLineEdit(self.config.output)
        self.control_edit = QLineEdit(self.config.control)
        self.connect_button = QPushButton("Connect")
        self.connect_button.clicked.connect(self._reconnect_clicked)
        form.addRow("output", self.output_edit)
        row = QHBoxLayout()
        row.addWidget(self.control_edit)
        row.addWidget(self.connect_button)
        form.addRow("control", row)
        self.stream_combo = QComboBox()
        self.stream_combo.currentTextChanged.connect(self._stream_chosen)
        form.addRow("stream", self.stream_combo)
        row = QHBoxLayout()
        self.layout_combo = QComboBox()
        self.layout_combo.addItems(LAYOUTS)
        self.layout_combo.currentTextChanged.connect(self.set_layout)
        self.autoscale_button = QPushButton("Autoscale")
        self.autoscale_button.setToolTip("set both images' contrast limits from the recent frames")
        self.autoscale_button.clicked.connect(self.autoscale)
        row.addWidget(self.layout_combo)
        row.addWidget(self.autoscale_button)
        form.addRow("view", row)
        root.addWidget(box)

        box = QGroupBox("Model")
        form = QFormLayout(box)
        self.state_label = QLabel("–")
        self.warmup_bar = QProgressBar()
        self.warmup_bar.setRange(0, 100)
        self.warmup_bar.setFormat("warm start %p%")
        form.addRow("state", self.state_label)
        form.addRow(self.warmup_bar)
        self.steps_label = QLabel("–")
        form.addRow("training", self.steps_label)
        row = QHBoxLayout()
        self.pause_button = QPushButton("Pause training")
        self.pause_button.clicked.connect(self._pause_clicked)
        self.reset_button = QPushButton("Reset model")
        self.reset_button.clicked.connect(lambda: self._command("reset"))
        self.save_button = QPushButton("Save model")
        self.save_button.clicked.connect(self._save_clicked)
        for b in (self.pause_button, self.reset_button, self.save_button):
            row.addWidget(b)
        form.addRow(row)
        root.addWidget(box)

        box = QGroupBox("Stream")
        form = QFormLayout(box)
        self.fps_label = QLabel("–")
        self.latency_label = QLabel("–")
        self.skipped_label = QLabel("–")
        form.addRow("frames/s", self.fps_label)
        form.addRow("latency", self.latency_label)
        form.addRow("lost", self.skipped_label)
        self.fps_label.setToolTip("in / out: the daemon's input and denoised-output rates (last 5 s); "
                                  "received: raw frames reaching this viewer; shown: frames drawn here")
        self.latency_label.setToolTip("input taken off the daemon's socket → denoised frame published; "
                                      "includes N//2 frame intervals by nature (the window's later frames)")
        self.skipped_label.setToolTip("skipped: frames the daemon's preview did not denoise (it was behind); "
                                      "dropped: frames lost before the daemon (gaps in seq); not shown: "
                                      "frames this viewer replaced by newer ones before drawing them")
        root.addWidget(box)

        box = QGroupBox("Raw noise (Poisson-Gaussian fit)")
        form = QFormLayout(box)
        self.photons_label = QLabel("–")
        self.photons_label.setStyleSheet("font-size: 15pt; font-weight: bold;")
        form.addRow("photons/px/frame", self.photons_label)
        self.fit_label = QLabel("–")
        self.fit_label.setToolTip(
            "noise variance = gain × (mean − offset) + read noise², fitted over the last frames binned "
            "by intensity. Without a known offset, the offset is where the line reaches zero variance: "
            "read_noise²/gain below the true one, so the photon count is high by (read_noise/gain)².")
        form.addRow("fit", self.fit_label)
        self.offset_spin = QDoubleSpinBox()
        self.offset_spin.setRange(-1.0, 1e6)
        self.offset_spin.setDecimals(1)
        self.offset_spin.setSpecialValueText("from the fit")
        self.offset_spin.setValue(-1.0)
        self.offset_spin.setToolTip("the detector's offset in ADU (from a dark frame), if known")
        self.offset_spin.valueChanged.connect(self._offset_changed)
        form.addRow("offset (ADU)", self.offset_spin)
        root.addWidget(box)

        box = QGroupBox("Region")
        form = QFormLayout(box)
        hint = QLabel("draw a rectangle on the 'region' layer (none: the whole frame)")
        hint.setStyleSheet("color: #999;")
        form.addRow(hint)
        self.snr_label = QLabel("–")
        form.addRow("SNR", self.snr_label)
        self.trace_plot = TracePlot(self.config.trace_seconds)
        form.addRow(self.trace_plot)
        root.addWidget(box)

        box = QGroupBox("Recording (OME-TIFF, daemon's output directory)")
        form = QFormLayout(box)
        row = QHBoxLayout()
        self.record_edit = QLineEdit()
        self.record_edit.setPlaceholderText("live-<date>-<time>.ome.tif")
        self.record_raw = QCheckBox("with raw")
        self.record_button = QPushButton("Start recording")
        self.record_button.clicked.connect(self._record_clicked)
        row.addWidget(self.record_edit)
        row.addWidget(self.record_raw)
        form.addRow(row)
        form.addRow(self.record_button)
        self.record_label = QLabel("not recording")
        self.record_label.setWordWrap(True)
        form.addRow(self.record_label)
        root.addWidget(box)

        self.message_label = QLabel("")
        self.message_label.setWordWrap(True)
        root.addWidget(self.message_label)
        root.addStretch(1)
        for label in self.findChildren(QLabel):
            label.setWordWrap(True)

    # ---- connection ----------------------------------------------------------------------------
    def connect_daemon(self, config: ViewerConfig) -> None:
        """(Re)start the worker on ``config``'s endpoints."""
        self.close_session()
        self.config = config
        self.worker = SessionWorker(config)
        self.worker.frames_ready.connect(self._on_frames)
        self.worker.stats_ready.connect(self._on_stats)
        self.worker.command_done.connect(self._on_command_done)
        worker = self.worker
        self.destroyed.connect(lambda *_: worker.stop())  # the dock closed: stop reading the sockets
        self._push_region()
        self.worker.start()
        self.connection_label.setText(f"connecting to {config.output} …")

    def close_session(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        self.close_session()
        super().closeEvent(event)

    def _reconnect_clicked(self) -> None:
        self.connect_daemon(dataclasses.replace(
            self.config, output=self.output_edit.text().strip(), control=self.control_edit.text().strip(),
            stream=self.selected_stream))

    @property
    def selected_stream(self) -> str | None:
        return self.stream_combo.currentText() or None

    def _stream_chosen(self, name: str) -> None:
        if self.worker is not None and name:
            self._chosen_stream = name
            self.worker.session.select_stream(name)

    # ---- images --------------------------------------------------------------------------------
    def _layer_names(self, stream: str) -> tuple[str, str]:
        return f"raw · {stream}", f"denoised · {stream}"

    def _ensure_layers(self, stream: str, shape: tuple[int, int], dtype: np.dtype) -> None:
        raw_name, den_name = self._layer_names(stream)
        mine = (self.raw_layer, self.region_layer, self.denoised_layer, self.mirror_layer)
        if any(layer is None or layer not in self.viewer.layers for layer in mine):
            # First frame, or the user deleted one of the four: start the set afresh, in order.
            for layer in mine:
                if layer is not None and layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
            self._needs_autoscale = True
            zeros = np.zeros(shape, dtype)
            self.raw_layer = self.viewer.add_image(zeros, name=raw_name, colormap="gray")
            self.region_layer = self.viewer.add_shapes(
                name="region", ndim=2, edge_color=REGION_COLOR, face_color="transparent", edge_width=1)
            self.denoised_layer = self.viewer.add_image(zeros.astype(np.float32), name=den_name, colormap="gray")
            self.mirror_layer = self.viewer.add_shapes(
                name="region (on denoised)", ndim=2, edge_color=REGION_COLOR, face_color="transparent",
                edge_width=1)
            for layer in (self.raw_layer, self.denoised_layer):
                overlay = getattr(layer, "name_overlay", None)  # napari >= 0.6: a label per grid cell
                if overlay is not None:
                    overlay.visible = True
                    overlay.font_size = 12
                layer.events.contrast_limits.connect(self._link_contrast)
            for layer in (self.region_layer, self.mirror_layer):
                layer.events.data.connect(self._region_edited)
            self.grid.stride = 2
            self.set_layout(self.layout_combo.currentText())
            self.viewer.reset_view()
            self.viewer.layers.selection.active = self.region_layer
            self.region_layer.mode = "add_rectangle"
            if self.config.region is not None:
                self.set_region(self.config.region)
            self.layer_stream = stream
        if stream != self.layer_stream:
            self.raw_layer.name, self.denoised_layer.name = raw_name, den_name
            self.layer_stream = stream
            self._needs_autoscale = True

    def _on_frames(self) -> None:
        pair = self.worker.frames.take() if self.worker is not None else None
        if pair is None or (pair.raw is None and pair.denoised is None):
            return
        first = pair.raw if pair.raw is not None else pair.denoised
        self._ensure_layers(pair.stream, first.shape, first.dtype)
        reset_view = False
        if pair.raw is not None:
            reset_view = self.raw_layer.data.shape != pair.raw.shape
            self._needs_autoscale |= reset_view
            self.raw_layer.data = pair.raw
        if pair.denoised is not None:
            self.denoised_layer.data = pair.denoised
        elif reset_view:  # a new frame size: the old denoised frame no longer matches
            self.denoised_layer.data = np.zeros(pair.raw.shape, np.float32)
        if reset_view:
            self.viewer.reset_view()
        if self._needs_autoscale:
            self.autoscale()  # at once from the raw frame, again once the raw mean is there
            have_mean = self.last_stats is not None and self.last_stats.raw_mean is not None
            self._needs_autoscale = not (have_mean and self.last_stats.stream == pair.stream)
        self.last_pair = pair
        self.frames_shown += 1
        now = time.monotonic()
        self._shown_at.append(now)
        while self._shown_at and self._shown_at[0] < now - 2.0:
            self._shown_at.popleft()

    @property
    def grid(self):
        """napari's grid settings: ``viewer.canvas.grid`` since napari 0.9, ``viewer.grid`` before."""
        canvas = getattr(self.viewer, "canvas", None)
        return canvas.grid if canvas is not None and hasattr(canvas, "grid") else self.viewer.grid

    @property
    def contrast_settled(self) -> bool:
        """True once the first frames' automatic contrast is set; only Autoscale changes it then."""
        return self.raw_layer is not None and not self._needs_autoscale

    def autoscale(self) -> None:
        """Set both images' contrast limits from the recent raw frames' temporal mean.

        The mean of the last frames is a noise-reduced picture that does not depend on how far
        the model has come, so the limits suit the denoised image and clip the raw noise a little.
        Before there is one, the newest raw frame is used.
        """
        if self.raw_layer is None:
            return
        stats = self.last_stats
        ref = stats.raw_mean if stats is not None and stats.stream == self.layer_stream else None
        if ref is None or ref.shape != self.raw_layer.data.shape:
            ref = self.raw_layer.data
        lo, hi = robust_limits(ref)
        span_lo = min(lo, float(np.min(self.raw_layer.data)), float(np.min(self.denoised_layer.data)))
        span_hi = max(hi, float(np.max(self.raw_layer.data)), float(np.max(self.denoised_layer.data)))
        self._syncing = True
        try:
            for layer in (self.raw_layer, self.denoised_layer):
                layer.contrast_limits_range = (span_lo, max(span_hi, span_lo + 1.0))
                layer.contrast_limits = (lo, hi)
        finally:
            self._syncing = False
        self._needs_autoscale = False

    def _link_contrast(self, event) -> None:
        if self._syncing or self.raw_layer is None:
            return
        source = event.source
        other = self.denoised_layer if source is self.raw_layer else self.raw_layer
        lo, hi = source.contrast_limits
        self._syncing = True
        try:
            rlo, rhi = other.contrast_limits_range
            other.contrast_limits_range = (min(rlo, lo), max(rhi, hi))
            other.contrast_limits = (lo, hi)
        finally:
            self._syncing = False

    def set_layout(self, layout: str) -> None:
        """Raw and denoised side by side (grid), or one of them alone (toggle with the combo)."""
        if self.layout_combo.currentText() != layout:
            self.layout_combo.setCurrentText(layout)
            return
        if self.raw_layer is None:
            return
        side_by_side = layout == LAYOUTS[0]
        self.raw_layer.visible = self.region_layer.visible = layout != LAYOUTS[2]
        self.denoised_layer.visible = self.mirror_layer.visible = layout != LAYOUTS[1]
        self.grid.enabled = side_by_side
        self.viewer.reset_view()

    # ---- region --------------------------------------------------------------------------------
    def _region_edited(self, event) -> None:
        # Act once an edit is complete (added/changed/removed, not the -ing events), and after
        # napari's own handler of the mouse event has finished with the layer.
        action = str(getattr(event, "action", "changed"))
        if self._syncing or action not in ("added", "changed", "removed"):
            return
        QTimer.singleShot(0, lambda source=event.source: self._sync_region(source))

    def _sync_region(self, source) -> None:
        """One region: keep the newest rectangle only, and show it on both images."""
        other = self.mirror_layer if source is self.region_layer else self.region_layer
        data = [np.asarray(d) for d in source.data]
        self._syncing = True
        try:
            if len(data) > 1:
                source.data = data[-1:]
                source.shape_type = ["rectangle"]
            other.data = [d.copy() for d in data[-1:]]
            for layer in (self.region_layer, self.mirror_layer):
                if len(layer.data):
                    layer.shape_type = ["rectangle"]
        finally:
            self._syncing = False
        self._push_region()

    def current_region(self) -> Region | None:
        if self.region_layer is None or not len(self.region_layer.data):
            return None
        return rectangle_region(self.region_layer.data[-1])

    def set_region(self, region: Region | None) -> None:
        """Draw the region programmatically (row0, row1, col0, col1); None removes it."""
        if self.region_layer is None:
            raise RuntimeError("no frames yet: the region layer appears with the first frame")
        if region is None:
            self.region_layer.data = []
        else:
            r0, r1, c0, c1 = region
            self.region_layer.add_rectangles(np.array([[r0, c0], [r1, c1]], np.float64))

    def _push_region(self) -> None:
        if self.worker is not None:
            self.worker.session.set_region(self.current_region())

    def _offset_changed(self, value: float) -> None:
        if self.worker is not None:
            self.worker.session.set_offset(None if value < 0 else float(value))

    # ---- status --------------------------------------------------------------------------------
    def _on_stats(self) -> None:
        stats = self.worker.stats.take() if self.worker is not None else None
        if stats is None:
            return
        self.last_stats = stats
        if stats.connected:
            self.connection_label.setText(f"<span style='color:#5d5'>● connected</span> to {self.config.output}")
        else:
            why = stats.error or "no reply yet"
            self.connection_label.setText(
                f"<span style='color:#f55'>● daemon not reachable</span> at {self.config.control} "
                f"({why}); reconnecting by itself")
        self._update_streams(stats)
        self._update_model(stats)
        self._update_flow(stats)
        self._update_noise(stats)
        self._update_recording(stats)

    def _update_streams(self, stats: LiveStats) -> None:
        items = [self.stream_combo.itemText(i) for i in range(self.stream_combo.count())]
        target = self._chosen_stream or stats.stream  # the user's choice wins over a stale report
        self.stream_combo.blockSignals(True)
        try:
            if list(stats.streams) != items:
                self.stream_combo.clear()
                self.stream_combo.addItems(list(stats.streams))
            if target and self.stream_combo.currentText() != target:
                self.stream_combo.setCurrentText(target)
        finally:
            self.stream_combo.blockSignals(False)

    def _update_model(self, stats: LiveStats) -> None:
        s = stats.stream_status
        if s is None:
            self.state_label.setText("waiting for the stream" if stats.connected else "–")
            return
        state, progress = s.get("state", "?"), float(s.get("warmup_progress") or 0.0)
        paused = bool(s.get("training_paused"))
        text = {"warmup": "warming up (denoised = temporal mean until live)", "live": "live",
                "idle": "idle"}.get(state, state)
        self.state_label.setText(text + (" · training paused" if paused else ""))
        self.warmup_bar.setValue(round(100 * (1.0 if state == "live" else progress)))
        self.warmup_bar.setFormat("live" if state == "live" else "warm start %p%")
        steps_per_s = (s.get("engine") or {}).get("train_steps_per_s")
        self.steps_label.setText(
            f"step {s.get('model_step', 0)} · loss {_fmt(s.get('loss'), '.4g')}"
            + (f" · {_fmt(steps_per_s, '.1f')} steps/s" if steps_per_s is not None else "")
            + f" · resets {s.get('resets', 0)}")
        self.pause_button.setText("Resume training" if paused else "Pause training")

    def _update_flow(self, stats: LiveStats) -> None:
        s = stats.stream_status or {}
        now = time.monotonic()
        shown = (len(self._shown_at) - 1) / (now - self._shown_at[0]) if len(self._shown_at) > 1 else 0.0
        self.fps_label.setText(
            f"in {_fmt(s.get('fps_in'))} · out {_fmt(s.get('fps_out'))} · "
            f"received {_fmt(stats.received_fps)} · shown {_fmt(shown)}")
        header = self.last_pair.denoised_header if self.last_pair is not None else None
        lat = s.get("latency_ms") or {}
        self.latency_label.setText(
            f"{_fmt((header or {}).get('latency_ms'), '.0f', ' ms')} now · p50 {_fmt(lat.get('p50'), '.0f')} · "
            f"p99 {_fmt(lat.get('p99'), '.0f')} ms")
        self.skipped_label.setText(
            f"skipped {s.get('skipped', '–')} · dropped {s.get('drops', '–')} · "
            f"not shown {stats.superseded_total}")

    def _update_noise(self, stats: LiveStats) -> None:
        fit = stats.noise
        if fit is None or not fit.valid:
            self.photons_label.setText("–")
            self.fit_label.setText("collecting frames…" if fit is None else "no noise to fit")
        else:
            self.photons_label.setText(f"{fit.photons:.3g}")
            self.fit_label.setText(
                f"gain {fit.gain:.4g} ADU/photon · offset {fit.offset:.5g} ADU"
                + (f" · read noise {fit.read_noise:.3g} ADU" if fit.offset_given else " (fit)")
                + f" · R² {fit.r2:.3f} · {fit.frames} frames")
        where = "whole frame" if stats.region is None else (
            f"region {stats.region[1] - stats.region[0]}×{stats.region[3] - stats.region[2]} px")
        self.snr_label.setText(
            f"raw <b>{_fmt(stats.snr_raw, '.2f')}</b> · denoised <b>{_fmt(stats.snr_denoised, '.2f')}</b> "
            f"per pixel ({where})")
        self.trace_plot.set_series("raw", stats.trace_raw, RAW_COLOR)
        self.trace_plot.set_series("denoised", stats.trace_denoised, DENOISED_COLOR)

    def _update_recording(self, stats: LiveStats) -> None:
        rec = (stats.daemon or {}).get("recording")
        if rec:
            files = [p for paths in (rec.get("files") or {}).values() for p in paths]
            self.record_label.setText(
                f"<span style='color:#f55'>● recording</span> {rec.get('frames_written', 0)} frames written"
                f" · behind {_fmt(rec.get('behind_s'), '.1f', ' s')} · {', '.join(files) or '…'}"
                + (f" · error: {rec['error']}" if rec.get("error") else ""))
            self.record_button.setText("Stop recording")
        else:
            self.record_label.setText("not recording")
            self.record_button.setText("Start recording")

    # ---- controls ------------------------------------------------------------------------------
    def _command(self, cmd: str, **fields: Any) -> None:
        if self.worker is None:
            return
        stream = self.selected_stream
        if stream is not None and cmd in ("pause_training", "resume_training", "reset", "save_model"):
            fields.setdefault("stream", stream)
        self.worker.session.submit(cmd, **fields)
        self.message_label.setText(f"{cmd} sent…")

    def _pause_clicked(self) -> None:
        s = self.last_stats.stream_status if self.last_stats is not None else None
        paused = bool(s and s.get("training_paused"))
        self._command("resume_training" if paused else "pause_training")

    def _save_clicked(self) -> None:
        stream = self.selected_stream or "model"
        self._command("save_model", path=f"{stream}-{time.strftime('%Y%m%d-%H%M%S')}.pt")

    def _record_clicked(self) -> None:
        recording = bool(self.last_stats and (self.last_stats.daemon or {}).get("recording"))
        if recording:
            self._command("record_stop")
            return
        name = self.record_edit.text().strip() or f"live-{time.strftime('%Y%m%d-%H%M%S')}.ome.tif"
        self._command("record_start", path=name, raw=self.record_raw.isChecked())

    def _on_command_done(self, result: ControlReply | CommandFailed) -> None:
        self.command_log.append(result)
        if isinstance(result, CommandFailed):
            cmd, ok, detail = result.request.get("cmd"), False, result.error
        else:
            cmd, ok, detail = result.request.get("cmd"), result.ok, result.error
            if ok:
                r = result.reply
                detail = {
                    "record_start": f"recording to {r.get('path')}",
                    "record_stop": "recording stopped",
                    "save_model": f"saved {r.get('path')} (step {r.get('model_step')})",
                    "reset": f"model reset: {', '.join(r.get('streams') or [])}",
                    "pause_training": "training paused",
                    "resume_training": "training resumed",
                }.get(cmd, "done")
        color = "#5d5" if ok else "#f55"
        self.message_label.setText(f"<span style='color:{color}'>{cmd}: {detail}</span>")
        self.message_label.setTextFormat(Qt.RichText)
