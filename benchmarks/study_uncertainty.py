"""Study 7: does the uncertainty flag errors? With the bundled model, per ensemble size:
voxel AUROC of the variance map (and of the entropy of the mean) for misclassified voxels, and
the per-case Spearman correlation between mean uncertainty and Dice (can it flag a bad case?).

    python benchmarks/study_uncertainty.py [--cases N] [--steps K [K ...]] [--smoke]
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from scipy.stats import spearmanr
from studies_common import (
    budget_from,
    bundle_fields,
    default_bundle,
    load_data,
    member_probabilities,
    parser,
    pyplot,
    save_figure,
    score_case,
    write_result,
)

from DiffSegCore.diffusion.schedules import training_schedule
from DiffSegCore.inference.ensemble import reduce_members
from DiffSegCore.settings import SAMPLERS

STUDY = "study_uncertainty"
ENSEMBLES = (2, 3, 5, 8)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(a, b, nan_policy="omit").statistic)


def auroc(scores: torch.Tensor, errors: torch.Tensor) -> float:
    return float(compute_roc_auc(scores.flatten().double(), errors.flatten().long()))


def analyse(members: list[torch.Tensor], truths: list[np.ndarray], n: int, data) -> dict:
    """Voxel AUROC (pooled over whole volumes, and per case near the structures as DiffSegCore.evaluation.report
    defines it) and case-level correlations, for the first n members."""
    var_all, ent_all, err_all, per_case = [], [], [], []
    for probs, truth in zip(members, truths):
        result = reduce_members(probs[:n])
        errors = result.labels != torch.from_numpy(truth.astype(np.int64))
        var_all.append(result.variance.flatten())
        ent_all.append(result.entropy.flatten())
        err_all.append(errors.flatten())
        foreground = result.labels > 0
        scores = score_case(result.labels, truth, data, uncertainty=result.variance)
        per_case.append(
            {
                "dice": float(np.nanmean(scores["dice"])),
                "error_voxels": int(errors.sum()),
                "auroc_variance_near": scores["auroc_near"],
                "mean_variance_foreground": float(result.variance[foreground].mean())
                if foreground.any()
                else float("nan"),
                "mean_entropy_foreground": float(result.entropy[foreground].mean())
                if foreground.any()
                else float("nan"),
                "total_variance": float(result.variance.sum()),
            }
        )
    dice = np.array([c["dice"] for c in per_case])
    return {
        "ensemble": n,
        "auroc_variance_pooled": auroc(torch.cat(var_all), torch.cat(err_all)),
        "auroc_entropy_pooled": auroc(torch.cat(ent_all), torch.cat(err_all)),
        "auroc_variance_near_mean_per_case": float(
            np.nanmean([np.nan if c["auroc_variance_near"] is None else c["auroc_variance_near"] for c in per_case])
        ),
        "spearman_dice_vs_mean_variance_fg": spearman(
            dice, np.array([c["mean_variance_foreground"] for c in per_case])
        ),
        "spearman_dice_vs_mean_entropy_fg": spearman(dice, np.array([c["mean_entropy_foreground"] for c in per_case])),
        "spearman_dice_vs_total_variance": spearman(dice, np.array([c["total_variance"] for c in per_case])),
        "worst_case": {
            "dice": float(dice.min()),
            "uncertainty_rank": int(
                np.argsort(np.argsort(-np.array([c["mean_variance_foreground"] for c in per_case])))[int(dice.argmin())]
            )
            + 1,
        },
        "cases": per_case,
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, nargs="+", help="sampling steps (default: 1, 2 and all trained steps)")
    args = p.parse_args()
    budget = budget_from(args)
    bundle = default_bundle(args.bundle)
    data = load_data(bundle.meta, budget, args.smoke)
    step_counts = args.steps or sorted({1, 2, len(training_schedule(bundle.meta["diffusion"]))})
    sizes = (2,) if args.smoke else ENSEMBLES
    truths = [case.load()[1] for case in data.validation]
    results = []
    for sampler, steps in ((s, k) for s in SAMPLERS for k in step_counts):
        settings = {"steps": steps, "sampler": sampler, "eta": 0.0, "preseg": "none"}
        members = [member_probabilities(bundle, case, settings, max(sizes)) for case in data.validation]
        for n in sizes:
            row = {"sampler": sampler, "steps": steps, **analyse(members, truths, n, data)}
            results.append(row)
            print(
                f"{sampler} K={steps} N={n}: AUROC variance {row['auroc_variance_pooled']:.3f}, entropy {row['auroc_entropy_pooled']:.3f}; "
                f"Spearman(Dice, mean fg variance) {row['spearman_dice_vs_mean_variance_fg']:.3f}"
            )
    write_result(
        STUDY,
        {
            **bundle_fields(bundle, data),
            "budget": f"no training; {len(data.validation)} validation cases, {step_counts} steps, members up to {max(sizes)}",
            "paper": "bieder2023 / guo2022 show variance maps qualitatively; no AUROC is reported there",
            "results": results,
        },
        args.smoke,
    )
    plot(results, args.smoke)


def plot(results: list[dict], smoke: bool) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for sampler, steps in dict.fromkeys((r["sampler"], r["steps"]) for r in results):
        mine = [r for r in results if (r["sampler"], r["steps"]) == (sampler, steps)]
        sizes, name = [r["ensemble"] for r in mine], f"{sampler} K={steps}"
        axes[0].plot(sizes, [r["auroc_variance_pooled"] for r in mine], "o-", label=f"{name} variance")
        axes[0].plot(sizes, [r["auroc_entropy_pooled"] for r in mine], "s--", label=f"{name} entropy")
        near = [r["auroc_variance_near_mean_per_case"] for r in mine]
        axes[0].plot(sizes, near, "^:", label=f"{name} variance, near structures")
        axes[1].plot(sizes, [r["spearman_dice_vs_mean_variance_fg"] for r in mine], "o-", label=name)
    axes[0].set_ylabel("voxel AUROC for misclassified voxels")
    axes[1].set_ylabel("Spearman(case Dice, mean fg variance)")
    for axis in axes:
        axis.set_xlabel("ensemble size")
        axis.legend(fontsize=8)
    save_figure(fig, STUDY, smoke)
    plt.close(fig)


if __name__ == "__main__":
    main()
