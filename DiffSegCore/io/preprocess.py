"""Bring volumes to a model's spec (spacing, intensity normalisation) and results back."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from DiffSegCore.errors import InputError
from DiffSegCore.io.volumes import to_array

MAX_RESAMPLED_VOXELS = 2**31  # more than any scan at any model spacing; past it, resampling cannot allocate


def needs_resampling(image: sitk.Image, spacing: list[float] | None) -> bool:
    return spacing is not None and not np.allclose(image.GetSpacing(), spacing, rtol=1e-6, atol=1e-9)


def resample_to_spacing(image: sitk.Image, spacing: list[float] | None, is_label: bool = False) -> sitk.Image:
    """Resample onto a grid with the model's spacing, same origin and direction, same extent."""
    if not needs_resampling(image, spacing):
        return image
    size = [max(1, round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    if np.prod(size, dtype=float) > MAX_RESAMPLED_VOXELS:
        shown = " x ".join(map(str, image.GetSize()))
        raise InputError(
            f"at the model's spacing of {' x '.join(f'{t:g}' for t in spacing)} mm, the {shown} voxel volume would "
            f"become {' x '.join(map(str, size))} voxels; check the voxel spacing in the file's header"
        )
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
