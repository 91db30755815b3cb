"""Bad input through `diffseg segment`: one clear error line, exit 2, nothing written; odd geometry works."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import SimpleITK as sitk

from Testing.core.conftest import assert_one_line_error, folder_entries, write_volume

FAST = ("--steps", 1, "--ensemble", 2, "--progress", "none")


def segment(cli, inputs, bundle, out, *extra):
    return cli("segment", *inputs, "--model", bundle, "--output-dir", out, *FAST, *extra)


def assert_refused(cli, inputs, bundle, out, *words, extra=()):
    result = segment(cli, inputs, bundle, out, *extra)
    message = assert_one_line_error(result, *words)
    assert folder_entries(out) == [], "a refused run must leave the output folder empty"
    return message


def test_missing_file(cli, tiny_bundle, tmp_path):
    assert_refused(cli, [tmp_path / "nope.nii.gz"], tiny_bundle, tmp_path / "out", "not found", "nope.nii.gz")


def test_debug_shows_the_traceback(cli, tiny_bundle, tmp_path):
    result = cli("--debug", "segment", tmp_path / "nope.nii.gz", "--model", tiny_bundle, "--output-dir", tmp_path)
    assert result.code == 2
    assert "Traceback" in result.err and "error: input not found" in result.err


@pytest.mark.parametrize("fraction", [0.5, 0.98])
def test_truncated_gzip_nifti(cli, tiny_bundle, small_case, tmp_path, fraction):
    # ITK on its own reads a cut-short .nii.gz without complaint and fills the rest with zeros.
    data = small_case.read_bytes()
    broken = tmp_path / "cut_001.nii.gz"
    broken.write_bytes(data[: int(len(data) * fraction)])
    assert_refused(cli, [broken], tiny_bundle, tmp_path / "out", "truncated", "again")


def test_truncated_plain_nifti(cli, tiny_bundle, small_case, tmp_path):
    raw = gzip.decompress(small_case.read_bytes())
    broken = tmp_path / "cut_001.nii"
    broken.write_bytes(raw[: len(raw) - 100])
    assert_refused(cli, [broken], tiny_bundle, tmp_path / "out", "truncated", f"{len(raw) - 100} of {len(raw)}")


def test_truncated_nrrd(cli, tiny_bundle, small_case, tmp_path):
    nrrd = tmp_path / "whole.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(small_case)), str(nrrd))
    broken = tmp_path / "cut_001.nrrd"
    broken.write_bytes(nrrd.read_bytes()[:-500])
    assert_refused(cli, [broken], tiny_bundle, tmp_path / "out", "cannot read", "complete")


def test_text_file_named_like_an_image(cli, tiny_bundle, tmp_path):
    fake = tmp_path / "notes_001.nii.gz"
    fake.write_text("patient notes, not an image\n")
    assert_refused(cli, [fake], tiny_bundle, tmp_path / "out", "not an image", "nifti")


def test_2d_image(cli, tiny_bundle, tmp_path):
    path = tmp_path / "flat_001.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((20, 24), dtype=np.float32)), str(path))
    assert_refused(cli, [path], tiny_bundle, tmp_path / "out", "2d image", "3d volume")


def test_single_slice_3d_image(cli, tiny_bundle, tmp_path):
    path = write_volume(tmp_path / "slice_001.nii.gz", np.random.default_rng(0).random((1, 20, 24), dtype=np.float32))
    assert_refused(cli, [path], tiny_bundle, tmp_path / "out", "single slice", "3d volume")


def test_4d_time_series(cli, tiny_bundle, tmp_path):
    frames = [sitk.GetImageFromArray(np.random.default_rng(k).random((8, 9, 10), dtype=np.float32)) for k in range(3)]
    path = tmp_path / "series_001.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    assert_refused(cli, [path], tiny_bundle, tmp_path / "out", "4d", "extract one 3d volume")


def test_vector_image(cli, tiny_bundle, tmp_path):
    array = np.random.default_rng(0).random((8, 9, 10, 3), dtype=np.float32)
    path = tmp_path / "rgb_001.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=True), str(path))
    assert_refused(cli, [path], tiny_bundle, tmp_path / "out", "3 components", "each channel as its own file")


def test_zero_size_volume(cli, tiny_bundle, small_case, tmp_path):
    # A real NIfTI header whose third axis has size 0 (ITK alone would report that axis as size 1).
    raw = bytearray(gzip.decompress(small_case.read_bytes())[:352])
    assert raw[:4] == (348).to_bytes(4, "little")
    raw[46:48] = (0).to_bytes(2, "little")  # dim[3]
    path = tmp_path / "empty_001.nii"
    path.write_bytes(bytes(raw))
    assert_refused(cli, [path], tiny_bundle, tmp_path / "out", "empty", "0")


def test_two_channels_for_a_one_channel_model(cli, tiny_bundle, small_case, tmp_path):
    image = sitk.ReadImage(str(small_case))
    first, second = tmp_path / "case_0000.nii.gz", tmp_path / "case_0001.nii.gz"
    sitk.WriteImage(image, str(first))
    sitk.WriteImage(image, str(second))
    assert_refused(cli, [first, second], tiny_bundle, tmp_path / "out", "2 channel file(s)", "needs 1")


def test_one_channel_for_a_two_channel_model(cli, bundle_factory, small_case, tmp_path):
    channels = [{"name": "T1", "normalisation": {"kind": "percentile_zscore"}}, {"name": "T2"}]
    bundle = bundle_factory("two_channels", channels=channels)
    assert_refused(cli, [small_case], bundle, tmp_path / "out", "1 channel file(s)", "needs 2", "_0000")


def test_channels_with_different_geometry(cli, bundle_factory, small_case, tmp_path):
    channels = [{"name": "T1", "normalisation": {"kind": "percentile_zscore"}}, {"name": "T2"}]
    bundle = bundle_factory("two_channels", channels=channels)
    image = sitk.ReadImage(str(small_case))
    shifted = sitk.Image(image)
    shifted.SetOrigin(tuple(o + 2.5 for o in image.GetOrigin()))
    first, second = tmp_path / "case_0000.nii.gz", tmp_path / "case_0001.nii.gz"
    sitk.WriteImage(image, str(first))
    sitk.WriteImage(shifted, str(second))
    assert_refused(cli, [first, second], bundle, tmp_path / "out", "different geometry", "resample")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_voxels(cli, tiny_bundle, small_case, tmp_path, bad):
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(small_case))).astype(np.float32)
    array[5, 6, 7] = bad
    path = write_volume(tmp_path / "holes_001.nii.gz", array)
    assert_refused(cli, [path], tiny_bundle, tmp_path / "out", "nan or infinite", "fix or mask")


def test_nan_is_refused_before_resampling_could_hide_it(cli, bundle_factory, small_case, tmp_path):
    # Downsampling to a coarse model spacing could skip the NaN voxel; the raw input is checked instead.
    bundle = bundle_factory("coarse", spacing=[3.0, 3.0, 3.0])
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(small_case))).astype(np.float32)
    array[1, 1, 1] = np.nan
    path = write_volume(tmp_path / "holes_001.nii.gz", array)
    assert_refused(cli, [path], bundle, tmp_path / "out", "nan")


def test_constant_volume(cli, tiny_bundle, tmp_path):
    path = write_volume(tmp_path / "flat_001.nii.gz", np.full((16, 20, 24), 42, dtype=np.int16))
    assert_refused(cli, [path], tiny_bundle, tmp_path / "out", "constant", "42")


def test_preseg_with_labels_the_model_does_not_know(cli, tiny_bundle, small_case, tmp_path):
    image = sitk.ReadImage(str(small_case))
    labels = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)
    labels[4:8, 4:8, 4:8] = 7
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(image)
    mask_path = tmp_path / "mask.nii.gz"
    sitk.WriteImage(mask, str(mask_path))
    assert_refused(cli, [small_case], tiny_bundle, tmp_path / "out", "[7]", "0..2", extra=("--preseg", mask_path))


def test_preseg_on_another_grid(cli, tiny_bundle, small_case, tmp_path):
    mask_path = write_volume(tmp_path / "mask.nii.gz", np.zeros((5, 6, 7), dtype=np.uint8))
    assert_refused(
        cli, [small_case], tiny_bundle, tmp_path / "out", "geometry", "resample", extra=("--preseg", mask_path)
    )


def test_intensities_far_from_training_range_warn(cli, bundle_factory, small_case, tmp_path):
    # The tiny model says it was trained on raw intensities between 5 and 130 (like hippocampus_001);
    # the same anatomy scaled by 1000 still runs but with a warning in the output and in the run record.
    bundle = bundle_factory("ranged", training={"intensity_percentiles": [[5.0, 130.0]]})
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(small_case))).astype(np.float32)
    scaled = write_volume(tmp_path / "scaled_001.nii.gz", array * 1000)
    result = segment(cli, [scaled], bundle, tmp_path / "out", "--progress", "json")
    assert result.code == 0, result.err
    notes = [event["message"] for event in result.events if event["stage"] == "note"]
    assert len(notes) == 1 and notes[0].startswith("warning: channel T1") and "training range" in notes[0], notes
    record = json.loads((tmp_path / "out" / "scaled_001_run.json").read_text())
    assert len(record["warnings"]) == 1
    in_range = cli("segment", small_case, "--model", bundle, "--output-dir", tmp_path / "out", *FAST[:4])
    assert in_range.code == 0, in_range.err
    assert "warning:" not in in_range.err
    far = cli("segment", scaled, "--model", bundle, "--output-dir", tmp_path / "text", *FAST[:4])
    assert far.code == 0 and "warning: channel T1" in far.err, far.err


def test_oblique_anisotropic_volume_keeps_its_exact_geometry(cli, tiny_bundle, small_case, tmp_path):
    # Model spacing is 1 mm isotropic; this input is oblique (rotated about two axes) with 0.7/1.3/2.1 mm voxels.
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(small_case)))
    rotation = sitk.VersorTransform((0.3, 0.2, 0.9), 0.5).GetMatrix()
    path = write_volume(
        tmp_path / "oblique_001.nii.gz", array, spacing=(0.7, 1.3, 2.1), origin=(-12.5, 40.25, 7.0), direction=rotation
    )
    result = segment(cli, [path], tiny_bundle, tmp_path / "out", "--save-probabilities", "--ensemble", 2)
    assert result.code == 0, result.err
    reference = sitk.ReadImage(str(path))
    for name in ("seg", "uncertainty", "probabilities", "entropy"):
        output = sitk.ReadImage(str(tmp_path / "out" / f"oblique_001_{name}.nii.gz"))
        assert output.GetSize() == reference.GetSize()
        assert output.GetSpacing() == reference.GetSpacing()
        assert output.GetOrigin() == reference.GetOrigin()
        # NIfTI stores the direction as a float32 quaternion, so a second write/read moves it by ~1e-8;
        # in memory the outputs carry the input's geometry exactly (test_reliability_geometry.py).
        np.testing.assert_allclose(output.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-6)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "oblique_001_seg.nii.gz")))
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_too_large_for_memory_switches_to_a_sliding_window(cli, bundle_factory, small_case, tmp_path, monkeypatch):
    # A fifth of 2 MiB fits no plan, so the planner may use 90% of it: the whole 20x24x16 volume needs about
    # 2.0 MB beyond the loaded process, a sliding window of 8^3 about 1.3 MB (inference/memory.py).
    bundle = bundle_factory("windowed", window=[8, 8, 8])
    monkeypatch.setenv("DIFFSEG_MEMORY_LIMIT_MB", "2")
    result = cli("segment", small_case, "--model", bundle, "--output-dir", tmp_path / "out", *FAST[:4])
    assert result.code == 0, result.err
    assert "does not fit in the memory at hand" in result.err and "sliding window 8x8x8" in result.err
    record = json.loads((tmp_path / "out" / "small_001_run.json").read_text())
    assert record["settings"]["window"] == "auto"


def test_too_large_even_for_a_sliding_window_is_refused_before_sampling(
    cli, bundle_factory, small_case, tmp_path, monkeypatch
):
    bundle = bundle_factory("windowed", window=[8, 8, 8])
    monkeypatch.setenv("DIFFSEG_MEMORY_LIMIT_MB", "0.2")
    result = cli(
        "segment", small_case, "--model", bundle, "--output-dir", tmp_path / "out", *FAST[:4], "--progress", "json"
    )
    assert_one_line_error(result, "not enough memory", "DIFFSEG_MEMORY_LIMIT_MB", "more memory")
    assert "sample" not in [event["stage"] for event in result.events]
    assert result.events[-1]["stage"] == "error"
    assert folder_entries(tmp_path / "out") == []
