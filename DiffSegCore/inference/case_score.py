"""The per-case review score: one number per segmented case that ranks the cases most worth a look first.

Chosen by measurement on the bundled model's 40 validation cases (docs/results.md, study 7): the members'
mean disagreement with the ensemble's own label map, in Dice, tracks the case's true Dice better than
the mean voxel variance does, because it is relative to the size of each structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def review_score(member_labels: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """1 - the mean over members of their mean foreground Dice against the ensemble's label map.

    Args:
        member_labels: each member's label map (N, *S).
        labels: the ensemble's label map (*S).
        num_classes: classes including background (label 0, left out).

    Returns:
        A score in [0, 1]: 0 when every member agrees with the ensemble, higher = review first. A class
        that neither a member nor the ensemble holds is left out of that member's mean; a case with no
        foreground anywhere scores 0.
    """
    k = num_classes
    joint = member_labels.long().flatten(1) * k + labels.long().flatten()[None]  # (N, voxels)
    confusion = torch.stack([torch.bincount(row, minlength=k * k) for row in joint]).view(-1, k, k).double()
    overlap = confusion.diagonal(dim1=1, dim2=2)[:, 1:]  # (N, K-1): member and ensemble agree on class c
    sizes = confusion.sum(2)[:, 1:] + confusion.sum(1)[:, 1:]  # member's voxels of c + the ensemble's
    present = sizes > 0
    dice = torch.where(present, 2 * overlap / sizes.clamp_min(1), torch.zeros_like(sizes))
    counted = present.sum(-1)
    per_member = torch.where(counted > 0, dice.sum(-1) / counted.clamp_min(1), torch.ones_like(dice[:, 0]))
    return float(1 - per_member.mean())


def rank_of_failures(dice: Sequence[float], scores: Sequence[float]) -> tuple[float, int, int]:
    """How well `scores` rank the failing cases first, over cases with these `dice` (same order):
    Spearman(case Dice, score), negative when they do, the worst case's rank by score (1 = reviewed first) and
    the worst case's index."""
    from scipy.stats import spearmanr  # here: the segmenting path imports this module and needs no scipy

    worst = min(range(len(dice)), key=dice.__getitem__)
    rank = 1 + sum(score > scores[worst] for score in scores)
    return float(spearmanr(dice, scores).statistic), int(rank), worst
