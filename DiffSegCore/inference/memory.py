"""What a run needs in memory and time, and what the machine has free: torch-free arithmetic.

The planner (plan.py) picks the run's plan with `choose`; `diffseg segment --dry-run` prints its
figures, the run record keeps them beside the measured peak, and the Slicer panel calls
`estimate_run` (from model.json and the input volume's size, without torch) to show them before
a run. The figures are the process's peak resident memory on the CPU (GPU memory on a GPU):
the loaded libraries, the volume-sized arrays a run keeps, and the network's working memory for
one batch of members (or of sliding windows). benchmarks/bench_memory.py checks them against
measured peaks.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from DiffSegCore.settings import RunSettings

GIB = 2**30
# Resident size of the run's process before any volume: Python, torch, MONAI, SimpleITK and a small model
# (measured on the 2-core benchmark machine: 0.44 GiB; benchmarks/results/memory_cpu2.md).
PROCESS_BYTES = int(0.45 * GIB)
# Share of the free memory a run plans to take by default. Slicer, the scene the results go into and the user's
# other programs need the rest; on a GPU the run has the memory to itself but for the allocator's caching.
DEFAULT_SHARE = {"cpu": 0.2, "cuda": 0.8}
# Share of the free memory a run never plans beyond, even when --max-memory allows more.
MAX_SHARE = 0.9
WINDOWS_PER_BATCH = 4  # sliding windows evaluated at once when memory allows
DEFAULT_WINDOW = (96, 96, 96)  # the sliding window of a model whose model.json names none
MIN_WINDOW = 32  # the smallest sliding window side the planner shrinks to
OVERLAP = 0.25  # overlap of neighbouring sliding windows
# float32 values per voxel and member that the sampler keeps besides the network (noisy mask, network input and
# output, probabilities, the next mask) and per voxel that the run keeps whatever the plan (image, conditioning,
# float64 ensemble sums and the reduced maps); fitted to measured peaks (benchmarks/bench_memory.py).
STATE_VALUES_PER_CLASS = 2.0
FIXED_VALUES_PER_CLASS = 4.5
# Measured network activation over the count of `network_values_per_voxel` (not all counted maps are alive at once).
NETWORK_SLACK = 0.75
# Network throughput, FLOP/s, for the expected time: the 2-core benchmark CPU (benchmarks/results/inference_cpu2.md);
# for a GPU an assumed 5% of a data-centre GPU's bf16 peak, not measured here (no GPU on the benchmark machine).
FLOPS_PER_SECOND = {"cpu": 2.0e10, "cuda": 5.0e12}


@dataclass(frozen=True)
class MemoryPlan:
    """How members are evaluated and what that costs: members per batch, sliding window (or None for the
    whole volume) and windows per batch, estimated peak bytes, and expected seconds."""

    members_per_batch: int
    window: tuple[int, ...] | None
    windows_per_batch: int
    peak_bytes: int
    seconds: float

    def to_json(self) -> dict:
        return {
            "members_per_batch": self.members_per_batch,
            "window": list(self.window) if self.window else None,
            "windows_per_batch": self.windows_per_batch if self.window else None,
            "estimated_peak_bytes": self.peak_bytes,
            "expected_seconds": round(self.seconds, 1),
        }


def network_input_channels(config: dict) -> int:
    """Channels into a diffusion network: image, coordinates (optional), the noisy mask (one per class)."""
    return int(config["image_channels"]) + (3 if config.get("coords") else 0) + int(config["num_classes"])


def network_values_per_voxel(config: dict) -> float:
    """Values alive at once per input voxel during one evaluation without gradients, batch 1.

    The input, a few feature maps at full resolution (a residual block's input, its normalised and
    convolved copies, the skip kept for the way up) and the skips kept at each lower level.
    """
    widths = [int(w) for w in config["widths"]]
    lower = sum(3 * w / 8**level for level, w in enumerate(widths) if level)
    return network_input_channels(config) + 5 * widths[0] + lower


def network_flops_per_voxel(config: dict) -> float:
    """FLOPs per input voxel of one evaluation: the 3x3x3 convolutions of every level (2 per multiply-add)."""
    widths = [int(w) for w in config["widths"]]
    blocks = int(config.get("res_blocks", 1))
    macs = 27 * network_input_channels(config) * widths[0]
    for level, width in enumerate(widths):
        down_in = widths[max(level - 1, 0)]
        level_macs = 27 * (down_in * width + width * width) + 27 * 2 * width * width * (blocks - 1)
        if level < len(widths) - 1:  # the way up at this level, and the strided convolution down from it
            level_macs += 27 * 2 * width * width * blocks + 27 * width * width
        macs += level_macs / 8**level
    return 2.0 * macs


def window_coverage(shape: tuple[int, ...], window: tuple[int, ...]) -> float:
    """Voxels the sliding windows evaluate, over the volume's voxels (overlap makes it more than 1)."""
    ratio = 1.0
    for size, side in zip(shape, window):
        if side >= size:
            continue
        step = max(int(side * (1 - OVERLAP)), 1)
        ratio *= (math.ceil((size - side) / step) + 1) * side / size
    return ratio


def plan_bytes(
    config: dict,
    shape: tuple[int, ...],
    batch: int,
    window: tuple[int, ...] | None,
    windows_per_batch: int,
    device: str = "cpu",
) -> int:
    """Estimated peak bytes of a run over a volume of `shape` (z, y, x) with one plan.

    Args:
        config: the diffusion network's config (model.json `network`).
        shape: the volume on the model's grid.
        batch: members evaluated together.
        window: sliding-window size, or None for the whole volume.
        windows_per_batch: windows evaluated together (sliding window only).
        device: cpu (the process's resident memory) or cuda (GPU memory: the ensemble sums and the loaded
            libraries stay on the host).
    """
    classes = int(config["num_classes"])
    channels = network_input_channels(config)
    voxels = math.prod(shape)
    network = NETWORK_SLACK * network_values_per_voxel(config)
    if window is None:
        working = batch * voxels * network
    else:  # the windows' activations, and the blended whole-volume output of every member
        working = windows_per_batch * math.prod(window) * network + batch * voxels * (classes + 1)
    state = batch * voxels * (STATE_VALUES_PER_CLASS * classes + channels)
    if device == "cuda":
        return int(4 * (working + state + voxels * channels))
    return int(PROCESS_BYTES + 4 * (working + state + voxels * (FIXED_VALUES_PER_CLASS * classes + channels)))


def plan_seconds(
    config: dict, shape: tuple[int, ...], window: tuple[int, ...] | None, steps: int, ensemble: int, device: str
) -> float:
    """Expected sampling time: network FLOPs over the evaluated voxels at the device's throughput."""
    voxels = math.prod(shape) * (1.0 if window is None else window_coverage(shape, window))
    flops = network_flops_per_voxel(config) * voxels * steps * ensemble
    return flops / FLOPS_PER_SECOND.get(device, FLOPS_PER_SECOND["cpu"])


def candidate_windows(shape: tuple[int, ...], model_window: tuple[int, ...], multiple: int) -> list[tuple[int, ...]]:
    """The model's window clipped to the volume, then halved (down to MIN_WINDOW, a multiple of the network's)."""
    window = tuple(min(w, s) for w, s in zip(model_window, shape))
    found = [window]
    while True:
        side = max(MIN_WINDOW, multiple)
        smaller = tuple(max(side, (w // 2) // multiple * multiple) if w > side else w for w in window)
        if smaller == window:
            return found
        found.append(smaller)
        window = smaller


def choose(
    config: dict,
    shape: tuple[int, ...],
    budget: float,
    *,
    ensemble: int,
    steps: int,
    window_setting: str = "auto",
    members_per_batch: int | None = None,
    model_window: tuple[int, ...] = DEFAULT_WINDOW,
    device: str = "cpu",
) -> MemoryPlan | None:
    """The first plan whose estimate fits `budget` bytes, or None if none does.

    In order: the whole volume with as many members per batch as fit (fewest batches); then a sliding
    window, the model's and then smaller ones, with as many windows per batch and then members as fit.
    `window_setting` full or sliding, and a given `members_per_batch`, restrict the choice; with full, the
    one-member (or given) whole-volume plan is returned even when it does not fit (the user asked for it).
    """
    multiple = 2 ** (len(config["widths"]) - 1)
    batches = [members_per_batch] if members_per_batch else list(range(ensemble, 0, -1))
    seconds = {None: plan_seconds(config, shape, None, steps, ensemble, device)}

    def made(batch: int, window: tuple[int, ...] | None, per_batch: int) -> MemoryPlan:
        if window not in seconds:
            seconds[window] = plan_seconds(config, shape, window, steps, ensemble, device)
        peak = plan_bytes(config, shape, batch, window, per_batch, device)
        return MemoryPlan(batch, window, per_batch if window else 1, peak, seconds[window])

    whole = [made(batch, None, 1) for batch in batches] if window_setting != "sliding" else []
    fitting = [plan for plan in whole if plan.peak_bytes <= budget]
    if fitting or window_setting == "full":
        return fitting[0] if fitting else whole[-1]
    for window in candidate_windows(shape, model_window, multiple):
        for per_batch in range(WINDOWS_PER_BATCH, 0, -1):
            for batch in batches:
                plan = made(batch, window, per_batch)
                if plan.peak_bytes <= budget:
                    return plan
    return None


def host_available_bytes() -> int:
    """Memory this process may still take on the host: MemAvailable, or less under a cgroup memory limit."""
    available = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available is None:  # not Linux
        available = _free_bytes_elsewhere()
    headroom = cgroup_headroom_bytes()
    return available if headroom is None else min(available, headroom)


UNKNOWN_FREE_BYTES = 4 << 30  # assumed where the OS does not say: what a laptop with Slicer open usually has left


def _free_bytes_elsewhere() -> int:
    """Free physical memory on Windows (GlobalMemoryStatusEx) or other POSIX systems (sysconf pages); macOS
    reports neither, so a modest amount is assumed there."""
    if sys.platform == "win32":
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong)] + [
                (name, ctypes.c_ulonglong)
                for name in ("total", "available", "page_total", "page_free", "virtual_total", "virtual_free", "extended")
            ]

        status = MemoryStatus()
        status.length = ctypes.sizeof(MemoryStatus)
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return int(status.available)
        return UNKNOWN_FREE_BYTES
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return UNKNOWN_FREE_BYTES


def cgroup_headroom_bytes(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, or v1), or None where there is no limit."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        with contextlib.suppress(OSError, ValueError):
            limit = (root / limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 2**60:  # v1 writes "no limit" as a huge number
                return None
            return max(0, int(limit) - int((root / usage_file).read_text()))
    return None


def budgets(available: int, device: str, max_memory: float | None, sharers: int = 1) -> list[float]:
    """The peaks a run may plan for, in the order it tries them: its process (already loaded when it plans) and
    the default share of the free memory, then up to MAX_SHARE of it when no plan fits that; or --max-memory
    (GiB), never beyond MAX_SHARE of the free memory. A worker process of a folder run (`sharers` of them) plans
    for its part of each: the workers run at once."""
    baseline = 0 if device == "cuda" else PROCESS_BYTES
    most = baseline + available * MAX_SHARE / sharers
    if max_memory is not None:
        return [min(max_memory * GIB / sharers, most)]
    return [baseline + available * DEFAULT_SHARE.get(device, DEFAULT_SHARE["cpu"]) / sharers, most]


def model_grid_shape(
    size_xyz: tuple[int, ...], spacing_xyz: tuple[float, ...], model_spacing: list[float] | None
) -> tuple[int, ...]:
    """(z, y, x) size of a volume of `size_xyz` voxels (x, y, z, as ITK and Slicer count) once resampled to the
    model's spacing; the same rounding as io/preprocess.resample_to_spacing."""
    if model_spacing is None:
        return tuple(reversed(size_xyz))
    return tuple(reversed([max(1, round(n * s / t)) for n, s, t in zip(size_xyz, spacing_xyz, model_spacing)]))


def _choose_for_run(meta: dict, shape: tuple[int, ...], settings: RunSettings, device: str, budget: float):
    """`choose` with a run's settings and its model's window."""
    return choose(
        meta["network"],
        shape,
        budget,
        ensemble=settings.ensemble,
        steps=settings.steps,
        window_setting=settings.window,
        members_per_batch=settings.members_per_batch,
        model_window=tuple(meta.get("window") or DEFAULT_WINDOW),
        device=device,
    )


def plan_run(
    meta: dict, shape: tuple[int, ...], settings: RunSettings, device: str, available: int, sharers: int = 1
) -> tuple[MemoryPlan | None, float]:
    """The plan (`choose`) for a volume of `shape` (z, y, x) on the model's grid with `available` bytes free,
    and the budget it was chosen within (the largest tried when none fits); `sharers`: see `budgets`."""
    for budget in budgets(available, device, settings.max_memory, sharers):
        plan = _choose_for_run(meta, shape, settings, device, budget)
        if plan is not None and plan.peak_bytes <= budget:
            return plan, budget
    return plan, budget


def workers_that_fit(
    meta: dict, shape: tuple[int, ...], settings: RunSettings, device: str, available: int, most: int
) -> int:
    """The most worker processes, up to `most`, whose runs over a volume of `shape` (z, y, x) each fit their part of
    the default budget (`budgets` with `sharers`) without a sliding window the settings do not ask for; at least 1."""
    for count in range(most, 1, -1):
        budget = budgets(available, device, settings.max_memory, count)[0]
        plan = _choose_for_run(meta, shape, settings, device, budget)
        if plan is not None and plan.peak_bytes <= budget and (plan.window is None or settings.window == "sliding"):
            return count
    return 1


def estimate_run(
    meta: dict,
    size_xyz: tuple[int, ...],
    spacing_xyz: tuple[float, ...],
    settings: RunSettings,
    device: str = "cpu",
    available: int | None = None,
) -> MemoryPlan | None:
    """The plan a run would choose, with its estimated peak memory and time, before the run and without torch.

    For the Slicer panel: `meta` is the model's model.json (as exported, with the full network config),
    `size_xyz` and `spacing_xyz` the input volume's dimensions and spacing (as a volume node gives them),
    `settings` the run's settings.RunSettings, `device` cpu or cuda, `available` the free bytes (default:
    the host's free memory; pass the free GPU memory for cuda). None means no plan fits: the run would
    stop with a not-enough-memory error. With --window full the whole-volume plan comes back even when its
    peak is above the budget (the run then warns).
    """
    shape = model_grid_shape(size_xyz, spacing_xyz, meta.get("spacing"))
    return plan_run(meta, shape, settings, device, host_available_bytes() if available is None else available)[0]
