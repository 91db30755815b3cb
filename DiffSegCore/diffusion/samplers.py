"""Reverse diffusion over an explicit list of steps: DDPM ancestral and DDIM.

Hand-written because MONAI's schedulers step to the wrong previous timestep after respacing
(DESIGN.md); here each step goes from one kept alpha_bar to the previous kept one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from DiffSegCore.diffusion.masks import PREDICTIONS, predict_x0, x0_to_probabilities
from DiffSegCore.diffusion.process import eps_from_x0, posterior_mean_from_x0, posterior_variance, q_sample
from DiffSegCore.diffusion.schedules import NoiseSchedule
from DiffSegCore.errors import InputError
from DiffSegCore.settings import SAMPLERS

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x_t (B, K, *S), training-step indices (B,)) -> raw network output (B, K, *S)."""


def member_generators(seed: int, members: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per ensemble member (by index), so a member's noise does not depend on batching or device."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + member) for member in members]


def start_noise(shape: tuple[int, ...], generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise, one row per generator, moved to the device of `like`.

    Args:
        shape: (B, K, *S), with B = len(generators).
        generators: one CPU generator per row.
        like: any tensor on the target device.

    Returns:
        float32 noise, (B, K, *S).
    """
    rows = [torch.randn(shape[1:], generator=g) for g in generators]
    return torch.stack(rows).to(device=like.device, dtype=torch.float32)


def initial_state(
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    generators: list[torch.Generator],
    like: torch.Tensor,
    preseg: torch.Tensor | None = None,
) -> torch.Tensor:
    """x at the first sampling step: pure noise, or a pre-segmentation diffused there (PD-DDPM).

    Args:
        schedule: the sampling schedule; its last (noisiest) step is where sampling starts.
        shape: (B, K, *S), with B = len(generators).
        generators: one CPU generator per row.
        like: any tensor on the target device.
        preseg: optional pre-segmentation in diffusion space (one-hot * 2 - 1), (B, K, *S).

    Returns:
        float32 x, (B, K, *S).
    """
    noise = start_noise(shape, generators, like)
    if preseg is None:
        return noise
    return q_sample(preseg.to(noise), float(schedule.alpha_bar[-1]), noise)


def sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    x: torch.Tensor,
    *,
    prediction: str = "x0",
    sampler: str = "ddim",
    eta: float = 0.0,
    generators: list[torch.Generator],
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Denoise x from the schedule's last step to its first.

    The result is the network's x0 estimate at the final (least noisy) step, as in ImgX-DiffSeg.

    Args:
        denoise: the network, (x_t (B, K, *S), steps (B,)) -> output (B, K, *S).
        schedule: the kept steps to walk, noisiest last.
        x: the state at the schedule's last step, (B, K, *S).
        prediction: what the network outputs, "x0" (logits) or "eps" (noise).
        sampler: "ddim" or "ddpm".
        eta: DDIM's noise scale (0: deterministic).
        generators: one CPU generator per row of x, for the noise added on the way.
        on_step: called with (steps done, steps in all) after each network evaluation.

    Returns:
        class probabilities, (B, K, *S).
    """
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler '{sampler}'; use one of {', '.join(SAMPLERS)}")
    if prediction not in PREDICTIONS:
        raise InputError(f"unknown prediction type '{prediction}' in the model; use x0 or eps")
    if eta < 0:
        raise InputError(f"eta must be >= 0, got {eta}")
    steps = len(schedule)
    for done, k in enumerate(reversed(range(steps))):
        a_t = float(schedule.alpha_bar[k])
        t = torch.full((x.shape[0],), int(schedule.timesteps[k]), device=x.device, dtype=torch.long)
        output = denoise(x, t)
        x0 = predict_x0(output, x, a_t, prediction)
        if on_step is not None:
            on_step(done + 1, steps)
        if k == 0:
            return torch.softmax(output.float(), dim=1) if prediction == "x0" else x0_to_probabilities(x0)
        a_s = float(schedule.alpha_bar[k - 1])
        x = _step(x, x0, a_t, a_s, sampler, eta, generators)
    raise AssertionError("unreachable: a schedule has at least one step")


def _step(x, x0, a_t: float, a_s: float, sampler: str, eta: float, generators) -> torch.Tensor:
    """One move from the kept step with alpha_bar a_t to the previous kept step a_s."""
    variance = posterior_variance(a_t, a_s)
    if sampler == "ddpm":
        return posterior_mean_from_x0(x, x0, a_t, a_s) + variance**0.5 * start_noise(x.shape, generators, x)
    sigma = eta * variance**0.5
    eps = eps_from_x0(x, x0, a_t)
    x_s = a_s**0.5 * x0 + max(1 - a_s - sigma**2, 0.0) ** 0.5 * eps
    return x_s + sigma * start_noise(x.shape, generators, x) if sigma > 0 else x_s
