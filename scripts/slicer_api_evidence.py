"""Find where each Slicer/MRML/VTK/CTK/Qt name the extension uses is declared, in Slicer's source at a tag.

    python scripts/slicer_api_evidence.py --slicer-git <Slicer.git> [--ctk-git <CTK.git>] [--vtk-git <VTK.git>]
        [--pytorch-git <SlicerPyTorch.git>] [--tag v5.10.0] [--write | --add]

Reads the names from Testing/slicer_api.py, searches bare git repositories with `git grep` at
Slicer's tag (CTK at the revision that tag's SuperBuild/External_CTK.cmake pins), prints what it
found and, with --write, writes Testing/slicer_api_v5.10.0.json. A name found nowhere is printed
as MISSING and the script exits 1: the extension calls something Slicer at that tag lacks. --add looks up
only the names the file lacks and adds them (the other repositories are needed only if a new name is theirs).
Qt's own classes and members are not in these repositories; they are recorded against the Qt
version the tag requires (Slicer_REQUIRED_QT_VERSION), as Qt's documented API.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from Testing.slicer_api import used_names  # noqa: E402

OUTPUT = ROOT / "Testing" / "slicer_api_v5.10.0.json"
MRML_HEADERS = [
    "Libs/MRML/Core/*.h",
    "Libs/MRML/Logic/*.h",
    "Libs/vtkSegmentationCore/*.h",
    "Libs/vtkITK/*.h",
    "Base/Logic/*.h",
    "Modules/Loadable/*/Logic/*.h",
    "Modules/Loadable/*/MRML/*.h",
]
VTK_HEADERS = ["Common/Core/*.h", "Common/DataModel/*.h", "Common/Math/*.h", "Rendering/Core/*.h"]
# Methods whose name other classes share: the header of the class the extension calls them on.
RECEIVERS = {
    "Clear": "Libs/MRML/Core/vtkMRMLScene.h",
    "CreateDefaultDisplayNodes": "Libs/MRML/Core/vtkMRMLDisplayableNode.h",
    "DeepCopy": "Libs/vtkSegmentationCore/vtkSegmentation.h",
    "EndModify": "Libs/MRML/Core/vtkMRMLNode.h",
    "StartModify": "Libs/MRML/Core/vtkMRMLNode.h",
    "GetName": "Libs/MRML/Core/vtkMRMLNode.h",
    "GetDisplayNode": "Libs/MRML/Core/vtkMRMLDisplayableNode.h",
    "GetImageData": "Libs/MRML/Core/vtkMRMLVolumeNode.h",
    "GetSpacing": "Libs/MRML/Core/vtkMRMLVolumeNode.h",
    "SetAndObserveImageData": "Libs/MRML/Core/vtkMRMLVolumeNode.h",
    "GetSegmentation": "Libs/MRML/Core/vtkMRMLSegmentationNode.h",
    "GetSubjectHierarchyNode": "Libs/MRML/Core/vtkMRMLSubjectHierarchyNode.h",
    "SetMRMLScene": "Libs/MRML/Logic/vtkMRMLAbstractLogic.h",
    "SetFileName": "Libs/MRML/Core/vtkMRMLStorageNode.h",
    "SetTerminology": "Libs/vtkSegmentationCore/vtkSegment.h",
    "SerializeTerminologyEntry": "Modules/Loadable/Terminologies/Logic/vtkSlicerTerminologiesModuleLogic.h",
    "SetDimensions": "Common/DataModel/vtkImageData.h",
    "GetDimensions": "Common/DataModel/vtkImageData.h",
    "GetScalarRange": "Common/DataModel/vtkDataSet.h",
    "GetNumberOfScalarComponents": "Common/DataModel/vtkImageData.h",
    "GetElement": "Common/Math/vtkMatrix4x4.h",
    "InsertNextValue": "Common/Core/vtkStringArray.h",
}
# Bound widgets (DiffSegLib.widgets.PARAMETER_WIDGETS): which class each generic member belongs to.
BOUND = {"currentNode": "qMRMLNodeComboBox", "setCurrentNode": "qMRMLNodeComboBox", "value": "QSpinBox",
         "currentIndex": "QComboBox", "findData": "QComboBox", "itemData": "QComboBox", "checked": "QCheckBox"}
QT_WIDGET_PROPERTIES = {"visible", "enabled", "toolTip"}  # QWidget's


class Repo:
    def __init__(self, label: str, git_dir: str | None, rev: str):
        self.label, self.git_dir, self.rev = label, git_dir, rev

    def grep(self, pattern: str, paths: list[str]) -> str | None:
        """First 'label@rev:path:line: text' matching the extended regex, trying the paths in order; or None."""
        if not self.git_dir:
            return None
        for path_glob in paths:
            command = ["git", f"--git-dir={self.git_dir}", "grep", "-n", "-E", "-m1", pattern, self.rev, "--", path_glob]
            out = subprocess.run(command, capture_output=True, text=True).stdout.splitlines()
            if out:
                _rev, path, line, text = out[0].split(":", 3)
                return f"{self.label}@{self.rev}:{path}:{line}: {text.strip()[:160]}"
        return None

    def first(self, patterns: list[str], paths: list[str]) -> str | None:
        """The first pattern (most specific first) that matches anywhere in the paths."""
        return next((hit for pattern in patterns if (hit := self.grep(pattern, paths))), None)

    def show(self, path: str) -> str:
        return subprocess.run(["git", f"--git-dir={self.git_dir}", "show", f"{self.rev}:{path}"],
                              capture_output=True, text=True, check=True).stdout


def method_patterns(name: str) -> list[str]:
    """A C++ declaration of a method (a type before its name), or the VTK macro that declares it, or an enum value."""
    alternatives = [rf"^\s*(virtual |static |inline |const )*[A-Za-z_:<>]+[ *&]+{name}\s*\("]
    for prefix in ("Set", "Get"):
        if name.startswith(prefix):
            alternatives.append(rf"vtk{prefix}[A-Za-z0-9]*Macro\(\s*{name[len(prefix):]}\b")
    for suffix in ("On", "Off"):
        if name.endswith(suffix):
            alternatives.append(rf"vtkBooleanMacro\(\s*{name[: -len(suffix)]}\b")
    if name.endswith("Event"):
        alternatives += [rf"^\s*{name}\b\s*(=|,)", rf"_vtk_add_event\({name}\)"]
    return alternatives


def member_patterns(member: str) -> list[str]:
    """A Qt property or a method declared in a widget's header."""
    return [rf"Q_PROPERTY\([A-Za-z:]+\*? {member} ", rf"^\s*(Q_INVOKABLE |virtual )*[A-Za-z_:<>]+[ *&]+{member}\s*\("]


def find(name: str, slicer: Repo, ctk: Repo, vtk: Repo, pytorch: Repo, qt_version: str) -> str | None:
    qt = f"Qt {qt_version} documented API (Slicer {slicer.rev} requires Qt {qt_version}; not in Slicer's source)"
    head, _, member = name.partition(".")
    if name.startswith("slicer.util."):
        return slicer.grep(rf"^(def|class) {name.split('.')[2]}\b", ["Base/Python/slicer/util.py"])
    if name == "slicer.util":
        return slicer.grep(r"^def startupEnvironment\b", ["Base/Python/slicer/util.py"])
    if name.startswith("slicer.ScriptedLoadableModule."):
        return slicer.grep(rf"^class {name.split('.')[2]}\b", ["Base/Python/slicer/ScriptedLoadableModule.py"])
    if name == "slicer.app.connect":
        return slicer.grep(r"void startupCompleted\(\)", ["Base/QTGUI/qSlicerApplication.h", "Base/QTCore/*.h"])
    if name == "slicer.app.processEvents":
        return f"QCoreApplication::processEvents; {qt}"
    if name == "slicer.app.slicerHome":
        return slicer.grep(r"Q_PROPERTY\(QString slicerHome\b", ["Base/QTCore/qSlicerCoreApplication.h"])
    if name.startswith("slicer.modules."):
        module = name.split(".")[2]
        return slicer.grep(rf"class .*qSlicer{module.capitalize()}Module\b", [f"Modules/Loadable/{module.capitalize()}/*.h"])
    if head == "slicer" and member.startswith("vtk"):
        return slicer.grep(rf"^class [A-Z_]+_EXPORT {member}\b", ["*.h"])
    if head == "vtk":
        return vtk.grep(rf"^class [A-Z_]*EXPORT {member}\b", VTK_HEADERS)
    if head == "qt" or (head.startswith("Q") and head[1:2].isupper()):
        return qt
    if head == "bound":
        cls = BOUND[member]
        return find(f"{cls}.{member}", slicer, ctk, vtk, pytorch, qt_version)
    if head in ("qMRMLNodeComboBox", "qMRMLWidget"):
        if member in QT_WIDGET_PROPERTIES:
            return f"QWidget property; {qt}"
        patterns = member_patterns(member) if member else [rf"^class QMRML_WIDGETS_EXPORT {head}\b"]
        return slicer.first(patterns, [f"Libs/MRML/Widgets/{head}.h"])
    if head == "ctkCollapsibleButton":
        if member == "text":
            return f"QAbstractButton property; {qt}"
        patterns = member_patterns(member) if member else [r"^class CTK_WIDGETS_EXPORT ctkCollapsibleButton\b"]
        return ctk.first(patterns, ["Libs/Widgets/ctkCollapsibleButton.h"])
    if head == "qSlicerAbstractCoreModule":
        return slicer.grep(rf"Q_PROPERTY\(.*\b{member}\b", ["Base/QTCore/qSlicerAbstractCoreModule.h",
                                                           "Base/QTGUI/qSlicerScriptedLoadableModule.h"])
    if head == "qSlicerAbstractModuleWidget":
        return slicer.grep(rf"\b{member}\b", ["Base/QTGUI/qSlicerAbstractModuleWidget.h",
                                             "Base/QTCore/qSlicerAbstractModuleRepresentation.h"])
    if head == "SampleData":
        last = re.split(r"[.()]+", name.rstrip("()"))[-1]
        return slicer.grep(rf"^\s*(def|class) {last}\b", ["Modules/Scripted/SampleData/SampleData.py"])
    if head == "PyTorchUtils":
        last = re.split(r"[.()]+", name)[-1]
        return pytorch.grep(rf"^\s*(def|class) {last}\b", ["PyTorchUtils/PyTorchUtils.py"])
    if name in RECEIVERS:
        repo = vtk if RECEIVERS[name].startswith("Common/") else slicer
        patterns = method_patterns(name)
        if name == "SerializeTerminologyEntry":  # the overload taking the codes, not the entry object
            patterns = [r"static std::string SerializeTerminologyEntry\(std::string terminologyContextName"]
        if name == "GetNumberOfScalarComponents":  # the member, not the static overload
            patterns = [r"^\s*(virtual )?int GetNumberOfScalarComponents\(\);"]
        return repo.first(patterns, [RECEIVERS[name]])
    if name[:1].isupper() and "." not in name:
        return slicer.first(method_patterns(name), MRML_HEADERS) or vtk.first(method_patterns(name), VTK_HEADERS)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slicer-git", required=True)
    parser.add_argument("--ctk-git")
    parser.add_argument("--vtk-git")
    parser.add_argument("--vtk-rev", default="HEAD", help="a revision of Slicer's VTK fork")
    parser.add_argument("--pytorch-git")
    parser.add_argument("--tag", default="v5.10.0")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--add", action="store_true", help="look up only the names the file lacks and add them")
    args = parser.parse_args()
    slicer = Repo("Slicer", args.slicer_git, args.tag)
    ctk_rev = re.search(r'GIT_TAG\s*\n\s*"([0-9a-f]{40})"', slicer.show("SuperBuild/External_CTK.cmake")).group(1)
    qt_version = re.search(r'set\(_required_qt_version "([0-9.]+)"\)\s*\n\s*endif', slicer.show("CMakeLists.txt")).group(1)
    ctk = Repo("CTK", args.ctk_git, ctk_rev)
    vtk = Repo("Slicer/VTK", args.vtk_git, args.vtk_rev)
    pytorch = Repo("SlicerPyTorch", args.pytorch_git, "HEAD")
    found, missing = (json.loads(OUTPUT.read_text()) if args.add else {}), []
    for name, used_at in sorted(used_names().items()):
        if name in found:
            continue
        where = find(name, slicer, ctk, vtk, pytorch, qt_version)
        if where is None:
            missing.append(f"MISSING {name} (used at {used_at})")
        else:
            found[name] = where
            print(f"{name}: {where}")
    print("\n".join(missing))
    if (args.write or args.add) and not missing:
        OUTPUT.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
        print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(found)} names)")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
