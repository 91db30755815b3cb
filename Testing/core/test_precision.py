"""The CPU fast path (channels-last 3D, kept memory, bf16 autocast) against a plain float32 evaluation.

Tolerances, on the bundled model's real weights (logits up to about 10 in size):
- float32 fast path (channels-last, --precision float32): logits within 1e-3 of the default-layout
  float32 evaluation (summation order only; measured 1.5e-4).
- bf16 (--precision bf16): class probabilities within 0.1 and the argmax label equal on at least 99%
  of voxels (measured 0.04 and 99.95%); validation Dice moved by 1.4e-4
  (benchmarks/bench_precision_dice.py, docs/results.md section 8).
"""

from __future__ import annotations

import resource

import torch

from DiffSegCore.inference.predictor import evaluate_network, on_device
from DiffSegCore.models.bundle import load_bundle
from DiffSegCore.networks.allocator import keep_freed_memory
from DiffSegCore.networks.precision import cpu_has_native_bf16, inference_autocast
from DiffSegCore.resources import resource_path

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
        return reference, evaluate_network(fast, x, t, None, "float32"), evaluate_network(fast, x, t, None, "bf16")


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


def page_faults_of_a_second_feature_map() -> int:
    """Minor page faults while a 64 MB tensor is written, after one of that size was written and freed."""
    torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)  # above glibc's largest mmap threshold (32 MB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_kept_memory_is_reused_without_page_faults_and_the_setting_can_be_undone():
    pages = 64 * 2**20 // 4096
    try:
        assert keep_freed_memory(False) is True  # glibc, on the Linux machines this suite runs on
        assert page_faults_of_a_second_feature_map() > pages // 2  # given back and faulted in again
        assert keep_freed_memory() is True
        assert page_faults_of_a_second_feature_map() < pages // 20  # reused
    finally:
        keep_freed_memory()
