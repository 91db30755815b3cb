"""Numeric precision and memory layout of network evaluations, per device."""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path

import torch

# CPU flags of native bf16 arithmetic (Linux /proc/cpuinfo names): without them bf16 is emulated and slower.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16); False where it cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = set(re.findall(r"\w+", "\n".join(line for line in text.splitlines() if line.startswith("flags"))))
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def autocast(device: torch.device, enabled: bool = True, allow_fp16: bool = True, cpu_bf16: bool = False):
    """Mixed precision: on CUDA bf16 where the GPU has it, else fp16 if allowed; on the CPU bf16 if
    `cpu_bf16`; float32 otherwise.

    Training passes allow_fp16=False: it keeps no gradient scaler, which fp16 gradients would need.
    """
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16) if cpu_bf16 else contextlib.nullcontext()
    if device.type != "cuda":
        return contextlib.nullcontext()
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cuda", dtype=torch.float16) if allow_fp16 else contextlib.nullcontext()


def inference_autocast(device: torch.device, precision: str = "auto"):
    """Autocast of a run's network evaluations for its --precision: float32, bf16, or auto (bf16 or fp16
    on a GPU; bf16 on a CPU with native bf16, where it ran the default network 2-3x faster and moved
    the bundled model's validation Dice by 1.4e-4: docs/results.md, section 8; float32 on other CPUs)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return autocast(device, enabled=precision == "auto", cpu_bf16=cpu_has_native_bf16())


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last 3D on the CPU, where oneDNN's 3D convolutions ran 1.2-1.6x faster (docs/results.md,
    section 8); GPUs keep the default layout until it is measured there."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format
