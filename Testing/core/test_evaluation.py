"""`diffseg evaluate`: metrics on known geometry, and a real run on hippocampus cases."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from DiffSegCore.errors import InputError
from DiffSegCore.evaluation.metrics import case_metrics
from DiffSegCore.evaluation.report import record_metrics
from DiffSegCore.models.bundle import validate_bundle
from Testing.core.training_helpers import CASES, copy_cases, run_training_command


def _cube(shape=(20, 20, 20), start=5, size=8, value=1) -> np.ndarray:
    labels = np.zeros(shape, np.int64)
    labels[start : start + size, start : start + size, start : start + size] = value
    return labels


def test_perfect_prediction():
    truth = _cube() + _cube(start=14, size=4, value=2) * (_cube() == 0)
    metrics = case_metrics(truth, truth, np.zeros(truth.shape, np.float32), 3, (1.0, 1.0, 1.0))
    assert metrics["dice"] == [1.0, 1.0]
    assert metrics["hd95_mm"] == [0.0, 0.0]
    assert metrics["uncertainty_auroc"] is None  # no errors to detect


def test_shift_gives_hd95_in_millimetres_and_dice_from_overlap():
    truth, pred = _cube(), _cube(start=7)
    metrics = case_metrics(pred, truth, np.zeros(truth.shape, np.float32), 2, (1.0, 1.0, 1.0))
    assert metrics["dice"][0] == pytest.approx(2 * 6**3 / (2 * 8**3))
    coarse = case_metrics(pred, truth, np.zeros(truth.shape, np.float32), 2, (3.0, 3.0, 3.0))
    assert coarse["hd95_mm"][0] == pytest.approx(3 * metrics["hd95_mm"][0])


def test_uncertainty_auroc_ranks_errors_near_the_structures():
    truth, pred = _cube(), _cube(start=6)
    errors = (truth != pred).astype(np.float32)
    assert case_metrics(pred, truth, errors, 2, (1.0,) * 3)["uncertainty_auroc"] == pytest.approx(1.0)
    assert case_metrics(pred, truth, 1 - errors, 2, (1.0,) * 3)["uncertainty_auroc"] == pytest.approx(0.0)
    noise = np.random.default_rng(0).random(truth.shape).astype(np.float32)
    assert 0.4 < case_metrics(pred, truth, noise, 2, (1.0,) * 3)["uncertainty_auroc"] < 0.6


@pytest.fixture(scope="module")
def dataset(hippocampus_dir, tmp_path_factory):
    return copy_cases(hippocampus_dir, tmp_path_factory.mktemp("eval") / "data", CASES[:2])


def test_evaluate_command_reports_table_json_and_records_metrics(dataset, tiny_bundle, tmp_path, capsys):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    out = tmp_path / "report.json"
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [CASES[0]], "validation": [CASES[1]]}))
    code = run_training_command(
        "evaluate",
        "--model",
        bundle,
        "--images",
        dataset / "imagesTr",
        "--labels",
        dataset / "labelsTr",
        "--split",
        split,
        "--steps",
        "2",
        "--ensemble",
        "2",
        "--device",
        "cpu",
        "--json",
        out,
        "--record",
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "Dice Anterior hippocampus" in table and "mean foreground Dice" in table
    report = json.loads(out.read_text())
    assert [r["case"] for r in report["cases"]] == [CASES[1]]
    assert report["settings"]["steps"] == 2 and report["settings"]["ensemble"] == 2
    row = report["cases"][0]
    assert len(row["dice"]) == 2 and all(0 <= d <= 1 for d in row["dice"]) and row["seconds"] > 0
    assert 0 <= row["review_score"] <= 1  # one case: too few to rank, so no Spearman is claimed
    assert report["mean"]["review_spearman"] is None and "review" in table
    assert report["mean"]["mean_foreground_dice"] == pytest.approx(np.mean(row["dice"]))
    recorded = json.loads((bundle / "model.json").read_text())["metrics"]["validation"]
    assert recorded["mean_foreground_dice"] == report["mean"]["mean_foreground_dice"]
    assert recorded["command"].startswith("diffseg evaluate") and "--ensemble 2" in recorded["command"]
    expected = json.loads((bundle / "model.json").read_text())["expected_seconds"]
    assert expected["cpu"] == max(round(report["mean"]["seconds_per_case"], 1), 0.1)


def test_a_model_faster_than_a_twentieth_of_a_second_still_records_a_valid_expected_time(tiny_bundle, tmp_path):
    bundle = tmp_path / "fast"
    shutil.copytree(tiny_bundle, bundle)
    mean = {"cases": 1, "mean_foreground_dice": 0.5, "dice": [0.5, 0.5], "hd95_mm": [1.0, 1.0]}
    mean |= {"uncertainty_auroc": 0.9, "seconds_per_case": 0.04}
    report = {"classes": ["a", "b"], "settings": {}, "device": "cpu", "command": "diffseg evaluate", "mean": mean}
    record_metrics(bundle, report)
    assert validate_bundle(bundle)["expected_seconds"] == {"cpu": 0.1}  # 0.0 would make model.json invalid


def test_evaluate_refuses_cases_without_labels(dataset, tiny_bundle, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(dataset / "labelsTr" / f"{CASES[0]}.nii.gz", labels)
    with pytest.raises(InputError, match="no label file"):
        run_training_command(
            "evaluate", "--model", tiny_bundle, "--images", dataset / "imagesTr", "--labels", labels, "--device", "cpu"
        )


def test_evaluate_split_model_uses_the_cases_the_bundle_held_out(dataset, tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    common = ["--images", dataset / "imagesTr", "--labels", dataset / "labelsTr", "--split", "model", "--device", "cpu"]
    with pytest.raises(InputError, match="records no validation cases"):
        run_training_command("evaluate", "--model", bundle, *common)
    meta = json.loads((bundle / "model.json").read_text())
    meta["training"] = {"split": {"validation": [CASES[0]]}}
    (bundle / "model.json").write_text(json.dumps(meta))
    out = tmp_path / "report.json"
    args = ["--steps", "1", "--ensemble", "1", "--json", out, "--record", "one_step"]
    assert run_training_command("evaluate", "--model", bundle, *common, *args) == 0
    assert [r["case"] for r in json.loads(out.read_text())["cases"]] == [CASES[0]]
    recorded = json.loads((bundle / "model.json").read_text())
    assert recorded["metrics"]["one_step"]["settings"]["steps"] == 1  # a named record, beside any others
    assert recorded.get("expected_seconds") == meta.get("expected_seconds")  # only the default run sets it
    with pytest.raises(InputError, match="cannot read validation cases"):
        run_training_command("evaluate", "--model", bundle, *common[:-3], tmp_path / "none.json", "--device", "cpu")
