"""Seconds from Apply to result in the Slicer panel's path, for the bundled model with its defaults.

    .venv/bin/python benchmarks/bench_slicer_end_to_end.py [--runs 3] [--device cpu]

Runs DiffSegLib's SegmentationLogic (what Apply runs: inputs written, the child process started,
torch imported, the model loaded, sampling, outputs read back into a real MRML scene from the
slicer-core wheel) on the bundled sample case and prints each run and the median. The panel shows
the registry's `expected_seconds`, which comes from this figure (benchmarks/results/slicer_end_to_end_cpu2.md).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "DiffSegExtension"), str(REPO)]

from DiffSegLib.logic import SegmentationLogic  # noqa: E402
from DiffSegLib.scene import StandaloneScene  # noqa: E402

from DiffSegCore.models.registry import list_models  # noqa: E402
from DiffSegCore.resources import resource_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = list_models()[0].id
    seconds = []
    for run in range(args.runs):
        standalone = StandaloneScene()
        volume = standalone.load_volume(resource_path("SampleData", "hippocampus_sample.nii.gz"), "sample")
        started = time.monotonic()
        SegmentationLogic(standalone.scene).process(volume, model, device=args.device, seed=run)
        seconds.append(time.monotonic() - started)
        print(f"run {run + 1}: {seconds[-1]:.1f} s")
    print(f"{model} with its defaults on {args.device}, Apply to result: median {statistics.median(seconds):.1f} s "
          f"over {args.runs} runs ({platform.processor() or platform.machine()}, Python {platform.python_version()})")


if __name__ == "__main__":
    main()
