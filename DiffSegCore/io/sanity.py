"""Is an input plausible, and is it like what the model was trained on? Refusals and warnings.

Refused (InputError): voxel spacings no scanner makes (they would make resampling allocate
terabytes or shrink the volume to one voxel). Warned (the run goes on, the warning is kept in the
run record): a label map given as the image, and an input far from the model's training data in
size, spacing, field of view or intensities. The model records what it was trained on in
model.json `training` (`training_envelope` computes it from the training images):

    intensity_percentiles  per channel [low, high]: the envelope of the cases' 0.5 / 99.5 percentiles
    size_range             [[x, y, z] smallest, [x, y, z] largest] in voxels
    spacing_range          the same in mm per voxel
    extent_range           the same in mm (the field of view: size x spacing)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DiffSegCore.errors import InputError, ModelError

SPACING_RANGE_MM = (1e-3, 1e3)  # a micrometre to a metre per voxel
FAR_FACTOR = 2.0  # "far" from a training range: beyond half its smallest or twice its largest value
LABEL_MAP_VALUES = 16  # an image has more distinct intensities than this; a label map has fewer
SAMPLE_VOXELS = 1 << 20
PERCENTILES = (0.5, 99.5)


def check_spacing(image: sitk.Image, path: str | Path) -> None:
    """Refuse a voxel spacing outside a micrometre..a metre: a broken header, or metres taken for millimetres."""
    low, high = SPACING_RANGE_MM
    spacing = image.GetSpacing()
    if not all(low <= s <= high for s in spacing):
        shown = " x ".join(f"{s:g}" for s in spacing)
        raise InputError(
            f"{path} has a voxel spacing of {shown} mm, which no scanner makes (expected {low:g} to {high:g} mm); "
            "fix the spacing in the file's header"
        )


def _sample(image: sitk.Image) -> np.ndarray:
    """Up to about SAMPLE_VOXELS voxels spread evenly over the volume (flattened)."""
    voxels = sitk.GetArrayViewFromImage(image).reshape(-1)
    return voxels[:: max(1, voxels.size // SAMPLE_VOXELS)]


def looks_like_label_map(image: sitk.Image) -> bool:
    """Whole numbers only, and so few distinct values that it holds classes, not intensities."""
    sample = _sample(image)
    values = np.unique(sample)
    return len(values) <= LABEL_MAP_VALUES and bool(np.all(values == np.round(values)))


def _intensity_warning(image: sitk.Image, name: str, envelope: list[float]) -> str | None:
    """The channel's robust range is far from the training envelope: entirely outside it, or reaching
    more than one envelope width beyond it."""
    low, high = envelope
    p_low, p_high = np.percentile(sitk.GetArrayViewFromImage(image), PERCENTILES)
    width = max(high - low, 1e-6)
    if p_high < low or p_low > high or p_low < low - width or p_high > high + width:
        return (
            f"channel {name} intensities ({p_low:.4g} to {p_high:.4g}) are far from the model's training range "
            f"({low:.4g} to {high:.4g}); check the modality and intensity scaling, the result may be unreliable"
        )
    return None


def _geometry_warning(what: str, unit: str, found: Iterable[float], allowed: list[list[float]]) -> str | None:
    """`found` per axis lies beyond FAR_FACTOR of the training range [smallest, largest] on some axis."""
    found, (smallest, largest) = list(found), allowed
    if all(lo / FAR_FACTOR <= v <= hi * FAR_FACTOR for v, lo, hi in zip(found, smallest, largest)):
        return None

    def shown(values) -> str:
        return " x ".join(f"{v:.3g}" for v in values)

    return (
        f"the input's {what} ({shown(found)} {unit}) is far from the model's training data "
        f"({shown(smallest)} to {shown(largest)} {unit}); the result may be unreliable, check that this is "
        "the kind of image the model was made for"
    )


def _checked_training(meta: dict) -> dict:
    training = meta.get("training") or {}
    envelopes = training.get("intensity_percentiles")
    if envelopes and (len(envelopes) != len(meta["channels"]) or any(len(e) != 2 for e in envelopes)):
        raise ModelError("model.json training.intensity_percentiles must hold one [low, high] pair per channel")
    for key in ("size_range", "spacing_range", "extent_range"):
        value = training.get(key)
        if value is not None and (len(value) != 2 or any(len(v) != 3 or min(v) <= 0 for v in value)):
            raise ModelError(f"model.json training.{key} must be [[x, y, z] smallest, [x, y, z] largest], all > 0")
    return training


def input_warnings(images: list[sitk.Image], paths: list[Path], meta: dict) -> list[str]:
    """What the user should know about these inputs (one channel per image, on one grid) before trusting
    the result: one line each."""
    training = _checked_training(meta)
    warnings = [
        f"{path} looks like a label map (a few whole-number values), not an image; pass the image to segment"
        for image, path in zip(images, paths)
        if looks_like_label_map(image)
    ]
    names = [c.get("name", "?") for c in meta["channels"]]
    for image, name, envelope in zip(images, names, training.get("intensity_percentiles") or []):
        warnings.append(_intensity_warning(image, name, envelope))
    reference = images[0]
    size, spacing = reference.GetSize(), reference.GetSpacing()
    extent = [n * s for n, s in zip(size, spacing)]
    for what, unit, found, key in (
        ("size", "voxels", size, "size_range"),
        ("voxel spacing", "mm", spacing, "spacing_range"),
        ("field of view", "mm", extent, "extent_range"),
    ):
        if training.get(key):
            warnings.append(_geometry_warning(what, unit, found, training[key]))
    return [w for w in warnings if w]


def training_envelope(cases: Iterable[list[sitk.Image]]) -> dict:
    """What a model's training images were like, in model.json `training`'s keys (see the module doc).

    Args:
        cases: per training case, one image per channel; an iterator is read one case at a time.
    """
    sizes, spacings, percentiles = [], [], []
    for case in cases:
        sizes.append(case[0].GetSize())
        spacings.append(case[0].GetSpacing())
        percentiles.append([np.percentile(sitk.GetArrayViewFromImage(image), PERCENTILES) for image in case])
    size, spacing, ranges = np.array(sizes, float), np.array(spacings, float), np.array(percentiles)  # ranges: (cases, C, 2)

    def number(value: float) -> float | int:
        return int(value) if float(value).is_integer() else round(float(value), 4)

    def span(values: np.ndarray) -> list[list[float | int]]:
        return [[number(v) for v in values.min(axis=0)], [number(v) for v in values.max(axis=0)]]

    return {
        "intensity_percentiles": [
            [number(ranges[:, c, 0].min()), number(ranges[:, c, 1].max())] for c in range(ranges.shape[1])
        ],
        "size_range": span(size),
        "spacing_range": span(spacing),
        "extent_range": span(size * spacing),
    }
