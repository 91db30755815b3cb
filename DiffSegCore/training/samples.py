"""Training samples: augmentation, coordinate channels and (centre-biased) patch selection.

Every sample's randomness comes from (seed, sample index) alone, so a resumed or distributed run
draws exactly the samples an uninterrupted single-process run would.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialCropd,
    SpatialPadd,
)
from torch.utils.data import Dataset

from DiffSegCore.training.cache import CachedCase


def augmentation(enabled: bool = True, affine_prob: float = 0.5, mirror_axes: tuple[int, ...] = ()) -> Compose:
    """Spatial (rotation, scaling, translation, mirroring) and intensity augmentation (fu2023 section 4).

    mirror_axes: spatial axes of the (C, z, y, x) sample, each mirrored with probability 0.5 (as
    nnU-Net does), so that test-time members may mirror their input along the same axes.
    """
    if not enabled:
        return Compose([])
    keys = ("image", "label")
    return Compose(
        [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in mirror_axes]
        + [
            RandAffined(
                keys,
                prob=affine_prob,
                rotate_range=(0.26, 0.26, 0.26),
                scale_range=(0.1, 0.1, 0.1),
                translate_range=(3, 3, 3),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
            RandAdjustContrastd("image", gamma=(0.8, 1.25), prob=0.3),
            RandGaussianNoised("image", std=0.05, prob=0.2),
        ]
    )


def coordinates(shape: tuple[int, ...]) -> torch.Tensor:
    """Global coordinate channels (3, *shape) in [-1, 1] of a whole volume of size `shape` (bieder2023).

    Imported lazily because preprocess pulls in SimpleITK, which a run from a finished cache does not need.
    """
    from DiffSegCore.io.preprocess import coordinate_channels

    return coordinate_channels(tuple(shape))


def patch_centre(shape: tuple[int, ...], size: tuple[int, ...], rng: np.random.Generator, bias: float) -> list[int]:
    """A patch centre drawn from a normal around the volume centre (PatchDDM's centre-biased
    sampling), with standard deviation `bias` times the room the patch has, clipped to the volume."""
    centre = []
    for n, s in zip(shape, size):
        low, high = s // 2, max(n - (s - s // 2), s // 2)
        mid = (low + high) / 2
        value = rng.normal(mid, max(bias * (high - low), 1e-6)) if high > low else mid
        centre.append(round(min(max(value, low), high)))
    return centre


def _plain(value) -> torch.Tensor:
    """A plain tensor from MONAI's MetaTensor output (its metadata is not needed for training)."""
    return value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)


class TrainingSamples(Dataset):
    """Sample k: a case drawn with rng(seed, k), augmented, with coordinates, cut to `size`.

    Item k is (image float32 (C (+ 3 coordinates), *size), label uint8 (1, *size)); volumes smaller
    than `size` are padded (image: edge values, label: background).
    """

    def __init__(
        self,
        cases: list[CachedCase],
        size: tuple[int, int, int],
        seed: int,
        augment: bool = True,
        coords: bool = False,
        centre_bias: float = 0.25,
        affine_prob: float = 0.5,
        mirror_axes: tuple[int, ...] = (),
    ):
        self.cases, self.size, self.seed = cases, tuple(size), seed
        self.transform = augmentation(augment, affine_prob, mirror_axes)
        self.coords, self.centre_bias = coords, centre_bias
        self.pad = SpatialPadd(("image", "label"), spatial_size=self.size, mode=("edge", "constant"))

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(k)])
        image, label = self.cases[int(rng.integers(len(self.cases)))].load()
        self.transform.set_random_state(seed=int(rng.integers(2**31)))
        data = self.transform({"image": torch.from_numpy(image), "label": torch.from_numpy(label[None])})
        image = _plain(data["image"]).float()
        if self.coords:
            image = torch.cat([image, coordinates(image.shape[1:])])
        data = self.pad({"image": image, "label": _plain(data["label"])})
        centre = patch_centre(data["image"].shape[1:], self.size, rng, self.centre_bias)
        data = SpatialCropd(("image", "label"), roi_center=centre, roi_size=self.size)(data)
        return _plain(data["image"]).float(), _plain(data["label"]).to(torch.uint8)
