"""Rough edges a new user hits on the command line: --cases with --split model, --debug on either side of
the subcommand, no MONAI FutureWarning in an evaluate run, every written path printed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from Testing.core.training_helpers import CASES, copy_cases


def run(*args) -> subprocess.CompletedProcess:
    """`python -m DiffSegCore ...` as a user runs it: a fresh process, default warning filters."""
    return subprocess.run([sys.executable, "-m", "DiffSegCore", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def held_out(hippocampus_dir, tiny_bundle, tmp_path_factory):
    """Three labelled cases, and a bundle that records two of them as held out."""
    root = tmp_path_factory.mktemp("edges")
    data = copy_cases(hippocampus_dir, root / "data", CASES[:3])
    bundle = shutil.copytree(tiny_bundle, root / "bundle")
    meta = json.loads((bundle / "model.json").read_text())
    meta["training"] = {"split": {"validation": CASES[:2]}}
    (bundle / "model.json").write_text(json.dumps(meta))
    return data, bundle


def test_evaluate_split_model_honours_cases_without_future_warnings(held_out, tmp_path):
    data, bundle = held_out
    out = tmp_path / "report.json"
    common = ["evaluate", "--model", bundle, "--images", data / "imagesTr", "--labels", data / "labelsTr"]
    result = run(*common, "--split", "model", "--cases", CASES[1], "--steps", 1, "--ensemble", 2, "--json", out)
    assert result.returncode == 0, result.stderr
    assert [r["case"] for r in json.loads(out.read_text())["cases"]] == [CASES[1]]
    assert "Warning" not in result.stderr, result.stderr  # MONAI's get_mask_edges FutureWarning among them
    refused = run(*common, "--split", "model", "--cases", CASES[2])  # on disk, but not held out by the model
    assert refused.returncode == 2 and f"--cases {CASES[2]} are not validation cases" in refused.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_before_or_after_the_subcommand(where, tmp_path):
    missing = tmp_path / "missing.nii.gz"
    segment = ["segment", missing, "--output-dir", tmp_path / "out", "--progress", "none"]
    args = ["--debug", *segment] if where == "before" else [*segment, "--debug"]
    result = run(*args)
    assert result.returncode == 2 and "Traceback" in result.stderr and "error: " in result.stderr
    plain = run(*segment)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr


def test_models_subcommand_takes_debug_after_its_own_subcommand():
    result = run("models", "list", "--debug")
    assert result.returncode == 0, result.stderr


def test_segment_prints_every_path_it_writes(tmp_path, tiny_bundle, small_case):
    out = tmp_path / "out"
    result = run("segment", small_case, "--model", tiny_bundle, "--output-dir", out, "--ensemble", 2, "--steps", 1,
                 "--preview")
    assert result.returncode == 0, result.stderr
    written = sorted(p for p in out.iterdir() if not p.name.startswith("."))
    assert len(written) == 4  # segmentation, uncertainty, preview, run record
    for path in written:
        assert str(path) in result.stdout, (path, result.stdout)


def test_json_results_go_into_a_new_folder_or_give_one_line(tmp_path):
    from DiffSegCore.cli.records import write_json
    from DiffSegCore.errors import InputError

    nested = tmp_path / "runs" / "abdomen" / "eval.json"  # `evaluate --json` into a folder that is not there yet
    write_json(nested, {"mean": 0.5})
    assert json.loads(nested.read_text(encoding="utf-8")) == {"mean": 0.5}
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"cannot write .* choose a writable place"):
        write_json(tmp_path / "file" / "eval.json", {})


def test_recorded_command_holds_only_the_options_given():
    from DiffSegCore.cli.main import build_parser
    from DiffSegCore.cli.records import command_line

    parser = build_parser()
    plain = command_line(parser.parse_args(["evaluate", "--model", "m", "--images", "i", "--labels", "l", "--threads", "1"]))
    assert plain == "diffseg evaluate --model m --images i --labels l --threads 1"
    assert command_line(parser.parse_args(["evaluate", "--model", "m", "--images", "i", "--labels", "l", "--debug"])).endswith("--debug")
