"""Property-based: resampling to the model's spacing and back keeps the input's grid exactly."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from DiffSegCore.io.preprocess import resample_like, resample_to_spacing

spacings = st.tuples(*[st.floats(0.25, 4.0, allow_nan=False)] * 3)
sizes = st.tuples(*[st.integers(2, 12)] * 3)
origins = st.tuples(*[st.floats(-500.0, 500.0, allow_nan=False)] * 3)
_NEGLIGIBLE_COSINE = float(np.sqrt(np.finfo(np.float64).tiny))


@st.composite
def directions(draw) -> tuple[float, ...]:
    """A random rotation (unit quaternion), possibly with one axis flipped (a left-handed grid)."""
    q = np.array(draw(st.tuples(*[st.floats(-1.0, 1.0)] * 4)))
    if np.linalg.norm(q) < 1e-3:
        q = np.array([1.0, 0.0, 0.0, 0.0])
    w, x, y, z = q / np.linalg.norm(q)
    rotation = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    if draw(st.booleans()):
        rotation[:, draw(st.integers(0, 2))] *= -1
    # ITK inverts direction x spacing with an SVD that squares the entries: a cosine below sqrt of the
    # smallest normal double (about 1.5e-154, e.g. 5e-298) underflows there, the inverse comes out NaN and
    # every point maps outside the image. No file carries such a cosine (an angle of 1e-154 rad is 0); flush to 0.
    rotation[np.abs(rotation) < _NEGLIGIBLE_COSINE] = 0.0
    return tuple(rotation.ravel())


def image(size, spacing, origin, direction, labels: bool, seed: int = 0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    shape = size[::-1]
    array = rng.integers(0, 3, shape).astype(np.uint8) if labels else rng.random(shape, dtype=np.float32)
    result = sitk.GetImageFromArray(array)
    result.SetSpacing(spacing)
    result.SetOrigin(origin)
    result.SetDirection(direction)
    return result


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and a.GetSpacing() == b.GetSpacing()
        and a.GetOrigin() == b.GetOrigin()
        and a.GetDirection() == b.GetDirection()
    )


@settings(max_examples=60, deadline=None)
@given(sizes, spacings, origins, directions(), spacings, st.booleans())
def test_round_trip_restores_the_exact_grid(size, spacing, origin, direction, model_spacing, labels):
    original = image(size, spacing, origin, direction, labels)
    on_model_grid = resample_to_spacing(original, list(model_spacing), is_label=labels)
    # The model grid keeps origin and direction and has the model's spacing.
    assert on_model_grid.GetOrigin() == original.GetOrigin()
    assert on_model_grid.GetDirection() == original.GetDirection()
    assert np.allclose(on_model_grid.GetSpacing(), model_spacing, rtol=1e-12)
    back = resample_like(on_model_grid, original, is_label=labels)
    assert same_grid(back, original)
    assert back.GetPixelID() == original.GetPixelID()


@settings(max_examples=40, deadline=None)
@given(sizes, spacings, origins, directions(), st.tuples(*[st.integers(1, 3)] * 3))
def test_labels_survive_an_integer_upsampling_round_trip(size, spacing, origin, direction, factors):
    # Upsampling by whole factors puts every input voxel centre on a model voxel centre, so nearest
    # neighbour there and back must return every label unchanged, whatever the orientation.
    labels = image(size, spacing, origin, direction, labels=True, seed=sum(size))
    model_spacing = [s / f for s, f in zip(spacing, factors)]
    back = resample_like(resample_to_spacing(labels, model_spacing, is_label=True), labels, is_label=True)
    assert same_grid(back, labels)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))


@settings(max_examples=30, deadline=None)
@given(sizes, spacings, origins, directions())
def test_model_spacing_equal_to_the_input_is_an_exact_no_op(size, spacing, origin, direction):
    original = image(size, spacing, origin, direction, labels=False)
    back = resample_like(resample_to_spacing(original, list(spacing)), original, is_label=False)
    assert same_grid(back, original)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original))
