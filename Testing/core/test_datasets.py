"""Finding, checking, splitting and caching training cases from real files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from DiffSegCore.errors import InputError
from DiffSegCore.training.cache import build_cache, preprocess_case
from DiffSegCore.training.datasets import find_cases, split_cases, usable_cases
from Testing.core.conftest import write_volume
from Testing.core.training_helpers import CASES, copy_cases

MR = {"channels": [{"normalisation": {"kind": "percentile_zscore"}}], "spacing": [1.0, 1.0, 1.0]}


def _pair(root, name, shape=(6, 7, 8), channels=1, label_dtype=np.uint8, spacing=(1.0, 1.0, 1.0)):
    rng = np.random.default_rng(len(name))
    for c in range(channels):
        write_volume(root / "imagesTr" / f"{name}_{c:04d}.nii.gz", rng.normal(size=shape).astype(np.float32))
    label = (rng.random(shape) > 0.7).astype(label_dtype)
    write_volume(root / "labelsTr" / f"{name}.nii.gz", label, spacing=spacing)


def test_msd_folder_with_dataset_json(hippocampus_dir, tmp_path):
    dataset = find_cases(copy_cases(hippocampus_dir, tmp_path / "msd"))
    assert [c.name for c in dataset.cases] == CASES
    assert dataset.channel_names == ["MRI"]
    assert dataset.labels == {1: "Anterior", 2: "Posterior"}
    assert all(c.channels == 1 and c.label is not None for c in dataset.cases)


def test_nnunet_folder_groups_channel_files(tmp_path):
    for name in ("a", "b"):
        _pair(tmp_path, name, channels=2)
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "labels": {"x": 1}}))
    dataset = find_cases(tmp_path)
    assert [c.name for c in dataset.cases] == ["a", "b"]
    assert [p.name for p in dataset.cases[0].images] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert dataset.channel_names == ["T1", "T2"] and dataset.labels == {1: "x"}
    image, label = preprocess_case(dataset.cases[0], {"channels": [{}, {}], "spacing": None})
    assert image.shape == (2, 6, 7, 8) and label.dtype == np.uint8


def test_msd_modalities_in_one_4d_file_are_split_into_channels(tmp_path):
    volumes = [sitk.GetImageFromArray(np.full((5, 6, 7), float(c), np.float32)) for c in range(3)]
    (tmp_path / "imagesTr").mkdir()
    sitk.WriteImage(sitk.JoinSeries(volumes), str(tmp_path / "imagesTr" / "brain_001.nii.gz"))
    write_volume(tmp_path / "labelsTr" / "brain_001.nii.gz", np.zeros((5, 6, 7), np.uint8))
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"}}))
    case = find_cases(tmp_path).cases[0]
    assert case.channels == 3
    image, _ = preprocess_case(case, {"channels": [{"kind": "zscore"}] * 3, "spacing": None})
    assert image.shape == (3, 5, 6, 7)


def test_json_and_csv_lists_resolve_paths_relative_to_the_list(tmp_path):
    _pair(tmp_path, "c1", channels=2)
    entry = {"image": ["imagesTr/c1_0000.nii.gz", "imagesTr/c1_0001.nii.gz"], "label": "labelsTr/c1.nii.gz"}
    (tmp_path / "list.json").write_text(json.dumps([entry]))
    (tmp_path / "list.csv").write_text(
        "image,label\nimagesTr/c1_0000.nii.gz;imagesTr/c1_0001.nii.gz,labelsTr/c1.nii.gz\n"
    )
    for name in ("list.json", "list.csv"):
        (case,) = find_cases(tmp_path / name).cases
        assert case.name == "c1" and case.channels == 2
        assert case.images[0] == (tmp_path / "imagesTr" / "c1_0000.nii.gz").resolve()


def test_bad_cases_are_reported_one_by_one_and_skipped_or_refused(tmp_path):
    _pair(tmp_path, "good")
    _pair(tmp_path, "moved", spacing=(2.0, 1.0, 1.0))
    write_volume(tmp_path / "imagesTr" / "orphan_0000.nii.gz", np.zeros((4, 4, 4), np.float32))
    cases = find_cases(tmp_path).cases
    messages = []
    kept = usable_cases(cases, "skip", log=messages.append)
    assert [c.name for c in kept] == ["good"]
    assert any("moved" in m and "geometry" in m for m in messages)
    assert any("orphan" in m and "no label" in m for m in messages)
    with pytest.raises(InputError, match="2 of 3 cases cannot be used"):
        usable_cases(cases, "refuse", log=lambda _: None)


def test_float32_labels_are_accepted_fractional_ones_refused(tmp_path):
    _pair(tmp_path, "f32", label_dtype=np.float32)
    case = find_cases(tmp_path).cases[0]
    _, label = preprocess_case(case, {"channels": [{}], "spacing": None})
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
    write_volume(case.label, np.full((6, 7, 8), 0.5, np.float32))
    with pytest.raises(InputError, match="not class numbers"):
        preprocess_case(case, {"channels": [{}], "spacing": None})


def test_split_is_deterministic_disjoint_and_complete():
    names = [f"case{i:03d}" for i in range(50)]
    split = split_cases(names, 0.2, seed=0)
    assert split == split_cases(list(reversed(names)), 0.2, seed=0)
    assert len(split["validation"]) == 10
    assert sorted(split["train"] + split["validation"]) == names
    assert split["validation"] != split_cases(names, 0.2, seed=1)["validation"]
    with pytest.raises(InputError):
        split_cases(names, 1.0, seed=0)


def test_cache_is_reused_and_keyed_by_the_spec(hippocampus_dir, tmp_path):
    cases = find_cases(copy_cases(hippocampus_dir, tmp_path / "data", CASES[:2])).cases
    logs = []
    first = build_cache(cases, MR, tmp_path / "cache", log=logs.append)
    again = build_cache(cases, MR, tmp_path / "cache", log=logs.append)
    assert [c.path for c in first] == [c.path for c in again]
    assert "2 case(s) prepared" in logs[0] and "0 case(s) prepared, 2 reused" in logs[1]
    other = build_cache(cases, {**MR, "channels": [{"normalisation": {"kind": "zscore"}}]}, tmp_path / "cache")
    assert {c.path for c in other}.isdisjoint({c.path for c in first})
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 4 and not any(name.startswith(".") for name in files)
    image, label = first[0].load()
    assert image.dtype == np.float32 and abs(float(image.mean())) < 1e-3 and label.max() == 2
