"""The forward process and posterior means against closed forms."""

import pytest
import torch

from DiffSegCore.diffusion.process import (
    eps_from_x0,
    posterior_mean_from_eps,
    posterior_mean_from_x0,
    posterior_variance,
    q_sample,
    x0_from_eps,
)


def test_q_sample_moments_match_closed_form():
    generator = torch.Generator().manual_seed(0)
    x0, alpha_bar = 0.7, 0.3
    noise = torch.randn(400_000, generator=generator, dtype=torch.float64)
    x_t = q_sample(torch.full_like(noise, x0), alpha_bar, noise)
    assert x_t.mean().item() == pytest.approx(alpha_bar**0.5 * x0, abs=5e-3)
    assert x_t.var().item() == pytest.approx(1 - alpha_bar, rel=1e-2)


def test_posterior_mean_and_variance_equal_gaussian_bayes():
    # x_s ~ N(sqrt(a_s) x0, 1 - a_s); x_t | x_s ~ N(sqrt(alpha) x_s, 1 - alpha): product of Gaussians.
    a_t, a_s, x0, x_t = 0.2, 0.6, torch.tensor([-1.0, 0.4]), torch.tensor([0.3, -0.8])
    alpha = a_t / a_s
    precision = 1 / (1 - a_s) + alpha / (1 - alpha)
    mean = (a_s**0.5 * x0 / (1 - a_s) + alpha**0.5 * x_t / (1 - alpha)) / precision
    assert torch.allclose(posterior_mean_from_x0(x_t, x0, a_t, a_s), mean, atol=1e-6)
    assert posterior_variance(a_t, a_s) == pytest.approx(1 / precision)


def test_x0_and_eps_posterior_means_agree():
    generator = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 3, 4, 4, 4, generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    a_t, a_s = torch.tensor([0.08, 0.5]), torch.tensor([0.52, 0.9999])
    x_t = q_sample(x0, a_t, noise)
    eps = eps_from_x0(x_t, x0, a_t)
    assert torch.allclose(eps, noise, atol=1e-4)
    assert torch.allclose(posterior_mean_from_x0(x_t, x0, a_t, a_s), posterior_mean_from_eps(x_t, eps, a_t, a_s), atol=1e-4)
    assert torch.allclose(x0_from_eps(x_t, eps, a_t), x0, atol=1e-4)
