"""Faults in `diffseg train`: kill -9 then --resume, a corrupted checkpoint, bad cases skipped or refused."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

from DiffSegCore.training.checkpoints import load_checkpoint, previous_path
from DiffSegCore.training.loop import CHECKPOINT
from Testing.core.conftest import assert_one_line_error, cli_process, folder_entries, write_volume
from Testing.core.training_helpers import FAST, copy_cases

UNET = ("--kind", "unet", "--validation-fraction", "0.25", *FAST)


@pytest.fixture(scope="module")
def data(hippocampus_dir, tmp_path_factory):
    return copy_cases(hippocampus_dir, tmp_path_factory.mktemp("training_data") / "data")


def snapshot(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_kill_9_mid_training_then_resume_continues_from_the_last_checkpoint(cli, data, tmp_path):
    run = tmp_path / "run"
    process = cli_process(
        "train", "--data", data, "--output", run, "--cache", tmp_path / "cache", "--iterations", 100_000,
        "--checkpoint-every", 1, "--val-every", 100_000, *UNET,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not (run / CHECKPOINT).exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # a few more steps, so the kill lands mid-step or mid-write
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    step = load_checkpoint(run / CHECKPOINT)[2]["state"]["step"]  # the last checkpoint is whole
    assert 0 < step < 100_000
    resumed = cli("train", "--output", run, "--resume", "--iterations", step + 2, "--threads", 1)
    assert resumed.code == 0, resumed.err
    assert f"at step {step} of {step + 2}" in resumed.out and f"finished {step + 2} iterations" in resumed.out
    info = load_checkpoint(run / CHECKPOINT)[2]["state"]
    assert info["step"] == step + 2 and len(info["history"]["loss"]) == step + 2


def test_corrupted_checkpoint_is_a_clear_error_and_the_run_folder_is_kept(cli, data, tmp_path):
    run = tmp_path / "run"
    first = cli(
        "train", "--data", data, "--output", run, "--cache", tmp_path / "cache", "--iterations", 2,
        "--checkpoint-every", 1, *UNET,
    )  # fmt: skip
    assert first.code == 0, first.err
    checkpoint, previous = run / CHECKPOINT, previous_path(run / CHECKPOINT)
    assert load_checkpoint(previous)[2]["state"]["step"] == 1  # the checkpoint before the last is kept
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    before = snapshot(run)
    assert "best.safetensors" in before
    result = cli("train", "--output", run, "--resume", "--iterations", 4, "--threads", 1)
    assert_one_line_error(result, "checkpoint", "is unreadable", f"rename {previous.name} to {CHECKPOINT}")
    assert snapshot(run) == before, "a failed resume must neither delete nor rewrite anything in the run folder"
    previous.replace(checkpoint)  # what the message says to do
    resumed = cli("train", "--output", run, "--resume", "--iterations", 3, "--threads", 1)
    assert resumed.code == 0, resumed.err
    assert "at step 1 of 3" in resumed.out


def _case(root, name, spacing=(1.0, 1.0, 1.0)):
    rng = np.random.default_rng(len(name))
    write_volume(root / "imagesTr" / f"{name}_0000.nii.gz", rng.normal(size=(6, 7, 8)).astype(np.float32))
    write_volume(root / "labelsTr" / f"{name}.nii.gz", (rng.random((6, 7, 8)) > 0.7).astype(np.uint8), spacing=spacing)


def test_bad_cases_are_reported_then_skipped_or_refused_by_the_flag(cli, tmp_path):
    source = tmp_path / "data"
    _case(source, "good")
    _case(source, "moved", spacing=(2.0, 1.0, 1.0))
    write_volume(source / "imagesTr" / "orphan_0000.nii.gz", np.zeros((4, 4, 4), np.float32))
    common = ("--data", source, "--cache", tmp_path / "cache", "--iterations", 1, "--kind", "unet", *FAST)

    refused = cli("train", "--output", tmp_path / "refused", "--refuse-bad-cases", *common)
    assert_one_line_error(refused, "2 of 3 cases cannot be used", "leave out --refuse-bad-cases")
    assert "case moved: label geometry" in refused.out and "case orphan: no label" in refused.out
    assert folder_entries(tmp_path / "refused") == [] and folder_entries(tmp_path / "cache") == []

    skipped = cli("train", "--output", tmp_path / "skipped", *common)
    assert skipped.code == 0, skipped.err
    assert "case moved: label geometry" in skipped.out and "case orphan: no label" in skipped.out
    assert "skipping 2 case(s); training on 1" in skipped.out
    assert list(json.loads((tmp_path / "skipped" / "cases.json").read_text())) == ["good"]
