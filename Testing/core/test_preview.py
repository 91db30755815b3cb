"""The preview PNG's figure: rows aligned, the model's classes and colours in a legend, radiological
orientation with labels, and the one fixed uncertainty scale."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.colors import to_rgba

from DiffSegCore.io.preview import EDGE_LABELS, preview_figure, write_preview
from DiffSegCore.uncertainty import DISPLAY_RANGE

CLASSES = [{"value": 1, "name": "Liver", "color": [0.9, 0.3, 0.2]}, {"value": 2, "name": "Spleen", "color": [0.2, 0.5, 0.9]}]


def image_of(array: np.ndarray) -> sitk.Image:
    """A volume whose first index axis runs towards the patient's right (LPS x falling): not stored radiologically."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


@pytest.fixture
def figure():
    shape = (12, 20, 24)  # (k, j, i)
    labels = np.zeros(shape, np.uint8)
    labels[3:9, 5:12, 2:7] = 1  # low i: the patient's left, as i runs to the right
    labels[3:9, 5:12, 15:20] = 2
    spread = np.zeros(shape, np.float32)
    spread[3:9, 5:12, 6:8] = 0.3
    pixels = np.random.default_rng(0).random(shape).astype(np.float32)
    fig = preview_figure(image_of(pixels), image_of(labels), image_of(spread), CLASSES)
    yield fig
    plt.close(fig)


def test_rows_line_up_and_the_last_column_holds_legend_and_scale(figure):
    slices = [ax for ax in figure.axes if ax.get_title().startswith("axial slice")]
    tops = sorted(slices, key=lambda ax: ax.get_position().x0)
    images = [ax for ax in figure.axes if ax.images and ax not in slices]  # the uncertainty row
    assert len(tops) == len(images) >= 1
    for top, bottom in zip(tops, sorted(images, key=lambda ax: ax.get_position().x0)):
        assert top.get_position().x0 == pytest.approx(bottom.get_position().x0)
        assert top.get_position().width == pytest.approx(bottom.get_position().width)
        assert {t.get_text() for t in top.texts} == set(EDGE_LABELS.values()) == {t.get_text() for t in bottom.texts}
        assert bottom.images[-1].get_clim() == pytest.approx(DISPLAY_RANGE)  # one scale for every case


def test_legend_names_the_classes_in_their_colours(figure):
    legend = next(ax.get_legend() for ax in figure.axes if ax.get_legend() is not None)
    assert [t.get_text() for t in legend.get_texts()] == [c["name"] for c in CLASSES]
    for patch, cls in zip(legend.get_patches(), CLASSES):
        assert patch.get_facecolor() == pytest.approx(to_rgba(cls["color"]))


def test_radiological_orientation(figure):
    """Class 1 lies on the patient's left: right of the image centre, on the side labelled L."""
    top = next(ax for ax in figure.axes if ax.get_title().startswith("axial slice"))
    contour_x = {}
    for collection in top.collections:
        colour = tuple(np.round(collection.get_edgecolor()[0][:3], 3))
        xs = np.concatenate([path.vertices[:, 0] for path in collection.get_paths()])
        contour_x[colour] = xs.mean()
    width = top.images[0].get_array().shape[1]
    assert contour_x[tuple(np.round(CLASSES[0]["color"], 3))] > width / 2 > contour_x[tuple(np.round(CLASSES[1]["color"], 3))]
    assert next(t for t in top.texts if t.get_text() == "L").get_position()[0] > 0.5


def test_write_preview_writes_a_png(tmp_path):
    array = np.zeros((6, 8, 8), np.uint8)
    array[2:4, 2:6, 2:6] = 1
    path = write_preview(image_of(array.astype(np.float32)), image_of(array), image_of(array * 0.2), CLASSES, tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
