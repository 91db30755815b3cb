"""DiffSeg logic without Qt: scene -> files -> `diffseg segment` child process -> scene.

Works in the Slicer application and on a plain slicer-core scene (tests, batch scripts). The
child process does all the heavy work; this module only moves data and reports progress.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import slicer

from DiffSegCore import settings as run_settings
from DiffSegCore.errors import DiffSegError
from DiffSegCore.events import ERROR, STAGES

from . import scene as bridge
from .review import Review
from .worker import Worker, WorkerResult

CASE = "input"  # case name of the files handed to the core
LOG = logging.getLogger("DiffSeg")  # in Slicer, Python logging lands in Slicer's application log
ATTRIBUTE_PREFIX = "DiffSeg."
# The run settings a model's model.json may choose and the panel shows once that model is chosen.
MODEL_SETTINGS = ("steps", "ensemble", "sampler", "preseg_step")


def core_parent() -> Path:
    """The folder holding the DiffSegCore package (source tree root or Slicer's scripted-modules dir)."""
    import DiffSegCore

    return Path(DiffSegCore.__file__).resolve().parent.parent


def python_executable() -> str:
    """PythonSlicer inside the Slicer application (same packages, no GUI), else this interpreter."""
    if hasattr(slicer, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
        home = Path(slicer.app.slicerHome) / "bin"
        return str(home / ("PythonSlicer.exe" if sys.platform == "win32" else "PythonSlicer"))
    return sys.executable


def launch_environment() -> dict[str, str]:
    """The child's environment: Slicer's startup environment where there is one (what Slicer's own
    launchConsoleProcess uses; PythonSlicer's launcher adds Slicer's paths back), else this process's;
    with the DiffSegCore package on PYTHONPATH."""
    env = None
    if hasattr(slicer, "app") and hasattr(slicer.util, "startupEnvironment"):
        env = slicer.util.startupEnvironment()
    env = dict(env or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(core_parent()), env.get("PYTHONPATH")]))
    return env


def start_child(module_args: list[str]) -> Worker:
    """Start `python -m <module_args>` in Slicer's Python (PythonSlicer) as a background Worker."""
    worker = Worker([python_executable(), "-m", *module_args], env=launch_environment())
    worker.start()
    return worker


def child_error(result: WorkerResult) -> str:
    """The child's own one-line error (the command line's `error: ...` line), else the worker's summary."""
    for line in reversed(result.log):
        if line.startswith("error: "):
            return line[len("error: "):]
    return result.error


def model_meta(model: str) -> dict:
    """Metadata of a bundle path or registry id (the bundle must be local by now); reads no weights."""
    from DiffSegCore.models.metadata import read_meta
    from DiffSegCore.models.registry import resolve_model

    path = Path(model)
    return read_meta(path if path.exists() else resolve_model(model, download=False))


def model_settings(model: str, chosen: dict | None = None) -> run_settings.RunSettings:
    """The settings a run of `model` uses, from the core's one merge of defaults (settings.resolve)."""
    return run_settings.resolve(model_meta(model), chosen)


# What the panel says when no plan fits the memory the run may take.
NO_FIT = "does not fit in free memory; lower the ensemble or set Max memory"


def describe_estimate(meta: dict, size_xyz, spacing_xyz, chosen: dict, available: int | None = None) -> str:
    """One line: the peak memory and sampling time a run of `meta` on a volume of `size_xyz` voxels (x, y, z) at
    `spacing_xyz` mm would plan on the CPU (memory.estimate_run, torch-free), or NO_FIT; '' where it cannot be
    told (a model.json without the full network settings, settings the model cannot take, a platform whose free
    memory cannot be read)."""
    from DiffSegCore.inference.memory import GIB, estimate_run

    try:
        resolved = run_settings.resolve(meta, chosen)
        plan = estimate_run(meta, tuple(size_xyz), tuple(spacing_xyz), resolved, device="cpu", available=available)
    except Exception:  # an estimate must never break the panel: incomplete model.json, no free-memory figure here
        return ""
    if plan is None:
        return NO_FIT
    how = "the whole volume" if plan.window is None else "windows of " + "x".join(map(str, plan.window))
    return (
        f"about {plan.peak_bytes / GIB:.1f} GB of memory at most ({plan.members_per_batch} of {resolved.ensemble} "
        f"members at once, {how}); sampling about {plan.seconds:.0f} s on a 2-core CPU"
    )


def describe_event(event: dict) -> str:
    """One status line for a progress event."""
    stage = event.get("stage", "")
    text = STAGES[stage][0] if stage in STAGES else stage.capitalize()
    if stage == "sample" and event.get("steps"):
        text += f": step {event.get('step', 0)}/{event['steps']}"
        if event.get("members"):
            text += f", member {event.get('member', 0)}/{event['members']}"
    message = event.get("message")
    return f"{text} - {message}" if message and stage != ERROR else (message if stage == ERROR else text)


class SegmentationRun:
    """One run of the core in the background.

    Call `pump()` regularly on the thread that owns the scene (the widget uses a QTimer; `wait()`
    pumps until the end); progress and completion callbacks are called from `pump()`.
    """

    def __init__(
        self,
        worker: Worker,
        workdir: Path,
        settings: dict,
        inputs: list,
        outputSegmentationNode,
        outputUncertaintyNode,
        saveMembers: bool,
        onProgress: Callable[[float, str], None] | None,
        onFinished: Callable[[SegmentationRun], None] | None,
        onLog: Callable[[str], None] | None = None,
    ):
        self.worker = worker
        self.workdir = workdir
        self.settings = settings
        self.inputs = inputs
        self.targetSegmentationNode = outputSegmentationNode
        self.targetUncertaintyNode = outputUncertaintyNode
        self.saveMembers = saveMembers
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.onLog = onLog
        self.state = "running"
        self.error = ""
        self.fraction = 0.0
        self.message = "Starting"
        self.segmentationNode = None
        self.uncertaintyNode = None
        self.memberSegmentationNodes: list = []
        self.review: Review | None = None  # the core's per-segment figures (run record), kept on the segmentation
        self.elapsed = 0.0

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def pump(self) -> bool:
        """Deliver pending progress; on completion import the results. True while still running."""
        if self.finished:
            return False
        for line in self.worker.poll_log():
            self._log(line)
        for event in self.worker.poll():
            if event.get("fraction") is not None:
                self.fraction = float(event["fraction"])
            message = describe_event(event)
            if message != self.message:
                self._log(message)
            self.message = message
            if self.onProgress:
                self.onProgress(self.fraction, self.message)
        self.elapsed = self.worker.elapsed
        if self.worker.running():
            return True
        self._finish(self.worker.result())
        return False

    def _log(self, line: str) -> None:
        LOG.info("DiffSeg: %s", line)
        if self.onLog:
            self.onLog(line)

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> bool:
        """Pump until the run ends (True) or `timeout` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pump():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(interval)
        return True

    def cancel(self) -> None:
        """Kill the process tree; the scene is left as it was and temporary files are removed."""
        if self.finished:
            return
        self.worker.cancel()
        self._finish(self.worker.result())

    def _finish(self, result: WorkerResult) -> None:
        self.elapsed = self.worker.elapsed
        try:
            if result.cancelled:
                self.state, self.message = "cancelled", "Cancelled"
            elif not result.ok:
                self.state, self.error = "failed", result.error
                self.message = f"Failed: {result.error}"
            else:
                self._import_outputs(result)
                self.state, self.fraction = "done", 1.0
                warning = self.review.zero_uncertainty_warning() if self.review else ""
                self.message = f"Done in {self.elapsed:.1f} s" + (f"; warning: {warning}" if warning else "")
        except Exception as exc:  # the scene must stay clean whatever went wrong while importing
            self.state, self.error = "failed", f"could not load the results: {exc}"
            self.message = f"Failed: {self.error}"
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
        for line in self.worker.poll_log():
            self._log(line)
        self._log(self.message)
        if self.onFinished:
            self.onFinished(self)

    def _import_outputs(self, result: WorkerResult) -> None:
        """Load the files the core reported in its final event; record the settings that actually ran."""
        reference = self.inputs[0]
        scene = reference.GetScene()
        outputs = result.outputs.get(CASE)
        if not outputs:
            raise RuntimeError("diffseg reported no outputs for the case")
        meta = model_meta(self.settings["model"])
        ran = dict(result.settings.get(CASE) or {})
        if self.settings.get("preseg") not in (None, *run_settings.PRESEG_SOURCES):
            ran["preseg"] = self.settings["preseg"]  # the node's name, not the temporary file it was written to
        self.settings = {**self.settings, **ran}
        self.settings["modelVersion"] = meta.get("version", "")
        self.settings["elapsedSeconds"] = f"{self.elapsed:.2f}"
        created = []
        try:
            labels = _load_labelmap(scene, Path(outputs["segmentation"]), reference, created)
            segmentation = self._segmentation_from(labels, meta, reference, f"{reference.GetName()} DiffSeg", created)
            members = []
            if self.saveMembers:
                for k in range(1, int(self.settings["ensemble"]) + 1):
                    member_labels = _load_labelmap(scene, Path(outputs[f"member{k}"]), reference, created)
                    name = f"{reference.GetName()} DiffSeg member {k}"
                    members.append(self._segmentation_from(member_labels, meta, reference, name, created))
            uncertainty = self.targetUncertaintyNode
            if uncertainty is None:
                uncertainty = scene.AddNewNodeByClass(
                    "vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(f"{reference.GetName()} DiffSeg uncertainty")
                )
                created.append(uncertainty)
            bridge.read_volume_into(uncertainty, Path(outputs["uncertainty"]), reference)
        except Exception:
            for node in created:
                _remove(node)
            raise
        for node in [labels for labels in created if labels.IsA("vtkMRMLLabelMapVolumeNode")]:
            _remove(node)
        if self.targetSegmentationNode is not None:
            # Built aside and copied in only now, so a failure never leaves a half-replaced node.
            self.targetSegmentationNode.GetSegmentation().DeepCopy(segmentation.GetSegmentation())
            self.targetSegmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(reference)
            _remove(segmentation)
            segmentation = self.targetSegmentationNode
        for node in [segmentation, uncertainty, *members]:
            for key, value in self.settings.items():
                node.SetAttribute(ATTRIBUTE_PREFIX + key, str(value))
            bridge.place_like(node, reference)
        if segmentation.GetDisplayNode() is None:
            segmentation.CreateDefaultDisplayNodes()
        self.review = Review.from_record(Path(outputs["run"]))
        self.review.attach(segmentation)
        bridge.show_uncertainty(uncertainty, reference)
        self.segmentationNode, self.uncertaintyNode, self.memberSegmentationNodes = segmentation, uncertainty, members

    def _segmentation_from(self, labels, meta: dict, reference, name: str, created: list):
        scene = reference.GetScene()
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
        created.append(node)
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        bridge.fill_segmentation(node, labels, meta["classes"])
        return node


def _remove(node) -> None:
    """Remove a node we made, with its display and storage nodes (the scene keeps them otherwise)."""
    scene = node.GetScene()
    helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] if node.IsA(
        "vtkMRMLDisplayableNode"
    ) else []
    if node.IsA("vtkMRMLStorableNode") and node.GetStorageNode() is not None:
        helpers.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is scene:
            scene.RemoveNode(helper)


def _load_labelmap(scene, path: Path, reference, created: list):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__diffseg_labels__")
    created.append(node)
    bridge.read_volume_into(node, path, reference)
    return node


class SegmentationLogic:
    """Runs DiffSeg models on volume nodes of one scene."""

    def __init__(self, scene=None):
        self._scene = scene
        self.activeRun: SegmentationRun | None = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def process(
        self,
        inputVolumeNodes,
        model: str,
        steps: int | None = None,
        ensemble: int | None = None,
        sampler: str | None = None,
        preseg=None,
        preseg_step: int | None = None,
        device: str | None = None,
        seed: int | None = None,
        max_memory: float | None = None,
        outputSegmentationNode=None,
        outputUncertaintyNode=None,
        saveMembers: bool = False,
        waitForCompletion: bool = True,
        overwrite: bool = False,
        onProgress: Callable[[float, str], None] | None = None,
        onFinished: Callable[[SegmentationRun], None] | None = None,
        onLog: Callable[[str], None] | None = None,
    ):
        """Segment `inputVolumeNodes` (one node or a list of channels) with `model` (bundle path or id).

        steps, ensemble, sampler, preseg_step, device and max_memory are the run settings of DiffSegCore/settings.py
        (same names); None takes the model's default. `seed` None draws a random seed (recorded on the
        outputs). `preseg` is None/"none", "model" (the bundle's own network) or a segmentation / label
        map node. An existing segmentation node that already has segments is only replaced when
        `overwrite` is True. With waitForCompletion=True returns (segmentationNode,
        uncertaintyVolumeNode) and raises RuntimeError if the run fails; otherwise returns the
        SegmentationRun at once (pump it, or let the widget's timer do so).
        """
        inputs = list(inputVolumeNodes) if isinstance(inputVolumeNodes, Sequence) else [inputVolumeNodes]
        if not inputs or any(node is None or node.GetImageData() is None for node in inputs):
            raise ValueError("select an input volume that holds image data")
        seed = random.randrange(2**31) if seed is None else seed
        chosen = {"steps": steps, "ensemble": ensemble, "sampler": sampler, "preseg_step": preseg_step}
        from_node = preseg not in (None, *run_settings.PRESEG_SOURCES)
        chosen.update(device=device, seed=seed, max_memory=max_memory, preseg=None if from_node else (preseg or "none"))
        chosen = {name: value for name, value in chosen.items() if value is not None}
        try:
            flags = run_settings.to_flags(chosen)  # each value checked against its setting
        except DiffSegError as exc:
            raise ValueError(str(exc)) from None
        try:
            meta = model_meta(model)
        except DiffSegError:
            meta = None  # not on this computer yet: the child fetches it and checks the settings then
        if meta is not None:  # and against the model, before anything starts
            try:
                run_settings.resolve(meta, {**chosen, "preseg": "model"} if from_node else chosen)
            except DiffSegError as exc:
                raise ValueError(str(exc)) from None
        for extra in inputs[1:]:
            if not bridge.same_geometry(inputs[0], extra):
                raise ValueError(
                    f"channel {extra.GetName()} is not on the grid of {inputs[0].GetName()}; resample it first"
                )
        if outputUncertaintyNode is not None and any(outputUncertaintyNode is node for node in inputs):
            raise ValueError(
                f"the uncertainty output '{outputUncertaintyNode.GetName()}' is an input volume; choose another volume"
            )
        conflict = "" if overwrite else bridge.find_segmentation_conflict(outputSegmentationNode)
        if conflict:
            raise ValueError(conflict)
        if self.activeRun is not None and not self.activeRun.finished:
            raise RuntimeError("a DiffSeg run is already in progress; cancel it or wait for it to end")

        settings = {"model": str(model), **chosen, "inputs": ",".join(node.GetName() for node in inputs)}
        workdir = Path(tempfile.mkdtemp(prefix="DiffSeg-"))
        try:
            worker = start_child(self._command(inputs, workdir, settings, flags, preseg, saveMembers))
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        run = SegmentationRun(
            worker,
            workdir,
            settings,
            inputs,
            outputSegmentationNode,
            outputUncertaintyNode,
            saveMembers,
            onProgress,
            onFinished,
            onLog,
        )
        self.activeRun = run
        if not waitForCompletion:
            return run
        run.wait()
        if run.state != "done":
            raise RuntimeError(f"DiffSeg {run.state}: {run.error or run.message}")
        return run.segmentationNode, run.uncertaintyNode

    def cancel(self) -> None:
        """Cancel the run in progress, if any."""
        if self.activeRun is not None:
            self.activeRun.cancel()

    def _command(self, inputs, workdir: Path, settings: dict, flags: list[str], preseg, saveMembers: bool) -> list[str]:
        """Write the inputs (and a pre-segmentation) to `workdir` and build the CLI command."""
        paths = [bridge.write_volume(node, workdir / f"{CASE}_{index:04d}.nrrd") for index, node in enumerate(inputs)]
        args = ["DiffSegCore", "segment", *map(str, paths), "--model", settings["model"]]
        args += [*flags, "--output-dir", str(workdir / "output"), "--progress", "json"]
        if preseg not in (None, *run_settings.PRESEG_SOURCES):
            settings["preseg"] = preseg.GetName()
            preseg_path = workdir / "preseg.nrrd"
            if preseg.IsA("vtkMRMLSegmentationNode"):
                bridge.export_segments_labelmap(preseg, model_meta(settings["model"])["classes"], inputs[0], preseg_path)
            else:
                bridge.write_volume(preseg, preseg_path)
            args += ["--preseg", str(preseg_path)]
        if saveMembers:
            args.append("--save-members")
        return args
