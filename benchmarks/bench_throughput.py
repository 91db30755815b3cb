"""Whole-network throughput against one convolution of the same machine: today's path and the fast path.

(a) One 3x3x3 convolution, 32 -> 32 channels at 64^3, in GFLOP/s: PyTorch's default layout,
    channels-last 3D, and channels-last under bf16 autocast.
(b) Whole-network GFLOP/s (FLOPs counted by torch's FlopCounterMode on the real call) of the bundled
    model at its input size (the 5 members of one hippocampus case, 36x52x38) and of the default
    32/64/128/256 network on one 96^3 volume, through the core's own evaluation
    (DiffSegCore.inference.predictor.evaluate_network): today's path (--precision float32,
    channels-last 3D, glibc's allocator as it settles) and the fast path (--precision auto: bf16
    autocast on a CPU with native bf16; freed memory kept for reuse, networks/allocator.py), and each
    of the two levers alone, at every thread count asked for; then the whole-network /
    single-convolution ratio.

The machine may be shared: every configuration runs once per round, rounds interleave all of them,
and the minimum over rounds is reported. `--compile` adds torch.compile of the fast path (its
warm-up is timed apart). On a GPU the networks also run at 128^3 and 256^3 with the peak GPU memory,
against PatchDDM's 24.0 GB and 1.02 s at 256^3 (bieder2023).

    python benchmarks/bench_throughput.py [--rounds 3] [--threads 1,2] [--compile] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from benchlib import (
    PATCHDDM_A100,
    RESULTS,
    count_flops,
    load_average,
    machine_info,
    machine_tag,
    markdown_table,
    resolve_device,
    synchronize,
)
from diffseg_case import BUNDLED_MODEL, input_image

from DiffSegCore.inference.predictor import evaluate_network, on_device
from DiffSegCore.models.bundle import load_bundle
from DiffSegCore.networks.allocator import keep_freed_memory
from DiffSegCore.networks.precision import cpu_has_native_bf16, inference_autocast
from DiffSegCore.networks.unet import UNet3D, build_network
from DiffSegCore.settings import DEVICES

CONV_CHANNELS, CONV_SIZE = 32, 64
CONV_CALLS_PER_ROUND = 5  # one convolution takes 0.03-0.2 s: more samples for its minimum
# path name -> (--precision, freed memory kept for reuse); "today" is the core before issue 16.
PATHS = {
    "today": ("float32", False),
    "float32, memory kept": ("float32", True),
    "auto precision": ("auto", False),
    "fast (the core now)": ("auto", True),
}
CONV_COLUMNS = [
    ("threads", "threads"),
    ("default", "default layout"),
    ("channels_last_3d", "channels-last 3D"),
    ("channels_last_3d_bf16", "channels-last 3D, bf16 autocast"),
]
NETWORK_COLUMNS = [
    ("network", "network"),
    ("input", "input (N x C x Z x Y x X)"),
    ("gflop", "GFLOP / eval"),
    ("threads", "threads"),
    ("path", "path"),
    ("seconds", "s / eval (min)"),
    ("gflops", "GFLOP/s"),
    ("conv_gflops", "single conv GFLOP/s, same arithmetic"),
    ("ratio", "network / single conv"),
    ("ratio_best", "network / best single conv"),
    ("speedup", "speed-up vs today"),
    ("max_abs_diff", "max abs diff vs float32"),
]


def timed(run: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call (GPU synchronised)."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def conv_cases(device: torch.device) -> dict[str, Callable[[], object]]:
    """The single-convolution configurations, each a callable doing one convolution."""
    conv = torch.nn.Conv3d(CONV_CHANNELS, CONV_CHANNELS, 3, padding=1).to(device).eval()
    x = torch.randn(1, CONV_CHANNELS, CONV_SIZE, CONV_SIZE, CONV_SIZE, device=device)
    conv_cl = torch.nn.Conv3d(CONV_CHANNELS, CONV_CHANNELS, 3, padding=1).to(device, memory_format=torch.channels_last_3d)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)

    keep_freed_memory()  # the convolution's own speed, without page faults on its 32 MB output

    def bf16() -> torch.Tensor:
        with inference_autocast(device, "bf16"):
            return conv_cl(x_cl)

    return {"default": lambda: conv(x), "channels_last_3d": lambda: conv_cl(x_cl), "channels_last_3d_bf16": bf16}


def networks(device: torch.device) -> list[tuple[str, UNet3D, tuple[int, ...]]]:
    """(name, network, input shape) for the networks measured on `device`."""
    bundled = load_bundle(BUNDLED_MODEL).network.eval()
    default = build_network({"kind": "diffusion", "image_channels": 1, "num_classes": 3}).eval()
    case = tuple(input_image("hippocampus").shape[1:])
    channels = 1 + 3  # image + noisy mask of 3 classes
    sizes = [96] + ([128, 256] if device.type == "cuda" else [])
    return [("bundled model", bundled, (5, channels, *case))] + [
        ("default 32/64/128/256", default, (1, channels, s, s, s)) for s in sizes
    ]


def network_cases(device: torch.device, compile_fast: bool) -> tuple[list[dict], dict]:
    """Per network and path: a row (FLOPs, input) and a callable doing one evaluation; warm-up timings."""
    cases, warmups = [], {}
    for name, network, shape in networks(device):
        network = on_device(network, device)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        t = torch.full((shape[0],), 1, device=device)
        with torch.inference_mode():
            flops = count_flops(lambda network=network, x=x, t=t: network(x, t))
            reference = evaluate_network(network, x, t, None, precision="float32").cpu()
        paths = dict(PATHS)
        if compile_fast:
            paths["fast + torch.compile"] = PATHS["fast (the core now)"]
        for path, (precision, keep) in paths.items():
            net = torch.compile(network, dynamic=False) if "compile" in path else network

            def run(net=net, x=x, t=t, precision=precision, keep=keep) -> torch.Tensor:
                keep_freed_memory(keep)
                with torch.inference_mode():
                    return evaluate_network(net, x, t, None, precision=precision)

            start = time.perf_counter()
            out = run().cpu()  # warm-up: oneDNN primitives, compilation
            warmups[f"{name} {shape} {path}"] = time.perf_counter() - start
            row = {"network": name, "input": " x ".join(map(str, shape)), "gflop": flops / 1e9, "path": path}
            row["max_abs_diff"] = float((out - reference).abs().max())
            row["bf16"] = precision != "float32" and (device.type == "cuda" or cpu_has_native_bf16())
            cases.append({"row": row, "run": run})
    return cases, warmups


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    """All configurations, interleaved over rounds; minimum seconds of each."""
    convs = conv_cases(device)
    nets, warmups = network_cases(device, args.compile)
    conv_times = {(th, k): [] for th in args.threads for k in convs}
    net_times = {(th, i): [] for th in args.threads for i in range(len(nets))}
    peaks: dict[int, int] = {}
    for round_ in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for key, run in convs.items():
                keep_freed_memory()
                run()  # the first call after a thread change re-creates oneDNN's thread pool
                conv_times[threads, key] += [timed(run, device) for _ in range(CONV_CALLS_PER_ROUND)]
            for i, case in enumerate(nets):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                net_times[threads, i].append(timed(case["run"], device))
                if device.type == "cuda":
                    peaks[i] = max(peaks.get(i, 0), torch.cuda.max_memory_allocated(device))
        print(f"round {round_ + 1}/{args.rounds} done, load average {load_average()}", flush=True)
    conv_flops = 2 * CONV_CHANNELS * CONV_CHANNELS * 27 * CONV_SIZE**3
    conv_rows = [
        {"threads": th, **{k: conv_flops / min(conv_times[th, k]) / 1e9 for k in convs}} for th in args.threads
    ]
    rows = []
    for threads, conv_row in zip(args.threads, conv_rows):
        best_conv = max(conv_row[k] for k in convs)
        today = {}
        for i, case in enumerate(nets):
            row = {**case["row"], "threads": threads, "seconds": min(net_times[threads, i])}
            row["gflops"] = row["gflop"] / row["seconds"]
            row["conv_gflops"] = conv_row["channels_last_3d_bf16" if row.pop("bf16") else "channels_last_3d"]
            row["ratio"] = row["gflops"] / row["conv_gflops"]
            row["ratio_best"] = row["gflops"] / best_conv
            key = (row["network"], row["input"])
            today.setdefault(key, row["seconds"])  # "today" comes first for every network
            row["speedup"] = today[key] / row["seconds"]
            if i in peaks:
                row["peak_gpu_gib"] = peaks[i] / 2**30
            rows.append(row)
    return {"conv": conv_rows, "networks": rows, "warmup_seconds": warmups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the minimum is reported")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to measure")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the fast path")
    args = parser.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    device = resolve_device(args.device)
    machine = {**machine_info(), "native_bf16": cpu_has_native_bf16(), "load_average_start": load_average()}
    result = measure(args, device)
    machine["load_average_end"] = load_average()
    command = "python benchmarks/bench_throughput.py " + " ".join(
        [f"--rounds {args.rounds}", f"--threads {','.join(map(str, args.threads))}"]
        + (["--compile"] if args.compile else [])
    )
    payload = {"command": command, "machine": machine, **result}
    if device.type == "cuda":
        payload["patchddm_a100"] = PATCHDDM_A100
    tag = machine_tag()
    columns = NETWORK_COLUMNS + ([("peak_gpu_gib", "peak GPU GiB")] if device.type == "cuda" else [])
    conv_table = markdown_table(result["conv"], CONV_COLUMNS)
    net_table = markdown_table(result["networks"], columns)
    header = (
        f"`{command}` on {machine['cpu']} ({machine['cpu_cores']} cores, native bf16: {machine['native_bf16']}), "
        f"GPU: {machine['gpu'] or 'none'}, torch {machine['torch']}; load average {machine['load_average_start']} "
        f"at the start, {machine['load_average_end']} at the end; minimum of {args.rounds} interleaved rounds.\n\n"
        f"Single 3x3x3 convolution, {CONV_CHANNELS} -> {CONV_CHANNELS} channels at {CONV_SIZE}^3, GFLOP/s:\n\n"
    )
    (RESULTS / f"throughput_{tag}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"throughput_{tag}.md").write_text(header + conv_table + "\n\nWhole networks:\n\n" + net_table + "\n")
    print(conv_table + "\n\n" + net_table)
    print("warm-up seconds (first evaluation):", json.dumps(result["warmup_seconds"], indent=1))


if __name__ == "__main__":
    main()
