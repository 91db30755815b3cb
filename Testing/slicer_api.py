"""Which Slicer, MRML, VTK, CTK and Qt names the extension uses, read from its source with `ast`.

Testing/scene/test_slicer_api.py compares them with Testing/slicer_api_v5.10.0.json, which records
where each was found in Slicer's source at tag v5.10.0 (and in the CTK and VTK revisions that tag
builds with); scripts/slicer_api_evidence.py regenerates those records from a clone of Slicer.

A name is one of:
  slicer.util.NAME / slicer.app.NAME / slicer.CLASS   what Slicer's Python package provides
  qt.CLASS / ctk.CLASS / vtk.CLASS                    classes from PythonQt's modules and VTK
  qt.CLASS.MEMBER                                     a Qt enum value or static function (qt.Qt.ToolTipRole)
  CLASS.member                                        a member of a widget the panel uses (class from
                                                      DiffSegLib.widgets) or of the module's parent
  Method                                              a VTK/MRML method called on an object (CamelCase,
                                                      as VTK names them), or an event name
  MODULE.NAME                                         a scripted module of Slicer or of an extension
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = ROOT / "DiffSegExtension"
sys.path.insert(0, str(EXTENSION))

from DiffSegLib.widgets import WIDGET_CLASSES  # noqa: E402

BINDINGS = {"slicer", "qt", "ctk", "vtk"}
# Scripted modules of Slicer (SampleData) and of the PyTorch extension (PyTorchUtils) that the extension calls.
SCRIPTED_MODULES = {"SampleData", "PyTorchUtils"}
# What `self.parent` is in a module class and in a widget class (Slicer's C++ objects behind them).
MODULE_PARENT, WIDGET_PARENT = "qSlicerAbstractCoreModule", "qSlicerAbstractModuleWidget"
# Local names the panel gives widgets: `uiWidget` is the .ui's root; `widget` is any bound widget
# (DiffSegLib.widgets.PARAMETER_WIDGETS), so its members are checked on each bound class.
LOCAL_WIDGETS = {"uiWidget": "qMRMLWidget", "widget": "bound", "spin": "QSpinBox", "combo": "QComboBox",
                 "label": "QLabel", "selector": "qMRMLNodeComboBox"}


def _chain(node: ast.AST) -> list[str] | None:
    """['slicer', 'util', 'loadUI'] for slicer.util.loadUI; None when the chain does not start at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    if isinstance(node, ast.Call):  # PyTorchUtils.PyTorchUtilsLogic().installTorch
        inner = _chain(node.func)
        return None if inner is None else [*inner, "()", *reversed(parts)]
    return None


def _imported_modules(tree: ast.Module) -> set[str]:
    """Names bound to modules that are not Slicer's bindings (stdlib, numpy, DiffSegCore, DiffSegLib)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] not in BINDINGS:
            names |= {alias.asname or alias.name for alias in node.names}
    return names - BINDINGS - SCRIPTED_MODULES


def _name_of(chain: list[str], is_call: bool, modules: set[str], in_widget: bool) -> str | None:
    head = chain[0]
    if head in SCRIPTED_MODULES and len(chain) >= 2:
        return ".".join(chain).replace(".()", "()")
    if head == "slicer" and len(chain) >= 2:
        if chain[1] in ("util", "app") and len(chain) >= 3:
            return ".".join(chain[:3])
        if chain[1] == "modules":
            return ".".join(chain)
        if chain[1] == "mrmlScene":
            return chain[2] if len(chain) >= 3 else None
        if chain[1] == "ScriptedLoadableModule":
            return None
        return ".".join(chain[:2]) if len(chain) == 2 else chain[2]
    if head == "qt" and len(chain) >= 3:  # qt.Qt.MatchContains, qt.QFileDialog.getOpenFileName: Qt's own
        return ".".join(chain[:3])
    if head in ("qt", "ctk", "vtk") and len(chain) >= 2:
        return f"{head}.{chain[1]}" if len(chain) == 2 else chain[-1]
    if len(chain) >= 4 and chain[1] == "ui" and chain[2] in WIDGET_CLASSES:  # self.ui.x, or a module widget's
        return f"{WIDGET_CLASSES[chain[2]]}.{chain[3]}"
    if chain[:2] == ["self", "parent"] and len(chain) >= 3:
        return f"{WIDGET_PARENT if in_widget else MODULE_PARENT}.{chain[2]}"
    if head in LOCAL_WIDGETS and len(chain) >= 2:
        return f"{LOCAL_WIDGETS[head]}.{chain[1]}"
    if head in modules or (head in ("self", "cls") and len(chain) == 2):
        return None
    last = chain[-1]
    if last[:1].isupper() and (is_call or last.endswith("Event")) and last != "()":
        return last
    return None


def ui_names(path: Path = ROOT / "Resources" / "UI" / "DiffSeg.ui") -> dict[str, str]:
    """CTK/MRML classes in the .ui, the properties it sets on them, and its signal/slot connections."""
    import xml.etree.ElementTree as ET

    where = str(path.relative_to(ROOT))
    tree = ET.parse(path)
    classes = {w.get("name"): w.get("class") for w in tree.iter("widget")}
    found = {}
    for widget in tree.iter("widget"):
        cls = widget.get("class")
        if not cls.startswith(("qMRML", "ctk")):
            continue
        found.setdefault(cls, where)
        for prop in widget.findall("property"):
            if prop.get("stdset") != "0" and prop.get("name") not in ("toolTip", "geometry"):
                found.setdefault(f"{cls}.{prop.get('name')}", where)
    for connection in tree.iter("connection"):
        for role, member in (("sender", "signal"), ("receiver", "slot")):
            name = connection.find(member).text.split("(")[0]
            found.setdefault(f"{classes[connection.find(role).text]}.{name}", where)
    return found


def used_names(paths: list[Path] | None = None) -> dict[str, str]:
    """Each API name the extension uses -> its first use as 'path:line'."""
    found: dict[str, str] = {}
    for path in paths or sorted(EXTENSION.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = _imported_modules(tree)
        calls = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        widget_lines = {
            line
            for cls in ast.walk(tree)
            if isinstance(cls, ast.ClassDef) and cls.name.endswith("Widget")
            for line in range(cls.lineno, cls.end_lineno + 1)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("slicer", "slicer.util"):
                for alias in node.names:
                    found.setdefault(f"{node.module}.{alias.name}", f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module == "slicer.ScriptedLoadableModule":
                for alias in node.names:
                    found.setdefault(f"slicer.ScriptedLoadableModule.{alias.name}", f"{path.relative_to(ROOT)}:{node.lineno}")
            if not isinstance(node, ast.Attribute) or id(node) in inner:
                continue  # only whole chains: slicer.util.loadUI, not also slicer.util
            chain = _chain(node)
            if chain is None:
                continue
            name = _name_of(chain, id(node) in calls, modules, node.lineno in widget_lines)
            if name:
                found.setdefault(name, f"{path.relative_to(ROOT)}:{node.lineno}")
    if paths is None:
        for name, where in ui_names().items():
            found.setdefault(name, where)
    return found
