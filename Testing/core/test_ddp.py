"""DistributedDataParallel training: two real CPU processes with gloo keep identical weights."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from DiffSegCore.training.cache import CachedCase, build_cache
from DiffSegCore.training.datasets import find_cases
from DiffSegCore.training.loop import TrainConfig, train
from Testing.core.training_helpers import copy_cases


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, cases: list[tuple[str, str]], out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    cached = [CachedCase(name, Path(path)) for name, path in cases]
    config = TrainConfig(
        widths=[8, 16], size=[16, 24, 16], batch=1, iterations=3, warmup=1, val_every=100, device="cpu"
    )
    state, network = train(Path(out) / "run", cached, [], config, 3, log=lambda _: None)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, Path(out) / f"rank{rank}.safetensors")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(state.history["loss"]))
    dist.destroy_process_group()


def test_two_gloo_processes_keep_identical_weights(hippocampus_dir, tmp_path):
    cases = find_cases(copy_cases(hippocampus_dir, tmp_path / "data")).cases
    meta = {"channels": [{"normalisation": {"kind": "percentile_zscore"}}], "spacing": None}
    cached = build_cache(cases, meta, tmp_path / "cache", log=lambda _: None)
    mp.spawn(
        _worker, args=(2, _free_port(), [(c.name, str(c.path)) for c in cached], str(tmp_path)), nprocs=2, join=True
    )
    first, second = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # Each rank drew its own samples (otherwise identical weights would prove nothing about gradient averaging).
    losses = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert losses[0] != losses[1]
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()
