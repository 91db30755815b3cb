"""Independent recomputation of the review figures, for the core and scene tests.

Other means than the core uses: the boundary with SimpleITK's binary erosion and dilation (the core
shifts arrays), the regions with a breadth-first flood fill (the core uses SimpleITK's connected
components), physical points with origin + direction * (spacing * index).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import SimpleITK as sitk


def physical(image: sitk.Image, kji) -> np.ndarray:
    """LPS point of a (k, j, i) continuous index, written out from the header."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + direction @ (np.array(image.GetSpacing()) * np.array(kji)[::-1])


def band_by_morphology(mask: np.ndarray) -> np.ndarray:
    """Both sides of the surface: dilation minus erosion with a face-neighbour (cross) kernel."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    dilated = sitk.BinaryDilate(image, [1, 1, 1], sitk.sitkCross, 0, 1)
    eroded = sitk.BinaryErode(image, [1, 1, 1], sitk.sitkCross, 0, 1, True)  # past the edge counts as inside
    return sitk.GetArrayFromImage(dilated).astype(bool) & ~sitk.GetArrayFromImage(eroded).astype(bool)


def flood_regions(hot: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """Face-connected components of `hot`, as lists of (k, j, i)."""
    seen = np.zeros_like(hot)
    regions = []
    for start in zip(*np.nonzero(hot)):
        if seen[start]:
            continue
        seen[start] = True
        queue, voxels = deque([start]), []
        while queue:
            voxel = queue.popleft()
            voxels.append(voxel)
            for axis in range(3):
                for step in (-1, 1):
                    n = list(voxel)
                    n[axis] += step
                    n = tuple(n)
                    if all(0 <= n[a] < hot.shape[a] for a in range(3)) and hot[n] and not seen[n]:
                        seen[n] = True
                        queue.append(n)
        regions.append(voxels)
    return regions


def ranked_regions(mask: np.ndarray, spread: np.ndarray, threshold: float, limit: int) -> list[dict]:
    """The regions the review should list for a segment's `mask`: hot voxels of the segment and its boundary
    band, most uncertain (summed) first; each with its voxels, their uncertainties and the weighted centre (k, j, i)."""
    hot = (mask | band_by_morphology(mask)) & (spread >= threshold)
    regions = []
    for voxels in sorted(flood_regions(hot), key=lambda r: -sum(spread[v] for v in r))[:limit]:
        weights = np.array([spread[v] for v in voxels])
        centre = (np.array(voxels) * weights[:, None]).sum(0) / weights.sum()
        regions.append({"voxels": voxels, "weights": weights, "centre_kji": centre})
    return regions
