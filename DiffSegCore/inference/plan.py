"""Where and how a run's members are evaluated: device, members per batch, whole volume or sliding window."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import torch

from DiffSegCore.errors import InputError, RuntimeFault
from DiffSegCore.models.bundle import ModelBundle
from DiffSegCore.networks.unet import UNet3D
from DiffSegCore.settings import DEVICES, RunSettings

MEMORY_FRACTION = 0.6  # share of free memory a run may plan to use
DEFAULT_WINDOW = (96, 96, 96)
WINDOWS_PER_BATCH = 4  # windows sliding_window_inference evaluates at once; the planner counts them all


def resolve_device(name: str) -> torch.device:
    """The torch device for a `device` setting (auto: a CUDA GPU if there is one)."""
    if name not in DEVICES:
        raise InputError(f"unknown device '{name}'; use one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeFault("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def memory_limit_bytes() -> int | None:
    """The cap set by DIFFSEG_MEMORY_LIMIT_MB (for shared machines and tests), or None."""
    value = os.environ.get("DIFFSEG_MEMORY_LIMIT_MB")
    if not value:
        return None
    try:
        return int(float(value) * 2**20)
    except ValueError:
        raise InputError(f"DIFFSEG_MEMORY_LIMIT_MB={value!r} is not a number of megabytes; fix or unset it") from None


def free_memory_bytes(device: torch.device) -> int:
    """Memory the run may take: free GPU memory, or MemAvailable on the host; capped by DIFFSEG_MEMORY_LIMIT_MB."""
    limit = memory_limit_bytes()
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    return free if limit is None else min(free, limit)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator raises a plain RuntimeError."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def member_bytes(network: UNet3D, shape: tuple[int, ...], bytes_per_value: int = 4) -> int:
    """Rough peak activation memory of one network evaluation without gradients.

    Args:
        network: the network to evaluate.
        shape: spatial size (z, y, x) of one input.
        bytes_per_value: 4 for float32, 2 under autocast.

    Input, a few live feature maps at full resolution, and the skips kept at each lower level.
    """
    voxels = 1
    for size in shape:
        voxels *= size + (-size) % network.multiple
    widths = network.config["widths"]
    per_voxel = network.in_channels + 5 * widths[0] + sum(3 * w / 8**level for level, w in enumerate(widths) if level)
    return int(voxels * per_voxel * bytes_per_value)


@dataclass
class Plan:
    """How to run: device, members per batch, and whether to use a sliding window."""

    device: torch.device
    batch: int
    window: tuple[int, ...] | None
    # The model's window clipped to the volume; None where a window would hold the whole volume (no saving).
    smaller_window: tuple[int, ...] | None = None

    def fallback(self) -> Plan | None:
        """The next, smaller plan after running out of memory (fewer members, window, CPU)."""
        if self.batch > 1:
            return replace(self, batch=self.batch // 2)
        if self.window is None and self.smaller_window is not None:
            return replace(self, window=self.smaller_window)
        if self.device.type == "cuda":
            return replace(self, device=torch.device("cpu"))
        return None

    def describe(self) -> str:
        mode = f"sliding window {'x'.join(map(str, self.window))}" if self.window else "full volume"
        return f"{self.device.type}, {self.batch} member(s) per batch, {mode}"


def make_plan(bundle: ModelBundle, shape: tuple[int, ...], settings: RunSettings) -> Plan:
    """Pick members per batch and full volume vs. sliding window from the memory at hand.

    Args:
        bundle: the model (its diffusion network, and its sliding-window size in model.json `window`).
        shape: spatial size (z, y, x) of the preprocessed volume.
        settings: the run's settings (device, window, ensemble, members_per_batch).
    """
    network = bundle.network
    device = resolve_device(settings.device)
    value_bytes = 2 if device.type == "cuda" else 4
    budget = free_memory_bytes(device) * MEMORY_FRACTION
    per_member = member_bytes(network, shape, value_bytes)
    window_shape = tuple(min(w, s) for w, s in zip(bundle.meta.get("window") or DEFAULT_WINDOW, shape))
    use_window = settings.window == "sliding" or (settings.window == "auto" and per_member > budget)
    if use_window:
        # Measured at 240x240x155 on CPU: 2.8 GiB peak above baseline vs. 4 x 0.64 GiB (benchmarks/results).
        per_member = member_bytes(network, window_shape, value_bytes) * WINDOWS_PER_BATCH
        if per_member > budget:
            capped = " (capped by DIFFSEG_MEMORY_LIMIT_MB)" if memory_limit_bytes() is not None else ""
            raise RuntimeFault(
                f"not enough memory: one sliding window needs about {per_member / 2**20:.0f} MiB but the run may use "
                f"{budget / 2**20:.0f} MiB{capped}; close other programs or use a machine with more memory"
            )
    batch = settings.members_per_batch or max(1, min(settings.ensemble, int(budget // per_member)))
    return Plan(device, batch, window_shape if use_window else None, window_shape if window_shape != shape else None)
