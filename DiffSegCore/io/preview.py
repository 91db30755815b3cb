"""A PNG montage for people who would rather look than read: image, contours, uncertainty.

Axial slices in the radiological convention (patient's right on the left, anterior at the top), the
model's classes in its own colours with a legend, and the uncertainty on the one fixed scale of
DiffSegCore/uncertainty.py, so that two previews can be compared.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
from matplotlib.patches import Patch

from DiffSegCore.io.atomic import atomic_path
from DiffSegCore.uncertainty import DEFAULT_THRESHOLD, DISPLAY_RANGE

# Axial slices of an LPS-ordered array ([k] = inferior to superior, rows = anterior to posterior,
# columns = right to left) drawn with the first row at the top are radiological views.
VIEW = "LPS"
EDGE_LABELS = {"top": "A", "bottom": "P", "left": "R", "right": "L"}


def preview_slices(labels: np.ndarray, count: int = 3) -> list[int]:
    """Axial (first-axis) slices spread over the segmented extent, or the middle of the volume."""
    occupied = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    lo, hi = (occupied[0], occupied[-1]) if occupied.size else (labels.shape[0] // 2, labels.shape[0] // 2)
    return sorted({round(v) for v in np.linspace(lo, hi, count + 2)[1:-1]})


def _axial(image: sitk.Image) -> np.ndarray:
    """The image's voxels (k, j, i) reoriented so that k runs inferior to superior, j anterior to posterior."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, VIEW))


def _orientation_labels(ax) -> None:
    for (x, y, ha, va), text in zip(
        [(0.5, 0.98, "center", "top"), (0.5, 0.02, "center", "bottom"), (0.02, 0.5, "left", "center"),
         (0.98, 0.5, "right", "center")],
        EDGE_LABELS.values(),
    ):
        ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=9, fontweight="bold")


def write_preview(image: sitk.Image, labels: sitk.Image, uncertainty: sitk.Image, classes: list[dict], path: Path) -> Path:
    """The preview_figure of a result, written as a PNG at `path` (atomically)."""
    fig = preview_figure(image, labels, uncertainty, classes)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def preview_figure(image: sitk.Image, labels: sitk.Image, uncertainty: sitk.Image, classes: list[dict]) -> plt.Figure:
    """Rows of slices: image with class contours on top, uncertainty heat map below.

    image, labels and uncertainty share one grid (the input's); classes are model.json's (value,
    name, color). The last column holds the class legend (top) and the uncertainty scale (bottom),
    so both rows have the same columns and line up. Uncertainty below the default threshold is not drawn.
    """
    pixels, label_array, spread = _axial(image), _axial(labels), _axial(uncertainty)
    spacing = sitk.DICOMOrient(labels, VIEW).GetSpacing()  # (i, j, k) in mm
    aspect = spacing[1] / spacing[0]  # keeps anatomy in proportion on anisotropic grids
    slices = preview_slices(label_array)
    fig, axes = plt.subplots(
        2, len(slices) + 1, figsize=(3 * len(slices) + 2, 6), squeeze=False,
        gridspec_kw={"width_ratios": [1] * len(slices) + [0.45]},
    )
    low, high = DISPLAY_RANGE
    for col, z in enumerate(slices):
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(pixels[z], cmap="gray", aspect=aspect)
        for cls in classes:
            mask = label_array[z] == int(cls["value"])
            if mask.any():
                top.contour(mask, levels=[0.5], colors=[tuple(cls.get("color", (1, 0, 0)))], linewidths=1.2)
        bottom.imshow(pixels[z], cmap="gray", aspect=aspect)
        heat = bottom.imshow(
            np.ma.masked_less(spread[z], DEFAULT_THRESHOLD), cmap="inferno", alpha=0.8, vmin=low, vmax=high, aspect=aspect
        )
        top.set_title(f"axial slice {z}")
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
            _orientation_labels(ax)
    legend_ax, scale_ax = axes[0, -1], axes[1, -1]
    legend_ax.axis("off")
    legend_ax.legend(
        handles=[Patch(color=tuple(c.get("color", (1, 0, 0))), label=c["name"]) for c in classes],
        loc="center left", fontsize=8, frameon=False,
    )
    scale_ax.axis("off")
    fig.colorbar(heat, ax=scale_ax, fraction=0.5, label="uncertainty (variance across members)")
    fig.suptitle("DiffSeg: segmentation (top) and uncertainty (bottom, 0.5 = members split half and half)")
    return fig
