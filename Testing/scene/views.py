"""Slice views as Slicer's default layout has them, for scene tests (a bare MRML scene has none)."""

from __future__ import annotations

import slicer

VIEWS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}


def add_slice_views(scene) -> dict:
    """The three slice views: layout name -> (slice node, slice composite node)."""
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    views = {}
    for name, orientation in VIEWS.items():
        node = scene.AddNewNodeByClass("vtkMRMLSliceNode", name)
        node.SetLayoutName(name)
        node.SetOrientation(orientation)
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
        views[name] = (node, composite)
    return views
