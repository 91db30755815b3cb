"""DiffSeg: diffusion-model segmentation with uncertainty, as a 3D Slicer scripted module.

The panel and the scene live here; the work runs in a separate process (the DiffSegCore command
line) so the GUI never freezes. See DiffSegLib for the scene bridge, worker and dependencies.
"""

import logging
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
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
from DiffSegLib.logic import MODEL_SETTINGS, SegmentationLogic, model_meta, model_settings  # noqa: E402
from DiffSegLib.review_panel import ReviewPanel  # noqa: E402
from DiffSegLib.scene import find_segmentation_conflict  # noqa: E402
from DiffSegLib.widgets import WIDGET_CLASSES  # noqa: E402

from DiffSegCore.resources import resource_path  # noqa: E402
from DiffSegCore.settings import BY_NAME, DEVICES, SAMPLERS  # noqa: E402

SAMPLE_CATEGORY = "DiffSeg"
TIMER_INTERVAL_MS = 100

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
# Parameters
#


class PresegSource(Enum):
    NONE = "none"
    MODEL = "model"
    SEGMENTATION = "segmentation"

    def label(self) -> str:
        return {
            PresegSource.NONE: "Noise (no pre-segmentation)",
            PresegSource.MODEL: "The model's pre-segmentation network",
            PresegSource.SEGMENTATION: "An existing segmentation",
        }[self]


def _range(name: str) -> WithinRange:
    """The range of a run setting, as settings.py defines it."""
    return WithinRange(BY_NAME[name].minimum, BY_NAME[name].maximum)


@parameterNodeWrapper
class DiffSegParameterNode:
    """The panel's settings, saved with the scene; run settings keep settings.py's names, ranges and
    defaults (a chosen model's own defaults replace steps, ensemble, sampler and preseg_step)."""

    inputVolume: vtkMRMLScalarVolumeNode
    channel2Volume: vtkMRMLScalarVolumeNode
    channel3Volume: vtkMRMLScalarVolumeNode
    model: str = ""
    steps: Annotated[int, _range("steps")] = BY_NAME["steps"].default
    ensemble: Annotated[int, _range("ensemble")] = BY_NAME["ensemble"].default
    sampler: Annotated[str, Choice(list(SAMPLERS))] = BY_NAME["sampler"].default
    preseg: PresegSource = PresegSource.NONE
    presegSegmentation: vtkMRMLSegmentationNode
    preseg_step: Annotated[int, _range("preseg_step")] = 0
    device: Annotated[str, Choice(list(DEVICES))] = BY_NAME["device"].default
    seed: Annotated[int, _range("seed")] = BY_NAME["seed"].default
    outputSegmentation: vtkMRMLSegmentationNode
    outputUncertainty: vtkMRMLScalarVolumeNode
    saveMembers: bool = False


#
# DiffSegWidget
#


class DiffSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: settings bound to the parameter node, Apply/Cancel, progress and status."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
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

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module reloaded or application closing: stop any run and observers."""
        if self._run is not None and not self._run.finished:
            self._run.cancel()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None and not self._run.finished:
            self._run.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        self.reviewPanel.clear()  # its nodes are gone
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first
        if not self._parameterNode.model and self._models:
            self._parameterNode.model = next(iter(self._models))
            self._applyModelDefaults()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)
            self._updateState()

    # models

    def refreshModels(self) -> None:
        """Fill the model selector from the registry (or say what to install to see it)."""
        self._models = {}
        try:
            from DiffSegCore.models.registry import list_models

            self._models = {info.id: info for info in list_models()}
        except ImportError:
            self.ui.modelInfoLabel.text = (
                "Click Apply once to install DiffSeg's Python packages; the models show up then."
            )
        except Exception as exc:  # a broken registry must not break the panel
            self.ui.modelInfoLabel.text = f"Could not read the model registry: {exc}"
        wasBlocked = self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for modelId, info in self._models.items():
            self.ui.modelSelector.addItem(info.title, modelId)
        self.ui.modelSelector.blockSignals(wasBlocked)
        self._showModel()

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelSelector.itemData(index)
            self._applyModelDefaults()

    def _applyModelDefaults(self) -> None:
        """Show the chosen model's own settings (settings.resolve of its model.json), once it is here."""
        info = self._models.get(self._parameterNode.model)
        if info is None or not info.current.installed:
            return
        resolved = model_settings(str(info.current.path))
        for name in MODEL_SETTINGS:
            setattr(self._parameterNode, name, getattr(resolved, name))

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
        classes = ", ".join(c["name"] for c in info.classes)
        seconds = info.expected_seconds
        timing = " / ".join(f"{seconds[d]:g} s on {d.upper()}" for d in ("gpu", "cpu") if d in seconds)
        where = "on this computer" if info.current.installed else "downloaded on first use"
        self.ui.modelInfoLabel.text = (
            f"<b>{info.title}</b> ({info.id} {info.current.version}, {where})<br>{info.description}<br>"
            f"<b>Classes:</b> {classes}<br><b>Expected time:</b> {timing or 'unknown'}"
            f" per case<br><b>License:</b> {info.license}"
        )

    def _channelCount(self) -> int:
        """Input channels the selected model needs (1 until its bundle is on this computer)."""
        info = self._models.get(self._parameterNode.model) if self._parameterNode else None
        if info is None or not info.current.installed:
            return 1
        try:
            return len(model_meta(info.current.path)["channels"])
        except Exception:
            return 1

    # state

    def _updateState(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        self._showModel()
        channels = self._channelCount()
        for index, (label, selector) in enumerate(
            [(self.ui.channel2Label, self.ui.channel2Selector), (self.ui.channel3Label, self.ui.channel3Selector)],
            start=2,
        ):
            label.visible = selector.visible = channels >= index
        fromSegmentation = p.preseg == PresegSource.SEGMENTATION
        self.ui.presegSegmentationLabel.visible = self.ui.presegSegmentationSelector.visible = fromSegmentation
        self.ui.presegStepLabel.visible = self.ui.presegStepSpinBox.visible = p.preseg != PresegSource.NONE
        if self._running():
            return
        problem = self._inputProblem(channels)
        self.ui.applyButton.enabled = not problem
        self.ui.applyButton.toolTip = problem or "Run the segmentation; click again to cancel."

    def _inputProblem(self, channels: int) -> str:
        p = self._parameterNode
        if not p.inputVolume:
            return "Select an input volume."
        if not p.model:
            return "Select a model."
        if (channels >= 2 and not p.channel2Volume) or (channels >= 3 and not p.channel3Volume):
            return f"The model needs {channels} input channels."
        if p.preseg == PresegSource.SEGMENTATION and not p.presegSegmentation:
            return "Select the segmentation to start from."
        return ""

    def _running(self) -> bool:
        return self._run is not None and not self._run.finished

    # run

    def onApplyButton(self) -> None:
        if self._running():
            self.ui.statusLabel.text = "Cancelling..."
            self._run.cancel()
            return
        try:
            dependencies.ensure_dependencies()
        except dependencies.DependencyError as exc:
            self.ui.statusLabel.text = str(exc)
            slicer.util.errorDisplay(str(exc))
            return
        if not self._models:
            self.refreshModels()
            self.initializeParameterNode()
        p = self._parameterNode
        overwrite = False
        conflict = find_segmentation_conflict(p.outputSegmentation)
        if conflict:
            if not slicer.util.confirmOkCancelDisplay(
                f"Segmentation '{p.outputSegmentation.GetName()}' already has segments. Replace them with the result?"
            ):
                return
            overwrite = True
        channels = self._channelCount()
        inputs = [p.inputVolume, p.channel2Volume, p.channel3Volume][:channels]
        preseg = {
            PresegSource.NONE: None,
            PresegSource.MODEL: "model",
            PresegSource.SEGMENTATION: p.presegSegmentation,
        }[p.preseg]
        with slicer.util.tryWithErrorDisplay("DiffSeg could not start.", waitCursor=True):
            self._run = self.logic.process(
                inputs,
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
                overwrite=overwrite,
                onProgress=self._onProgress,
                onFinished=self._onFinished,
            )
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the run; the scene stays as it was."
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting..."
            self._timer.start()

    def _onTimer(self) -> None:
        if self._run is not None:
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
        if run.state == "failed":
            slicer.util.errorDisplay(f"DiffSeg failed: {run.error}")
        self._updateState()


#
# DiffSegLogic
#


class DiffSegLogic(ScriptedLoadableModuleLogic, SegmentationLogic):
    """Slicer-side logic: the parameter node plus SegmentationLogic.process (see DiffSegLib.logic)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SegmentationLogic.__init__(self)

    def getParameterNode(self):
        return DiffSegParameterNode(super().getParameterNode())


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
        self.delayDisplay("Segmenting the sample case with the bundled model")
        dependencies.ensure_dependencies(ask=False)
        volume = self._sampleVolume()
        model = self._defaultModel()
        started = time.monotonic()
        segmentation, uncertainty = DiffSegLogic().process(volume, model, steps=2, ensemble=2, device="auto", seed=0)
        logging.info(f"DiffSeg sample case: {time.monotonic() - started:.1f} s")
        classes = model_meta(model)["classes"]
        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(len(classes))]
        self.assertEqual(names, [c["name"] for c in classes])
        self.assertEqual(uncertainty.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        self.assertEqual(segmentation.GetAttribute("DiffSeg.steps"), "2")
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
