"""Fixtures for the Logic under slicer-core: a real MRML scene with volumes and segmentations."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

slicer = pytest.importorskip("slicer")  # the slicer-core package (test dependency)

from SACBRegistrationLib.networks.config import SACBNetConfig  # noqa: E402
from SACBRegistrationLib.networks.sacbnet import SACBNet  # noqa: E402
from SACBRegistrationLib.packages import write_package  # noqa: E402

from ..pipeline.conftest import labels_of, make_image, rotation, smooth_volume  # noqa: E402


@pytest.fixture(scope="session")
def package_path(tmp_path_factory):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SACBNet(SACBNetConfig(clusters=2))
    return str(write_package(tmp_path_factory.mktemp("pkg") / "tiny", model, name="tiny", version="0",
                             spacing_mm=[4, 4, 4], intensity={"method": "percentile", "low": 0.5, "high": 99.5},
                             modality="MR T1w", anatomy="test").path)


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(1)


def load_volume(scene, image: sitk.Image, name: str, tmp_path, label: bool = False):
    path = tmp_path / f"{name}.nrrd"
    sitk.WriteImage(image, str(path))
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def segmentation_from(scene, labelmap_node, reference, names):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", labelmap_node.GetName() + " seg")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap_node, segmentation)
    segments = segmentation.GetSegmentation()
    for i, name in zip(range(segments.GetNumberOfSegments()), names):
        segments.GetNthSegment(i).SetName(name)
    scene.RemoveNode(labelmap_node)
    return segmentation


@pytest.fixture
def nodes(scene, tmp_path):
    """Fixed (oblique) and moving volumes with segmentations named 'dark', 'mid', 'bright'; the
    moving segmentation lists its segments in another order (matched by name)."""
    fixed_array = smooth_volume((30, 34, 28), 0)
    fixed = make_image(fixed_array, (2.0, 1.8, 2.2), rotation(0.1, 0.0, 0.2), (-20, -30, -25))
    moving_array = np.roll(fixed_array, 2, axis=1)
    moving = make_image(moving_array, (2.0, 1.8, 2.2), rotation(0.1, 0.0, 0.2), (-20, -30, -25))
    fixed_node = load_volume(scene, fixed, "fixed", tmp_path)
    moving_node = load_volume(scene, moving, "moving", tmp_path)
    fixed_lab = load_volume(scene, make_image(labels_of(fixed_array), fixed.GetSpacing(), rotation(0.1, 0.0, 0.2),
                                              fixed.GetOrigin()), "fixed_labels", tmp_path, label=True)
    relabelled = {0: 0, 1: 3, 2: 1, 3: 2}
    moving_labels = np.vectorize(relabelled.get)(labels_of(moving_array)).astype(np.int16)
    moving_lab = load_volume(scene, make_image(moving_labels, moving.GetSpacing(), rotation(0.1, 0.0, 0.2),
                                               moving.GetOrigin()), "moving_labels", tmp_path, label=True)
    return {"fixed": fixed_node, "moving": moving_node,
            "fixed_seg": segmentation_from(scene, fixed_lab, fixed_node, ["mid", "bright"]),
            "moving_seg": segmentation_from(scene, moving_lab, moving_node, ["bright", "mid"]),
            "fixed_image": fixed, "moving_image": moving}
