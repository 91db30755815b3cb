"""Samplers and ensembles against closed forms, with oracle denoisers."""

import pytest
import torch

from DiffSegCore.diffusion.masks import to_diffusion_space
from DiffSegCore.diffusion.process import eps_from_x0, posterior_mean_from_x0, posterior_variance
from DiffSegCore.diffusion.samplers import initial_state, member_generators, sample
from DiffSegCore.diffusion.schedules import linear_schedule, respace
from DiffSegCore.errors import InputError
from DiffSegCore.inference.ensemble import EnsembleAccumulator, reduce_members

BASE = linear_schedule(1001)
SCHEDULE = respace(BASE, 5)


def _truth(num_classes=3, shape=(6, 5, 4)):
    generator = torch.Generator().manual_seed(7)
    labels = torch.randint(0, num_classes, (1, *shape), generator=generator)
    return labels, to_diffusion_space(labels, num_classes)


def _oracle_logits(x0):
    """A network that always predicts the true mask as confident logits."""
    return lambda x_t, t: x0.expand(x_t.shape[0], *x0.shape[1:]) * 30.0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_oracle_x0_network_recovers_the_mask(sampler):
    labels, x0 = _truth()
    generators = member_generators(0, range(2))
    x = initial_state(SCHEDULE, (2, *x0.shape[1:]), generators, x0)
    probs = sample(_oracle_logits(x0), SCHEDULE, x, prediction="x0", sampler=sampler, eta=1.0, generators=generators)
    assert torch.equal(probs.argmax(1), labels.expand(2, *labels.shape[1:]))


def test_oracle_eps_network_recovers_the_mask():
    labels, x0 = _truth()
    generators = member_generators(0, [0])
    x = initial_state(SCHEDULE, x0.shape, generators, x0)

    def oracle_eps(x_t, t):
        return eps_from_x0(x_t, x0, BASE.alpha_bar[t[0]].item())

    probs = sample(oracle_eps, SCHEDULE, x, prediction="eps", sampler="ddim", generators=generators)
    assert torch.equal(probs.argmax(1), labels)
    assert torch.allclose(probs.sum(1), torch.ones_like(probs[:, 0]), atol=1e-5)


def test_ddim_eta0_step_is_the_closed_form_update():
    _, x0 = _truth()
    two = respace(linear_schedule(1001), 2)
    a_s, a_t = two.alpha_bar.tolist()
    x_t = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    seen = []

    def denoise(x, t):
        seen.append(x.clone())
        return x0 * 30.0

    sample(denoise, two, x_t, prediction="x0", sampler="ddim", eta=0.0, generators=member_generators(0, [0]))
    x0_hat = torch.softmax(x0 * 30.0, 1) * 2 - 1
    expected = a_s**0.5 * x0_hat + (1 - a_s) ** 0.5 * eps_from_x0(x_t, x0_hat, a_t)
    assert torch.allclose(seen[1], expected, atol=1e-5)


def test_ddpm_step_draws_from_the_posterior():
    _, x0 = _truth(shape=(40, 40, 40))
    two = respace(linear_schedule(1001), 2)
    a_s, a_t = two.alpha_bar.tolist()
    x_t = torch.zeros_like(x0)
    seen = []

    def denoise(x, t):
        seen.append(x.clone())
        return x0 * 30.0

    sample(denoise, two, x_t, prediction="x0", sampler="ddpm", generators=member_generators(0, [0]))
    x0_hat = torch.softmax(x0 * 30.0, 1) * 2 - 1
    residual = seen[1] - posterior_mean_from_x0(x_t, x0_hat, a_t, a_s)
    assert residual.mean().item() == pytest.approx(0.0, abs=0.01)
    assert residual.var().item() == pytest.approx(posterior_variance(a_t, a_s), rel=0.03)


def test_same_seed_same_members_regardless_of_batching():
    _, x0 = _truth()
    shape = x0.shape[1:]

    def run(first, count):
        generators = member_generators(42, range(first, first + count))
        x = initial_state(SCHEDULE, (count, *shape), generators, x0)
        noisy = lambda x_t, t: x_t  # noqa: E731 - the output depends on the noise, so batching differences show
        return sample(noisy, SCHEDULE, x, sampler="ddpm", generators=generators)

    together = run(0, 4)
    apart = torch.cat([run(0, 2), run(2, 2)])
    assert torch.equal(together, apart)
    assert not torch.equal(run(0, 1), run(1, 1))


def test_preseg_start_is_the_diffused_mask():
    _, x0 = _truth(shape=(30, 30, 30))
    start = respace(linear_schedule(1001), 3, last=400)
    x = initial_state(start, x0.shape, member_generators(0, [0]), x0, preseg=x0)
    a = start.alpha_bar[-1].item()
    assert (x - a**0.5 * x0).mean().item() == pytest.approx(0.0, abs=0.01)
    assert (x - a**0.5 * x0).std().item() == pytest.approx((1 - a) ** 0.5, rel=0.02)


def test_unknown_sampler_is_rejected():
    _, x0 = _truth()
    with pytest.raises(InputError, match="unknown sampler"):
        sample(_oracle_logits(x0), SCHEDULE, x0, sampler="euler", generators=member_generators(0, [0]))


def test_ensemble_reduction_closed_forms():
    p1 = torch.tensor([[0.9, 0.2], [0.1, 0.8]])  # (K=2, S=2)
    p2 = torch.tensor([[0.5, 0.4], [0.5, 0.6]])
    result = reduce_members(torch.stack([p1, p2]), per_class=True, keep_members=True)
    mean = (p1 + p2) / 2
    assert torch.allclose(result.mean_probs, mean)
    assert torch.allclose(result.variance_per_class, ((p1 - p2) / 2) ** 2)
    assert torch.allclose(result.variance, (((p1 - p2) / 2) ** 2).sum(0))
    assert torch.allclose(result.entropy, -(mean * mean.log()).sum(0))
    assert result.labels.tolist() == [0, 1]
    assert result.member_labels.tolist() == [[0, 1], [0, 1]]


def test_streamed_reduction_equals_all_at_once():
    probs = torch.softmax(torch.randn(6, 3, 4, 4, 4, generator=torch.Generator().manual_seed(5)), 1)
    accumulator = EnsembleAccumulator()
    for chunk in probs.split(4):
        accumulator.add(chunk)
    streamed, whole = accumulator.result(), reduce_members(probs)
    assert torch.allclose(streamed.variance, whole.variance, atol=1e-6)
    assert torch.allclose(streamed.variance, probs.var(0, correction=0).sum(0), atol=1e-6)
