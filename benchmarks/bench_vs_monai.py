"""DiffSeg's network + sampler vs. MONAI's DiffusionModelUNet + DDIMScheduler + DiffusionInferer.

Same input, same steps and members, comparable widths (32/64/128/256, one residual block per
level); per network evaluation and end to end; at hippocampus size, one 96^3 window, and
240x240x155 (full volume and sliding window), set against PatchDDM's 256^3 A100 figures.

    python benchmarks/bench_vs_monai.py               # CPU: 240^2x155 estimated from measured parts
    python benchmarks/bench_vs_monai.py --large-cpu   # CPU: also run 240^2x155 for real (slow)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from benchlib import (
    BRATS_SHAPE,
    PATCHDDM_A100,
    RESULTS,
    EvalTimer,
    autocast,
    count_flops,
    gib,
    load_average,
    machine_info,
    machine_tag,
    markdown_table,
    peak_memory,
    predicted_activation_bytes,
    resolve_device,
    run_worker,
    start_memory,
    synchronize,
    worker_main,
)
from diffseg_case import input_image, network_cost, random_bundle, window_count
from diffseg_case import measure as measure_diffseg
from monai.inferers import DiffusionInferer, sliding_window_inference
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler

from DiffSegCore.settings import DEVICES

NUM_CLASSES = 3
WINDOW = (96, 96, 96)  # the core's default sliding window
MULTIPLE = 8  # DiffusionModelUNet needs sizes divisible by 2^(levels-1)
COLUMNS = [
    ("impl", "implementation"),
    ("size", "input"),
    ("window", "mode"),
    ("KxN", "K x N"),
    ("seconds_per_member_eval", "s / member eval"),
    ("seconds_total", "s end to end"),
    ("peak_gib", "peak GiB"),
    ("predicted_gib", "activations GiB / member (meta count)"),
    ("gflop_per_eval", "GFLOP / member eval"),
    ("gflops", "GFLOP/s"),
    ("bf16_fraction", "fraction of bf16 peak"),
    ("params_m", "params (M)"),
    ("status", "status"),
]


def monai_network() -> DiffusionModelUNet:
    """The closest MONAI equivalent of DiffSeg's default network.

    MONAI always adds a self-attention mid-block; flash (memory-efficient) attention keeps it
    from taking O(tokens^2) memory. Attention off at every level, as in DiffSeg.
    """
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=NUM_CLASSES + 1,
        out_channels=NUM_CLASSES,
        num_res_blocks=1,
        channels=(32, 64, 128, 256),
        attention_levels=(False, False, False, False),
        norm_num_groups=8,
        num_head_channels=64,
        use_flash_attention=True,
    )


class MonaiDenoiser(torch.nn.Module):
    """DiffusionModelUNet on the whole volume or by sliding window, with bf16 autocast on GPU."""

    def __init__(self, network: DiffusionModelUNet, window: tuple[int, ...] | None):
        super().__init__()
        self.network, self.window = network, window

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None) -> torch.Tensor:
        with autocast(x.device):
            if self.window is None:
                return self.network(x, timesteps=timesteps).float()
            return sliding_window_inference(
                x, self.window, 4, lambda p: self.network(p, timesteps=timesteps), overlap=0.25, mode="gaussian"
            ).float()


def monai_cost(shape: tuple[int, ...]) -> tuple[int, int]:
    """FLOPs and predicted float32 activation bytes of one MONAI evaluation at batch 1 (meta tensors)."""
    with torch.device("meta"):
        network = monai_network().eval()

    def run():
        with torch.inference_mode():
            network(torch.empty(1, NUM_CLASSES + 1, *shape, device="meta"), timesteps=torch.zeros(1, device="meta"))

    return count_flops(run), predicted_activation_bytes(run)


def padded(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s + (-s) % MULTIPLE for s in shape)


def measure_monai(config: dict) -> dict:
    """MONAI's DiffusionInferer.sample with DDIM over K steps for N members batched, then mean/variance."""
    device = resolve_device(config.get("device", "auto"))
    torch.manual_seed(0)
    network = monai_network().eval().to(device)
    image = input_image(config["size"]).to(device)
    shape = tuple(image.shape[1:])
    size = padded(shape)
    sliding = config["window"] == "sliding" and any(s > w for s, w in zip(size, WINDOW))
    window = tuple(min(w, s) for w, s in zip(WINDOW, size)) if sliding else None
    scheduler = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", prediction_type="sample")
    scheduler.set_timesteps(config["steps"])
    inferer = DiffusionInferer(scheduler)
    timer = EvalTimer(MonaiDenoiser(network, window), device)
    members = config["members"]
    baseline = start_memory(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        pads = [p for s, t in zip(reversed(shape), reversed(size)) for p in (0, t - s)]
        cond = F.pad(image[None], pads, mode="replicate").expand(members, -1, *size)
        noise = torch.randn((members, NUM_CLASSES, *size), device=device)
        x0 = inferer.sample(noise, timer, scheduler, conditioning=cond, mode="concat", verbose=False)
        probs = ((x0[(..., *(slice(0, s) for s in shape))] + 1) / 2).clamp(0, 1)
        mean, variance = probs.mean(0), probs.var(0, unbiased=False).sum(0)
        _ = (mean.argmax(0).cpu(), variance.cpu())
    synchronize(device)
    total = time.perf_counter() - start
    flops, activations = monai_cost(window or size)
    return {
        "device": str(device),
        "shape_zyx": list(shape),
        "members_per_batch": members,
        "windows": window_count(size, window) if window else 1,
        "evaluations": len(timer.seconds),
        "seconds_per_eval": timer.per_eval(),
        "seconds_total": total,
        "peak_bytes": peak_memory(device),
        "baseline_bytes": baseline,
        "flops_per_member_eval": flops * (window_count(size, window) if window else 1),
        "predicted_activation_bytes_per_member": activations,
        "params": sum(p.numel() for p in network.parameters()),
    }


def measure(config: dict) -> dict:
    return measure_monai(config) if config["impl"] == "monai" else measure_diffseg(config | {"network": "default"})


def configurations(args, gpu: bool) -> list[dict]:
    k, n = args.steps, args.members
    large = gpu or args.large_cpu
    sizes = [("hippocampus", "full", k, n), ("window96", "full", 1, 1)]
    if large:
        large_k, large_n = (k, n) if gpu else (1, 1)
        sizes += [("brats", "full", large_k, large_n), ("brats", "sliding", large_k, large_n)]
    return [
        {"impl": impl, "size": size, "window": mode, "steps": steps, "members": members}
        for size, mode, steps, members in sizes
        for impl in ("diffseg", "monai")
    ]


def summarise(row: dict, peak_tflops: float | None) -> dict:
    row = row | {"KxN": f"{row['steps']}x{row['members']}"}
    if row["status"] != "ok":
        return row
    per_member = row["seconds_per_eval"] / row["members_per_batch"]
    throughput = row["flops_per_member_eval"] / per_member
    return row | {
        "seconds_per_member_eval": per_member,
        "peak_gib": gib(row["peak_bytes"]),
        "predicted_gib": gib(row["predicted_activation_bytes_per_member"]),
        "gflop_per_eval": round(row["flops_per_member_eval"] / 1e9, 1),
        "gflops": round(throughput / 1e9, 1),
        "bf16_fraction": None if peak_tflops is None else round(throughput / (peak_tflops * 1e12), 4),
        "params_m": round(row["params"] / 1e6, 2),
    }


def estimates(rows: list[dict], steps: int, members: int) -> list[dict]:
    """240x240x155 rows not run on this CPU: time from FLOPs at the throughput measured on one
    96^3 window; sliding window = that window's measured time x window count; memory counted
    on meta tensors (float32 activations of one member; 4 windows at once when sliding)."""
    out = []
    for impl in ("diffseg", "monai"):
        window_row = next((r for r in rows if r["impl"] == impl and r["size"] == "window96"), None)
        if window_row is None or window_row["status"] != "ok":
            continue
        gflops = window_row["gflops"] * 1e9
        # MONAI's sliding window runs 4 windows per batch (sw_batch_size=4, as in the core).
        window_activations = 4 * window_row["predicted_activation_bytes_per_member"]
        if impl == "diffseg":
            flops, activations = network_cost(random_bundle().network, NUM_CLASSES + 1, BRATS_SHAPE)
            windows = window_count(BRATS_SHAPE, WINDOW)
        else:
            flops, activations = monai_cost(padded(BRATS_SHAPE))
            windows = window_count(padded(BRATS_SHAPE), WINDOW)
        for mode, seconds, flop in (
            ("full", flops / gflops, flops),
            ("sliding", window_row["seconds_per_member_eval"] * windows, window_row["flops_per_member_eval"] * windows),
        ):
            out.append(
                {
                    "impl": impl,
                    "size": "brats",
                    "window": mode,
                    "KxN": f"{steps}x{members} (estimated)",
                    "seconds_per_member_eval": seconds,
                    "seconds_total": seconds * steps * members,
                    "predicted_gib": gib(activations if mode == "full" else window_activations),
                    "gflop_per_eval": round(flop / 1e9, 1),
                    "params_m": window_row["params_m"],
                    "status": "estimated: not run on this CPU (time)",
                }
            )
    return out


def reference_256() -> dict:
    """Both networks at PatchDDM's 256^3: FLOPs, float32 activations, and the time at an A100's bf16 peak."""
    out = {}
    for impl, cost in (
        ("diffseg", lambda: network_cost(random_bundle().network, NUM_CLASSES + 1, (256,) * 3)),
        ("monai", lambda: monai_cost((256,) * 3)),
    ):
        flops, activations = cost()
        out[impl] = {
            "gflop_per_eval": round(flops / 1e9, 1),
            "activations_gib_fp32": gib(activations),
            "seconds_at_a100_bf16_peak": round(flops / 312e12, 4),
        }
    return out


def plot(rows: list[dict], measured: list[dict], path: Path) -> None:
    """Seconds per evaluation and peak memory per configuration, with PatchDDM's A100 figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    groups = [("hippocampus", "full"), ("window96", "full"), ("brats", "full"), ("brats", "sliding")]
    labels = ["hippocampus\nfull", "one 96³\nwindow", "240²x155\nfull", "240²x155\nsliding"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for panel, (key, title, reference) in enumerate(
        (
            ("seconds_per_member_eval", "seconds per network evaluation (1 member)", PATCHDDM_A100["seconds_per_eval"]),
            ("memory", "peak memory, GiB (estimates: activations only)", PATCHDDM_A100["memory_gb"]),
        )
    ):
        ax = axes[panel]
        for offset, impl, color in ((-0.2, "diffseg", "tab:blue"), (0.2, "monai", "tab:orange")):
            for g, (size, mode) in enumerate(groups):
                row = next((r for r in rows if (r["impl"], r["size"], r["window"]) == (impl, size, mode)), None)
                if row is None:
                    continue
                value = row.get("peak_gib") or row.get("predicted_gib") if key == "memory" else row.get(key)
                if value is None:
                    continue
                estimated = row["status"] != "ok"
                ax.bar(
                    g + offset,
                    value,
                    0.4,
                    color=color,
                    hatch="//" if estimated else None,
                    alpha=0.6 if estimated else 1,
                )
        ax.axhline(reference, color="k", linestyle="--", linewidth=1)
        ax.text(len(groups) - 0.5, reference, "PatchDDM 256³, A100", ha="right", va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
    handles = [
        Patch(color="tab:blue", label="DiffSeg"),
        Patch(color="tab:orange", label="MONAI DiffusionModelUNet"),
        Patch(facecolor="white", edgecolor="grey", hatch="//", label="estimated (not run)"),
        Line2D([], [], color="k", marker="o", linestyle="", label="DiffSeg measured by bench_inference.py"),
    ]
    for g, (size, mode) in enumerate(groups):
        row = next((r for r in measured if (r["size"], r["window"]) == (size, mode)), None)
        if row is not None:
            per_member = row["seconds_per_eval"] / row["members_per_batch"]
            axes[0].plot(g - 0.2, per_member, "ko")
            axes[1].plot(g - 0.2, row["peak_gib"], "ko")
    axes[0].legend(handles=handles, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--members", type=int, default=2, help="N (default 2 to keep the CPU run short)")
    parser.add_argument("--large-cpu", action="store_true", help="run 240x240x155 on the CPU too (K=1, N=1)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per configuration")
    parser.add_argument("--replot", action="store_true", help="only redraw table and plot from this machine's JSON")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.replot:
        write_outputs(json.loads((RESULTS / f"vs_monai_{machine_tag()}.json").read_text()), machine_tag())
        return
    machine = machine_info() | {"load_average_start": load_average()}
    rows = []
    for config in configurations(args, device.type == "cuda"):
        row = run_worker(Path(__file__), config | {"device": device.type}, args.timeout)
        rows.append(summarise(row, machine["gpu_bf16_peak_tflops"]))
        print(json.dumps({k: rows[-1].get(k) for k in ("impl", "size", "window", "status", "seconds_per_member_eval")}))
    if not any(r["size"] == "brats" for r in rows):
        rows += estimates(rows, args.steps, args.members)
    machine["load_average_end"] = load_average()
    tag = machine_tag()
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine, "steps": args.steps, "members": args.members, "patchddm": PATCHDDM_A100}
    record["at_256_cubed"] = reference_256()
    write_outputs(record | {"results": rows}, tag)


def diffseg_measured(tag: str) -> list[dict]:
    """DiffSeg's 240x240x155 rows measured by bench_inference.py on the same machine, if any."""
    path = RESULTS / f"inference_{tag}.json"
    if not path.exists():
        return []
    rows = json.loads(path.read_text())["results"]
    return [r for r in rows if r["size"] == "brats" and r["status"] == "ok" and r["network"] == "default"]


def write_outputs(record: dict, tag: str) -> None:
    """JSON, Markdown table and plot from one run's record."""
    rows = record["results"]
    (RESULTS / f"vs_monai_{tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    table = markdown_table(rows, COLUMNS)
    (RESULTS / f"vs_monai_{tag}.md").write_text(table + "\n")
    measured = [] if any(r["size"] == "brats" and r["status"] == "ok" for r in rows) else diffseg_measured(tag)
    plot(rows, measured, RESULTS / f"vs_monai_{tag}.png")
    print(table)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(measure)
    else:
        main()
