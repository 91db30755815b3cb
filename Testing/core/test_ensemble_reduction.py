"""The float32 ensemble reduction against float64 sums (the core's reduction before issue 16), on the bundled
model's real members of a real hippocampus case: mean, variance, entropy within 1e-6 (relative 1e-5 for the
entropy), labels equal wherever the decision is not within 1e-6 of a tie."""

from __future__ import annotations

import pytest
import torch

from DiffSegCore.inference.ensemble import EnsembleAccumulator, first_max_index, label_map, member_probabilities
from DiffSegCore.inference.pipeline import open_model, read_case
from DiffSegCore.progress import RunProgress
from DiffSegCore.resources import resource_path

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def members(hippocampus_case) -> tuple[torch.Tensor, float]:
    """The bundled model's 5 members (5, 3, *S) of hippocampus_001 at its defaults, and its foreground threshold."""
    quiet = RunProgress("none")
    bundle, settings = open_model(str(resource_path("Models", "hippocampus")), {"device": "cpu"}, quiet)
    case = read_case(bundle, [hippocampus_case[0]], settings, quiet)
    return member_probabilities(bundle, case.image, settings), settings.foreground_threshold


def float64_reference(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, variance per class and entropy from float64 sums and sums of squares."""
    probs = probs.to(torch.float64)
    mean = probs.sum(0) / len(probs)
    variance = ((probs * probs).sum(0) / len(probs) - mean * mean).clamp_min(0)
    return {"mean": mean, "variance": variance, "entropy": -(mean * mean.clamp_min(1e-12).log()).sum(0)}


def near_a_tie(mean: torch.Tensor, threshold: float) -> torch.Tensor:
    """Voxels whose label would flip with a change of the mean probabilities below TOLERANCE."""
    foreground = mean[1:]
    top2 = foreground.topk(2, dim=0).values
    near = (top2[0] - top2[1]).abs() < 2 * TOLERANCE
    if threshold:
        return near | ((foreground.sum(0) - threshold).abs() < 2 * TOLERANCE * len(foreground))
    return near | ((mean[0] - foreground.max(0).values).abs() < 2 * TOLERANCE)


@pytest.mark.parametrize("batches", [(5,), (2, 2, 1)], ids=["one batch", "three batches"])
def test_float32_reduction_equals_float64_sums(members, batches):
    probs, threshold = members
    accumulator = EnsembleAccumulator(per_class=True, keep_members=True, threshold=threshold)
    for chunk in probs.split(list(batches)):
        accumulator.add(chunk)
    result, reference = accumulator.result(), float64_reference(probs)
    assert result.mean_probs.dtype == result.variance.dtype == torch.float32
    torch.testing.assert_close(result.mean_probs.double(), reference["mean"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(result.variance_per_class.double(), reference["variance"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(result.variance.double(), reference["variance"].sum(0), atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(result.entropy.double(), reference["entropy"], atol=TOLERANCE, rtol=1e-5)
    assert result.variance.max() > 0.01, "the members must disagree somewhere for the test to mean anything"
    expected = label_map(reference["mean"], threshold)
    differ = result.labels != expected
    assert not (differ & ~near_a_tie(reference["mean"], threshold)).any()
    assert differ.sum() <= 5, "a few voxels at a tie at most"
    assert torch.equal(result.member_labels, label_map(probs.double(), threshold, dim=1).to(torch.uint8))
    assert torch.equal(label_map(probs, threshold, dim=1), probs[:, 1:].argmax(1).add(1).where(
        probs[:, 1:].sum(1) > threshold, 0))  # fmt: skip


def test_first_max_index_is_argmax_with_ties_to_the_first():
    values = torch.tensor([[0.2, 0.5, 0.5, 0.1], [0.2, 0.5, 0.1, 0.1], [0.6, 0.0, 0.4, 0.8]])  # (K=3, S=4)
    assert first_max_index(values).tolist() == values.argmax(0).tolist() == [2, 0, 0, 2]
    batch = torch.rand(4, 5, 6, 7, 3).movedim(-1, 1)  # channels-last-like strides, as the network leaves them
    assert torch.equal(first_max_index(batch, 1), batch.argmax(1))
