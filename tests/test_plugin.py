"""The napari plugin as napari finds it (issue 18, item 4): npe2 discovers the installed
distribution's ``napari.manifest`` entry point, napari opens the widget from it under Xvfb.

The display comes from test_viewer's ``x_display`` fixture (a private Xvfb, or the DISPLAY given).
"""

from __future__ import annotations

from importlib.metadata import distribution

import pytest
from test_viewer import x_display  # noqa: F401  (the fixture, shared)

pytestmark = pytest.mark.timeout(120)


def test_the_distribution_is_listed_as_a_napari_plugin():
    meta = distribution("umvd-live").metadata
    assert "Framework :: napari" in meta.get_all("Classifier")
    assert any(ep.group == "napari.manifest" for ep in distribution("umvd-live").entry_points)
    # the viewer extra names napari, never a Qt binding (napari's plugin guide)
    viewer = [r for r in distribution("umvd-live").requires or [] if 'extra == "viewer"' in r]
    assert any(r.startswith("napari") for r in viewer)
    assert not any(q in r.lower() for r in viewer for q in ("pyqt", "pyside", "[all]", "[qt]"))


def test_the_project_metadata_states_its_licence_and_bounds_the_private_apis_it_uses():
    """pyproject.toml (what every build of the distribution says): an SPDX licence with its file,
    the napari classifier, and an upper bound on each package whose experimental or private API
    we call, satisfied by the versions installed here (the ones the tests ran against)."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (root / "LICENSE").read_text().startswith("MIT License")
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # the SPDX expression says it
    assert "Framework :: napari" in project["classifiers"] and project["urls"]
    micromanager = {r.name: r for r in map(Requirement, project["optional-dependencies"]["micromanager"])}
    for name in ("pymmcore-plus", "pycromanager", "mmpycorex", "ndstorage"):
        spec = micromanager[name].specifier
        assert any(s.operator == "<" for s in spec), f"{name}: no upper bound"
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # the micromanager extra is not installed here
        assert spec.contains(installed), f"{name} {installed} is outside {spec}"


def test_npe2_discovers_the_widget_in_the_installed_distribution():
    npe2 = pytest.importorskip("npe2", reason="npe2 (the viewer extra) is not installed")
    pm = npe2.PluginManager()  # a fresh one: only what entry points say
    pm.discover(include_npe1=False)
    manifest = pm.get_manifest("umvd-live")
    assert manifest.package_metadata is not None and manifest.package_metadata.name == "umvd-live"
    (widget,) = [w for w in pm.iter_widgets() if w.command.startswith("umvd-live.")]
    assert widget.display_name == "Live denoiser"
    assert pm.get_command(widget.command).python_name == "umvd_live.viewer.qt.widget:LiveViewerWidget"


@pytest.mark.gui
def test_napari_opens_the_plugin_widget_from_its_menu_entry(x_display):  # noqa: F811
    pytest.importorskip("napari", reason="napari is not installed (pip install 'umvd-live[viewer]' napari[all])")
    import napari
    from qtpy.QtWidgets import QApplication

    from umvd_live.viewer.qt.widget import LiveViewerWidget

    viewer = napari.Viewer(show=False)
    try:
        # what Plugins > umvd-live > Live denoiser does: npe2's global plugin manager, by name
        dock, widget = viewer.window.add_plugin_dock_widget("umvd-live", "Live denoiser")
        QApplication.processEvents()
        assert isinstance(widget, LiveViewerWidget)
        # napari hands plugins a public-only proxy of the viewer
        assert getattr(widget.viewer, "__wrapped__", widget.viewer) is viewer
        assert dock.widget() is not None and "Live denoiser" in dock.name
        widget.close_session()
    finally:
        viewer.close()


@pytest.mark.gui
def test_closing_the_plugin_dock_stops_its_session_and_docking_it_again_starts_it(x_display):  # noqa: F811
    """The dock's close button (napari's remove_dock_widget) only unparents the widget: its worker
    thread must end and its sockets close there, not at the widget's deletion (maybe never)."""
    pytest.importorskip("napari", reason="napari is not installed (pip install 'umvd-live[viewer]' napari[all])")
    import napari

    viewer = napari.Viewer(show=False)
    try:
        dock, widget = viewer.window.add_plugin_dock_widget("umvd-live", "Live denoiser")
        worker = widget.worker
        assert worker is not None and worker.isRunning()
        dock.destroyOnClose()  # what the dock's close button does
        assert widget.parent() is None and widget.worker is None and not worker.isRunning()
        assert worker.session._sub.closed and worker.session.control._sock is None
        assert "closed" in widget.connection_label.text()
        viewer.window.add_dock_widget(widget, name="umvd-live")
        assert widget.worker is not None and widget.worker.isRunning()
        widget.close_session()
    finally:
        viewer.close()
