"""Every Slicer, MRML, VTK, CTK and Qt name the extension uses was found in Slicer's source at v5.10.0.

Testing/slicer_api_v5.10.0.json records where (scripts/slicer_api_evidence.py wrote it from a clone
of Slicer at that tag). A name used but not in the list fails here: check it against Slicer 5.10.0
and rerun the script, or use an API that Slicer 5.10 has.
"""

from __future__ import annotations

import json

from conftest import ROOT

from Testing.slicer_api import used_names

CHECKED = json.loads((ROOT / "Testing" / "slicer_api_v5.10.0.json").read_text())


def test_every_name_the_extension_uses_was_found_in_slicer_5_10():
    used = used_names()
    unchecked = {name: where for name, where in used.items() if name not in CHECKED}
    assert not unchecked, f"not checked against Slicer 5.10.0 (run scripts/slicer_api_evidence.py): {unchecked}"
    stale = sorted(set(CHECKED) - set(used))
    assert not stale, f"checked but no longer used (rerun scripts/slicer_api_evidence.py --write): {stale}"


def test_each_record_names_a_source_line_or_the_qt_version():
    for name, where in CHECKED.items():
        assert where.startswith(("Slicer@v5.10.0:", "CTK@", "Slicer/VTK@", "SlicerPyTorch@")) or "Qt 5.15" in where, name


def test_the_list_catches_a_call_outside_it(tmp_path):
    """A made-up MRML call in extension code is reported as unchecked."""
    module = tmp_path / "DiffSegExtension" / "probe.py"
    module.parent.mkdir()
    module.write_text("import slicer\nnode = slicer.mrmlScene.GetFirstNodeByClass('x')\nnode.SetNoSuchThing(1)\n")
    import Testing.slicer_api as api

    original = api.ROOT
    api.ROOT = tmp_path
    try:
        found = api.used_names([module])
    finally:
        api.ROOT = original
    assert "SetNoSuchThing" in found and "SetNoSuchThing" not in CHECKED
    assert "GetFirstNodeByClass" in found and "GetFirstNodeByClass" in CHECKED


def test_cmake_ships_every_module_file_and_registers_the_self_test():
    """A Slicer build installs only the scripts CMake lists, and runs DiffSegTest through CTest."""
    cmake = (ROOT / "DiffSegExtension" / "CMakeLists.txt").read_text()
    listed = set(cmake.split("set(MODULE_PYTHON_SCRIPTS", 1)[1].split(")", 1)[0].split())
    shipped = {"${MODULE_NAME}.py"} | {
        str(path.relative_to(ROOT / "DiffSegExtension"))
        for path in (ROOT / "DiffSegExtension").rglob("*.py")
        if path.name != "DiffSeg.py"
    }
    assert listed == shipped
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
