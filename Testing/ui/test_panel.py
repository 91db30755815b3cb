"""The panel's .ui file, loaded with PySide6's QUiLoader offscreen, against what DiffSeg.py uses."""

from __future__ import annotations

import os
import re
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


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    """Screenshot stand-in for ctkCollapsibleButton: a titled frame (its 'text' is the title)."""

    def _text(self) -> str:
        return self.title()

    text = QtCore.Property(str, _text, QtWidgets.QGroupBox.setTitle)


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    """Screenshot stand-in for qMRMLNodeComboBox: shows the node a user would pick."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.addItem("")

    def _none(self) -> str:
        return self.itemText(0)

    def _set_none(self, text: str) -> None:
        self.setItemText(0, text)

    noneDisplay = QtCore.Property(str, _none, _set_none)


def test_panel_screenshot(app):
    """A picture of the panel for the README, with stand-ins drawing the CTK/MRML widgets."""
    loader = QtUiTools.QUiLoader()
    loader.registerCustomWidget(ctkCollapsibleButton)
    loader.registerCustomWidget(qMRMLNodeComboBox)
    panel = load(loader)
    panel.findChild(QtWidgets.QComboBox, "inputVolumeSelector").setItemText(0, "hippocampus_001")
    panel.findChild(QtWidgets.QComboBox, "modelSelector").addItem("Hippocampus (MR) - recycling diffusion")
    panel.findChild(QtWidgets.QLabel, "modelInfoLabel").setText(
        "<b>Hippocampus (MR) - recycling diffusion</b><br>Anterior and posterior hippocampus on T1-weighted MR."
        "<br><b>Classes:</b> Anterior hippocampus, Posterior hippocampus<br><b>Expected time:</b> 2 s on GPU / 20 s on CPU"
    )
    for name in ("dependencyFrame", "channel2Label", "channel2Selector", "channel3Label", "channel3Selector"):
        panel.findChild(QtWidgets.QWidget, name).hide()
    for name in ("presegSegmentationLabel", "presegSegmentationSelector", "presegStepLabel", "presegStepSpinBox"):
        panel.findChild(QtWidgets.QWidget, name).hide()
    from DiffSegCore.settings import DEVICES, SAMPLERS

    # In Slicer, connectGui fills these from the parameter node's Choice; here the picture does it.
    panel.findChild(QtWidgets.QComboBox, "samplerComboBox").addItems(list(SAMPLERS))
    panel.findChild(QtWidgets.QComboBox, "deviceComboBox").addItems(list(DEVICES))
    panel.findChild(QtWidgets.QPushButton, "applyButton").setEnabled(True)
    panel.resize(440, 640)
    panel.show()
    app.processEvents()
    image = panel.grab()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert image.save(str(SCREENSHOT))
    assert QtGui.QImage(str(SCREENSHOT)).width() == 440


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
