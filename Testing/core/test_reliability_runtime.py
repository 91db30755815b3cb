"""Faults while running: out of memory, Ctrl-C / Cancel, unwritable output folder, disk full, existing outputs."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from DiffSegCore.inference.ensemble import Plan
from DiffSegCore.networks.unet import UNet3D
from Testing.core.conftest import REPO, CliResult, assert_one_line_error, cli_process, folder_entries, tmpfs

FAST = ("--steps", 1, "--ensemble", 1)


@contextlib.contextmanager
def network_fault(fail):
    """Fault injection: before each U-Net evaluation in this process, `fail(input)` may raise."""

    def hook(module, args):
        if isinstance(module, UNet3D):
            fail(args[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def out_of_memory(kind: str):
    """What a device does when an allocation does not fit."""
    if kind == "cuda":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    torch.empty(1 << 50, dtype=torch.uint8)  # a real request the CPU allocator refuses (1 PiB)


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_out_of_memory_retries_with_fewer_members_then_a_sliding_window(
    cli, bundle_factory, small_case, tmp_path, kind
):
    # The whole 20x24x16 volume (7680 voxels per member) never fits, a 16^3 window (4096 voxels) does.
    bundle = bundle_factory("window16", window=[16, 16, 16])

    def fail(x):
        if x[0, 0].numel() > 4096:
            out_of_memory(kind)

    with network_fault(fail):
        result = cli(
            "segment", small_case, "--model", bundle, "--output-dir", tmp_path, "--steps", 1, "--ensemble", 2,
            "--progress", "json",
        )  # fmt: skip
    assert result.code == 0, result.err
    notes = [event["message"] for event in result.events if event["stage"] == "note"]
    assert notes == [
        "out of memory with cpu, 2 member(s) per batch, full volume; retrying with cpu, 1 member(s) per batch, full volume",
        "out of memory with cpu, 1 member(s) per batch, full volume; retrying with cpu, 1 member(s) per batch, sliding window 16x16x16",
    ]
    assert result.events[-1]["stage"] == "done"
    assert sorted(folder_entries(tmp_path)) == [
        "small_001_run.json",
        "small_001_seg.nii.gz",
        "small_001_uncertainty.nii.gz",
    ]


def chain(plan: Plan | None) -> list[str]:
    steps = []
    while plan is not None:
        steps.append(plan.describe())
        plan = plan.fallback()
    return steps


def test_out_of_memory_chain_ends_on_the_cpu():
    assert chain(Plan(torch.device("cuda"), 4, None, (64, 64, 48))) == [
        "cuda, 4 member(s) per batch, full volume",
        "cuda, 2 member(s) per batch, full volume",
        "cuda, 1 member(s) per batch, full volume",
        "cuda, 1 member(s) per batch, sliding window 64x64x48",
        "cpu, 1 member(s) per batch, sliding window 64x64x48",
    ]
    # A volume no larger than the model's window gains nothing from a sliding window.
    assert chain(Plan(torch.device("cuda"), 1, None, None)) == [
        "cuda, 1 member(s) per batch, full volume",
        "cpu, 1 member(s) per batch, full volume",
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_out_of_memory_falls_back_to_the_cpu(cli, bundle_factory, small_case, tmp_path):
    bundle = bundle_factory("window16", window=[16, 16, 16])

    def fail(x):
        if x.is_cuda:
            torch.empty(1 << 50, dtype=torch.uint8, device=x.device)  # a real CUDA allocation failure

    with network_fault(fail):
        result = cli("segment", small_case, "--model", bundle, "--output-dir", tmp_path, "--device", "cuda",
                     "--steps", 1, "--ensemble", 2, "--progress", "json")  # fmt: skip
    assert result.code == 0, result.err
    notes = [event["message"] for event in result.events if event["stage"] == "note"]
    assert notes[-1].endswith("retrying with cpu, 1 member(s) per batch, sliding window 16x16x16")


def test_out_of_memory_everywhere_is_a_clear_error(cli, bundle_factory, small_case, tmp_path):
    bundle = bundle_factory("window16", window=[16, 16, 16])
    with network_fault(lambda x: out_of_memory("cpu")):
        result = cli("segment", small_case, "--model", bundle, "--output-dir", tmp_path, *FAST, "--progress", "none")
    assert_one_line_error(result, "out of memory even with one member", "more memory")
    assert folder_entries(tmp_path) == []


def test_unexpected_failure_is_one_line_unless_debug(cli, tiny_bundle, small_case, tmp_path):
    def fail(x):
        raise ValueError("something nobody planned for\nsecond line")

    with network_fault(fail):
        result = cli(
            "segment", small_case, "--model", tiny_bundle, "--output-dir", tmp_path, *FAST, "--progress", "none"
        )
        debug = cli("--debug", "segment", small_case, "--model", tiny_bundle, "--output-dir", tmp_path, *FAST)
    assert_one_line_error(result, "unexpected ValueError: something nobody planned for;", "--debug", code=1)
    assert debug.code == 1 and "Traceback" in debug.err
    assert folder_entries(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "cancel"])
def test_interrupt_mid_sampling_leaves_nothing(tiny_bundle, small_case, tmp_path, sig):
    # A real `diffseg` process, interrupted once its JSON progress says it is sampling (60 network
    # evaluations still to go); SIGTERM is what the Slicer module's Cancel sends.
    out = tmp_path / "out"
    process = cli_process(
        "segment", small_case, "--model", tiny_bundle, "--output-dir", out, "--steps", 5, "--ensemble", 12,
        "--members-per-batch", 1, "--progress", "json",
    )  # fmt: skip
    stages = []
    for line in process.stdout:
        stages.append(json.loads(line)["stage"])
        if stages[-1] == "sample":
            process.send_signal(sig)
            break
    remaining, err = process.communicate(timeout=120)
    events = [json.loads(line) for line in remaining.splitlines()]
    assert "sample" in stages, (stages, err)
    assert process.returncode == 130, err
    assert "done" not in [event["stage"] for event in events]
    assert events[-1]["stage"] == "error" and "interrupted" in events[-1]["message"]
    assert err.strip().splitlines()[-1].startswith("error: interrupted") and "Traceback" not in err
    assert folder_entries(out) == []


def test_interrupt_while_writing_removes_the_temporary_files(cli, tiny_bundle, small_case, tmp_path, monkeypatch):
    import DiffSegCore.io.volumes as volumes

    real_write, calls = volumes.sitk.WriteImage, []

    def write_then_interrupt(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C arriving while the second output is written
        return real_write(*args, **kwargs)

    monkeypatch.setattr(volumes.sitk, "WriteImage", write_then_interrupt)
    result = cli("segment", small_case, "--model", tiny_bundle, "--output-dir", tmp_path, *FAST, "--progress", "none")
    assert_one_line_error(result, "interrupted", code=130)
    assert len(calls) == 2 and folder_entries(tmp_path) == []


def test_interrupt_while_publishing_takes_back_the_outputs_already_moved(
    cli, tiny_bundle, small_case, tmp_path, monkeypatch
):
    real_replace, published = os.replace, []

    def replace_then_interrupt(source, target):
        if os.path.dirname(os.fspath(target)) == str(tmp_path):
            published.append(target)
            if len(published) == 2:
                raise KeyboardInterrupt
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    result = cli("segment", small_case, "--model", tiny_bundle, "--output-dir", tmp_path, *FAST, "--progress", "none")
    assert_one_line_error(result, "interrupted", code=130)
    assert len(published) == 2 and folder_entries(tmp_path) == []


def test_existing_outputs_are_kept_unless_overwrite(cli, tiny_bundle, small_case, tmp_path):
    first = cli("segment", small_case, "--model", tiny_bundle, "--output-dir", tmp_path, *FAST, "--progress", "none")
    assert first.code == 0, first.err
    before = {name: (tmp_path / name).read_bytes() for name in folder_entries(tmp_path)}
    again = cli("segment", small_case, "--model", tiny_bundle, "--output-dir", tmp_path, "--steps", 1,
                "--ensemble", 2, "--seed", 7, "--progress", "none")  # fmt: skip
    assert_one_line_error(again, "already exists", "--overwrite")
    assert {name: (tmp_path / name).read_bytes() for name in folder_entries(tmp_path)} == before
    forced = cli("segment", small_case, "--model", tiny_bundle, "--output-dir", tmp_path, "--steps", 1,
                 "--ensemble", 2, "--seed", 7, "--progress", "none", "--overwrite")  # fmt: skip
    assert forced.code == 0, forced.err
    assert sorted(folder_entries(tmp_path)) == sorted(before)
    assert json.loads((tmp_path / "small_001_run.json").read_text())["settings"]["seed"] == 7


@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_output_folder_that_cannot_be_a_folder(cli, tiny_bundle, small_case, tmp_path, where):
    blocker = tmp_path / "report.txt"
    blocker.write_text("a user's file\n")
    out = blocker if where == "is a file" else blocker / "out"
    result = cli("segment", small_case, "--model", tiny_bundle, "--output-dir", out, *FAST, "--progress", "none")
    assert_one_line_error(result, "cannot create output folder", "choose another --output-dir")
    assert blocker.read_text() == "a user's file\n"


def test_read_only_output_folder(cli, tiny_bundle, small_case, tmp_path):
    out = tmp_path / "readonly"
    if os.geteuid() != 0:
        out.mkdir()
        out.chmod(0o555)
        context = contextlib.nullcontext(True)
    else:  # root ignores permission bits; a read-only file system still refuses writes
        context = tmpfs(out, "1m", read_only=True)
    with context as available:
        if not available:
            pytest.skip("running as root without the right to mount a read-only tmpfs")
        result = cli("segment", small_case, "--model", tiny_bundle, "--output-dir", out, *FAST, "--progress", "none")
        assert_one_line_error(result, "not writable", "choose another --output-dir")
        assert folder_entries(out) == []


def _segment_with_file_size_limit(bundle, case, out):
    """A real `diffseg` process whose writes beyond 16 kB the kernel refuses (EFBIG, as ENOSPC on a full disk)."""

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run(
        [sys.executable, "-m", "DiffSegCore", "segment", case, "--model", bundle, "--output-dir", out,
         "--steps", "1", "--ensemble", "1", "--save-probabilities", "--progress", "none"],
        cwd=REPO, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300,
    )  # fmt: skip


def test_disk_full_while_writing(cli, tiny_bundle, small_case, tmp_path):
    # ITK's NIfTI writer reports a short write only on stderr; the check after writing must catch it.
    # On a real 48 kB tmpfs where that can be mounted, else in a process with a file size limit.
    out = tmp_path / "small_disk"
    with tmpfs(out, "48k") as mounted:
        if mounted:
            result = cli("segment", small_case, "--model", tiny_bundle, "--output-dir", out, *FAST,
                         "--save-probabilities", "--progress", "none")  # fmt: skip
        else:
            out.mkdir(exist_ok=True)
            finished = _segment_with_file_size_limit(tiny_bundle, small_case, out)
            result = CliResult(finished.returncode, finished.stdout, finished.stderr)
        message = assert_one_line_error(result, "cannot write", "free disk space")
        assert f"{out}/small_001_" in message
        assert folder_entries(out) == []
