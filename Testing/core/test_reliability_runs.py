"""Run settings, implausible inputs and the warnings a run gives, through the real `diffseg segment`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from DiffSegCore.io.atomic import HOST, owned_prefix
from DiffSegCore.resources import resource_path
from Testing.core.conftest import assert_one_line_error, cli_process, folder_entries, write_volume

FAST = ("--steps", 1, "--ensemble", 2, "--progress", "json")


def run(cli, image, bundle, out, *extra):
    return cli("segment", image, "--model", bundle, "--output-dir", out, *FAST, *extra)


def run_warnings(result, out, case: str) -> tuple[list[str], list[str]]:
    """The run's warning notes (progress events) and the warnings in its run record."""
    assert result.code == 0, result.err
    notes = [e["message"].removeprefix("warning: ") for e in result.events if e["stage"] == "note"]
    return notes, json.loads((out / f"{case}_run.json").read_text())["warnings"]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("--eta", "nan"), ("--eta must be a finite number",)),
        (("--eta", "inf"), ("--eta must be a finite number",)),
        (("--eta", "2"), ("--eta 2.0 is out of range", "0..1")),
        (("--members-per-batch", "-1"), ("--members-per-batch -1 is out of range", "1..64")),
        (("--members-per-batch", "0"), ("--members-per-batch 0 is out of range", "1..64")),
    ],
)
def test_unusable_settings_are_refused_before_anything_runs(cli, tiny_bundle, small_case, tmp_path, flags, words):
    result = run(cli, small_case, tiny_bundle, tmp_path / "out", *flags)
    assert_one_line_error(result, *words)
    assert not any(e["stage"] == "sample" for e in result.events)
    assert folder_entries(tmp_path / "out") == []


@pytest.mark.parametrize("spacing", [1e6, 1e-6])
def test_impossible_spacing_is_refused(cli, tiny_bundle, small_case, tmp_path, spacing):
    image = sitk.ReadImage(str(small_case))
    image.SetSpacing((spacing, 1.0, 1.0))
    path = tmp_path / "odd_001.nii.gz"
    sitk.WriteImage(image, str(path))
    result = run(cli, path, tiny_bundle, tmp_path / "out")
    assert_one_line_error(result, "voxel spacing", "no scanner makes", "fix the spacing in the file's header")
    assert folder_entries(tmp_path / "out") == []


def test_a_spacing_that_would_resample_to_billions_of_voxels_is_refused(cli, tiny_bundle, small_case, tmp_path):
    # 900 mm voxels are within what a header may say, but at the model's 1 mm the 20 x 24 x 16 crop would
    # need 18000 x 21600 x 14400 voxels: refused before ITK tries to allocate them.
    image = sitk.ReadImage(str(small_case))
    image.SetSpacing((900.0, 900.0, 900.0))
    sitk.WriteImage(image, str(tmp_path / "huge_001.nii.gz"))
    result = run(cli, tmp_path / "huge_001.nii.gz", tiny_bundle, tmp_path / "out")
    assert_one_line_error(result, "would become 18000 x 21600 x 14400 voxels", "check the voxel spacing")
    assert folder_entries(tmp_path / "out") == []


def test_a_label_map_given_as_the_image_is_warned(cli, tiny_bundle, hippocampus_case, tmp_path):
    labels = write_volume(tmp_path / "labels_001.nii.gz", sitk.GetArrayFromImage(sitk.ReadImage(str(hippocampus_case[1]))))
    notes, recorded = run_warnings(run(cli, labels, tiny_bundle, tmp_path / "out"), tmp_path / "out", "labels_001")
    assert notes == recorded and len(recorded) == 1 and "looks like a label map" in recorded[0], recorded
    image_notes, _ = run_warnings(run(cli, hippocampus_case[0], tiny_bundle, tmp_path / "img"), tmp_path / "img", "hippocampus_001")
    assert image_notes == []


def test_one_member_says_its_uncertainty_is_all_zero(cli, tiny_bundle, small_case, tmp_path):
    result = run(cli, small_case, tiny_bundle, tmp_path, "--ensemble", 1)
    notes, recorded = run_warnings(result, tmp_path, "small_001")
    assert notes == recorded and len(recorded) == 1, recorded
    assert "uncertainty volume is all zero" in recorded[0] and "--ensemble" in recorded[0]
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "small_001_uncertainty.nii.gz"))).any()


def test_an_input_far_from_the_training_data_is_flagged_in_the_run_record(cli, bundle_factory, small_case, tmp_path):
    # The tiny model says it saw 16-24 voxel crops at 1 mm; a 2.5 mm version of the case has a field of view
    # and spacing far from that, the crop itself none.
    bundle = bundle_factory(
        "enveloped",
        training={"size_range": [[16, 16, 12], [24, 28, 20]], "spacing_range": [[1, 1, 1], [1, 1, 1]],
                  "extent_range": [[16, 16, 12], [24, 28, 20]]},
    )  # fmt: skip
    notes, recorded = run_warnings(run(cli, small_case, bundle, tmp_path / "near"), tmp_path / "near", "small_001")
    assert notes == recorded == []
    coarse = sitk.ReadImage(str(small_case))
    coarse.SetSpacing((2.5, 2.5, 2.5))
    sitk.WriteImage(coarse, str(tmp_path / "coarse_001.nii.gz"))
    notes, recorded = run_warnings(run(cli, tmp_path / "coarse_001.nii.gz", bundle, tmp_path / "far"), tmp_path / "far", "coarse_001")
    assert notes == recorded and len(recorded) == 2, recorded
    assert recorded[0].startswith("the input's voxel spacing (2.5 x 2.5 x 2.5 mm) is far from the model's training data")
    assert recorded[1].startswith("the input's field of view (50 x 60 x 40 mm) is far from the model's training data")


def test_the_bundled_model_knows_its_training_range_and_the_sample_is_inside_it(cli, tmp_path):
    bundled = resource_path("Models/hippocampus")
    training = json.loads((bundled / "model.json").read_text())["training"]
    assert {"intensity_percentiles", "size_range", "spacing_range", "extent_range"} <= set(training)
    sample = resource_path("SampleData/hippocampus_sample.nii.gz")
    notes, recorded = run_warnings(run(cli, sample, bundled, tmp_path / "in"), tmp_path / "in", "hippocampus_sample")
    assert notes == recorded == []
    # The same sample already scaled to 0..1 (as some pipelines export it) lies below every training case.
    image = sitk.Cast(sitk.ReadImage(str(sample)), sitk.sitkFloat32)
    scaled = sitk.RescaleIntensity(image, 0.0, 1.0)
    sitk.WriteImage(scaled, str(tmp_path / "scaled_001.nii.gz"))
    notes, recorded = run_warnings(run(cli, tmp_path / "scaled_001.nii.gz", bundled, tmp_path / "out"), tmp_path / "out", "scaled_001")
    assert len(recorded) == 1 and "training range" in recorded[0], recorded


def dicom_series(folder, slice_positions):
    """A real DICOM series whose slices lie at the given z positions (a gap makes them non-uniform)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    volume = sitk.GetImageFromArray(rng.integers(0, 400, (len(slice_positions), 24, 20)).astype(np.int16))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i, z in enumerate(slice_positions):
        piece = volume[:, :, i]
        for tag, value in {
            "0020|0032": f"0\\0\\{z}", "0020|0013": str(i), "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0060": "MR",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1", "0020|000d": "1.2.826.0.1.3680043.2.1125.2",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.3.{i}",
        }.items():  # fmt: skip
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{i}.dcm"))
        writer.Execute(piece)
    return folder


def test_itk_warnings_are_one_line_each_not_blocks(tiny_bundle, tmp_path):
    series = dicom_series(tmp_path / "gappy", [0, 1, 2, 4, 5, 6])
    process = cli_process("segment", series, "--model", tiny_bundle, "--output-dir", tmp_path / "out",
                          "--steps", 1, "--ensemble", 2, encoding="utf-8")  # fmt: skip
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "WARNING: In" not in err and ".hxx" not in err, err
    lines = [line.split("\r")[-1] for line in err.splitlines() if "Non uniform sampling" in line]
    assert len(lines) == 1 and lines[0].startswith(f"warning: reading {series}: Non uniform sampling"), err
    record = json.loads((tmp_path / "out" / "gappy_run.json").read_text())
    assert [w for w in record["warnings"] if "Non uniform" in w] == [lines[0].removeprefix("warning: ")]


def test_staging_left_by_a_run_killed_with_minus_9_is_removed_by_the_next_run(cli, tiny_bundle, small_case, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f".small_001.{HOST}-{gone.pid}-x1"
    other_case = tmp_path / f".other_002.{HOST}-{gone.pid}-x3"  # swept once per run, whichever case left it
    live = tmp_path / f"{owned_prefix('.small_001.')}x2"  # this process: a run still writing
    users = tmp_path / f"notes.{HOST}-{gone.pid}-x4"  # not a hidden staging name: the user's, kept
    for folder in (dead, other_case, live, users):
        folder.mkdir()
        (folder / "small_001_seg.nii.gz").write_bytes(b"half")
    assert run(cli, small_case, tiny_bundle, tmp_path).code == 0
    assert not dead.exists() and not other_case.exists()
    assert live.exists() and users.exists()
