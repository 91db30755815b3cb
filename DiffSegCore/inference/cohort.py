"""A run over many cases: complete cases skipped, bad cases reported and skipped, the next case read and the
previous one written while the network samples (where that pays), and one cohort table (CSV) of every case.

Resuming: a case whose outputs are all in the output folder, with a run record of the same model and
settings, is complete and is skipped (unless `overwrite`); outputs of another model, other settings or a
cut-short run are never replaced without `overwrite`: that case fails and the run goes on.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from DiffSegCore.errors import InputError, one_line
from DiffSegCore.inference.pipeline import (
    OutputOptions,
    output_targets,
    read_case,
    sample_case,
    write_case,
)
from DiffSegCore.inference.plan import resolve_device
from DiffSegCore.inference.ranks import Distributed
from DiffSegCore.io.atomic import remove_orphans, write_text
from DiffSegCore.io.cases import channel_mismatch
from DiffSegCore.models.bundle import ModelBundle
from DiffSegCore.progress import RunProgress
from DiffSegCore.settings import RunSettings

COHORT_TABLE = "cohort.csv"
SEGMENTED, COMPLETE, FAILED = "segmented", "complete", "failed"  # a case's status in the table
QUIET = RunProgress("none")  # for work done in the background, whose stages would name the wrong case


@dataclass
class CaseOutcome:
    """What happened to one case: its status, its outputs (key -> path), the settings it ran with, or why it failed."""

    name: str
    status: str
    outputs: dict[str, str] = field(default_factory=dict)
    settings: dict | None = None
    message: str = ""
    rank: int = 0  # the torchrun rank that ran (or skipped) it
    error: Exception | None = field(default=None, repr=False)  # what made it fail, in the process it ran in


def check_output_folder(inputs: list[str | Path], output_dir: Path) -> None:
    """Refuse an output folder that is one of the input folders: its outputs would be read as cases next time."""
    for item in map(Path, inputs):
        if item.is_dir() and item.resolve() == output_dir.resolve():
            raise InputError(
                f"--output-dir {output_dir} is the input folder {item}: outputs written there would be read as "
                "new cases by the next run; choose another --output-dir"
            )


def _same_run(record: dict, bundle: ModelBundle, settings: RunSettings) -> bool:
    """Whether a run record is of this model and these settings (the device it ran on aside)."""
    model = record.get("model", {})
    ran = {k: v for k, v in record.get("settings", {}).items() if k != "device"}
    wanted = {k: v for k, v in settings.to_json().items() if k != "device"}
    return (model.get("id"), model.get("version")) == (bundle.meta["id"], bundle.meta["version"]) and ran == wanted


def refusal(name: str, paths: list[Path], targets: dict[str, Path], inputs: set[Path], meta: dict) -> str:
    """Why a case cannot be segmented at all ('' when it can): an output would replace an input, or the
    case has the wrong number of channel files."""
    clash = next((p for p in targets.values() if p.resolve() in inputs), None)
    if clash is not None:
        return f"output {clash} would replace an input; choose another --output-dir"
    return channel_mismatch(name, paths, meta)


def earlier_outcome(
    name: str, targets: dict[str, Path], bundle: ModelBundle, settings: RunSettings
) -> CaseOutcome | None:
    """The outcome of a case whose outputs exist: complete (same model and settings: skipped) or, for outputs
    of another model, other settings or an unfinished run, failed; None when no output exists."""
    existing = [p for p in targets.values() if p.exists()]
    if not existing:
        return None
    try:
        record = json.loads(targets["run"].read_text())
    except (OSError, ValueError):
        record = None
    if len(existing) == len(targets) and isinstance(record, dict) and _same_run(record, bundle, settings):
        return CaseOutcome(name, COMPLETE, {k: str(p) for k, p in targets.items()}, record["settings"])
    return CaseOutcome(
        name,
        FAILED,
        message=f"{existing[0]} already exists from another model, other settings or an unfinished run; "
        "pass --overwrite to replace it or choose another --output-dir",
    )


def input_files(cases: dict[str, list[Path]]) -> set[Path]:
    """Every input file of `cases`, resolved: no output may replace one."""
    return {p.resolve() for paths in cases.values() for p in paths}


def overlap_pays(settings: RunSettings) -> bool:
    """Whether reading and writing beside the network can go faster: when the network runs on a GPU, or when
    torch leaves CPU cores idle. On a CPU whose cores torch already fills (the 2-core benchmark machine), the
    threads compete with the network: 0.90x to 1.32x the time over six measured pairs (docs/results.md, 8)."""
    return resolve_device(settings.device).type == "cuda" or torch.get_num_threads() < (os.cpu_count() or 1)


def segment_cases(
    bundle: ModelBundle,
    cases: dict[str, list[Path]],
    output_dir: Path,
    settings: RunSettings,
    options: OutputOptions,
    progress: RunProgress,
    overlap: bool | None = None,
    on_failure: Callable[[str, Exception], None] | None = None,
    on_outcome: Callable[[CaseOutcome], None] | None = None,
    inputs: set[Path] | None = None,
) -> list[CaseOutcome]:
    """Segment `cases` (name -> channel files) into `output_dir`, one outcome per case in the same order.

    A case that fails (unreadable file, wrong channel count, full disk, ...) is reported through
    `on_failure` (name, error) and skipped; KeyboardInterrupt ends the run. `on_outcome` hears of each case as soon
    as it is settled (segmented, complete or failed). `inputs`: every input file of the whole run (`input_files`),
    when `cases` are one rank's or worker's share of it; no output replaces one. With `overlap`, the next case is read
    and the previous one written in background threads while the network samples the current one
    (default: where it pays, see `overlap_pays`).
    """
    overlap = overlap_pays(settings) if overlap is None else overlap
    inputs = input_files(cases) if inputs is None else inputs
    remove_orphans(output_dir, ".*.")  # staging of runs killed with -9: one sweep per run, not one per case
    outcomes: dict[str, CaseOutcome] = {}

    def settled(outcome: CaseOutcome) -> None:
        outcomes[outcome.name] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    def failed(name: str, exc: Exception) -> None:
        if on_failure is not None:
            on_failure(name, exc)
        settled(CaseOutcome(name, FAILED, message=one_line(exc), error=exc))

    todo: list[str] = []
    for name, paths in cases.items():
        targets = output_targets(name, output_dir, settings, options)
        refused = refusal(name, paths, targets, inputs, bundle.meta)
        earlier = None if refused or options.overwrite else earlier_outcome(name, targets, bundle, settings)
        if refused or (earlier is not None and earlier.status == FAILED):
            failed(name, InputError(refused or earlier.message))
        elif earlier is not None:
            settled(earlier)
            progress.result(f"{name}: complete from an earlier run, skipped")
        else:
            todo.append(name)

    def settle(name: str, writing: Future) -> None:
        try:
            targets, ran = writing.result()
        except Exception as exc:
            failed(name, exc)
            return
        for key, path in targets.items():  # every file written, not only the segmentation
            progress.result(f"{name} {key}: {path}")
        settled(CaseOutcome(name, SEGMENTED, {k: str(p) for k, p in targets.items()}, ran))

    def write(name: str, sampled) -> tuple[dict[str, Path], dict]:
        return write_case(bundle, cases[name], name, output_dir, sampled, options, QUIET), sampled.settings.to_json()

    with ThreadPoolExecutor(1, "diffseg-read") as reader, ThreadPoolExecutor(1, "diffseg-write") as writer:

        def read(index: int) -> Future | None:
            if index >= len(todo):
                return None
            future = reader.submit(read_case, bundle, cases[todo[index]], settings, QUIET)
            if not overlap:
                future.exception()  # wait: no overlap with the network
            return future

        ahead, writing = read(0), None
        position = {name: i for i, name in enumerate(cases)}
        for index, name in enumerate(todo):
            progress.start_case(position[name], name)
            progress.report("load", f"reading {name}")
            try:
                prepared = ahead.result()
                progress.report("preprocess", f"{name} read and resampled")
            except Exception as exc:
                prepared = None
                failed(name, exc)
            ahead = read(index + 1)
            sampled = None
            if prepared is not None:
                for warning in prepared.warnings:
                    progress.note(f"warning: {warning}")
                try:
                    sampled = sample_case(bundle, prepared, settings, progress, options.save_members)
                except Exception as exc:
                    failed(name, exc)
            if writing is not None:
                settle(*writing)
            if sampled is not None:
                progress.report("write", "writing outputs")
                writing = (name, writer.submit(write, name, sampled))
                if not overlap:
                    settle(*writing)
                    writing = None
            else:
                writing = None
        if writing is not None:
            settle(*writing)
    return [outcomes[name] for name in cases]


def gather_outcomes(group: Distributed, mine: list[CaseOutcome]) -> list[CaseOutcome]:
    """Every rank's outcomes, sorted by case name; this rank's keep their errors (others' arrive without)."""
    mine = [replace(o, rank=group.rank) for o in mine]
    local = {o.name: o for o in mine}
    parts = group.gather([replace(o, error=None) for o in mine])  # errors may not pickle
    return sorted((local.get(o.name, o) for part in parts for o in part), key=lambda o: o.name)


def _flatten(prefix: str, value, into: dict) -> None:
    """Nested figures (dicts, lists of numbers) as flat columns named prefix_key_..."""
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}_{key}", item, into)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _flatten(f"{prefix}_{i}", item, into)
    elif isinstance(value, int | float | str | bool) or value is None:
        into[prefix] = value


def cohort_row(outcome: CaseOutcome) -> dict:
    """One case's row: status, seconds per stage, volume per class (mL), review figures when the record has them."""
    row: dict = {"case": outcome.name, "status": outcome.status}
    run_json = outcome.outputs.get("run")
    record = json.loads(Path(run_json).read_text()) if run_json else {}
    timings = record.get("timings_s", {})
    if timings:
        row["seconds"] = round(sum(timings.values()), 3)
        row.update({f"{stage}_s": seconds for stage, seconds in timings.items()})
    for name, ml in record.get("summary", {}).get("volume_ml", {}).items():
        row[f"volume_ml {name}"] = ml
    if "mean_uncertainty" in record.get("summary", {}):
        row["mean_uncertainty"] = float(f"{record['summary']['mean_uncertainty']:.4g}")
    if "review" in record:  # per-segment review figures, when the run record carries them
        _flatten("review", record["review"], row)
    row["rank"] = outcome.rank
    row["message"] = outcome.message
    return row


def write_cohort_table(path: Path, outcomes: list[CaseOutcome]) -> Path:
    """The cohort table: one row per case (sorted by name), columns in first-seen order; written atomically."""
    rows = [cohort_row(o) for o in sorted(outcomes, key=lambda o: o.name)]
    columns = [*dict.fromkeys(key for row in rows for key in row if key != "message"), "message"]
    text = io.StringIO()
    table = csv.DictWriter(text, columns, lineterminator="\n")
    table.writeheader()
    table.writerows(rows)
    return write_text(path, text.getvalue())
