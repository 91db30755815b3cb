"""Scripts/batch.py on a folder of real volumes, run the way Slicer would run it (its own process)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import SimpleITK as sitk
import slicer
from conftest import CASE, CLASSES, ROOT, SEED, labelmap_of

BATCH = ROOT / "DiffSegExtension" / "Scripts" / "batch.py"


def test_batch_segments_a_folder_and_reports_bad_cases(standalone, tiny_bundle, cli_outputs, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / CASE.name).symlink_to(CASE)
    (inputs / "broken.nii.gz").write_bytes(b"not a volume")
    result = subprocess.run(
        [
            sys.executable,
            str(BATCH),
            "--input",
            str(inputs),
            "--output",
            str(out),
            "--model",
            str(tiny_bundle),  # steps, ensemble and sampler left to the model's defaults (2, 2, ddim)
            "--device",
            "cpu",
            "--seed",
            str(SEED),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr  # one case failed
    assert "1 of 2 case(s) segmented" in result.stdout
    assert "broken" in result.stdout and "failed" in result.stdout
    assert not list(out.glob("broken*"))

    # the saved segmentation holds the model's classes and the CLI's labels
    volume = standalone.load_volume(CASE)
    segmentation = standalone.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(out / "hippocampus_001.seg.nrrd"))
    assert reader.ReadData(segmentation)
    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(len(CLASSES))]
    assert names == [c["name"] for c in CLASSES]
    assert np.array_equal(labelmap_of(segmentation, volume), cli_outputs["labels"])
    for cls in CLASSES:  # the table: one line per segment with its volume in mL
        voxel_ml = np.prod(volume.GetSpacing()) / 1000
        volume_ml = f"{(cli_outputs['labels'] == cls['value']).sum() * voxel_ml:.2f}"
        assert any(cls["name"] in line and f" {volume_ml} " in line for line in result.stdout.splitlines()), cls
    # and the case's review score, as the command line computes it for the same input and seed
    score = f" {cli_outputs['review_score']:.3f} "
    assert [line for line in result.stdout.splitlines() if line.startswith("hippocampus_001") and score in line]

    # the uncertainty volume has the input's grid and the CLI's values
    uncertainty, image = sitk.ReadImage(str(out / "hippocampus_001_uncertainty.nrrd")), sitk.ReadImage(str(CASE))
    assert uncertainty.GetSize() == image.GetSize()
    assert np.allclose(uncertainty.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert np.allclose(uncertainty.GetDirection(), image.GetDirection(), atol=1e-6)
    assert np.allclose(sitk.GetArrayFromImage(uncertainty), cli_outputs["uncertainty"])


def test_batch_with_a_missing_model_is_one_clear_error(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / CASE.name).symlink_to(CASE)
    command = [sys.executable, str(BATCH), "--input", str(inputs), "--output", str(tmp_path / "out")]
    result = subprocess.run([*command, "--model", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: model bundle not found: {tmp_path / 'nothing'}; pass a bundle folder, a .zip or a model id"
    ]
    assert not (tmp_path / "out").exists()
