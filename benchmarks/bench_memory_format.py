"""Seconds per network evaluation in PyTorch's default (NCDHW) and channels-last-3D (NDHWC) layouts.

The bundled model and the default network (32/64/128/256), at hippocampus size with the default
5 members batched and on one 96^3 window; median of repeated evaluations after a warm-up, outputs
compared between the layouts. DiffSegCore.inference.ensemble uses channels-last on the CPU because of it.

    python benchmarks/bench_memory_format.py [--device cpu|cuda] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from benchlib import RESULTS, load_average, machine_info, machine_tag, markdown_table, resolve_device, synchronize
from diffseg_case import BUNDLED_MODEL

from DiffSegCore.models.bundle import load_bundle
from DiffSegCore.networks.unet import build_network
from DiffSegCore.settings import DEVICES

LAYOUTS = {"default": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
COLUMNS = [
    ("network", "network"),
    ("input", "input (N x C x Z x Y x X)"),
    ("default", "s / eval, default"),
    ("channels_last_3d", "s / eval, channels-last"),
    ("speedup", "speed-up"),
    ("max_abs_diff", "max abs difference of outputs"),
]


def seconds_per_eval(network, x, t, layout, device, repeats: int) -> tuple[float, torch.Tensor]:
    network = network.to(device=device, memory_format=layout)
    x = x.to(device).contiguous(memory_format=layout)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            synchronize(device)
            start = time.perf_counter()
            out = network(x, t)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), out.float().cpu()


def measure(name: str, network, shape: tuple[int, ...], device, repeats: int) -> dict:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((shape[0],), 1, device=device)
    row = {"network": name, "input": " x ".join(map(str, shape))}
    outputs = {}
    for label, layout in LAYOUTS.items():
        row[label], outputs[label] = seconds_per_eval(network, x, t, layout, device, repeats)
    row["speedup"] = row["default"] / row["channels_last_3d"]
    row["max_abs_diff"] = float((outputs["default"] - outputs["channels_last_3d"]).abs().max())
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = resolve_device(args.device)
    machine = {**machine_info(), "load_average_start": load_average()}
    bundled = load_bundle(BUNDLED_MODEL).network.eval()
    default = build_network({"kind": "diffusion", "image_channels": 1, "num_classes": 3}).eval()
    channels = 1 + 3  # image + noisy mask of 3 classes
    rows = [
        measure("bundled model", bundled, (5, channels, 40, 56, 40), device, args.repeats),
        measure("default 32/64/128/256", default, (5, channels, 40, 56, 40), device, args.repeats),
        measure("default 32/64/128/256", default, (1, channels, 96, 96, 96), device, args.repeats),
    ]
    machine["load_average_end"] = load_average()
    tag = machine_tag()
    payload = {"command": "python benchmarks/bench_memory_format.py", "machine": machine, "rows": rows}
    (RESULTS / f"memory_format_{tag}.json").write_text(json.dumps(payload, indent=1))
    table = markdown_table(rows, COLUMNS)
    (RESULTS / f"memory_format_{tag}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
