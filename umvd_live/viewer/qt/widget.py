"""The napari dock widget: raw beside denoised, the daemon's status, noise figures and controls.

Everything here runs on the GUI thread and only touches napari layers and Qt widgets; the sockets
live in the `SessionWorker` thread. The viewer shows one site (group, position, grid tile, plane)
at a time with all its channels, each channel a layer of its own with its own colormap
(`umvd_live/wire/channel_colors.py`), several channels blended additively. Layers, bottom to top: each channel's raw
image, the region (Shapes), each channel's denoised image, the region's mirror. Grid mode with
stride channels + 1 puts the raw channels with the region in one cell, on the left, and the
denoised ones with the mirror in the other; the layer-name overlays label each cell. A channel's
raw and denoised images share contrast limits, set once from the data (at the first frames of a
group, or with "Autoscale") and then left alone, so the display does not flicker and planes of
one acquisition compare; changing one image's limits in napari changes its partner's.

Position, tile and plane are chosen in combo boxes rather than with napari's dims sliders: the
viewer holds the newest frame of one site, not a stack, and sliders would need every plane of
every channel decoded and kept in (P, Z, H, W) layers, which costs with every frame of every
plane and cannot hold positions of different sizes.
"""

from __future__ import annotations

import dataclasses
import html
import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq
from qtpy.QtCore import QEvent, Qt, QTimer
from qtpy.QtGui import QColor
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

from umvd_live.viewer.noise import Region
from umvd_live.viewer.qt.plot import RAW_COLOR, TraceLane, TracePlot, TraceSeries
from umvd_live.viewer.qt.worker import SessionWorker
from umvd_live.viewer.session import CommandFailed, FramePair, LiveStats, Selection, SiteFrames, ViewerConfig
from umvd_live.viewer.sites import AXIS_NAMES, SITE_AXIS_ORDER, Site, SiteCatalog
from umvd_live.wire.channel_colors import DISPLAY_RGB, channel_colormaps
from umvd_live.wire.control_client import ControlReply

if TYPE_CHECKING:
    from napari.layers import Shapes

LAYOUTS = ("side by side", "raw only", "denoised only")
REGION_COLOR = "yellow"


def _fmt(value: Any, spec: str = ".1f", unit: str = "") -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:{spec}}{unit}"


def rectangle_region(vertices: np.ndarray) -> Region:
    """The pixels (row0, row1, col0, col1; ends excluded) whose centres lie in the box around a
    shape's (row, col) vertices: napari draws pixel i over [i - 0.5, i + 0.5]. A box around no
    pixel centre (a click) takes the pixel under its middle."""
    v = np.asarray(vertices, np.float64)[:, -2:]
    lo, hi = v.min(axis=0), v.max(axis=0)
    first, end = np.ceil(lo).astype(int), np.floor(hi).astype(int) + 1
    empty = end <= first
    first[empty] = np.floor((lo + hi)[empty] / 2 + 0.5).astype(int)
    end[empty] = first[empty] + 1
    return (int(first[0]), int(end[0]), int(first[1]), int(end[1]))


def display_color(colormap: str) -> QColor:
    """The colour that stands for a channel's colormap in labels and traces."""
    return QColor(*DISPLAY_RGB.get(colormap, DISPLAY_RGB["gray"]))


@dataclass
class ChannelLayers:
    """One channel's raw and denoised image layers and what the widget knows about them."""

    label: str  # the channel's name (the stream's for a stream without channel)
    stream: str
    colormap: str
    raw: Any  # napari Image layers
    denoised: Any
    needs_autoscale: bool = True
    drawn_raw: np.ndarray | None = None  # the arrays last handed to the layers
    drawn_denoised: np.ndarray | None = None


def robust_limits(image: np.ndarray) -> tuple[float, float]:
    """Contrast limits that ignore the few darkest and brightest pixels (noise, hot pixels)."""
    lo, hi = np.percentile(np.asarray(image, np.float32), [0.5, 99.8])
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


class LiveViewerWidget(QWidget):
    """Subscribes to `umvd-live serve` and shows one site (all its channels) live; see docs/viewer.md."""

    def __init__(self, napari_viewer, config: ViewerConfig | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.config = config or ViewerConfig()
        self.worker: SessionWorker | None = None
        self.channel_layers: dict[str, ChannelLayers] = {}  # by label, in channel order
        self.region_layer: Shapes | None = None  # with the first frame, as the image layers
        self.mirror_layer: Shapes | None = None
        self.layer_site: Site | None = None
        self.last_frames: SiteFrames | None = None
        self.last_stats: LiveStats | None = None
        self.catalog = SiteCatalog()
        self.frames_shown = 0
        self.command_log: list[ControlReply | CommandFailed] = []
        self._shown_at: deque[float] = deque()
        self._syncing = False
        self._chosen_site: Site | None = None  # the user's choice wins over a stale report
        self._chosen_channel: str | None = None
        self._site_text = ""
        self._fitted_camera: tuple | None = None  # the camera as fit_view left it
        self._undocked = False  # napari removed the dock: the session stopped until docked again
        self._build_ui()
        canvas = getattr(self.viewer, "canvas", None)  # napari >= 0.9: canvas.size is evented
        size_event = getattr(getattr(getattr(canvas, "events", None), "size", None), "connect", None)
        if size_event is not None:
            size_event(self._canvas_resized)
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
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
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
        self.stream_combo.setToolTip("the acquisition (its base stream name); a stream without "
                                     "positions, planes or channels is one of its own")
        self.stream_combo.currentTextChanged.connect(self._stream_chosen)
        # `activated`: the user picked an item, even the one shown (its newest site, say).
        self.stream_combo.activated.connect(lambda i: self._stream_chosen(self.stream_combo.itemText(i)))
        form.addRow("stream", self.stream_combo)
        self.site_row = QWidget()
        row = QHBoxLayout(self.site_row)
        row.setContentsMargins(0, 0, 0, 0)
        self.axis_combos: dict[str, QComboBox] = {}
        self._axis_labels: dict[str, QLabel] = {}
        for axis in SITE_AXIS_ORDER:
            label = QLabel({"p": "position", "g": "tile", "z": "z"}[axis])
            combo = QComboBox()
            combo.setToolTip(f"the {AXIS_NAMES[axis]} shown, with all its channels")
            combo.currentIndexChanged.connect(lambda _i, a=axis: self._axis_chosen(a))
            combo.activated.connect(lambda _i, a=axis: self._axis_chosen(a))
            row.addWidget(label)
            row.addWidget(combo, 1)
            label.hide()
            combo.hide()
            self.axis_combos[axis], self._axis_labels[axis] = combo, label
        self.position_combo, self.grid_combo, self.plane_combo = (self.axis_combos[a] for a in SITE_AXIS_ORDER)
        self._site_row_label = QLabel("site")
        form.addRow(self._site_row_label, self.site_row)
        self.site_row.hide()
        self._site_row_label.hide()
        row = QHBoxLayout()
        self.channel_combo = QComboBox()
        self.channel_combo.setToolTip("the channel whose model, stream figures, noise fit and region SNR "
                                      "this panel shows; the region trace shows every channel")
        self.channel_combo.currentTextChanged.connect(self._channel_chosen)
        self.analysed_label = QLabel("")
        self.analysed_label.setStyleSheet("color: #999;")
        row.addWidget(self.channel_combo, 1)
        row.addWidget(self.analysed_label, 1)
        form.addRow("channel", row)
        row = QHBoxLayout()
        self.layout_combo = QComboBox()
        self.layout_combo.addItems(LAYOUTS)
        self.layout_combo.currentTextChanged.connect(self.set_layout)
        self.autoscale_button = QPushButton("Autoscale")
        self.autoscale_button.setToolTip("set each channel's contrast limits (raw and denoised) from its recent frames")
        self.autoscale_button.clicked.connect(lambda: self.autoscale())
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
                                      "frames (of every channel shown) this viewer replaced by newer ones "
                                      "before drawing them")
        root.addWidget(box)

        self.noise_box = box = QGroupBox("Raw noise (Poisson-Gaussian fit)")
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
        hint = QLabel("draw a rectangle on the 'region' layer (none: the whole frame); the trace "
                      "shows each channel in a lane of its own")
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
        """(Re)start the worker on ``config``'s endpoints. Endpoints ZeroMQ cannot parse (no
        "tcp://") leave the running worker as it is, and the panel says why."""
        try:
            worker = SessionWorker(config)
        except zmq.ZMQError as exc:
            self._show_message(f"cannot connect: {exc}; an endpoint reads tcp://HOST:PORT", ok=False)
            if self.worker is None:
                self.connection_label.setText("not connected")
            return
        self.close_session()
        self.config = config
        self.worker = worker
        worker.frames_ready.connect(self._on_frames)
        worker.stats_ready.connect(self._on_stats)
        worker.command_done.connect(self._on_command_done)
        # The widget deleted while docked (the viewer closed): stop reading the sockets. PyQt holds
        # a worker's method weakly, and the running thread holds its worker: the connection lasts
        # as long as there is a worker to stop, and never keeps a stopped one alive.
        self.destroyed.connect(worker.stop)
        self._push_region()
        worker.start()
        self.connection_label.setText(f"connecting to {config.output} …")

    def close_session(self) -> None:
        """Stop the worker: its thread ends, its sockets close."""
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        self.close_session()
        super().closeEvent(event)

    def remove_layers(self) -> None:
        """Take this widget's layers out of the viewer (the panel was closed: a panel docked
        later builds its own, under the same names)."""
        for layer in self._my_layers():
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self.channel_layers = {}
        self.region_layer = self.mirror_layer = None
        self.layer_site = None
        self.last_frames = None

    def event(self, event: QEvent | None) -> bool:
        """Closing the dock only unparents the widget (napari's `remove_dock_widget`): no close,
        no deletion while Python holds it. Stop the session then, and start it again if the
        widget is docked again."""
        if event is not None and event.type() == QEvent.Type.ParentChange:
            if self.parent() is None and self.worker is not None:
                self.close_session()
                self.remove_layers()
                self._undocked = True
                self.connection_label.setText("not connected: the panel was closed")
            elif self.parent() is not None and self._undocked:
                self._undocked = False
                self.connect_daemon(self.config)
        return super().event(event)

    def _reconnect_clicked(self) -> None:
        # The stream shown stays shown if the user chose it (or its name was given); otherwise
        # the new session follows the acquisition receiving frames.
        pinned = self._chosen_site is not None or self.config.stream is not None
        self.connect_daemon(dataclasses.replace(
            self.config, output=self.output_edit.text().strip(), control=self.control_edit.text().strip(),
            stream=self.selected_stream if pinned else None))

    @property
    def selected_stream(self) -> str | None:
        """The analysed channel's stream: the one the controls act on."""
        if self.last_stats is not None and self.last_stats.stream is not None:
            return self.last_stats.stream
        return self.last_frames.analysed if self.last_frames is not None else self.config.stream

    @property
    def shown_site(self) -> Site | None:
        return self._chosen_site or (self.last_stats.site if self.last_stats is not None else None)

    def choose_site(self, group: str | None = None, coords: Mapping[str, int] | None = None,
                    keep: str | None = None) -> Site | None:
        """Show ``group`` (default: the one shown) at ``coords`` (``{"p": 1, "z": 0}``; the
        other axes stay), or the nearest site the acquisition has; ``keep``: the axis that must
        match. The worker switches; this returns at once."""
        current = self.shown_site
        group = group or (current.group if current is not None else None)
        if group is None:
            return None
        wanted = dict(current.coords) if current is not None and current.group == group else {}
        wanted.update(coords or {})
        live = self.last_stats.live_sites if self.last_stats is not None else ()
        site = self.catalog.nearest_site(group, wanted, keep, live) or Site(group)
        self._chosen_site = site
        if self.worker is not None:
            self.worker.session.select(Selection(site=site, channel=self._chosen_channel))
        self._show_selection()
        return site

    def choose_channel(self, label: str) -> None:
        """Analyse this channel (its name) in the panel, here and at every site that has it."""
        self._chosen_channel = label or None
        if self.worker is not None:
            self.worker.session.select(Selection(site=self.shown_site, channel=self._chosen_channel))

    def _stream_chosen(self, name: str) -> None:
        if name:
            self.choose_site(group=name)

    def _axis_chosen(self, axis: str) -> None:
        combo = self.axis_combos[axis]
        value = combo.currentData()
        if value is not None:
            self.choose_site(coords={axis: int(value)}, keep=axis)

    def _channel_chosen(self, label: str) -> None:
        if label:
            self.choose_channel(label)

    # ---- images --------------------------------------------------------------------------------
    @property
    def last_pair(self) -> FramePair | None:
        """The analysed channel's newest frames on screen."""
        return self.last_frames.analysed_pair if self.last_frames is not None else None

    def _analysed_layers(self) -> ChannelLayers | None:
        stream = self.last_frames.analysed if self.last_frames is not None else None
        mine = [ch for ch in self.channel_layers.values() if ch.stream == stream]
        return mine[0] if mine else next(iter(self.channel_layers.values()), None)

    @property
    def raw_layer(self):
        """The analysed channel's raw image layer (None before the first frame)."""
        ch = self._analysed_layers()
        return ch.raw if ch is not None else None

    @property
    def denoised_layer(self):
        ch = self._analysed_layers()
        return ch.denoised if ch is not None else None

    @staticmethod
    def _layer_names(label: str) -> tuple[str, str]:
        return f"raw · {label}", f"denoised · {label}"

    def _colormaps(self, group: str, labels: list[str]) -> dict[str, str]:
        """Each channel's colormap, assigned over the whole group (a channel keeps its colour at
        every site); a group of one channel is grey."""
        names = self.catalog.group_channels(group) if group in self.catalog.groups() else []
        return channel_colormaps(list(dict.fromkeys(names + labels)))

    def _my_layers(self) -> list:
        images = [layer for ch in self.channel_layers.values() for layer in (ch.raw, ch.denoised)]
        return images + [self.region_layer, self.mirror_layer]

    def _ensure_layers(self, frames: SiteFrames, shape: tuple[int, int], dtype: np.dtype) -> None:
        labels = [p.label for p in frames.pairs]
        colormaps = self._colormaps(frames.site.group, labels)
        mine = self._my_layers()
        intact = bool(self.channel_layers) and all(
            layer is not None and layer in self.viewer.layers for layer in mine)
        current = list(self.channel_layers)
        reordered = current != labels and bool(set(current) & set(labels))  # renaming would clash
        if not intact or len(labels) != len(current) or reordered:
            # First frames, another number of channels, or the user deleted one of the layers:
            # build the set afresh, in order, keeping the region.
            kept = self.region_layer is not None and self.region_layer in self.viewer.layers
            region = self.current_region() if kept else None
            for layer in mine:
                if layer is not None and layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
            self._build_layers(frames, colormaps, shape, dtype)
            if region is None:
                region = self.config.region
            if region is not None:
                self.set_region(region)
        else:
            new_group = self.layer_site is None or self.layer_site.group != frames.site.group
            slots = list(self.channel_layers.values())
            self.channel_layers = {}
            for ch, pair in zip(slots, frames.pairs):
                if ch.label != pair.label or new_group:
                    ch.needs_autoscale = True
                ch.label, ch.stream = pair.label, pair.stream
                ch.raw.name, ch.denoised.name = self._layer_names(pair.label)
                self.channel_layers[pair.label] = ch
            self._apply_colormaps(colormaps)
        self.layer_site = frames.site
        self._show_site_text(frames.site)

    def _build_layers(self, frames: SiteFrames, colormaps: dict[str, str], shape, dtype) -> None:
        zeros = np.zeros(shape, dtype)
        several = len(frames.pairs) > 1
        # Additive blending over the first channel (napari's way with channel stacks): overlaid
        # channels add up, and the first hides whatever the user has beneath.
        blending = ["translucent"] + ["additive"] * (len(frames.pairs) - 1)
        raws = [self.viewer.add_image(zeros, name=self._layer_names(p.label)[0], colormap=colormaps[p.label],
                                      blending=b) for p, b in zip(frames.pairs, blending)]
        self.region_layer = region = self.viewer.add_shapes(
            name="region", ndim=2, edge_color=REGION_COLOR, face_color="transparent", edge_width=1)
        dens = [self.viewer.add_image(zeros.astype(np.float32), name=self._layer_names(p.label)[1],
                                      colormap=colormaps[p.label], blending=b)
                for p, b in zip(frames.pairs, blending)]
        self.mirror_layer = mirror = self.viewer.add_shapes(
            name="region (on denoised)", ndim=2, edge_color=REGION_COLOR, face_color="transparent", edge_width=1)
        self.channel_layers = {
            p.label: ChannelLayers(p.label, p.stream, colormaps[p.label], raw, den)
            for p, raw, den in zip(frames.pairs, raws, dens)}
        for ch in self.channel_layers.values():
            for layer in (ch.raw, ch.denoised):
                overlay = getattr(layer, "name_overlay", None)  # napari >= 0.6: a label per grid cell
                if overlay is not None:
                    overlay.visible = True
                    overlay.font_size = 12
                layer.events.contrast_limits.connect(self._link_contrast)
            self._color_name_overlays(ch, several)
        for layer in (region, mirror):
            layer.events.data.connect(self._region_edited)
        self.grid.stride = len(self.channel_layers) + 1
        self.set_layout(self.layout_combo.currentText())
        self.viewer.layers.selection.active = region
        region.mode = "add_rectangle"

    def _apply_colormaps(self, colormaps: dict[str, str]) -> None:
        """Give the layers their channels' colormaps where they changed (a channel appeared in
        the group, or the layers now show other channels)."""
        several = len(self.channel_layers) > 1
        for ch in self.channel_layers.values():
            cmap = colormaps.get(ch.label, ch.colormap)
            if cmap == ch.colormap and ch.raw.colormap.name == cmap:
                continue
            ch.raw.colormap = ch.denoised.colormap = ch.colormap = cmap
            self._color_name_overlays(ch, several)

    @staticmethod
    def _color_name_overlays(ch: ChannelLayers, several: bool) -> None:
        """Several channels: each layer's name in its channel's colour (one alone: napari's)."""
        color = tuple(c / 255 for c in DISPLAY_RGB.get(ch.colormap, (255, 255, 255))) + (1.0,) if several else None
        for layer in (ch.raw, ch.denoised):
            overlay = getattr(layer, "name_overlay", None)
            if overlay is not None:
                overlay.color = color

    def _show_site_text(self, site: Site) -> None:
        """The site in words on the canvas (when the acquisition has positions or planes)."""
        text = site.describe(self.catalog.position_name(site.group, site.get("p"))) if site.coords else ""
        overlays = getattr(getattr(self.viewer, "canvas", None), "overlays", None)
        overlay = getattr(overlays, "text", None) if overlays is not None else None
        if overlay is None:
            overlay = getattr(self.viewer, "text_overlay", None)  # napari < 0.9
        if overlay is None or (overlay.text and overlay.text != self._site_text) or text == self._site_text:
            return  # the user's own text stays
        overlay.text, overlay.visible, overlay.font_size = text, bool(text), 12
        overlay.position = "bottom_left"  # clear of the cells' layer names (top left of each)
        self._site_text = text

    def _on_frames(self) -> None:
        frames = self.worker.frames.take() if self.worker is not None else None
        if frames is None:
            return
        images = [im for p in frames.pairs for im in (p.raw, p.denoised) if im is not None]
        if not images:
            return
        first = next((p.raw for p in frames.pairs if p.raw is not None), images[0])
        self._ensure_layers(frames, first.shape, first.dtype)
        reset_view = False
        for pair, ch in zip(frames.pairs, self.channel_layers.values()):
            raw, resized = pair.raw, False
            if raw is not None and raw is not ch.drawn_raw:
                resized = ch.raw.data.shape != raw.shape
                ch.raw.data = ch.drawn_raw = raw
            if pair.denoised is not None and pair.denoised is not ch.drawn_denoised:
                ch.denoised.data = ch.drawn_denoised = pair.denoised
            elif raw is not None and resized:  # a new frame size: the old denoised frame no longer matches
                ch.denoised.data = np.zeros(raw.shape, np.float32)
            ch.needs_autoscale |= resized
            reset_view |= resized
        if reset_view:
            self.fit_view()
        self.last_frames = frames
        waiting = [ch for ch in self.channel_layers.values() if ch.needs_autoscale]
        if waiting:
            self.autoscale(waiting)  # at once from the raw frame, again once the raw mean is there
            stats = self.last_stats
            means = {c.stream for c in stats.channels if c.raw_mean is not None} \
                if stats is not None and stats.site == frames.site else set()
            have = {p.stream for p in frames.pairs if p.raw is not None}
            for ch in waiting:
                ch.needs_autoscale = not (ch.stream in means and ch.stream in have)
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
        return bool(self.channel_layers) and not any(ch.needs_autoscale for ch in self.channel_layers.values())

    def autoscale(self, channels: list[ChannelLayers] | None = None) -> None:
        """Set each channel's contrast limits (raw and denoised alike) from its recent raw frames'
        temporal mean.

        The mean of the last frames is a noise-reduced picture that does not depend on how far
        the model has come, so the limits suit the denoised image and clip the raw noise a little.
        Before there is one, the newest raw frame is used.
        """
        stats = self.last_stats
        means = {c.stream: c.raw_mean for c in stats.channels} if stats is not None else {}
        for ch in (self.channel_layers.values() if channels is None else channels):
            ref = means.get(ch.stream)
            if ref is None or ref.shape != ch.raw.data.shape:
                ref = ch.raw.data
            lo, hi = robust_limits(ref)
            span_lo = min(lo, float(np.min(ch.raw.data)), float(np.min(ch.denoised.data)))
            span_hi = max(hi, float(np.max(ch.raw.data)), float(np.max(ch.denoised.data)))
            self._syncing = True
            try:
                for layer in (ch.raw, ch.denoised):
                    layer.contrast_limits_range = (span_lo, max(span_hi, span_lo + 1.0))
                    layer.contrast_limits = (lo, hi)
            finally:
                self._syncing = False
            if channels is None:
                ch.needs_autoscale = False

    def _link_contrast(self, event) -> None:
        if self._syncing:
            return
        source = event.source
        other = next((ch.denoised if source is ch.raw else ch.raw for ch in self.channel_layers.values()
                      if source is ch.raw or source is ch.denoised), None)
        if other is None:
            return
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
        if not self.channel_layers:
            return
        side_by_side = layout == LAYOUTS[0]
        for ch in self.channel_layers.values():
            ch.raw.visible = layout != LAYOUTS[2]
            ch.denoised.visible = layout != LAYOUTS[1]
        region, mirror = self._region_layers()
        region.visible = layout != LAYOUTS[2]
        mirror.visible = layout != LAYOUTS[1]
        self.grid.enabled = side_by_side
        self.fit_view()

    def fit_view(self) -> None:
        """Fit the images to the canvas, and keep them fitted while the canvas changes size (the
        window still settling its layout at start-up, or resized) until the user zooms or pans."""
        self.viewer.reset_view()
        self._fitted_camera = (self.viewer.camera.zoom, tuple(self.viewer.camera.center))

    def _canvas_resized(self, event=None) -> None:
        camera = self.viewer.camera
        if self.channel_layers and self._fitted_camera == (camera.zoom, tuple(camera.center)):
            self.fit_view()

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
        region, mirror = self._region_layers()
        other = mirror if source is region else region
        data = [np.asarray(d) for d in source.data]
        self._syncing = True
        try:
            if len(data) > 1:
                source.data = data[-1:]
                source.shape_type = ["rectangle"]
            other.data = [d.copy() for d in data[-1:]]
            for layer in (region, mirror):
                if len(layer.data):
                    layer.shape_type = ["rectangle"]
        finally:
            self._syncing = False
        self._push_region()

    def _region_layers(self) -> tuple[Shapes, Shapes]:
        """The region's layer on the raw image and its mirror on the denoised one."""
        if self.region_layer is None or self.mirror_layer is None:
            raise RuntimeError("no frames yet: the region layers appear with the first frame")
        return self.region_layer, self.mirror_layer

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
            r0, r1, c0, c1 = region  # around the pixels' squares: corners at their edges
            self.region_layer.add_rectangles(np.array([[r0, c0], [r1, c1]], np.float64) - 0.5)

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
            self.connection_label.setText(
                f"<span style='color:#5d5'>● connected</span> to {self.config.output}"
                + (f" · status not understood: {stats.status_error}" if stats.status_error else ""))
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
        """The group, site and channel combos, from every stream's place; the layers' colours."""
        self.catalog = SiteCatalog(stats.places)
        if self._chosen_site is not None and self._chosen_site not in self.catalog.sites():
            self._chosen_site = None  # its acquisition ended: the session follows the next one
        self._show_selection(stats)
        if self.channel_layers and self.layer_site is not None:
            self._apply_colormaps(self._colormaps(self.layer_site.group, list(self.channel_layers)))

    def _show_selection(self, stats: LiveStats | None = None) -> None:
        stats = stats or self.last_stats
        site = self.shown_site
        groups = self.catalog.groups()
        combos = [self.stream_combo, self.channel_combo, *self.axis_combos.values()]
        for combo in combos:
            combo.blockSignals(True)
        try:
            if [self.stream_combo.itemText(i) for i in range(self.stream_combo.count())] != groups:
                self.stream_combo.clear()
                self.stream_combo.addItems(groups)
            if site is not None and self.stream_combo.currentText() != site.group:
                self.stream_combo.setCurrentText(site.group)
            any_axis = False
            for axis, combo in self.axis_combos.items():
                values = self.catalog.axis_values(site.group, axis) if site is not None else []
                shown = site is not None and bool(values) and axis in self.catalog.group_axes(site.group)
                any_axis |= shown
                combo.setVisible(shown)
                self._axis_labels[axis].setVisible(shown)
                items = [(self._axis_text(site.group, axis, v), v) for v in values] if site is not None else []
                if [(combo.itemText(i), combo.itemData(i)) for i in range(combo.count())] != items:
                    combo.clear()
                    for text, value in items:
                        combo.addItem(text, value)
                current = site.get(axis) if site is not None else None
                index = combo.findData(current) if current is not None else -1
                if index >= 0 and combo.currentIndex() != index:
                    combo.setCurrentIndex(index)
            self.site_row.setVisible(any_axis)
            self._site_row_label.setVisible(any_axis)
            labels = [c.label for c in stats.channels] if stats is not None and stats.site == site else []
            if labels and [self.channel_combo.itemText(i) for i in range(self.channel_combo.count())] != labels:
                self.channel_combo.clear()
                self.channel_combo.addItems(labels)
            listed = [self.channel_combo.itemText(i) for i in range(self.channel_combo.count())]
            target = self._chosen_channel if self._chosen_channel in listed else (
                stats.channel if stats is not None else None)
            if target and self.channel_combo.currentText() != target:
                self.channel_combo.setCurrentText(target)
            if stats is not None and stats.missing is not None:
                known = ", ".join(self.catalog.groups()) or "none yet"
                missing = html.escape(repr(stats.missing))
                self.analysed_label.setText(f"<span style='color:#f55'>no stream or group named {missing}</span> "
                                            f"(streams: {html.escape(known)})")
            else:
                self.analysed_label.setText(f"stream {stats.stream}" if stats is not None and stats.stream else "")
        finally:
            for combo in combos:
                combo.blockSignals(False)

    def _axis_text(self, group: str, axis: str, value: int) -> str:
        name = self.catalog.position_name(group, value) if axis == "p" else None
        return f"{value} · {name}" if name else str(value)

    def _update_model(self, stats: LiveStats) -> None:
        s = stats.stream_status
        if s is None:
            self.state_label.setText("waiting for the stream" if stats.connected else "–")
            return
        state, progress = s.get("state", "?"), float(s.get("warmup_progress") or 0.0)
        paused = bool(s.get("training_paused"))
        text = {"warmup": "warming up (denoised = temporal mean until live)", "live": "live",
                "adapting": f"adapting to a change ({s.get('changes', 0)} so far)",
                "idle": "idle"}.get(state, state)
        self.state_label.setText(text + (" · training paused" if paused else ""))
        learned = state in ("live", "adapting")
        self.warmup_bar.setValue(round(100 * (1.0 if learned else progress)))
        self.warmup_bar.setFormat(state if learned else "warm start %p%")
        steps_per_s = (s.get("engine") or {}).get("train_steps_per_s")
        self.steps_label.setText(
            f"step {s.get('model_step', 0)} · loss {_fmt(s.get('loss'), '.4g')}"
            + (f" · {_fmt(steps_per_s, '.1f')} steps/s" if steps_per_s is not None else "")
            + f" · resets {s.get('resets', 0)}")
        self.pause_button.setText("Resume training" if paused else "Pause training")

    def _update_flow(self, stats: LiveStats) -> None:
        # read with .get, each figure on its own: a daemon of another version may lack some
        s: Mapping[str, Any] = stats.stream_status or {}
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
        which = f" · {stats.channel}" if len(stats.channels) > 1 and stats.channel else ""
        self.noise_box.setTitle(f"Raw noise{which} (Poisson-Gaussian fit)")
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
        several = len(stats.channels) > 1
        lanes = []
        for c in stats.channels:
            ch = self.channel_layers.get(c.label)
            color = display_color(ch.colormap if ch is not None and several else "gray")
            lanes.append(TraceLane(c.label if several else "", color, (
                TraceSeries("raw", c.trace_raw, RAW_COLOR), TraceSeries("denoised", c.trace_denoised, color))))
        self.trace_plot.set_lanes(lanes)

    def _update_recording(self, stats: LiveStats) -> None:
        rec = stats.daemon.get("recording") if stats.daemon else None
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
        daemon = self.last_stats.daemon if self.last_stats is not None else None
        recording = bool(daemon and daemon.get("recording"))
        if recording:
            self._command("record_stop")
            return
        name = self.record_edit.text().strip() or f"live-{time.strftime('%Y%m%d-%H%M%S')}.ome.tif"
        self._command("record_start", path=name, raw=self.record_raw.isChecked())

    def _on_command_done(self, result: ControlReply | CommandFailed) -> None:
        self.command_log.append(result)
        cmd = str(result.request.get("cmd"))
        detail: str | None
        if isinstance(result, CommandFailed):
            ok, detail = False, result.error
        else:
            ok, detail = result.ok, result.error
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
        self._show_message(f"{cmd}: {detail}", ok)

    def _show_message(self, text: str, ok: bool) -> None:
        color = "#5d5" if ok else "#f55"
        self.message_label.setText(f"<span style='color:{color}'>{text}</span>")
        self.message_label.setTextFormat(Qt.TextFormat.RichText)
