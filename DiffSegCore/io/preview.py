"""A PNG montage for people who would rather look than read: image, contours, uncertainty."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from DiffSegCore.io.atomic import atomic_path


def preview_slices(labels: np.ndarray, count: int = 3) -> list[int]:
    """Axial (first-axis) slices spread over the segmented extent, or the middle of the volume."""
    occupied = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    lo, hi = (occupied[0], occupied[-1]) if occupied.size else (labels.shape[0] // 2, labels.shape[0] // 2)
    return sorted({round(v) for v in np.linspace(lo, hi, count + 2)[1:-1]})


def write_preview(image: np.ndarray, labels: np.ndarray, uncertainty: np.ndarray, colors: list, path: Path) -> Path:
    """Rows of slices: image with class contours on top, uncertainty heat map below."""
    slices = preview_slices(labels)
    fig, axes = plt.subplots(2, len(slices), figsize=(3 * len(slices), 6), squeeze=False)
    vmax = float(uncertainty.max()) or 1.0
    for col, z in enumerate(slices):
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(image[z], cmap="gray")
        for value, color in enumerate(colors, start=1):
            if (labels[z] == value).any():
                top.contour(labels[z] == value, levels=[0.5], colors=[color], linewidths=1.2)
        bottom.imshow(image[z], cmap="gray")
        heat = bottom.imshow(uncertainty[z], cmap="inferno", alpha=0.75, vmin=0, vmax=vmax)
        top.set_title(f"slice {z}")
        for ax in (top, bottom):
            ax.axis("off")
    fig.colorbar(heat, ax=axes[1, :].tolist(), shrink=0.8, label="variance across members")
    fig.suptitle("DiffSeg: segmentation (top) and uncertainty (bottom)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
