"""Per-segment review figures in run.json, checked against numbers computed independently from the written
volumes (Testing/review_helpers.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DiffSegCore.inference.review import MAX_REGIONS, segment_review
from DiffSegCore.uncertainty import DEFAULT_THRESHOLD, DISPLAY_RANGE, largest_possible
from Testing.review_helpers import band_by_morphology, physical, ranked_regions

CLASSES = [{"value": 1, "name": "Anterior hippocampus"}, {"value": 2, "name": "Posterior hippocampus"}]


def run_segment(image: Path, bundle: Path, out: Path, ensemble: int, progress: str = "none") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "DiffSegCore", "segment", str(image), "--model", str(bundle), "--output-dir",
               str(out), "--ensemble", str(ensemble), "--steps", "2", "--seed", "3", "--progress", progress]
    result = subprocess.run(command, capture_output=True, encoding="utf-8")
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, tiny_bundle, hippocampus_case):
    out = tmp_path_factory.mktemp("review")
    run_segment(hippocampus_case[0], tiny_bundle, out, ensemble=3)
    stem = "hippocampus_001"
    return (
        json.loads((out / f"{stem}_run.json").read_text()),
        sitk.ReadImage(str(out / f"{stem}_seg.nii.gz")),
        sitk.ReadImage(str(out / f"{stem}_uncertainty.nii.gz")),
    )


def test_review_figures_match_the_written_volumes(ensemble_run):
    record, labels_image, uncertainty_image = ensemble_run
    labels = sitk.GetArrayFromImage(labels_image)
    spread = sitk.GetArrayFromImage(uncertainty_image).astype(np.float64)
    voxel_ml = np.prod(labels_image.GetSpacing()) / 1000
    assert [s["name"] for s in record["review"]] == [c["name"] for c in CLASSES]
    checked_regions = 0
    for segment in record["review"]:
        mask = labels == segment["value"]
        band = band_by_morphology(mask)
        assert segment["voxels"] == int(mask.sum())
        assert segment["volume_ml"] == pytest.approx(mask.sum() * voxel_ml, abs=1e-6)
        if mask.any():
            assert segment["mean_uncertainty"] == pytest.approx(spread[mask].mean(), rel=1e-6)
            assert segment["boundary_uncertainty"] == pytest.approx(spread[band].mean(), rel=1e-6)
        expected = ranked_regions(mask, spread, DEFAULT_THRESHOLD, MAX_REGIONS)
        assert len(segment["regions"]) == len(expected)
        for region, want in zip(segment["regions"], expected):
            weights = want["weights"]
            assert region["centre_lps"] == pytest.approx(physical(labels_image, want["centre_kji"]), abs=2e-3)
            assert region["volume_ml"] == pytest.approx(len(weights) * voxel_ml, abs=1e-6)
            assert region["mean_uncertainty"] == pytest.approx(weights.mean(), rel=1e-6)
            assert region["peak_uncertainty"] == pytest.approx(weights.max(), rel=1e-6)
            checked_regions += 1
    assert checked_regions > 0, "the tiny random model should disagree somewhere; nothing was compared"
    assert record["uncertainty"]["display_range"] == list(DISPLAY_RANGE)
    assert record["uncertainty"]["threshold"] == DEFAULT_THRESHOLD
    assert record["uncertainty"]["warning"] == ""  # three members: nothing to warn about


def test_uncertainty_never_exceeds_its_stated_maximum(ensemble_run):
    """The stated meaning holds: summed class variance, at most 1 - 1/K (K = 3 with background)."""
    _, _, uncertainty_image = ensemble_run
    spread = sitk.GetArrayFromImage(uncertainty_image)
    assert 0 <= spread.min() and spread.max() <= largest_possible(len(CLASSES) + 1) + 1e-6
    assert largest_possible(2) == pytest.approx(DISPLAY_RANGE[1])  # the scale's top: a two-way split


def test_regions_ranked_with_weighted_centres_on_a_rotated_grid():
    """A hand-built case with a known answer: two hot blobs in segment 1, none in an empty segment 2."""
    labels = np.zeros((8, 9, 10), np.uint8)
    labels[2:6, 2:7, 2:8] = 1
    spread = np.zeros(labels.shape, np.float32)
    spread[3, 3, 3:5] = [0.4, 0.2]  # blob A: total 0.6, centre pulled towards the 0.4 voxel
    spread[3, 4, 3] = 0.3  # still blob A (face neighbour of (3, 3, 3))
    spread[5, 6, 7] = 0.45  # blob B: total 0.45, a single voxel at the segment's corner
    spread[0, 0, 0] = 0.49  # hot but far from the segment: in no region
    direction = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)

    def image(array):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing((0.5, 1.0, 2.0))
        img.SetOrigin((10.0, -20.0, 5.0))
        img.SetDirection(direction)
        return img

    labels_image = image(labels)
    review = segment_review(labels_image, image(spread), CLASSES, threshold=0.1)
    first, second = review
    assert first["volume_ml"] == pytest.approx(4 * 5 * 6 * 0.5 * 1.0 * 2.0 / 1000)
    assert [r["peak_uncertainty"] for r in first["regions"]] == pytest.approx([0.4, 0.45])
    blob_a = (0.4 * np.array([3, 3, 3]) + 0.2 * np.array([3, 3, 4]) + 0.3 * np.array([3, 4, 3])) / 0.9
    assert first["regions"][0]["centre_lps"] == pytest.approx(physical(labels_image, blob_a), abs=1e-3)
    assert first["regions"][1]["centre_lps"] == pytest.approx(physical(labels_image, (5, 6, 7)), abs=1e-3)
    assert second == {**second, "voxels": 0, "volume_ml": 0.0, "mean_uncertainty": None, "regions": []}


def test_ensemble_of_one_says_the_uncertainty_is_zero(tmp_path, tiny_bundle, hippocampus_case):
    result = run_segment(hippocampus_case[0], tiny_bundle, tmp_path, ensemble=1, progress="text")
    assert "uncertainty volume is all zero" in result.stderr
    record = json.loads((tmp_path / "hippocampus_001_run.json").read_text())
    assert any("uncertainty volume is all zero" in w for w in record["warnings"])
    assert "all zero" in record["uncertainty"]["warning"]  # what the panel shows
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "hippocampus_001_uncertainty.nii.gz"))).any()
    assert all(s["regions"] == [] for s in record["review"])
