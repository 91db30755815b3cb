"""Study 7b: members that disagree where the model can be wrong, and a per-case review score.

Per validation case, members of the bundled model's first network from several sources of doubt
(diffusion noise, mirrored inputs, shifted inputs, intensity changes, the pre-segmentation network,
re-noising the ensemble's own label to T' = 1..3), then for each set of members: its Dice, and how well
two per-case scores rank the failing cases first (Spearman with the case Dice of 5 noise members; the
worst case's rank by score). Then each source alone as a score: how far its label map lies from the
5 noise members' one (1 - foreground Dice). Also the foreground threshold and largest-component levers
on Dice and HD95. Labels use the bundle's default foreground threshold.

    python benchmarks/study_review_score.py [--cases N] [--smoke]
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import ndimage
from studies_common import (
    RUNS,
    budget_from,
    bundle_fields,
    bundle_fingerprint,
    default_bundle,
    load_data,
    parser,
    ranking,
    write_result,
)

from DiffSegCore.evaluation.metrics import case_metrics
from DiffSegCore.inference.case_score import review_score
from DiffSegCore.inference.ensemble import label_map
from DiffSegCore.inference.predictor import conditioning, evaluate_network, on_device, sample_members, sampling_schedule

STUDY = "study_review_score"
FLIPS = [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]  # spatial dims of a (C, z, y, x) image
SHIFTS = [f"shift{axis}{step:+d}" for axis in (1, 2, 3) for step in (-2, 2)]
INTENSITY = ["gamma0.8", "gamma1.25", "scale0.9", "scale1.1"]
# member set -> (its members, network evaluations per case at one member per evaluation)
SETS = {
    "diffusion noise, 5 members (default)": (lambda c: c["base"][:5], 5),
    "diffusion noise, 8 members": (lambda c: c["base"][:8], 8),
    "mirrored left-right (x), 2 members": (lambda c: c["flip3"], 2),
    "base 5 + mirrored x 2": (lambda c: np.concatenate([c["base"][:5], c["flip3"]]), 7),
    "all 7 mirrorings x 2 members": (lambda c: np.concatenate([c[f"flip{i}"] for i in range(1, 8)]), 14),
    "shifted by 2 voxels (6 shifts)": (lambda c: np.concatenate([c[k] for k in SHIFTS]), 6),
    "intensity: gamma 0.8/1.25, scale 0.9/1.1": (lambda c: np.concatenate([c[k] for k in INTENSITY]), 4),
    "own label re-noised to T'=1,2,3, 2 each": (lambda c: np.concatenate([c["self1"], c["self2"], c["self3"]]), 6),
    "base 5 + pre-segmentation network": (lambda c: np.concatenate([c["base"][:5], c["pre0"]]), 6),
    "base 5 + shifts + intensity + re-noised + network": (
        lambda c: np.concatenate(
            [c["base"][:5], *[c[k] for k in SHIFTS + INTENSITY], c["self1"], c["self2"], c["self3"], c["pre0"]]
        ),
        22,
    ),
}
THRESHOLDS = (0.0, 0.6, 0.7, 0.8, 0.9)
# source -> the member keys whose label maps are each compared with the 5 noise members' label map
SOURCES = {
    "mirrored left-right (x)": ["flip3"],
    "all 7 mirrorings": [f"flip{i}" for i in range(1, 8)],
    "shifted by 2 voxels": SHIFTS,
    "intensity changed": INTENSITY,
    "own label re-noised": ["self1", "self2", "self3"],
    "pre-segmentation network": ["pre0"],
    "all of the above": [f"flip{i}" for i in range(1, 8)] + SHIFTS + INTENSITY + ["self1", "self2", "self3", "pre0"],
}


def sample_sources(bundle, case) -> dict[str, np.ndarray]:
    """Class probabilities (N, K, *S) of every member source of one case, float16."""
    net = on_device(bundle.network, torch.device("cpu")).eval()
    pre = on_device(bundle.preseg_network, torch.device("cpu")).eval()
    diffusion = bundle.meta["diffusion"]

    def members(cond, first, count, start=None, start_step=None):
        schedule = sampling_schedule(diffusion, 1, start_step)
        return sample_members(
            net,
            cond,
            schedule,
            prediction="x0",
            sampler="ddim",
            eta=0.0,
            seed=0,
            members=range(first, first + count),
            start=start,
        )

    image, truth = case.load()
    img = torch.from_numpy(image)
    out = {"base": members(img, 0, 8)}
    for i, axes in enumerate(FLIPS[1:], 1):  # mirrored input, prediction mirrored back
        out[f"flip{i}"] = members(img.flip(axes), 100 * i, 2).flip([d + 1 for d in axes])
    with torch.inference_mode():
        out["pre0"] = evaluate_network(pre, conditioning(pre, img)[None], None, None).softmax(1)
    for name in SHIFTS:  # shifted input (wrapping round), prediction shifted back
        axis, step = int(name[5]), int(name[6:])
        out[name] = members(img.roll(step, axis), 1000 + 10 * axis + step, 1).roll(-step, axis + 1)
    low, high = float(img.min()), float(img.max())
    for g in (0.8, 1.25):
        out[f"gamma{g}"] = members(((img - low) / (high - low)) ** g * (high - low) + low, 2000 + int(g * 100), 1)
    for s in (0.9, 1.1):
        out[f"scale{s}"] = members(img * s, 3000 + int(s * 100), 1)
    own = out["base"].mean(0).argmax(0)  # the 8-member ensemble's label
    for start_step in (1, 2, 3):  # PD-DDPM from the ensemble's own label: does the model keep it?
        out[f"self{start_step}"] = members(img, 4000 + 10 * start_step, 2, own, start_step)
    return {"truth": truth.astype(np.uint8), **{k: v.numpy().astype(np.float16) for k, v in out.items()}}


def load_sources(bundle, case) -> dict[str, np.ndarray]:
    folder = RUNS / "review_members" / bundle_fingerprint(bundle)
    path = folder / f"{case.name}.npz"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(path.with_suffix(".tmp.npz"), **sample_sources(bundle, case))
        path.with_suffix(".tmp.npz").rename(path)
    with np.load(path) as stored:
        return {k: stored[k].astype(np.int64 if k == "truth" else np.float32) for k in stored.files if k != "times"}


def scores(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = case_metrics(labels.astype(np.int64), truth, np.zeros(truth.shape, np.float32), 3, (1.0, 1.0, 1.0))
    return float(np.nanmean(m["dice"])), float(np.nanmean([np.nan if v is None else v for v in m["hd95_mm"]]))


def largest_components(labels: np.ndarray) -> np.ndarray:
    """Each class's largest 26-connected component (MONAI's KeepLargestConnectedComponent needs scikit-image)."""
    labels = labels.copy()
    for k in np.unique(labels[labels > 0]):
        components, n = ndimage.label(labels == k, np.ones((3, 3, 3)))
        if n > 1:
            labels[(labels == k) & (components != 1 + np.bincount(components.ravel())[1:].argmax())] = 0
    return labels


def source_scores(cases: list[dict], threshold: float) -> dict[str, np.ndarray]:
    """Per source, per case: the mean over its keys of 1 - foreground Dice against the 5 noise members' labels
    (the review score with each key's label map as one member)."""
    out = {name: [] for name in SOURCES}
    for c in cases:
        default = label_map(torch.from_numpy(c["base"][:5]).mean(0), threshold)
        for name, keys in SOURCES.items():
            own = torch.stack([label_map(torch.from_numpy(c[k]).mean(0), threshold) for k in keys])
            out[name].append(review_score(own, default, 3))
    return {name: np.array(v) for name, v in out.items()}


def main() -> None:
    args = parser(__doc__, eval_cases=40).parse_args()
    budget = budget_from(args)
    bundle = default_bundle(args.bundle)
    data = load_data(bundle.meta, budget, args.smoke)
    cases = [load_sources(bundle, case) for case in data.validation]
    threshold = float(bundle.meta["defaults"]["foreground_threshold"] or 0.0)
    default_dice = np.array(
        [scores(label_map(torch.from_numpy(c["base"][:5]).mean(0), threshold).numpy(), c["truth"])[0] for c in cases]
    )
    sets = []
    for name, (members_of, evaluations) in SETS.items():
        dice, variance, review = [], [], []
        for c in cases:
            members = torch.from_numpy(members_of(c))
            mean = members.mean(0)
            labels = label_map(mean, threshold)
            dice.append(scores(labels.numpy(), c["truth"])[0])
            foreground = labels > 0
            var = members.var(0, unbiased=False).sum(0)
            variance.append(float(var[foreground].mean()) if foreground.any() else 0.0)
            review.append(review_score(label_map(members, threshold, dim=1), labels, 3))
        row = {
            "members": name,
            "network_evaluations": evaluations,
            "dice": float(np.mean(dice)),
            "mean_fg_variance": ranking(default_dice, np.array(variance)),
            "review_score": ranking(default_dice, np.array(review)),
        }
        sets.append(row)
        print(f"{name}: Dice {row['dice']:.4f}; variance {row['mean_fg_variance']}; review {row['review_score']}")
    sources = []
    for name, score in source_scores(cases, threshold).items():
        sources.append({"source": name, "keys": len(SOURCES[name]), **ranking(default_dice, score)})
        print(f"{name} alone: {sources[-1]}")
    levers = []
    for lever in THRESHOLDS:
        for keep_largest in (False, True):
            per_case = []
            for c in cases:
                labels = label_map(torch.from_numpy(c["base"][:5]).mean(0), lever).numpy()
                per_case.append(scores(largest_components(labels) if keep_largest else labels, c["truth"]))
            per_case = np.array(per_case)
            levers.append(
                {
                    "threshold": lever,
                    "largest_component": keep_largest,
                    "dice": float(per_case[:, 0].mean()),
                    "hd95_mm": float(np.nanmean(per_case[:, 1])),
                }
            )
            print(levers[-1])
    write_result(
        STUDY,
        {
            **bundle_fields(bundle, data),
            "budget": f"no training; {len(cases)} validation cases, 1 sampling step, DDIM, seed 0",
            "foreground_threshold": threshold,
            "sets": sets,
            "sources": sources,
            "levers": levers,
        },
        args.smoke,
    )


if __name__ == "__main__":
    main()
