"""Training checkpoints in safetensors (never pickles), written atomically.

A checkpoint holds the network, the optional EMA copy and the optimizer state as tensors, and the
rest (step, optimizer hyper-parameters, loss history, best validation score) as JSON metadata.
The one before the newest is kept beside it (`previous_path`), so a damaged file never costs the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from DiffSegCore.errors import InputError
from DiffSegCore.io.atomic import atomic_path, stale_temporaries
from DiffSegCore.io.weights import write_weights


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def previous_path(path: Path) -> Path:
    """Where the checkpoint before `path` is kept."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def save_checkpoint(
    path: str | Path,
    model: dict[str, torch.Tensor],
    optimizer: dict,
    info: dict,
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint atomically; the checkpoint it replaces becomes `previous_path(path)`.

    Args:
        path: the checkpoint file.
        model: the network's state dict (name -> tensor).
        optimizer: the optimizer's state_dict(); its tensors are stored as tensors, the rest as JSON.
        info: JSON-serialisable run state (step, history, best score).
        ema: the EMA copy's state dict, or None.
    """
    path = Path(path)
    for stale in [*stale_temporaries(path), *stale_temporaries(previous_path(path))]:
        stale.unlink(missing_ok=True)  # one writer per run, so these were left by a killed process
    tensors = {f"model.{k}": v for k, v in model.items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.items()})
    optim_tensors, optim_meta = _flatten_optimizer(optimizer)
    tensors.update(optim_tensors)
    metadata = {"info": json.dumps(info), "optimizer": json.dumps(optim_meta)}
    with atomic_path(path) as tmp:
        write_weights(tmp, tensors, metadata=metadata)
        if path.exists():
            # A second name, not a move: a kill before the final rename still leaves `path` whole.
            with atomic_path(previous_path(path)) as keep:
                keep.unlink()
                os.link(path, keep)


def _fallback_hint(path: Path, otherwise: str) -> str:
    """What to do when `path` cannot be resumed from: use the checkpoint before it, if it is there."""
    previous = previous_path(path)
    if previous.exists():
        return f"the checkpoint before it is kept: rename {previous.name} to {path.name} and resume again"
    return otherwise


def load_checkpoint(path: str | Path) -> tuple[dict, dict, dict, dict | None]:
    """Read a checkpoint written by save_checkpoint.

    Returns:
        (model state dict, optimizer state_dict, info, EMA state dict or None), tensors on the CPU.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"no checkpoint at {path} to resume from; {_fallback_hint(path, 'start without --resume')}")
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}}
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            for key in handle.keys():
                group, rest = key.split(".", 1)
                groups[group][rest if group != "optim" else key] = handle.get_tensor(key)
    except Exception as exc:
        hint = _fallback_hint(path, "start the run again without --resume")
        raise InputError(f"checkpoint {path} is unreadable ({exc}); {hint}") from None
    optimizer = _unflatten_optimizer(groups["optim"], json.loads(metadata["optimizer"]))
    return groups["model"], optimizer, json.loads(metadata["info"]), groups["ema"] or None
