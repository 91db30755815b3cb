"""A real few-step training on 4 hippocampus cases, the bundle it writes, and segmenting with it."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from DiffSegCore.errors import InputError
from DiffSegCore.io.sanity import training_envelope
from DiffSegCore.io.volumes import read_channels
from DiffSegCore.models.bundle import load_bundle, validate_bundle
from DiffSegCore.training.datasets import find_cases
from Testing.core.training_helpers import CARD, FAST, copy_cases, run_training_command


def _common(root):
    """Arguments of every short run in `root`: its data and cache, 3 iterations, tiny networks."""
    common = ["--data", root / "data", "--cache", root / "cache", "--validation-fraction", "0.25", "--iterations", "3"]
    return [*common, "--val-every", "3", "--val-steps", "2", *FAST]


@pytest.fixture(scope="module")
def trained(hippocampus_dir, tmp_path_factory):
    """A unet run and a diffusion run (3 steps each) packed into one bundle."""
    root = tmp_path_factory.mktemp("training")
    copy_cases(hippocampus_dir, root / "data")
    common = _common(root)
    assert run_training_command("train", "--kind", "unet", "--output", root / "unet", *common) == 0
    code = run_training_command(
        "train", "--output", root / "diffusion", "--card", CARD, "--preseg-run", root / "unet", *common
    )
    assert code == 0
    return root


def test_run_folder_holds_split_checkpoint_curve_and_bundle(trained):
    run = trained / "diffusion"
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 3 and len(split["validation"]) == 1
    assert not set(split["train"]) & set(split["validation"])
    for name in ("checkpoint.safetensors", "best.safetensors", "training_curve.png", "config.json", "cases.json"):
        assert (run / name).is_file(), name
    assert (run / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = validate_bundle(run / "bundle")
    assert meta["id"] == "hippocampus-recycling-x0"
    assert meta["diffusion"]["prediction"] == "x0" and meta["diffusion"]["recycling"] is True
    assert meta["preseg_network"]["kind"] == "unet"
    assert meta["training"]["iterations"] == 3 and meta["training"]["split"]["validation"] == split["validation"]
    assert [c["name"] for c in meta["classes"]] == ["Anterior hippocampus", "Posterior hippocampus"]
    assert meta["channels"][0]["normalisation"] == {"kind": "percentile_zscore"}
    # What the training images were like, so that runs far from them are flagged (io/sanity.py).
    train = [c for c in find_cases(trained / "data").cases if c.name in split["train"]]
    expected = training_envelope(read_channels(list(c.images)) for c in train)
    assert {k: meta["training"][k] for k in expected} == expected
    assert meta["window"] == [16, 24, 16]  # a patch-trained network's sliding window is its training patch
    umask = os.umask(0)
    os.umask(umask)
    for name in ("best.safetensors", "checkpoint.safetensors", "bundle/diffusion.safetensors", "bundle/preseg.safetensors"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # as the umask allows, like model.json


def test_training_changed_the_weights_and_bundle_holds_the_best(trained):
    run = trained / "diffusion"
    bundle = load_bundle(run / "bundle")
    best = load_file(run / "best.safetensors")
    for key, value in bundle.network.state_dict().items():
        assert torch.equal(value, best[key]), key
    torch.manual_seed(0)  # the run's initial weights come from the training seed
    from DiffSegCore.networks.unet import build_network

    initial = build_network(bundle.network.config).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in best.items())


def test_mirrored_run_packs_another_run_as_more_members(trained):
    code = run_training_command(
        "train",
        "--output",
        trained / "mirrored",
        "--card",
        CARD,
        "--mirror-axes",
        "2",
        "--seed",
        "1",
        "--member-runs",
        trained / "diffusion",
        *_common(trained),
    )
    assert code == 0
    meta = validate_bundle(trained / "mirrored" / "bundle")
    assert meta["members"] == {"networks": 2, "mirror_axes": [2]}
    assert meta["training"]["config"]["mirror_axes"] == [2]
    assert meta["training"]["member_commands"][0].startswith("diffseg train")
    bundle = load_bundle(trained / "mirrored" / "bundle")
    other = load_file(trained / "diffusion" / "best.safetensors")
    assert all(torch.equal(bundle.more_networks[0].state_dict()[k], v) for k, v in other.items())


def test_member_runs_must_train_the_same_network(trained):
    with pytest.raises(InputError, match="same diffusion network"):
        run_training_command(
            "train",
            "--output",
            trained / "wider",
            "--card",
            CARD,
            "--member-runs",
            trained / "diffusion",
            *_common(trained),
            "--widths",
            "8",
            "8",
        )
    assert not (trained / "wider" / "checkpoint.safetensors").exists()  # refused before training


def test_second_run_reuses_the_preprocessing_cache(trained, hippocampus_dir, capsys):
    before = sorted(p.name for p in (trained / "cache").iterdir())
    data = trained / "data"
    code = run_training_command(
        "train",
        "--kind",
        "unet",
        "--data",
        data,
        "--cache",
        trained / "cache",
        "--output",
        trained / "again",
        "--iterations",
        "1",
        "--val-every",
        "1",
        "--validation-fraction",
        "0.25",
        *FAST,
    )
    assert code == 0
    assert "0 case(s) prepared, 4 reused" in capsys.readouterr().out
    assert sorted(p.name for p in (trained / "cache").iterdir()) == before


def test_segment_with_the_trained_bundle(trained, cli, hippocampus_dir):
    image = hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz"
    out = trained / "segmented"
    result = cli(
        "segment",
        image,
        "--model",
        trained / "diffusion" / "bundle",
        "--steps",
        "2",
        "--ensemble",
        "2",
        "--device",
        "cpu",
        "--output-dir",
        out,
    )
    assert result.code == 0, result.err
    seg = sitk.ReadImage(str(out / "hippocampus_001_seg.nii.gz"))
    assert seg.GetSize() == sitk.ReadImage(str(image)).GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2}
    assert (out / "hippocampus_001_uncertainty.nii.gz").is_file()


def test_packed_presegmentation_network_drives_pd_ddpm_sampling(trained, cli, hippocampus_dir):
    image = hippocampus_dir / "imagesTr" / "hippocampus_003.nii.gz"
    out = trained / "preseg"
    result = cli(
        "segment",
        image,
        "--model",
        trained / "diffusion" / "bundle",
        "--preseg",
        "model",
        "--preseg-step",
        "2",
        "--steps",
        "2",
        "--ensemble",
        "1",
        "--device",
        "cpu",
        "--output-dir",
        out,
    )
    assert result.code == 0, result.err
    assert (out / "hippocampus_003_seg.nii.gz").is_file()


def test_half_precision_export_loads_back_as_float32(trained):
    from DiffSegCore.training.export import export_bundle

    run = trained / "diffusion"
    half = export_bundle(run, trained / "half", None, trained / "unet", "float16")
    full = load_bundle(run / "bundle")
    loaded = load_bundle(half)
    assert (half / "diffusion.safetensors").stat().st_size < 0.6 * (
        run / "bundle" / "diffusion.safetensors"
    ).stat().st_size
    for key, value in full.network.state_dict().items():
        other = loaded.network.state_dict()[key]
        assert other.dtype == value.dtype
        torch.testing.assert_close(other, value, atol=2e-3, rtol=2e-3)
    assert loaded.meta["classes"][0]["name"] == "Anterior hippocampus"  # no card: the class names the run recorded


def test_extending_a_run_records_the_resume_that_shaped_the_model(trained):
    run = trained / "extended"
    shutil.copytree(trained / "diffusion", run)
    shutil.rmtree(run / "bundle")
    assert run_training_command("train", "--resume", "--output", run, "--iterations", "4", *FAST) == 0
    with pytest.raises(InputError, match="bundle already exists; pass --bundle"):  # before any training
        run_training_command("train", "--resume", "--output", run, "--iterations", "5", *FAST)
    assert json.loads((run / "config.json").read_text())["iterations"] == 4
    again = ["--iterations", "4", "--bundle", run / "again"]  # resumed at its end: not extended, not recorded
    assert run_training_command("train", "--resume", "--output", run, *again, *FAST) == 0
    command = validate_bundle(run / "again")["training"]["command"]
    start, resumed = command.split(" && ")  # the run's start, then the one resume that extended it
    assert start.startswith("diffseg train --data") and "--iterations 3" in start
    assert resumed.startswith("diffseg train --output") and "--resume" in resumed and "--iterations 4" in resumed


def test_a_run_on_every_case_carries_its_split_runs_validation_figures(trained):
    split_bundle = trained / "split_bundle"  # the recipe, trained on a split and measured on its held-out case
    shutil.copytree(trained / "diffusion" / "bundle", split_bundle)
    labelled = ["--images", trained / "data" / "imagesTr", "--labels", trained / "data" / "labelsTr"]
    evaluated = ["--split", "model", "--device", "cpu", "--ensemble", "1", "--threads", "1"]
    with pytest.raises(InputError, match="no recorded validation figures"):  # nothing measured yet
        run_training_command("train", "--output", trained / "early", "--validated-by", split_bundle, *_common(trained))
    assert not (trained / "early").exists()
    assert run_training_command("evaluate", "--model", split_bundle, *labelled, *evaluated, "--record") == 0
    split_meta = validate_bundle(split_bundle)
    every_case = [*_common(trained), "--validation-fraction", "0", "--seed", "1", "--validated-by", split_bundle]
    with pytest.raises(InputError, match="holds out 1 validation case"):
        run_training_command("train", "--output", trained / "held", *every_case, "--validation-fraction", "0.25")
    assert not (trained / "held").exists()  # refused before the run folder is written, so a rerun starts clean
    with pytest.raises(InputError, match="another recipe \\(widths differ"):
        run_training_command("train", "--output", trained / "other", *every_case, "--widths", "8", "8")
    assert not (trained / "other").exists()  # refused before training and before its run folder

    run = ["--output", trained / "all", "--card", CARD, "--preseg-run", trained / "unet", *every_case]
    assert run_training_command("train", *run) == 0
    meta = validate_bundle(trained / "all" / "bundle")
    assert meta["training"]["split"]["validation"] == [] and meta["training"]["split"]["train_cases"] == 4
    assert meta["metrics"] == split_meta["metrics"] and meta["expected_seconds"] == split_meta["expected_seconds"]
    recipe = meta["training"]["validated_recipe"]
    assert recipe["split"] == split_meta["training"]["split"] and recipe["command"] == split_meta["training"]["command"]
    assert recipe["preseg_command"] == split_meta["training"]["preseg_command"]
    with pytest.raises(InputError, match="trained on every development case and holds none out"):
        run_training_command("evaluate", "--model", trained / "all" / "bundle", *labelled, *evaluated)
    more = ["--output", trained / "more", "--card", CARD, "--member-runs", trained / "diffusion", *every_case]
    with pytest.raises(InputError, match="measured with other members \\(None\\)"):  # two networks, not one
        run_training_command("train", *more)


def test_existing_run_is_not_overwritten(trained):
    with pytest.raises(InputError, match="already holds a run"):
        run_training_command("train", "--data", trained / "data", "--output", trained / "diffusion", *FAST)


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(InputError, match="no run to resume"):
        run_training_command("train", "--output", tmp_path / "nothing", "--resume", *FAST)
