"""Uncertainty-guided review: the per-segment figures of a run and a walk over its most uncertain regions.

The figures are the core's (the run record's "review", DiffSegCore/inference/review.py); this module
only keeps them with the segmentation node, formats them for the panel's table and moves the slice
views. MRML only, no Qt, so it runs on a slicer-core scene as in Slicer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import vtk

ATTRIBUTE = "DiffSeg.review"  # the review as JSON on the segmentation node: saved with the scene
# The table's headers; mean uncertainty inside the segment and on its boundary, and its uncertain regions.
COLUMNS = ("Segment", "mL", "Inside", "Boundary", "Regions")


@dataclass
class Review:
    """A run's review: one entry per segment (the core's figures), the meaning of the uncertainty, warnings."""

    segments: list[dict] = field(default_factory=list)
    uncertainty: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    score: float | None = None  # the case's review score (run.json summary.review_score); None for one member

    @classmethod
    def from_record(cls, path: Path) -> Review:
        """The review of a run record (`<case>_run.json`) written by the core."""
        record = json.loads(Path(path).read_text())
        score = (record.get("summary") or {}).get("review_score")
        return cls(record.get("review", []), record.get("uncertainty", {}), list(record.get("warnings", [])), score)

    def to_json(self) -> str:
        return json.dumps(
            {"segments": self.segments, "uncertainty": self.uncertainty, "warnings": self.warnings, "score": self.score}
        )

    def describe_score(self) -> str:
        """The case's review score in words, or '' without one (core: DiffSegCore/inference/case_score.py)."""
        if self.score is None:
            return ""
        return (
            f"Review score {self.score:.3f}: how much the members disagree with the result (1 - their mean Dice "
            "against it); 0 = they all agree, higher = review this case first."
        )

    def attach(self, node) -> None:
        """Keep the review with the segmentation node (a node attribute, saved with the scene)."""
        node.SetAttribute(ATTRIBUTE, self.to_json())

    @classmethod
    def of(cls, node) -> Review | None:
        """The review kept with a segmentation node, or None if it has none."""
        text = node.GetAttribute(ATTRIBUTE) if node is not None else None
        return cls(**json.loads(text)) if text else None

    def zero_uncertainty_warning(self) -> str:
        """The warning that this run's uncertainty is all zero (an ensemble of 1), else ''."""
        return self.uncertainty.get("warning", "")

    def rows(self) -> list[tuple[str, ...]]:
        """The table's cells, one row per segment, in COLUMNS' order."""

        def number(value, digits: int) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        return [
            (
                s["name"],
                number(s["volume_ml"], 2),
                number(s["mean_uncertainty"], 3),
                number(s["boundary_uncertainty"], 3),
                str(len(s["regions"])),
            )
            for s in self.segments
        ]


def lps_to_ras(point) -> tuple[float, float, float]:
    """The core writes physical points in LPS (as ITK and DICOM); the MRML scene is in RAS."""
    x, y, z = point
    return -float(x), -float(y), float(z)


def centre_slice_views(scene, ras) -> int:
    """Move every slice view so that it passes through `ras`, centred on it. Returns the number of views moved."""
    count = scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")
    for index in range(count):
        scene.GetNthNodeByClass(index, "vtkMRMLSliceNode").JumpSliceByCentering(*ras)
    return count


class RegionWalk:
    """Steps through one segment's most uncertain regions, most uncertain first, then from the top again."""

    def __init__(self, review: Review) -> None:
        self.review = review
        self.segment = -1
        self.position = -1

    def select(self, segment: int) -> dict | None:
        """Choose a segment (its row); returns its most uncertain region, or None if it has none."""
        self.segment, self.position = segment, -1
        return self.next()

    def next(self) -> dict | None:
        """The next region of the chosen segment (wrapping round), or None."""
        if not 0 <= self.segment < len(self.review.segments):
            return None
        regions = self.review.segments[self.segment]["regions"]
        if not regions:
            return None
        self.position = (self.position + 1) % len(regions)
        return regions[self.position]

    def describe(self, region: dict | None) -> str:
        """A status line for the region just shown."""
        if self.segment < 0:
            return "Select a segment in the table."
        name = self.review.segments[self.segment]["name"]
        if region is None:
            return f"{name}: no region where the members disagree (uncertainty at or above the threshold)."
        total = len(self.review.segments[self.segment]["regions"])
        return (
            f"{name}: uncertain region {self.position + 1} of {total}, "
            f"{region['volume_ml'] * 1000:.0f} mm³, mean uncertainty {region['mean_uncertainty']:.3f}"
        )


def to_world(node, ras) -> tuple[float, float, float]:
    """A point in `node`'s own RAS frame moved by the transforms above it (a registered input) into the views' frame."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return tuple(ras)
    transform = vtk.vtkGeneralTransform()
    parent.GetTransformToWorld(transform)
    return tuple(transform.TransformPoint(ras))


def centre_on_region(node, region: dict | None) -> bool:
    """Centre the slice views on a region of the review of `node` (the segmentation); False if there is none."""
    if region is None:
        return False
    centre_slice_views(node.GetScene(), to_world(node, lps_to_ras(region["centre_lps"])))
    return True

