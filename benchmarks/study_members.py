"""Study 7c: members from several trainings and mirrored inputs (hippocampus 1.1), and the review score.

The bundle holds several trainings of one network (mirrored in x while training). Per
validation case, 8 members (1 DDIM step, seed 0) of each member set: one network with noise only,
one network with mirrored members, each further network alone, all networks, all with mirrored members. For every ensemble
size and foreground threshold: mean foreground Dice, HD95, voxel uncertainty AUROC near the
structures, and how well two per-case scores rank the failing cases first (Spearman with the case
Dice of that ensemble; the worst case's rank by score). The first n of a set's 8 members are exactly
an n-member run of that set (inference/predictor.py: member_views).

    python benchmarks/study_members.py [--cases N] [--smoke] [--bundle PATH]
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from studies_common import (
    budget_from,
    bundle_fields,
    default_bundle,
    load_data,
    member_probabilities,
    parser,
    ranking,
    score_case,
    write_result,
)

from DiffSegCore.inference.case_score import review_score
from DiffSegCore.inference.ensemble import label_map

STUDY = "study_members"
SIZES = (1, 2, 4, 5, 6, 8)
THRESHOLDS = (0.0, 0.5, 0.7, 0.8)
MEMBERS = 8


def member_sets(bundle) -> dict:
    """Named variants of the bundle that differ only in which networks and mirrorings their members use."""
    axes = (bundle.meta.get("members") or {}).get("mirror_axes", [2])

    def variant(first, more, mirror_axes):
        members = {"networks": 1 + len(more), "mirror_axes": mirror_axes}
        return replace(bundle, network=first, more_networks=tuple(more), meta={**bundle.meta, "members": members})

    a, *others = bundle.networks
    sets = {"network A, noise only": variant(a, [], []), "network A, mirrored members": variant(a, [], axes)}
    if others:
        every = "networks A+B" if len(others) == 1 else f"all {1 + len(others)} networks"
        for letter, other in zip("BCDEFGH", others):
            sets[f"network {letter}, noise only"] = variant(other, [], [])
        sets[f"{every}, noise only"] = variant(a, others, [])
        sets[f"{every}, mirrored members"] = variant(a, others, axes)
    return sets


def evaluate_set(members: list[torch.Tensor], truths: list[np.ndarray], data, size: int, threshold: float) -> dict:
    """Scores of the first `size` members of each case's (MEMBERS, K, *S) probabilities."""
    rows, review, variance = [], [], []
    for probs, truth in zip(members, truths):
        chosen = probs[:size]
        mean = chosen.mean(0)
        labels = label_map(mean, threshold)
        spread = chosen.var(0, unbiased=False).sum(0)
        rows.append(score_case(labels, truth, data, spread))
        foreground = labels > 0
        variance.append(float(spread[foreground].mean()) if foreground.any() else 0.0)
        review.append(review_score(label_map(chosen, threshold, dim=1), labels, data.num_classes) if size > 1 else 0.0)
    dice = np.array([np.nanmean(r["dice"]) for r in rows])
    auroc = [r["auroc_near"] for r in rows if r.get("auroc_near") is not None]
    return {
        "members": size,
        "threshold": threshold,
        "dice": round(float(dice.mean()), 4),
        "dice_per_class": [round(float(v), 4) for v in np.nanmean([r["dice"] for r in rows], axis=0)],
        "hd95_mm": round(float(np.nanmean([np.nanmean(r["hd95"]) for r in rows])), 3),
        "auroc_near": round(float(np.mean(auroc)), 4) if auroc else None,
        "review_score": ranking(dice, np.array(review)) if size > 1 else None,
        "mean_fg_variance": ranking(dice, np.array(variance)) if size > 1 else None,
        "worst_case": data.validation[int(dice.argmin())].name,
    }


def main() -> None:
    args = parser(__doc__, eval_cases=40).parse_args()
    budget = budget_from(args)
    bundle = default_bundle(args.bundle)
    data = load_data(bundle.meta, budget, args.smoke)
    truths = [case.load()[1].astype(np.int64) for case in data.validation]
    results = []
    for name, variant in member_sets(bundle).items():
        members = [member_probabilities(variant, case, {"steps": 1}, MEMBERS) for case in data.validation]
        for size in SIZES:
            for threshold in THRESHOLDS:
                row = {"set": name, **evaluate_set(members, truths, data, size, threshold)}
                results.append(row)
                print(row, flush=True)
    write_result(
        STUDY,
        {
            **bundle_fields(bundle, data),
            "budget": f"no training; {len(data.validation)} validation cases, 1 DDIM step, seed 0",
            "rows": results,
        },
        args.smoke,
    )


if __name__ == "__main__":
    main()
