"""The CPU fast path (channels-last 3D, kept memory, bf16 autocast) against a plain float32 evaluation.

Tolerances, on the bundled model's real weights (logits up to about 10 in size):
- float32 fast path (channels-last, --precision float32): logits within 1e-3 of the default-layout
  float32 evaluation (summation order only; measured 1.5e-4).
- bf16 (--precision bf16): class probabilities within 0.1 and the argmax label equal on at least 99%
  of voxels (measured 0.04 and 99.95%); validation Dice moved by 1.4e-4
  (benchmarks/bench_precision_dice.py, docs/results.md section 8).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from DiffSegCore.inference.predictor import evaluate_network, on_device
from DiffSegCore.models.bundle import load_bundle
from DiffSegCore.networks.precision import cpu_has_native_bf16, inference_autocast
from DiffSegCore.resources import resource_path

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
FLOAT32_LOGIT_TOLERANCE = 1e-3
BF16_PROBABILITY_TOLERANCE = 0.1
BF16_LABEL_AGREEMENT = 0.99


def outputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (2, 3, 24, 28, 20) of the bundled network: plain float32 reference, float32 fast path, bf16."""
    network = load_bundle(resource_path("Models", "hippocampus")).network.eval()
    x = torch.randn(2, network.in_channels, 24, 28, 20, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 4])
    with torch.inference_mode():
        reference = network(x, t)  # default layout, float32, as loaded
        fast = on_device(network, CPU)
        return reference, evaluate_network(fast, x, t, None, precision="float32"), evaluate_network(fast, x, t, None, precision="bf16")


def test_float32_fast_path_equals_the_plain_float32_evaluation():
    reference, float32, _ = outputs()
    assert float32.dtype == torch.float32
    assert (float32 - reference).abs().max() < FLOAT32_LOGIT_TOLERANCE


def test_bf16_path_is_close_to_float32_and_really_runs_in_bf16():
    reference, _, bf16 = outputs()
    assert bf16.dtype == torch.float32  # results leave the network in float32
    assert (bf16 - reference).abs().max() > FLOAT32_LOGIT_TOLERANCE  # bf16 arithmetic did run
    probs, probs_bf16 = reference.softmax(1), bf16.softmax(1)
    assert (probs_bf16 - probs).abs().max() < BF16_PROBABILITY_TOLERANCE
    agreement = (probs_bf16.argmax(1) == probs.argmax(1)).float().mean()
    assert agreement >= BF16_LABEL_AGREEMENT


def test_auto_precision_is_bf16_on_the_cpu_only_with_native_bf16():
    def dtype_inside(precision: str) -> torch.dtype:
        with inference_autocast(CPU, precision):
            return torch.nn.functional.linear(torch.ones(1, 2), torch.ones(2, 2)).dtype

    assert dtype_inside("float32") == torch.float32
    assert dtype_inside("bf16") == torch.bfloat16
    assert dtype_inside("auto") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    with_bf16 = tmp_path / "with"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    amx = tmp_path / "amx"
    amx.write_text("flags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    without = tmp_path / "without"
    without.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\nbugs\t\t: avx512_bf16_lookalike\n")
    assert cpu_has_native_bf16(with_bf16)
    assert cpu_has_native_bf16(amx)
    assert not cpu_has_native_bf16(without)
    assert not cpu_has_native_bf16(tmp_path / "missing")


# Run in a fresh process: the allocator setting is process-wide, and a clean heap on the main thread
# is what a `diffseg` run starts with.
PAGE_FAULTS = """
import resource, sys, torch
from DiffSegCore.networks.allocator import keep_freed_memory
assert keep_freed_memory(sys.argv[1] == "keep")
faults = []
for _ in range(12):  # 64 MB: above glibc's largest mmap threshold (32 MB); written, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[-4:]))
"""


def page_faults_of_a_settled_feature_map(keep: bool) -> int:
    """Fewest minor page faults while one of the last 4 of 12 64 MB tensors in a row is written (the heap
    settles after the first few: memory-aligned blocks need a little more than their own size)."""
    command = [sys.executable, "-c", PAGE_FAULTS, "keep" if keep else "default"]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return int(done.stdout.split()[-1])


def test_kept_memory_is_reused_without_page_faults():
    pages = 64 * 2**20 // 4096
    assert page_faults_of_a_settled_feature_map(keep=False) > pages // 2  # given back and faulted in again
    assert page_faults_of_a_settled_feature_map(keep=True) < pages // 20  # reused
