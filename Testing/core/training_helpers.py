"""Helpers for the training tests: a small real dataset and the `train`/`evaluate` commands in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from DiffSegCore.cli.main import build_parser

CARD = Path(__file__).resolve().parents[2] / "docs" / "model_cards" / "hippocampus.json"
CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]
# Tiny networks and patches so a few training steps take seconds on a shared CPU.
FAST = ["--widths", "8", "16", "--patch-size", "16", "24", "16", "--batch", "1", "--threads", "1"]


def run_training_command(*args) -> int:
    """Parse `diffseg train|evaluate ...` with the real `diffseg` parser; run it, letting errors raise."""
    torch.set_num_threads(1)
    parsed = build_parser().parse_args([str(a) for a in args])
    return parsed.func(parsed)


def copy_cases(source: Path, target: Path, names: list[str] = CASES) -> Path:
    """An MSD-layout folder (imagesTr, labelsTr, dataset.json) holding copies of real cases."""
    for folder in ("imagesTr", "labelsTr"):
        (target / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(source / folder / f"{name}.nii.gz", target / folder / f"{name}.nii.gz")
    meta = json.loads((source / "dataset.json").read_text())
    meta["training"] = [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names]
    (target / "dataset.json").write_text(json.dumps(meta))
    return target
