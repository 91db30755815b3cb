"""Cohort seconds: a folder of cases through `diffseg segment`, the baseline commit, main and this tree side by side,
and in one process, worker processes started by fork against spawn. See docs/results.md, section 8 ("Cohorts").

    python benchmarks/bench_cohort.py                          # 60 hippocampus cases, 3 rounds, the bundled model
    python benchmarks/bench_cohort.py --model PATH --cases 20 --rounds 1
    python benchmarks/bench_cohort.py --overlap-cases 20 --chaos 2    # also reading/writing overlap on and off

1. Whole process, as a user runs it, at the model's default settings: the baseline commit and main (each a
   `git archive` of DiffSegCore and Resources, run from its own folder), this tree with one worker and this tree
   as it runs by default (`--workers auto`) take turns (A B C D, A B C D, ...) on the same folder, each into a fresh
   output folder. Every tree runs the same --model; a tree that cannot run it is recorded as failed.
2. In one process (the model loaded once), the folder through worker processes started by fork and by spawn, and
   forked workers reading and writing beside the network, in turns.
3. Optionally, reading ahead / writing behind the network on and off, on the hippocampus folder and on CHAOS MR
   volumes (256x256x~37) with a small randomly initialised network (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from benchlib import HIPPOCAMPUS_DIR, REPO, RESULTS, load_average, machine_info, machine_tag

from DiffSegCore.inference.cohort import segment_cases
from DiffSegCore.inference.pipeline import OutputOptions, open_model
from DiffSegCore.inference.workers import physical_cores, segment_in_workers
from DiffSegCore.io.cases import collect_cases, volume_files
from DiffSegCore.models.bundle import network_config, save_bundle
from DiffSegCore.networks.unet import build_network
from DiffSegCore.progress import RunProgress

CHAOS_DIR = HIPPOCAMPUS_DIR.parent / "chaos"  # beside the hippocampus data (DIFFSEG_STUDY_DATA)
BUNDLED = REPO / "Resources" / "Models" / "hippocampus"
BASELINE = "209a377"  # main before issue 16: every command imported torch and MONAI; one case after another


def linked_folder(source: Path, count: int, into: Path) -> Path:
    """The first `count` volumes of `source`, as symbolic links in a new folder."""
    into.mkdir(parents=True)
    for path in volume_files(source)[:count]:
        (into / path.name).symlink_to(path)
    return into


def archived_tree(revision: str, into: Path) -> Path:
    """DiffSegCore and Resources as they were at `revision` (read from git, nothing in this checkout changes)."""
    archive = subprocess.run(
        ["git", "archive", revision, "DiffSegCore", "Resources"], cwd=REPO, capture_output=True, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def revision_of(ref: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


def whole_process(tree: Path, folder: Path, out: Path, model: Path, flags: list[str]) -> dict:
    """`python -m DiffSegCore segment FOLDER` run from `tree`: wall and CPU seconds, per-stage sums of the run records."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    command = [sys.executable, "-m", "DiffSegCore", "segment", str(folder), "--model", str(model),
               "--output-dir", str(out), "--progress", "none", *flags]  # fmt: skip
    done = subprocess.run(command, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        return {"failed": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    stages: dict[str, float] = {}
    for record in out.glob("*_run.json"):
        for stage, seconds in json.loads(record.read_text())["timings_s"].items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "stages_s": stages}


def summary(runs: list[dict], cases: int) -> dict:
    """Medians over the rounds of one variant (or why it failed)."""
    ok = [r for r in runs if "failed" not in r]
    if not ok:
        return {"failed": runs[0]["failed"]}
    wall = statistics.median(r["wall_s"] for r in ok)
    return {
        "wall_s": wall,
        "cpu_s": statistics.median(r["cpu_s"] for r in ok),
        "seconds_per_case": wall / cases,
        "stages_s": {s: statistics.median(r["stages_s"].get(s, 0.0) for r in ok) for s in ok[0]["stages_s"]},
        "runs_wall_s": [round(r["wall_s"], 2) for r in ok],
    }


def in_workers(model: Path, folder: Path, rounds: int, work: Path) -> dict:
    """Seconds for the folder through one worker per core (at least 2; one thread each), in one process with the model
    loaded once, in turns: forked and spawned workers; forked workers reading and writing beside the network."""
    bundle, run_settings = open_model(str(model), {}, RunProgress("none"))
    cases, workers = collect_cases([folder]), max(2, physical_cores())
    ways = {"fork": ("fork", None), "spawn": ("spawn", None), "fork, overlap": ("fork", True)}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for index in range(rounds):
        for name, (method, overlap) in ways.items():
            out = work / f"workers-{index}-{method}-{overlap}"
            out.mkdir()
            start = time.perf_counter()
            segment_in_workers(bundle, cases, out, run_settings, OutputOptions(), RunProgress("none"), workers, 1,
                               start_method=method, overlap=overlap)  # fmt: skip
            seconds[name].append(time.perf_counter() - start)
    return {"cases": len(cases), "workers": workers, "median_s": {k: statistics.median(v) for k, v in seconds.items()},
            "runs": seconds}  # fmt: skip


def chaos_bundle(into: Path) -> Path:
    """A 1-channel, 4-class bundle on the images' own grid, the bundled network's widths, random weights."""
    meta = json.loads((BUNDLED / "model.json").read_text())
    meta.update(
        id="chaos-speed",
        spacing=None,
        classes=[
            {"value": v, "name": n, "color": [0.5, 0.5, 0.5]}
            for v, n in enumerate(["liver", "kidney R", "kidney L", "spleen"], 1)
        ],
        network={**meta["network"], "num_classes": 5},
        defaults={**meta.get("defaults", {}), "steps": 1, "ensemble": 1},
    )
    meta.pop("preseg_network", None)
    meta.pop("training_intensity", None)
    torch.manual_seed(0)
    return save_bundle(into, meta, build_network(network_config(meta, "network")).state_dict(), None)


def overlap_pairs(bundle_path: Path, folder: Path, pairs: int, work: Path) -> dict:
    """Seconds for the case loop with overlap on and off, in turns, in this process (the model loaded once)."""
    bundle, run_settings = open_model(str(bundle_path), {}, RunProgress("none"))
    cases = collect_cases([folder])
    seconds: dict[str, list[float]] = {"overlap": [], "one after another": []}
    for pair in range(pairs):
        for name, overlap in (("overlap", True), ("one after another", False)):
            out = work / f"{folder.name}-{pair}-{overlap}"
            out.mkdir()
            start = time.perf_counter()
            segment_cases(bundle, cases, out, run_settings, OutputOptions(), RunProgress("none"), overlap=overlap)
            seconds[name].append(time.perf_counter() - start)
    return {"cases": len(cases), **{k: statistics.median(v) for k, v in seconds.items()}, "runs": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=60, help="hippocampus cases in the folder")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of whole-process runs (each variant once a round)")
    parser.add_argument("--model", type=Path, default=BUNDLED, help="model bundle every tree runs (default: bundled)")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the baseline")
    parser.add_argument("--main", help="git revision of main (default: where this branch left main)")
    parser.add_argument("--worker-rounds", type=int, default=2, help="rounds of fork/spawn/overlap in one process (0: none)")
    parser.add_argument("--overlap-cases", type=int, default=0, help="hippocampus cases for the overlap measurement")
    parser.add_argument("--chaos", type=int, default=0, help="CHAOS cases for the overlap measurement (0: none)")
    parser.add_argument("--name", default="cohort_workers", help="results file name, before the machine tag")
    args = parser.parse_args()
    main_ref = args.main or subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=REPO, capture_output=True,
                                           text=True, check=True).stdout.strip()  # fmt: skip
    revisions = {"baseline": revision_of(args.baseline), "main": revision_of(main_ref), "this tree": revision_of("HEAD")}
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        work = Path(tmp)
        folder = linked_folder(HIPPOCAMPUS_DIR / "imagesTr", args.cases, work / "hippocampus")
        variants = {
            f"baseline {revisions['baseline']}": (archived_tree(revisions["baseline"], work / "baseline"), []),
            f"main {revisions['main']}": (archived_tree(revisions["main"], work / "main"), []),
            "this tree, --workers 1": (REPO, ["--workers", "1"]),
            "this tree (default: --workers auto)": (REPO, []),
        }
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for index in range(args.rounds):
            for number, (name, (tree, flags)) in enumerate(variants.items()):
                out = work / f"out-{index}-{number}"
                runs[name].append(whole_process(tree, folder, out, args.model, flags))
                print(name, index, json.dumps(runs[name][-1]), flush=True)
        whole = {name: summary(rs, args.cases) for name, rs in runs.items()}
        ways = in_workers(args.model, folder, args.worker_rounds, work) if args.worker_rounds else None
        overlap = {}
        if args.overlap_cases:
            few = linked_folder(HIPPOCAMPUS_DIR / "imagesTr", args.overlap_cases, work / "hippocampus-overlap")
            overlap["hippocampus"] = overlap_pairs(args.model, few, args.rounds, work)
        if args.chaos:
            chaos = linked_folder(CHAOS_DIR / "imagesTr", args.chaos, work / "chaos")
            overlap["chaos"] = overlap_pairs(chaos_bundle(work / "chaos-bundle"), chaos, args.rounds, work)
    result = {
        "machine": {**machine_info(), "physical_cores": physical_cores()},
        "load_average": {"start": load_start, "end": load_average()},
        "command": " ".join(["python", "benchmarks/bench_cohort.py", *sys.argv[1:]]),
        "model": str(args.model),
        "revisions": revisions,
        "cases": args.cases,
        "whole_process": whole,
        "in_workers": ways,
        "overlap_in_process": overlap,
    }
    tag = machine_tag()
    (RESULTS / f"{args.name}_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{args.name}_{tag}.md").write_text(report(result) + "\n")
    print(report(result))


def report(result: dict) -> str:
    """The results as markdown tables."""
    machine, whole = result["machine"], result["whole_process"]
    lines = [
        f"# Cohort seconds ({machine['cpu']}, {machine['cpu_cores']} cores, GPU: {machine['gpu'] or 'none'})",
        "",
        f"`{result['command']}`; model {result['model']}; {result['cases']} cases; load average "
        f"{result['load_average']['start']} at the start, {result['load_average']['end']} at the end.",
        "",
        "| run | wall s (median) | s / case | vs baseline | CPU s | sample s (sum over cases) | load s | write s "
        "| runs (wall s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = next(iter(whole.values())).get("wall_s")
    for name, w in whole.items():
        if "failed" in w:
            lines.append(f"| {name} | failed: {w['failed']} | | | | | | | |")
            continue
        st, ratio = w["stages_s"], f"{w['wall_s'] / base:.2f}" if base else "-"
        lines.append(
            f"| {name} | {w['wall_s']:.2f} | {w['seconds_per_case']:.3f} | {ratio} | {w['cpu_s']:.2f} "
            f"| {st.get('sample', 0):.2f} | {st.get('load', 0):.2f} | {st.get('write', 0):.2f} | {w['runs_wall_s']} |"
        )
    if result["in_workers"]:
        ways = result["in_workers"]
        lines += ["", f"In one process (model loaded once), {ways['cases']} cases through {ways['workers']} workers of one "
                  "thread each: " + ", ".join(f"{k} {v:.2f} s" for k, v in ways["median_s"].items())
                  + f" (medians; runs {ways['runs']})."]  # fmt: skip
    if result["overlap_in_process"]:
        lines += ["", "| folder | cases | overlap s | one after another s | ratio |", "|---|---|---|---|---|"]
        for name, o in result["overlap_in_process"].items():
            ratio = o["overlap"] / o["one after another"]
            lines.append(f"| {name} | {o['cases']} | {o['overlap']:.2f} | {o['one after another']:.2f} | {ratio:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
