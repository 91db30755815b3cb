"""Diffusion pretraining (li2024): a few real steps on real cases, weight transfer, fine-tuning start."""

from __future__ import annotations

import numpy as np
import torch

from DiffSegCore.networks.unet import build_network
from DiffSegCore.training.cache import build_cache
from DiffSegCore.training.checkpoints import load_checkpoint
from DiffSegCore.training.datasets import find_cases
from DiffSegCore.training.loop import CHECKPOINT, TrainConfig, train
from DiffSegCore.training.pretraining import (
    PretrainConfig,
    load_pretrained,
    pretrain,
    start_from_pretrained,
    transfer_weights,
)

SMALL = {"widths": [4, 8], "size": [16, 24, 16], "batch": 1, "iterations": 2, "warmup": 1}


def test_pretrain_transfer_and_fine_tune(hippocampus_dir, tmp_path):
    torch.set_num_threads(1)
    cases = find_cases(hippocampus_dir).cases[:2]
    cached = build_cache(cases, {"channels": [{"normalisation": {"kind": "percentile_zscore"}}]}, tmp_path / "cache")
    weights = pretrain(tmp_path / "pre", cached, PretrainConfig(**SMALL), log=lambda _: None)
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert load_pretrained(tmp_path / "pre").keys() == weights.keys()

    config = TrainConfig(**SMALL, coords=True, val_every=2, checkpoint_every=2, device="cpu")
    target = build_network(config.network_config(1, 3))
    state = transfer_weights(weights, target)
    # image column <- the pretrained noisy-image column; coordinate columns <- coordinate columns
    assert torch.equal(state["stem.weight"][:, 0], weights["stem.weight"][:, 3])
    assert torch.equal(state["stem.weight"][:, 1:4], weights["stem.weight"][:, :3])
    assert torch.equal(state["stem.weight"][:, 4:], target.state_dict()["stem.weight"][:, 4:])
    body = [k for k in state if k.startswith(("down_levels", "up_levels", "time_mlp"))]
    assert body and all(torch.equal(state[k], weights[k]) for k in body)
    assert state["head.2.weight"].shape[0] == 3  # one output per class, freshly initialised

    start_from_pretrained(tmp_path / "run", config, weights, 1, 3)
    model_state, _, info, _ = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert info["state"]["step"] == 0
    assert all(torch.equal(model_state[k], state[k]) for k in body)
    run_state, _ = train(tmp_path / "run", cached, cached[:1], config, 3, resume=True, log=lambda _: None)
    assert run_state.step == 2 and np.isfinite(run_state.history["loss"]).all()
