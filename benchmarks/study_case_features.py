"""Study 7f: can anything the run knows rank the failing cases first, and why not?

Per validation case, the bundle's default ensemble (1 DDIM step, seed 0) and its pre-segmentation U-Net,
then per-case scores that need no label, each ranked against the case's Dice (Spearman, negative is good;
the worst case's rank by score, 1 = reviewed first): the shipped review score, the mean foreground
variance, the image contrast between the predicted structures and a 2-voxel rim around them, the smaller
structure's volume (small first), and the disagreement of the separately trained U-Net. Then every sum of
2 or 3 of their ranks, the best chosen on these same cases (so flattered), and a ridge regression of the
Dice on all five, each case predicted by a fit on the others (what a learnt score would do unseen). Then
what only the label knows, to say why: the share of excess volume, the share of voxels given the other
class, and the U-Net's own case Dice (do two different models fail on the same cases?).

    python benchmarks/study_case_features.py [--cases N] [--smoke] [--bundle PATH]
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import rankdata
from studies_common import (
    budget_from,
    bundle_fields,
    default_bundle,
    load_data,
    member_probabilities,
    parser,
    ranking,
    write_result,
)

from DiffSegCore.evaluation.metrics import dice_per_class
from DiffSegCore.inference.case_score import review_score
from DiffSegCore.inference.ensemble import label_map
from DiffSegCore.inference.plan import make_plan
from DiffSegCore.inference.predictor import presegment
from DiffSegCore.settings import resolve

STUDY = "study_case_features"
# score name -> sign that makes "higher = review first" (a small structure is reviewed first)
LABEL_FREE = {
    "review score": 1,
    "mean fg variance": 1,
    "structure-rim contrast": 1,
    "smaller structure volume": -1,
    "U-Net disagreement": 1,
}
NEED_LABEL = ("excess volume share", "other-class share", "U-Net's own Dice")


def fg_dice(labels: np.ndarray, truth: np.ndarray, classes: int) -> float:
    """Mean foreground Dice of two label maps (*S)."""
    return float(np.mean(dice_per_class(torch.from_numpy(labels), torch.from_numpy(truth), classes)))


def case_scores(probs: torch.Tensor, image: np.ndarray, unet: np.ndarray, truth: np.ndarray, threshold: float) -> dict:
    """Per-case scores of an ensemble's member probabilities (N, K, *S), its image (C, *S), the U-Net's
    label map and the true label map (*S)."""
    classes = probs.shape[1]
    labels = label_map(probs.mean(0), threshold)
    lab = labels.numpy()
    foreground = lab > 0
    rim = ndimage.binary_dilation(foreground, iterations=2) & ~foreground
    true_fg = truth > 0
    return {
        "dice": fg_dice(lab, truth, classes),
        "review score": review_score(label_map(probs, threshold, dim=1), labels, classes),
        "mean fg variance": float(probs.var(0, unbiased=False).sum(0).numpy()[foreground].mean()),
        "structure-rim contrast": float(image[0][foreground].mean() - image[0][rim].mean()),
        "smaller structure volume": float(min((lab == c).sum() for c in range(1, classes))),
        "U-Net disagreement": 1 - fg_dice(unet, lab, classes),
        "excess volume share": float((foreground.sum() - true_fg.sum()) / true_fg.sum()),
        "other-class share": float((foreground & true_fg & (lab != truth)).sum() / true_fg.sum()),
        "U-Net's own Dice": fg_dice(unet, truth, classes),
    }


def left_out_predictions(features: np.ndarray, dice: np.ndarray, ridge: float = 1.0) -> np.ndarray:
    """Each case's Dice predicted by a ridge regression on the (cases, scores) `features`, fitted on the other
    cases: an honest estimate of what a score learnt from these cases would do on unseen ones."""
    z = (features - features.mean(0)) / features.std(0)
    design = np.c_[z, np.ones(len(z))]
    predicted = np.empty(len(dice))
    for i in range(len(dice)):
        rest = np.arange(len(dice)) != i
        a = design[rest]
        weights = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ dice[rest])
        predicted[i] = design[i] @ weights
    return predicted


def main() -> None:
    args = parser(__doc__, eval_cases=40).parse_args()
    budget = budget_from(args)
    bundle = default_bundle(args.bundle)
    data = load_data(bundle.meta, budget, args.smoke)
    defaults = bundle.meta["defaults"]
    threshold = float(defaults.get("foreground_threshold") or 0.0)
    settings = resolve(bundle.meta, {"device": "cpu"})
    rows = []
    for case in data.validation:
        image, truth = case.load()
        plan = make_plan(bundle, tuple(image.shape[1:]), settings)
        probs = member_probabilities(bundle, case, {"steps": defaults["steps"]}, defaults["ensemble"])
        unet = presegment(bundle, torch.from_numpy(image), plan, precision="float32").numpy()
        rows.append({"case": case.name, **case_scores(probs, image, unet, truth.astype(np.int64), threshold)})
    dice = np.array([r["dice"] for r in rows])
    signed = {name: sign * np.array([r[name] for r in rows]) for name, sign in LABEL_FREE.items()}
    alone = {name: ranking(dice, score) for name, score in signed.items()}
    ranks = {name: rankdata(score) for name, score in signed.items()}
    sums = [
        {"scores": list(combo), **ranking(dice, sum(ranks[n] for n in combo))}
        for size in (2, 3)
        for combo in combinations(ranks, size)
    ]
    learnt = ranking(dice, -left_out_predictions(np.stack(list(signed.values()), 1), dice))  # low Dice first
    explained = {name: ranking(dice, np.array([r[name] for r in rows])) for name in NEED_LABEL}
    for name, row in {**alone, **explained}.items():
        print(f"{name}: Spearman {row['spearman']:+.3f}, worst case {row['worst_rank']} of {len(rows)}")
    best = min(sums, key=lambda r: r["spearman"])
    print(
        f"ridge regression on all five, each case left out of its fit: {learnt['spearman']:+.3f}, worst {learnt['worst_rank']}"
    )
    print(f"best sum of ranks ({' + '.join(best['scores'])}): {best['spearman']:+.3f}, worst case {best['worst_rank']}")
    write_result(
        STUDY,
        {
            **bundle_fields(bundle, data),
            "budget": f"no training; {len(rows)} validation cases, the bundle's defaults, seed 0",
            "mean_dice": round(float(dice.mean()), 4),
            "label_free": alone,
            "rank_sums": sorted(sums, key=lambda r: r["spearman"]),
            "learnt_left_out": learnt,
            "need_the_label": explained,
            "cases": rows,
        },
        args.smoke,
    )


if __name__ == "__main__":
    main()
