"""The one test adapter: the parts of Slicer's Python that DiffSeg.py needs, over PySide6 and the slicer-core wheel.

Slicer's own `qt` and `ctk` are PythonQt bindings and its `slicer.ScriptedLoadableModule` lives in
the application; none of them can be installed from PyPI. The slicer-core wheel gives the real
MRML scene, the MRML/VTK classes and Slicer's real `slicer.util` module. This adapter adds, and
only for tests:

- `qt`: PySide6's QtCore, QtGui, QtWidgets and QUiLoader in one module, as PythonQt has them.
- PythonQt's way of using widgets: Qt properties read and written as attributes
  (`label.text = "..."`), and `widget.connect("signal(args)", slot)`. `loadUI` loads the real
  .ui with QUiLoader; `childWidgetVariables` returns the named widgets wrapped in `PythonQtWidget`.
- `ctk.ctkCollapsibleButton` and `qMRMLWidget` / `qMRMLNodeComboBox` stand-ins that list the
  nodes of the real MRML scene (by class, hidden nodes left out, `showChildNodeTypes`, a none item).
- `slicer.ScriptedLoadableModule`: the four base classes, with `getParameterNode` as Slicer's
  (a singleton vtkMRMLScriptedModuleNode tagged with the module name).
- `slicer.app` (testing mode, the startup environment, a `PythonSlicer` next to it that runs this
  interpreter) and `slicer.mrmlScene` (a scene with the module logics registered, as in Slicer).

What this cannot show (the real CTK/MRML widgets' look and behaviour, PythonQt's conversions, the
application's event loop, dialogs) is listed in the README's "In 3D Slicer" section.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
import tempfile
import types
import unittest
from pathlib import Path

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

ROOT = Path(__file__).resolve().parents[1]
_SIGNATURE = re.compile(r"(\w+)\(")
_saved: dict = {}  # slicer.util's own functions that install() replaced


def _unwrap(value):
    return value._qobject if isinstance(value, PythonQtWidget) else value


class PythonQtWidget:
    """A Qt object used the PythonQt way: properties as attributes, `connect("signal(args)", slot)`."""

    __slots__ = ("_qobject",)

    def __init__(self, qobject: QtCore.QObject) -> None:
        object.__setattr__(self, "_qobject", qobject)

    def _has_property(self, name: str) -> bool:
        return self._qobject.metaObject().indexOfProperty(name) >= 0

    def __getattr__(self, name: str):
        if self._has_property(name):
            return self._qobject.property(name)
        attribute = getattr(self._qobject, name)
        if not callable(attribute) or isinstance(attribute, QtCore.SignalInstance):
            return attribute

        def call(*args, **kwargs):
            result = attribute(*map(_unwrap, args), **kwargs)
            return PythonQtWidget(result) if isinstance(result, QtWidgets.QWidget) else result

        return call

    def __setattr__(self, name: str, value) -> None:
        if not self._has_property(name):
            raise AttributeError(f"{type(self._qobject).__name__} has no Qt property {name}")
        if not self._qobject.setProperty(name, _unwrap(value)):
            raise TypeError(f"cannot set {type(self._qobject).__name__}.{name} to {value!r}")

    def connect(self, signature: str, slot) -> None:
        """PythonQt's string form: `connect("clicked(bool)", slot)`."""
        getattr(self._qobject, _SIGNATURE.match(signature).group(1)).connect(slot)

    def __eq__(self, other) -> bool:
        return _unwrap(other) is self._qobject

    def __hash__(self) -> int:
        return hash(self._qobject)


# ---------------------------------------------------------------------------------------------
# CTK and MRML widget stand-ins (their C++ originals are not on PyPI)


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    """A titled frame with ctkCollapsibleButton's `text` and `collapsed` properties."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._collapsed = False

    def _set_collapsed(self, collapsed: bool) -> None:
        self._collapsed = bool(collapsed)
        for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindChildOption.FindDirectChildrenOnly):
            child.setVisible(not self._collapsed)

    def showEvent(self, event) -> None:
        # The .ui sets `collapsed` before QUiLoader adds the children: hide them once they are all there.
        if self._collapsed:
            self._set_collapsed(True)
        super().showEvent(event)

    text = QtCore.Property(str, QtWidgets.QGroupBox.title, QtWidgets.QGroupBox.setTitle)
    collapsed = QtCore.Property(bool, lambda self: self._collapsed, _set_collapsed)


def _flag(attribute: str) -> QtCore.Property:
    """A bool Qt property stored in a Python attribute."""
    return QtCore.Property(bool, lambda self: getattr(self, attribute), lambda self, v: setattr(self, attribute, bool(v)))


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    """Lists the nodes of a real MRML scene as qMRMLNodeComboBox does; emits currentNodeChanged(node)."""

    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._scene = None
        self._observers: list[int] = []
        self._node_types: list[str] = []
        self._show_child_types = True
        self._none_enabled = False
        self._none_display = "None"
        self._add_enabled = self._remove_enabled = False
        self._current = ""
        self.currentIndexChanged.connect(self._index_changed)

    nodeTypes = QtCore.Property(list, lambda self: self._node_types, lambda self, v: setattr(self, "_node_types", list(v)))
    showChildNodeTypes = _flag("_show_child_types")
    noneEnabled = _flag("_none_enabled")
    addEnabled = _flag("_add_enabled")
    removeEnabled = _flag("_remove_enabled")
    noneDisplay = QtCore.Property(str, lambda self: self._none_display, lambda self, v: setattr(self, "_none_display", v))

    def setMRMLScene(self, scene) -> None:
        for tag in self._observers:
            self._scene.RemoveObserver(tag)
        self._scene = scene
        self._observers = [scene.AddObserver(event, self._scene_changed) for event in
                           (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent)]
        self._fill()

    def _scene_changed(self, caller, event) -> None:
        self._fill()

    def _listed(self) -> list:
        nodes = []
        for class_name in self._node_types:
            for index in range(self._scene.GetNumberOfNodesByClass(class_name)):
                node = self._scene.GetNthNodeByClass(index, class_name)
                if node.GetHideFromEditors() or (not self._show_child_types and node.GetClassName() != class_name):
                    continue
                nodes.append(node)
        return nodes

    def _fill(self) -> None:
        blocked = self.blockSignals(True)
        self.clear()
        if self._none_enabled:
            self.addItem(self._none_display, "")
        for node in self._listed():
            self.addItem(node.GetName(), node.GetID())
        index = self.findData(self._current)
        if index < 0:
            index = 0 if self.count() else -1
        self.setCurrentIndex(index)
        self.blockSignals(blocked)
        self._index_changed(index)

    def _index_changed(self, index: int) -> None:
        current = self.itemData(index) if index >= 0 else ""
        if current != self._current:
            self._current = current or ""
            self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self):
        return self._scene.GetNodeByID(self._current) if self._scene is not None and self._current else None

    def setCurrentNode(self, node) -> None:
        index = self.findData(node.GetID() if node is not None else "")
        if index >= 0:
            self.setCurrentIndex(index)


class ctkSliderWidget(QtWidgets.QWidget):
    """A number with ctkSliderWidget's double `minimum`, `maximum`, `singleStep`, `value`, `decimals` and
    valueChanged(double) (a spin box stands in for the slider and its spin box)."""

    valueChanged = QtCore.Signal(float)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._spin = QtWidgets.QDoubleSpinBox(self)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._spin)
        self._spin.valueChanged.connect(self.valueChanged)

    minimum = QtCore.Property(float, lambda self: self._spin.minimum(), lambda self, v: self._spin.setMinimum(v))
    maximum = QtCore.Property(float, lambda self: self._spin.maximum(), lambda self, v: self._spin.setMaximum(v))
    singleStep = QtCore.Property(float, lambda self: self._spin.singleStep(), lambda self, v: self._spin.setSingleStep(v))
    decimals = QtCore.Property(int, lambda self: self._spin.decimals(), lambda self, v: self._spin.setDecimals(v))
    value = QtCore.Property(float, lambda self: self._spin.value(), lambda self, v: self._spin.setValue(v))


class qMRMLWidget(QtWidgets.QWidget):
    """The .ui's root: setMRMLScene reaches every node combo box, as the .ui's mrmlSceneChanged connections do."""

    def setMRMLScene(self, scene) -> None:
        for combo in self.findChildren(qMRMLNodeComboBox):
            combo.setMRMLScene(scene)


# ---------------------------------------------------------------------------------------------
# slicer.util's Qt parts and slicer.ScriptedLoadableModule


def loadUI(path: str) -> QtWidgets.QWidget:
    """Load a .ui file with QUiLoader, building the CTK/MRML stand-ins for their classes.

    The .ui's mrmlSceneChanged -> setMRMLScene connections name PythonQt signatures
    (vtkMRMLScene*) that PySide cannot match; they are left out and qMRMLWidget.setMRMLScene
    does what they do."""
    text = Path(path).read_text(encoding="utf-8")
    text = re.sub(r"<connections>.*</connections>", "", text, flags=re.S)
    loader = QtUiTools.QUiLoader()
    for cls in (ctkCollapsibleButton, ctkSliderWidget, qMRMLNodeComboBox, qMRMLWidget):
        loader.registerCustomWidget(cls)
    buffer = QtCore.QBuffer()
    buffer.setData(QtCore.QByteArray(text.encode("utf-8")))
    buffer.open(QtCore.QIODevice.OpenModeFlag.ReadOnly)
    widget = loader.load(buffer)
    if widget is None:
        raise RuntimeError(f"Could not load UI file: {path} ({loader.errorString()})")
    return widget


def childWidgetVariables(widget: QtWidgets.QWidget):
    """Every named child widget as an attribute, used the PythonQt way."""
    ui = types.SimpleNamespace()
    for child in widget.findChildren(QtWidgets.QWidget):
        if child.objectName():
            setattr(ui, child.objectName(), PythonQtWidget(child))
    return ui


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent
        self.moduleName = type(self).__name__


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        self.moduleName = type(self).__name__.removesuffix("Widget")
        self.parent = parent or ModuleWidgetParent()
        self.layout = self.parent.layout()

    def setup(self) -> None:
        """Slicer adds its Reload & Test section here in developer mode; nothing to add in tests."""


class ModuleWidgetParent(QtWidgets.QWidget):
    """What Slicer hands a module widget: a widget with a vertical layout and `isEntered`."""

    def __init__(self) -> None:
        super().__init__()
        QtWidgets.QVBoxLayout(self)
        self.isEntered = False


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        """Slicer's: the scene's singleton vtkMRMLScriptedModuleNode for this module, created when missing."""
        import slicer

        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, msec: int = 1000) -> None:
        logging.info(message)


class Application:
    """slicer.app in testing mode: dialogs answer their default (tests replace the answer where it matters)."""

    applicationName = "Slicer (test adapter)"

    def __init__(self, qapp: QtWidgets.QApplication, home: Path) -> None:
        self._qapp = qapp
        self.slicerHome = str(home)
        self.connections: list[tuple[str, object]] = []

    def testingEnabled(self) -> bool:
        return True

    def connect(self, signature: str, slot) -> None:
        self.connections.append((signature, slot))

    def startupEnvironment(self) -> QtCore.QProcessEnvironment:
        return QtCore.QProcessEnvironment.systemEnvironment()

    def __getattr__(self, name: str):
        return getattr(self._qapp, name)


def _python_slicer(home: Path) -> None:
    """<home>/bin/PythonSlicer: Slicer's Python launcher, here this interpreter."""
    launcher = home / "bin" / "PythonSlicer"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)


def install(standalone_scene) -> Application:
    """Make `import qt`, `import ctk`, `slicer.ScriptedLoadableModule`, `slicer.app` and `slicer.mrmlScene` work
    as in Slicer, on the given StandaloneScene. Returns slicer.app."""
    import slicer
    import slicer.util

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    qapp = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    qt = types.ModuleType("qt")
    for module in (QtCore, QtGui, QtWidgets):
        for name in dir(module):
            if not name.startswith("_"):
                setattr(qt, name, getattr(module, name))
    qt.QUiLoader = QtUiTools.QUiLoader
    ctk = types.ModuleType("ctk")
    ctk.ctkCollapsibleButton = ctkCollapsibleButton
    ctk.ctkSliderWidget = ctkSliderWidget
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(scripted, cls.__name__, cls)
    sys.modules.update({"qt": qt, "ctk": ctk, "slicer.ScriptedLoadableModule": scripted})
    _saved.update(loadUI=slicer.util.loadUI, childWidgetVariables=slicer.util.childWidgetVariables)
    slicer.ScriptedLoadableModule = scripted
    slicer.util.loadUI = loadUI
    slicer.util.childWidgetVariables = childWidgetVariables
    home = Path(tempfile.mkdtemp(prefix="slicer-home-"))
    _python_slicer(home)
    slicer.app = Application(qapp, home)
    slicer.mrmlScene = standalone_scene.scene
    return slicer.app


def uninstall() -> None:
    """Undo install(), so that other tests see the plain slicer-core wheel."""
    import slicer

    for name in ("qt", "ctk", "slicer.ScriptedLoadableModule"):
        sys.modules.pop(name, None)
    for name in ("app", "mrmlScene", "ScriptedLoadableModule"):
        if hasattr(slicer, name):
            delattr(slicer, name)
    for name, function in _saved.items():
        setattr(slicer.util, name, function)
