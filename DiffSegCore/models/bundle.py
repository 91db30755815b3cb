"""Model bundles: model.json + safetensors weights, in a folder or a .zip.

Loading never unpickles: weights are read with safetensors only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from DiffSegCore.errors import ModelError
from DiffSegCore.networks.unet import UNet3D, build_network

FORMAT_VERSION = 1
MODEL_FILE = "model.json"
WEIGHT_FILES = {"network": "diffusion.safetensors", "preseg_network": "preseg.safetensors"}
REQUIRED_KEYS = ("format_version", "id", "version", "title", "channels", "classes", "network", "diffusion")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


@dataclass
class ModelBundle:
    """A loaded model: its metadata and networks (eval mode)."""

    path: Path
    meta: dict
    network: UNet3D
    preseg_network: UNet3D | None

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"]) + 1


class _Source:
    """Read members of a bundle folder or zip by name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise ModelError(f"model bundle not found: {self.path}; pass a bundle folder, a .zip or a model id")
        self.zip = None
        if self.path.is_file():
            try:
                self.zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile:
                raise ModelError(
                    f"{self.path} is neither a bundle folder nor a valid .zip; re-download or re-export it"
                ) from None
            names = [n for n in self.zip.namelist() if not n.endswith("/")]
            roots = {n.split("/")[0] for n in names}
            # A zip of the bundle folder itself holds one top-level folder; accept both layouts.
            self.prefix = f"{roots.pop()}/" if len(roots) == 1 and MODEL_FILE not in names else ""

    def names(self) -> list[str]:
        if self.zip is None:
            return [p.name for p in self.path.iterdir()]
        return [n[len(self.prefix) :] for n in self.zip.namelist() if n.startswith(self.prefix)]

    def read(self, name: str) -> bytes:
        try:
            if self.zip is None:
                return (self.path / name).read_bytes()
            return self.zip.read(self.prefix + name)
        except (KeyError, FileNotFoundError):
            raise ModelError(
                f"model bundle {self.path} has no {name}; it is incomplete, re-download or re-export it"
            ) from None


def _read_meta(source: _Source) -> dict:
    try:
        meta = json.loads(source.read(MODEL_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{MODEL_FILE} in {source.path} is not valid JSON ({exc}); re-export the bundle") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{MODEL_FILE} in {source.path} must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ModelError(f"{MODEL_FILE} in {source.path} lacks required keys: {', '.join(missing)}")
    if not isinstance(meta["format_version"], int) or meta["format_version"] > FORMAT_VERSION:
        raise ModelError(
            f"model {meta.get('id')} uses bundle format {meta['format_version']}, newer than this DiffSeg "
            f"understands ({FORMAT_VERSION}); upgrade DiffSeg"
        )
    if not meta["classes"]:
        raise ModelError(f"{MODEL_FILE} in {source.path} lists no classes")
    return meta


def _refuse_pickles(source: _Source) -> None:
    pickled = [n for n in source.names() if n.endswith(PICKLE_SUFFIXES)]
    if pickled and not any(n.endswith(".safetensors") for n in source.names()):
        raise ModelError(
            f"bundle {source.path} holds pickled weights ({pickled[0]}), which DiffSeg never loads; convert them with "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'diffusion.safetensors')"
        )


def _read_weights(source: _Source, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(source.read(name))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"weights {name} in {source.path} are corrupt or truncated ({exc}); re-download the model"
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


def _networks(source: _Source, meta: dict, device: str | torch.device):
    """Build each network the bundle declares and load its checked weights."""
    built = {}
    for key, filename in WEIGHT_FILES.items():
        if not meta.get(key):
            continue
        with torch.device("meta"):
            skeleton = build_network(network_config(meta, key))
        weights = _read_weights(source, filename)
        _check_weights(skeleton, weights, key)
        network = build_network(network_config(meta, key))
        network.load_state_dict(weights)
        built[key] = network.to(device).eval()
    return built


def validate_bundle(path: str | Path) -> dict:
    """Check a bundle completely (metadata, weights readable, shapes) and return its metadata."""
    source = _Source(Path(path))
    _refuse_pickles(source)
    meta = _read_meta(source)
    _networks(source, meta, "cpu")
    return meta


def read_meta(path: str | Path) -> dict:
    """Only the metadata, checked for required keys and format version (no weights read)."""
    return _read_meta(_Source(Path(path)))


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> ModelBundle:
    """Load and check a bundle; networks are in eval mode on `device`."""
    source = _Source(Path(path))
    _refuse_pickles(source)
    meta = _read_meta(source)
    nets = _networks(source, meta, device)
    return ModelBundle(Path(path), meta, nets["network"], nets.get("preseg_network"))


def save_bundle(
    out_dir: str | Path,
    meta: dict,
    weights: dict[str, torch.Tensor],
    preseg_weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a bundle folder atomically: built in a temporary sibling, then renamed into place."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ModelError(f"{out_dir} already exists; choose a new folder or remove it first")
    meta = {**meta, "format_version": FORMAT_VERSION}
    if preseg_weights is None:
        meta["preseg_network"] = None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (staging / MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, staging / WEIGHT_FILES["network"])
        if preseg_weights is not None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in preseg_weights.items()},
                staging / WEIGHT_FILES["preseg_network"],
            )
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
