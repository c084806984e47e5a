"""The results of a Slicer registration: what to create (:class:`OutputRequest`), reading the
worker's output files into MRML nodes (:func:`loadResults`: the warped volume, the grid transform,
the RGB field, cluster maps, the warped segmentation, the Jacobian and its folded voxels, the
metrics table), moving them into nodes the user selected, and the MRML side of showing them
(:func:`prepareResultDisplay`).

Everything is read first and created all at once: a failure removes what was created, so the scene
stays as it was. Imports only ``slicer`` (MRML), ``vtk`` and numpy; no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import slicer
import vtk

from .slicer_errors import RegistrationError, describeNode
from .vocabulary import SLICER_OUTPUTS

ROLE_FIXED = "spatialRegistrationFixed"
ROLE_MOVING = "spatialRegistrationMoving"
"""Slicer's standard registration roles on a transform node (``GetFixedNodeReferenceRole()`` /
``GetMovingNodeReferenceRole()`` of ``vtkMRMLTransformNode``), which other modules understand."""
RESULT_FOREGROUND_OPACITY = 0.5
"""Opacity of the registered (foreground) volume over the fixed one in the slice views."""
JACOBIAN_WINDOW = (0.0, 2.0)
"""Display range of the Jacobian determinant: centred at 1 (volume kept), 0 (collapse) to 2 (doubling)."""
DIVERGING_COLOURS = "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"
"""Slicer's diverging blue-white-red colour table (blue: shrinking, white: kept, red: expanding)."""
FOLDING_SEGMENT = "folded voxels (Jacobian determinant <= 0)"
FOLDING_COLOUR = (1.0, 0.9, 0.0)
TABLE_COLUMNS = (("label", "Label"), ("name", "Segment"), ("dice_before", "Dice before"), ("dice_after", "Dice after"),
                 ("hd95_before_mm", "HD95 before (mm)"), ("hd95_after_mm", "HD95 after (mm)"),
                 ("assd_before_mm", "ASSD before (mm)"), ("assd_after_mm", "ASSD after (mm)"), ("value", "Value"))


@dataclass
class OutputRequest:
    """Which outputs to create (each optional). A ``...Node`` is filled instead of creating a new one.
    The fields are :data:`~.vocabulary.SLICER_OUTPUTS` and their ``...Node`` (checked by a test)."""

    warpedVolume: bool = True
    transform: bool = True
    displacementRGB: bool = True
    clusterMaps: bool = True
    metricsTable: bool = True
    warpedSegmentation: bool = True
    jacobian: bool = True
    warpedVolumeNode: Any = None
    transformNode: Any = None
    displacementRGBNode: Any = None
    clusterMapsNode: Any = None
    metricsTableNode: Any = None
    warpedSegmentationNode: Any = None
    jacobianNode: Any = None


def createParameterName(output: str) -> str:
    """The parameter node's switch for an output: ``"warpedVolume"`` -> ``"createWarpedVolume"``."""
    return "create" + output[0].upper() + output[1:]


def outputRequestFromParameters(parameters: Any) -> OutputRequest:
    """The request a parameter node (or any object with its fields) describes: for every output
    ``x``, create it when ``createX`` is set, into the node ``x`` when one is selected."""
    return OutputRequest(**{name: bool(getattr(parameters, createParameterName(name))) for name in SLICER_OUTPUTS},
                         **{name + "Node": getattr(parameters, name) for name in SLICER_OUTPUTS})


@dataclass
class RegistrationOutputs:
    """Nodes created or filled by a registration (one field per :data:`~.vocabulary.SLICER_OUTPUTS`,
    and the folded voxels), and its figures."""

    warpedVolume: Any = None
    transform: Any = None
    displacementRGB: Any = None
    clusterMaps: Any = None
    metricsTable: Any = None
    warpedSegmentation: Any = None
    jacobian: Any = None
    folding: Any = None
    """A segmentation with the folded voxels (Jacobian determinant <= 0) as a segment, when there are any."""
    metrics: Dict[str, Any] = field(default_factory=dict)
    report: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    def nodes(self) -> List[Any]:
        found = [getattr(self, name) for name in SLICER_OUTPUTS] + [self.folding]
        return [n for n in found if n is not None]


@dataclass
class ResultDisplay:
    """What the views should show after a registration (see :func:`prepareResultDisplay`)."""

    background: Any = None
    foreground: Any = None
    foregroundOpacity: float = RESULT_FOREGROUND_OPACITY
    table: Any = None
    segmentation3D: Any = None
    surfaceCreated: bool = False


# --------------------------------------------------------------------------- files -> nodes


def readInto(scene, className: str, name: str, path: Path, storageClass: str = "vtkMRMLVolumeArchetypeStorageNode"):
    """A new ``className`` node named ``name`` holding the file ``path`` (read through a temporary
    storage node, which goes: saving the scene writes new files)."""
    node = scene.AddNewNodeByClass(className, name)
    storage = scene.AddNewNodeByClass(storageClass)
    try:
        if hasattr(storage, "SetSingleFile"):
            # one file, never a series: the archetype reader otherwise takes numbered names
            # (clusters_level2..5_*.nii.gz) of single-slice volumes for the slices of one volume
            storage.SetSingleFile(True)
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            raise RegistrationError(f"Could not read the result {path.name}.")
    except BaseException:
        scene.RemoveNode(node)
        raise
    finally:
        scene.RemoveNode(storage)  # the temporary files go; saving the scene writes new ones
    return node


def useLinearGridInterpolation(transformNode) -> int:
    """Make Slicer evaluate the displacement grids of a loaded transform as ITK does (trilinear).

    Slicer reads ITK displacement fields as grid transforms with *cubic* interpolation; the engine's
    field lives on the grid it was estimated on (coarser than the images), where cubic and trilinear
    differ between grid points. Trilinear makes the transform node, its hardening and the engine's
    warped image agree. Returns how many grids were switched (both directions of the node)."""
    switched = 0
    for transform in (transformNode.GetTransformFromParent(), transformNode.GetTransformToParent()):
        pending = [transform]
        while pending:
            current = pending.pop()
            if current is None:
                continue
            if current.IsA("vtkGridTransform"):
                current.SetInterpolationModeToLinear()
                switched += 1
            if current.IsA("vtkGeneralTransform"):
                pending.extend(current.GetConcatenatedTransform(i)
                               for i in range(current.GetNumberOfConcatenatedTransforms()))
    return switched


def createDisplay(node) -> None:
    """The node's default display nodes, where this build can create them."""
    try:
        node.CreateDefaultDisplayNodes()
    except Exception:  # display nodes need application logic in some builds; the data is still there
        pass


def loadResults(scene, report: Dict[str, Any], folder: Path, fixedVolume, movingVolume, movingSegmentation,
                request: OutputRequest) -> RegistrationOutputs:
    """Read the worker's outputs in ``folder`` (its ``report``) into new nodes as ``request`` asks,
    then move them into the nodes ``request`` names, if any. On any failure every node created here
    is removed again and the error propagates."""
    created: List[Any] = []
    result = RegistrationOutputs(report=report, metrics=report.get("metrics", {}),
                                 warnings=list(report.get("warnings", [])))
    base = movingVolume.GetName()
    try:
        if request.warpedVolume:
            node = readInto(scene, "vtkMRMLScalarVolumeNode", f"{base} registered", folder / "warped.nii.gz")
            created.append(node)
            createDisplay(node)
            result.warpedVolume = node
        if request.transform:
            node = readInto(scene, "vtkMRMLGridTransformNode", f"{base} to {fixedVolume.GetName()} (SACB)",
                            folder / "transform.h5", "vtkMRMLTransformStorageNode")
            created.append(node)
            useLinearGridInterpolation(node)
            node.SetNodeReferenceID(ROLE_FIXED, fixedVolume.GetID())
            node.SetNodeReferenceID(ROLE_MOVING, movingVolume.GetID())
            result.transform = node
        if request.displacementRGB:
            node = readInto(scene, "vtkMRMLVectorVolumeNode", f"{base} displacement (RGB)",
                            folder / "displacement_rgb.nrrd")
            created.append(node)
            createDisplay(node)
            result.displacementRGB = node
        if request.clusterMaps and any(k.startswith("clusters_") for k in report.get("outputs", {})):
            node = clusterSegmentation(scene, folder, fixedVolume, f"{fixedVolume.GetName()} SACB clusters", created)
            result.clusterMaps = node
        if request.warpedSegmentation and movingSegmentation is not None and (folder / "warped_segmentation.nii.gz").is_file():
            node = warpedSegmentation(scene, folder, fixedVolume, movingSegmentation, report, created)
            result.warpedSegmentation = node
        if request.jacobian and (folder / "jacobian.nii.gz").is_file():
            node = readInto(scene, "vtkMRMLScalarVolumeNode", f"{base} Jacobian determinant",
                            folder / "jacobian.nii.gz")
            created.append(node)
            showJacobian(scene, node)
            result.jacobian = node
            result.folding = foldingSegmentation(scene, node, fixedVolume, f"{base} folding", created)
        if request.metricsTable:
            node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{base} registration metrics")
            created.append(node)
            fillMetricsTable(node, result.metrics)
            result.metricsTable = node
        # all read: now move the results into the nodes the user selected, if any
        for attribute in SLICER_OUTPUTS:
            target = getattr(request, attribute + "Node")
            loaded = getattr(result, attribute)
            if target is not None and loaded is not None:
                transferContent(scene, loaded, target)
                created.remove(loaded)
                scene.RemoveNode(loaded)
                setattr(result, attribute, target)
    except BaseException:
        for node in reversed(created):
            for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
                display = node.GetNthDisplayNode(i)
                if display is not None:
                    scene.RemoveNode(display)
            scene.RemoveNode(node)
        raise
    return result


# --------------------------------------------------------------------------- segmentations


def clusterSegmentation(scene, folder: Path, fixedVolume, name: str, created: List[Any]):
    """One segmentation with a segment per (level, cluster) of the fixed image, coloured from a
    colour table, only the finest level visible."""
    from .pipeline.visualisation import PALETTE

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    created.append(segmentation)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(fixedVolume)
    for level in (2, 3, 4, 5):
        path = folder / f"clusters_level{level}_fixed.nii.gz"
        if not path.is_file():
            continue
        labelmap = readInto(scene, "vtkMRMLLabelMapVolumeNode", f"level {level}", path)
        try:
            before = segmentation.GetSegmentation().GetNumberOfSegments()
            slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
            segments = segmentation.GetSegmentation()
            for i in range(before, segments.GetNumberOfSegments()):
                segment = segments.GetNthSegment(i)
                cluster = segment.GetLabelValue() if hasattr(segment, "GetLabelValue") else i - before + 1
                segment.SetName(f"level {level} cluster {cluster}")
                segment.SetColor(*(float(c) / 255 for c in PALETTE[cluster % len(PALETTE)]))
        finally:
            scene.RemoveNode(labelmap)
    createDisplay(segmentation)
    display = segmentation.GetDisplayNode()
    if display is not None:
        segments = segmentation.GetSegmentation()
        for i in range(segments.GetNumberOfSegments()):
            display.SetSegmentVisibility(segments.GetNthSegmentID(i), segments.GetNthSegment(i).GetName().startswith("level 2 "))
    return segmentation


def foldingSegmentation(scene, jacobian, fixedVolume, name: str, created: List[Any]):
    """A segmentation with one segment, the folded voxels (determinant <= 0), or None without any."""
    determinant = slicer.util.arrayFromVolume(jacobian)
    folded = determinant <= 0
    if not folded.any():
        return None
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} labels")
    try:
        labelmap.CopyOrientation(jacobian)
        slicer.util.updateVolumeFromArray(labelmap, folded.astype(np.uint8))
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        created.append(segmentation)
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(fixedVolume)
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
        segment = segmentation.GetSegmentation().GetNthSegment(0)
        segment.SetName(FOLDING_SEGMENT)
        segment.SetColor(*FOLDING_COLOUR)
        createDisplay(segmentation)
        return segmentation
    finally:
        scene.RemoveNode(labelmap)


def warpedSegmentation(scene, folder: Path, fixedVolume, movingSegmentation, report, created: List[Any]):
    """The warped moving segmentation: a label map when the moving one was a label map, else a
    segmentation with the moving segments' names and colours."""
    name = f"{movingSegmentation.GetName()} registered"
    labelmap = readInto(scene, "vtkMRMLLabelMapVolumeNode", name, folder / "warped_segmentation.nii.gz")
    if movingSegmentation.IsA("vtkMRMLLabelMapVolumeNode"):
        created.append(labelmap)
        createDisplay(labelmap)
        return labelmap
    try:
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        created.append(segmentation)
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(fixedVolume)
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
        names = {int(k): v for k, v in (report.get("options", {}).get("label_names") or {}).items()}
        source = movingSegmentation.GetSegmentation()
        colours = {source.GetNthSegment(i).GetName(): source.GetNthSegment(i).GetColor()
                   for i in range(source.GetNumberOfSegments())}
        target = segmentation.GetSegmentation()
        for i in range(target.GetNumberOfSegments()):
            segment = target.GetNthSegment(i)
            value = segment.GetLabelValue() if hasattr(segment, "GetLabelValue") else i + 1
            label_name = names.get(value)
            if label_name:
                segment.SetName(label_name)
                if label_name in colours:
                    segment.SetColor(*colours[label_name])
        createDisplay(segmentation)
        return segmentation
    finally:
        scene.RemoveNode(labelmap)


# --------------------------------------------------------------------------- Jacobian, table, transfer


def showJacobian(scene, node) -> None:
    """Display a Jacobian-determinant volume with a diverging colour map centred at 1 (when Slicer's
    colour tables are loaded; under slicer-core the window alone is set)."""
    createDisplay(node)
    display = node.GetDisplayNode()
    if display is None:
        return
    low, high = JACOBIAN_WINDOW
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(low, high)
    if scene.GetNodeByID(DIVERGING_COLOURS) is not None:
        display.SetAndObserveColorNodeID(DIVERGING_COLOURS)


def fillMetricsTable(node, metrics: Dict[str, Any]) -> None:
    """Per-segment Dice / HD95 / ASSD before and after and a mean row, then one row per regularity
    figure of the field (its name under "Segment", its number under "Value")."""
    table = vtk.vtkTable()
    columns = []
    for key, title in TABLE_COLUMNS:
        array = vtk.vtkStringArray() if key == "name" else vtk.vtkDoubleArray()
        array.SetName(title)
        table.AddColumn(array)
        columns.append((key, array))
    rows = list(metrics.get("labels", []))
    if rows:
        rows.append(dict(metrics.get("summary", {}), label=float("nan"), name="mean"))
    regularity = metrics.get("regularity", {})
    extra = [("folding: voxels with |J| < 0 (%)", regularity.get("negative_jacobian_percent")),
             ("SDlogJ", regularity.get("sdlogj")), ("Jacobian min", regularity.get("jacobian_min")),
             ("Jacobian max", regularity.get("jacobian_max"))]
    for row in rows:
        for key, array in columns:
            value = row.get(key)
            if key == "name":
                array.InsertNextValue(str(value or ""))
            else:
                array.InsertNextValue(float("nan") if value is None else float(value))
    for label, value in extra:
        for key, array in columns:
            if key == "name":
                array.InsertNextValue(label)
            elif key == "value":
                array.InsertNextValue(float("nan") if value is None else float(value))
            else:
                array.InsertNextValue(float("nan"))
    node.SetAndObserveTable(table)
    node.SetAttribute("SACBRegistration.Metrics", json.dumps(metrics))


def transferContent(scene, source, target) -> None:
    """Move a loaded result into a node the user selected (same kind)."""
    if target.IsA("vtkMRMLTransformNode"):
        target.SetAndObserveTransformFromParent(source.GetTransformFromParent())
        for role in (ROLE_FIXED, ROLE_MOVING):
            target.SetNodeReferenceID(role, source.GetNodeReferenceID(role))
    elif target.IsA("vtkMRMLVolumeNode"):
        matrix = vtk.vtkMatrix4x4()
        source.GetIJKToRASMatrix(matrix)
        target.SetIJKToRASMatrix(matrix)
        target.SetAndObserveImageData(source.GetImageData())
        if target.GetDisplayNode() is None:
            createDisplay(target)
    elif target.IsA("vtkMRMLSegmentationNode") and source.IsA("vtkMRMLLabelMapVolumeNode"):
        # a label-map result (the moving segmentation was a label map) into a chosen segmentation
        target.GetSegmentation().RemoveAllSegments()
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(source, target)
        if target.GetDisplayNode() is None:
            createDisplay(target)
    elif target.IsA("vtkMRMLSegmentationNode"):
        target.GetSegmentation().DeepCopy(source.GetSegmentation())
        if target.GetDisplayNode() is None:
            createDisplay(target)
    elif target.IsA("vtkMRMLTableNode"):
        target.GetTable().DeepCopy(source.GetTable())
        target.Modified()
    else:
        raise RegistrationError(f"Cannot write a result into {describeNode(target)} ({target.GetClassName()}).")


# --------------------------------------------------------------------------- display


def prepareResultDisplay(fixedVolume, movingVolume, outputs: RegistrationOutputs) -> ResultDisplay:
    """The MRML side of showing a finished registration; returns what the views should show.

    * slice views: the fixed volume in the background, the warped volume over it (opacity
      :data:`RESULT_FOREGROUND_OPACITY`); without a warped volume but with a transform, the
      moving volume is placed under the transform and shown over the fixed one instead;
    * the warped segmentation (a segmentation node) gets its closed-surface representation and
      is visible in 3D (the surface needs Slicer's converter rules, registered at start-up);
    * the metrics table is the table to show.
    """
    display = ResultDisplay(background=fixedVolume, table=outputs.metricsTable)
    if outputs.warpedVolume is not None:
        display.foreground = outputs.warpedVolume
    elif outputs.transform is not None and movingVolume is not None:
        movingVolume.SetAndObserveTransformNodeID(outputs.transform.GetID())
        display.foreground = movingVolume
    segmentation = outputs.warpedSegmentation
    if segmentation is not None and segmentation.IsA("vtkMRMLSegmentationNode"):
        if segmentation.GetDisplayNode() is None:
            createDisplay(segmentation)
        display.surfaceCreated = bool(segmentation.CreateClosedSurfaceRepresentation())
        displayNode = segmentation.GetDisplayNode()
        if displayNode is not None:
            displayNode.SetVisibility(True)
            displayNode.SetVisibility3D(True)
        display.segmentation3D = segmentation
    return display
