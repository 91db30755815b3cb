"""Where and how a run's members are evaluated: device, members per batch, whole volume or sliding window.

The arithmetic (what a plan needs, which plan fits) is torch-free in memory.py; this module adds the device."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from DiffSegCore.errors import InputError, RuntimeFault
from DiffSegCore.inference.memory import (
    DEFAULT_WINDOW,
    GIB,
    WINDOWS_PER_BATCH,
    MemoryPlan,
    candidate_windows,
    host_available_bytes,
    plan_bytes,
    plan_run,
)
from DiffSegCore.models.bundle import ModelBundle
from DiffSegCore.settings import DEVICES, RunSettings


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
    """The free memory DIFFSEG_MEMORY_LIMIT_MB tells the planner to assume at most (shared machines, tests), or None."""
    value = os.environ.get("DIFFSEG_MEMORY_LIMIT_MB")
    if not value:
        return None
    try:
        return int(float(value) * 2**20)
    except ValueError:
        raise InputError(f"DIFFSEG_MEMORY_LIMIT_MB={value!r} is not a number of megabytes; fix or unset it") from None


def free_memory_bytes(device: torch.device) -> int:
    """Free memory: on the GPU, or the host's (MemAvailable, within a cgroup limit); at most DIFFSEG_MEMORY_LIMIT_MB."""
    limit = memory_limit_bytes()
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_available_bytes()
    return free if limit is None else min(free, limit)


_sharers = 1  # processes of one folder run that share this machine's memory, this one included (inference/workers.py)


def share_memory(processes: int) -> None:
    """Plan this process's runs for a 1/`processes` part of the memory: it is one of that many worker processes."""
    global _sharers
    _sharers = max(1, processes)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator raises a plain RuntimeError."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


@dataclass
class Plan:
    """How to run: device, members per batch, whole volume or sliding window (and windows per batch), and the
    estimate (memory.MemoryPlan) it was chosen by."""

    device: torch.device
    batch: int
    window: tuple[int, ...] | None
    # The smallest window the planner would use on this volume; None where a window would hold the whole volume.
    smaller_window: tuple[int, ...] | None = None
    windows_per_batch: int = WINDOWS_PER_BATCH
    estimate: MemoryPlan | None = None
    budget_bytes: int | None = None

    def fallback(self) -> Plan | None:
        """The next, smaller plan after running out of memory (fewer members, window, fewer windows, CPU)."""
        if self.batch > 1:
            return replace(self, batch=self.batch // 2)
        if self.window is None and self.smaller_window is not None:
            return replace(self, window=self.smaller_window, windows_per_batch=WINDOWS_PER_BATCH)
        if self.window is not None and self.windows_per_batch > 1:
            return replace(self, windows_per_batch=1)
        if self.device.type == "cuda":
            return replace(self, device=torch.device("cpu"))
        return None

    def describe(self) -> str:
        mode = "full volume"
        if self.window:
            mode = f"sliding window {'x'.join(map(str, self.window))}, {self.windows_per_batch} window(s) per batch"
        return f"{self.device.type}, {self.batch} member(s) per batch, {mode}"

    def to_json(self) -> dict:
        """The plan for the run record: what ran, and the estimate it was chosen by."""
        return {
            "device": self.device.type,
            "members_per_batch": self.batch,
            "window": list(self.window) if self.window else None,
            "windows_per_batch": self.windows_per_batch if self.window else None,
            "budget_bytes": self.budget_bytes,
            "estimate": None if self.estimate is None else self.estimate.to_json(),  # as planned, before any fallback
        }


def make_plan(bundle: ModelBundle, shape: tuple[int, ...], settings: RunSettings) -> Plan:
    """Pick members per batch, whole volume or sliding window, and windows per batch, to fit the memory at hand.

    Args:
        bundle: the model (its diffusion network, and its sliding-window size in model.json `window`).
        shape: spatial size (z, y, x) of the preprocessed volume.
        settings: the run's settings (device, window, ensemble, members_per_batch, max_memory).
    """
    device = resolve_device(settings.device)
    meta = {**bundle.meta, "network": bundle.network.config}
    free = free_memory_bytes(device)
    chosen, budget = plan_run(meta, shape, settings, device.type, free, _sharers)
    windows = candidate_windows(shape, tuple(meta.get("window") or DEFAULT_WINDOW), bundle.network.multiple)
    if chosen is None:
        least = plan_bytes(meta["network"], shape, 1, windows[-1], 1, device.type)
        cap = " (capped by --max-memory)" if settings.max_memory is not None else ""
        cap += " (capped by DIFFSEG_MEMORY_LIMIT_MB)" if memory_limit_bytes() is not None else ""
        cap += f" (one of {_sharers} worker processes; fewer --workers leave each more)" if _sharers > 1 else ""
        raise RuntimeFault(
            f"not enough memory: the smallest plan needs about {_size(least)} but the run may use {_size(budget)} "
            f"with {_size(free)} free{cap}; close other programs, raise --max-memory or use a machine with more memory"
        )
    smaller = windows[-1] if windows[-1] != shape else None
    return Plan(device, chosen.members_per_batch, chosen.window, smaller, chosen.windows_per_batch, chosen, int(budget))


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"
