"""DiffSeg: diffusion-model segmentation with uncertainty, as a 3D Slicer scripted module.

The panel and the scene live here; the work runs in a separate process (the DiffSegCore command
line) so the GUI never freezes. See DiffSegLib for the scene bridge, worker and dependencies.
"""

import logging
import sys
import time
from pathlib import Path

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _addCoreToPath() -> None:
    """In a source checkout DiffSegCore sits beside this module's folder; installed, it is already importable."""
    root = Path(__file__).resolve().parent.parent
    if (root / "DiffSegCore").is_dir() and str(root) not in sys.path:
        sys.path.insert(0, str(root))


_addCoreToPath()

from DiffSegLib import dependencies  # noqa: E402
from DiffSegLib.logic import (  # noqa: E402
    MODEL_SETTINGS,
    SegmentationLogic,
    child_error,
    describe_estimate,
    model_meta,
    start_child,
)
from DiffSegLib.parameters import PRESEG_CHOICES, Parameters  # noqa: E402
from DiffSegLib.review_panel import ReviewPanel  # noqa: E402
from DiffSegLib.scene import find_segmentation_conflict  # noqa: E402
from DiffSegLib.widgets import PARAMETER_WIDGETS, WIDGET_CLASSES  # noqa: E402

from DiffSegCore import settings as run_settings  # noqa: E402
from DiffSegCore.resources import resource_path  # noqa: E402
from DiffSegCore.settings import BY_NAME, DEVICES, SAMPLERS  # noqa: E402

SAMPLE_CATEGORY = "DiffSeg"
TIMER_INTERVAL_MS = 100
PROGRESS_MAXIMUM = 1000  # the progress bar's range while a run goes (0 makes it a busy bar)

#
# DiffSeg
#


class DiffSeg(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and help."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DiffSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["DiffSeg contributors"]
        self.parent.helpText = """
Segments 3D volumes with denoising diffusion models and shows how sure the model is: an ensemble of
samples gives a segmentation (their mean) and a per-voxel uncertainty volume (their variance).
Choose the input volume and a model, set the number of steps and ensemble members, and click Apply;
click again to cancel. Optionally start from a pre-segmentation (the model's own network or a
segmentation you drew) to need fewer steps.
<br><br>
Methods: Fu et al. 2023, "Importance of Aligning Training Strategy with Evaluation for Diffusion Models
in 3D Multiclass Segmentation" (recycling training, variance-resampled steps); Bieder et al. 2023,
"Memory-Efficient 3D Denoising Diffusion Models for Medical Image Processing" (PatchDDM, implicit
ensembles); Guo et al. 2022, "Accelerating Diffusion Models via Pre-segmentation Diffusion Sampling for
Medical Image Segmentation" (PD-DDPM); Li et al. 2024, "Diffusion Model Pre-training with Anatomical
Guidance for 3D Medical Image Segmentation".
"""
        self.parent.acknowledgementText = """
The bundled hippocampus model and sample case use the Medical Segmentation Decathlon Task04 data
(Vanderbilt University Medical Center; Antonelli et al., Nature Communications 13, 4128, 2022; Simpson et
al., arXiv:1902.09063, 2019), licensed CC-BY-SA 4.0.
"""
        icon = resource_path("Icons", "DiffSeg.png")
        if icon.is_file():
            self.parent.icon = qt.QIcon(str(icon))
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Add the bundled sample volumes (Resources/SampleData) to the Sample Data module."""
    import SampleData

    for path in sorted(resource_path("SampleData").glob("*.nii.gz")):
        name = path.name[: -len(".nii.gz")]
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category=SAMPLE_CATEGORY,
            sampleName=name,
            uris=path.as_uri(),
            fileNames=path.name,
            nodeNames=name,
            loadFileType="VolumeFile",
        )


#
# DiffSegWidget
#

# Run settings shown in spin boxes, with the range settings.py gives them.
SPIN_SETTINGS = {"steps": "stepsSpinBox", "ensemble": "ensembleSpinBox", "preseg_step": "presegStepSpinBox", "seed": "seedSpinBox"}
# Combo boxes: parameter -> (widget, {value: label}).
CHOICE_WIDGETS = {
    "sampler": ("samplerComboBox", {name: name for name in SAMPLERS}),
    "device": ("deviceComboBox", {name: name for name in DEVICES}),
    "preseg": ("presegComboBox", PRESEG_CHOICES),
}
# The signal each kind of bound widget emits when the user changes it.
CHANGE_SIGNALS = {
    "qMRMLNodeComboBox": "currentNodeChanged(vtkMRMLNode*)",
    "QSpinBox": "valueChanged(int)",
    "QDoubleSpinBox": "valueChanged(double)",
    "QComboBox": "currentIndexChanged(int)",
    "QCheckBox": "toggled(bool)",
}
CHANNEL_ROWS = (("inputVolumeLabel", "inputVolumeSelector"), ("channel2Label", "channel2Selector"),
                ("channel3Label", "channel3Selector"))


def model_tooltip(info) -> str:
    """What the model list shows when the pointer rests on a model: description, classes and licence."""
    classes = ", ".join(c["name"] for c in info.classes)
    return f"{info.title} ({info.id})\n{info.description}\nClasses: {classes}\nLicense: {info.license}"


def removable(info) -> bool:
    """A model with a version in the model cache (downloaded or imported); bundled ones ship with DiffSeg."""
    return any(v.installed and v.source != "bundled" for v in info.versions)


class DiffSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: dependency check, settings bound to the parameter node, Apply/Cancel, progress, status and log."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self._run = None
        self._install = None  # the pip Worker while packages are being installed
        self._import = None  # the `diffseg models import` Worker while a model is being imported
        self._modelsBeforeImport = set()  # model ids listed when the import started: the new one is selected
        self._problems = []
        self._models = {}
        self._timer = qt.QTimer()
        self._timer.setInterval(TIMER_INTERVAL_MS)
        self._timer.timeout.connect(self._onTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(resource_path("UI", "DiffSeg.ui")))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        missing = [name for name in WIDGET_CLASSES if not hasattr(self.ui, name)]
        if missing:
            raise RuntimeError(f"DiffSeg.ui lacks widgets {missing}; reinstall the extension")
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.reviewPanel = ReviewPanel(self.ui)  # the Review section: table, uncertain regions, overlay
        self.logic = DiffSegLogic()
        self._setupChoices()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.installButton.connect("clicked(bool)", self.onInstallButton)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        for name in PARAMETER_WIDGETS.values():
            getattr(self.ui, name).connect(CHANGE_SIGNALS[WIDGET_CLASSES[name]], self.updateParameterNodeFromGUI)
        self.checkDependencies()
        self.refreshModels()
        self.initializeParameterNode()

    def _setupChoices(self) -> None:
        """Ranges and choices come from settings.py, not from the .ui."""
        for name, widgetName in SPIN_SETTINGS.items():
            spin = getattr(self.ui, widgetName)
            spin.minimum, spin.maximum = int(BY_NAME[name].minimum), int(BY_NAME[name].maximum)
        # 0 is the spin box's special value "Automatic" (settings.py's None); above it settings.py's range.
        self.ui.maxMemorySpinBox.minimum, self.ui.maxMemorySpinBox.maximum = 0.0, BY_NAME["max_memory"].maximum
        for widgetName, labels in CHOICE_WIDGETS.values():
            combo = getattr(self.ui, widgetName)
            combo.clear()
            for value, label in labels.items():
                combo.addItem(label, value)
        # The model list is searchable: typing filters it by any part of a model's title.
        self._modelCompleter = qt.QCompleter(self.ui.modelSelector.model())
        self._modelCompleter.setFilterMode(qt.Qt.MatchContains)
        self._modelCompleter.setCaseSensitivity(qt.Qt.CaseInsensitive)
        self.ui.modelSelector.setCompleter(self._modelCompleter)

    def cleanup(self) -> None:
        """Module reloaded or application closing: stop any run and observers."""
        self._cancelChildren()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelChildren()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        self.reviewPanel.clear()  # its nodes are gone
        if self.parent.isEntered:
            self.initializeParameterNode()

    def _cancelChildren(self) -> None:
        if self._running():
            self._run.cancel()
        for worker in (self._install, self._import):
            if worker is not None and worker.running():
                worker.cancel()

    # parameter node <-> GUI

    def initializeParameterNode(self) -> None:
        self.setParameterNode(Parameters(self.logic.getParameterNode()))
        p = self._parameterNode
        if not p.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                p.inputVolume = first
        if not p.model and self._models:
            p.model = next(iter(self._models))
            self._applyModelDefaults()

    def setParameterNode(self, parameters) -> None:
        if self._parameterNode:
            self.removeObserver(self._parameterNode.node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = parameters
        if self._parameterNode:
            self.addObserver(self._parameterNode.node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            for field, name in PARAMETER_WIDGETS.items():
                widget, value = getattr(self.ui, name), getattr(p, field)
                kind = WIDGET_CLASSES[name]
                if kind == "qMRMLNodeComboBox":
                    widget.setCurrentNode(value)
                elif kind in ("QSpinBox", "QDoubleSpinBox"):
                    widget.value = value
                elif kind == "QComboBox":
                    widget.currentIndex = widget.findData(value)
                else:
                    widget.checked = value
        finally:
            self._updatingGUI = False
        self._updateState()

    def updateParameterNodeFromGUI(self, *args) -> None:
        p = self._parameterNode
        if p is None or self._updatingGUI:
            return
        wasModifying = p.node.StartModify()
        try:
            for field, name in PARAMETER_WIDGETS.items():
                widget, kind = getattr(self.ui, name), WIDGET_CLASSES[name]
                if kind == "qMRMLNodeComboBox":
                    setattr(p, field, widget.currentNode())
                elif kind in ("QSpinBox", "QDoubleSpinBox"):
                    setattr(p, field, widget.value)
                elif kind == "QComboBox":
                    if widget.currentIndex >= 0:
                        setattr(p, field, widget.itemData(widget.currentIndex))
                else:
                    setattr(p, field, widget.checked)
        finally:
            p.node.EndModify(wasModifying)

    # dependencies

    def checkDependencies(self) -> bool:
        """Show what is missing (name and minimum version) at the top of the panel; True if nothing is."""
        self._problems = dependencies.check_all()
        self.ui.dependencyFrame.visible = bool(self._problems)
        if self._problems:
            self.ui.dependencyLabel.text = dependencies.summary(self._problems)
        return not self._problems

    def onInstallButton(self) -> None:
        """Ask, then install: PyTorch through the PyTorch extension, the rest with pip in the background."""
        if self.checkDependencies() or self._install is not None:
            return
        names = ", ".join(p.describe() for p in self._problems)
        if not slicer.util.confirmOkCancelDisplay(
            f"DiffSeg will download and install these Python packages into Slicer (a few minutes):\n\n{names}",
            windowTitle="DiffSeg: install Python packages",
        ):
            self.ui.statusLabel.text = "Nothing was installed."
            return
        if dependencies.check_torch():
            with slicer.util.tryWithErrorDisplay("PyTorch could not be installed.", waitCursor=True):
                dependencies.install_torch(ask=False)
        packages = dependencies.check_packages()
        if not packages:
            self._afterInstall(True)
            return
        self._appendLog("pip " + " ".join(dependencies.pip_arguments(packages)))
        self._install = start_child(dependencies.pip_arguments(packages))
        self.ui.installButton.enabled = False
        self.ui.progressBar.maximum = 0  # busy: pip does not say how much is left
        self.ui.statusLabel.text = "Installing Python packages..."
        self._timer.start()

    def _pumpInstall(self) -> None:
        for line in self._install.poll_log():
            self._appendLog(line)
            self.ui.statusLabel.text = f"Installing: {line}"
        if self._install.running():
            return
        result = self._install.result()
        self._install = None
        self._afterInstall(result.ok, result.error)

    def _afterInstall(self, ok: bool, error: str = "") -> None:
        self._timer.stop()
        self.ui.installButton.enabled = True
        self.ui.progressBar.maximum = PROGRESS_MAXIMUM
        self.ui.progressBar.value = 0
        if self.checkDependencies():
            self.ui.statusLabel.text = "DiffSeg's Python packages are installed."
            self.refreshModels()
            self.initializeParameterNode()
        else:
            message = f"Installing failed ({error or 'see the log below'}). {dependencies.summary(self._problems)}"
            self.ui.statusLabel.text = message
            if ok:
                slicer.util.errorDisplay(message)
        self._updateState()

    # models

    def refreshModels(self) -> None:
        """Fill the model selector from the registry; the listing needs only the standard library."""
        self._models = {}
        try:
            from DiffSegCore.models.registry import list_models

            self._models = {info.id: info for info in list_models()}
        except Exception as exc:  # a broken registry must not break the panel
            self.ui.modelInfoLabel.text = f"Could not read the model registry: {exc}"
        wasBlocked = self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for index, (modelId, info) in enumerate(self._models.items()):
            self.ui.modelSelector.addItem(info.title, modelId)
            self.ui.modelSelector.setItemData(index, model_tooltip(info), qt.Qt.ToolTipRole)
        self.ui.modelSelector.blockSignals(wasBlocked)
        self._showModel()

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelSelector.itemData(index)
            self._applyModelDefaults()

    def _modelMeta(self) -> dict | None:
        """What the panel needs of the chosen model's model.json: from the bundle when it is here, else the registry."""
        info = self._models.get(self._parameterNode.model) if self._parameterNode else None
        if info is None:
            return None
        if info.current.installed:
            try:
                return model_meta(str(info.current.path))
            except Exception:
                return None
        return info.summary_meta()

    def _applyModelDefaults(self) -> None:
        """Show the chosen model's own settings (settings.resolve of its model.json, or of its registry entry)."""
        meta = self._modelMeta()
        if meta is None:
            return
        resolved = run_settings.resolve(meta)
        wasModifying = self._parameterNode.node.StartModify()
        for name in MODEL_SETTINGS:
            setattr(self._parameterNode, name, getattr(resolved, name))
        self._parameterNode.node.EndModify(wasModifying)

    def _showModel(self) -> None:
        modelId = self._parameterNode.model if self._parameterNode else ""
        info = self._models.get(modelId)
        if info is None:
            return
        index = self.ui.modelSelector.findData(modelId)
        if index != self.ui.modelSelector.currentIndex:
            wasBlocked = self.ui.modelSelector.blockSignals(True)
            self.ui.modelSelector.currentIndex = index
            self.ui.modelSelector.blockSignals(wasBlocked)
        self.ui.modelSelector.toolTip = model_tooltip(info)
        self.ui.removeModelButton.enabled = removable(info) and not self._busy()
        meta = self._modelMeta() or {}
        channels = ", ".join(c["name"] for c in meta.get("channels", [])) or "unknown until downloaded"
        classes = ", ".join(c["name"] for c in info.classes)
        seconds = info.expected_seconds
        timing = " / ".join(f"about {seconds[d]:g} s on {d.upper()}" for d in ("gpu", "cpu") if d in seconds)
        where = "on this computer" if info.current.installed else "downloaded on first use"
        self.ui.modelInfoLabel.text = (
            f"<b>{info.title}</b> ({info.id} {info.current.version}, {where})<br>"
            f"<b>Intended use:</b> {info.description}<br><b>Inputs:</b> {info.modality}: {channels}<br>"
            f"<b>Classes:</b> {classes}<br><b>Expected time, end to end:</b> {timing or 'unknown'} per case"
            f"<br><b>License:</b> {info.license}"
        )
        estimate = self._estimate(meta)
        if estimate:
            self.ui.modelInfoLabel.text += f"<br><b>This volume:</b> {estimate}"

    def _estimate(self, meta: dict) -> str:
        """Memory and sampling time the chosen volume and settings need (DiffSegLib.logic.describe_estimate)."""
        p = self._parameterNode
        volume = p.inputVolume
        if not meta or volume is None or volume.GetImageData() is None:
            return ""
        chosen = {name: getattr(p, name) for name in MODEL_SETTINGS}
        chosen["preseg"] = {"none": "none", "model": "model", "segmentation": "model"}[p.preseg]
        if p.preseg == "none":
            chosen.pop("preseg_step")
        chosen["max_memory"] = p.max_memory or None
        return describe_estimate(meta, volume.GetImageData().GetDimensions(), volume.GetSpacing(), chosen)

    def _channelNames(self) -> list[str]:
        """The chosen model's input channel names (one unnamed channel until they are known)."""
        meta = self._modelMeta()
        return [c["name"] for c in meta["channels"]] if meta else [""]

    def onImportModel(self) -> None:
        """Choose a model's .zip (or the model.json in its folder) and import it in a child process: checking a
        bundle's weights needs torch, which the GUI process never loads."""
        path = qt.QFileDialog.getOpenFileName(
            None, "DiffSeg: import a model", "", "DiffSeg model (*.zip model.json)"
        )
        if not path or self._busy():
            return
        source = Path(path).parent if Path(path).name == "model.json" else Path(path)
        self._modelsBeforeImport = set(self._models)
        self._appendLog(f"diffseg models import {source}")
        self._import = start_child(["DiffSegCore", "models", "import", str(source)])
        self.ui.statusLabel.text = f"Importing {source.name}..."
        self.ui.progressBar.maximum = 0  # busy: the check does not say how much is left
        self._updateState()
        self._timer.start()

    def _pumpImport(self) -> None:
        for line in self._import.poll_log():
            self._appendLog(line)
        if self._import.running():
            return
        result, self._import = self._import.result(), None
        self._timer.stop()
        self.ui.progressBar.maximum = PROGRESS_MAXIMUM
        self.ui.progressBar.value = 0
        if not result.ok:
            error = child_error(result)
            self.ui.statusLabel.text = f"Import failed: {error}"
            slicer.util.errorDisplay(f"DiffSeg could not import the model: {error}")
            self._updateState()
            return
        self.refreshModels()
        added = [modelId for modelId in self._models if modelId not in self._modelsBeforeImport]
        if added and self._parameterNode:
            self._parameterNode.model = added[0]
            self._applyModelDefaults()
        self.ui.statusLabel.text = f"Imported {added[0] if added else 'the model'}."
        self._updateState()

    def onRemoveModel(self) -> None:
        """Ask, then delete the chosen model's cached versions (registry.remove_model needs no torch)."""
        info = self._models.get(self._parameterNode.model) if self._parameterNode else None
        if info is None or not removable(info) or self._busy():
            return
        again = "download it again on its next use" if info.origin == "registry" else "import it again to use it"
        if not slicer.util.confirmOkCancelDisplay(
            f"Remove {info.title} ({info.id}) from DiffSeg's model cache? You would need to {again}.",
            windowTitle="DiffSeg: remove a model?",
        ):
            return
        from DiffSegCore.errors import DiffSegError
        from DiffSegCore.models.registry import remove_model

        try:
            removed = remove_model(info.id)
        except (DiffSegError, OSError) as exc:
            self.ui.statusLabel.text = f"Could not remove {info.id}: {exc}"
            slicer.util.errorDisplay(self.ui.statusLabel.text)
            return
        self.refreshModels()
        if info.id not in self._models:
            self._parameterNode.model = ""
            self.initializeParameterNode()  # the first model, with its defaults
        self.ui.statusLabel.text = f"Removed {', '.join(removed)}."
        self._updateState()

    # state

    def _busy(self) -> bool:
        """A run, a package install or a model import is under way."""
        return self._running() or self._install is not None or self._import is not None

    def _updateState(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        self._showModel()
        names = self._channelNames()
        for index, (labelName, selectorName) in enumerate(CHANNEL_ROWS):
            label, selector = getattr(self.ui, labelName), getattr(self.ui, selectorName)
            label.visible = selector.visible = index < len(names)
            if index < len(names):
                label.text = f"{names[index]}:" if names[index] else "Input volume:"
        fromSegmentation = p.preseg == "segmentation"
        self.ui.presegSegmentationLabel.visible = self.ui.presegSegmentationSelector.visible = fromSegmentation
        self.ui.presegStepLabel.visible = self.ui.presegStepSpinBox.visible = p.preseg != "none"
        self.ui.importModelButton.enabled = not self._busy()
        if self._busy():
            self.ui.applyButton.enabled = self._running()
            return
        problem = self._inputProblem(len(names))
        self.ui.applyButton.enabled = not problem
        self.ui.applyButton.toolTip = problem or "Run the segmentation; click again to cancel."

    def _inputProblem(self, channels: int) -> str:
        p = self._parameterNode
        if self._problems:
            return "Install DiffSeg's Python packages first (Install, at the top)."
        if not p.inputVolume:
            return "Select an input volume."
        if not p.model:
            return "Select a model."
        if (channels >= 2 and not p.channel2Volume) or (channels >= 3 and not p.channel3Volume):
            return f"The model needs {channels} input channels."
        if p.outputUncertainty is not None and p.outputUncertainty in self._inputs(channels):
            return "The uncertainty volume must not be an input volume; choose another one or create a new one."
        if p.preseg == "segmentation" and not p.presegSegmentation:
            return "Select the segmentation to start from."
        return ""

    def _inputs(self, channels: int) -> list:
        p = self._parameterNode
        return [p.inputVolume, p.channel2Volume, p.channel3Volume][:channels]

    def _running(self) -> bool:
        return self._run is not None and not self._run.finished

    def _appendLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    # run

    def onApplyButton(self) -> None:
        if self._running():
            self.ui.statusLabel.text = "Cancelling..."
            self._run.cancel()
            return
        if not self.checkDependencies():
            self._updateState()
            return
        p = self._parameterNode
        overwrite = False
        if find_segmentation_conflict(p.outputSegmentation):
            if not slicer.util.confirmOkCancelDisplay(
                f"Segmentation '{p.outputSegmentation.GetName()}' already has segments"
                + (f" and '{p.outputUncertainty.GetName()}' holds an uncertainty map" if p.outputUncertainty else "")
                + ". Replace them with the new result?",
                windowTitle="DiffSeg: replace the result?",
            ):
                return
            overwrite = True
        preseg = {"none": None, "model": "model", "segmentation": p.presegSegmentation}[p.preseg]
        self.ui.logTextEdit.clear()
        with slicer.util.tryWithErrorDisplay("DiffSeg could not start.", waitCursor=True):
            self._run = self.logic.process(
                self._inputs(len(self._channelNames())),
                p.model,
                steps=p.steps,
                ensemble=p.ensemble,
                sampler=p.sampler,
                preseg=preseg,
                preseg_step=p.preseg_step if preseg is not None else None,
                device=p.device,
                outputSegmentationNode=p.outputSegmentation,
                outputUncertaintyNode=p.outputUncertainty,
                saveMembers=p.saveMembers,
                waitForCompletion=False,
                seed=p.seed,
                max_memory=p.max_memory or None,
                overwrite=overwrite,
                onProgress=self._onProgress,
                onFinished=self._onFinished,
                onLog=self._appendLog,
            )
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the run; the scene stays as it was."
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting..."
            self._timer.start()

    def _onTimer(self) -> None:
        if self._install is not None:
            self._pumpInstall()
        elif self._import is not None:
            self._pumpImport()
        elif self._run is not None:
            self._run.pump()
            if self._running():
                self.ui.statusLabel.text = f"{self._run.message} ({self._run.elapsed:.0f} s)"

    def _onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = round(fraction * self.ui.progressBar.maximum)

    def _onFinished(self, run) -> None:
        self._timer.stop()
        if run.state == "done":
            self.reviewPanel.show(run.segmentationNode, run.uncertaintyNode)
        self.ui.applyButton.text = "Apply"
        self.ui.progressBar.value = self.ui.progressBar.maximum if run.state == "done" else 0
        self.ui.statusLabel.text = f"{run.message} ({run.elapsed:.1f} s)" if run.state != "done" else run.message
        if run.state == "done" and self._parameterNode:
            # The next Apply reuses these nodes (after asking) instead of adding another "... DiffSeg_1".
            self._parameterNode.outputSegmentation = run.segmentationNode
            self._parameterNode.outputUncertainty = run.uncertaintyNode
        if run.state == "failed":
            self.ui.logCollapsibleButton.collapsed = False  # what the process printed, next to the error
            slicer.util.errorDisplay(f"DiffSeg failed: {run.error}\n\nThe panel's Log section shows the process's output.")
        self._updateState()


#
# DiffSegLogic
#


class DiffSegLogic(ScriptedLoadableModuleLogic, SegmentationLogic):
    """Slicer-side logic: the parameter node plus SegmentationLogic.process (see DiffSegLib.logic)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SegmentationLogic.__init__(self)



#
# DiffSegTest
#


class DiffSegTest(ScriptedLoadableModuleTest):
    """Runs the bundled model on the bundled sample case inside Slicer."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_sample_case()
        self.setUp()
        self.test_cancel_leaves_scene_unchanged()

    def _sampleVolume(self):
        import SampleData

        registerSampleData()
        names = [p.name[: -len(".nii.gz")] for p in sorted(resource_path("SampleData").glob("*.nii.gz"))]
        self.assertTrue(names, "no sample volume in Resources/SampleData")
        return SampleData.downloadSample(names[0])

    def _defaultModel(self) -> str:
        from DiffSegCore.models.registry import list_models

        return list_models()[0].id

    def test_sample_case(self) -> None:
        """As a user does it: open the module, pick the sample volume, Apply, wait for the result."""
        self.delayDisplay("Segmenting the sample case with the bundled model from the panel")
        dependencies.ensure_dependencies()
        volume = self._sampleVolume()
        slicer.util.selectModule("DiffSeg")
        panel = slicer.util.getModuleWidget("DiffSeg")
        panel.checkDependencies()
        panel.ui.inputVolumeSelector.setCurrentNode(volume)
        p = panel._parameterNode
        self.assertEqual(p.model, self._defaultModel())
        self.assertTrue(panel.ui.applyButton.enabled, panel.ui.applyButton.toolTip)
        started = time.monotonic()
        panel.ui.applyButton.click()
        while panel._running():
            slicer.app.processEvents()
            time.sleep(0.05)
        logging.info(f"DiffSeg sample case from Apply to result: {time.monotonic() - started:.1f} s")
        self.assertEqual(panel._run.state, "done", panel._run.error)
        segmentation, uncertainty = p.outputSegmentation, p.outputUncertainty
        classes = model_meta(p.model)["classes"]
        segments = segmentation.GetSegmentation()
        self.assertEqual([segments.GetNthSegment(i).GetName() for i in range(len(classes))], [c["name"] for c in classes])
        self.assertEqual(uncertainty.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        device = segmentation.GetAttribute("DiffSeg.device")
        self.assertTrue(device in DEVICES and device != BY_NAME["device"].default, device)  # the device used, not auto
        terminologies = [segments.GetNthSegment(i).GetTerminology() for i in range(len(classes))]
        self.assertEqual(len(set(terminologies)), len(classes))  # anterior and posterior differ by their modifier
        self.delayDisplay("Test passed")

    def test_cancel_leaves_scene_unchanged(self) -> None:
        volume = self._sampleVolume()
        before = slicer.mrmlScene.GetNumberOfNodes()
        run = DiffSegLogic().process(volume, self._defaultModel(), ensemble=8, device="cpu", waitForCompletion=False)
        time.sleep(1.0)
        run.cancel()
        self.assertEqual(run.state, "cancelled")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Test passed")
