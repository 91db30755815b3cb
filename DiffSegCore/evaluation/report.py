"""Measure a model on labelled cases: Dice and HD95 per class, time per case, uncertainty AUROC."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from DiffSegCore.errors import InputError, ModelError
from DiffSegCore.evaluation.metrics import case_metrics
from DiffSegCore.inference.case_score import rank_of_failures
from DiffSegCore.inference.pipeline import OutputOptions, on_input_grid, run_case
from DiffSegCore.inference.ranks import Distributed
from DiffSegCore.io.atomic import write_text
from DiffSegCore.io.cases import collect_cases, group_by_case, volume_files
from DiffSegCore.io.volumes import read_volume, to_array
from DiffSegCore.models.bundle import ModelBundle
from DiffSegCore.progress import RunProgress
from DiffSegCore.settings import RunSettings


def _label_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"label folder not found: {folder}")
    return {name: files[0] for name, files in group_by_case(volume_files(folder)).items()}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def evaluate(
    bundle: ModelBundle,
    settings: RunSettings,
    images_dir: Path,
    labels_dir: Path,
    only: set[str] | None = None,
    group: Distributed | None = None,
) -> dict:
    """Segment every labelled case (or those in `only`) through the run pipeline and score it.

    `settings` come from settings.resolve for this bundle; "seconds" per case is the sampling time.
    Under torchrun (`group`), each rank scores its share of the cases and every rank returns the whole report.
    """
    group = group or Distributed()
    cases = collect_cases([images_dir])
    labels = _label_files(labels_dir)
    names = sorted(n for n in cases if only is None or n in only)
    missing = [n for n in names if n not in labels]
    if missing:
        raise InputError(f"no label file for {len(missing)} case(s) ({', '.join(missing[:3])}) in {labels_dir}")
    if only is not None and not names:
        raise InputError(f"none of the requested cases is in {images_dir}")
    rows, ran = [], settings
    for name in group.share(names):
        case = run_case(bundle, cases[name], settings, RunProgress("none"))
        ran = case.settings  # with the device the members actually ran on
        outputs = on_input_grid(case, OutputOptions())
        truth = np.rint(to_array(read_volume(labels[name]))).astype(np.int64)
        if truth.shape != tuple(reversed(case.reference.GetSize())):
            raise InputError(f"case {name}: the label grid differs from the image grid")
        spacing_zyx = tuple(reversed(case.reference.GetSpacing()))
        metrics = case_metrics(
            to_array(outputs["segmentation"]).astype(np.int64),
            truth,
            to_array(outputs["uncertainty"]),
            bundle.num_classes,
            spacing_zyx,
        )
        seconds = case.timings["sample"]
        rows.append({"case": name, **metrics, "review_score": case.result.review_score, "seconds": seconds})
        print(f"{name}: Dice {[round(v, 3) for v in metrics['dice']]} in {seconds:.1f} s", flush=True)
    rows = sorted((row for part in group.gather(rows) for row in part), key=lambda row: row["case"])
    classes = [c["name"] for c in bundle.meta["classes"]]
    per_class_dice = [_mean([r["dice"][k] for r in rows]) for k in range(len(classes))]
    return {
        "model": bundle.meta["id"],
        "version": bundle.meta.get("version"),
        "classes": classes,
        "settings": ran.to_json(),
        "device": ran.device,
        "cases": rows,
        "mean": {
            "cases": len(rows),
            "mean_foreground_dice": _mean(per_class_dice),
            "dice": per_class_dice,
            "hd95_mm": [_mean([r["hd95_mm"][k] for r in rows]) for k in range(len(classes))],
            "uncertainty_auroc": _mean([r["uncertainty_auroc"] for r in rows]),
            "seconds_per_case": _mean([r["seconds"] for r in rows]),
            **review_ranking(rows),
        },
    }


def review_ranking(rows: list[dict]) -> dict:
    """How well the per-case review score ranks the failing cases first: Spearman(case Dice, score)
    (negative is good) and the worst case's rank by score (1 = reviewed first); None where it cannot tell."""
    dice = [_mean(r["dice"]) for r in rows]
    kept = [(d, r["review_score"], r["case"]) for d, r in zip(dice, rows) if d is not None and r["review_score"] is not None]
    if len(kept) < 3:
        return {"review_spearman": None, "worst_case": None, "worst_case_review_rank": None}
    case_dice, scores, names = zip(*kept)
    rho, rank, worst = rank_of_failures(case_dice, scores)
    return {"review_spearman": _finite(rho), "worst_case": names[worst], "worst_case_review_rank": rank}


def _cell(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row(label: str, values: dict) -> list[str]:
    return [
        label,
        *map(_cell, values["dice"]),
        *(_cell(v, 2) for v in values["hd95_mm"]),
        _cell(values["uncertainty_auroc"]),
        _cell(values.get("review_score")),
        _cell(values.get("seconds", values.get("seconds_per_case")), 1),
    ]


def format_table(report: dict) -> str:
    """Per-case rows and the mean, as a plain-text table."""
    classes = report["classes"]
    header = ["case", *[f"Dice {c}" for c in classes], *[f"HD95 {c} (mm)" for c in classes], "AUROC", "review", "s"]
    lines = [_row(r["case"], r) for r in report["cases"]]
    mean = report["mean"]
    lines.append(_row("mean", mean))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.append(f"mean foreground Dice {_cell(mean['mean_foreground_dice'], 4)} over {mean['cases']} case(s)")
    if mean.get("review_spearman") is not None:
        out.append(
            f"review score: Spearman(case Dice, score) {mean['review_spearman']:.3f}; worst case "
            f"{mean['worst_case']} ranks {mean['worst_case_review_rank']} of {mean['cases']} by score"
        )
    return "\n".join(out)


def record_metrics(bundle_path: Path, report: dict, name: str = "validation") -> None:
    """Store the mean results (and the command that measured them) in a bundle folder's model.json,
    as metrics[name]; "validation" is the run with the default settings, whose time the panel shows."""
    model_file = bundle_path / "model.json"
    if not model_file.is_file():
        raise ModelError(f"--record needs a bundle folder with model.json; {bundle_path} is not one")
    meta = json.loads(model_file.read_text())
    mean = report["mean"]
    meta["metrics"] = {
        **meta.get("metrics", {}),
        name: {
            "cases": mean["cases"],
            "settings": report["settings"],
            "mean_foreground_dice": mean["mean_foreground_dice"],
            "dice": dict(zip(report["classes"], mean["dice"])),
            "hd95_mm": dict(zip(report["classes"], mean["hd95_mm"])),
            "uncertainty_auroc": mean["uncertainty_auroc"],
            "seconds_per_case": mean["seconds_per_case"],
            "device": report["device"],
            "command": report["command"],
        }
    }
    if name == "validation":  # the measured time per case on this device kind is the panel's expected time
        kind = "gpu" if report["device"].startswith("cuda") else "cpu"
        seconds = max(round(mean["seconds_per_case"], 1), 0.1)  # in tenths, and above 0 as model.json requires
        meta["expected_seconds"] = {**meta.get("expected_seconds", {}), kind: seconds}
    write_text(model_file, json.dumps(meta, indent=2) + "\n")
