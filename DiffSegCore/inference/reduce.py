"""Reduce ensemble members to a segmentation and uncertainty maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EnsembleResult:
    """Mean class probabilities (K, *S), argmax labels, and uncertainty over N members."""

    mean_probs: torch.Tensor
    labels: torch.Tensor
    variance: torch.Tensor
    entropy: torch.Tensor
    variance_per_class: torch.Tensor | None = None
    member_labels: torch.Tensor | None = None


class EnsembleAccumulator:
    """Running sums over member batches, so N members never need to be held at once.

    Variance is the population variance across members (0 for one member), summed over
    classes; entropy is that of the mean probabilities, in nats.
    """

    def __init__(self, per_class: bool = False, keep_members: bool = False):
        self.per_class = per_class
        self.keep_members = keep_members
        self.count = 0
        self.total: torch.Tensor | None = None
        self.total_sq: torch.Tensor | None = None
        self.members: list[torch.Tensor] = []

    def add(self, probs: torch.Tensor) -> None:
        """Add a batch of members' probabilities (B, K, *S), on the CPU in float64 sums."""
        probs = probs.detach().to("cpu", torch.float64)
        batch_sum, batch_sq = probs.sum(dim=0), (probs * probs).sum(dim=0)
        self.total = batch_sum if self.total is None else self.total + batch_sum
        self.total_sq = batch_sq if self.total_sq is None else self.total_sq + batch_sq
        self.count += probs.shape[0]
        if self.keep_members:
            self.members.append(probs.argmax(dim=1).to(torch.uint8))

    def result(self) -> EnsembleResult:
        mean = self.total / self.count
        variance_k = (self.total_sq / self.count - mean * mean).clamp_min(0)
        entropy = -(mean * mean.clamp_min(1e-12).log()).sum(dim=0)
        return EnsembleResult(
            mean_probs=mean.float(),
            labels=mean.argmax(dim=0),
            variance=variance_k.sum(dim=0).float(),
            entropy=entropy.float(),
            variance_per_class=variance_k.float() if self.per_class else None,
            member_labels=torch.cat(self.members) if self.keep_members else None,
        )


def reduce_members(member_probs: torch.Tensor, per_class: bool = False, keep_members: bool = False) -> EnsembleResult:
    """member_probs (N, K, *S) -> mean, argmax label map, variance and entropy."""
    accumulator = EnsembleAccumulator(per_class, keep_members)
    accumulator.add(member_probs)
    return accumulator.result()
