"""3D U-Nets: the time-conditioned denoiser and the plain pre-segmentation network.

Hand-written because MONAI's DiffusionModelUNet always has a self-attention middle block and
concatenating skips, while PatchDDM needs averaging skips and no attention (DESIGN.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from DiffSegCore.errors import ModelError

SKIP_MODES = ("concat", "add", "average")


def network_defaults() -> dict:
    """The default network config (fu2023: widths 32/64/128/256, one block per level)."""
    return {
        "kind": "diffusion",
        "image_channels": 1,
        "num_classes": 2,
        "coords": False,
        "widths": [32, 64, 128, 256],
        "res_blocks": 1,
        "skip": "add",
        "time_dim": 64,
    }


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the (integer) training-step index.

    Args:
        t: training-step indices, (B,).
        dim: embedding size D (even).

    Returns:
        float32 embedding, (B, D): sines then cosines.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class ResBlock(nn.Module):
    """norm-SiLU-conv twice with a residual path; the time embedding shifts the features.

    forward(x (B, in_ch, *S), emb (B, time_dim) or None) -> (B, out_ch, *S).
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int | None):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(time_dim, out_ch) if time_dim else None
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time is not None:
            h = h + self.time(emb)[:, :, None, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class Level(nn.Module):
    """A stack of ResBlocks at one resolution.

    forward(x (B, in_ch, *S), emb (B, time_dim) or None) -> (B, out_ch, *S).
    """

    def __init__(self, in_ch: int, out_ch: int, blocks: int, time_dim: int | None):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(in_ch if i == 0 else out_ch, out_ch, time_dim) for i in range(blocks))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, emb)
        return x


class UNet3D(nn.Module):
    """A 3D U-Net; with kind='diffusion' it is conditioned on the step index.

    The input is the channel concatenation [image channels, coordinate channels (optional),
    noisy mask (diffusion only, one channel per class)]; the output has one channel per class
    (logits for x0 prediction, noise for eps prediction). Any spatial size works: each downsampling
    halves a size rounding up, and each upsampling is cropped back to its skip's size (padding the input
    to a multiple of the total downsampling instead cost up to a third more voxels on small crops).

    Args:
        config: network config (see network_defaults): kind, image_channels, num_classes, coords,
            widths, res_blocks, skip, time_dim.
    """

    def __init__(self, config: dict):
        super().__init__()
        cfg = {**network_defaults(), **config}
        if cfg["skip"] not in SKIP_MODES:
            raise ModelError(f"unknown skip mode '{cfg['skip']}' in the network config; use one of {SKIP_MODES}")
        self.config = cfg
        widths = [int(w) for w in cfg["widths"]]
        self.diffusion = cfg["kind"] == "diffusion"
        time_dim = int(cfg["time_dim"]) if self.diffusion else None
        self.time_dim = time_dim
        if time_dim:
            self.time_mlp = nn.Sequential(
                nn.Linear(time_dim, time_dim * 2), nn.SiLU(), nn.Linear(time_dim * 2, time_dim)
            )
        self.skip_mode = cfg["skip"]
        blocks = int(cfg["res_blocks"])
        self.stem = nn.Conv3d(self.in_channels, widths[0], 3, padding=1)
        self.down_levels = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        for i, width in enumerate(widths):
            self.down_levels.append(Level(widths[max(i - 1, 0)] if i else widths[0], width, blocks, time_dim))
            if i < len(widths) - 1:
                self.downsamplers.append(nn.Conv3d(width, width, 3, stride=2, padding=1))
        self.upsamplers = nn.ModuleList()
        self.up_levels = nn.ModuleList()
        for i in reversed(range(len(widths) - 1)):
            self.upsamplers.append(nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2))
            merged = 2 * widths[i] if self.skip_mode == "concat" else widths[i]
            self.up_levels.append(Level(merged, widths[i], blocks, time_dim))
        self.head = nn.Sequential(
            nn.GroupNorm(_groups(widths[0]), widths[0]), nn.SiLU(), nn.Conv3d(widths[0], self.num_classes, 1)
        )
        self.multiple = 2 ** (len(widths) - 1)

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    @property
    def in_channels(self) -> int:
        cfg = self.config
        mask = self.num_classes if self.diffusion else 0
        return int(cfg["image_channels"]) + (3 if cfg["coords"] else 0) + mask

    def _merge(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.skip_mode == "concat":
            return torch.cat([skip, up], dim=1)
        if self.skip_mode == "add":
            return skip + up
        return (skip + up) / 2

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Evaluate the network.

        Args:
            x: input channels, (B, in_channels, *S), any spatial size S.
            t: training-step indices, (B,); diffusion networks only.

        Returns:
            logits or noise, (B, num_classes, *S).
        """
        emb = self.time_mlp(timestep_embedding(t, self.time_dim)) if self.time_dim else None
        h = self.stem(x)
        skips = []
        for i, level in enumerate(self.down_levels):
            h = level(h, emb)
            if i < len(self.downsamplers):
                skips.append(h)
                h = self.downsamplers[i](h)  # size s -> ceil(s / 2)
        for upsample, level in zip(self.upsamplers, self.up_levels):
            skip = skips.pop()
            up = upsample(h)[(..., *(slice(0, s) for s in skip.shape[2:]))]  # 2 ceil(s / 2) -> s
            h = level(self._merge(skip, up), emb)
        return self.head(h)


def build_network(config: dict) -> UNet3D:
    """Instantiate a network from a bundle's network config."""
    if config.get("kind", "diffusion") not in ("diffusion", "unet"):
        raise ModelError(f"unknown network kind '{config.get('kind')}'; use 'diffusion' or 'unet'")
    return UNet3D(config)
