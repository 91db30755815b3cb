"""Noise schedules over T training steps and their respacing to K sampling steps.

A schedule is defined by alpha_bar at each kept step. Respacing keeps alpha_bar at K of the
steps and recomputes beta_k = 1 - alpha_bar_k / alpha_bar_{k-1} (variance resampling,
Nichol & Dhariwal 2021; fu2023 section 3.4), so a 5-step model sees the same noise levels
in training and at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from DiffSegCore.errors import InputError


@dataclass(frozen=True)
class NoiseSchedule:
    """A noise schedule over T kept steps.

    Attributes:
        alpha_bar: cumulative signal fraction per step, float64, (T,), decreasing.
        timesteps: training-step index fed to the network per step, int64, (T,).
    """

    alpha_bar: torch.Tensor
    timesteps: torch.Tensor

    def __len__(self) -> int:
        return int(self.alpha_bar.numel())

    @property
    def betas(self) -> torch.Tensor:
        """beta_k = 1 - alpha_bar_k / alpha_bar_{k-1} per kept step, float64, (T,)."""
        previous = torch.cat([self.alpha_bar.new_ones(1), self.alpha_bar[:-1]])
        return 1.0 - self.alpha_bar / previous


def linear_schedule(steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """Ho et al. 2020: betas evenly spaced from beta_start to beta_end."""
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return NoiseSchedule(torch.cumprod(1.0 - betas, 0), torch.arange(steps))


def cosine_schedule(steps: int, offset: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
    """Nichol & Dhariwal 2021: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2) / f(0)."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
    return NoiseSchedule(torch.cumprod(1.0 - betas, 0), torch.arange(steps))


def make_schedule(kind: str, steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """A base schedule by name ('linear' or 'cosine')."""
    if kind == "linear":
        return linear_schedule(steps, beta_start, beta_end)
    if kind == "cosine":
        return cosine_schedule(steps)
    raise InputError(f"unknown noise schedule '{kind}'; use 'linear' or 'cosine'")


def respace(schedule: NoiseSchedule, steps: int, last: int | None = None) -> NoiseSchedule:
    """Keep alpha_bar at `steps` evenly spaced steps of [0, last] (default: the whole schedule);
    one step keeps `last` alone."""
    last = len(schedule) - 1 if last is None else last
    if not 0 <= last < len(schedule):
        raise InputError(f"start step {last} is outside the schedule's steps 0..{len(schedule) - 1}")
    if not 1 <= steps <= last + 1:
        raise InputError(f"cannot take {steps} sampling steps from {last + 1} diffusion steps; use 1..{last + 1}")
    # One step must start where sampling starts (the noisiest kept step), not at step 0 as linspace gives.
    keep = torch.linspace(0, last, steps, dtype=torch.float64).round().long() if steps > 1 else torch.tensor([last])
    return NoiseSchedule(schedule.alpha_bar[keep], schedule.timesteps[keep])


def training_schedule(diffusion: dict) -> NoiseSchedule:
    """The schedule a model was trained with, from the bundle's diffusion config.

    `base_steps` defines the noise levels; `train_steps` (e.g. 5 or 1000) of them are kept and
    re-indexed 0..train_steps-1, the indices the network's time embedding was trained on.
    """
    base = make_schedule(
        diffusion.get("schedule", "linear"),
        int(diffusion.get("base_steps", diffusion["train_steps"])),
        float(diffusion.get("beta_start", 1e-4)),
        float(diffusion.get("beta_end", 0.02)),
    )
    kept = respace(base, int(diffusion["train_steps"]))
    return NoiseSchedule(kept.alpha_bar, torch.arange(len(kept)))
