"""Shared pieces of the evidence studies (docs/results.md): split, budget, training arms, scoring, output.

Every arm trains on the same training split and is scored on the same fixed validation subset,
with fixed seeds. Trained arms and sampled ensemble members are cached under runs/studies/ (keyed
by everything that determines them), so a study re-run, or a second study sharing an arm,
costs nothing twice.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchlib import SPLIT_MODEL, machine_info  # noqa: E402

from DiffSegCore.evaluation.metrics import case_metrics  # noqa: E402
from DiffSegCore.inference.case_score import rank_of_failures  # noqa: E402
from DiffSegCore.inference.ensemble import member_probabilities as sampled_members  # noqa: E402
from DiffSegCore.inference.ensemble import predict_volume  # noqa: E402
from DiffSegCore.io import atomic  # noqa: E402
from DiffSegCore.models.bundle import ModelBundle, load_bundle  # noqa: E402
from DiffSegCore.models.metadata import held_out_cases  # noqa: E402
from DiffSegCore.networks.unet import build_network  # noqa: E402
from DiffSegCore.settings import resolve  # noqa: E402
from DiffSegCore.training.cache import CachedCase, build_cache  # noqa: E402
from DiffSegCore.training.datasets import find_cases, split_cases  # noqa: E402
from DiffSegCore.training.loop import TrainConfig, read_best, train  # noqa: E402

# The shared data sit beside the checkout (../shared/data), as the tests expect; DIFFSEG_STUDY_DATA overrides.
DATA = Path(os.environ.get("DIFFSEG_STUDY_DATA") or REPO.parent / "shared" / "data" / "hippocampus")
BUNDLE = SPLIT_MODEL  # the sampler studies score cases this bundle held out
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "runs" / "studies"
SPLIT = {"validation_fraction": 0.2, "seed": 0}  # the bundled model's split (160 train / 40 validation)
# Preprocessing for the trained arms: the bundled model's spec (MR, robust z-score, native 1 mm grid).
STUDY_META = {"channels": [{"name": "MR", "normalisation": {"kind": "percentile_zscore"}}], "spacing": None}
PAPER_NOTE = "far below the papers' budgets (fu2023: 12,500 AdamW steps on a TPU v3-8; bieder2023: days on A100s)"


@dataclass
class Budget:
    """The equal compute given to every trained arm, and how arms are scored."""

    iterations: int = 300
    batch: int = 2
    widths: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    # The bundled model's recipe: centre-biased 32x48x32 crops (the volumes are about 36x50x35).
    size: list[int] = field(default_factory=lambda: [32, 48, 32])
    affine_prob: float = 0.25
    lr: float = 1e-3
    eval_cases: int = 16
    eval_members: int = 1
    eval_steps: int = 5
    threads: int = 1

    def describe(self) -> str:
        return (
            f"{self.iterations} iterations of batch {self.batch} {self.size} crops per arm, U-Net widths {self.widths}, "
            f"AdamW lr {self.lr}, 1 CPU thread; scored on {self.eval_cases} validation cases "
            f"({self.eval_members} member(s), DDIM {self.eval_steps} steps)"
        )


@dataclass
class Data:
    train: list[CachedCase]
    validation: list[CachedCase]
    num_classes: int
    spacing: tuple[float, float, float]


def parser(description: str, **budget_defaults) -> argparse.ArgumentParser:
    """Command line shared by the studies: --smoke for a minutes-long check, budget overrides."""
    defaults = Budget(**budget_defaults)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny run (few steps, 2-4 cases) into runs/studies/smoke/")
    p.add_argument("--iterations", type=int, default=defaults.iterations, help="training iterations per arm")
    p.add_argument("--cases", type=int, default=defaults.eval_cases, help="validation cases scored")
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    p.add_argument("--bundle", type=Path, default=BUNDLE, help="model bundle for the sampler studies")
    return p


def budget_from(args: argparse.Namespace, **overrides) -> Budget:
    budget = Budget(iterations=args.iterations, eval_cases=args.cases, threads=args.threads, **overrides)
    if args.smoke:
        budget = Budget(
            iterations=4, widths=[8, 16], size=[16, 24, 16], eval_cases=2, threads=args.threads, **overrides
        )
    torch.set_num_threads(budget.threads)
    return budget


def load_data(meta: dict, budget: Budget, smoke: bool = False) -> Data:
    """The fixed split, preprocessed to `meta`'s spec; validation cut to the scored subset."""
    dataset = find_cases(DATA)
    split = split_cases([c.name for c in dataset.cases], **SPLIT)
    by_name = {c.name: c for c in dataset.cases}
    train_names, val_names = split["train"], split["validation"][: budget.eval_cases]
    unseen = set(held_out_cases(meta))
    if "training" in meta and not set(val_names) <= unseen:  # a bundle (sampler studies), not a trained arm's spec
        raise SystemExit(
            f"the bundle was trained on {len(set(val_names) - unseen)} of the scored validation cases; pass "
            f"--bundle with one that held them out ({BUNDLE})"
        )
    if smoke:
        train_names = train_names[:4]
    cached = build_cache([by_name[n] for n in train_names + val_names], meta, RUNS / "cache", log=lambda _: None)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(by_name[val_names[0]].images[0]))
    reader.ReadImageInformation()
    spacing = tuple(meta.get("spacing") or reader.GetSpacing()[:3])
    return Data(cached[: len(train_names)], cached[len(train_names) :], len(dataset.labels) + 1, spacing)


def machine() -> dict:
    """What a result ran on (the speed benchmarks' machine record) plus the commit."""
    info = machine_info()
    with contextlib.suppress(Exception):
        import subprocess

        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    return info


# ----------------------------------------------------------------------------- trained arms


@dataclass
class Arm:
    name: str
    run_dir: Path
    config: dict
    cpu_seconds: float
    wall_seconds: float
    train_cases: int


def cache_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


@contextlib.contextmanager
def cross_entropy_only():
    """fu2023 Table 3(b) ablation: train the x0 network with cross-entropy alone (no Dice term).

    TrainConfig has no switch for it, so the loss object the x0 objective uses is swapped for the
    duration of one run (MONAI's DiceCELoss with lambda_dice=0 is plain cross-entropy).
    """
    from monai.losses import DiceCELoss

    from DiffSegCore.diffusion import objectives

    original = objectives._dice_ce
    objectives._dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, lambda_dice=0.0)
    try:
        yield
    finally:
        objectives._dice_ce = original


def train_arm(
    name: str,
    overrides: dict,
    data: Data,
    budget: Budget,
    train_cases: list[CachedCase] | None = None,
    pretrained: dict[str, torch.Tensor] | None = None,
    pretrained_key: str = "",
    dice_loss: bool = True,
) -> Arm:
    """Train one arm (or reuse its cached run): same split, budget and seed for every arm."""
    cases = data.train if train_cases is None else train_cases
    settings = {
        "widths": budget.widths,
        "batch": budget.batch,
        "iterations": budget.iterations,
        "lr": budget.lr,
        "warmup": max(1, budget.iterations // 10),
        "val_every": budget.iterations,
        "checkpoint_every": budget.iterations,
        "device": "cpu",
        "workers": 0,
        "seed": 0,
        "size": budget.size,
        "affine_prob": budget.affine_prob,
        **overrides,
    }
    key = cache_key({"s": settings, "cases": [c.name for c in cases], "pre": pretrained_key, "dice": dice_loss})
    run_dir = RUNS / "arms" / f"{name}-{key}"
    done = run_dir / "arm.json"
    if done.exists():
        record = json.loads(done.read_text())
        return Arm(name, run_dir, record["config"], record["cpu_seconds"], record["wall_seconds"], len(cases))
    config = TrainConfig.from_json(settings)
    resume = False
    if pretrained is not None:
        from DiffSegCore.training.pretraining import start_from_pretrained

        image_channels = cases[0].load()[0].shape[0]
        start_from_pretrained(run_dir, config, pretrained, image_channels, data.num_classes)
        resume = True
    cpu, wall = time.process_time(), time.monotonic()
    with contextlib.nullcontext() if dice_loss else cross_entropy_only():
        train(run_dir, cases, [], config, data.num_classes, resume=resume, log=lambda msg: print(f"[{name}] {msg}"))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    record = {"config": asdict(config), "cpu_seconds": cpu, "wall_seconds": wall}
    (run_dir / "checkpoint.safetensors").unlink(missing_ok=True)  # only the final weights are needed
    atomic.write_text(done, json.dumps(record, indent=1))  # its presence says the arm is done
    return Arm(name, run_dir, record["config"], cpu, wall, len(cases))


def arm_bundle(arm: Arm, num_classes: int) -> ModelBundle:
    """An in-memory model bundle around an arm's final weights, for predict_volume."""
    weights, config = read_best(arm.run_dir)
    train_config = TrainConfig.from_json(config)
    network = build_network(train_config.network_config(1, num_classes))
    network.load_state_dict(weights)
    meta = {
        "id": arm.name,
        "classes": [{"value": v} for v in range(1, num_classes)],
        "diffusion": train_config.diffusion_config(),
        "network": network.config,
    }
    return ModelBundle(arm.run_dir, meta, network.eval(), None)


def default_bundle(path: Path = BUNDLE) -> ModelBundle:
    if not (path / "model.json").exists():
        raise SystemExit(f"the bundled model is not there yet ({path}); train it first")
    return load_bundle(path)


# ----------------------------------------------------------------------------- scoring


def score_case(labels: torch.Tensor, truth: np.ndarray, data: Data, uncertainty: torch.Tensor | None = None) -> dict:
    """Foreground Dice, HD95 (mm, NaN where a class is missing) and, given an uncertainty map, the
    AUROC of uncertainty for errors near the structures: DiffSegCore.evaluation.report's MONAI metrics."""
    labels = np.asarray(labels, dtype=np.int64)
    unc = np.zeros(labels.shape, np.float32) if uncertainty is None else np.asarray(uncertainty, dtype=np.float32)
    with warnings.catch_warnings():  # MONAI warns for each class missing from a prediction
        warnings.simplefilter("ignore")
        metrics = case_metrics(labels, truth.astype(np.int64), unc, data.num_classes, tuple(reversed(data.spacing)))
    scores = {
        "dice": [round(v, 4) for v in metrics["dice"]],
        "hd95": [float("nan") if v is None else round(v, 3) for v in metrics["hd95_mm"]],
    }
    if uncertainty is not None:
        scores["auroc_near"] = metrics["uncertainty_auroc"]
    return scores


def ranking(dice: np.ndarray, score: np.ndarray) -> dict:
    """Spearman(case Dice, score) (negative is good) and the worst case's rank by score (1 = first)."""
    rho, rank, _ = rank_of_failures(dice.tolist(), score.tolist())
    return {"spearman": round(rho, 3), "worst_rank": rank}


def unet_labels(bundle: ModelBundle, image: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return bundle.network(torch.from_numpy(image)[None]).argmax(1)[0]


def score_arm(arm: Arm, data: Data, budget: Budget) -> dict:
    """Per-case and mean scores of a trained arm on the scored validation cases."""
    bundle = arm_bundle(arm, data.num_classes)
    chosen = {"steps": budget.eval_steps, "ensemble": budget.eval_members, "sampler": "ddim", "device": "cpu"}
    settings = resolve(bundle.meta, chosen)
    cases = []
    for case in data.validation:
        image, truth = case.load()
        if bundle.network.config["kind"] == "unet":
            labels = unet_labels(bundle, image)
        else:
            labels = predict_volume(bundle, torch.from_numpy(image), settings).labels
        cases.append({"case": case.name, **score_case(labels, truth, data)})
    return {
        "arm": arm.name,
        "train_cases": arm.train_cases,
        "cpu_seconds": round(arm.cpu_seconds, 1),
        "wall_seconds": round(arm.wall_seconds, 1),
        **summary(cases),
        "cases": cases,
    }


def run_arms(arms: list[tuple], data: Data, budget: Budget) -> list[dict]:
    """Train and score (name, description, overrides, dice_loss, paper (Dice, HD)) arms in order."""
    rows = []
    for name, description, overrides, dice_loss, paper in arms:
        arm = train_arm(name, overrides, data, budget, dice_loss=dice_loss)
        rows.append({**score_arm(arm, data, budget), "description": description, "paper": paper})
        print(f"{name}: Dice {rows[-1]['dice']:.3f}, HD95 {rows[-1]['hd95']:.2f} mm, {arm.cpu_seconds:.0f} CPU s")
    return rows


def arm_study_main(study: str, doc: str, arms: list[tuple], paper: str, title: str) -> None:
    """A whole trained-arms study: parse the budget, train and score every arm, write JSON and plot."""
    args = parser(doc).parse_args()
    budget = budget_from(args)
    data = load_data(STUDY_META, budget, args.smoke)
    rows = run_arms(arms, data, budget)
    write_arms(study, rows, data, budget, args.smoke, paper=paper)
    bar_plot(study, rows, f"{title}, {budget.iterations} iterations per arm", args.smoke)


def write_arms(study: str, rows: list[dict], data: Data, budget: Budget, smoke: bool, **extra) -> Path:
    return write_result(
        study,
        {"budget": budget.describe(), "budget_note": PAPER_NOTE, "train_cases": len(data.train), **extra, "arms": rows},
        smoke,
    )


def summary(cases: list[dict]) -> dict:
    """Mean (and std over cases) of the per-case mean foreground Dice and HD95."""
    dice = np.array([np.nanmean(c["dice"]) for c in cases])
    hd95 = np.array([np.nanmean(c["hd95"]) if np.isfinite(c["hd95"]).any() else np.nan for c in cases])
    per_class = np.nanmean(np.array([c["dice"] for c in cases]), axis=0)
    return {
        "dice": round(float(np.nanmean(dice)), 4),
        "dice_std": round(float(np.nanstd(dice)), 4),
        "dice_per_class": [round(float(v), 4) for v in per_class],
        "hd95": round(float(np.nanmean(hd95)), 3),
        "hd95_std": round(float(np.nanstd(hd95)), 3),
    }


# ----------------------------------------------------------------------------- sampled members


def bundle_fingerprint(bundle: ModelBundle) -> str:
    """Identifies a bundle's metadata and the weights of its networks in their order, so cached members
    never outlive a retrained model nor stand for a variant that puts another network first."""
    digests = []
    for network in (*bundle.networks, bundle.preseg_network):
        digest = hashlib.sha256()
        for tensor in ([] if network is None else network.state_dict().values()):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digests.append(digest.hexdigest())
    return cache_key({"meta": bundle.meta, "weights": digests})


def member_probabilities(
    bundle: ModelBundle,
    case: CachedCase,
    settings: dict,
    members: int,
    preseg_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class probabilities (members, K, *S) of members 0..members-1 (seed 0), sampled as one batch,
    so any prefix of them is itself an ensemble (the noise of a member does not depend on batching).

    Cached on disk as float16 because the sampler studies share them; the key holds the settings
    and the pre-segmentation mask's content.
    """
    run = resolve(bundle.meta, {**settings, "ensemble": members, "seed": 0, "device": "cpu"})
    mask = None if preseg_mask is None else hashlib.sha256(preseg_mask.numpy().tobytes()).hexdigest()
    key = cache_key({"bundle": bundle_fingerprint(bundle), "case": case.name, "s": run.to_json(), "mask": mask})
    path = RUNS / "members" / f"{case.name}-{key}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path).astype(np.float32))
    image, _ = case.load()
    probs = sampled_members(bundle, torch.from_numpy(image), run, preseg_mask=preseg_mask).float()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:  # tmp ends in .npy, so numpy writes to it as named
        np.save(tmp, probs.numpy().astype(np.float16))
    return probs


# ----------------------------------------------------------------------------- output


def output_dir(smoke: bool) -> Path:
    folder = RUNS / "smoke" if smoke else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def bundle_fields(bundle: ModelBundle, data: Data) -> dict:
    """What a sampling study's results name of the model it sampled and the cases it scored."""
    return {
        "bundle": bundle.meta["id"],
        "bundle_version": bundle.meta.get("version"),
        "cases": [c.name for c in data.validation],
    }


def write_result(study: str, payload: dict, smoke: bool) -> Path:
    """benchmarks/results/<study>.json (smoke runs: runs/studies/smoke/), with machine and command."""
    path = output_dir(smoke) / f"{study}.json"
    record = {
        "study": study,
        "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "machine": machine(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **payload,
    }
    atomic.write_text(path, json.dumps(record, indent=1, default=float) + "\n")
    print(f"wrote {path}")
    return path


def save_figure(fig, study: str, smoke: bool) -> Path:
    path = output_dir(smoke) / f"{study}.png"
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(study: str, rows: list[dict], title: str, smoke: bool) -> Path:
    """Mean Dice and HD95 per arm (error bars: std over cases)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [r["arm"] for r in rows]
    for axis, key, label in ((axes[0], "dice", "mean foreground Dice"), (axes[1], "hd95", "HD95 (mm)")):
        axis.bar(names, [r[key] for r in rows], yerr=[r[f"{key}_std"] for r in rows], color="C0", capsize=3)
        axis.set_ylabel(label)
        axis.tick_params(axis="x", rotation=30, labelsize=8)
    axes[0].set_ylim(0, 1)
    fig.suptitle(title, fontsize=10)
    path = save_figure(fig, study, smoke)
    plt.close(fig)
    return path
