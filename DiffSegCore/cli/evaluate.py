"""`diffseg evaluate`: a model's Dice, HD95, time and uncertainty quality on labelled cases."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from DiffSegCore import settings
from DiffSegCore.cli.records import command_line, write_json
from DiffSegCore.errors import InputError

SAMPLER_OPTIONS = ("steps", "ensemble", "sampler", "eta", "preseg", "preseg_step", "foreground_threshold", "seed", "device")


def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="Dice, HD95, time and uncertainty quality of a model on labelled cases")
    p.add_argument("--model", required=True, help="bundle path or registry id")
    p.add_argument("--images", required=True, help="folder of images (nnU-Net `_0000` channels grouped by case)")
    p.add_argument("--labels", required=True, help="folder of label files named like the cases")
    p.add_argument(
        "--split", help="a run's split.json, or 'model' for the cases the model held out: evaluate those only"
    )
    p.add_argument("--cases", nargs="+", help="evaluate only these case names (with --split: those of the split)")
    settings.add_arguments(p, SAMPLER_OPTIONS)
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--json", dest="json_out", help="write per-case and mean results to this JSON file")
    p.add_argument(
        "--record",
        nargs="?",
        const="validation",
        metavar="NAME",
        help="store the mean results in the bundle's model.json as metrics.NAME (default: validation, "
        "meant for the default settings)",
    )
    p.set_defaults(func=run_evaluate, parser=p)


def _validation_cases(split: str, model: str) -> set[str]:
    """The validation cases of a split.json, or with `model` those the bundle's metadata says it held out."""
    if split == "model":
        from DiffSegCore.models.metadata import held_out_cases, read_meta
        from DiffSegCore.models.registry import resolve_model

        meta = read_meta(resolve_model(model))
        if held_out := held_out_cases(meta):
            return set(held_out)
        if "validated_recipe" in meta.get("training", {}):  # trained on every case: its split run's cases are its training cases
            raise InputError(
                f"model {model} was trained on every development case and holds none out (its validation figures "
                "are its split run's, model.json training.validated_recipe); evaluate it on cases it never saw"
            )
        raise InputError(f"model {model} records no validation cases; pass a run's split.json to --split")
    try:
        return set(json.loads(Path(split).read_text())["validation"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read validation cases from {split} ({exc}); pass a run's split.json or 'model'") from exc


def selected_cases(args: argparse.Namespace) -> set[str] | None:
    """The case names to evaluate: --cases, the --split's validation cases, or both (then --cases must be in it)."""
    if not args.split:
        return set(args.cases) if args.cases else None
    held_out = _validation_cases(args.split, args.model)
    if not args.cases:
        return held_out
    outside = sorted(set(args.cases) - held_out)
    if outside:
        raise InputError(f"--cases {' '.join(outside[:3])} are not validation cases of --split {args.split}; drop them")
    return set(args.cases)


def run_evaluate(args: argparse.Namespace) -> int:
    from DiffSegCore.evaluation.report import evaluate, format_table, record_metrics
    from DiffSegCore.inference.pipeline import open_model
    from DiffSegCore.inference.ranks import RANK_TIMEOUT, leave_group, setup_distributed
    from DiffSegCore.progress import RunProgress

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.preseg not in (None, *settings.PRESEG_SOURCES):
        raise InputError("evaluate takes --preseg none or model (one label file cannot fit every case)")
    only = selected_cases(args)
    chosen = settings.chosen_from_args(args)
    group = setup_distributed(chosen.get("device", "auto"), timeout=RANK_TIMEOUT)  # one rank without torchrun
    try:
        bundle, run_settings = open_model(args.model, chosen, RunProgress("none"))
        report = evaluate(bundle, run_settings, Path(args.images), Path(args.labels), only, group)
    finally:
        leave_group()
    if not group.main:  # rank 0 prints and writes the merged report
        return 0
    report["command"] = command_line(args)
    print(format_table(report))
    if args.json_out:
        write_json(Path(args.json_out), report)
    if args.record:
        record_metrics(Path(args.model), report, args.record)
        print(f"metrics recorded in {Path(args.model) / 'model.json'}")
    return 0
