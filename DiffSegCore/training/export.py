"""Pack a training run (and optionally a pre-segmentation run) into a model bundle."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from DiffSegCore.errors import InputError
from DiffSegCore.models.bundle import save_bundle
from DiffSegCore.training.loop import BEST, CONFIG, TrainConfig, read_best

DATA_FILE = "data.json"
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16}

DEFAULT_COLOURS = [[0.9, 0.35, 0.2], [0.2, 0.55, 0.9], [0.3, 0.8, 0.35], [0.9, 0.8, 0.2], [0.7, 0.3, 0.8]]


def default_card(data: dict) -> dict:
    """Descriptive metadata when no model card is given: names from the dataset, plain colours."""
    labels = data.get("labels") or {str(v): f"class {v}" for v in range(1, data["num_classes"])}
    classes = [
        {"value": int(v), "name": name, "color": DEFAULT_COLOURS[(int(v) - 1) % len(DEFAULT_COLOURS)]}
        for v, name in sorted(labels.items(), key=lambda item: int(item[0]))
    ]
    name = Path(data["source"]).name or "model"
    return {
        "id": f"{name.lower()}-diffusion",
        "version": "0.1.0",
        "title": f"Diffusion segmentation trained on {name}",
        "description": f"Trained with `diffseg train` on {data['source']}.",
        "license": "unknown: set it from the training data's licence",
        "modality": "unknown",
        "classes": classes,
    }


def _weights(run_dir: Path, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], TrainConfig, dict]:
    weights, config = read_best(run_dir)
    # Floating weights may be stored in half precision to keep bundles small; loading casts them back.
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    data = json.loads((run_dir / DATA_FILE).read_text())
    return weights, TrainConfig.from_json(config), data


def export_bundle(
    run_dir: str | Path,
    out_dir: str | Path,
    card: dict | None = None,
    preseg_run: str | Path | None = None,
    weights_dtype: str = "float32",
    member_runs: list[str | Path] | None = None,
    validated_by: str | Path | None = None,
) -> Path:
    """Write a bundle from a diffusion run's best weights (+ a unet run's as pre-segmentation, + other
    trainings of the same network as further ensemble members, model.json "members"; + with `validated_by`,
    the validation figures of the split run's bundle of the same recipe, for a run trained on every case)."""
    run_dir = Path(run_dir)
    dtype = WEIGHT_DTYPES[weights_dtype]
    weights, config, data = _weights(run_dir, dtype)
    if config.kind != "diffusion":
        raise InputError(f"{run_dir} trained a '{config.kind}' network; a bundle needs a diffusion run")
    more_weights, member_commands = _member_weights(member_runs or [], config, dtype)
    card = card or default_card(data)
    num_classes = len(card["classes"]) + 1
    if num_classes != data["num_classes"]:
        raise InputError(
            f"the model card lists {num_classes - 1} classes but the run trained {data['num_classes'] - 1}"
        )
    preseg_weights, preseg_config, unet_data = None, None, {}
    if preseg_run is not None:
        preseg_weights, unet, unet_data = _weights(Path(preseg_run), dtype)
        if unet.kind != "unet" or unet_data["num_classes"] != num_classes:
            raise InputError(f"{preseg_run} is not a unet run with {num_classes} classes; train it with --kind unet")
        preseg_config = unet.network_config(data["image_channels"], num_classes)
    meta = {
        **card,
        "channels": [
            {"name": name, "normalisation": norm} for name, norm in zip(data["channel_names"], data["spec"]["channels"])
        ],
        "spacing": data["spec"]["spacing"],
        # A patch-trained network's sliding window is its training patch (z, y, x), unless the card sets one.
        **({"window": list(config.size)} if config.size and "window" not in card else {}),
        "network": config.network_config(data["image_channels"], num_classes),
        "preseg_network": preseg_config,
        **_members(card, len(more_weights), config.mirror_axes),
        "diffusion": config.diffusion_config(),
        "training": {
            **card.get("training", {}),
            **data.get("envelope", {}),
            "data": card.get("training", {}).get("data", data["source"]),
            "split": data.get("split"),
            "iterations": config.iterations,
            "batch": config.batch,
            "patch_size": config.size,
            "config": asdict(config),
            **({"command": command} if (command := run_commands(data)) else {}),
            **({"preseg_command": run_commands(unet_data)} if preseg_run is not None else {}),
            **({"member_commands": member_commands} if member_commands else {}),
        },
    }
    if validated_by is not None:
        validated = validated_recipe(validated_by, config, data, meta)
        meta["training"]["validated_recipe"] = validated["record"]
        meta.update(validated["figures"])
    return save_bundle(out_dir, meta, weights, preseg_weights, more_weights)


def run_commands(data: dict) -> str | None:
    """The commands that reproduce a run (its data.json `data`): the one that started it, then each --resume that
    extended it (a longer cosine schedule from the start is another run), joined with &&; None if unrecorded."""
    if not data.get("command"):
        return None
    return " && ".join([data["command"], *data.get("resumed", [])])


def check_member_runs(runs: list[str | Path], config: TrainConfig) -> None:
    """Refuse runs that are not finished diffusion runs of `config`'s network (before training, not after)."""
    for run in map(Path, runs):
        if not (run / CONFIG).is_file() or not (run / BEST).is_file():
            raise InputError(f"{run} holds no finished training run; give the folder of a run with best weights")
        other = TrainConfig.from_json(json.loads((run / CONFIG).read_text()))
        if other.kind != "diffusion" or other.network_config(1, 1) != config.network_config(1, 1):
            raise InputError(f"{run} did not train the same diffusion network as this run; pack runs of one config")


def _member_weights(runs: list[str | Path], config: TrainConfig, dtype: torch.dtype) -> tuple[list[dict], list]:
    """The best weights, and the commands that reproduce them, of further diffusion runs of `config`'s network."""
    check_member_runs(runs, config)
    weights, commands = [], []
    for run in runs:
        tensors, _, data = _weights(Path(run), dtype)
        weights.append(tensors)
        commands.append(run_commands(data))
    return weights, commands


# Settings of a run that do not change the model it trains (where it ran, how often it checked itself).
NOT_RECIPE = ("seed", "device", "workers", "val_every", "val_steps", "checkpoint_every")


def check_validated_by(bundle_dir: str | Path, config: TrainConfig, data: dict) -> dict:
    """The model.json of a split run's bundle whose validation figures a run trained on every case may carry:
    refused unless it holds recorded figures and validation cases, and trained this run's recipe."""
    from DiffSegCore.models.metadata import held_out_cases, read_meta

    meta = read_meta(bundle_dir)
    if "validation" not in meta.get("metrics", {}) or not held_out_cases(meta):
        raise InputError(
            f"--validated-by {bundle_dir} holds no recorded validation figures; give the split run's bundle after "
            "`diffseg evaluate --split model --record`"
        )
    if data["split"]["validation"]:
        raise InputError(
            f"this run holds out {len(data['split']['validation'])} validation case(s) of its own; --validated-by is "
            "for a run trained on every case (--validation-fraction 0)"
        )
    theirs = {k: v for k, v in meta["training"].get("config", {}).items() if k not in NOT_RECIPE}
    ours = {k: v for k, v in asdict(config).items() if k not in NOT_RECIPE}
    theirs["spec"] = {"spacing": meta.get("spacing"), "channels": [c["normalisation"] for c in meta["channels"]]}
    ours["spec"] = data["spec"]
    differing = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differing:
        raise InputError(
            f"--validated-by {bundle_dir} trained another recipe ({', '.join(differing[:4])} differ); "
            "its figures do not describe this run"
        )
    return meta


def validated_recipe(bundle_dir: str | Path, config: TrainConfig, data: dict, ours: dict) -> dict:
    """The split run's figures ("figures": model.json's metrics and expected time) and where they come from
    ("record": its version, split and commands), for the bundle of the same recipe trained on every case whose
    model.json is `ours` (its "defaults" and "members" must be the split run's)."""
    meta = check_validated_by(bundle_dir, config, data)
    differing = [k for k in ("defaults", "members") if meta.get(k) != ours.get(k)]
    if differing:
        raise InputError(
            f"--validated-by {bundle_dir} was measured with other {' and '.join(differing)} "
            f"({', '.join(str(meta.get(k)) for k in differing)}); pack as many --member-runs and use its card's defaults"
        )
    training = meta["training"]
    kept = ("command", "member_commands", "preseg_command")
    record = {"id": meta["id"], "version": meta.get("version"), "split": training["split"]}
    return {
        "record": {**record, **{k: training[k] for k in kept if k in training}},
        "figures": {k: meta[k] for k in ("metrics", "expected_seconds") if k in meta},
    }


def _members(card: dict, more_networks: int, mirror_axes: list[int]) -> dict:
    """model.json's "members": the card's when it sets them, else every network and the trained mirroring."""
    if "members" in card:
        return {}
    if not more_networks and not mirror_axes:
        return {}
    return {"members": {"networks": 1 + more_networks, "mirror_axes": list(mirror_axes)}}
