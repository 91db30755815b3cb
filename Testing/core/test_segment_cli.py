"""`diffseg segment` end to end on real hippocampus volumes, through a real subprocess."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffSegCore.inference.case_score import review_score
from DiffSegCore.inference.ensemble import member_probabilities, predict_volume
from DiffSegCore.io.preprocess import prepare_image
from DiffSegCore.io.volumes import read_volume
from DiffSegCore.models.bundle import load_bundle
from DiffSegCore.settings import resolve, to_flags


def run_cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "DiffSegCore", *map(str, args)], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assert_same_geometry(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


def test_segment_writes_outputs_with_the_input_geometry(tmp_path, tiny_bundle, hippocampus_case):
    image_path, _ = hippocampus_case
    run_cli("segment", image_path, "--model", tiny_bundle, "--output-dir", tmp_path, "--ensemble", 2,
            "--save-probabilities", "--save-members", "--preview", "--progress", "none")
    reference = sitk.ReadImage(str(image_path))
    stem = "hippocampus_001"
    for name in ("seg", "uncertainty", "probabilities", "entropy", "member1_seg", "member2_seg"):
        assert_same_geometry(sitk.ReadImage(str(tmp_path / f"{stem}_{name}.nii.gz")), reference)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{stem}_seg.nii.gz")))
    assert set(np.unique(labels)) <= {0, 1, 2}
    uncertainty = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{stem}_uncertainty.nii.gz")))
    assert uncertainty.min() >= 0 and np.isfinite(uncertainty).all()
    probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{stem}_probabilities.nii.gz")))
    assert np.allclose(probabilities.sum(-1), 1, atol=1e-4)
    assert (tmp_path / f"{stem}_preview.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((tmp_path / f"{stem}_run.json").read_text())
    assert record["model"]["id"] == "tiny" and record["settings"]["ensemble"] == 2
    assert set(record["timings_s"]) >= {"load", "preprocess", "sample", "write"}
    assert record["peak_memory_bytes"] > 0
    members = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{stem}_member{k}_seg.nii.gz"))) for k in (1, 2)]
    expected = review_score(torch.from_numpy(np.stack(members)).long(), torch.from_numpy(labels).long(), 3)
    assert record["summary"]["review_score"] == pytest.approx(expected)  # 1 mm input: the model's grid
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging files left behind"


def test_cli_result_equals_the_library_on_the_same_seed(tmp_path, tiny_bundle, hippocampus_case):
    image_path, _ = hippocampus_case
    # float32: bf16 rounding differs with the members per batch, which the planner picks from the free memory
    chosen = {"seed": 5, "precision": "float32"}
    run_cli("segment", image_path, "--model", tiny_bundle, "--output-dir", tmp_path, *to_flags(chosen), "--progress", "none")
    bundle = load_bundle(tiny_bundle)
    image, _ = prepare_image([read_volume(image_path)], bundle.meta)
    result = predict_volume(bundle, image, resolve(bundle.meta, chosen))
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "hippocampus_001_seg.nii.gz")))
    assert np.array_equal(written, result.labels.numpy())


def test_member_probabilities_are_the_ensemble_members(tiny_bundle, small_case):
    """One batch of all members: their mean is predict_volume's, and a prefix is a smaller ensemble."""
    bundle = load_bundle(tiny_bundle)
    image, _ = prepare_image([read_volume(small_case)], bundle.meta)
    # float32: bf16 rounding differs with the batch's size (test_precision.py bounds bf16 against float32)
    chosen = {"steps": 2, "ensemble": 3, "sampler": "ddpm", "seed": 4, "members_per_batch": 1, "precision": "float32"}
    settings = resolve(bundle.meta, chosen)
    members = member_probabilities(bundle, image, settings)
    assert members.shape == (3, bundle.num_classes, *image.shape[1:])
    assert torch.allclose(members.mean(0), predict_volume(bundle, image, settings).mean_probs, atol=1e-5)
    two = member_probabilities(bundle, image, replace(settings, ensemble=2))
    assert torch.allclose(two, members[:2], atol=1e-5)
    assert not torch.allclose(members[0], members[1])  # members differ: the uncertainty is not trivially zero


def test_json_progress_and_folder_input(tmp_path, tiny_bundle, hippocampus_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    for case in ("hippocampus_003", "hippocampus_004"):
        shutil.copy(hippocampus_dir / "imagesTr" / f"{case}.nii.gz", folder)
    out = tmp_path / "out"
    result = run_cli("segment", folder, "--model", tiny_bundle, "--output-dir", out, "--ensemble", 1,
                     "--progress", "json", "--preseg", "model", "--sampler", "ddpm")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    fractions = [r["fraction"] for r in lines if r["fraction"] is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {r["stage"] for r in lines} >= {"load", "preprocess", "preseg", "sample", "write", "done"}
    assert set(lines[-1]["outputs"]) == {"hippocampus_003", "hippocampus_004"}
    # the final event names each output's path and the settings that ran, with the device actually used
    done = lines[-1]
    assert done["outputs"]["hippocampus_003"]["segmentation"] == str(out / "hippocampus_003_seg.nii.gz")
    ran = done["settings"]["hippocampus_003"]
    assert (ran["ensemble"], ran["sampler"], ran["preseg"]) == (1, "ddpm", "model")
    assert ran["device"] in ("cpu", "cuda")  # what ran, not "auto"
    record = json.loads((out / "hippocampus_003_run.json").read_text())
    assert record["settings"] == ran
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == ["hippocampus_003_seg.nii.gz", "hippocampus_004_seg.nii.gz"]


def test_sliding_window_keeps_geometry(tmp_path, tmp_path_factory, hippocampus_case):
    from Testing.conftest import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path_factory.mktemp("w") / "windowed", window=[16, 16, 16])
    image_path, _ = hippocampus_case
    run_cli("segment", image_path, "--model", bundle, "--output-dir", tmp_path, "--window", "sliding",
            "--ensemble", 1, "--steps", 2, "--progress", "none")
    record = json.loads((tmp_path / "hippocampus_001_run.json").read_text())
    assert record["settings"]["window"] == "sliding"
    assert_same_geometry(sitk.ReadImage(str(tmp_path / "hippocampus_001_seg.nii.gz")), sitk.ReadImage(str(image_path)))


def test_more_steps_than_the_model_has_is_one_clear_error(tmp_path, tiny_bundle, hippocampus_case):
    image_path, _ = hippocampus_case
    result = run_cli("segment", image_path, "--model", tiny_bundle, "--output-dir", tmp_path, "--steps", 20,
                     "--progress", "none", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --steps 20 is more than model")
    assert not list(tmp_path.iterdir())
