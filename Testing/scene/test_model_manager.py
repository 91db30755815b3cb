"""The Model section's import, remove and search, driven as a user drives them, with the real child process.

DiffSeg.py runs through Testing/slicer_adapter.py; the file dialog and the Ok/Cancel question are answered
by the test (only a real Slicer shows them); the import is the real `diffseg models import` in a child.
"""

from __future__ import annotations

import shutil

import pytest
import slicer
from conftest import CASE

from DiffSegCore.models.metadata import read_meta

pytest.importorskip("torch", reason="checking an imported bundle's weights needs torch (not in the light 3.12 venv)")
from test_module import BUNDLED, answer, app, open_module, pump  # noqa: F401  (app is the adapter fixture)


def choose_file(monkeypatch, path) -> None:
    """The file dialog returns `path`, as PythonQt's QFileDialog.getOpenFileName does (a string)."""
    import qt

    monkeypatch.setattr(qt.QFileDialog, "getOpenFileName", staticmethod(lambda *args: str(path)))


def test_import_a_folder_or_zip_search_and_remove(app, standalone, tiny_bundle, tmp_path, monkeypatch):  # noqa: F811
    import qt

    monkeypatch.setenv("DIFFSEG_HOME", str(tmp_path / "home"))
    errors: list[str] = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: errors.append(text))
    standalone.load_volume(CASE, "hippocampus_001")
    widget = open_module(app)
    ui, p = widget.ui, widget._parameterNode
    meta = read_meta(tiny_bundle)
    assert p.model == BUNDLED and not ui.removeModelButton.enabled  # a bundled model cannot be removed

    # import a folder (its model.json chosen in the dialog): checked in the child, listed, chosen, its defaults shown
    choose_file(monkeypatch, tiny_bundle / "model.json")
    ui.importModelButton.click()
    assert widget._import is not None and not ui.applyButton.enabled and not ui.importModelButton.enabled
    pump(widget, timeout=120)
    assert not errors, errors
    assert ui.statusLabel.text == f"Imported {meta['id']}." and p.model == meta["id"]
    assert (p.steps, p.ensemble) == (meta["defaults"]["steps"], meta["defaults"]["ensemble"])
    assert "diffseg models import" in ui.logTextEdit.toPlainText()
    assert (tmp_path / "home" / "models" / meta["id"] / meta["version"] / "model.json").is_file()
    assert ui.removeModelButton.enabled and ui.applyButton.enabled
    # the list's tooltip: description, classes and licence
    tip = ui.modelSelector.itemData(ui.modelSelector.currentIndex, qt.Qt.ToolTipRole)
    assert tip == ui.modelSelector.toolTip
    for text in (meta["description"], *(c["name"] for c in meta["classes"]), meta["license"]):
        assert text in tip

    # the same model again, from a zip: refused with the core's one-line error, nothing changes
    archive = shutil.make_archive(str(tmp_path / "tiny"), "zip", tiny_bundle)
    choose_file(monkeypatch, archive)
    ui.importModelButton.click()
    pump(widget, timeout=120)
    assert len(errors) == 1 and "already in the cache" in errors[0] and "\n" not in ui.statusLabel.text
    assert ui.statusLabel.text.startswith(f"Import failed: model {meta['id']}@{meta['version']} is already in the cache")
    assert p.model == meta["id"] and ui.progressBar.maximum == 1000

    # search: typing part of a title finds it
    completer = ui.modelSelector.completer()
    completer.setCompletionPrefix(meta["title"][5:12].upper())
    assert completer.completionCount() == 1 and completer.currentCompletion() == meta["title"]

    # remove asks first; no keeps it, yes removes it from the cache and goes back to the first model
    asked = answer(monkeypatch, False)
    ui.removeModelButton.click()
    assert len(asked) == 1 and meta["id"] in asked[0] and meta["id"] in widget._models
    answer(monkeypatch, True)
    ui.removeModelButton.click()
    assert meta["id"] not in widget._models and p.model == BUNDLED
    assert ui.statusLabel.text == f"Removed {meta['id']}@{meta['version']}."
    assert not (tmp_path / "home" / "models" / meta["id"]).exists()
