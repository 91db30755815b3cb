"""The Logic against a real slicer-core MRML scene, checked against the core's own CLI output."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
from conftest import CASE, CLASSES, SEED, labelmap_of
from DiffSegLib import scene as bridge
from DiffSegLib.logic import ATTRIBUTE_PREFIX, SegmentationLogic

from DiffSegCore.uncertainty import DISPLAY_RANGE

SETTINGS = {"steps": 2, "ensemble": 2, "sampler": "ddim", "device": "cpu", "seed": SEED}


def test_process_matches_cli(scene, volume, tiny_bundle, cli_outputs, tmp_path):
    nodes_before = scene.GetNumberOfNodes()
    segmentation, uncertainty = SegmentationLogic(scene).process(volume, str(tiny_bundle), **SETTINGS)

    # one named, coloured segment per class, with the model's terminology where it has one
    seg = segmentation.GetSegmentation()
    assert [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())] == [c["name"] for c in CLASSES]
    for i, cls in enumerate(CLASSES):
        assert np.allclose(seg.GetNthSegment(i).GetColor(), cls["color"])
    assert "Hippocampus" in seg.GetNthSegment(0).GetTerminology()

    # reference geometry is the input, and the voxels are exactly the CLI's labels
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume
    assert np.array_equal(labelmap_of(segmentation, volume), cli_outputs["labels"])

    # uncertainty: input geometry, the CLI's values, shown as a colour overlay on the one fixed scale
    assert bridge.same_geometry(uncertainty, volume, tol=0)
    assert np.allclose(bridge.array_from_volume(uncertainty), cli_outputs["uncertainty"])
    display = uncertainty.GetDisplayNode()
    assert display.GetColorNode().GetName() in bridge.UNCERTAINTY_COLOR_NAMES
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx(DISPLAY_RANGE)

    # run settings travel with the nodes
    for node in (segmentation, uncertainty):
        assert node.GetAttribute(ATTRIBUTE_PREFIX + "seed") == str(SEED)
        assert node.GetAttribute(ATTRIBUTE_PREFIX + "steps") == "2"
        assert node.GetAttribute(ATTRIBUTE_PREFIX + "modelVersion") == "0.0.1"
    # only the two result nodes (+ their display nodes, the colour table) are new; no stray label maps
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0

    # a save to .seg.nrrd reads back with the same segments and voxels
    path = tmp_path / "result.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation)
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(path))
    assert reader.ReadData(loaded)
    assert loaded.GetSegmentation().GetNumberOfSegments() == len(CLASSES)
    assert np.array_equal(labelmap_of(loaded, volume), cli_outputs["labels"])
    assert nodes_before < scene.GetNumberOfNodes()


def test_fixture_output_is_not_trivial(cli_outputs):
    """The comparison above only means something if the untrained model labels several classes."""
    assert len(np.unique(cli_outputs["labels"])) >= 2
    assert cli_outputs["uncertainty"].max() > 0


def scene_snapshot(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def test_background_run_reports_progress_and_cancel_leaves_scene_as_it_was(scene, volume, tiny_bundle):
    before = scene_snapshot(scene)
    progress, finished = [], []
    logic = SegmentationLogic(scene)
    run = logic.process(
        volume,
        str(tiny_bundle),
        steps=5,
        ensemble=8,
        device="cpu",
        seed=1,
        waitForCompletion=False,
        onProgress=lambda fraction, message: progress.append((fraction, message)),
        onFinished=finished.append,
    )
    assert not run.finished  # returned at once
    deadline = time.monotonic() + 60
    while not any(message.startswith("Sampling") for _, message in progress):
        assert run.pump() and time.monotonic() < deadline
        time.sleep(0.05)
    process, workdir = run.worker._process, run.workdir
    assert workdir.is_dir() and workdir.name.startswith("DiffSeg-")
    logic.cancel()
    assert run.state == "cancelled" and finished == [run]
    assert process.poll() is not None
    assert scene_snapshot(scene) == before
    assert not workdir.exists()  # other tests run in parallel, so only this run's folder is checked
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and 0 < fractions[-1] < 1


def test_failed_run_leaves_no_stray_nodes_or_files(scene, volume, tmp_path, monkeypatch):
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))  # this run's temporary folders only
    before = scene_snapshot(scene)
    with pytest.raises(RuntimeError, match="model bundle not found"):
        SegmentationLogic(scene).process(volume, str(tmp_path / "missing"), steps=1, ensemble=1, device="cpu")
    assert scene_snapshot(scene) == before
    assert list(temp_root.iterdir()) == []


def test_presegmentation_members_and_overwrite(scene, volume, tiny_bundle, tmp_path):
    """A drawn segmentation starts the sampling (PD-DDPM) exactly as a label file does on the CLI;
    member segmentations come back too, and an existing segmentation is replaced only when asked."""
    truth_file = Path(str(CASE).replace("imagesTr", "labelsTr"))
    drawn = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "truth")
    bridge.read_volume_into(drawn, truth_file, volume)
    preseg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    preseg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    bridge.fill_segmentation(preseg, drawn, CLASSES[::-1])  # segment order differs: matched by name
    exported = bridge.export_segments_labelmap(preseg, CLASSES, volume, tmp_path / "exported.nrrd")
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_file)))
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(exported))), truth)

    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    existing.GetSegmentation().AddEmptySegment("drawn", "drawn by hand")
    logic = SegmentationLogic(scene)
    settings = {"preseg": preseg, "preseg_step": 1, "saveMembers": True, "outputSegmentationNode": existing, **SETTINGS}
    with pytest.raises(ValueError, match="already holds 1 segments"):
        logic.process(volume, str(tiny_bundle), **settings)
    assert existing.GetSegmentation().GetSegment("drawn") is not None
    segmentation, _ = logic.process(volume, str(tiny_bundle), overwrite=True, **settings)
    assert segmentation is existing and existing.GetSegmentation().GetSegment("drawn") is None
    out = tmp_path / "cli"
    cli = [sys.executable, "-m", "DiffSegCore", "segment", str(CASE), "--model", str(tiny_bundle), "--steps", "2"]
    cli += ["--ensemble", "2", "--device", "cpu", "--seed", str(SEED), "--output-dir", str(out), "--progress", "none"]
    subprocess.run([*cli, "--preseg", str(exported), "--preseg-step", "1", "--save-members"], check=True)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "hippocampus_001_seg.nii.gz")))
    assert np.array_equal(labelmap_of(segmentation, volume), expected)
    assert segmentation.GetAttribute(ATTRIBUTE_PREFIX + "preseg") == "drawn"
    assert segmentation.GetAttribute(ATTRIBUTE_PREFIX + "preseg_step") == "1"

    members = logic.activeRun.memberSegmentationNodes
    assert len(members) == SETTINGS["ensemble"]
    for k, member in enumerate(members, start=1):
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"hippocampus_001_member{k}_seg.nii.gz")))
        assert np.array_equal(labelmap_of(member, volume), expected)


def test_the_uncertainty_output_can_never_be_an_input(scene, volume, tiny_bundle):
    before = bridge.array_from_volume(volume)
    with pytest.raises(ValueError, match="is an input volume"):
        SegmentationLogic(scene).process(volume, str(tiny_bundle), outputUncertaintyNode=volume, **SETTINGS)
    assert np.array_equal(bridge.array_from_volume(volume), before)
