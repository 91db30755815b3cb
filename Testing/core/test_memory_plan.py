"""The memory planner: its choices for given free memory (pure functions, no torch), and equal results
whichever plan runs (the real bundled model on a real hippocampus case)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from DiffSegCore.inference.memory import (
    GIB,
    PROCESS_BYTES,
    budgets,
    candidate_windows,
    cgroup_headroom_bytes,
    choose,
    estimate_run,
    model_grid_shape,
    plan_bytes,
    window_coverage,
)
from DiffSegCore.resources import resource_path
from DiffSegCore.settings import resolve
from Testing.core.conftest import assert_one_line_error

BUNDLED = resource_path("Models", "hippocampus")
# The planner's cases below are sized for an 8/16/32/64 network with no training window (the bundled
# model up to 1.0.2); pinned here so that they test the planner, not whichever model is bundled.
META = {
    **{k: v for k, v in json.loads((BUNDLED / "model.json").read_text()).items() if k != "window"},
    "network": {
        "kind": "diffusion",
        "image_channels": 1,
        "num_classes": 3,
        "coords": False,
        "widths": [8, 16, 32, 64],
        "res_blocks": 1,
        "skip": "add",
        "time_dim": 64,
    },
}
BRATS_XYZ = (240, 240, 155)  # a BraTS-sized brain volume at 1 mm
ONE_MM = (1.0, 1.0, 1.0)
TOLERANCE = 1e-3  # on probabilities in [0, 1] after the network and a softmax, in float32


def plan_for(free_gib: float, **chosen):
    return estimate_run(META, BRATS_XYZ, ONE_MM, resolve(META, chosen), available=int(free_gib * GIB))


def test_more_members_need_more_memory_and_a_window_needs_less():
    cfg, shape = META["network"], (155, 240, 240)
    one, two = plan_bytes(cfg, shape, 1, None, 1), plan_bytes(cfg, shape, 2, None, 1)
    window = plan_bytes(cfg, shape, 1, (96, 96, 96), 4)
    assert PROCESS_BYTES < window < one < two
    assert plan_bytes(cfg, shape, 1, (96, 96, 96), 1) < window
    # on a GPU the loaded libraries and the ensemble sums stay on the host
    assert plan_bytes(cfg, shape, 1, None, 1, "cuda") < one - PROCESS_BYTES


@pytest.mark.parametrize(
    "free_gib, chosen, expected",
    [
        (24, {}, (2, None, 1)),  # a fifth of 24 GiB holds two members over the whole volume
        (16, {}, (1, None, 1)),  # the laptop: one member at a time, under 4 GiB
        (16, {"max_memory": 3}, (1, None, 1)),
        (16, {"max_memory": 2.5}, (2, (96, 96, 96), 4)),  # members share the windows' working memory
        (16, {"max_memory": 2}, (1, (96, 96, 96), 3)),
        (16, {"max_memory": 1.6}, (1, (48, 48, 48), 4)),
        (16, {"max_memory": 1.55}, (1, (48, 48, 48), 3)),
        (4, {}, (1, None, 1)),  # nothing fits a fifth of 4 GiB: up to 90% of it, the fastest plan that fits
        (64, {}, (5, None, 1)),
        (64, {"members_per_batch": 3}, (3, None, 1)),
        (64, {"window": "sliding"}, (5, (96, 96, 96), 4)),
    ],
)
def test_plan_for_the_free_memory(free_gib, chosen, expected):
    plan = plan_for(free_gib, **chosen)
    assert (plan.members_per_batch, plan.window, plan.windows_per_batch) == expected
    budget = min(chosen.get("max_memory", 1e9) * GIB, PROCESS_BYTES + 0.9 * free_gib * GIB)
    assert plan.peak_bytes <= budget


def test_default_plans_for_a_fifth_of_the_free_memory():
    for free in (8, 12, 16, 20, 32):
        plan = plan_for(free)
        assert plan.peak_bytes <= PROCESS_BYTES + 0.2 * free * GIB
        # and no plan of more members would have fitted as well
        bigger = plan_bytes(META["network"], (155, 240, 240), plan.members_per_batch + 1, None, 1)
        assert plan.members_per_batch == 5 or bigger > PROCESS_BYTES + 0.2 * free * GIB


def test_more_free_memory_never_gives_a_smaller_plan():
    previous = None
    for free_mib in range(1500, 64 * 1024, 512):
        plan = plan_for(free_mib / 1024, max_memory=free_mib / 1024)
        if plan is None:
            assert previous is None
            continue
        if previous is not None:
            assert plan.peak_bytes >= previous.peak_bytes
            assert plan.seconds <= previous.seconds
        previous = plan
    assert previous is not None and previous.members_per_batch == 5 and previous.window is None


def test_nothing_fits_is_none_and_full_volume_is_kept_when_asked_for():
    assert plan_for(16, max_memory=1.5) is None  # the volume-sized arrays alone need more
    forced = plan_for(16, max_memory=1.0, window="full")
    assert (forced.members_per_batch, forced.window) == (1, None) and forced.peak_bytes > GIB


def test_budgets_default_share_then_more_or_the_cap():
    assert budgets(10 * GIB, "cpu", None) == [PROCESS_BYTES + 2 * GIB, PROCESS_BYTES + 9 * GIB]
    assert budgets(10 * GIB, "cuda", None) == [8 * GIB, 9 * GIB]
    assert budgets(10 * GIB, "cpu", 3) == [3 * GIB]
    assert budgets(2 * GIB, "cpu", 3) == [PROCESS_BYTES + 1.8 * GIB]  # a cap above the free memory does not count


def test_windows_shrink_by_halves_to_a_multiple_of_the_network():
    assert candidate_windows((155, 240, 240), (96, 96, 96), 8) == [(96, 96, 96), (48, 48, 48), (32, 32, 32)]
    assert candidate_windows((36, 50, 40), (96, 96, 96), 8) == [(36, 50, 40), (32, 32, 32)]
    assert candidate_windows((20, 20, 20), (96, 96, 96), 8) == [(20, 20, 20)]
    assert window_coverage((155, 240, 240), (240, 240, 240)) == 1.0
    assert window_coverage((155, 240, 240), (96, 96, 96)) == pytest.approx((2 * 96 / 155) * (3 * 96 / 240) ** 2)


def test_model_grid_shape_is_the_shape_preprocessing_gives(hippocampus_case):
    import SimpleITK as sitk

    from DiffSegCore.io.preprocess import prepare_image

    image = sitk.ReadImage(str(hippocampus_case[0]))
    image.SetSpacing((0.7, 1.3, 0.9))
    meta = {**META, "spacing": [1.0, 1.0, 1.0]}
    array, _ = prepare_image([image], meta)
    assert model_grid_shape(image.GetSize(), image.GetSpacing(), meta["spacing"]) == tuple(array.shape[1:])


def test_free_memory_off_linux_from_sysconf_or_a_stated_assumption(monkeypatch):
    from DiffSegCore.inference import memory

    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(memory.os, "sysconf", pages.__getitem__)
    assert memory._free_bytes_elsewhere() == 1000 * 4096

    def unsupported(name: str) -> int:
        raise ValueError(f"unrecognized configuration name {name}")  # what macOS says for SC_AVPHYS_PAGES

    monkeypatch.setattr(memory.os, "sysconf", unsupported)
    assert memory._free_bytes_elsewhere() == memory.UNKNOWN_FREE_BYTES
    monkeypatch.delattr(memory.os, "sysconf")  # Windows has no sysconf (and takes the GlobalMemoryStatusEx path)
    if memory.sys.platform != "win32":
        assert memory._free_bytes_elsewhere() == memory.UNKNOWN_FREE_BYTES


def test_cgroup_headroom_v1_v2_and_no_limit(tmp_path: Path):
    assert cgroup_headroom_bytes(tmp_path) is None
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text("100\n")
    assert cgroup_headroom_bytes(tmp_path) is None
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{4 * GIB}\n")
    assert cgroup_headroom_bytes(tmp_path) == 4 * GIB - 100
    (tmp_path / "memory.max").write_text(f"{2 * GIB}\n")
    (tmp_path / "memory.current").write_text(f"{GIB}\n")
    assert cgroup_headroom_bytes(tmp_path) == GIB
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_headroom_bytes(tmp_path) is None


def test_choose_alone_with_the_default_network():
    config = {"image_channels": 1, "num_classes": 2, "widths": [32, 64, 128, 256], "coords": True}
    plan = choose(config, (128, 128, 128), 4 * GIB, ensemble=4, steps=5)
    assert plan.window is None and 1 < plan.members_per_batch < 4 and plan.peak_bytes <= 4 * GIB
    forced = choose(config, (128, 128, 128), 4 * GIB, ensemble=4, steps=5, members_per_batch=4)
    assert forced.members_per_batch == 4 and forced.window == (96, 96, 96) and forced.peak_bytes <= 4 * GIB


# --- equal results whichever plan runs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_case(hippocampus_case):
    import torch

    from DiffSegCore.io.preprocess import prepare_image
    from DiffSegCore.io.volumes import read_channels
    from DiffSegCore.models.bundle import load_bundle

    torch.set_num_threads(1)
    bundle = load_bundle(BUNDLED, torch.device("cpu"))
    image, _ = prepare_image(read_channels([hippocampus_case[0]]), bundle.meta)
    return bundle, image


def test_members_batched_or_one_at_a_time_give_the_same_ensemble(bundled_case):
    import torch

    from DiffSegCore.inference.ensemble import predict_volume

    bundle, image = bundled_case
    # float32: bf16 (auto on CPUs with native bf16) rounds differently with the batch (test_precision's tolerance)
    settings = resolve(
        bundle.meta, {"device": "cpu", "ensemble": 4, "steps": 2, "seed": 3, "window": "full", "precision": "float32"}
    )
    together = predict_volume(bundle, image, replace(settings, members_per_batch=4))
    alone = predict_volume(bundle, image, replace(settings, members_per_batch=1))
    assert together.plan.startswith("cpu, 4 member(s)") and alone.plan.startswith("cpu, 1 member(s)")
    # float32 convolutions sum in an order that depends on the batch: equal to float precision, not bit for bit
    torch.testing.assert_close(together.mean_probs, alone.mean_probs, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(together.variance, alone.variance, rtol=0, atol=TOLERANCE)
    assert (together.labels != alone.labels).float().mean() < 1e-3


def test_window_plans_give_the_same_members(bundled_case):
    """A window holding the whole volume equals the full volume; windows per batch change nothing; members in a
    sliding window batched or not are the same. (Windows smaller than the volume blend differently at the seams,
    so the planner takes the whole volume whenever it fits.)"""
    import torch

    from DiffSegCore.inference.plan import Plan
    from DiffSegCore.inference.predictor import bundle_members, conditioning

    bundle, image = bundled_case
    cpu = torch.device("cpu")
    settings = resolve(bundle.meta, {"device": "cpu", "ensemble": 2, "steps": 2, "seed": 5, "precision": "float32"})
    cond = conditioning(bundle.network, image)
    shape = tuple(image.shape[1:])

    def members(plan: Plan, count: int = 2) -> torch.Tensor:
        return torch.cat(
            [bundle_members(bundle, cond, settings, plan, k, plan.batch) for k in range(0, count, plan.batch)]
        )

    full = members(Plan(cpu, 2, None))
    torch.testing.assert_close(members(Plan(cpu, 2, shape, None, 1)), full, rtol=0, atol=TOLERANCE)
    small = (16, 16, 16)
    four = members(Plan(cpu, 2, small, None, 4))
    torch.testing.assert_close(members(Plan(cpu, 2, small, None, 1)), four, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(members(Plan(cpu, 1, small, None, 3)), four, rtol=0, atol=TOLERANCE)


# --- the estimate before the run, and beside the measured peak after it --------------------------------------------


def test_dry_run_prints_the_plan_and_writes_nothing(cli, small_case, tmp_path):
    out = tmp_path / "out"
    text = cli("segment", small_case, "--model", BUNDLED, "--dry-run", "--max-memory", "3")
    assert text.code == 0, text.err
    assert "small_001: 20x24x16 voxels" in text.out and "plan: cpu, 5 member(s) per batch, full volume" in text.out
    assert "GiB peak" in text.out and "expected sampling time" in text.out
    events = cli(
        "segment", small_case, "--model", BUNDLED, "--dry-run", "--progress", "json", "--output-dir", out
    ).events
    planned = next(event["dry_run"] for event in events if "dry_run" in event)
    assert planned["shape_zyx"] == [16, 24, 20] and planned["members_per_batch"] == 5
    assert 0 < planned["estimate"]["estimated_peak_bytes"] <= planned["budget_bytes"]
    assert events[-1]["stage"] == "done" and not out.exists()
    assert_one_line_error(cli("segment", small_case, "--model", BUNDLED), "--output-dir", "--dry-run")


def test_run_record_keeps_the_estimate_beside_the_measured_peak(cli, small_case, tmp_path):
    result = cli("segment", small_case, "--model", BUNDLED, "--output-dir", tmp_path, "--progress", "none",
                 "--ensemble", 2, "--max-memory", "2")  # fmt: skip
    assert result.code == 0, result.err
    record = json.loads((tmp_path / "small_001_run.json").read_text())
    memory = record["memory"]
    assert record["settings"]["max_memory"] == 2.0
    assert memory["members_per_batch"] == 2 and memory["window"] is None and memory["budget_bytes"] == 2 * GIB
    assert memory["estimate"]["estimated_peak_bytes"] > PROCESS_BYTES
    assert memory["measured_peak_bytes"] == record["peak_memory_bytes"] > 0
