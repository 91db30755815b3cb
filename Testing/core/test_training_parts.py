"""Parts of training: sample drawing, patches with coordinates, the recycling objective, the LR schedule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from DiffSegCore.diffusion.objectives import diffusion_loss
from DiffSegCore.diffusion.schedules import training_schedule
from DiffSegCore.networks.unet import build_network
from DiffSegCore.training.cache import CachedCase
from DiffSegCore.training.config import learning_rate
from DiffSegCore.training.loop import TrainConfig
from DiffSegCore.training.samples import TrainingSamples, patch_centre


@pytest.fixture
def cases(tmp_path) -> list[CachedCase]:
    rng = np.random.default_rng(0)
    made = []
    for i, shape in enumerate([(20, 26, 18), (22, 24, 20)]):
        label = np.zeros(shape, np.uint8)
        label[6:12, 8:16, 5:10], label[12:16, 8:16, 5:10] = 1, 2
        path = tmp_path / f"case{i}.npz"
        np.savez(path, image=rng.normal(size=(1, *shape)).astype(np.float32), label=label)
        made.append(CachedCase(f"case{i}", path))
    return made


def test_samples_depend_only_on_seed_and_index(cases):
    samples = TrainingSamples(cases, (16, 16, 16), seed=5)
    again = TrainingSamples(cases, (16, 16, 16), seed=5)
    image, label = samples[7]
    assert image.shape == (1, 16, 16, 16) and label.shape == (1, 16, 16, 16) and label.dtype == torch.uint8
    assert torch.equal(image, again[7][0]) and torch.equal(label, again[7][1])
    assert not torch.equal(image, samples[8][0])
    assert set(label.unique().tolist()) <= {0, 1, 2}


def test_patches_carry_global_coordinates_of_their_position(cases):
    samples = TrainingSamples(cases, (8, 8, 8), seed=1, augment=False, coords=True)
    image, _ = samples[0]
    assert image.shape == (4, 8, 8, 8)
    coords = image[1:]
    assert coords.min() >= -1 and coords.max() <= 1
    # A patch covers part of the volume: its coordinates span less than the whole [-1, 1].
    assert all(float(c.max() - c.min()) < 2 for c in coords)
    # Coordinates grow by one voxel step along their own axis.
    assert torch.all(coords[0, 1:] > coords[0, :-1])


def test_small_volumes_are_padded_to_the_patch_size(cases):
    image, label = TrainingSamples(cases, (24, 32, 24), seed=0, augment=False)[0]
    assert image.shape == (1, 24, 32, 24) and label.shape == (1, 24, 32, 24)


def test_patch_centres_are_biased_to_the_volume_centre():
    rng = np.random.default_rng(0)
    shape, size = (100, 100, 100), (20, 20, 20)
    tight = np.array([patch_centre(shape, size, rng, 0.1) for _ in range(300)])
    wide = np.array([patch_centre(shape, size, rng, 1.0) for _ in range(300)])
    assert tight.min() >= 10 and tight.max() <= 90 and wide.min() >= 10 and wide.max() <= 90
    assert abs(tight.mean() - 50) < 2
    assert tight.std() < wide.std()


@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_recycling_runs_one_forward_without_gradient_then_one_with(prediction):
    torch.manual_seed(0)
    network = build_network({"widths": [8, 16], "num_classes": 3, "time_dim": 16})
    grad_enabled = []
    network.register_forward_pre_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    image = torch.randn(2, 1, 8, 8, 8)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8))
    schedule = training_schedule({"train_steps": 5, "base_steps": 1001})
    loss = diffusion_loss(network, image, label, schedule, prediction, True, torch.Generator().manual_seed(0))
    assert grad_enabled == [False, True]
    loss.backward()
    assert torch.isfinite(loss) and network.stem.weight.grad.abs().sum() > 0
    grad_enabled.clear()
    diffusion_loss(network, image, label, schedule, prediction, False, torch.Generator().manual_seed(0))
    assert grad_enabled == [True]


def test_learning_rate_warms_up_then_decays_to_zero():
    config = TrainConfig(lr=1e-3, warmup=10, iterations=110)
    rates = [learning_rate(step, config) for step in range(110)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert rates[-1] < 1e-6


def test_both_run_configs_share_the_optimiser_fields_and_keep_config_json_flat():
    from dataclasses import asdict, fields

    from DiffSegCore.training.config import OptimiserConfig
    from DiffSegCore.training.pretraining import PretrainConfig

    shared = {f.name for f in fields(OptimiserConfig)}
    assert shared == {"batch", "iterations", "lr", "warmup", "weight_decay", "clip"}
    assert shared <= {f.name for f in fields(TrainConfig)} and shared <= {f.name for f in fields(PretrainConfig)}
    # A config.json as runs wrote it before the optimiser fields moved (other key order, a key since dropped).
    saved = {"kind": "unet", "widths": [8, 16], "batch": 3, "iterations": 50, "lr": 5e-4, "warmup": 5, "ema": 0.9}
    config = TrainConfig.from_json({**saved, "retired_option": 1})
    assert isinstance(config, TrainConfig)
    assert (config.kind, config.batch, config.lr, config.ema) == ("unet", 3, 5e-4, 0.9)
    assert TrainConfig.from_json(asdict(config)) == config
    assert all(not isinstance(value, dict) for value in asdict(config).values())
    assert PretrainConfig.from_json(asdict(PretrainConfig(iterations=7))).iterations == 7
