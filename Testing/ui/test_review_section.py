"""The panel's Review section in the real .ui (loaded with PySide6's QUiLoader, offscreen) against
DiffSegLib/review_panel.py, which drives it."""

from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtCore = pytest.importorskip("PySide6.QtCore")
QtUiTools = pytest.importorskip("PySide6.QtUiTools")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")

ROOT = Path(__file__).resolve().parents[2]
UI_FILE = ROOT / "Resources" / "UI" / "DiffSeg.ui"
PANEL_FILE = ROOT / "DiffSegExtension" / "DiffSegLib" / "review_panel.py"
sys.path.insert(0, str(ROOT / "DiffSegExtension"))

from DiffSegLib.widgets import REVIEW_WIDGET_CLASSES, WIDGET_CLASSES  # noqa: E402

# CTK classes and the Qt class QUiLoader builds for them (their <extends> in the .ui).
CUSTOM_BASES = {"ctkCollapsibleButton": "QWidget", "ctkSliderWidget": "QWidget"}


@pytest.fixture(scope="module")
def panel():
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    file = QtCore.QFile(str(UI_FILE))
    assert file.open(QtCore.QIODevice.OpenModeFlag.ReadOnly)
    try:
        loaded = QtUiTools.QUiLoader().load(file)
    finally:
        file.close()
    assert loaded is not None
    yield loaded
    del app


def test_review_widgets_exist_with_their_classes(panel):
    declared = {w.get("name"): w.get("class") for w in ET.parse(UI_FILE).iter("widget")}
    assert not set(REVIEW_WIDGET_CLASSES) & set(WIDGET_CLASSES)
    for name, cls in REVIEW_WIDGET_CLASSES.items():
        assert declared.get(name) == cls, f"{name}: .ui declares {declared.get(name)}, review_panel.py expects {cls}"
        widget = panel.findChild(QtWidgets.QWidget, name)
        assert widget is not None, f"{name} missing from the loaded panel"
        # the declared base, or the class itself where another test registered a stand-in (PySide6 keeps it)
        assert widget.metaObject().className() in (CUSTOM_BASES.get(cls, cls), cls)
        assert widget.parent() is not None and widget.window() is panel


def test_review_section_comes_after_the_outputs_and_inside_it_the_table(panel):
    layout = panel.layout()
    order = [layout.itemAt(i).widget().objectName() for i in range(layout.count()) if layout.itemAt(i).widget()]
    assert order.index("reviewCollapsibleButton") > order.index("outputsCollapsibleButton")
    section = panel.findChild(QtWidgets.QWidget, "reviewCollapsibleButton")
    for name in REVIEW_WIDGET_CLASSES:
        if name != "reviewCollapsibleButton":
            assert section.isAncestorOf(panel.findChild(QtWidgets.QWidget, name)), name
    table = panel.findChild(QtWidgets.QTableWidget, "reviewTable")
    assert table.editTriggers() == QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers
    assert table.selectionBehavior() == QtWidgets.QAbstractItemView.SelectionBehavior.SelectRows
    assert table.verticalHeader().isHidden() and table.horizontalHeader().stretchLastSection()
    assert panel.findChild(QtWidgets.QPushButton, "show3DButton").isCheckable()


def test_review_panel_uses_only_listed_widgets():
    used = set(re.findall(r"\bui\.(\w+)", PANEL_FILE.read_text()))
    assert used and used <= set(REVIEW_WIDGET_CLASSES), used - set(REVIEW_WIDGET_CLASSES)
