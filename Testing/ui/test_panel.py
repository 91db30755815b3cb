"""The panel's .ui file, loaded with PySide6's QUiLoader offscreen, against what DiffSeg.py uses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtCore = pytest.importorskip("PySide6.QtCore")
QtGui = pytest.importorskip("PySide6.QtGui")
QtUiTools = pytest.importorskip("PySide6.QtUiTools")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")

ROOT = Path(__file__).resolve().parents[2]
UI_FILE = ROOT / "Resources" / "UI" / "DiffSeg.ui"
MODULE_FILE = ROOT / "DiffSegExtension" / "DiffSeg.py"
SCREENSHOT = ROOT / "docs" / "images" / "panel.png"
sys.path.insert(0, str(ROOT / "DiffSegExtension"))

from DiffSegLib.widgets import PARAMETER_WIDGETS, WIDGET_CLASSES  # noqa: E402

# CTK/MRML classes and the Qt class QUiLoader builds for them (their <extends> in the .ui).
CUSTOM_BASES = {"ctkCollapsibleButton": "QWidget", "qMRMLNodeComboBox": "QWidget", "qMRMLWidget": "QWidget"}


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def declared_widgets() -> dict[str, str]:
    """Widget name -> class as written in the .ui file."""
    return {w.get("name"): w.get("class") for w in ET.parse(UI_FILE).iter("widget")}


def load(loader: QtUiTools.QUiLoader):
    file = QtCore.QFile(str(UI_FILE))
    assert file.open(QtCore.QIODevice.OpenModeFlag.ReadOnly)
    try:
        return loader.load(file)
    finally:
        file.close()


def test_module_uses_only_listed_widgets():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used <= set(WIDGET_CLASSES), (
        f"DiffSeg.py uses widgets missing from DiffSegLib.widgets: {used - set(WIDGET_CLASSES)}"
    )


def test_every_widget_exists_with_its_class(app):
    declared = declared_widgets()
    panel = load(QtUiTools.QUiLoader())
    assert panel is not None
    for name, cls in WIDGET_CLASSES.items():
        assert declared.get(name) == cls, f"{name}: .ui declares {declared.get(name)}, DiffSeg.py expects {cls}"
        widget = panel.findChild(QtWidgets.QWidget, name)
        assert widget is not None, f"{name} missing from the loaded panel"
        # its declared base, or the class itself where the test adapter registered a stand-in (PySide6 keeps it)
        assert widget.metaObject().className() in (CUSTOM_BASES.get(cls, cls), cls)


def test_parameter_bindings_match_the_ui(app):
    """Each bound widget names its parameter-node field (SlicerParameterName), and the field exists."""
    from DiffSegLib.parameters import NODE_ROLES, VALUES

    panel = load(QtUiTools.QUiLoader())
    for field, name in PARAMETER_WIDGETS.items():
        assert panel.findChild(QtWidgets.QWidget, name).property("SlicerParameterName") == field
        assert field in NODE_ROLES or field in VALUES, f"parameter node lacks {field}"


def test_panel_picture_script_draws_the_real_panel_elsewhere_than_the_readme(tmp_path):
    """scripts/panel_image.py (the README picture) on the real panel before a run, written to a test folder:
    no test overwrites docs/images/panel.png."""
    before = SCREENSHOT.read_bytes() if SCREENSHOT.exists() else None
    output = tmp_path / "panel.png"
    command = [sys.executable, str(ROOT / "scripts" / "panel_image.py"), "--no-run", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert result.returncode == 0, result.stderr
    image = QtGui.QImage(str(output))
    assert image.width() == 460 and image.height() > 400
    assert (SCREENSHOT.read_bytes() if SCREENSHOT.exists() else None) == before


def test_parameter_node_takes_names_and_defaults_from_settings():
    """Each run setting on the parameter node keeps settings.py's name and default; a chosen model's own
    defaults replace the model-dependent ones (DiffSegWidget._applyModelDefaults)."""
    from DiffSegLib.logic import MODEL_SETTINGS
    from DiffSegLib.parameters import VALUES, Parameters

    from DiffSegCore.settings import BY_NAME

    for name in ("steps", "ensemble", "sampler", "device", "seed"):
        assert VALUES[name] == BY_NAME[name].default, name
    assert set(MODEL_SETTINGS) <= {n for n, s in BY_NAME.items() if s.model_default}

    slicer = pytest.importorskip("slicer")
    p = Parameters(slicer.vtkMRMLScriptedModuleNode())
    assert p.steps == VALUES["steps"]
    p.steps = 7
    assert p.steps == 7
    with pytest.raises(Exception, match="out of range"):
        p.steps = 0
