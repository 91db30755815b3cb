"""Noise schedules and respacing against closed forms."""

import math

import pytest
import torch

from DiffSegCore.diffusion.schedules import cosine_schedule, linear_schedule, respace, training_schedule
from DiffSegCore.errors import InputError


def test_five_step_resampling_of_linear_1001_matches_fu2023():
    schedule = respace(linear_schedule(1001, 1e-4, 0.02), 5)
    expected = [0.9999, 0.5218, 0.0780, 0.00332, 4.0e-5]
    assert schedule.timesteps.tolist() == [0, 250, 500, 750, 1000]
    for got, want in zip(schedule.alpha_bar.tolist(), expected, strict=True):
        assert got == pytest.approx(want, rel=0.01)


def test_linear_alpha_bar_is_product_of_one_minus_beta():
    schedule = linear_schedule(10, 0.1, 0.5)
    betas = [0.1 + (0.5 - 0.1) * i / 9 for i in range(10)]
    assert schedule.alpha_bar[-1].item() == pytest.approx(math.prod(1 - b for b in betas), rel=1e-12)
    assert torch.allclose(schedule.betas, torch.tensor(betas, dtype=torch.float64))


def test_cosine_alpha_bar_follows_squared_cosine():
    steps, s = 100, 0.008
    schedule = cosine_schedule(steps)

    def f(t):
        return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2

    for i in (0, 10, 50, 90):
        assert schedule.alpha_bar[i].item() == pytest.approx(f(i + 1) / f(0), rel=1e-9)


def test_respaced_betas_reproduce_kept_alpha_bar():
    base = linear_schedule(1000)
    kept = respace(base, 7)
    assert torch.allclose(torch.cumprod(1 - kept.betas, 0), kept.alpha_bar)
    assert torch.equal(kept.alpha_bar, base.alpha_bar[kept.timesteps])


def test_respace_to_a_start_step_ends_there():
    kept = respace(linear_schedule(1000), 4, last=600)
    assert kept.timesteps.tolist() == [0, 200, 400, 600]


def test_one_step_jumps_from_the_start_step():
    """A single step denoises from where sampling starts: pure noise at T, or the pre-segmentation at T'."""
    base = linear_schedule(1000)
    assert respace(base, 1).timesteps.tolist() == [999]
    assert respace(base, 1, last=300).timesteps.tolist() == [300]
    assert respace(base, 1, last=0).timesteps.tolist() == [0]
    assert respace(base, 1).betas.item() == pytest.approx(1 - base.alpha_bar[999].item())


def test_training_schedule_reindexes_kept_steps():
    schedule = training_schedule({"schedule": "linear", "base_steps": 1001, "train_steps": 5})
    assert schedule.timesteps.tolist() == [0, 1, 2, 3, 4]
    assert schedule.alpha_bar[1].item() == pytest.approx(0.5218, rel=0.01)


@pytest.mark.parametrize(("steps", "last"), [(0, None), (6, None), (3, 1), (2, 7)])
def test_impossible_respacing_is_a_clear_error(steps, last):
    with pytest.raises(InputError):
        respace(linear_schedule(5), steps, last)
