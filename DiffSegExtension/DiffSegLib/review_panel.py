"""The panel's Review section: the per-segment table, the walk over the most uncertain regions, the
overlay's threshold and opacity, and Show 3D.

Qt glue only (Slicer's PythonQt); the figures come from the core through review.py and every scene
change is scene.py's or review.py's, which the tests run on a slicer-core scene.
"""

from __future__ import annotations

import qt

from DiffSegCore.uncertainty import DEFAULT_THRESHOLD, DEFINITION, DISPLAY_RANGE

from . import scene as bridge
from .review import COLUMNS, RegionWalk, Review, centre_on_region
from .widgets import REVIEW_WIDGET_CLASSES

OPACITY = 0.5  # the overlay's opacity until the user moves the slider
IDLE_TEXT = "Run a segmentation to review it here."


class ReviewPanel:
    """Drives the Review widgets of Resources/UI/DiffSeg.ui for the last result."""

    def __init__(self, ui) -> None:
        missing = [name for name in REVIEW_WIDGET_CLASSES if not hasattr(ui, name)]
        if missing:
            raise RuntimeError(f"DiffSeg.ui lacks widgets {missing}; reinstall the extension")
        self.ui = ui
        self.segmentation = None
        self.uncertainty = None
        self.walk: RegionWalk | None = None
        threshold, opacity = ui.uncertaintyThresholdSlider, ui.uncertaintyOpacitySlider
        threshold.minimum, threshold.maximum = DISPLAY_RANGE  # the overlay's one fixed scale
        threshold.singleStep, threshold.decimals, threshold.value = 0.01, 2, DEFAULT_THRESHOLD
        threshold.toolTip = f"Uncertainty below this value is not drawn: the members agree there. Uncertainty: {DEFINITION}."
        opacity.minimum, opacity.maximum, opacity.singleStep, opacity.decimals, opacity.value = 0.0, 1.0, 0.05, 2, OPACITY
        ui.reviewTable.setColumnCount(len(COLUMNS))
        ui.reviewTable.setHorizontalHeaderLabels(list(COLUMNS))
        ui.reviewTable.connect("cellClicked(int,int)", self.onRowClicked)
        ui.nextRegionButton.connect("clicked()", self.onNextRegion)
        threshold.connect("valueChanged(double)", self.onThresholdChanged)
        opacity.connect("valueChanged(double)", self.onOpacityChanged)
        ui.show3DButton.connect("toggled(bool)", self.onShow3D)
        self.clear()

    def clear(self) -> None:
        """Nothing to review (no run yet, scene closed, result removed)."""
        self.segmentation = self.uncertainty = self.walk = None
        self.ui.reviewTable.setRowCount(0)
        self.ui.reviewInfoLabel.text = IDLE_TEXT
        self.ui.nextRegionButton.enabled = False
        wasBlocked = self.ui.show3DButton.blockSignals(True)
        self.ui.show3DButton.checked = False
        self.ui.show3DButton.blockSignals(wasBlocked)
        self.ui.show3DButton.enabled = False

    def show(self, segmentation, uncertainty) -> None:
        """Review a finished run's segmentation and uncertainty nodes (the figures are on the segmentation)."""
        review = Review.of(segmentation)
        if review is None or uncertainty is None:
            self.clear()
            return
        self.segmentation, self.uncertainty, self.walk = segmentation, uncertainty, RegionWalk(review)
        rows = review.rows()
        self.ui.reviewTable.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                self.ui.reviewTable.setItem(r, c, qt.QTableWidgetItem(text))
        self.ui.reviewTable.resizeColumnsToContents()
        bridge.set_uncertainty_threshold(uncertainty, self.ui.uncertaintyThresholdSlider.value)
        bridge.set_uncertainty_opacity(uncertainty, self.ui.uncertaintyOpacitySlider.value)
        warning = review.zero_uncertainty_warning()
        low, high = DISPLAY_RANGE
        guide = (
            f"Uncertainty: {DEFINITION}; shown from {low:g} to {high:g}. Click a segment to go to its most uncertain "
            "region."
        )
        self.ui.reviewInfoLabel.text = f"Warning: {warning}." if warning else " ".join(
            filter(None, [review.describe_score(), guide])
        )
        self.ui.nextRegionButton.enabled = False
        self.ui.show3DButton.enabled = True

    def _alive(self) -> bool:
        """False (and the section cleared) once the reviewed nodes have left the scene."""
        if self.segmentation is not None and self.segmentation.GetScene() is not None:
            return True
        self.clear()
        return False

    def onRowClicked(self, row: int, column: int) -> None:
        if self._alive():
            self._centre(self.walk.select(row))

    def onNextRegion(self) -> None:
        if self._alive():
            self._centre(self.walk.next())

    def _centre(self, region: dict | None) -> None:
        centre_on_region(self.segmentation, region)
        self.ui.reviewInfoLabel.text = self.walk.describe(region)
        self.ui.nextRegionButton.enabled = region is not None

    def onThresholdChanged(self, value: float) -> None:
        if self._alive() and self.uncertainty is not None and self.uncertainty.GetScene() is not None:
            bridge.set_uncertainty_threshold(self.uncertainty, value)

    def onOpacityChanged(self, value: float) -> None:
        if self._alive() and self.uncertainty is not None and self.uncertainty.GetScene() is not None:
            bridge.set_uncertainty_opacity(self.uncertainty, value)

    def onShow3D(self, visible: bool) -> None:
        if self._alive():
            bridge.show_segmentation_3d(self.segmentation, visible)
