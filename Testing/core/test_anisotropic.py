"""Large anisotropic volumes (abdominal MR at 1.25 x 1.25 x 7.7 mm): resampling to a model's spacing and
back, coordinate channels of training patches against whole-volume inference, sliding windows on
anisotropic patches."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from DiffSegCore.inference.ensemble import predict_volume
from DiffSegCore.inference.predictor import conditioning, evaluate_network
from DiffSegCore.io.preprocess import coordinate_channels, resample_like, resample_to_spacing
from DiffSegCore.models.bundle import load_bundle
from DiffSegCore.networks.unet import build_network
from DiffSegCore.settings import resolve
from DiffSegCore.training.cache import CachedCase
from DiffSegCore.training.samples import TrainingSamples

# A CHAOS-like grid, scaled down: thin in-plane voxels, thick slices, a slightly oblique direction (chaos_21).
SIZE_XYZ = (72, 64, 10)
SPACING = (1.25, 1.25, 7.7)
MODEL_SPACING = [2.5, 2.5, 7.7]
ORIGIN = (-234.6, 211.7, -147.2)
ANGLE = 0.02
DIRECTION = (np.cos(ANGLE), 0.0, np.sin(ANGLE), 0.0, -1.0, 0.0, -np.sin(ANGLE), 0.0, np.cos(ANGLE))


def _grid(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def _organs() -> np.ndarray:
    """Four ellipsoid 'organs' (1-4) on the (z, y, x) grid, each many model voxels across."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=float) for n in SIZE_XYZ[::-1]], indexing="ij")
    labels = np.zeros(SIZE_XYZ[::-1], np.uint8)
    for value, (cz, cy, cx, rz, ry, rx) in enumerate(
        [(5, 20, 20, 4, 14, 16), (5, 45, 15, 3, 8, 6), (5, 45, 55, 3, 8, 6), (4, 20, 56, 3, 10, 9)], start=1
    ):
        labels[((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1] = value
    return labels


def _dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    return 2 * float(((a == value) & (b == value)).sum()) / float((a == value).sum() + (b == value).sum())


def test_anisotropic_round_trip_keeps_geometry_labels_and_maps():
    labels = _grid(_organs())
    on_model = resample_to_spacing(labels, MODEL_SPACING, is_label=True)
    # In-plane halved, slices kept: the model grid is 36 x 32 x 10 voxels.
    assert on_model.GetSize() == (36, 32, 10)
    assert set(np.unique(sitk.GetArrayFromImage(on_model))) == {0, 1, 2, 3, 4}  # nearest: no new values
    back = resample_like(on_model, labels, is_label=True)
    for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(back, getter)() == getattr(labels, getter)()
    assert back.GetPixelID() == labels.GetPixelID()
    truth, result = sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(back)
    assert min(_dice(result, truth, v) for v in range(1, 5)) > 0.9

    # Maps go linear: an in-plane ramp (linear in the voxel index) comes back unchanged inside the volume.
    ramp = np.broadcast_to(np.arange(SIZE_XYZ[0], dtype=np.float32) * 0.5, SIZE_XYZ[::-1]).copy()
    ramp_back = resample_like(resample_to_spacing(_grid(ramp), MODEL_SPACING), _grid(ramp), is_label=False)
    assert ramp_back.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(sitk.GetArrayFromImage(ramp_back)[:, :-2, 1:-2], ramp[:, :-2, 1:-2], atol=1e-3)


def test_patch_coordinates_equal_the_whole_volume_conditioning_at_the_patch(tmp_path):
    shape = (10, 20, 14)  # (z, y, x), anisotropic like a model grid of abdominal MR
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape)  # each voxel's value is its index
    np.savez(tmp_path / "case.npz", image=image, label=np.zeros(shape, np.uint8))
    samples = TrainingSamples(
        [CachedCase("case", tmp_path / "case.npz")], (4, 8, 6), seed=3, augment=False, coords=True
    )
    network = build_network(
        {"kind": "diffusion", "image_channels": 1, "num_classes": 3, "coords": True, "widths": [8, 16]}
    )
    whole = conditioning(network, torch.from_numpy(image))
    assert whole.shape == (4, *shape)
    for k in range(5):
        patch, _ = samples[k]
        z, y, x = np.unravel_index(int(patch[0, 0, 0, 0]), shape)
        crop = whole[:, z : z + 4, y : y + 8, x : x + 6]
        assert torch.equal(patch[0], crop[0])  # the patch is where its first voxel says
        torch.testing.assert_close(patch[1:], crop[1:], rtol=0, atol=1e-6)


class CoordinateProbe(torch.nn.Module):
    """A 'network' that returns the coordinate channels it is given: shows what each window saw."""

    def forward(self, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        return x[:, 1:4]


def test_sliding_window_on_anisotropic_patches_sees_global_coordinates():
    shape = (10, 40, 28)
    cond = torch.cat([torch.randn(1, *shape), coordinate_channels(shape)])[None]
    out = evaluate_network(CoordinateProbe(), cond, torch.zeros(1, dtype=torch.long), window=(4, 16, 8))
    assert out.shape == (1, 3, *shape)
    torch.testing.assert_close(out[0], coordinate_channels(shape), rtol=0, atol=1e-5)


def test_sliding_window_equals_whole_volume_inference_where_both_fit(bundle_factory):
    shape = (6, 20, 12)
    bundle = load_bundle(
        bundle_factory(
            "coords_window",
            network={"kind": "diffusion", "widths": [8, 16], "time_dim": 16, "coords": True},
            window=list(shape),
        )
    )
    image = torch.randn(1, *shape)
    full = predict_volume(bundle, image, resolve(bundle.meta, {"window": "full", "ensemble": 2, "steps": 2, "precision": "float32"}))
    sliding = predict_volume(bundle, image, resolve(bundle.meta, {"window": "sliding", "ensemble": 2, "steps": 2, "precision": "float32"}))
    assert full.mean_probs.shape == (3, *shape)
    torch.testing.assert_close(sliding.mean_probs, full.mean_probs, rtol=0, atol=1e-5)
    assert torch.equal(sliding.labels, full.labels)
