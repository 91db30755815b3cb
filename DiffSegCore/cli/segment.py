"""`diffseg segment`: volumes in, segmentation, uncertainty and a run record out, per case."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from DiffSegCore import settings
from DiffSegCore.errors import InputError
from DiffSegCore.io.cases import collect_cases
from DiffSegCore.progress import RunProgress


def add_segment_parser(subparsers) -> None:
    p = subparsers.add_parser("segment", help="segment volumes; writes segmentation, uncertainty and a run record")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="volume files (one per channel), folders of volumes, or DICOM folders",
    )
    p.add_argument(
        "--model",
        default=settings.DEFAULT_MODEL,
        help=f"bundle folder/.zip or registry id[@version] (default {settings.DEFAULT_MODEL})",
    )
    settings.add_arguments(p)
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--save-probabilities", action="store_true", help="also write mean class probabilities and entropy")
    p.add_argument("--save-members", action="store_true", help="also write each member's label map")
    p.add_argument("--preview", action="store_true", help="also write a PNG montage of the result")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs of the same case")
    p.add_argument("--progress", default="text", choices=["text", "json", "none"])
    p.set_defaults(func=run_segment)


def _output_folder(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {folder} ({exc.strerror}); choose another --output-dir") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"output folder {folder} is not writable; choose another --output-dir")
    return folder


def run_segment(args: argparse.Namespace) -> int:
    # torch-heavy modules load here so that the other commands start fast.
    from DiffSegCore.inference.pipeline import OutputOptions, open_model, segment_case

    cases = collect_cases(args.inputs)
    progress = RunProgress(args.progress, len(cases))
    output_dir = _output_folder(args.output_dir)
    bundle, run_settings = open_model(args.model, settings.chosen_from_args(args), progress)
    expected = len(bundle.meta["channels"])
    options = OutputOptions(args.save_probabilities, args.save_members, args.preview, args.overwrite)
    written, ran = {}, {}
    for index, (name, paths) in enumerate(cases.items()):
        if len(paths) != expected:
            raise InputError(
                f"case {name} has {len(paths)} channel file(s) but model {bundle.meta['id']} needs {expected}; "
                "name channel files <case>_0000, <case>_0001, ..."
            )
        progress.start_case(index, name)
        outputs, case_settings = segment_case(bundle, paths, name, output_dir, run_settings, options, progress)
        written[name] = {key: str(path) for key, path in outputs.items()}
        ran[name] = case_settings.to_json()
        for key, path in outputs.items():  # every file written, not only the segmentation
            progress.result(f"{name} {key}: {path}")
    progress.finish(written, ran, f"{len(cases)} case(s) segmented")
    return 0
