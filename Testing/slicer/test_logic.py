"""The module's Logic against real MRML nodes (slicer-core): end to end in blocking and background
modes, geometry of every output, apply / harden, cancel, bad inputs, worker failures."""

import stat
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402

from SACBRegistrationLib.slicer_logic import ROLE_FIXED, ROLE_MOVING, OutputRequest, RegistrationError, RegistrationLogic  # noqa: E402

from .conftest import load_volume  # noqa: E402


def geometry(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)]), node.GetImageData().GetDimensions()


def node_state(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def ras_to_lps(p):
    return np.array([-p[0], -p[1], p[2]])


def test_blocking_registration_creates_every_output_with_the_fixed_geometry(scene, nodes, package_path, tmp_path):
    fixed, moving = nodes["fixed"], nodes["moving"]
    fixed_mtime, moving_array = fixed.GetMTime(), slicer.util.arrayFromVolume(moving).copy()
    logic = RegistrationLogic()
    progress = []
    outputs = logic.registerVolumes(fixed, moving, nodes["fixed_seg"], nodes["moving_seg"], model=package_path,
                                    device="cpu", affine="rigid", ioSteps=2,
                                    progressCallback=lambda p, m: progress.append(p))
    # inputs untouched
    assert fixed.GetMTime() == fixed_mtime and np.array_equal(slicer.util.arrayFromVolume(moving), moving_array)
    assert progress and progress[-1] == 100 and progress == sorted(progress)
    fixed_geometry = geometry(fixed)
    for node in (outputs.warpedVolume, outputs.displacementRGB):
        matrix, dims = geometry(node)
        assert dims == fixed_geometry[1] and np.allclose(matrix, fixed_geometry[0], atol=1e-4), node.GetName()
    assert outputs.displacementRGB.GetImageData().GetNumberOfScalarComponents() == 3
    assert outputs.transform.IsA("vtkMRMLGridTransformNode")
    assert outputs.transform.GetNodeReferenceID(ROLE_FIXED) == fixed.GetID()
    assert outputs.transform.GetNodeReferenceID(ROLE_MOVING) == moving.GetID()
    # cluster maps: one segmentation, segments per level, only level 2 shown
    clusters = outputs.clusterMaps.GetSegmentation()
    names = [clusters.GetNthSegment(i).GetName() for i in range(clusters.GetNumberOfSegments())]
    assert {n.split(" cluster")[0] for n in names} == {"level 2", "level 3", "level 4", "level 5"}
    # metrics: one row per segment name (matched across segmentations by name), the mean, regularity
    table = outputs.metricsTable.GetTable()
    segment_names = [table.GetValueByName(r, "Segment").ToString() for r in range(table.GetNumberOfRows())]
    assert segment_names[:3] == ["mid", "bright", "mean"]
    assert "folding: voxels with |J| < 0 (%)" in segment_names
    assert outputs.metrics["summary"]["dice_after"] == pytest.approx(table.GetValueByName(2, "Dice after").ToDouble())
    warped_seg = outputs.warpedSegmentation.GetSegmentation()
    assert sorted(warped_seg.GetNthSegment(i).GetName() for i in range(warped_seg.GetNumberOfSegments())) == ["bright", "mid"]


def test_transform_node_maps_fixed_points_like_the_displacement_file(scene, nodes, package_path, tmp_path, monkeypatch):
    """The grid transform node Slicer loads (RAS, 'from parent' = fixed to moving) agrees with the
    ITK field the engine wrote (LPS), and hardening it on the moving volume gives the warped volume."""
    import shutil

    from SACBRegistrationLib import slicer_logic
    kept = tmp_path / "kept"
    original = slicer_logic.RegistrationLogic._loadResults

    def keep_outputs(self, report, folder, *args):
        shutil.copytree(folder, kept)
        return original(self, report, folder, *args)

    monkeypatch.setattr(slicer_logic.RegistrationLogic, "_loadResults", keep_outputs)
    fixed, moving = nodes["fixed"], nodes["moving"]
    outputs = RegistrationLogic().registerVolumes(fixed, moving, model=package_path, device="cpu")
    field = sitk.ReadImage(str(kept / "displacement.nii.gz"))
    from_parent = outputs.transform.GetTransformFromParent()
    rng = np.random.default_rng(0)
    size = field.GetSize()
    for _ in range(25):
        index = [int(rng.integers(3, n - 3)) for n in size]
        lps = np.array(field.TransformIndexToPhysicalPoint(index))
        expected = lps + np.array(field.GetPixel(index))
        ras = [-lps[0], -lps[1], lps[2]]
        assert np.allclose(ras_to_lps(from_parent.TransformPoint(ras)), expected, atol=1e-3)
    # the same transform from the .nii.gz file (Slicer warns about the ITK vector intent but reads it)
    via_image = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    storage = slicer.vtkMRMLTransformStorageNode()
    storage.SetFileName(str(kept / "displacement.nii.gz"))
    assert storage.ReadData(via_image)
    probe = [float(v) for v in field.TransformIndexToPhysicalPoint([n // 2 for n in size])]
    probe = [-probe[0], -probe[1], probe[2]]
    assert np.allclose(via_image.GetTransformFromParent().TransformPoint(probe), from_parent.TransformPoint(probe), atol=1e-3)
    # apply, then harden, on a copy of the moving volume: sampled on the fixed grid it is the warped volume
    copy = load_volume(scene, nodes["moving_image"], "moving copy", tmp_path)
    copy.SetAndObserveTransformNodeID(outputs.transform.GetID())
    assert slicer.vtkSlicerTransformLogic().hardenTransform(copy)
    hardened = _as_sitk(copy)
    resampled = sitk.GetArrayFromImage(sitk.Resample(hardened, nodes["fixed_image"], sitk.Transform(), sitk.sitkLinear, 0.0))
    warped = slicer.util.arrayFromVolume(outputs.warpedVolume)
    inside = (slice(4, -4),) * 3
    difference = np.abs(resampled - warped)[inside]
    assert np.median(difference) < 0.02 * np.ptp(warped)


def _as_sitk(node):
    """A volume node as a SimpleITK image (LPS geometry from the node's IJK to RAS matrix)."""
    matrix, _ = geometry(node)
    image = sitk.GetImageFromArray(slicer.util.arrayFromVolume(node).astype(np.float32))
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    direction = matrix[:3, :3] / spacing
    flip = np.diag([-1.0, -1.0, 1.0])  # RAS -> LPS
    image.SetSpacing(spacing.tolist())
    image.SetDirection((flip @ direction).ravel().tolist())
    image.SetOrigin((flip @ matrix[:3, 3]).tolist())
    return image


def test_background_mode_polls_progress(scene, nodes, package_path):
    job = RegistrationLogic().startRegistration(nodes["fixed"], nodes["moving"], model=package_path, device="cpu",
                                                outputs=OutputRequest(clusterMaps=False, displacementRGB=False))
    seen = set()
    while job.poll():
        seen.add(job.progress)
        time.sleep(0.05)
    assert job.state == "succeeded", job.error
    assert any(line.startswith("PROGRESS ") for line in job.log) and len(seen) >= 2
    assert job.outputs.clusterMaps is None and job.outputs.displacementRGB is None and job.outputs.warpedVolume
    assert not job.workDir.exists()


def test_existing_output_nodes_are_filled(scene, nodes, package_path):
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my result")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "my table")
    outputs = RegistrationLogic().registerVolumes(
        nodes["fixed"], nodes["moving"], nodes["fixed_seg"], nodes["moving_seg"], model=package_path, device="cpu",
        outputs=OutputRequest(warpedVolumeNode=target, metricsTableNode=table, transform=False, clusterMaps=False,
                              displacementRGB=False, warpedSegmentation=False))
    assert outputs.warpedVolume is target and outputs.metricsTable is table
    assert target.GetImageData() is not None and table.GetTable().GetNumberOfRows() > 3
    assert scene.GetFirstNodeByName("moving registered") is None


def test_cancel_leaves_the_scene_and_no_process(scene, nodes, package_path):
    before = node_state(scene)
    job = RegistrationLogic().startRegistration(nodes["fixed"], nodes["moving"], model=package_path, device="cpu",
                                                ioSteps=2000)
    while job.poll() and not any("instance optimisation" in line for line in job.log):
        time.sleep(0.05)
    job.cancel()
    assert job.state == "cancelled" and job.process.poll() is not None
    assert not job.workDir.exists()
    assert node_state(scene) == before
    with pytest.raises(RegistrationError, match="cancelled"):
        job.wait()


def test_bad_inputs_give_clear_errors_and_create_nothing(scene, nodes, tmp_path):
    logic = RegistrationLogic()
    flat = sitk.GetImageFromArray(np.random.rand(1, 20, 20).astype(np.float32))
    slab = load_volume(scene, flat, "slab", tmp_path)
    empty_seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    before = node_state(scene)
    cases = [
        ((None, nodes["moving"]), "Select a fixed volume"),
        ((nodes["fixed"], None), "Select a moving volume"),
        ((nodes["fixed"], nodes["fixed"]), "same node"),
        ((slab, nodes["moving"]), "is 2D"),
        ((nodes["fixed"], nodes["moving"], empty_seg, nodes["moving_seg"]), "has no segments"),
        ((nodes["fixed"], nodes["moving"], nodes["fixed_seg"]), "both a fixed and a moving segmentation"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            logic.startRegistration(*args)
        assert node_state(scene) == before, message  # a refused start adds or removes no node
    nodes["moving"].SetAndObserveTransformNodeID(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode").GetID())
    with pytest.raises(ValueError, match="under the transform"):
        logic.startRegistration(nodes["fixed"], nodes["moving"])
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    with pytest.raises(ValueError, match="is a label map"):
        logic.startRegistration(labelmap, nodes["fixed"])


def test_engine_errors_reach_the_user_readably(scene, nodes):
    before = node_state(scene)
    with pytest.raises(RegistrationError, match="no model named 'no-such-model'") as raised:
        RegistrationLogic().registerVolumes(nodes["fixed"], nodes["moving"], model="no-such-model")
    assert "Traceback" not in str(raised.value)
    assert node_state(scene) == before


def test_a_crashing_worker_is_reported_and_cleaned_up(scene, nodes, tmp_path):
    crash = tmp_path / "crash.py"
    crash.write_text("import os, sys\nprint('PROGRESS 3 starting', flush=True)\nos.kill(os.getpid(), 9)\n")
    fake = tmp_path / "python-that-crashes"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {crash}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    before = node_state(scene)
    job = RegistrationLogic(pythonExecutable=str(fake)).startRegistration(nodes["fixed"], nodes["moving"])
    with pytest.raises(RegistrationError, match=r"stopped unexpectedly \(exit code -9\)"):
        job.wait(timeout=60)
    assert node_state(scene) == before and not job.workDir.exists()


def test_models_are_listed_without_torch(package_path, monkeypatch, tmp_path):
    monkeypatch.setenv("SACB_MODELS_DIR", str(tmp_path / "models"))
    assert RegistrationLogic.torchAvailable()
    summary = RegistrationLogic.importModel(package_path, name="mine")
    assert summary["name"] == "mine"  # imported under the given name, inside the package too
    assert "mine" in [m["name"] for m in RegistrationLogic.availableModels()]
