"""The uncertainty overlay and the review of a result on a real slicer-core scene with slice views.

Display: fixed scale, threshold, opacity, colour legend, 3D surfaces. Review: the table's figures
against numbers computed here from the nodes' voxels, and the slice views centred on the most
uncertain region of a segment, then on the next one.
"""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk
from conftest import CLASSES, SEED, labelmap_of
from DiffSegLib import scene as bridge
from DiffSegLib.logic import SegmentationLogic
from DiffSegLib.review import RegionWalk, Review, centre_on_region
from views import add_slice_views

from DiffSegCore.uncertainty import DEFAULT_THRESHOLD, DISPLAY_RANGE
from Testing.review_helpers import band_by_morphology, ranked_regions


def ras_of_index(node, kji) -> np.ndarray:
    """RAS point of a continuous (k, j, i) index through the node's own IJK-to-RAS matrix."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array(matrix.MultiplyPoint([*reversed([float(v) for v in kji]), 1.0])[:3])


@pytest.fixture
def result(scene, volume, tiny_bundle):
    views = add_slice_views(scene)
    logic = SegmentationLogic(scene)
    segmentation, uncertainty = logic.process(
        volume, str(tiny_bundle), steps=2, ensemble=3, sampler="ddim", device="cpu", seed=SEED
    )
    return views, logic.activeRun, segmentation, uncertainty


def test_overlay_fixed_scale_threshold_opacity_and_legend(result, volume):
    views, _, segmentation, uncertainty = result
    display = uncertainty.GetDisplayNode()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx(DISPLAY_RANGE)
    assert not display.GetAutoWindowLevel()
    assert display.GetApplyThreshold() and not display.GetAutoThreshold()
    assert display.GetLowerThreshold() == pytest.approx(DEFAULT_THRESHOLD)
    assert display.GetUpperThreshold() >= bridge.THRESHOLD_CEILING
    for _, composite in views.values():
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetForegroundVolumeID() == uncertainty.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.5)

    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(uncertainty)
    assert legend is not None and legend.IsA("vtkMRMLColorLegendDisplayNode")
    assert legend.GetPrimaryDisplayNode() is display and legend.GetVisibility2D() and not legend.GetVisibility3D()

    bridge.set_uncertainty_threshold(uncertainty, 0.2)
    bridge.set_uncertainty_opacity(uncertainty, 0.8)
    assert display.GetLowerThreshold() == pytest.approx(0.2)
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx(DISPLAY_RANGE)  # scale stays
    assert all(c.GetForegroundOpacity() == pytest.approx(0.8) for _, c in views.values())

    bridge.show_segmentation_3d(segmentation)
    assert segmentation.GetSegmentation().ContainsRepresentation("Closed surface")
    assert segmentation.GetDisplayNode().GetVisibility3D()
    bridge.show_segmentation_3d(segmentation, False)
    assert not segmentation.GetDisplayNode().GetVisibility3D()


def test_review_table_and_centring_on_the_most_uncertain_regions(result, volume):
    views, run, segmentation, uncertainty = result
    review = Review.of(segmentation)
    assert review is not None and review.segments == run.review.segments
    labels = labelmap_of(segmentation, volume)
    spread = bridge.array_from_volume(uncertainty).astype(np.float64)
    voxel_ml = np.prod(volume.GetSpacing()) / 1000
    rows = review.rows()
    assert [row[0] for row in rows] == [c["name"] for c in CLASSES]
    for row, cls in zip(rows, CLASSES):
        mask = labels == cls["value"]
        assert row[1] == f"{mask.sum() * voxel_ml:.2f}"
        assert row[2] == (f"{spread[mask].mean():.3f}" if mask.any() else "-")
        assert row[3] == (f"{spread[band_by_morphology(mask)].mean():.3f}" if mask.any() else "-")

    segment = next(i for i, s in enumerate(review.segments) if len(s["regions"]) >= 2)
    expected = ranked_regions(labels == CLASSES[segment]["value"], spread, DEFAULT_THRESHOLD, 2)
    walk = RegionWalk(review)
    for step, want in enumerate(expected):
        region = walk.select(segment) if step == 0 else walk.next()
        assert centre_on_region(segmentation, region)
        ras = ras_of_index(volume, want["centre_kji"])
        for node, _ in views.values():
            slice_to_ras = node.GetSliceToRAS()
            assert [slice_to_ras.GetElement(r, 3) for r in range(3)] == pytest.approx(ras, abs=2e-3)
        assert views["Red"][0].GetSliceOffset() == pytest.approx(ras[2], abs=2e-3)  # axial: superior
        assert f"region {step + 1} of" in walk.describe(region)

    # a registered result (under a transform) is centred where the views show it
    shift = vtk.vtkTransform()
    shift.Translate(5.0, -7.0, 11.0)
    transform = volume.GetScene().AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(shift.GetMatrix())
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    assert centre_on_region(segmentation, walk.select(segment))
    moved = ras_of_index(volume, expected[0]["centre_kji"]) + np.array([5.0, -7.0, 11.0])
    slice_to_ras = views["Red"][0].GetSliceToRAS()
    assert [slice_to_ras.GetElement(r, 3) for r in range(3)] == pytest.approx(moved, abs=2e-3)


def test_ensemble_of_one_says_the_uncertainty_is_zero(scene, volume, tiny_bundle):
    logic = SegmentationLogic(scene)
    logic.process(volume, str(tiny_bundle), steps=1, ensemble=1, device="cpu", seed=SEED)
    assert "uncertainty volume is all zero" in logic.activeRun.message
    assert logic.activeRun.review.zero_uncertainty_warning()
    assert RegionWalk(logic.activeRun.review).select(0) is None
