"""Cohort seconds: a folder of cases through `diffseg segment`, side by side with a baseline commit, and
reading ahead / writing behind the network on and off. See docs/results.md, section 8 ("Cohorts").

    python benchmarks/bench_cohort.py                          # 60 hippocampus cases, 3 pairs, 4 CHAOS cases
    python benchmarks/bench_cohort.py --cases 20 --pairs 1 --chaos 2

1. Whole process, as a user runs it: the baseline tree (`git archive` of --baseline, run from its own
   folder) and this tree take turns (A B A B ...) on the same folder, each into a fresh output folder.
2. In one process, the overlap of reading and writing with the network on and off (in turns), on the
   hippocampus folder with the bundled model and on CHAOS MR volumes (256x256x~37) with a small
   randomly initialised network (speed does not depend on the weights).
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


def baseline_tree(revision: str, into: Path) -> Path:
    """DiffSegCore as it was at `revision` (read from git, nothing in this checkout changes)."""
    archive = subprocess.run(["git", "archive", revision, "DiffSegCore"], cwd=REPO, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def whole_process(tree: Path, folder: Path, out: Path) -> dict:
    """`python -m DiffSegCore segment FOLDER` run from `tree`: wall and CPU seconds, per-stage sums of the run records."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "DiffSegCore",
            "segment",
            str(folder),
            "--model",
            str(BUNDLED),
            "--output-dir",
            str(out),
            "--progress",
            "none",
        ],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        check=True,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stages: dict[str, float] = {}
    for record in out.glob("*_run.json"):
        for stage, seconds in json.loads(record.read_text())["timings_s"].items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "stages_s": stages}


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
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs of whole-process runs")
    parser.add_argument("--chaos", type=int, default=4, help="CHAOS cases for the overlap measurement (0: none)")
    parser.add_argument("--overlap-cases", type=int, default=60, help="hippocampus cases for the overlap measurement")
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with")
    args = parser.parse_args()
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        work = Path(tmp)
        folder = linked_folder(HIPPOCAMPUS_DIR / "imagesTr", args.cases, work / "hippocampus")
        trees = {"baseline": baseline_tree(args.baseline, work / "baseline"), "this tree": REPO}
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for pair in range(args.pairs):
            for name, tree in trees.items():
                runs[name].append(whole_process(tree, folder, work / f"out-{name.replace(' ', '-')}-{pair}"))
                print(name, pair, json.dumps(runs[name][-1]), flush=True)
        whole = {
            name: {
                "wall_s": statistics.median(r["wall_s"] for r in rs),
                "cpu_s": statistics.median(r["cpu_s"] for r in rs),
                "seconds_per_case": statistics.median(r["wall_s"] for r in rs) / args.cases,
                "stages_s": {s: statistics.median(r["stages_s"][s] for r in rs) for s in rs[0]["stages_s"]},
                "runs_wall_s": [round(r["wall_s"], 2) for r in rs],
            }
            for name, rs in runs.items()
        }
        few = linked_folder(HIPPOCAMPUS_DIR / "imagesTr", args.overlap_cases, work / "hippocampus-overlap")
        overlap = {"hippocampus": overlap_pairs(BUNDLED, few, args.pairs, work)}
        if args.chaos:
            chaos = linked_folder(CHAOS_DIR / "imagesTr", args.chaos, work / "chaos")
            overlap["chaos"] = overlap_pairs(chaos_bundle(work / "chaos-bundle"), chaos, args.pairs, work)
    result = {
        "machine": machine_info(),
        "load_average": {"start": load_start, "end": load_average()},
        "baseline": args.baseline,
        "cases": args.cases,
        "whole_process": whole,
        "overlap_in_process": overlap,
    }
    tag = machine_tag()
    (RESULTS / f"cohort_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Cohort seconds ({result['machine']['cpu']}, {result['machine']['cpu_cores']} cores, "
        f"GPU: {result['machine']['gpu'] or 'none'})",
        "",
        f"`python benchmarks/bench_cohort.py --cases {args.cases} --pairs {args.pairs} --chaos {args.chaos} "
        f"--overlap-cases {args.overlap_cases}`; "
        f"load average {load_start} at the start, {result['load_average']['end']} at the end.",
        "",
        "| tree | wall s (median) | s / case | CPU s | sum of sample s | sum of load s | sum of write s | runs (wall s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, w in whole.items():
        st = w["stages_s"]
        lines.append(
            f"| {name} | {w['wall_s']:.2f} | {w['seconds_per_case']:.3f} | {w['cpu_s']:.2f} | {st.get('sample', 0):.2f} "
            f"| {st.get('load', 0):.2f} | {st.get('write', 0):.2f} | {w['runs_wall_s']} |"
        )
    lines += ["", "| folder | cases | overlap s | one after another s | ratio |", "|---|---|---|---|---|"]
    for name, o in overlap.items():
        ratio = o["overlap"] / o["one after another"]
        lines.append(f"| {name} | {o['cases']} | {o['overlap']:.2f} | {o['one after another']:.2f} | {ratio:.2f} |")
    (RESULTS / f"cohort_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
