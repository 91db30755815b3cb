"""The forward process q(x_t | x_0), the posterior q(x_s | x_t, x_0), and x0 <-> eps conversions.

Steps are described by alpha_bar values, so the same formulas serve the full schedule and any
respaced one: between consecutive kept steps s < t, alpha = alpha_bar_t / alpha_bar_s.
"""

from __future__ import annotations

import torch


def _bcast(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Shape a per-sample scalar (B,) to broadcast over a (B, C, ...) tensor."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(-1, *([1] * (like.dim() - 1))) if value.dim() else value


def q_sample(x0: torch.Tensor, alpha_bar: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """Diffuse x0 to a step: x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps.

    Args:
        x0: clean mask or image, (B, C, *S).
        alpha_bar: alpha_bar of each sample's step, a float or (B,).
        noise: standard normal noise, (B, C, *S).

    Returns:
        x_t, (B, C, *S).
    """
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """The noise that takes x0 to x_t; x_t, x0 and the result are (B, C, *S), alpha_bar a float or (B,)."""
    a = _bcast(alpha_bar, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """The x0 that `eps` took to x_t; x_t, eps and the result are (B, C, *S), alpha_bar a float or (B,)."""
    a = _bcast(alpha_bar, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def posterior_mean_from_x0(x_t, x0, alpha_bar_t, alpha_bar_s) -> torch.Tensor:
    """Mean of q(x_s | x_t, x0) (fu2023 eq. 1, with alpha_t = alpha_bar_t / alpha_bar_s).

    Args:
        x_t: the sample at step t, (B, C, *S).
        x0: the x0 estimate, (B, C, *S).
        alpha_bar_t: alpha_bar at t, a float or (B,).
        alpha_bar_s: alpha_bar at the earlier step s, a float or (B,).

    Returns:
        the mean of x_s, (B, C, *S).
    """
    a_t, a_s = _bcast(alpha_bar_t, x_t), _bcast(alpha_bar_s, x_t)
    alpha = a_t / a_s
    beta = 1 - alpha
    return (a_s.sqrt() * beta / (1 - a_t)) * x0 + ((1 - a_s) * alpha.sqrt() / (1 - a_t)) * x_t


def posterior_mean_from_eps(x_t, eps, alpha_bar_t, alpha_bar_s) -> torch.Tensor:
    """Mean of q(x_s | x_t, x0(eps)) (fu2023 eq. 2); as posterior_mean_from_x0 with the noise
    estimate eps (B, C, *S) in place of x0."""
    a_t, a_s = _bcast(alpha_bar_t, x_t), _bcast(alpha_bar_s, x_t)
    alpha = a_t / a_s
    return (x_t - (1 - alpha) / (1 - a_t).sqrt() * eps) / alpha.sqrt()


def posterior_variance(alpha_bar_t, alpha_bar_s) -> torch.Tensor | float:
    """beta_tilde = (1 - alpha_bar_s) / (1 - alpha_bar_t) * beta_t, for floats or (B,) tensors alike."""
    return (1 - alpha_bar_s) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_s)
