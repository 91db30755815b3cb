"""Folder runs: bad cases skipped and reported, reruns resume, outputs never read as or written over inputs,
one cohort table, reading and writing overlapped with the network, and the case split under torchrun."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import SimpleITK as sitk

from DiffSegCore.inference.cohort import COHORT_TABLE, segment_cases
from DiffSegCore.inference.pipeline import OutputOptions, open_model
from DiffSegCore.io.cases import collect_cases
from DiffSegCore.progress import RunProgress
from Testing.core.conftest import REPO, assert_one_line_error, folder_entries
from Testing.core.training_helpers import CASES, copy_cases, run_training_command

FAST = ("--steps", 1, "--ensemble", 2, "--progress", "none")


def make_folder(folder, small_case, names=("a", "b", "c")):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(small_case, folder / f"{name}.nii.gz")
    return folder


def table(out) -> dict[str, dict]:
    with open(out / COHORT_TABLE, newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def stamps(out) -> dict[str, int]:
    return {name: (out / name).stat().st_mtime_ns for name in folder_entries(out) if name != COHORT_TABLE}


def test_a_bad_case_is_reported_and_skipped_and_a_rerun_resumes(cli, tiny_bundle, small_case, tmp_path):
    data, out = make_folder(tmp_path / "in", small_case), tmp_path / "out"
    (data / "broken.nii.gz").write_bytes(b"not a volume")
    first = cli("segment", data, "--model", tiny_bundle, "--output-dir", out, *FAST)
    assert_one_line_error(first, "1 of 4 case(s) failed", "broken", COHORT_TABLE, code=3)
    rows = table(out)
    assert {n: r["status"] for n, r in rows.items()} == {"a": "segmented", "b": "segmented", "c": "segmented",
                                                         "broken": "failed"}  # fmt: skip
    assert "broken.nii.gz" in rows["broken"]["message"]
    assert all((out / f"{n}_seg.nii.gz").is_file() for n in "abc")

    # A crash lost case b's outputs; the file is repaired: the rerun segments b and broken only.
    for name in folder_entries(out):
        if name.startswith("b_"):
            (out / name).unlink()
    before = stamps(out)
    sitk.WriteImage(sitk.ReadImage(str(small_case)), str(data / "broken.nii.gz"))
    again = cli("segment", data, "--model", tiny_bundle, "--output-dir", out, *FAST)
    assert again.code == 0, again.err
    rows = table(out)
    assert {n: r["status"] for n, r in rows.items()} == {"a": "complete", "b": "segmented", "c": "complete",
                                                         "broken": "segmented"}  # fmt: skip
    after = stamps(out)
    assert {n: after[n] for n in before} == before, "complete cases must not be rewritten"
    assert (out / "b_seg.nii.gz").is_file() and (out / "broken_seg.nii.gz").is_file()


def test_cohort_table_gives_time_and_volume_per_class(cli, tiny_bundle, small_case, tmp_path):
    data, out = make_folder(tmp_path / "in", small_case, ("a", "b")), tmp_path / "out"
    result = cli("segment", data, "--model", tiny_bundle, "--output-dir", out, *FAST)
    assert result.code == 0, result.err
    row = table(out)["a"]
    labels = sitk.ReadImage(str(out / "a_seg.nii.gz"))
    voxel_ml = np.prod(labels.GetSpacing()) / 1000
    counts = np.bincount(sitk.GetArrayFromImage(labels).ravel(), minlength=3)
    volume_columns = [k for k in row if k.startswith("volume_ml ")]
    assert len(volume_columns) == 2
    for value, column in enumerate(volume_columns, start=1):
        assert abs(float(row[column]) - counts[value] * voxel_ml) < 1e-3, column
    assert float(row["seconds"]) >= float(row["sample_s"]) > 0


def test_outputs_of_other_settings_are_not_replaced_without_overwrite(cli, tiny_bundle, small_case, tmp_path):
    data, out = make_folder(tmp_path / "in", small_case, ("a", "b")), tmp_path / "out"
    assert cli("segment", data, "--model", tiny_bundle, "--output-dir", out, *FAST).code == 0
    before = {n: (out / n).read_bytes() for n in folder_entries(out) if n != COHORT_TABLE}
    other = cli("segment", data, "--model", tiny_bundle, "--output-dir", out, *FAST, "--seed", 7)
    assert_one_line_error(other, "2 of 2 case(s) failed", "already exists", "--overwrite", code=3)
    assert {n: (out / n).read_bytes() for n in before} == before
    forced = cli("segment", data, "--model", tiny_bundle, "--output-dir", out, *FAST, "--seed", 7, "--overwrite")
    assert forced.code == 0, forced.err
    assert {r["status"] for r in table(out).values()} == {"segmented"}


def test_an_unfinished_case_is_not_taken_for_complete(cli, tiny_bundle, small_case, tmp_path):
    data, out = make_folder(tmp_path / "in", small_case, ("a", "b")), tmp_path / "out"
    assert cli("segment", data, "--model", tiny_bundle, "--output-dir", out, *FAST).code == 0
    (out / "a_run.json").unlink()  # cut short between two renames: no run record
    again = cli("segment", data, "--model", tiny_bundle, "--output-dir", out, *FAST)
    assert_one_line_error(again, "1 of 2", "a_seg.nii.gz already exists", code=3)
    assert table(out)["b"]["status"] == "complete"


def test_output_folder_equal_to_the_input_folder_is_refused(cli, tiny_bundle, small_case, tmp_path):
    data = make_folder(tmp_path / "in", small_case, ("a", "b"))
    before = folder_entries(data)
    result = cli("segment", data, "--model", tiny_bundle, "--output-dir", tmp_path / "in" / ".", *FAST, "--overwrite")
    assert_one_line_error(result, "is the input folder", "choose another --output-dir")
    assert folder_entries(data) == before


def test_an_output_never_replaces_an_input(cli, tiny_bundle, small_case, tmp_path):
    data = make_folder(tmp_path / "in", small_case, ("x", "x_seg"))
    kept = (data / "x_seg.nii.gz").read_bytes()
    result = cli("segment", data / "x.nii.gz", data / "x_seg.nii.gz", "--model", tiny_bundle,
                 "--output-dir", data, *FAST, "--overwrite")  # fmt: skip
    assert_one_line_error(result, "1 of 2", "would replace an input", code=3)
    assert (data / "x_seg.nii.gz").read_bytes() == kept
    assert (data / "x_seg_seg.nii.gz").is_file() and not (data / "x_run.json").exists()


def test_overlapped_reading_and_writing_give_the_same_outputs(tiny_bundle, small_case, tmp_path):
    data = make_folder(tmp_path / "in", small_case, ("a", "b", "c"))
    bundle, run_settings = open_model(str(tiny_bundle), {"steps": 1, "ensemble": 2}, RunProgress("none"))
    arrays = []
    for overlap in (True, False):
        out = tmp_path / f"out-{overlap}"
        out.mkdir()
        outcomes = segment_cases(
            bundle, collect_cases([data]), out, run_settings, OutputOptions(), RunProgress("none"), overlap=overlap
        )
        assert [o.status for o in outcomes] == ["segmented"] * 3
        arrays.append([sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{n}_uncertainty.nii.gz"))) for n in "abc"])
    for overlapped, plain in zip(*arrays):
        np.testing.assert_array_equal(overlapped, plain)


def torchrun(*args, home) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m DiffSegCore ARGS`: two real gloo processes on the CPU."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "DiffSegCore", *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFSEG_HOME": str(home)}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the ranks too, not only the launcher
        raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def torchrun_segment(data, out, bundle) -> subprocess.CompletedProcess:
    return torchrun("segment", data, "--model", bundle, "--output-dir", out, "--steps", 1, "--ensemble", 2,
                    "--device", "cpu", "--progress", "json", home=out.parent / "home")  # fmt: skip


def test_torchrun_splits_the_cases_between_two_gloo_ranks_and_resumes(tiny_bundle, small_case, tmp_path):
    data, out = make_folder(tmp_path / "in", small_case, ("a", "b", "c", "d", "e")), tmp_path / "out"
    first = torchrun_segment(data, out, tiny_bundle)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = table(out)
    assert {n: (r["status"], r["rank"]) for n, r in rows.items()} == {
        "a": ("segmented", "0"), "b": ("segmented", "1"), "c": ("segmented", "0"), "d": ("segmented", "1"),
        "e": ("segmented", "0"),
    }  # fmt: skip
    done = [line for line in first.stdout.splitlines() if '"stage": "done"' in line]
    assert len(done) == 1, "one merged final event, from rank 0"
    # Rank 1 crashed before writing d: the rerun segments d only.
    for name in folder_entries(out):
        if name.startswith("d_"):
            (out / name).unlink()
    again = torchrun_segment(data, out, tiny_bundle)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {n: r["status"] for n, r in table(out).items()} == {
        "a": "complete", "b": "complete", "c": "complete", "d": "segmented", "e": "complete"
    }  # fmt: skip


def test_torchrun_evaluate_merges_the_ranks_into_the_one_process_report(hippocampus_dir, tiny_bundle, tmp_path):
    data = copy_cases(hippocampus_dir, tmp_path / "data", CASES[:3])
    common = ["--model", tiny_bundle, "--images", data / "imagesTr", "--labels", data / "labelsTr",
              "--steps", 1, "--ensemble", 2, "--device", "cpu"]  # fmt: skip
    ranked = torchrun("evaluate", *common, "--json", tmp_path / "ranked.json", home=tmp_path / "home")
    assert ranked.returncode == 0, ranked.stderr[-3000:]
    assert run_training_command("evaluate", *common, "--json", tmp_path / "single.json") == 0
    merged, single = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("ranked", "single"))
    assert [r["case"] for r in merged["cases"]] == sorted(CASES[:3])
    for a, b in zip(merged["cases"], single["cases"]):
        assert a["dice"] == b["dice"] and a["hd95_mm"] == b["hd95_mm"], a["case"]
    assert merged["mean"]["mean_foreground_dice"] == single["mean"]["mean_foreground_dice"]
