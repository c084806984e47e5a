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
    for node in (outputs.warpedVolume, outputs.jacobian):
        matrix, dims = geometry(node)
        assert dims == fixed_geometry[1] and np.allclose(matrix, fixed_geometry[0], atol=1e-4), node.GetName()
    # the RGB picture lives on the grid the field was estimated on: the fixed image's axes, the model's spacing
    matrix, _ = geometry(outputs.displacementRGB)
    assert np.allclose(matrix[:3, :3] / np.linalg.norm(matrix[:3, :3], axis=0),
                       fixed_geometry[0][:3, :3] / np.linalg.norm(fixed_geometry[0][:3, :3], axis=0), atol=1e-4)
    assert outputs.displacementRGB.GetImageData().GetNumberOfScalarComponents() == 3
    # the Jacobian determinant: the volume the metrics' regularity figures come from, shown centred at 1
    determinant = slicer.util.arrayFromVolume(outputs.jacobian)
    regularity = outputs.metrics["regularity"]
    assert determinant.min() == pytest.approx(regularity["jacobian_min"], rel=1e-5)
    assert determinant.max() == pytest.approx(regularity["jacobian_max"], rel=1e-5)
    assert 100 * np.mean(determinant < 0) == pytest.approx(regularity["negative_jacobian_percent"])
    display = outputs.jacobian.GetDisplayNode()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 2.0)
    assert (outputs.folding is None) == bool((determinant > 0).all())  # a folding segmentation only with folds
    assert outputs.transform.IsA("vtkMRMLTransformNode")
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
    # the engine's transform file (pre-alignment composed with the field on its own grid), evaluated by ITK
    # on the fixed grid and written as a displacement image, as `sacb register --write-field` writes it
    transform = sitk.ReadTransform(str(kept / "transform.h5"))
    fixed_image = nodes["fixed_image"]
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fixed_image.GetSize(),
                                              fixed_image.GetOrigin(), fixed_image.GetSpacing(),
                                              fixed_image.GetDirection())
    sitk.WriteImage(sitk.Cast(field, sitk.sitkVectorFloat32), str(kept / "displacement.nii.gz"))
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
    with pytest.raises(ValueError, match="expected finePass True, False or None"):
        logic.startRegistration(nodes["fixed"], nodes["moving"], finePass="yes")
    assert node_state(scene) == before
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


# --------------------------------------------------------------------------- fixed-image mask, temporary files


def fake_worker(tmp_path, name="python-that-fails"):
    """An interpreter stand-in that reports an engine error at once (the inputs are written by then)."""
    script = tmp_path / f"{name}.py"
    script.write_text("print('ERROR input stopped by the test', flush=True)\nraise SystemExit(3)\n")
    fake = tmp_path / name
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {script}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return str(fake)


def segment_id(segmentation_node, name):
    segmentation = segmentation_node.GetSegmentation()
    return next(segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
                if segmentation.GetNthSegment(i).GetName() == name)


def fixed_labels(nodes):
    """The fixture's fixed label values: 1 is segment 'mid', 2 is 'bright'."""
    from ..pipeline.conftest import labels_of
    return labels_of(sitk.GetArrayFromImage(nodes["fixed_image"]))


def test_a_chosen_mask_segment_reaches_the_engine_and_temporary_files_are_kept(scene, nodes, package_path):
    import json
    import shutil

    fixed = nodes["fixed"]
    job = RegistrationLogic().startRegistration(
        fixed, nodes["moving"], model=package_path, device="cpu", quality="fast", ioSteps=2, finePass=True,
        fixedMask=nodes["fixed_seg"], fixedMaskSegment=segment_id(nodes["fixed_seg"], "bright"),
        keepTemporaryFiles=True, outputs=OutputRequest(clusterMaps=False, displacementRGB=False))
    try:
        outputs = job.wait(timeout=300)
        assert outputs.warpedVolume is not None
        assert job.workDir.is_dir(), "keepTemporaryFiles: the folder stays"
        assert any(str(job.workDir) in line and "kept" in line for line in job.log)  # the user is told where
        request = json.loads((job.workDir / "request.json").read_text())
        assert request["fixed_mask"] == str(job.workDir / "fixed_mask.nrrd")
        mask = sitk.ReadImage(request["fixed_mask"])
        assert np.allclose(mask.GetOrigin(), nodes["fixed_image"].GetOrigin(), atol=1e-4)
        assert np.allclose(mask.GetSpacing(), nodes["fixed_image"].GetSpacing(), atol=1e-5)
        assert np.array_equal(sitk.GetArrayFromImage(mask) != 0, fixed_labels(nodes) == 2)  # 'bright' only
        assert (job.workDir / "output" / "warped.nii.gz").is_file()  # the engine's outputs too
        assert request["options"]["fine_pass"] is True  # the fine pass reached the engine, and ran
        report = json.loads((job.workDir / "output" / "report.json").read_text())
        assert report["options"]["fine_pass"] is True and "fine_pass" in report["timings_s"]
    finally:
        shutil.rmtree(job.workDir, ignore_errors=True)


def test_all_mask_segments_are_united(scene, nodes, tmp_path):
    import shutil

    job = RegistrationLogic(pythonExecutable=fake_worker(tmp_path)).startRegistration(
        nodes["fixed"], nodes["moving"], fixedMask=nodes["fixed_seg"], keepTemporaryFiles=True)
    try:
        with pytest.raises(RegistrationError, match="stopped by the test"):
            job.wait(timeout=60)
        assert job.workDir.is_dir()  # kept after a failure too: that is when it is needed
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(job.workDir / "fixed_mask.nrrd")))
        assert np.array_equal(mask != 0, fixed_labels(nodes) > 0)
    finally:
        shutil.rmtree(job.workDir, ignore_errors=True)


def test_without_keep_the_temporary_folder_goes_after_a_failure(scene, nodes, tmp_path):
    job = RegistrationLogic(pythonExecutable=fake_worker(tmp_path)).startRegistration(nodes["fixed"], nodes["moving"])
    with pytest.raises(RegistrationError):
        job.wait(timeout=60)
    assert not job.workDir.exists() and not any("kept" in line for line in job.log)


def test_an_empty_mask_is_refused_by_the_engine(scene, nodes, tmp_path):
    """The worker passes the mask to the engine: an all-zero mask fails with the engine's message."""
    zeros = sitk.Image(nodes["fixed_image"].GetSize(), sitk.sitkUInt8)
    zeros.CopyInformation(nodes["fixed_image"])
    empty = load_volume(scene, zeros, "empty mask", tmp_path, label=True)
    before = node_state(scene)
    with pytest.raises(RegistrationError, match="fixed mask is empty"):
        RegistrationLogic().registerVolumes(nodes["fixed"], nodes["moving"], device="cpu", fixedMask=empty, timeout=120)
    assert node_state(scene) == before


def test_bad_mask_choices_give_clear_errors(scene, nodes, tmp_path):
    logic = RegistrationLogic()
    labels = load_volume(scene, nodes["fixed_image"], "some labels", tmp_path, label=True)
    empty_seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "no segments")
    before = node_state(scene)
    for mask, segment, message in ((nodes["fixed_seg"], "NoSuchSegment", "has no segment with ID 'NoSuchSegment'"),
                                   (labels, "Segment_1", "is a label map"),
                                   (empty_seg, "", "has no segments")):
        with pytest.raises(ValueError, match=message):
            logic.startRegistration(nodes["fixed"], nodes["moving"], fixedMask=mask, fixedMaskSegment=segment)
        assert node_state(scene) == before


def test_mask_segment_choices(scene, nodes, tmp_path):
    seg = nodes["fixed_seg"]
    assert RegistrationLogic.maskSegmentChoices(seg) == [
        ("All segments (union)", ""), ("mid", segment_id(seg, "mid")), ("bright", segment_id(seg, "bright"))]
    labels = load_volume(scene, nodes["fixed_image"], "labels", tmp_path, label=True)
    assert RegistrationLogic.maskSegmentChoices(labels) == [("All labels (non-zero voxels)", "")]
    assert RegistrationLogic.maskSegmentChoices(None) == []


# --------------------------------------------------------------------------- results that show themselves


@pytest.fixture
def surface_rules():
    """Slicer registers the segmentation converter rules at start-up, before any segmentation exists (each
    copies the rules when created); slicer-core does not. Request this fixture before `nodes`."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not any(rule.IsA("vtkBinaryLabelmapToClosedSurfaceConversionRule") for rule in factory.GetConverterRules()):
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())


def test_results_display_fixed_under_warped_table_and_3d_segmentation(surface_rules, scene, nodes):
    from SACBRegistrationLib.slicer_logic import RegistrationOutputs

    warped = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "metrics")
    transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "field")
    segmentation = nodes["fixed_seg"]  # stands for the warped segmentation (a segmentation on the fixed grid)
    assert not segmentation.GetSegmentation().ContainsRepresentation("Closed surface")
    outputs = RegistrationOutputs(warpedVolume=warped, transform=transform, metricsTable=table,
                                  warpedSegmentation=segmentation)
    display = RegistrationLogic().prepareResultDisplay(nodes["fixed"], nodes["moving"], outputs)
    assert display.background is nodes["fixed"] and display.foreground is warped
    assert display.foregroundOpacity == 0.5 and display.table is table
    assert display.segmentation3D is segmentation and display.surfaceCreated
    assert segmentation.GetSegmentation().ContainsRepresentation("Closed surface")
    assert segmentation.GetDisplayNode().GetVisibility3D()
    assert nodes["moving"].GetParentTransformNode() is None  # the warped volume is shown: the moving stays put


def test_without_a_warped_volume_the_moving_volume_goes_under_the_transform(scene, nodes):
    from SACBRegistrationLib.slicer_logic import RegistrationOutputs

    transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "field")
    outputs = RegistrationOutputs(transform=transform)
    display = RegistrationLogic().prepareResultDisplay(nodes["fixed"], nodes["moving"], outputs)
    assert nodes["moving"].GetParentTransformNode() is transform
    assert display.foreground is nodes["moving"] and display.table is None and display.segmentation3D is None


def test_a_label_map_result_is_not_made_into_a_surface(scene, nodes, tmp_path):
    from SACBRegistrationLib.slicer_logic import RegistrationOutputs

    labels = load_volume(scene, nodes["fixed_image"], "warped labels", tmp_path, label=True)
    display = RegistrationLogic().prepareResultDisplay(nodes["fixed"], nodes["moving"],
                                                       RegistrationOutputs(warpedSegmentation=labels))
    assert display.segmentation3D is None and display.foreground is None  # nothing to overlay, nothing moved
    assert nodes["moving"].GetParentTransformNode() is None


def test_folded_voxels_become_a_segment(scene, nodes, tmp_path):
    """A hand-made Jacobian volume with a known folded block: the folding segmentation holds exactly it."""
    fixed = nodes["fixed"]
    jacobian = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "jacobian")
    jacobian.CopyOrientation(fixed)
    values = np.ones(slicer.util.arrayFromVolume(fixed).shape, np.float32)
    values[2:5, 3:7, 4:6] = -0.5  # 3 x 4 x 2 = 24 folded voxels
    values[10, 10, 10] = 0.0  # a zero determinant counts as folded (the map collapses there)
    slicer.util.updateVolumeFromArray(jacobian, values)
    created = []
    before = scene.GetNumberOfNodes()
    folding = RegistrationLogic()._foldingSegmentation(jacobian, fixed, "folding", created)
    assert created == [folding] and folding.GetSegmentation().GetNumberOfSegments() == 1
    from SACBRegistrationLib.slicer_logic import FOLDING_SEGMENT, writeSegmentation

    writeSegmentation(scene, folding, fixed, {FOLDING_SEGMENT: 1}, tmp_path / "folding.nrrd")
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "folding.nrrd"))) > 0  # on the fixed grid
    assert int(mask.sum()) == 25 and mask[2:5, 3:7, 4:6].all() and mask[10, 10, 10]
    assert scene.GetNumberOfNodes() > before  # the segmentation (and its display) stay; the temporary label map went
    assert scene.GetFirstNodeByName("folding labels") is None
    slicer.util.updateVolumeFromArray(jacobian, np.abs(values) + 0.5)
    assert RegistrationLogic()._foldingSegmentation(jacobian, fixed, "none", []) is None


def test_output_fields_follow_the_vocabulary_and_the_parameter_node_maps_onto_a_request():
    import dataclasses
    from types import SimpleNamespace

    from SACBRegistrationLib.slicer_results import RegistrationOutputs, createParameterName, outputRequestFromParameters
    from SACBRegistrationLib.vocabulary import SLICER_OUTPUTS
    request_fields = [f.name for f in dataclasses.fields(OutputRequest)]
    assert request_fields == list(SLICER_OUTPUTS) + [name + "Node" for name in SLICER_OUTPUTS]
    assert [f.name for f in dataclasses.fields(RegistrationOutputs)][:len(SLICER_OUTPUTS)] == list(SLICER_OUTPUTS)
    # every switch off but the transform's; the warped volume into a chosen node
    chosen = object()
    parameters = SimpleNamespace(**{createParameterName(name): name == "transform" for name in SLICER_OUTPUTS},
                                 **{name: None for name in SLICER_OUTPUTS})
    parameters.warpedVolume = chosen
    request = outputRequestFromParameters(parameters)
    assert [name for name in SLICER_OUTPUTS if getattr(request, name)] == ["transform"]
    assert request.warpedVolumeNode is chosen and request.transformNode is None
    outputs = RegistrationOutputs(transform="t", jacobian="j", folding="f")
    assert outputs.nodes() == ["t", "j", "f"]
