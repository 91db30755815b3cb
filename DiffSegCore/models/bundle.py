"""Model bundles: model.json + safetensors weights, in a folder or a .zip.

Loading never unpickles: weights are read with safetensors only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from DiffSegCore.errors import ModelError
from DiffSegCore.io.atomic import atomic_folder
from DiffSegCore.io.weights import write_weights
from DiffSegCore.models.metadata import DEFAULT_FIX, FORMAT_VERSION, MODEL_FILE, BundleSource, meta_of
from DiffSegCore.models.safety import refuse_pickles
from DiffSegCore.networks.unet import UNet3D, build_network

WEIGHT_FILES = {"network": "diffusion.safetensors", "preseg_network": "preseg.safetensors"}


def member_weight_file(index: int) -> str:
    """The weights of the bundle's diffusion network `index` (0: the first training, WEIGHT_FILES["network"])."""
    return WEIGHT_FILES["network"] if index == 0 else f"diffusion.{index}.safetensors"


def network_count(meta: dict) -> int:
    """How many trainings of the diffusion network the bundle holds (model.json "members": "networks")."""
    return int((meta.get("members") or {}).get("networks", 1))


@dataclass
class ModelBundle:
    """A loaded model: its metadata and networks (eval mode).

    Attributes:
        network: the diffusion network: input (B, C + K, *S) and steps (B,), output (B, K, *S); C counts
            the image channels (+ 3 coordinate channels where the config has coords), K = num_classes.
        preseg_network: the plain U-Net, (B, C, *S) -> logits (B, K, *S), or None.
        more_networks: further trainings of `network`'s config, whose members join the ensemble
            (inference/predictor.py: member_views).
    """

    path: Path
    meta: dict
    network: UNet3D
    preseg_network: UNet3D | None
    more_networks: tuple[UNet3D, ...] = ()

    @property
    def networks(self) -> tuple[UNet3D, ...]:
        """Every diffusion network, the first training first."""
        return (self.network, *self.more_networks)

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"]) + 1


def _read_weights(source: BundleSource, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(source.read(name))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"weights {name} in {source.shown} are corrupt or truncated ({exc}); {source.fix}"
        ) from None


def network_config(meta: dict, key: str) -> dict:
    config = dict(meta[key])
    config.setdefault("num_classes", len(meta["classes"]) + 1)
    config.setdefault("image_channels", len(meta["channels"]))
    return config


def _check_weights(network: torch.nn.Module, weights: dict[str, torch.Tensor], label: str) -> None:
    expected = network.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"{label} weights do not match the network config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, tensor in expected.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise ModelError(
                f"{label} weight {key} has shape {tuple(weights[key].shape)} but the config needs {tuple(tensor.shape)}"
            )


def _load_network(source: BundleSource, meta: dict, key: str, filename: str, device: str | torch.device) -> UNet3D:
    """The network of config `key` with the checked weights in `filename`, in eval mode on `device`."""
    with torch.device("meta"):
        skeleton = build_network(network_config(meta, key))
    weights = _read_weights(source, filename)
    _check_weights(skeleton, weights, f"{key} ({filename})")
    network = build_network(network_config(meta, key))
    network.load_state_dict(weights)
    return network.to(device).eval()


def _networks(source: BundleSource, meta: dict, device: str | torch.device) -> dict:
    """Every network the bundle declares: "network", "preseg_network" (when declared) and "more_networks"."""
    built = {
        key: _load_network(source, meta, key, filename, device)
        for key, filename in WEIGHT_FILES.items()
        if meta.get(key)
    }
    built["more_networks"] = tuple(
        _load_network(source, meta, "network", member_weight_file(i), device) for i in range(1, network_count(meta))
    )
    return built


def validate_bundle(path: str | Path, shown_as: str | None = None, fix: str = DEFAULT_FIX) -> dict:
    """Check a bundle completely (metadata, weights readable, shapes) and return its metadata.

    Messages name the bundle `shown_as` (default: its path) and end with `fix`.
    """
    source = BundleSource(Path(path), shown_as, fix)
    refuse_pickles(source.members.values(), source.shown)
    meta = meta_of(source)
    _networks(source, meta, "cpu")
    return meta


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> ModelBundle:
    """Load and check a bundle; networks are in eval mode on `device` (shapes: see ModelBundle)."""
    source = BundleSource(Path(path))
    refuse_pickles(source.members.values(), source.shown)
    meta = meta_of(source)
    nets = _networks(source, meta, device)
    return ModelBundle(Path(path), meta, nets["network"], nets.get("preseg_network"), nets["more_networks"])


def save_bundle(
    out_dir: str | Path,
    meta: dict,
    weights: dict[str, torch.Tensor],
    preseg_weights: dict[str, torch.Tensor] | None = None,
    more_weights: list[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a bundle folder atomically: built in a temporary sibling, then renamed into place.

    Args:
        out_dir: the bundle folder to create; it must not exist.
        meta: model.json content (format_version is set here).
        weights: state dict of the diffusion network (name -> tensor), saved in its dtype.
        preseg_weights: state dict of the pre-segmentation U-Net, or None for a bundle without one.
        more_weights: state dicts of further trainings of the diffusion network (meta's "members"
            must count them: networks = 1 + len(more_weights)).

    Returns:
        out_dir.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ModelError(f"{out_dir} already exists; choose a new folder or remove it first")
    meta = {**meta, "format_version": FORMAT_VERSION}
    more_weights = more_weights or []
    if network_count(meta) != 1 + len(more_weights):
        raise ModelError(f"model.json declares {network_count(meta)} networks but {1 + len(more_weights)} are given")
    if preseg_weights is None:
        meta["preseg_network"] = None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out_dir) as staging:
        (staging / MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        files = [(WEIGHT_FILES["preseg_network"], preseg_weights)]
        files += [(member_weight_file(i), tensors) for i, tensors in enumerate([weights, *more_weights])]
        for filename, tensors in files:
            if tensors is not None:
                write_weights(staging / filename, tensors)
    return out_dir
