"""The per-case review score: closed forms on small label maps, its ranking figures, and its place in a run."""

from __future__ import annotations

import pytest
import torch

from DiffSegCore.evaluation.report import review_ranking
from DiffSegCore.inference.case_score import review_score


def _box(start: int, size: int, value: int = 1, shape=(12, 12, 12)) -> torch.Tensor:
    labels = torch.zeros(shape, dtype=torch.long)
    labels[start : start + size, start : start + size, start : start + size] = value
    return labels


def test_members_that_agree_score_zero():
    labels = _box(2, 4) + _box(7, 3, value=2)
    assert review_score(torch.stack([labels, labels, labels]), labels, 3) == 0.0


def test_score_is_one_minus_the_members_mean_dice_against_the_ensemble():
    ensemble, shifted = _box(2, 4), _box(3, 4)  # overlap 3x3x3 of 4x4x4 boxes
    dice = 2 * 27 / (64 + 64)
    score = review_score(torch.stack([ensemble, shifted]), ensemble, 2)
    assert score == pytest.approx(1 - (1.0 + dice) / 2)


def test_a_class_missing_from_member_and_ensemble_is_left_out_and_no_foreground_scores_zero():
    ensemble = _box(2, 4)  # class 2 absent everywhere: only class 1 counts
    member = _box(2, 4) * (torch.rand(ensemble.shape, generator=torch.Generator().manual_seed(0)) > 0.5)
    one_class = review_score(member[None], ensemble, 2)
    assert review_score(member[None], ensemble, 3) == pytest.approx(one_class)
    empty = torch.zeros((4, 4, 4), dtype=torch.long)
    assert review_score(torch.stack([empty, empty]), empty, 3) == 0.0


def test_a_member_that_misses_a_class_the_ensemble_has_counts_as_dice_zero_for_it():
    ensemble = _box(2, 4) + _box(7, 3, value=2)
    member = ensemble.clone()
    member[member == 2] = 0
    assert review_score(member[None], ensemble, 3) == pytest.approx(0.5)


def test_ranking_reports_spearman_and_the_worst_cases_rank():
    rows = [
        {"case": "a", "dice": [0.9, 0.9], "review_score": 0.01},
        {"case": "b", "dice": [0.8, 0.8], "review_score": 0.03},
        {"case": "c", "dice": [0.5, 0.7], "review_score": 0.02},
        {"case": "d", "dice": [0.95, None], "review_score": 0.00},
    ]
    ranking = review_ranking(rows)
    assert ranking["worst_case"] == "c" and ranking["worst_case_review_rank"] == 2
    assert ranking["review_spearman"] == pytest.approx(-0.8)  # ranks of Dice 3,2,1,4 vs score 2,4,3,1
    assert review_ranking(rows[:2]) == {"review_spearman": None, "worst_case": None, "worst_case_review_rank": None}


def test_foreground_threshold_keeps_only_sure_foreground_then_the_likeliest_class():
    from DiffSegCore.inference.ensemble import label_map

    # (K=3 classes, 3 voxels): background 0.5, 0.3, 0.1, so foreground 0.5, 0.7, 0.9
    probs = torch.tensor([[0.5, 0.3, 0.1], [0.2, 0.3, 0.5], [0.3, 0.4, 0.4]])
    assert label_map(probs).tolist() == [0, 2, 1]  # plain argmax
    assert label_map(probs, 0.8).tolist() == [0, 0, 1]  # only foreground above 0.8 stays
    assert label_map(probs, 0.45).tolist() == [2, 2, 1]  # voxel 0 turns foreground: the likelier of classes 1, 2
    members = torch.stack([probs, probs])  # (N, K, voxels)
    assert label_map(members, 0.8, dim=1).tolist() == [[0, 0, 1], [0, 0, 1]]
