"""DiffSeg.py itself, imported and driven as a user drives it, on a real MRML scene from the slicer-core wheel.

Slicer's PythonQt `qt`, `ctk` and `slicer.ScriptedLoadableModule` come from Testing/slicer_adapter.py
(PySide6 underneath); the scene, the nodes, slicer.util and the child process are real.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
import time
import types
import zipfile

import pytest
import slicer
from conftest import CASE
from DiffSegLib import dependencies
from DiffSegLib.worker import CANCEL_GRACE_S, READER_JOIN_S

from DiffSegCore.models.metadata import read_meta
from DiffSegCore.resources import resource_path
from DiffSegCore.settings import BY_NAME
from Testing import slicer_adapter

BUNDLED = "hippocampus-recycling-x0"
FAST = {"ensemble": 2, "device": "auto"}  # device auto: the node must record the device used


@pytest.fixture
def app(standalone):
    app = slicer_adapter.install(standalone)
    app.widgets = []
    yield app
    for widget in app.widgets:
        widget.cleanup()  # as Slicer does when the module is unloaded
    slicer_adapter.uninstall()
    sys.modules.pop("DiffSeg", None)


def open_module(app):
    """What Slicer does when the user opens the module: create it, build its widget, enter it."""
    DiffSeg = importlib.import_module("DiffSeg")
    module = DiffSeg.DiffSeg(types.SimpleNamespace())
    assert module.parent.title == "DiffSeg"
    assert ("startupCompleted()", DiffSeg.registerSampleData) in app.connections
    widget = DiffSeg.DiffSegWidget()
    app.widgets.append(widget)
    widget.setup()
    widget.parent.show()
    widget.parent.isEntered = True
    widget.enter()
    return widget


def pump(widget, timeout: float = 240.0) -> None:
    """Let Qt run the panel's timer until the run, install or model import ends."""
    deadline = time.monotonic() + timeout
    while widget._busy():
        slicer.app.processEvents()
        time.sleep(0.02)
        assert time.monotonic() < deadline, "the run did not end"


def answer(monkeypatch, reply: bool) -> list[str]:
    """Answer the panel's Ok/Cancel questions with `reply`; returns the questions asked."""
    asked: list[str] = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: asked.append(text) or reply)
    return asked


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def test_open_module_lists_the_bundled_model_with_its_defaults(app, standalone):
    volume = standalone.load_volume(CASE, "hippocampus_001")
    widget = open_module(app)
    ui, p = widget.ui, widget._parameterNode
    defaults = read_meta(resource_path("Models", "hippocampus"))["defaults"]

    # the dependency bar shows exactly when something is missing (never in the development venv; always in
    # the light Python 3.12 one, which has no torch: there it is a fresh Slicer)
    missing = dependencies.check_all()
    assert ui.dependencyFrame.visible == bool(missing)
    assert ui.modelSelector.count >= 1 and p.model == BUNDLED
    # the first model's own defaults, in the parameter node and in the widgets
    assert (p.steps, p.ensemble, p.sampler) == (defaults["steps"], defaults["ensemble"], defaults["sampler"])
    assert (ui.stepsSpinBox.value, ui.ensembleSpinBox.value) == (defaults["steps"], defaults["ensemble"])
    assert ui.samplerComboBox.currentText == defaults["sampler"]
    for name, spin in (("steps", ui.stepsSpinBox), ("ensemble", ui.ensembleSpinBox), ("seed", ui.seedSpinBox)):
        assert (spin.minimum, spin.maximum) == (BY_NAME[name].minimum, BY_NAME[name].maximum)  # settings.py's ranges
    # the common path on top, the rest collapsed
    assert ui.advancedCollapsibleButton.collapsed and ui.logCollapsibleButton.collapsed
    assert not ui.inputsCollapsibleButton.collapsed and not ui.outputsCollapsibleButton.collapsed
    # the input is picked, labelled with the model's channel name; intended use and end-to-end time are shown
    assert p.inputVolume is volume and ui.inputVolumeSelector.currentNode() is volume
    assert ui.inputVolumeLabel.text == "T1:" and not ui.channel2Selector.visible
    assert "Intended use:" in ui.modelInfoLabel.text and "end to end" in ui.modelInfoLabel.text
    assert ui.applyButton.enabled == (not missing)

    # a user's change in the panel reaches the parameter node, which is saved with the scene
    ui.ensembleSpinBox.value = 3
    ui.deviceComboBox.currentIndex = ui.deviceComboBox.findData("cpu")
    assert (p.ensemble, p.device) == (3, "cpu")
    # the uncertainty output can never be the input volume
    ui.outputUncertaintySelector.setCurrentNode(volume)
    assert p.outputUncertainty is volume and not ui.applyButton.enabled
    if not missing:
        assert "must not be an input" in ui.applyButton.toolTip


def test_model_defaults_come_from_the_registry_before_a_download(app, standalone, tmp_path, monkeypatch):
    """A registry model that is not on this computer: its channels and defaults are known without downloading it."""
    registry = tmp_path / "models.json"
    entry = {
        "id": "two-channel",
        "title": "Two-channel test model",
        "description": "for tests",
        "modality": "MR",
        "classes": [{"value": 1, "name": "Lesion"}],
        "channels": [{"name": "FLAIR"}, {"name": "T1c"}],
        "defaults": {"steps": 3, "ensemble": 7, "sampler": "ddpm"},
        "train_steps": 10,
        "license": "CC0-1.0",
        "citation": "",
        "expected_seconds": {"gpu": 1, "cpu": 9},
        "versions": [{"version": "1.0.0", "url": "https://example.org/m.zip", "sha256": "0" * 64, "size": 10}],
    }
    registry.write_text(json.dumps({"format_version": 1, "models": [entry]}))
    monkeypatch.setenv("DIFFSEG_REGISTRY", str(registry))
    monkeypatch.setenv("DIFFSEG_HOME", str(tmp_path / "home"))
    standalone.load_volume(CASE, "flair")
    widget = open_module(app)
    ui, p = widget.ui, widget._parameterNode
    if importlib.util.find_spec("jsonschema") is None:  # a fresh Slicer: only the shipped registry is trusted unchecked
        assert "needs the jsonschema package" in ui.modelInfoLabel.text and not ui.applyButton.enabled
        return
    assert p.model == "two-channel" and "downloaded on first use" in ui.modelInfoLabel.text
    assert (p.steps, p.ensemble, p.sampler) == (3, 7, "ddpm")
    assert (ui.inputVolumeLabel.text, ui.channel2Label.text) == ("FLAIR:", "T1c:")
    assert ui.channel2Selector.visible and not ui.channel3Selector.visible
    assert not ui.applyButton.enabled and "2 input channels" in ui.applyButton.toolTip
    # its registry entry has no network settings: no memory estimate, and nothing raised
    assert "This volume" not in ui.modelInfoLabel.text


def _wheel(folder, name: str, version: str):
    """A real, minimal wheel (metadata only) that pip can install offline."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    files = {
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
        archive.writestr(f"{dist}/RECORD", "".join(f"{m},,\n" for m in files) + f"{dist}/RECORD,,\n")
    return path


def test_missing_package_shows_install_which_asks_first_and_shows_pip_progress(app, standalone, tmp_path, monkeypatch):
    probe = "diffseg-probe-package"
    # only the probe is missing; PyTorch comes from Slicer's PyTorch extension, which only Slicer has
    monkeypatch.setattr(dependencies, "REQUIREMENTS", {probe: "1.0"})
    monkeypatch.setattr(dependencies, "check_torch", lambda: None)
    standalone.load_volume(CASE, "hippocampus_001")
    widget = open_module(app)
    ui = widget.ui

    # at the top: what is missing, with its minimum version; Apply waits for it; models are listed anyway
    assert ui.dependencyFrame.visible and f"{probe} >= 1.0 (not installed)" in ui.dependencyLabel.text
    assert not ui.applyButton.enabled and "Install" in ui.applyButton.toolTip
    assert widget._parameterNode.model == BUNDLED

    # declined: nothing runs, nothing changes
    asked = answer(monkeypatch, False)
    ui.installButton.click()
    assert len(asked) == 1 and probe in asked[0]
    assert widget._install is None and ui.statusLabel.text == "Nothing was installed."
    assert dependencies.check_packages() and ui.dependencyFrame.visible

    # accepted: a real pip run (offline, from a local wheel, into a folder on sys.path), its output in the log
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _wheel(wheels, probe.replace("-", "_"), "1.2.0")
    for key, value in {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_TARGET": str(target)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(target))
    answer(monkeypatch, True)
    ui.installButton.click()
    assert widget._install is not None and ui.progressBar.maximum == 0  # busy while pip works
    assert not ui.installButton.enabled and not ui.applyButton.enabled
    pump(widget, timeout=120)
    importlib.invalidate_caches()
    assert "Successfully installed" in ui.logTextEdit.toPlainText()
    assert ui.statusLabel.text == "DiffSeg's Python packages are installed."
    assert not ui.dependencyFrame.visible and ui.applyButton.enabled
    assert ui.progressBar.maximum == 1000


def test_a_package_too_old_is_reported_with_both_versions(monkeypatch):
    monkeypatch.setitem(dependencies.REQUIREMENTS, "pytest", "999")
    [problem] = [p for p in dependencies.check_packages() if p.name == "pytest"]
    assert problem.found is not None and problem.describe() == f"pytest >= 999 ({problem.found} installed)"
    assert problem.requirement == "pytest>=999"


def test_max_memory_is_bound_and_the_estimate_follows_the_volume_and_settings(app, standalone):
    from DiffSegLib.logic import NO_FIT

    from DiffSegCore.inference.memory import GIB, estimate_run
    from DiffSegCore.settings import resolve

    volume = standalone.load_volume(CASE, "hippocampus_001")
    widget = open_module(app)
    ui, p = widget.ui, widget._parameterNode
    spin = ui.maxMemorySpinBox
    # in the Advanced section, 0 = automatic (settings.py's None), then settings.py's range
    assert spin.parent() == ui.advancedCollapsibleButton and spin.specialValueText == "Automatic"
    assert (spin.minimum, spin.maximum, spin.value, p.max_memory) == (0.0, BY_NAME["max_memory"].maximum, 0.0, 0.0)

    # the estimate, from the volume's size and spacing and the model's resolved settings, beside the expected time
    meta = read_meta(resource_path("Models", "hippocampus"))
    plan = estimate_run(meta, volume.GetImageData().GetDimensions(), volume.GetSpacing(), resolve(meta))
    text = ui.modelInfoLabel.text
    assert text.index("Expected time") < text.index("This volume:")
    assert f"about {plan.peak_bytes / GIB:.1f} GB of memory" in text
    assert f"{plan.members_per_batch} of {meta['defaults']['ensemble']} members at once" in text

    # a larger ensemble changes it; a cap below what a run needs says so
    ui.ensembleSpinBox.value = 20
    assert "of 20 members at once" in ui.modelInfoLabel.text
    spin.value = 0.2
    assert p.max_memory == 0.2 and NO_FIT in ui.modelInfoLabel.text
    spin.value = 0.0
    assert p.max_memory == 0.0 and NO_FIT not in ui.modelInfoLabel.text
    # without a volume, no estimate
    p.inputVolume = None
    assert "This volume" not in ui.modelInfoLabel.text


def test_the_estimate_never_raises_on_a_model_json_without_full_network_settings(monkeypatch):
    from DiffSegLib.logic import describe_estimate

    meta = read_meta(resource_path("Models", "hippocampus"))
    assert "GB of memory" in describe_estimate(meta, (64, 64, 48), (1.0, 1.0, 1.0), {})
    partial = {**meta, "network": {"kind": "diffusion", "num_classes": 3}}  # no widths, no image channels
    for broken in (partial, {key: v for key, v in meta.items() if key != "network"}, {**meta, "network": None}):
        assert describe_estimate(broken, (64, 64, 48), (1.0, 1.0, 1.0), {}) == ""
    assert describe_estimate(meta, (64, 64, 48), (1.0, 1.0, 1.0), {"steps": 999}) == ""  # more than it can take

    def unreadable() -> int:  # as on Windows, which has no os.sysconf
        raise AttributeError("module 'os' has no attribute 'sysconf'")

    from DiffSegCore.inference import memory

    monkeypatch.setattr(memory, "host_available_bytes", unreadable)
    assert describe_estimate(meta, (64, 64, 48), (1.0, 1.0, 1.0), {}) == ""


def test_apply_progress_result_reapply_and_cancel(app, standalone, monkeypatch):
    pytest.importorskip("torch", reason="the run itself needs the core's packages (not in the light 3.12 venv)")
    scene = standalone.scene
    volume = standalone.load_volume(CASE, "hippocampus_001")
    # a registered input in a patient's study: the results must follow it
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient"), "MR study")
    hierarchy.CreateItem(study, volume)

    widget = open_module(app)
    ui, p = widget.ui, widget._parameterNode
    p.ensemble, p.device = FAST["ensemble"], FAST["device"]
    ui.maxMemorySpinBox.value = 3.0
    progress: list[int] = []
    ui.progressBar._qobject.valueChanged.connect(progress.append)

    ui.applyButton.click()
    assert ui.applyButton.text == "Cancel" and ui.applyButton.enabled
    pump(widget)
    run = widget._run
    assert run.state == "done", run.error
    assert ui.applyButton.text == "Apply" and ui.progressBar.value == 1000 and ui.statusLabel.text.startswith("Done")
    assert len(set(progress)) >= 3  # several steps on the way
    assert "Sampling" in ui.logTextEdit.toPlainText()

    segmentation, uncertainty = run.segmentationNode, run.uncertaintyNode
    # written back to the selectors, so the next Apply reuses them
    assert p.outputSegmentation is segmentation and p.outputUncertainty is uncertainty
    assert ui.outputSegmentationSelector.currentNode() is segmentation
    # beside the input: its study and its parent transform
    for node in (segmentation, uncertainty):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
        assert node.GetTransformNodeID() == transform.GetID()
    assert segmentation.GetAttribute("DiffSeg.device") == "cpu"  # what ran, not "auto"
    # Max memory reached the run; settings the panel does not show take the model's defaults (settings.resolve)
    assert float(segmentation.GetAttribute("DiffSeg.max_memory")) == 3.0
    defaults = read_meta(resource_path("Models", "hippocampus"))["defaults"]
    assert float(segmentation.GetAttribute("DiffSeg.foreground_threshold")) == defaults["foreground_threshold"]
    assert segmentation.GetAttribute("DiffSeg.precision") == BY_NAME["precision"].default
    segments = segmentation.GetSegmentation()
    terms = [segments.GetNthSegment(i).GetTerminology() for i in range(segments.GetNumberOfSegments())]
    assert "Anterior" in terms[0] and "Posterior" in terms[1]

    # re-Apply asks before replacing; no means nothing happens
    before = node_ids(scene)
    asked = answer(monkeypatch, False)
    ui.applyButton.click()
    assert len(asked) == 1 and segmentation.GetName() in asked[0]
    assert not widget._running() and node_ids(scene) == before
    # yes replaces the result in the same nodes
    answer(monkeypatch, True)
    ui.applyButton.click()
    pump(widget)
    assert widget._run.state == "done" and widget._run.segmentationNode is segmentation
    assert widget._run.uncertaintyNode is uncertainty and node_ids(scene) == before

    # Cancel returns within a second and leaves the scene as it was
    content = segments.GetNumberOfSegments(), segmentation.GetAttribute("DiffSeg.seed")
    p.ensemble = 32
    ui.applyButton.click()
    deadline = time.monotonic() + 120
    while "Sampling" not in widget._run.message and widget._running() and time.monotonic() < deadline:
        slicer.app.processEvents()
        time.sleep(0.05)
    assert widget._running(), "the run ended before it could be cancelled; the test needs a longer run"
    started = time.monotonic()
    ui.applyButton.click()
    assert time.monotonic() - started < 1.0 and CANCEL_GRACE_S + READER_JOIN_S < 1.0
    assert widget._run.state == "cancelled" and ui.applyButton.text == "Apply"
    assert node_ids(scene) == before
    assert (segments.GetNumberOfSegments(), segmentation.GetAttribute("DiffSeg.seed")) == content


def test_a_failed_run_shows_the_error_and_opens_the_log(app, standalone, tiny_bundle, tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="the run itself needs the core's packages (not in the light 3.12 venv)")
    pytest.importorskip("jsonschema", reason="a registry other than the shipped one is checked with jsonschema")
    broken = tmp_path / "zoo" / "tiny"
    shutil.copytree(tiny_bundle, broken)
    (broken / "diffusion.safetensors").write_bytes(b"not weights")
    meta = read_meta(broken)
    entry = {key: meta[key] for key in ("id", "title", "description", "modality", "license", "classes")}
    entry.update(citation="", expected_seconds={"gpu": 1, "cpu": 1}, versions=[{"version": "0.0.1", "bundled": "tiny"}])
    registry = tmp_path / "zoo" / "models.json"
    registry.write_text(json.dumps({"format_version": 1, "models": [entry]}))
    monkeypatch.setenv("DIFFSEG_REGISTRY", str(registry))
    standalone.load_volume(CASE, "hippocampus_001")
    errors: list[str] = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: errors.append(text))
    widget = open_module(app)
    widget._parameterNode.device = "cpu"
    before = node_ids(standalone.scene)
    widget.ui.applyButton.click()
    pump(widget)
    assert widget._run.state == "failed" and widget.ui.applyButton.text == "Apply"
    assert len(errors) == 1 and widget._run.error in errors[0] and "Log" in errors[0]
    assert not widget.ui.logCollapsibleButton.collapsed and widget.ui.logTextEdit.toPlainText().strip()
    assert node_ids(standalone.scene) == before
