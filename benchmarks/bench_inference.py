"""Seconds and peak memory per network evaluation and per full segmentation (K steps x N members).

Sizes: a real hippocampus case and 240x240x155 (full volume and sliding window), for the default
network (widths 32/64/128/256) and the bundled model when Resources/Models/hippocampus exists.
Every configuration runs in a fresh process; see docs/results.md, section 8.

    python benchmarks/bench_inference.py                # auto device; CPU: 240^2x155 with K=1, N=1
    python benchmarks/bench_inference.py --large-steps 5 --large-members 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchlib import (
    RESULTS,
    gib,
    load_average,
    machine_info,
    machine_tag,
    markdown_table,
    resolve_device,
    run_worker,
    worker_main,
)
from diffseg_case import BUNDLED_MODEL, extrapolate, measure

from DiffSegCore.settings import DEVICES, WINDOWS

COLUMNS = [
    ("network", "network"),
    ("size", "input"),
    ("window", "mode"),
    ("KxN", "K x N run"),
    ("plan", "plan"),
    ("seconds_per_eval", "s / eval"),
    ("seconds_total", "s total (run)"),
    ("seconds_KN", "s for K x N"),
    ("peak_gib", "peak GiB"),
    ("increment_gib", "peak - baseline GiB"),
    ("planner_gib", "planner's peak estimate GiB"),
    ("predicted_gib", "activations GiB / member (meta count)"),
    ("gflop_per_eval", "GFLOP / member eval"),
    ("gflops", "GFLOP/s"),
    ("bf16_fraction", "fraction of bf16 peak"),
    ("status", "status"),
]


def configurations(args, gpu: bool) -> list[dict]:
    networks = ["default"] + (["bundled"] if BUNDLED_MODEL.exists() else [])
    large_k = args.large_steps or (args.steps if gpu else 1)
    large_n = args.large_members or (args.members if gpu else 1)
    configs = []
    for network in networks:
        configs.append({"network": network, "size": "hippocampus", "window": "full", "steps": args.steps, "members": 1})
        configs.append(
            {"network": network, "size": "hippocampus", "window": "full", "steps": args.steps, "members": args.members}
            | {"repeat": 2}
        )
    for window in (w for w in WINDOWS if w != "auto"):
        configs.append({"network": "default", "size": "brats", "window": window, "steps": large_k, "members": large_n})
    return configs


def summarise(row: dict, args, peak_tflops: float | None) -> dict:
    """Derived columns: the K x N time from the per-evaluation time, GiB, throughput."""
    if row["status"] != "ok":
        return row | {"KxN": f"{row['steps']}x{row['members']}"}
    throughput = row["flops_per_member_eval"] * row["members_per_batch"] / row["seconds_per_eval"]
    measured_kn = row["steps"] == args.steps and row["members"] == args.members
    return row | {
        "KxN": f"{row['steps']}x{row['members']}",
        "seconds_KN": row["seconds_total"] if measured_kn else extrapolate(row, args.steps, args.members),
        "peak_gib": gib(row["peak_bytes"]),
        "increment_gib": gib(row["peak_bytes"] - row["baseline_bytes"]),
        "planner_gib": gib(row.get("planner_peak_bytes")),
        "predicted_gib": gib(row["predicted_activation_bytes_per_member"]),
        "gflop_per_eval": round(row["flops_per_member_eval"] / 1e9, 1),
        "gflops": round(throughput / 1e9, 1),
        "bf16_fraction": None if peak_tflops is None else round(throughput / (peak_tflops * 1e12), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--steps", type=int, default=5, help="K of the full segmentation")
    parser.add_argument("--members", type=int, default=5, help="N of the full segmentation")
    parser.add_argument("--large-steps", type=int, help="K at 240x240x155 (default: 1 on CPU, K on GPU)")
    parser.add_argument("--large-members", type=int, help="N at 240x240x155 (default: 1 on CPU, N on GPU)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per configuration")
    parser.add_argument("--replot", action="store_true", help="only redraw the table from this machine's JSON")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.replot:
        write_table(json.loads((RESULTS / f"inference_{machine_tag()}.json").read_text())["results"], machine_tag())
        return
    machine = machine_info() | {"load_average_start": load_average()}
    rows = []
    for config in configurations(args, device.type == "cuda"):
        row = run_worker(Path(__file__), config | {"device": device.type}, args.timeout)
        rows.append(summarise(row, args, machine["gpu_bf16_peak_tflops"]))
        print(json.dumps({k: row.get(k) for k in ("network", "size", "window", "status", "seconds_per_eval")}))
    machine["load_average_end"] = load_average()
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = machine_tag()
    record = {"machine": machine, "steps": args.steps, "members": args.members, "results": rows}
    (RESULTS / f"inference_{tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    write_table(rows, tag)


def write_table(rows: list[dict], tag: str) -> None:
    table = markdown_table(rows, COLUMNS)
    (RESULTS / f"inference_{tag}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(measure)
    else:
        main()
