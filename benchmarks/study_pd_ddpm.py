"""Study 4 (guo2022): PD-DDPM with the bundled model. Dice vs. the start step T' with the bundle's
pre-segmentation network, and with deliberately degraded pre-segmentations (guo2022 Table 2):
eroded, dilated, shifted, one class dropped, empty; the ground truth as an upper bound.

    python benchmarks/study_pd_ddpm.py [--cases N] [--members N] [--sampler ddim|ddpm] [--smoke]
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms.utils_morphological_ops import dilate, erode
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
    summary,
    write_result,
)

from DiffSegCore.diffusion.schedules import training_schedule
from DiffSegCore.inference.plan import make_plan
from DiffSegCore.inference.predictor import presegment
from DiffSegCore.settings import SAMPLERS, resolve

STUDY = "study_pd_ddpm"
SHIFT = 3  # voxels along y (anterior-posterior)


def _foreground_masks(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """One single-channel mask per class, along the batch axis: MONAI's erode/dilate mix channels
    (a 2-channel hippocampus mask erodes to nothing), so every class goes in alone."""
    return torch.stack([(labels == c) for c in range(1, classes)]).float()[:, None]


def degrade(labels: torch.Tensor, how: str, classes: int) -> torch.Tensor:
    """A pre-segmentation made worse on purpose (guo2022 Table 2 varies the pre-segmentation's Dice)."""
    if how == "eroded":
        kept = erode(_foreground_masks(labels, classes), 3)[:, 0]
        return torch.where(kept.sum(0) > 0, labels, torch.zeros_like(labels))
    if how == "dilated":
        grown = dilate(_foreground_masks(labels, classes), 3)[:, 0]
        out = labels.clone()
        for c in range(1, classes):  # background voxels next to class c join it (higher class wins ties)
            out[(labels == 0) & (grown[c - 1] > 0)] = c
        return out
    if how == "shifted":
        return torch.roll(labels, SHIFT, dims=1)
    if how == "class_dropped":
        return torch.where(labels == classes - 1, torch.zeros_like(labels), labels)
    if how == "empty":
        return torch.zeros_like(labels)
    raise ValueError(how)


DEGRADATIONS = ("eroded", "dilated", "shifted", "class_dropped", "empty")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--members", type=int, default=3, help="ensemble size for every cell")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    args = p.parse_args()
    budget = budget_from(args)
    bundle = default_bundle(args.bundle)
    data = load_data(bundle.meta, budget, args.smoke)
    trained_steps = len(training_schedule(bundle.meta["diffusion"]))
    starts = (
        list(range(trained_steps))
        if trained_steps <= 10
        else [round(f * (trained_steps - 1)) for f in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)]
    )
    members = 2 if args.smoke else args.members
    images = [torch.from_numpy(case.load()[0]) for case in data.validation]
    truths = [torch.from_numpy(case.load()[1].astype(np.int64)) for case in data.validation]
    sources: dict[str, list[torch.Tensor]] = {}
    if bundle.preseg_network is not None:
        plan = make_plan(bundle, tuple(images[0].shape[1:]), resolve(bundle.meta, {"device": "cpu", "ensemble": 1}))
        model = [presegment(bundle, image, plan) for image in images]
        sources["model"] = model
        for how in DEGRADATIONS:
            sources[f"model_{how}"] = [degrade(labels, how, data.num_classes) for labels in model]
    else:
        sources["empty"] = [torch.zeros_like(t) for t in truths]
    sources["ground_truth"] = truths
    rows = []
    for source, masks in sources.items():
        own = summary(
            [{"case": c.name, **score_case(m, t.numpy(), data)} for c, m, t in zip(data.validation, masks, truths)]
        )
        for start in starts:
            # From T' sampling takes every trained step T'..0; preseg names the mask for the cache key.
            settings = {"steps": start + 1, "sampler": args.sampler, "eta": 0.0, "preseg": f"mask:{source}"}
            settings["preseg_step"] = start
            cases = []
            for case, mask, truth in zip(data.validation, masks, truths):
                probs = member_probabilities(bundle, case, settings, members, preseg_mask=mask)
                cases.append({"case": case.name, **score_case(probs.mean(0).argmax(0), truth.numpy(), data)})
            rows.append(
                {
                    "preseg": source,
                    "preseg_dice": own["dice"],
                    "preseg_hd95": own["hd95"],
                    "start_step": start,
                    "steps": start + 1,
                    **summary(cases),
                    "cases": cases,
                }
            )
            print(
                f"{source} (Dice {own['dice']:.3f}) T'={start}: Dice {rows[-1]['dice']:.4f} HD95 {rows[-1]['hd95']:.2f}"
            )
    baseline = []
    for case, truth in zip(data.validation, truths):
        probs = member_probabilities(
            bundle,
            case,
            {"steps": trained_steps, "sampler": args.sampler, "eta": 0.0, "preseg": "none"},
            members,
        )
        baseline.append({"case": case.name, **score_case(probs.mean(0).argmax(0), truth.numpy(), data)})
    write_result(
        STUDY,
        {
            **bundle_fields(bundle, data),
            "trained_steps": trained_steps,
            "sampler": args.sampler,
            "members": members,
            "budget": f"no training; {len(data.validation)} validation cases, {members} members per cell, {budget.threads} CPU thread(s)",
            "paper": "guo2022 (WMH, T=1000): best Dice at T'=300; Table 2: pre-seg Dice 0.000/0.754/0.799 -> PD-DDPM 0.353/0.790/0.812",
            "no_preseg": {"steps": trained_steps, **summary(baseline)},
            "rows": rows,
        },
        args.smoke,
    )
    plot(rows, summary(baseline), args.smoke)


def plot(rows: list[dict], baseline: dict, smoke: bool) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for source in dict.fromkeys(r["preseg"] for r in rows):
        mine = [r for r in rows if r["preseg"] == source]
        label = f"{source} (pre-seg Dice {mine[0]['preseg_dice']:.2f})"
        axes[0].plot([r["start_step"] for r in mine], [r["dice"] for r in mine], "o-", label=label)
        axes[1].plot([r["start_step"] for r in mine], [r["hd95"] for r in mine], "o-", label=label)
    for axis, key in ((axes[0], "dice"), (axes[1], "hd95")):
        axis.axhline(baseline[key], color="k", linestyle="--", label="no pre-segmentation (from noise)")
        axis.set_xlabel("start step T' (training-step index)")
    axes[0].set_ylabel("mean foreground Dice")
    axes[1].set_ylabel("HD95 (mm)")
    axes[0].legend(fontsize=7)
    save_figure(fig, STUDY, smoke)
    plt.close(fig)


if __name__ == "__main__":
    main()
