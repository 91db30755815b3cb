"""Per-segment review figures from the written outputs: volume, uncertainty inside and on the boundary,
and the most uncertain regions with their centres in physical (LPS) coordinates.

Computed once here, on the input grid the outputs are written on, and stored in the run record; the
Slicer panel and the batch script read them from there. Torch-free: numpy and SimpleITK only.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from DiffSegCore.uncertainty import DEFAULT_THRESHOLD

MAX_REGIONS = 5  # regions kept per segment, most uncertain first


def _face_neighbours(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel: has a face neighbour inside `mask`, has one outside; beyond the volume's edge counts as neither.

    Hand-written with array shifts: SimpleITK's binary erosion and dilation would do it in four filter
    calls with its own edge rule; six shifts keep the edge rule explicit.
    """
    any_in = np.zeros_like(mask)
    any_out = np.zeros_like(mask)
    padded = np.pad(mask, 1, mode="edge")  # a voxel past the edge copies the edge voxel: no boundary there
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    for axis in range(mask.ndim):
        for step in (-1, 1):
            neighbour = np.roll(padded, step, axis=axis)[core]
            any_in |= neighbour
            any_out |= ~neighbour
    return any_in, any_out


def boundary_band(mask: np.ndarray) -> np.ndarray:
    """The voxels on either side of the segment's surface: inside with a face neighbour outside, or
    outside with a face neighbour inside (where members disagree about the contour, on both sides)."""
    any_in, any_out = _face_neighbours(mask)
    return (mask & any_out) | (~mask & any_in)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def uncertain_regions(
    zone: np.ndarray,
    uncertainty: np.ndarray,
    reference: sitk.Image,
    threshold: float,
    voxel_ml: float,
    offset: tuple[int, ...] = (0, 0, 0),
) -> list[dict]:
    """Face-connected regions of `zone` voxels at or above `threshold`, most uncertain first (largest
    summed uncertainty), at most MAX_REGIONS; each with its uncertainty-weighted centre in LPS (mm).

    `zone` and `uncertainty` may be a crop of the reference grid starting at voxel `offset` (k, j, i).
    """
    hot = zone & (uncertainty >= threshold)
    if not hot.any():
        return []
    labeller = sitk.ConnectedComponentImageFilter()  # face-connected (not fully connected)
    labeller.SetNumberOfWorkUnits(1)  # one piece: ITK starting its threads costs 20x the labelling of a small crop
    components = labeller.Execute(sitk.GetImageFromArray(hot.astype(np.uint8)))
    ids = sitk.GetArrayViewFromImage(components)
    count = int(ids.max())
    weights = np.where(hot, uncertainty, 0.0).astype(np.float64)
    totals = np.bincount(ids.ravel(), weights.ravel(), minlength=count + 1)[1:]
    sizes = np.bincount(ids.ravel(), minlength=count + 1)[1:]
    regions = []
    for index in np.argsort(-totals, kind="stable")[:MAX_REGIONS]:
        where = np.nonzero(ids == index + 1)  # (k, j, i) arrays
        w = weights[where]
        centre_kji = [float((axis * w).sum() / w.sum()) + start for axis, start in zip(where, offset)]
        centre = reference.TransformContinuousIndexToPhysicalPoint(centre_kji[::-1])
        regions.append({
            "centre_lps": [round(float(c), 3) for c in centre],
            "volume_ml": round(float(sizes[index]) * voxel_ml, 6),
            "mean_uncertainty": float(w.mean()),
            "peak_uncertainty": float(w.max()),
        })
    return regions


def _box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The mask's bounding box grown by one voxel (so it holds the boundary band), or None if it is empty."""
    box = []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if occupied.size == 0:
            return None
        box.append(slice(max(occupied[0] - 1, 0), min(occupied[-1] + 2, mask.shape[axis])))
    return tuple(box)


def segment_review(
    labels: sitk.Image, uncertainty: sitk.Image, classes: list[dict], threshold: float = DEFAULT_THRESHOLD
) -> list[dict]:
    """One entry per model class (background excluded), in the model's order.

    Args:
        labels: the written label map (input grid).
        uncertainty: the written uncertainty volume, on the same grid.
        classes: model.json's classes (value, name).
        threshold: uncertainty at which a voxel counts towards an uncertain region.

    Each entry: value, name, voxels, volume_ml, mean_uncertainty (inside the segment),
    boundary_uncertainty (mean over boundary_band), regions (uncertain_regions of the segment with
    its boundary band). Means are None for an empty segment.
    """
    label_array = sitk.GetArrayViewFromImage(labels)
    spread = sitk.GetArrayViewFromImage(uncertainty)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    review = []
    for cls in classes:
        entry = {"value": int(cls["value"]), "name": cls["name"], "voxels": 0, "volume_ml": 0.0}
        whole = label_array == int(cls["value"])
        box = _box(whole)
        if box is None:
            review.append({**entry, "mean_uncertainty": None, "boundary_uncertainty": None, "regions": []})
            continue
        # Everything else within the segment's box: the work scales with the segment, not the volume.
        mask, local = whole[box], spread[box].astype(np.float64)
        band = boundary_band(mask)
        offset = tuple(int(b.start) for b in box)
        review.append({
            **entry,
            "voxels": int(mask.sum()),
            "volume_ml": round(float(mask.sum()) * voxel_ml, 6),
            "mean_uncertainty": _mean(local[mask]),
            "boundary_uncertainty": _mean(local[band]),
            "regions": uncertain_regions(mask | band, local, labels, threshold, voxel_ml, offset),
        })
    return review
