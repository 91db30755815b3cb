"""Folder runs in worker processes (`diffseg segment --workers`): the same outputs and cohort table as one process,
a failing case or a dying worker reported while the rest go on, Ctrl-C and Slicer's SIGTERM stopping every worker
without half-written outputs, the rule for how many workers, and each worker's part of the memory budget."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffSegCore.inference import cohort
from DiffSegCore.inference.cohort import COHORT_TABLE
from DiffSegCore.inference.memory import DEFAULT_SHARE, GIB, PROCESS_BYTES, budgets, plan_run, workers_that_fit
from DiffSegCore.inference.pipeline import OutputOptions, open_model
from DiffSegCore.inference.workers import _cgroup_cpu_quota, physical_cores, segment_in_workers
from DiffSegCore.io.cases import collect_cases
from DiffSegCore.progress import RunProgress
from DiffSegCore.resources import resource_path
from DiffSegCore.settings import resolve, worker_plan, workers_value
from Testing.core.conftest import REPO, assert_one_line_error, folder_entries

BUNDLED = resource_path("Models", "hippocampus")
REAL_CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006", "hippocampus_008")
TIMING_COLUMNS = {"seconds", "load_s", "preprocess_s", "sample_s", "write_s"}
# What differs between two runs of the same cases whatever they ran in: times, measured memory, the budget planned
# within (free memory at that moment, shared by the workers).
VOLATILE_RECORD_KEYS = {"timings_s", "peak_memory_bytes", "memory"}


def linked(folder, sources):
    folder.mkdir(parents=True)
    for source in sources:
        (folder / source.name).symlink_to(source)
    return folder


def table_rows(out) -> list[dict]:
    with open(out / COHORT_TABLE, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def arrays(out, name) -> list[np.ndarray]:
    return [sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}_{kind}.nii.gz"))) for kind in ("seg", "uncertainty")]


def record(out, name) -> dict:
    data = json.loads((out / f"{name}_run.json").read_text())
    return {k: v for k, v in data.items() if k not in VOLATILE_RECORD_KEYS}


def test_two_workers_give_the_outputs_and_table_of_one_process(cli, hippocampus_dir, tmp_path):
    """Real cases, the bundled model at its defaults; one thread per process both ways (the thread count changes
    the network's rounding: results.md section 8)."""
    data = linked(tmp_path / "in", [hippocampus_dir / "imagesTr" / f"{n}.nii.gz" for n in REAL_CASES])
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"out-{workers}"
        result = cli("segment", data, "--model", BUNDLED, "--output-dir", out, "--workers", workers, "--threads", 1,
                     "--progress", "none")  # fmt: skip
        assert result.code == 0, result.err
        runs[workers] = out
    one, two = runs[1], runs[2]
    assert table_rows(two) == table_rows(one)
    assert [row["status"] for row in table_rows(two)] == ["segmented"] * len(REAL_CASES)
    for name in REAL_CASES:
        for a, b in zip(arrays(one, name), arrays(two, name)):
            np.testing.assert_array_equal(a, b)
        assert record(two, name) == record(one, name)
    assert sorted(folder_entries(one)) == sorted(folder_entries(two))


def test_spawned_workers_give_the_outputs_of_forked_ones(tiny_bundle, small_case, tmp_path):
    """macOS and Windows spawn workers, which load the model again; Linux forks one-thread workers and spawns
    workers of several threads (GNU OpenMP hangs in a forked child that runs threads after its parent did)."""
    data = tmp_path / "in"
    data.mkdir()
    for name in "abc":
        shutil.copy(small_case, data / f"{name}.nii.gz")
    bundle, settings = open_model(str(tiny_bundle), {"steps": 1, "ensemble": 2}, RunProgress("none"))
    bundle.network(torch.zeros(2, 4, 32, 32, 32), torch.zeros(2))  # parallel work in this process before any fork
    outs = {}
    for method, threads in (("fork", 1), ("spawn", 1), ("fork", 2)):
        out = outs[method, threads] = tmp_path / f"{method}-{threads}"
        out.mkdir()
        outcomes = segment_in_workers(bundle, collect_cases([data]), out, settings, OutputOptions(),
                                      RunProgress("none"), 2, threads, start_method=method)  # fmt: skip
        assert [o.status for o in outcomes] == ["segmented"] * 3
    for name in "abc":
        for a, b in zip(arrays(outs["fork", 1], name), arrays(outs["spawn", 1], name)):
            np.testing.assert_array_equal(a, b)


def test_a_failing_case_and_a_dying_worker_are_reported_and_the_rest_goes_on(
    cli, tiny_bundle, small_case, tmp_path, monkeypatch
):
    data = tmp_path / "in"
    data.mkdir()
    for name in "abcde":
        shutil.copy(small_case, data / f"{name}.nii.gz")
    (data / "broken.nii.gz").write_bytes(b"not a volume")
    real = cohort.sample_case

    def dies_on_c(bundle, case, settings, progress, keep_members=False):
        if progress.case == "c":
            os._exit(7)  # the worker process dies as a crash or the OOM killer would end it
        return real(bundle, case, settings, progress, keep_members)

    monkeypatch.setattr(cohort, "sample_case", dies_on_c)  # forked workers inherit it
    out = tmp_path / "out"
    result = cli("segment", data, "--model", tiny_bundle, "--output-dir", out, "--workers", 2,
                 "--steps", 1, "--ensemble", 2, "--progress", "json")  # fmt: skip
    assert_one_line_error(result, "2 of 6 case(s) failed", COHORT_TABLE, code=3)
    fractions = [e["fraction"] for e in result.events if e.get("fraction") is not None]
    assert fractions == sorted(fractions), "the workers' interleaved cases never move the bar back"
    notes = [e["message"] for e in result.events if e["stage"] == "note"]
    assert any(n.startswith("broken failed and was skipped") for n in notes), notes
    assert any(n.startswith("c failed and was skipped: the worker process") for n in notes), notes
    rows = {row["case"]: row for row in table_rows(out)}
    assert {n: r["status"] for n, r in rows.items()} == {
        "a": "segmented", "b": "segmented", "broken": "failed", "c": "failed", "d": "segmented", "e": "segmented"
    }  # fmt: skip
    assert "worker process segmenting it stopped (exit code 7)" in rows["c"]["message"]
    assert "broken.nii.gz" in rows["broken"]["message"]
    assert not [n for n in folder_entries(out) if n.startswith(("c_", ".c."))], "nothing of the case it died on"


FAST_ENOUGH = ("--workers", "2", "--steps", "2", "--ensemble", "4", "--progress", "none")


def interrupted_run(data, out, tiny_bundle, how: str) -> subprocess.CompletedProcess:
    """`diffseg segment --workers 2` in its own session, stopped once a first case is written: Ctrl-C in a
    terminal (SIGINT to the whole process group) or Slicer's Cancel (SIGTERM to the diffseg process only)."""
    command = [sys.executable, "-m", "DiffSegCore", "segment", str(data), "--model", str(tiny_bundle),
               "--output-dir", str(out), *FAST_ENOUGH]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*_run.json")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        rest, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    group_alive = True
    for _ in range(20):  # the workers were joined before diffseg exited; allow the kernel a moment to reap
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            group_alive = False
            break
        time.sleep(0.1)
    assert not group_alive, "worker processes outlived the run"
    return subprocess.CompletedProcess(command, process.returncode, rest, err)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupt_stops_every_worker_and_leaves_whole_cases_only(tiny_bundle, hippocampus_dir, tmp_path, how):
    sources = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[:24]
    data, out = linked(tmp_path / "in", sources), tmp_path / "out"
    names = [p.name.removesuffix(".nii.gz") for p in sources]
    stopped = interrupted_run(data, out, tiny_bundle, how)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    assert "error: interrupted" in stopped.stderr
    kinds = ("_seg.nii.gz", "_uncertainty.nii.gz", "_run.json")
    entries = folder_entries(out)
    assert not [n for n in entries if n.startswith(".")], "no staging left behind"
    assert COHORT_TABLE not in entries
    done = [n for n in names if all(f"{n}{k}" in entries for k in kinds)]
    assert all(any(n.startswith(f"{case}_") for case in done) for n in entries), "only whole cases"
    assert 0 < len(done) < len(names), "stopped mid-run"
    again = subprocess.run([sys.executable, "-m", "DiffSegCore", "segment", data, "--model", tiny_bundle,
                            "--output-dir", out, *FAST_ENOUGH], cwd=REPO, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    rows = {row["case"]: row["status"] for row in table_rows(out)}
    assert rows == {n: "complete" if n in done else "segmented" for n in names}


def test_workers_value_takes_auto_or_a_count():
    assert workers_value("auto") is None and workers_value("3") == 3
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(Exception, match="neither auto nor a whole number"):
            workers_value(bad)


def test_how_many_workers_and_threads():
    # auto: one worker with one thread per core on a CPU run of several cases
    assert worker_plan(None, None, "cpu", 60, 2) == (2, 1)
    assert worker_plan(None, None, "cpu", 60, 16) == (16, 1)
    assert worker_plan(None, None, "cpu", 3, 16) == (3, 5)  # never more workers than cases; they share the cores
    assert worker_plan(None, None, "cpu", 1, 16) == (1, None)  # one case: one process, torch's threads
    assert worker_plan(None, None, "cpu", 60, 1) == (1, None)
    assert worker_plan(None, None, "cuda", 60, 16) == (1, None)  # one process keeps a GPU busy
    assert worker_plan(None, 4, "cpu", 60, 16) == (4, 4)  # --threads: as many workers as that leaves cores for
    assert worker_plan(3, None, "cpu", 60, 16) == (3, 5)  # --workers: as asked, sharing the cores
    assert worker_plan(3, 1, "cuda", 2, 16) == (2, 1)
    assert worker_plan(1, 2, "cpu", 60, 16) == (1, 2)


def test_each_worker_plans_for_its_part_of_the_memory():
    free = 10 * GIB
    one, two = budgets(free, "cpu", None), budgets(free, "cpu", None, sharers=2)
    assert one[0] == PROCESS_BYTES + free * DEFAULT_SHARE["cpu"]
    assert two[0] == PROCESS_BYTES + free * DEFAULT_SHARE["cpu"] / 2  # each worker is a process of its own
    assert two[1] - PROCESS_BYTES == pytest.approx((one[1] - PROCESS_BYTES) / 2)
    assert budgets(free, "cpu", 4.0, sharers=4) == [1.0 * GIB]  # --max-memory is the whole run's
    assert budgets(free, "cuda", None, sharers=2)[0] == free * DEFAULT_SHARE["cuda"] / 2


def test_auto_takes_no_more_workers_than_fit_a_whole_volume_each():
    meta = json.loads((BUNDLED / "model.json").read_text())
    settings = resolve(meta)
    assert workers_that_fit(meta, (36, 52, 38), settings, "cpu", 8 * GIB, 16) == 16  # hippocampus: tiny
    default = {**meta, "network": {**meta["network"], "widths": [32, 64, 128, 256]}}
    brats = (155, 240, 240)
    fit = workers_that_fit(default, brats, settings, "cpu", 128 * GIB, 16)
    assert 1 < fit < 16
    assert plan_run(default, brats, settings, "cpu", 128 * GIB, fit)[0].window is None  # each worker: whole volume
    assert workers_that_fit(default, brats, replace(settings, window="sliding"), "cpu", 128 * GIB, 16) == 16
    assert workers_that_fit(default, brats, settings, "cpu", 1 * GIB, 16) == 1
    assert worker_plan(None, None, "cpu", 60, 16, fit) == (fit, 16 // fit)
    assert worker_plan(8, None, "cpu", 60, 16, 2) == (8, 2)  # --workers as asked: the planner adapts


def test_physical_cores_and_the_cgroup_quota(tmp_path):
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert _cgroup_cpu_quota(quota) == 1
    quota.write_text("400000 100000\n")
    assert _cgroup_cpu_quota(quota) == 4
    quota.write_text("max 100000\n")
    assert _cgroup_cpu_quota(quota) is None
    assert _cgroup_cpu_quota(tmp_path / "absent") is None


def test_a_worker_that_cannot_start_fails_its_cases_with_the_reason(tiny_bundle, small_case, tmp_path):
    """A spawned worker loads the model again; if that fails, its cases fail with the reason, in one line each."""
    data = tmp_path / "in"
    data.mkdir()
    for name in "ab":
        shutil.copy(small_case, data / f"{name}.nii.gz")
    model = shutil.copytree(tiny_bundle, tmp_path / "model")
    bundle, settings = open_model(str(model), {"steps": 1, "ensemble": 2}, RunProgress("none"))
    shutil.rmtree(model)  # gone before the workers load it
    out = tmp_path / "out"
    out.mkdir()
    failures = []
    outcomes = segment_in_workers(bundle, collect_cases([data]), out, settings, OutputOptions(), RunProgress("none"),
                                  2, 1, lambda name, exc: failures.append(name), start_method="spawn")  # fmt: skip
    assert [o.status for o in outcomes] == ["failed", "failed"] and sorted(failures) == ["a", "b"]
    for outcome in outcomes:
        assert outcome.message.startswith("the worker process segmenting it stopped (") and "\n" not in outcome.message
        assert str(model) in outcome.message, outcome.message  # the model error itself
    assert folder_entries(out) == []
