"""What segmentation training and denoising pretraining share: the optimiser, its schedule and its step.

Both runs' configs inherit OptimiserConfig, so its fields stay flat in their config.json files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TypeVar

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
    for group in optimiser.param_groups:
        group["lr"] = learning_rate(step, config)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(network.parameters(), config.clip)
    optimiser.step()
