"""Fixtures for the Slicer-side tests: a real slicer-core MRML scene and a small real model bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "DiffSegExtension"))
sys.path.insert(0, str(ROOT))

from DiffSegLib import scene as bridge  # noqa: E402

from Testing.conftest import DATA as HIPPOCAMPUS  # noqa: E402

CASE = HIPPOCAMPUS / "imagesTr" / "hippocampus_001.nii.gz"
CLASSES = [
    {
        "value": 1,
        "name": "Anterior hippocampus",
        "color": [0.9, 0.4, 0.1],
        "terminology": {
            "category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
            "type": {"scheme": "SCT", "code": "5366008", "meaning": "Hippocampus"},
        },
    },
    {"value": 2, "name": "Posterior hippocampus", "color": [0.2, 0.5, 0.95]},
]

SEED = 7


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """An untrained but real network saved as a bundle; tests compare the Logic with the CLI on it."""
    torch = pytest.importorskip("torch", reason="not in the light Python 3.12 venv (a fresh Slicer)")

    from DiffSegCore.models.bundle import save_bundle
    from DiffSegCore.networks.unet import build_network, network_defaults

    config = {**network_defaults(), "num_classes": 3, "widths": [8, 16], "time_dim": 16}
    torch.manual_seed(0)
    network = build_network(config)
    meta = {
        "id": "tiny-test",
        "version": "0.0.1",
        "title": "Tiny untrained test model",
        "description": "Random weights; only for plumbing tests.",
        "license": "Apache-2.0",
        "modality": "MR",
        "channels": [{"name": "T1", "normalisation": {"kind": "percentile_zscore"}}],
        "spacing": None,
        "classes": CLASSES,
        "network": config,
        "diffusion": {"train_steps": 5, "base_steps": 1001, "schedule": "linear", "prediction": "x0"},
        "defaults": {"steps": 2, "ensemble": 2, "sampler": "ddim"},
        "expected_seconds": {"cpu": 1, "gpu": 1},
    }
    return save_bundle(tmp_path_factory.mktemp("models") / "tiny", meta, network.state_dict())


@pytest.fixture
def standalone():
    """A fresh MRML scene with the Volumes and Segmentations module logics registered."""
    from DiffSegLib.scene import StandaloneScene

    standalone = StandaloneScene()
    yield standalone
    standalone.scene.Clear(True)


@pytest.fixture
def scene(standalone):
    return standalone.scene


@pytest.fixture
def volume(standalone):
    """The first hippocampus case loaded by Slicer's own volumes logic."""
    return standalone.load_volume(CASE, "hippocampus_001")


@pytest.fixture(scope="session")
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
        "review_score": json.loads((out / f"{name}_run.json").read_text())["summary"]["review_score"],
    }


def labelmap_of(segmentation_node, reference) -> np.ndarray:
    """Label map (class values) exported from the segmentation on the reference grid."""
    scene = segmentation_node.GetScene()
    labels = np.zeros(tuple(reversed(reference.GetImageData().GetDimensions())), np.uint8)
    export = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    segmentation = segmentation_node.GetSegmentation()
    for cls in CLASSES:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentation.GetSegmentIdBySegmentName(cls["name"]))
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, export, reference
        )
        labels[bridge.array_from_volume(export) > 0] = cls["value"]
    scene.RemoveNode(export)
    return labels
