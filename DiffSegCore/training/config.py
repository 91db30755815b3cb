"""Training configs (TrainConfig; PretrainConfig builds on the same OptimiserConfig) and the optimiser step they share.

Both runs' configs inherit OptimiserConfig, so its fields stay flat in their config.json files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, TypeVar

from DiffSegCore.errors import InputError

if TYPE_CHECKING:  # torch is imported where it is used, so `diffseg --help` reads these defaults without it
    import torch

_Config = TypeVar("_Config", bound="OptimiserConfig")


@dataclass
class OptimiserConfig:
    """AdamW over `iterations` steps of `batch` samples: linear warmup, cosine decay, clipped gradients."""

    batch: int = 2
    iterations: int = 1000
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    clip: float = 1.0

    @classmethod
    def from_json(cls: type[_Config], data: dict) -> _Config:
        """The config saved as `data` (asdict); keys this version does not know are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def optimiser(self, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.AdamW:
        """AdamW over `parameters` with this lr and weight decay (the lr is then set per step)."""
        import torch

        return torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)


def learning_rate(step: int, config: OptimiserConfig) -> float:
    """Linear warmup, then cosine decay to zero; a function of the step so resuming needs no state."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.iterations - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def optimiser_step(
    optimiser: torch.optim.Optimizer, network: torch.nn.Module, loss: torch.Tensor, step: int, config: OptimiserConfig
) -> None:
    """One update: back-propagate `loss`, clip the gradients, step with the learning rate of `step`.

    Args:
        optimiser: built by OptimiserConfig.optimiser over the network's parameters.
        network: the module whose gradients are clipped (the plain one, not a DDP wrapper).
        loss: scalar loss of the batch.
        step: the 0-based step, which sets the learning rate.
        config: lr schedule and clipping.
    """
    import torch

    for group in optimiser.param_groups:
        group["lr"] = learning_rate(step, config)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(network.parameters(), config.clip)
    optimiser.step()


@dataclass
class TrainConfig(OptimiserConfig):
    """Everything that determines a training run (saved as config.json in the run folder)."""

    kind: str = "diffusion"
    prediction: str = "x0"
    recycling: bool = True
    train_steps: int = 5
    base_steps: int = 1001
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    res_blocks: int = 1
    skip: str = "add"
    time_dim: int = 64
    coords: bool = False
    size: list[int] | None = None
    centre_bias: float = 0.25
    ema: float = 0.0
    eps_weight: float = 0.1
    augment: bool = True
    affine_prob: float = 0.5
    mirror_axes: list[int] = field(default_factory=list)
    val_every: int = 200
    val_steps: int = 5
    checkpoint_every: int = 100
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    amp: bool = True

    def check(self) -> None:
        if self.kind not in ("diffusion", "unet"):
            raise InputError(f"unknown --kind '{self.kind}'; use diffusion or unet")
        if self.prediction not in ("x0", "eps"):
            raise InputError(f"unknown --prediction '{self.prediction}'; use x0 or eps")
        if self.iterations < 1 or self.batch < 1 or self.train_steps < 1:
            raise InputError("--iterations, --batch and --train-steps must be at least 1")
        if any(axis not in (0, 1, 2) for axis in self.mirror_axes):
            raise InputError(f"--mirror-axes {self.mirror_axes}: use spatial axes 0 (z), 1 (y) and 2 (x)")

    def network_config(self, image_channels: int, num_classes: int) -> dict:
        return {
            "kind": self.kind,
            "image_channels": image_channels,
            "num_classes": num_classes,
            "coords": self.coords,
            "widths": list(self.widths),
            "res_blocks": self.res_blocks,
            "skip": self.skip,
            "time_dim": self.time_dim,
        }

    def diffusion_config(self) -> dict:
        return {
            "schedule": self.schedule,
            "base_steps": self.base_steps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "train_steps": self.train_steps,
            "prediction": self.prediction,
            "recycling": self.recycling,
        }
