"""Bring volumes to a model's spec (spacing, intensity normalisation) and results back."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from DiffSegCore.errors import InputError, ModelError
from DiffSegCore.io.volumes import to_array


def needs_resampling(image: sitk.Image, spacing: list[float] | None) -> bool:
    return spacing is not None and not np.allclose(image.GetSpacing(), spacing, rtol=1e-6, atol=1e-9)


def resample_to_spacing(image: sitk.Image, spacing: list[float] | None, is_label: bool = False) -> sitk.Image:
    """Resample onto a grid with the model's spacing, same origin and direction, same extent."""
    if not needs_resampling(image, spacing):
        return image
    size = [max(1, round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        interpolator,
        image.GetOrigin(),
        tuple(spacing),
        image.GetDirection(),
        0.0,
        image.GetPixelID(),
    )


def resample_like(image: sitk.Image, reference: sitk.Image, is_label: bool) -> sitk.Image:
    """Resample a result back onto the input's exact grid (labels nearest, maps linear)."""
    if image.GetSize() == reference.GetSize() and image.GetSpacing() == reference.GetSpacing():
        result = sitk.Image(image)
        result.CopyInformation(reference)
        return result
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, image.GetPixelID())


def normalise(array: np.ndarray, spec: dict) -> np.ndarray:
    """Intensity normalisation as the model's channel spec says.

    kinds: 'percentile_zscore' (MR: clip to percentiles, then z-score),
    'window_zscore' (CT: clip to a fixed window, then z-score), 'zscore'.
    """
    kind = spec.get("kind", "percentile_zscore")
    if kind == "percentile_zscore":
        lo, hi = np.percentile(array, [spec.get("lower", 0.5), spec.get("upper", 99.5)])
        array = np.clip(array, lo, hi)
    elif kind == "window_zscore":
        lo, hi = spec["window"]
        array = np.clip(array, lo, hi)
    elif kind != "zscore":
        raise InputError(f"unknown normalisation '{kind}' in the model's channel spec")
    std = float(array.std())
    return ((array - array.mean()) / (std if std > 1e-8 else 1.0)).astype(np.float32)


def intensity_warnings(images: list[sitk.Image], meta: dict) -> list[str]:
    """Channels whose robust intensity range (0.5-99.5 percentiles) is far from what the model was trained on.

    The model records per channel the envelope of the training cases' percentiles in
    meta["training"]["intensity_percentiles"] = [[low, high], ...]; "far" means lying entirely outside
    it, or reaching more than one envelope width beyond it.
    """
    envelopes = (meta.get("training") or {}).get("intensity_percentiles")
    if not envelopes:
        return []
    if len(envelopes) != len(meta["channels"]) or any(len(e) != 2 for e in envelopes):
        raise ModelError("model.json training.intensity_percentiles must hold one [low, high] pair per channel")
    warnings = []
    for image, channel, (low, high) in zip(images, meta["channels"], envelopes):
        p_low, p_high = np.percentile(sitk.GetArrayViewFromImage(image), [0.5, 99.5])
        width = max(high - low, 1e-6)
        if p_high < low or p_low > high or p_low < low - width or p_high > high + width:
            warnings.append(
                f"channel {channel.get('name', '?')} intensities ({p_low:.4g} to {p_high:.4g}) are far from the "
                f"model's training range ({low:.4g} to {high:.4g}); check the modality and intensity scaling, "
                "the result may be unreliable"
            )
    return warnings


def coordinate_channels(shape: tuple[int, int, int]) -> torch.Tensor:
    """Global voxel coordinates in [-1, 1] per axis (bieder2023).

    MONAI's AddCoordinateChannels uses [-0.5, 0.5]; PatchDDM trains on [-1, 1].

    Args:
        shape: the volume's size S = (z, y, x).

    Returns:
        float32 coordinates, (3, *S); an axis of size 1 is all 0.
    """
    axes = [torch.linspace(-1.0, 1.0, n) if n > 1 else torch.zeros(1) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def prepare_image(images: list[sitk.Image], meta: dict) -> tuple[torch.Tensor, sitk.Image]:
    """Channels resampled and normalised to the model spec.

    Args:
        images: one 3D volume per channel of meta["channels"], on one grid.
        meta: the model's metadata (channels with their normalisation, spacing).

    Returns:
        the float32 image, (C, z, y, x), and the first channel resampled, whose grid it lies on.
    """
    channels = meta["channels"]
    if len(images) != len(channels):
        names = ", ".join(c.get("name", "?") for c in channels)
        raise InputError(f"the model needs {len(channels)} channel(s) ({names}) but {len(images)} were given")
    resampled = [resample_to_spacing(image, meta.get("spacing")) for image in images]
    arrays = [normalise(to_array(img), ch.get("normalisation", {})) for img, ch in zip(resampled, channels)]
    return torch.from_numpy(np.stack(arrays)), resampled[0]
