"""Numeric precision and memory layout of network evaluations, per device."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, enabled: bool = True, allow_fp16: bool = True):
    """Mixed precision on CUDA (bf16 where the GPU has it, else fp16 if allowed); float32 elsewhere.

    Training passes allow_fp16=False: it keeps no gradient scaler, which fp16 gradients would need.
    """
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cuda", dtype=torch.float16) if allow_fp16 else contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last 3D on the CPU, where oneDNN's 3D convolutions ran 1.2-1.6x faster (docs/results.md,
    section 8); GPUs keep the default layout until it is measured there."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format
