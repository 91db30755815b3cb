"""The panel's Review section, driven as a user drives it after a real run of the bundled model.

DiffSeg.py runs through Testing/slicer_adapter.py (issue 12's PythonQt stand-in over PySide6, with a
ctkSliderWidget stand-in) on a real MRML scene with slice views; the child process is real.
"""

from __future__ import annotations

import pytest
import slicer
from conftest import CASE
from DiffSegLib.review import Review, lps_to_ras
from views import add_slice_views

from DiffSegCore.uncertainty import DEFAULT_THRESHOLD, DISPLAY_RANGE

pytest.importorskip("Testing.slicer_adapter", reason="needs the panel's test adapter (issue 12)")
pytest.importorskip("torch", reason="the run itself needs the core's packages")
from test_module import app, open_module, pump  # noqa: F401  (app is the adapter fixture)


def slice_origin(node) -> list[float]:
    matrix = node.GetSliceToRAS()
    return [matrix.GetElement(r, 3) for r in range(3)]


def test_review_section_after_a_run(app, standalone):  # noqa: F811
    from DiffSegLib.review_panel import IDLE_TEXT  # imports qt: only once the adapter is installed

    views = add_slice_views(standalone.scene)
    standalone.load_volume(CASE, "hippocampus_001")
    widget = open_module(app)
    ui = widget.ui
    assert ui.reviewInfoLabel.text == IDLE_TEXT and ui.reviewTable.rowCount == 0 and not ui.show3DButton.enabled
    slider = ui.uncertaintyThresholdSlider
    assert (slider.minimum, slider.maximum, slider.value) == pytest.approx((*DISPLAY_RANGE, DEFAULT_THRESHOLD))

    widget._parameterNode.device = "cpu"  # the model's own steps and ensemble (5 members)
    ui.applyButton.click()
    pump(widget)
    run = widget._run
    assert run.state == "done", run.error
    review = Review.of(run.segmentationNode)
    rows = review.rows()
    assert ui.reviewTable.rowCount == len(rows) == 2
    assert [[ui.reviewTable.item(r, c).text() for c in range(len(row))] for r, row in enumerate(rows)] == [
        list(row) for row in rows
    ]
    assert "0.5" in ui.reviewInfoLabel.text and ui.show3DButton.enabled and not ui.nextRegionButton.enabled
    # the case's review score (run.json summary.review_score) heads the section
    assert review.score is not None and 0.0 <= review.score <= 1.0
    assert ui.reviewInfoLabel.text.startswith(f"Review score {review.score:.3f}:")

    # a row click goes to the segment's most uncertain region, Next to the one after it
    segment = max(range(len(rows)), key=lambda r: len(review.segments[r]["regions"]))
    regions = review.segments[segment]["regions"]
    assert regions, "the bundled model should disagree somewhere near the hippocampus"
    ui.reviewTable.cellClicked.emit(segment, 0)
    for node, _ in views.values():
        assert slice_origin(node) == pytest.approx(lps_to_ras(regions[0]["centre_lps"]), abs=1e-3)
    assert "region 1 of" in ui.reviewInfoLabel.text and ui.nextRegionButton.enabled
    ui.nextRegionButton.click()
    second = regions[1 % len(regions)]
    assert slice_origin(views["Red"][0]) == pytest.approx(lps_to_ras(second["centre_lps"]), abs=1e-3)

    # the overlay follows the sliders; the scale does not move
    display = run.uncertaintyNode.GetDisplayNode()
    slider.value = 0.2
    ui.uncertaintyOpacitySlider.value = 0.8
    assert display.GetLowerThreshold() == pytest.approx(0.2)
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx(DISPLAY_RANGE)
    assert all(composite.GetForegroundOpacity() == pytest.approx(0.8) for _, composite in views.values())
    ui.show3DButton.click()
    assert run.segmentationNode.GetSegmentation().ContainsRepresentation("Closed surface")
    assert run.segmentationNode.GetDisplayNode().GetVisibility3D()

    slicer.mrmlScene.Clear(0)  # closing the scene empties the section
    assert ui.reviewInfoLabel.text == IDLE_TEXT and ui.reviewTable.rowCount == 0
