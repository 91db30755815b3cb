"""Seconds the per-segment review figures (DiffSegCore/inference/review.py) add to a run, beside the
seconds to write the uncertainty volume that every run writes anyway.

Real label maps as the segmentation (hippocampus MR, CHAOS abdominal CT with four organs) and, as
the uncertainty, a smooth band along every boundary (the gradient magnitude of the smoothed label
map, scaled to 0..0.4), so that each segment has regions to find; also the CT label map upsampled
to a 512 x 512 in-plane grid, the size of a clinical CT. Median of repeated runs.

    python benchmarks/bench_review.py [--repeats N]     (DIFFSEG_STUDY_DATA: the hippocampus folder)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk
from benchlib import HIPPOCAMPUS, HIPPOCAMPUS_DIR, load_average, machine_info, write_results

from DiffSegCore.inference.review import segment_review

CHAOS = HIPPOCAMPUS_DIR.parent / "chaos" / "labelsTr" / "chaos_01.nii.gz"  # beside the hippocampus data
COLUMNS = [
    ("case", "case"),
    ("size", "size (x y z)"),
    ("classes", "classes"),
    ("review_s", "review, s"),
    ("write_s", "write uncertainty .nii.gz, s"),
    ("regions", "regions found"),
]


def band_uncertainty(labels: sitk.Image) -> sitk.Image:
    """A smooth uncertainty along the label boundaries, 0..0.4."""
    edges = sitk.GradientMagnitudeRecursiveGaussian(sitk.Cast(labels, sitk.sitkFloat32), 1.0)
    top = sitk.GetArrayViewFromImage(edges).max() or 1.0
    return sitk.Cast(edges * (0.4 / float(top)), sitk.sitkFloat32)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, labels: sitk.Image, repeats: int) -> dict:
    labels = sitk.Cast(labels, sitk.sitkUInt8)
    uncertainty = band_uncertainty(labels)
    values = sorted(int(v) for v in set(sitk.GetArrayViewFromImage(labels).ravel().tolist()) - {0})
    classes = [{"value": v, "name": str(v)} for v in values]
    review = segment_review(labels, uncertainty, classes)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "uncertainty.nii.gz")
        write_s = median_seconds(lambda: sitk.WriteImage(uncertainty, path), repeats)
    row = {
        "case": name,
        "size": " x ".join(map(str, labels.GetSize())),
        "classes": len(classes),
        "review_s": median_seconds(lambda: segment_review(labels, uncertainty, classes), repeats),
        "write_s": write_s,
        "regions": sum(len(s["regions"]) for s in review),
    }
    print(row, flush=True)
    return row


def upsampled(labels: sitk.Image, size_xy: int) -> sitk.Image:
    """The label map on a finer in-plane grid (nearest neighbour), same extent."""
    size = [size_xy, size_xy, labels.GetSize()[2]]
    spacing = [labels.GetSpacing()[0] * labels.GetSize()[0] / size_xy] * 2 + [labels.GetSpacing()[2]]
    return sitk.Resample(
        labels, size, sitk.Transform(), sitk.sitkNearestNeighbor, labels.GetOrigin(), spacing, labels.GetDirection()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    machine = {**machine_info(), "load_average_start": load_average()}
    hippocampus = sitk.ReadImage(str(HIPPOCAMPUS.parent.parent / "labelsTr" / HIPPOCAMPUS.name))
    chaos = sitk.ReadImage(str(CHAOS))
    rows = [
        measure("hippocampus_004 (MR)", hippocampus, args.repeats),
        measure("chaos_01 (CT)", chaos, args.repeats),
        measure("chaos_01 at 512 x 512", upsampled(chaos, 512), args.repeats),
    ]
    print(write_results("review", "python benchmarks/bench_review.py", machine, rows, COLUMNS))


if __name__ == "__main__":
    main()
