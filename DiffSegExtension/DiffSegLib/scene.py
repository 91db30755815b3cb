"""Scene bridge: volume nodes to files and back, segmentation and uncertainty nodes.

Only MRML and VTK (both in Slicer and in the slicer-core wheel); no Qt and no diffusion maths.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from DiffSegCore.uncertainty import DEFAULT_THRESHOLD, DISPLAY_RANGE

# Module logics the bridge needs; the Segmentations logic also registers the labelmap converters.
MODULE_LOGICS = {
    "Colors": "vtkSlicerColorLogic",
    "Volumes": "vtkSlicerVolumesLogic",
    "Segmentations": "vtkSlicerSegmentationsModuleLogic",
}

# Viridis at eleven evenly spaced stops (matplotlib's published colour map), used only when the
# scene lacks Slicer's own "Viridis" colour table (the slicer-core wheel ships no colour files).
VIRIDIS_STOPS = [
    (0.267, 0.005, 0.329),
    (0.283, 0.141, 0.458),
    (0.254, 0.265, 0.530),
    (0.207, 0.372, 0.553),
    (0.164, 0.471, 0.558),
    (0.128, 0.567, 0.551),
    (0.135, 0.659, 0.518),
    (0.267, 0.749, 0.441),
    (0.478, 0.821, 0.318),
    (0.741, 0.873, 0.150),
    (0.993, 0.906, 0.144),
]
UNCERTAINTY_COLOR_NAMES = ("Viridis", "Inferno", "DiffSeg Viridis")
THRESHOLD_CEILING = 1.0  # above any uncertainty value (at most 1 - 1/K): the threshold has no upper cut


class StandaloneScene:
    """A scene with an application logic and the module logics DiffSeg uses, outside Slicer.

    The application logic does not own its module logics, so this object keeps them alive.
    """

    def __init__(self) -> None:
        self.scene = slicer.vtkMRMLScene()
        self.app = slicer.vtkSlicerApplicationLogic()
        self.app.SetMRMLScene(self.scene)
        self.logics = {}
        for name, class_name in MODULE_LOGICS.items():
            logic = getattr(slicer, class_name)()
            logic.SetMRMLApplicationLogic(self.app)
            logic.SetMRMLScene(self.scene)
            self.app.SetModuleLogic(name, logic)
            self.logics[name] = logic

    def load_volume(self, path: Path, name: str = "") -> slicer.vtkMRMLScalarVolumeNode:
        """Load a volume file with Slicer's volumes logic (as File > Add Data does)."""
        name = name or Path(path).name.split(".")[0]
        node = self.logics["Volumes"].AddArchetypeVolume(str(path), name)
        if node is None or node.GetImageData() is None:
            raise OSError(f"could not load {path} as a volume")
        return node


def array_from_volume(node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """Voxel array (k, j, i) copied out of a volume node."""
    image = node.GetImageData()
    shape = tuple(reversed(image.GetDimensions()))
    components = image.GetNumberOfScalarComponents()
    if components > 1:
        shape = (*shape, components)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape).copy()


def set_volume_array(node: slicer.vtkMRMLVolumeNode, array: np.ndarray) -> None:
    """Replace a volume node's voxels by `array` (k, j, i), keeping its geometry."""
    image = vtk.vtkImageData()
    image.SetDimensions(tuple(reversed(array.shape[:3])))
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)


def same_geometry(a: slicer.vtkMRMLVolumeNode, b: slicer.vtkMRMLVolumeNode, tol: float = 1e-4) -> bool:
    """True if both volumes have the same grid: dimensions and IJK-to-RAS matrix."""
    if a.GetImageData().GetDimensions() != b.GetImageData().GetDimensions():
        return False
    ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    a.GetIJKToRASMatrix(ma)
    b.GetIJKToRASMatrix(mb)
    return all(abs(ma.GetElement(r, c) - mb.GetElement(r, c)) <= tol for r in range(4) for c in range(4))


def write_volume(node: slicer.vtkMRMLVolumeNode, path: Path) -> Path:
    """Write a volume with its geometry (NRRD keeps the full direction matrix losslessly)."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    if not storage.WriteData(node):
        raise OSError(f"could not write volume {node.GetName()} to {path}")
    return path


def read_volume_into(node: slicer.vtkMRMLVolumeNode, path: Path, reference: slicer.vtkMRMLVolumeNode) -> None:
    """Read a file into `node` and give it the reference volume's exact geometry.

    The core writes outputs on the input grid; copying the reference matrix removes the float32
    rounding of the NIfTI header so that the node matches the input bit for bit.
    """
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    if not storage.ReadData(node):
        raise OSError(f"could not read {path}")
    if not same_geometry(node, reference, tol=1e-3):
        raise OSError(f"{Path(path).name} does not have the input volume's geometry")
    node.CopyOrientation(reference)


def find_segmentation_conflict(node: slicer.vtkMRMLSegmentationNode | None) -> str:
    """A message when writing into `node` would replace existing segments, else an empty string."""
    if node is None or node.GetSegmentation().GetNumberOfSegments() == 0:
        return ""
    return (
        f"segmentation '{node.GetName()}' already holds {node.GetSegmentation().GetNumberOfSegments()} "
        "segments; choose a new segmentation or allow overwriting"
    )


def terminology_string(terminology: dict | None) -> str:
    """Slicer's serialised terminology entry from a model class's terminology block ('' if absent).

    The block holds "category" and "type" codes, optionally "type_modifier" (e.g. Anterior),
    "region" and "region_modifier", each as {"scheme": ..., "code": ..., "meaning": ...}.
    """
    if not terminology or "category" not in terminology or "type" not in terminology:
        return ""

    def code(key: str) -> tuple[str, str, str]:
        entry = terminology.get(key) or {}
        return str(entry.get("code", "")), str(entry.get("scheme", "")), str(entry.get("meaning", ""))

    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        terminology.get("context", "Segmentation category and type - DICOM master list"),
        *code("category"),
        *code("type"),
        *code("type_modifier"),
        terminology.get("anatomic_context", "Anatomic codes - DICOM master list"),
        *code("region"),
        *code("region_modifier"),
    )


def place_like(node: slicer.vtkMRMLNode, reference: slicer.vtkMRMLNode) -> None:
    """Put an output where its input is: under the input's parent transform (a registered input keeps
    its result in place) and beside it in the subject hierarchy (same study or folder)."""
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    scene = reference.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    reference_item = hierarchy.GetItemByDataNode(reference)
    parent = hierarchy.GetItemParent(reference_item) if reference_item else hierarchy.GetSceneItemID()
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:  # the slicer-core wheel has no plugin that adds items for new nodes; Slicer has
        hierarchy.CreateItem(parent, node)


def fill_segmentation(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    labels: slicer.vtkMRMLLabelMapVolumeNode,
    classes: Iterable[dict],
) -> None:
    """One segment per model class (name, colour, terminology), filled from the label map.

    Classes absent from the label map still get an (empty) segment so the result always has the
    model's full list of structures.
    """
    scene = segmentation_node.GetScene()
    label_array = array_from_volume(labels)
    segmentation = segmentation_node.GetSegmentation()
    binary = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__diffseg_binary__")
    try:
        binary.CopyOrientation(labels)
        for cls in classes:
            segment_id = segmentation.AddEmptySegment("", cls["name"], list(map(float, cls["color"])))
            terminology = terminology_string(cls.get("terminology"))
            if terminology:
                segmentation.GetSegment(segment_id).SetTerminology(terminology)
            mask = label_array == int(cls["value"])
            if not mask.any():
                continue
            set_volume_array(binary, mask.astype(np.uint8))
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segment_id)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                binary, segmentation_node, ids
            ):
                raise RuntimeError(f"could not import class {cls['name']} into the segmentation")
    finally:
        scene.RemoveNode(binary)


def export_segments_labelmap(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    classes: list[dict],
    reference: slicer.vtkMRMLVolumeNode,
    path: Path,
) -> Path:
    """Write an existing segmentation as a label map on the reference grid, in the model's class values.

    Segments are matched to classes by name (case-insensitive), otherwise by their order.
    """
    scene = segmentation_node.GetScene()
    segmentation = segmentation_node.GetSegmentation()
    segment_ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    by_name = {segmentation.GetSegment(s).GetName().lower(): s for s in segment_ids}
    labels = np.zeros(tuple(reversed(reference.GetImageData().GetDimensions())), np.uint8)
    export = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__diffseg_preseg__")
    try:
        for index, cls in enumerate(classes):
            segment_id = by_name.get(cls["name"].lower()) or (segment_ids[index] if index < len(segment_ids) else None)
            if segment_id is None:
                continue
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segment_id)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, export, reference
            ):
                raise RuntimeError(f"could not export segment {segment_id} of {segmentation_node.GetName()}")
            labels[array_from_volume(export) > 0] = int(cls["value"])
        set_volume_array(export, labels)
        export.CopyOrientation(reference)
        return write_volume(export, path)
    finally:
        scene.RemoveNode(export)


def uncertainty_color_node(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLColorNode:
    """Slicer's perceptual Viridis (or Inferno) table, else a Viridis procedural node made once."""
    for name in UNCERTAINTY_COLOR_NAMES:
        node = scene.GetFirstNodeByName(name)
        if node is not None and node.IsA("vtkMRMLColorNode"):
            return node
    node = scene.AddNewNodeByClass("vtkMRMLProceduralColorNode", UNCERTAINTY_COLOR_NAMES[-1])
    node.SetAttribute("Category", "Continuous")
    transfer = vtk.vtkColorTransferFunction()
    for index, rgb in enumerate(VIRIDIS_STOPS):
        transfer.AddRGBPoint(index / (len(VIRIDIS_STOPS) - 1), *rgb)
    node.SetAndObserveColorTransferFunction(transfer)
    return node


def show_uncertainty(
    uncertainty: slicer.vtkMRMLScalarVolumeNode,
    background: slicer.vtkMRMLVolumeNode,
    opacity: float = 0.5,
    threshold: float = DEFAULT_THRESHOLD,
) -> slicer.vtkMRMLColorLegendDisplayNode:
    """Colour overlay of the uncertainty over the input in every slice view, with a colour legend.

    One fixed scale for every case (DiffSegCore/uncertainty.py's DISPLAY_RANGE), so that two results
    can be compared; transparent below `threshold`, where the members agree. Returns the legend node.
    """
    scene = uncertainty.GetScene()
    if uncertainty.GetDisplayNode() is None:
        uncertainty.CreateDefaultDisplayNodes()
    display = uncertainty.GetDisplayNode()
    display.SetAndObserveColorNodeID(uncertainty_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(*DISPLAY_RANGE)
    set_uncertainty_threshold(uncertainty, threshold)
    legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(uncertainty)
    legend.SetTitleText("Uncertainty")
    legend.SetLabelFormat("%.2f")
    legend.SetVisibility3D(False)  # the overlay is drawn in the slice views only
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(uncertainty.GetID())
    set_uncertainty_opacity(uncertainty, opacity)
    return legend


def set_uncertainty_threshold(uncertainty: slicer.vtkMRMLScalarVolumeNode, threshold: float) -> None:
    """Hide the voxels below `threshold` (the members agree there); the scale itself does not move."""
    display = uncertainty.GetDisplayNode()
    display.AutoThresholdOff()
    display.SetThreshold(threshold, THRESHOLD_CEILING)
    display.ApplyThresholdOn()


def set_uncertainty_opacity(uncertainty: slicer.vtkMRMLScalarVolumeNode, opacity: float) -> None:
    """Opacity of the overlay in the slice views that show this uncertainty volume."""
    scene = uncertainty.GetScene()
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if composite.GetForegroundVolumeID() == uncertainty.GetID():
            composite.SetForegroundOpacity(opacity)


def show_segmentation_3d(segmentation: slicer.vtkMRMLSegmentationNode, visible: bool = True) -> None:
    """Show (or hide) the segmentation as surfaces in the 3D view; the surfaces are made once."""
    if visible:
        segmentation.CreateClosedSurfaceRepresentation()
    if segmentation.GetDisplayNode() is None:
        segmentation.CreateDefaultDisplayNodes()
    segmentation.GetDisplayNode().SetVisibility3D(visible)
