"""Measure one DiffSeg configuration through the core's own path (DiffSegCore.inference.ensemble.predict_volume)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from benchlib import (
    BRATS_SHAPE,
    HIPPOCAMPUS,
    REPO,
    EvalTimer,
    count_flops,
    peak_memory,
    predicted_activation_bytes,
    resolve_device,
    start_memory,
    synchronize,
)
from monai.data.utils import dense_patch_slices

from DiffSegCore.inference import predictor
from DiffSegCore.inference.ensemble import predict_volume
from DiffSegCore.inference.plan import make_plan
from DiffSegCore.models.bundle import ModelBundle, load_bundle
from DiffSegCore.networks.unet import build_network, network_defaults
from DiffSegCore.settings import resolve

BUNDLED_MODEL = REPO / "Resources" / "Models" / "hippocampus"
OVERLAP = 0.25  # the core's sliding-window overlap


def input_image(size: str) -> torch.Tensor:
    """(1, z, y, x) float32: a real hippocampus MR case (z-scored), or random data of a larger size."""
    if size == "hippocampus":
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPOCAMPUS))).astype(np.float32)
        return torch.from_numpy((array - array.mean()) / array.std())[None]
    shape = BRATS_SHAPE if size == "brats" else (96, 96, 96)
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))


def random_bundle(num_classes: int = 3) -> ModelBundle:
    """The default network (widths 32/64/128/256) with random weights: speed does not depend on them."""
    meta = {
        "id": "random-default",
        "version": "0.0.0",
        "channels": [{"name": "MR"}],
        "classes": [{"value": v, "name": f"class{v}"} for v in range(1, num_classes)],
        "network": {**network_defaults(), "num_classes": num_classes},
        "diffusion": {"train_steps": 5, "base_steps": 1001, "schedule": "linear", "prediction": "x0"},
    }
    return ModelBundle(Path("<random>"), meta, build_network(meta["network"]).eval(), None)


def get_bundle(network: str) -> ModelBundle:
    return load_bundle(BUNDLED_MODEL) if network == "bundled" else random_bundle()


def window_count(shape: tuple[int, ...], window: tuple[int, ...]) -> int:
    """How many windows MONAI's sliding_window_inference visits (same scan interval rule)."""
    interval = [max(int(w * (1 - OVERLAP)), 1) if w < s else s for w, s in zip(window, shape)]
    return len(dense_patch_slices(shape, window, interval))


def network_cost(network, in_channels: int, shape: tuple[int, ...]) -> tuple[int, int]:
    """FLOPs and predicted float32 activation bytes of one evaluation at batch 1, on meta tensors."""
    with torch.device("meta"):
        meta_net = build_network(network.config).eval()

    def run():
        with torch.inference_mode():
            meta_net(torch.empty(1, in_channels, *shape, device="meta"), torch.zeros(1, device="meta"))

    return count_flops(run), predicted_activation_bytes(run)


def measure(config: dict) -> dict:
    """Time and memory of predict_volume (K steps x N members) for one size, window mode and network."""
    device = resolve_device(config.get("device", "auto"))
    torch.manual_seed(0)
    bundle = get_bundle(config["network"])
    image = input_image(config["size"])
    shape = tuple(image.shape[1:])
    chosen = {"steps": config["steps"], "ensemble": config["members"], "sampler": "ddim", "device": device.type}
    settings = resolve(bundle.meta, {**chosen, "window": config["window"]})
    plan = make_plan(bundle, shape, settings)
    timer = EvalTimer(predictor.evaluate_network, device)
    predictor.evaluate_network = timer  # time every network evaluation inside the real sampling loop
    baseline = start_memory(device)
    runs = []
    for _ in range(config.get("repeat", 1)):
        synchronize(device)
        start = time.perf_counter()
        predict_volume(bundle, image, settings)
        synchronize(device)
        runs.append(time.perf_counter() - start)
    peak = peak_memory(device)
    eval_shape = plan.window or shape
    flops, activations = network_cost(bundle.network, bundle.network.in_channels, eval_shape)
    windows = window_count(shape, plan.window) if plan.window else 1
    return {
        "device": str(device),
        "shape_zyx": list(shape),
        "plan": plan.describe(),
        "members_per_batch": plan.batch,
        "windows": windows,
        "evaluations": len(timer.seconds),
        "seconds_per_eval": timer.per_eval(),
        "seconds_total": runs[-1],
        "seconds_total_cold": runs[0],
        "peak_bytes": peak,
        "baseline_bytes": baseline,
        "flops_per_member_eval": flops * windows,
        "predicted_activation_bytes_per_member": activations,
        "planner_peak_bytes": plan.estimate.peak_bytes,
        "params": sum(p.numel() for p in bundle.network.parameters()),
        "widths": bundle.network.config["widths"],
    }


def extrapolate(row: dict, steps: int, members: int) -> float:
    """Seconds for K steps x N members from a measured per-evaluation time (members batched 1 at a time)."""
    return row["seconds_per_eval"] * steps * math.ceil(members / row["members_per_batch"])
