"""A resumed run ends exactly where an uninterrupted run with the same seed ends."""

from __future__ import annotations

import pytest
import torch

from DiffSegCore.training.cache import build_cache
from DiffSegCore.training.checkpoints import load_checkpoint
from DiffSegCore.training.datasets import find_cases
from DiffSegCore.training.loop import CHECKPOINT, TrainConfig, train
from Testing.core.training_helpers import copy_cases


@pytest.fixture(scope="module")
def cached(hippocampus_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cases = find_cases(copy_cases(hippocampus_dir, root / "data")).cases
    meta = {"channels": [{"normalisation": {"kind": "percentile_zscore"}}], "spacing": [1.0, 1.0, 1.0]}
    return build_cache(cases, meta, root / "cache", log=lambda _: None)


@pytest.mark.parametrize("kind", ["diffusion", "unet"])
def test_resumed_run_matches_uninterrupted_run(cached, tmp_path, kind):
    torch.set_num_threads(1)

    def config() -> TrainConfig:
        return TrainConfig(
            kind=kind,
            widths=[8, 16],
            size=[16, 24, 16],
            batch=2,
            iterations=4,
            warmup=2,
            ema=0.9,
            seed=3,
            val_every=100,
            checkpoint_every=100,
        )

    quiet = {"log": lambda _: None}
    whole, whole_net = train(tmp_path / "whole", cached[:3], [], config(), 3, **quiet)
    first, _ = train(tmp_path / "split", cached[:3], [], config(), 3, stop_after=2, **quiet)
    assert first.step == 2
    resumed, resumed_net = train(tmp_path / "split", cached[:3], [], config(), 3, resume=True, **quiet)
    assert resumed.step == whole.step == 4
    assert resumed.history["loss"] == whole.history["loss"]
    for key, value in whole_net.state_dict().items():
        assert torch.equal(value, resumed_net.state_dict()[key]), key
    _, whole_opt, _, whole_ema = load_checkpoint(tmp_path / "whole" / CHECKPOINT)
    _, resumed_opt, _, resumed_ema = load_checkpoint(tmp_path / "split" / CHECKPOINT)
    for key, value in whole_ema.items():
        assert torch.equal(value, resumed_ema[key]), key
    for index, values in whole_opt["state"].items():
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed_opt["state"][index][name]))


def test_interrupted_and_uninterrupted_runs_differ_from_a_different_seed(cached, tmp_path):
    """Guards the test above: the comparison would not pass by accident."""
    torch.set_num_threads(1)
    runs = []
    for seed in (3, 4):
        cfg = TrainConfig(widths=[8, 16], size=[16, 24, 16], batch=2, iterations=2, warmup=1, seed=seed, val_every=100)
        runs.append(train(tmp_path / str(seed), cached[:3], [], cfg, 3, log=lambda _: None)[0].history["loss"])
    assert runs[0] != runs[1]
