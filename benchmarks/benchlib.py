"""Shared helpers for the speed/memory benchmarks: machine record, isolated runs, FLOPs, memory.

Each measured configuration runs in a fresh subprocess (`script --worker JSON`), so the peak
resident memory read from getrusage belongs to that configuration alone.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
# The shared data sit beside the checkout (../shared/data), as the tests expect; DIFFSEG_STUDY_DATA overrides.
HIPPOCAMPUS_DIR = Path(os.environ.get("DIFFSEG_STUDY_DATA") or REPO.parent / "shared" / "data" / "hippocampus")
HIPPOCAMPUS = HIPPOCAMPUS_DIR / "imagesTr" / "hippocampus_004.nii.gz"
# The bundled hippocampus recipe trained on the 160/40 split (model 1.1.0): validation figures need a model that
# held those 40 cases out, and the bundled one trained on all 200 (benchmarks/models/README.md).
SPLIT_MODEL = REPO / "benchmarks" / "models" / "hippocampus-split"
BRATS_SHAPE = (155, 240, 240)  # (z, y, x) of a 240x240x155 BraTS volume
PATCHDDM_A100 = {"shape": [256, 256, 256], "seconds_per_eval": 1.02, "memory_gb": 24.0, "source": "bieder2023 Table 1"}
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
RESULT_TAG = "BENCH_RESULT "


def gpu_bf16_peak_tflops(name: str) -> float | None:
    """The bf16 peak of a GPU known by name (None for an unknown chip)."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _meminfo_gib(key: str) -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 2**20, 1)
    return float("nan")


def machine_info() -> dict:
    """What the figures ran on: CPU, cores, RAM, GPU, library versions, current load."""
    import monai

    cpu = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_total_gib": _meminfo_gib("MemTotal"),
        "ram_available_gib": _meminfo_gib("MemAvailable"),
        "gpu": gpu,
        "gpu_bf16_peak_tflops": gpu_bf16_peak_tflops(gpu) if gpu else None,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
    }


def machine_tag() -> str:
    """Short name for result files: the GPU model, or 'cpu<cores>'."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace("NVIDIA ", "").split()[0].lower()
    return f"cpu{os.cpu_count()}"


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    """bf16 autocast on a GPU (as the core does), nothing on the CPU (float32 there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


class EvalTimer:
    """Wraps a callable and records the wall time of every call (GPU synchronised)."""

    def __init__(self, fn: Callable, device: torch.device):
        self.fn, self.device, self.seconds = fn, device, []

    def __call__(self, *args, **kwargs):
        synchronize(self.device)
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - start)
        return out

    def per_eval(self) -> float:
        """Median time of a call, leaving out the first (warm-up) one when there are others."""
        times = sorted(self.seconds[1:] or self.seconds)
        return times[len(times) // 2]


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def start_memory(device: torch.device) -> int:
    """Reset the peak counter and return the memory already in use (the baseline)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return rss_bytes()


def peak_memory(device: torch.device) -> int:
    """Peak GPU memory allocated, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count_flops(run: Callable[[], object]) -> int:
    """FLOPs of one call, counted by torch on meta tensors (no compute)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors alive at once while a model runs on meta tensors.

    Hand-written because torch has no public single-process activation-memory tracker for
    inference; it counts every non-view output until it is garbage collected.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and id(tensor) not in inputs and not tensor._is_view():
                nbytes = tensor.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, nbytes)
        return out


def predicted_activation_bytes(run: Callable[[], object]) -> int:
    """Peak live activation bytes of one call on meta tensors (inputs and weights not included)."""
    tracker = LiveBytes()
    with tracker:
        run()
    return tracker.peak


def memory_limit_for_worker() -> None:
    """Cap a CPU worker's address space below the free RAM, so a too-big run fails cleanly.

    Without the cap the kernel's OOM killer could take other people's processes on this machine.
    """
    if torch.cuda.is_available():
        return  # CUDA reserves large virtual ranges; GPU runs report torch.OutOfMemoryError instead
    limit = int((_meminfo_gib("MemAvailable") * 0.85 + 2.0) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_worker(script: Path, config: dict, timeout: float) -> dict:
    """Run one configuration in a fresh interpreter and return its result record."""
    command = [sys.executable, str(script), "--worker", json.dumps(config)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**config, "status": f"not finished within the {timeout:.0f} s limit"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return {**config, **json.loads(line[len(RESULT_TAG) :]), "status": "ok"}
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    reason = "out of memory" if "memory" in last.lower() or done.returncode in (-9, 137) else last
    return {**config, "status": f"failed ({reason})", "wall_s": round(time.perf_counter() - start, 1)}


def worker_main(measure: Callable[[dict], dict]) -> None:
    """Entry of a worker process: measure the JSON config in argv and print one result line."""
    config = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    memory_limit_for_worker()
    print(RESULT_TAG + json.dumps(measure(config)), flush=True)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of the given (key, header) columns; missing values print as '-'."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def gib(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**30, 3)


def write_results(name: str, command: str, machine: dict, rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """results/<name>_<machine tag>.json (command, machine, rows) and .md (the table); returns the table."""
    machine = {**machine, "load_average_end": load_average()}
    tag = machine_tag()
    payload = {"command": command, "machine": machine, "rows": rows}
    (RESULTS / f"{name}_{tag}.json").write_text(json.dumps(payload, indent=1))
    table = markdown_table(rows, columns)
    (RESULTS / f"{name}_{tag}.md").write_text(table + "\n")
    return table
