"""`diffseg segment`: volumes in, segmentation, uncertainty and a run record out, per case."""

from __future__ import annotations

import argparse
import os
import traceback
from pathlib import Path

from DiffSegCore import settings
from DiffSegCore.errors import CasesFailed, InputError, one_line
from DiffSegCore.events import NOTE
from DiffSegCore.io.cases import channel_mismatch, collect_cases
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
    p.add_argument("--output-dir", type=Path, help="where the outputs go (required unless --dry-run)")
    p.add_argument("--save-probabilities", action="store_true", help="also write mean class probabilities and entropy")
    p.add_argument("--save-members", action="store_true", help="also write each member's label map")
    p.add_argument("--preview", action="store_true", help="also write a PNG montage of the result")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs of the same case")
    p.add_argument("--progress", default="text", choices=["text", "json", "none"])
    p.add_argument("--workers", type=settings.workers_value, default=None, metavar="auto|N", help=settings.WORKERS_HELP)
    p.add_argument(settings.THREADS.flag, type=int, help=settings.THREADS.help)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print each case's plan, memory estimate and expected time; sample nothing, write nothing",
    )
    p.set_defaults(func=run_segment)


def _output_folder(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot create output folder {folder} ({exc.strerror}); choose another --output-dir"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"output folder {folder} is not writable; choose another --output-dir")
    return folder


def run_segment(args: argparse.Namespace) -> int:
    # torch-heavy modules load here so that the other commands start fast.
    from DiffSegCore.inference.cohort import (
        COHORT_TABLE,
        COMPLETE,
        FAILED,
        check_output_folder,
        gather_outcomes,
        input_files,
        write_cohort_table,
    )
    from DiffSegCore.inference.pipeline import OutputOptions, open_model
    from DiffSegCore.inference.plan import resolve_device
    from DiffSegCore.inference.ranks import RANK_TIMEOUT, leave_group, setup_distributed
    from DiffSegCore.inference.workers import physical_cores, segment_in_workers, workers_that_fit_case

    if args.output_dir is None and not args.dry_run:
        raise InputError("diffseg segment needs --output-dir (or --dry-run to see the plan only)")
    cases = collect_cases(args.inputs)
    chosen = settings.chosen_from_args(args)
    threads = settings.THREADS.check(args.threads)
    if args.dry_run:
        progress = RunProgress(args.progress, len(cases))
        bundle, run_settings = open_model(args.model, chosen, progress)
        return _dry_run(bundle, cases, run_settings, progress)
    output_dir = _output_folder(args.output_dir)
    check_output_folder(args.inputs, output_dir)
    group = setup_distributed(chosen.get("device", "auto"), timeout=RANK_TIMEOUT)  # one rank without torchrun
    try:
        share = dict(group.share(list(cases.items())))
        progress = RunProgress(args.progress if group.main else "none", len(share))
        bundle, run_settings = open_model(args.model, chosen, progress)
        options = OutputOptions(args.save_probabilities, args.save_members, args.preview, args.overwrite)

        def on_failure(name: str, exc: Exception) -> None:
            if args.debug:
                traceback.print_exception(exc)
            if len(cases) > 1:
                progress.note(f"{name} failed and was skipped: {one_line(exc)}")

        device = resolve_device(run_settings.device).type
        cores = max(1, physical_cores() // group.local_world)  # torchrun ranks on this machine share its cores
        fit = None
        if args.workers is None and device == "cpu" and len(share) > 1:  # the first case stands for the folder
            fit = workers_that_fit_case(bundle, next(iter(share.values())), run_settings, cores)
        workers, threads = settings.worker_plan(args.workers, threads, device, len(share), cores, fit)
        mine = segment_in_workers(
            bundle, share, output_dir, run_settings, options, progress, workers, threads, on_failure, args.debug,
            inputs=input_files(cases),  # every rank's: an output of this rank's case may not replace another's input
        )  # fmt: skip
        outcomes = gather_outcomes(group, mine)
    finally:
        leave_group()
    failed = [o for o in outcomes if o.status == FAILED]
    if len(cases) == 1 and failed:
        if failed[0].error is not None:  # the rank that ran the only case: its own error, as a single run gives
            raise failed[0].error
        return InputError.exit_code
    if not group.main:
        return CasesFailed.exit_code if failed else 0
    if len(cases) > 1:
        table = write_cohort_table(output_dir / COHORT_TABLE, outcomes)
        progress.result(f"cohort table: {table}")
    done = [o for o in outcomes if o.status != FAILED]
    earlier = sum(o.status == COMPLETE for o in done)
    message = f"{len(done) - earlier} case(s) segmented" + (
        f", {earlier} complete from an earlier run" if earlier else ""
    )
    progress.finish({o.name: o.outputs for o in done}, {o.name: o.settings for o in done}, message)
    if failed:
        raise CasesFailed(
            f"{len(failed)} of {len(cases)} case(s) failed and were skipped, the first {failed[0].name}: "
            f"{failed[0].message}; {COHORT_TABLE} in {output_dir} gives every case's reason"
        )
    return 0


def _dry_run(bundle, cases: dict[str, list[Path]], run_settings: settings.RunSettings, progress: RunProgress) -> int:
    """Print each case's plan, estimated peak memory and expected sampling time (`--dry-run`)."""
    from DiffSegCore.inference.pipeline import plan_case

    for name, paths in cases.items():
        mismatch = channel_mismatch(name, paths, bundle.meta)
        if mismatch:
            raise InputError(mismatch)
        shape, plan = plan_case(bundle, paths, run_settings)
        estimate = plan.estimate
        line = (
            f"{name}: {'x'.join(map(str, reversed(shape)))} voxels on the model's grid; plan: {plan.describe()}; "
            f"memory: about {estimate.peak_bytes / 2**30:.2f} GiB peak (the run may use {plan.budget_bytes / 2**30:.2f}"
            f" GiB); expected sampling time: about {estimate.seconds:.1f} s "
            f"({run_settings.ensemble} member(s) x {run_settings.steps} step(s))"
        )
        if progress.mode == "json":
            progress.report(NOTE, line, dry_run={"case": name, "shape_zyx": list(shape), **plan.to_json()})
        else:
            print(line)
    progress.finish({}, {name: run_settings.to_json() for name in cases}, f"dry run: {len(cases)} case(s) planned")
    return 0
