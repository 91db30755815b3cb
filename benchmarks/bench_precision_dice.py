"""Validation Dice of the bundled recipe (its split run) in float32 and in bf16: does bf16 arithmetic change the segmentations?

Runs DiffSegCore.evaluation.report.evaluate (what `diffseg evaluate` runs) on the cases the split run
(benchlib.SPLIT_MODEL) held out, once per --precision, on the CPU with one thread, and prints each mean Dice and the difference.
bf16 stays the CPU default (--precision auto) only while every class moves by less than 0.002.

    python benchmarks/bench_precision_dice.py [--images DIR --labels DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from benchlib import HIPPOCAMPUS_DIR, RESULTS, SPLIT_MODEL, machine_info, machine_tag

from DiffSegCore.cli.evaluate import _validation_cases
from DiffSegCore.evaluation.report import evaluate
from DiffSegCore.inference.pipeline import open_model
from DiffSegCore.networks.precision import cpu_has_native_bf16
from DiffSegCore.progress import RunProgress

TOLERANCE = 0.002  # largest accepted change of a class's mean validation Dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(HIPPOCAMPUS_DIR / "imagesTr"))
    parser.add_argument("--labels", default=str(HIPPOCAMPUS_DIR / "labelsTr"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = _validation_cases("model", str(SPLIT_MODEL))
    reports = {}
    for precision in ("float32", "bf16"):
        bundle, settings = open_model(str(SPLIT_MODEL), {"device": "cpu", "precision": precision}, RunProgress("none"))
        reports[precision] = evaluate(bundle, settings, Path(args.images), Path(args.labels), cases)
    dice = {p: r["mean"]["dice"] for p, r in reports.items()}
    change = [abs(a - b) for a, b in zip(dice["float32"], dice["bf16"])]
    seconds = {p: sum(c["seconds"] for c in r["cases"]) for p, r in reports.items()}
    result = {
        "command": "python benchmarks/bench_precision_dice.py",
        "machine": {**machine_info(), "native_bf16": cpu_has_native_bf16()},
        "cases": len(cases),
        "classes": reports["float32"]["classes"],
        "mean_dice": dice,
        "mean_foreground_dice": {p: r["mean"]["mean_foreground_dice"] for p, r in reports.items()},
        "abs_change_per_class": change,
        "tolerance": TOLERANCE,
        "bf16_within_tolerance": max(change) < TOLERANCE,
        "sampling_seconds": seconds,
    }
    (RESULTS / f"precision_dice_{machine_tag()}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
