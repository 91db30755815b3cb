"""The Logic against a real slicer-core MRML scene, checked against the core's own CLI output."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
from conftest import CASE, CLASSES
from DiffSegLib import scene as bridge
from DiffSegLib.logic import ATTRIBUTE_PREFIX, SegmentationLogic

SEED = 7
SETTINGS = {"steps": 2, "ensembleSize": 2, "sampler": "ddim", "device": "cpu", "seed": SEED}


@pytest.fixture(scope="module")
def cli_outputs(tiny_bundle, tmp_path_factory):
    """What `diffseg segment` writes for the same input, model and seed."""
    out = tmp_path_factory.mktemp("cli")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "DiffSegCore",
            "segment",
            str(CASE),
            "--model",
            str(tiny_bundle),
            "--steps",
            "2",
            "--ensemble",
            "2",
            "--sampler",
            "ddim",
            "--device",
            "cpu",
            "--seed",
            str(SEED),
            "--output-dir",
            str(out),
            "--progress",
            "none",
        ],
        check=True,
    )
    name = "hippocampus_001"
    return {
        "labels": sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}_seg.nii.gz"))),
        "uncertainty": sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}_uncertainty.nii.gz"))),
    }


def labelmap_of(segmentation_node, reference) -> np.ndarray:
    """Label map (class values) exported from the segmentation on the reference grid."""
    scene = segmentation_node.GetScene()
    labels = np.zeros(tuple(reversed(reference.GetImageData().GetDimensions())), np.uint8)
    export = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    segmentation = segmentation_node.GetSegmentation()
    for cls in CLASSES:
        ids = slicer.vtk.vtkStringArray() if hasattr(slicer, "vtk") else None
        import vtk

        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentation.GetSegmentIdBySegmentName(cls["name"]))
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, export, reference
        )
        labels[bridge.array_from_volume(export) > 0] = cls["value"]
    scene.RemoveNode(export)
    return labels


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

    # uncertainty: input geometry, the CLI's values, shown as a colour overlay over the range
    assert bridge.same_geometry(uncertainty, volume, tol=0)
    assert np.allclose(bridge.array_from_volume(uncertainty), cli_outputs["uncertainty"])
    display = uncertainty.GetDisplayNode()
    assert display.GetColorNode().GetName() in bridge.UNCERTAINTY_COLOR_NAMES
    low, high = uncertainty.GetImageData().GetScalarRange()
    assert display.GetWindowLevelMin() == pytest.approx(low) and display.GetWindowLevelMax() == pytest.approx(high)

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
