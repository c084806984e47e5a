"""The inputs of a Slicer registration: checks (nothing is created when they are wrong) and their
export to files through MRML storage nodes, for the worker process.

Segmentations are written as label maps whose values follow the segment names, so fixed and
moving labels correspond. Imports only ``slicer`` (MRML) and ``vtk``; no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import slicer
import vtk

from .slicer_errors import RegistrationError, describeNode

ALL_SEGMENTS = ""
"""``fixedMaskSegment`` value meaning "the union of all segments" (and the label map's non-zero voxels)."""


# --------------------------------------------------------------------------- checks


def _isVolume(node) -> bool:
    return node is not None and node.IsA("vtkMRMLScalarVolumeNode")


def checkVolume(node, role: str) -> None:
    """Raise ``ValueError`` naming the problem and the fix if ``node`` cannot be registered."""
    if node is None:
        raise ValueError(f"Select a {role} volume.")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"The {role} volume {describeNode(node)} is a label map; select an intensity volume "
                         f"(label maps go in the segmentation selectors).")
    if node.IsA("vtkMRMLVectorVolumeNode") or not _isVolume(node):
        raise ValueError(f"The {role} volume {describeNode(node)} is not a scalar (grey-level) volume; convert it "
                         f"first (e.g. Vector to Scalar Volume module).")
    image = node.GetImageData()
    if image is None:
        raise ValueError(f"The {role} volume {describeNode(node)} has no image data; load or compute it first.")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"The {role} volume {describeNode(node)} has {image.GetNumberOfScalarComponents()} "
                         f"components per voxel; registration needs a grey-level volume.")
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise ValueError(f"The {role} volume {describeNode(node)} is 2D ({dims[0]} x {dims[1]} x {dims[2]}); "
                         f"registration needs 3D volumes.")
    if node.GetParentTransformNode() is not None:
        raise ValueError(f"The {role} volume {describeNode(node)} is under the transform "
                         f"'{node.GetParentTransformNode().GetName()}'; harden it (Data module, right-click, "
                         f"Harden transform) or remove it before registering.")


def checkSegmentation(node, role: str) -> None:
    if node is None:
        return
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        if node.GetImageData() is None:
            raise ValueError(f"The {role} label map {describeNode(node)} has no image data.")
        return
    if not node.IsA("vtkMRMLSegmentationNode"):
        raise ValueError(f"The {role} segmentation {describeNode(node)} is neither a segmentation nor a label map.")
    if node.GetSegmentation() is None or node.GetSegmentation().GetNumberOfSegments() == 0:
        raise ValueError(f"The {role} segmentation {describeNode(node)} has no segments; add segments or leave the "
                         f"selector empty.")
    if node.GetParentTransformNode() is not None:
        raise ValueError(f"The {role} segmentation {describeNode(node)} is under a transform; harden it first.")


def checkMask(node, segmentId: Optional[str] = ALL_SEGMENTS) -> None:
    """Raise ``ValueError`` naming the problem and the fix if ``node`` (a segmentation or label map,
    or None) cannot serve as the fixed-image mask, or ``segmentId`` is not one of its segments."""
    if node is None:
        return
    checkSegmentation(node, "fixed-image mask")
    if segmentId and node.IsA("vtkMRMLSegmentationNode") and node.GetSegmentation().GetSegment(segmentId) is None:
        raise ValueError(f"The fixed-image mask {describeNode(node)} has no segment with ID '{segmentId}'; choose one of "
                         f"its segments, or all segments.")
    if segmentId and node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"The fixed-image mask {describeNode(node)} is a label map: it has no segments to choose "
                         f"(all its non-zero voxels are used); choose all segments.")


def checkInputs(fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None) -> None:
    """Raise ``ValueError`` naming the problem and the fix if the volumes and segmentations cannot be registered."""
    checkVolume(fixedVolume, "fixed")
    checkVolume(movingVolume, "moving")
    if fixedVolume is movingVolume or fixedVolume.GetID() == movingVolume.GetID():
        raise ValueError(f"The fixed and moving volumes are the same node {describeNode(fixedVolume)}; choose two "
                         f"different volumes.")
    checkSegmentation(fixedSegmentation, "fixed")
    checkSegmentation(movingSegmentation, "moving")
    if (fixedSegmentation is None) != (movingSegmentation is None):
        raise ValueError("Select both a fixed and a moving segmentation (for Dice / HD95 before and after), or "
                         "neither.")


def maskSegmentChoices(node) -> List[tuple]:
    """(label, value) pairs for the mask's segment selector: all segments (value
    :data:`ALL_SEGMENTS`) first, then each segment by name (value: its ID)."""
    if node is None:
        return []
    if not node.IsA("vtkMRMLSegmentationNode"):
        return [("All labels (non-zero voxels)", ALL_SEGMENTS)]
    segmentation = node.GetSegmentation()
    choices = [("All segments (union)", ALL_SEGMENTS)]
    for i in range(segmentation.GetNumberOfSegments()):
        choices.append((segmentation.GetNthSegment(i).GetName(), segmentation.GetNthSegmentID(i)))
    return choices


# --------------------------------------------------------------------------- MRML -> files


def segmentNames(node) -> List[str]:
    """The segment names of a segmentation node, in order (none for a label map or None)."""
    if node is None or not node.IsA("vtkMRMLSegmentationNode"):
        return []
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def writeVolume(node, path: Path) -> None:
    """Write a volume through a storage node that is not added to the scene (inputs untouched)."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)
    if not storage.WriteData(node):
        raise RegistrationError(f"Could not write {describeNode(node)} to {path}.")


def writeSegmentation(scene, node, referenceVolume, labels: Dict[str, int], path: Path,
                      segmentIds: Optional[List[str]] = None) -> None:
    """Write a segmentation as a label map on ``referenceVolume``'s grid, each segment at the value
    ``labels[name]`` (only ``segmentIds`` if given, else all); a label map volume is written as it is."""
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        writeVolume(node, path)
        return
    existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "SACBRegistrationTemporaryColors")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SACBRegistrationTemporaryLabelmap")
    try:
        colors.SetTypeToUser()
        colors.SetNumberOfColors(max(labels.values()) + 1)
        colors.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
        for name, value in labels.items():
            colors.SetColor(value, name, 1.0, 1.0, 1.0, 1.0)
        ids = vtk.vtkStringArray()
        if segmentIds is None:
            node.GetSegmentation().GetSegmentIDs(ids)
        else:
            for segmentId in segmentIds:
                ids.InsertNextValue(segmentId)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            node, ids, labelmap, referenceVolume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colors)
        if not ok or labelmap.GetImageData() is None:  # e.g. only empty segments
            raise RegistrationError(f"Could not convert the segmentation {describeNode(node)} to a label map; check "
                                    f"that it has a binary labelmap representation and geometry.")
        writeVolume(labelmap, path)
    finally:
        for temporary in (labelmap, colors):
            displayNode = temporary.GetDisplayNode() if hasattr(temporary, "GetDisplayNode") else None
            if displayNode is not None:
                scene.RemoveNode(displayNode)
            scene.RemoveNode(temporary)
        for i in reversed(range(scene.GetNumberOfNodes())):  # the export adds a "<name>_ColorTable" too
            extra = scene.GetNthNode(i)
            if extra.GetID() not in existing and extra.IsA("vtkMRMLColorNode"):
                scene.RemoveNode(extra)


def writeInputs(scene, folder: Path, fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None,
                fixedMask=None, fixedMaskSegment: Optional[str] = ALL_SEGMENTS) -> Dict[str, Any]:
    """Write checked inputs into ``folder`` (volumes as ``fixed.nrrd`` / ``moving.nrrd``, the
    segmentations on their volume's grid with one label value per segment name, shared by fixed and
    moving, the mask on the fixed grid with every chosen segment at 1).

    Returns the worker request's input entries: ``fixed``, ``moving``, ``fixed_segmentation``,
    ``moving_segmentation`` (paths or None), ``label_names`` (``{"value": "segment name"}``) and,
    with a mask, ``fixed_mask``."""
    writeVolume(fixedVolume, folder / "fixed.nrrd")
    writeVolume(movingVolume, folder / "moving.nrrd")
    names = list(dict.fromkeys(segmentNames(fixedSegmentation) + segmentNames(movingSegmentation)))
    labels = {name: i + 1 for i, name in enumerate(names)}
    entries: Dict[str, Any] = {
        "fixed": str(folder / "fixed.nrrd"), "moving": str(folder / "moving.nrrd"),
        "fixed_segmentation": None, "moving_segmentation": None,
        "label_names": {str(v): k for k, v in labels.items()},
    }
    if fixedSegmentation is not None:
        writeSegmentation(scene, fixedSegmentation, fixedVolume, labels, folder / "fixed_segmentation.nrrd")
        writeSegmentation(scene, movingSegmentation, movingVolume, labels, folder / "moving_segmentation.nrrd")
        entries["fixed_segmentation"] = str(folder / "fixed_segmentation.nrrd")
        entries["moving_segmentation"] = str(folder / "moving_segmentation.nrrd")
    if fixedMask is not None:
        maskNames = {name: 1 for name in segmentNames(fixedMask)}  # every exported segment -> 1
        writeSegmentation(scene, fixedMask, fixedVolume, maskNames, folder / "fixed_mask.nrrd",
                          [fixedMaskSegment] if fixedMaskSegment else None)
        entries["fixed_mask"] = str(folder / "fixed_mask.nrrd")
    return entries
