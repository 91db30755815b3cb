"""Diffusion pretraining of the U-Net on unlabelled images, with coordinate guidance (li2024).

The backbone learns to denoise the images themselves (no labels): its input is the noisy image
plus global coordinate channels (our stand-in for li2024's body-part-regressor coordinates), its
output the noise (eps prediction, MSE). The learned weights then initialise a segmentation run:
every weight whose shape matches is copied, the stem's image and coordinate columns are mapped,
and the output head (one channel here, one per class there) keeps its fresh initialisation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from DiffSegCore.diffusion.process import q_sample
from DiffSegCore.diffusion.schedules import training_schedule
from DiffSegCore.errors import ModelError
from DiffSegCore.io.atomic import atomic_path
from DiffSegCore.io.weights import write_weights
from DiffSegCore.networks.unet import UNet3D, build_network
from DiffSegCore.training.cache import CachedCase
from DiffSegCore.training.checkpoints import save_checkpoint
from DiffSegCore.training.config import OptimiserConfig, optimiser_step
from DiffSegCore.training.loop import CHECKPOINT, RunState, TrainConfig, step_generator, training_size
from DiffSegCore.training.samples import TrainingSamples

WEIGHTS = "pretrained.safetensors"


@dataclass
class PretrainConfig(OptimiserConfig):
    """A denoising pretraining run; widths/res_blocks/skip/time_dim must match the later segmentation run."""

    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    res_blocks: int = 1
    skip: str = "add"
    time_dim: int = 64
    train_steps: int = 10  # li2024 Fig. 2: representations peak around 10 diffusion steps
    base_steps: int = 1001
    size: list[int] | None = None
    augment: bool = True
    affine_prob: float = 0.25
    seed: int = 0

    def network_config(self) -> dict:
        # No image channels: the noisy image enters as the single "mask" channel after the coordinates.
        return {
            "kind": "diffusion",
            "image_channels": 0,
            "num_classes": 1,
            "coords": True,
            "widths": list(self.widths),
            "res_blocks": self.res_blocks,
            "skip": self.skip,
            "time_dim": self.time_dim,
        }


def denoising_loss(network: UNet3D, sample: torch.Tensor, schedule, generator: torch.Generator) -> torch.Tensor:
    """MSE between added and predicted noise at random steps of `schedule`.

    Args:
        network: the denoiser built from PretrainConfig.network_config (coordinates + 1 noisy channel in).
        sample: image then coordinate channels, (B, 1 + 3, *S).
        schedule: the pretraining schedule.
        generator: CPU source of the steps and noise.

    Returns:
        scalar loss.
    """
    image, coords = sample[:, :1], sample[:, 1:]
    alpha_bar = schedule.alpha_bar.to(torch.float32)
    t = torch.randint(0, len(schedule), (image.shape[0],), generator=generator)
    noise = torch.randn(image.shape, generator=generator)
    x_t = q_sample(image, alpha_bar[t], noise)
    return F.mse_loss(network(torch.cat([coords, x_t], dim=1), t), noise)


def pretrain(
    run_dir: str | Path, cases: list[CachedCase], config: PretrainConfig, log: Callable[[str], None] = print
) -> dict[str, torch.Tensor]:
    """Train the denoiser on the cases' images (labels unused); weights go to run_dir/pretrained.safetensors.

    Returns:
        the pretrained state dict (name -> tensor).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    network = build_network(config.network_config())
    if config.size is None:
        config.size = training_size(cases, network.multiple)
    optimizer = config.optimiser(network.parameters())
    schedule = training_schedule({"train_steps": config.train_steps, "base_steps": config.base_steps})
    samples = TrainingSamples(
        cases, tuple(config.size), config.seed, config.augment, coords=True, affine_prob=config.affine_prob
    )
    order = [step * config.batch + i for step in range(config.iterations) for i in range(config.batch)]
    loader = DataLoader(samples, batch_size=config.batch, sampler=order)
    started, losses = time.monotonic(), []
    network.train()
    for step, (sample, _label) in zip(range(config.iterations), loader):
        loss = denoising_loss(network, sample.float(), schedule, step_generator(config.seed, step, 0, sample.device))
        optimiser_step(optimizer, network, loss, step, config)
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, config.iterations // 10) == 0:
            recent = losses[-max(1, config.iterations // 10) :]
            log(f"pretrain step {step + 1}/{config.iterations}: loss {sum(recent) / len(recent):.4f}")
    weights = {k: v.detach().contiguous() for k, v in network.state_dict().items()}
    info = {"config": asdict(config), "seconds": time.monotonic() - started, "loss": losses}
    with atomic_path(run_dir / WEIGHTS) as tmp:
        write_weights(tmp, weights, metadata={"info": json.dumps(info)})
    return weights


def load_pretrained(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The state dict `pretrain` wrote to run_dir."""
    return load_file(Path(run_dir) / WEIGHTS)


def transfer_weights(pretrained: dict[str, torch.Tensor], target: UNet3D) -> dict[str, torch.Tensor]:
    """The target's state dict with every shape-matching pretrained weight copied in.

    The stem convolution differs in its input columns: pretrained [coords(3), image(1)] maps onto
    the target's [image channel 0, coords (if the target has them)]; mask columns stay fresh.

    Args:
        pretrained: state dict from `pretrain`.
        target: the segmentation network to initialise.

    Returns:
        a state dict for `target` (name -> tensor).
    """
    state = {k: v.clone() for k, v in target.state_dict().items()}
    matched = [k for k, v in pretrained.items() if k in state and state[k].shape == v.shape]
    if len(matched) < len(state) // 2:
        raise ModelError("the pretrained weights do not fit this network; pretrain with the same widths and blocks")
    for key in matched:
        state[key] = pretrained[key].clone()
    stem = state["stem.weight"]
    source = pretrained["stem.weight"]
    stem[:, 0] = source[:, 3]
    if target.config.get("coords"):
        first = int(target.config["image_channels"])
        stem[:, first : first + 3] = source[:, :3]
    return state


def start_from_pretrained(
    run_dir: str | Path,
    config: TrainConfig,
    pretrained: dict[str, torch.Tensor],
    image_channels: int,
    num_classes: int,
) -> None:
    """Write a step-0 checkpoint holding the transferred weights, so `train(..., resume=True)` fine-tunes them.

    Args:
        run_dir: the segmentation run folder.
        config: the segmentation run's config (same widths, res_blocks, skip and time_dim as the pretraining).
        pretrained: state dict from `pretrain`.
        image_channels: C of the segmentation data.
        num_classes: K, classes including the background.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    network = build_network(config.network_config(image_channels, num_classes))
    network.load_state_dict(transfer_weights(pretrained, network))
    optimizer = config.optimiser(network.parameters())
    save_checkpoint(run_dir / CHECKPOINT, network.state_dict(), optimizer.state_dict(), {"state": asdict(RunState())})
