"""Peak memory and time of `diffseg segment` on a 240x240x155 volume, with and without --max-memory,
against the estimate `diffseg segment --dry-run` prints beforehand.

The volume is a real hippocampus MR case (MSD Task04) stretched to 240x240x155 voxels of 1 mm, the size
of a BraTS brain volume, so the bundled model sees realistic intensities. Each configuration runs the real
command in a fresh process: first the dry run (plan, estimated peak, expected time), then the run; the
measured peak is the process's peak resident memory (ru_maxrss) from the run record. Label agreement with
the first configuration shows what a sliding window changes.

    python benchmarks/bench_memory.py              # writes benchmarks/results/memory_<machine>.json and .md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from benchlib import HIPPOCAMPUS, REPO, RESULTS, gib, load_average, machine_info, machine_tag, markdown_table

SIZE_XYZ = (240, 240, 155)
TOLERANCE = 0.30  # the dry run's estimate must be within 30% of the measured peak
# (name, extra flags, extra environment): DIFFSEG_MEMORY_LIMIT_MB makes the planner see 16 GiB free.
CONFIGURATIONS = [
    ("default", [], {}),
    ("default, 16 GiB free", [], {"DIFFSEG_MEMORY_LIMIT_MB": str(16 * 1024)}),
    ("--max-memory 3", ["--max-memory", "3"], {}),
    ("--max-memory 2", ["--max-memory", "2"], {}),
]
COLUMNS = [
    ("name", "run"),
    ("plan", "plan"),
    ("same_plan", "dry run planned the same"),
    ("dry_estimate_gib", "dry-run estimate GiB"),
    ("run_estimate_gib", "run's own estimate GiB"),
    ("peak_gib", "measured peak GiB"),
    ("ratio", "estimate / peak (dry run's if same plan)"),
    ("expected_s", "dry-run expected sampling s"),
    ("sample_s", "measured sampling s"),
    ("wall_s", "wall s (whole command)"),
    ("agreement", "labels equal to the first run"),
    ("status", "status"),
]


def brain_sized_volume(path: Path) -> Path:
    """A real hippocampus case stretched (trilinear) to 240x240x155 voxels of 1 mm."""
    array = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPOCAMPUS))).astype(np.float32))
    size_zyx = tuple(reversed(SIZE_XYZ))
    stretched = torch.nn.functional.interpolate(array[None, None], size=size_zyx, mode="trilinear", align_corners=True)
    image = sitk.GetImageFromArray(stretched[0, 0].numpy())
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path))
    return path


def diffseg(args: list[str], env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "DiffSegCore", "segment", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, check=False)


def measure(volume: Path, out: Path, flags: list[str], env: dict) -> dict:
    """Dry run, then the run, of one configuration; each in a fresh process."""
    common = [str(volume), "--device", "cpu", *flags]
    dry = diffseg([*common, "--dry-run", "--progress", "json"], env)
    notes = [json.loads(line) for line in dry.stdout.splitlines() if line.startswith("{")]
    planned = next((n["dry_run"] for n in notes if "dry_run" in n), None)
    if planned is None:
        return {"status": f"dry run failed: {(dry.stderr.strip().splitlines() or ['?'])[-1]}"}
    start = time.perf_counter()
    run = diffseg([*common, "--output-dir", str(out), "--progress", "none"], env)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        return {"status": f"run failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}"}
    record = json.loads(next(out.glob("*_run.json")).read_text())
    memory = record["memory"]
    peak = memory["measured_peak_bytes"]
    dry_estimate = planned["estimate"]["estimated_peak_bytes"]
    run_estimate = memory["estimate"]["estimated_peak_bytes"]
    keys = ("members_per_batch", "window", "windows_per_batch")
    # The free memory can change between the dry run and the run (a shared machine), and with it the plan.
    same_plan = all(planned[k] == memory[k] for k in keys)
    within = all(abs(e - peak) <= TOLERANCE * peak for e in ([dry_estimate] if same_plan else []) + [run_estimate])
    return {
        "plan": record["plan"],
        "dry_run": planned,
        "memory": memory,
        "same_plan": same_plan,
        "dry_estimate_gib": gib(dry_estimate),
        "run_estimate_gib": gib(run_estimate),
        "peak_gib": gib(peak),
        "ratio": round((dry_estimate if same_plan else run_estimate) / peak, 3),
        "expected_s": planned["estimate"]["expected_seconds"],
        "sample_s": record["timings_s"]["sample"],
        "wall_s": round(wall, 1),
        "timings_s": record["timings_s"],
        "status": "ok" if within else "estimate off by more than 30%",
    }


def agreement(first: Path, other: Path) -> float:
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(next(first.glob("*_seg.nii.gz")))))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(next(other.glob("*_seg.nii.gz")))))
    return round(float((a == b).mean()), 5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="names of configurations to run (default: all)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_memory.") as tmp:
        folder = Path(tmp)
        volume = brain_sized_volume(folder / "brain240_0000.nii.gz")
        outputs = []
        for name, flags, env in CONFIGURATIONS:
            if args.only and name not in args.only:
                continue
            out = folder / f"out{len(outputs)}"
            row = {"name": name, "flags": flags, "env": env, "load_before": load_average()}
            row.update(measure(volume, out, flags, env))
            if row["status"] != "ok" and "plan" not in row:
                print(f"{name}: {row['status']}", flush=True)
                rows.append(row)
                continue
            outputs.append(out)
            row["agreement"] = agreement(outputs[0], out)
            print(json.dumps({k: row[k] for k, _ in COLUMNS if k in row}), flush=True)
            rows.append(row)
    tag = machine_tag()
    machine = machine_info()
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "volume_xyz": list(SIZE_XYZ), "model": "bundled hippocampus", "rows": rows}
    (RESULTS / f"memory_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    header = (
        f"# Peak memory of `diffseg segment`, {SIZE_XYZ[0]}x{SIZE_XYZ[1]}x{SIZE_XYZ[2]} volume, bundled model\n\n"
        f"Machine: {machine['cpu']}, {machine['cpu_cores']} cores, {machine['ram_total_gib']} GiB RAM "
        f"({machine['ram_available_gib']} GiB available at the end), GPU: {machine['gpu'] or 'none'}; "
        f"torch {machine['torch']}. Command: `python benchmarks/bench_memory.py`.\n"
        "Each run is the real `diffseg segment --device cpu` in a fresh process, after its `--dry-run`; the machine "
        "is shared, so seconds vary with its load.\n\n"
    )
    (RESULTS / f"memory_{tag}.md").write_text(header + markdown_table(rows, COLUMNS) + "\n")
    print(f"wrote {RESULTS / f'memory_{tag}.md'}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
