"""End-to-end registration: physical correctness, round trips, outputs, cancellation, resources."""

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SACBRegistrationLib.metrics import jacobian_determinant
from SACBRegistrationLib.pipeline import Cancelled, InputError, RegistrationOptions, register
from SACBRegistrationLib.pipeline import outputs as outputs_module
from SACBRegistrationLib.pipeline.evaluate import evaluate_transform, read_transform
from SACBRegistrationLib.pipeline.geometry import field_in_index_frame, vector_image
from SACBRegistrationLib.pipeline.registration import domain_warnings, warp_segmentation
from SACBRegistrationLib.pipeline.resources import ResourceError, plan_device

from .conftest import make_image, rotation, smooth_volume


def smooth_field(reference: sitk.Image, amplitude_mm: float, seed: int) -> sitk.Image:
    """A smooth random physical displacement (LPS mm) on ``reference``."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    shape = tuple(reversed(reference.GetSize()))
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 6) for _ in range(3)], -1)
    field *= amplitude_mm / np.abs(field).max()
    return vector_image(field, reference)


def exact_predictor(true_field: sitk.Image):
    """Stands in for the network: returns, on the network grid, the voxel displacement of the
    known physical field, computed with SimpleITK's index <-> point arithmetic alone."""
    transform = sitk.DisplacementFieldTransform(sitk.Image(true_field))

    def predict(moving, fixed, grid):
        d, h, w = fixed.shape[2:]
        disp = np.zeros((3, d, h, w))
        for k in range(d):
            for j in range(h):
                for i in range(w):
                    x = grid.TransformIndexToPhysicalPoint((i, j, k))
                    y = transform.TransformPoint(x)
                    ci = grid.TransformPhysicalPointToContinuousIndex(y)
                    disp[:, k, j, i] = (ci[2] - k, ci[1] - j, ci[0] - i)  # (d, h, w) components
        return torch.from_numpy(disp)[None].float(), {}

    return predict


def test_known_deformation_comes_out_in_millimetres(tiny_package):
    # oblique, anisotropic, odd-sized fixed image; a known smooth physical field
    fixed = make_image(smooth_volume((27, 33, 25), 3), (1.9, 1.4, 2.6), rotation(0.2, -0.3, 0.4), (5, -7, 9))
    moving = make_image(smooth_volume((30, 30, 30), 4), (2.0, 2.0, 2.0), rotation(-0.1, 0.2, 0.0), (-20, -30, -25))
    true_field = smooth_field(fixed, 6.0, 0)
    result = register(fixed, moving, model=tiny_package, predictor=exact_predictor(true_field), cluster_maps=False,
                      quality="fast", affine="off")
    got = sitk.GetArrayFromImage(result.displacement)
    want = sitk.GetArrayFromImage(true_field)
    # the network grid is coarser (4 mm) than the field's detail: compare with a tolerance
    # that still catches any flipped axis, wrong spacing or direction (errors of several mm)
    # (the true field is zero outside the fixed grid, so the outermost voxels interpolate
    # towards zero: the maximum is taken inside)
    error = np.linalg.norm(got - want, axis=-1)
    assert np.median(error) < 0.15 and error[3:-3, 3:-3, 3:-3].max() < 1.0
    assert np.abs(want).max() > 5.0


def test_written_transform_reproduces_the_warped_image(pair, tiny_package, tmp_path):
    fixed, moving, fixed_seg, moving_seg = pair
    result = register(fixed, moving, fixed_seg, moving_seg, model=tiny_package, affine="rigid")
    assert "displacement" not in vars(result)  # the whole map on the fixed grid is built only when read
    assert not {"displacement", "jacobian"} & set(result.save(tmp_path / "default"))  # only on request
    assert "displacement" not in vars(result) and result.displacement is result.displacement  # then kept
    files = result.save(tmp_path / "out", extras=("displacement", "jacobian"))
    background = float(sitk.GetArrayViewFromImage(moving).min())
    # through SimpleITK alone: the .h5 transform file (the rigid pre-alignment composed with the field
    # on the grid it was estimated on) ...
    transform = sitk.ReadTransform(str(files["transform"]))
    again = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, background, sitk.sitkFloat32)
    # (the outputs were warped through the map's float32 displacement on the fixed grid: the same
    # positions to micrometres, so the intensities agree to a millionth of the image's range)
    difference = np.abs(sitk.GetArrayFromImage(again) - sitk.GetArrayFromImage(result.warped))
    assert difference.max() < 1e-5 * np.ptp(sitk.GetArrayViewFromImage(moving))
    labels = sitk.Resample(moving_seg, fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    assert np.array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(result.warped_segmentation))
    assert result.field.GetSpacing() == (4.0, 4.0, 4.0)  # the tiny model's grid, not the fixed grid
    # ... the Jacobian determinant of that map on the fixed grid (against central differences of ITK's
    # own evaluation of the transform) ...
    jacobian = sitk.ReadImage(str(files["jacobian"]))
    assert jacobian.GetSize() == fixed.GetSize() and np.allclose(jacobian.GetDirection(), fixed.GetDirection())
    itk_field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                                  fixed.GetSpacing(), fixed.GetDirection())
    components, spacing = field_in_index_frame(itk_field)
    assert np.abs(sitk.GetArrayFromImage(jacobian) - jacobian_determinant(components, spacing)).max() < 1e-3
    # ... and the displacement-field image (stored in float32)
    field = sitk.ReadImage(str(files["displacement"]))
    assert field.GetNumberOfComponentsPerPixel() == 3 and np.allclose(field.GetDirection(), fixed.GetDirection())
    from_image = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    again = sitk.Resample(moving, fixed, from_image, sitk.sitkLinear, background, sitk.sitkFloat32)
    assert np.abs(sitk.GetArrayFromImage(again) - sitk.GetArrayFromImage(result.warped)).max() < 1e-2
    assert isinstance(read_transform(files["displacement"]), sitk.DisplacementFieldTransform)
    # the written warped image and segmentation live on the fixed grid; cluster maps on their level's grid
    for key in ("clusters_level2_fixed", "clusters_level5_moving"):
        image = sitk.ReadImage(str(files[key]))
        assert image.GetPixelID() == sitk.sitkUInt8 and np.allclose(image.GetDirection(), fixed.GetDirection())
        assert image.GetSpacing() == result.cluster_maps[key.removeprefix("clusters_")].GetSpacing() != fixed.GetSpacing()
    written_labels = sitk.ReadImage(str(files["warped_segmentation"]))  # labels 0-2: written as uint8, the same labels
    assert written_labels.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(written_labels), sitk.GetArrayFromImage(result.warped_segmentation))
    for key in ("warped", "warped_segmentation"):
        image = sitk.ReadImage(str(files[key]))
        assert image.GetSize() == fixed.GetSize()
        assert np.allclose(image.GetOrigin(), fixed.GetOrigin()) and np.allclose(image.GetDirection(), fixed.GetDirection())
    clusters = sitk.GetArrayFromImage(sitk.ReadImage(str(files["clusters_level2_fixed"])))
    assert set(np.unique(clusters)) <= {1, 2} and clusters.min() >= 1
    rgb = sitk.ReadImage(str(files["displacement_rgb"]))
    assert rgb.GetNumberOfComponentsPerPixel() == 3 and rgb.GetPixelID() == sitk.sitkVectorUInt8
    report = json.loads(files["report"].read_text())
    assert report["model"]["name"] == "tiny" and set(report["files"]) == set(files)
    metrics = json.loads(files["metrics_json"].read_text())
    assert [row["label"] for row in metrics["labels"]] == [1, 2]
    check_overview(sitk.GetArrayFromImage(sitk.ReadImage(str(files["overview"]))), result)
    # sacb evaluate gives the same table from the written transform
    table = evaluate_transform(fixed, moving, files["transform"], fixed_seg, moving_seg)
    assert table.summary["dice_after"] == pytest.approx(result.metrics.summary["dice_after"])


def check_overview(picture: np.ndarray, result) -> None:
    """The overview (``visualisation.overview``): an ``(H, W, 3)`` uint8 picture of ``PANEL``-square
    panels, rows axial / coronal / sagittal, columns fixed, moving, warped, checkerboard, RGB
    displacement and (with cluster maps) clusters, below 26-pixel titles with 4-pixel gaps, above
    one 18-pixel footer line per ``footer_lines`` entry."""
    from SACBRegistrationLib.pipeline.outputs import footer_lines
    from SACBRegistrationLib.pipeline.visualisation import PANEL

    title, gap = 26, 4
    columns = 6 if "level2_fixed" in result.cluster_maps else 5
    assert picture.dtype == np.uint8
    assert picture.shape == (title + 3 * (PANEL + gap) + 8 + 18 * len(footer_lines(result)),
                             columns * (PANEL + gap) + gap, 3)

    def panel(row: int, column: int) -> np.ndarray:
        top, left = title + row * (PANEL + gap), gap + column * (PANEL + gap)
        return picture[top:top + PANEL, left:left + PANEL].astype(int)

    for row in range(3):
        for column in range(columns):
            assert panel(row, column).std() > 5, (row, column)  # an image, not a constant
        # the checkerboard alternates fixed and warped tiles of PANEL // 8 pixels
        tile = PANEL // 8
        middle = slice(3 * tile, 4 * tile)
        assert np.array_equal(panel(row, 3)[middle, middle], panel(row, 0)[middle, middle])
        right = slice(4 * tile, 5 * tile)
        assert np.array_equal(panel(row, 3)[middle, right], panel(row, 2)[middle, right])
        assert not np.array_equal(panel(row, 0), panel(row, 1))  # fixed and moving differ


def test_instance_optimisation_recovers_a_known_deformation(tiny_package):
    """No network (zero initial field): instance optimisation alone must find a known smooth
    deformation of an oblique, anisotropic image, in millimetres."""
    fixed = make_image(smooth_volume((40, 44, 36), 5, sigma=2.0), (2.0, 1.8, 2.4), rotation(0.15, 0.1, -0.2), (0, 0, 0))
    true_field = smooth_field(fixed, 5.0, 1)
    truth = sitk.DisplacementFieldTransform(sitk.Image(true_field))
    # moving such that fixed(x) = moving(x + w(x)): resample fixed through the inverse map
    inverse = sitk.InvertDisplacementField(true_field, maximumNumberOfIterations=50)
    moving = sitk.Resample(fixed, fixed, sitk.DisplacementFieldTransform(inverse), sitk.sitkLinear, 0.0)

    def zero(moving_t, fixed_t, grid):
        return torch.zeros((1, 3) + tuple(fixed_t.shape[2:])), {}

    package = dataclasses.replace(tiny_package, spacing_mm=[2.0, 2.0, 2.0])  # the grid only: no network here
    result = register(fixed, moving, model=package, predictor=zero, io_levels=((2.0, 150),), io_lr=0.1,
                      io_smoothness=0.5, cluster_maps=False, affine="off")
    got, want = sitk.GetArrayFromImage(result.displacement), sitk.GetArrayFromImage(true_field)
    inside = (slice(6, -6),) * 3
    error = np.linalg.norm(got - want, axis=-1)[inside].mean()
    magnitude = np.linalg.norm(want, axis=-1)[inside].mean()
    assert error < 0.5 * magnitude, (error, magnitude)
    del truth


def test_deterministic(pair, tiny_package):
    fixed, moving, _, _ = pair
    a = register(fixed, moving, model=tiny_package, io_steps=3)
    torch.manual_seed(123)
    b = register(fixed, moving, model=tiny_package, io_steps=3)
    assert np.array_equal(sitk.GetArrayFromImage(a.displacement), sitk.GetArrayFromImage(b.displacement))


def test_linear_label_interpolation(pair, tiny_package):
    fixed, moving, fixed_seg, moving_seg = pair
    result = register(fixed, moving, fixed_seg, moving_seg, model=tiny_package, label_interpolation="linear",
                      cluster_maps=False)
    linear = sitk.GetArrayFromImage(result.warped_segmentation)
    nearest = sitk.GetArrayFromImage(warp_segmentation(moving_seg, fixed, result.transform, "nearest"))
    # labels 0 (outside the moving image), 1 and 2 (terciles) all survive: no label lost, none invented
    assert set(np.unique(linear)) == set(np.unique(nearest)) == {0, 1, 2}
    # label-wise linear interpolation differs from nearest neighbour only along label boundaries
    assert 0 < np.mean(linear != nearest) < 0.1


def test_cancel_stops_at_the_next_stage(pair, tiny_package):
    fixed, moving, _, _ = pair
    calls, messages = {"n": 0}, []

    def cancel():
        calls["n"] += 1
        return calls["n"] >= 3  # cancelled during the third stage (pre-alignment)

    with pytest.raises(Cancelled):
        register(fixed, moving, model=tiny_package, cancel=cancel, progress=lambda f, m: messages.append(m))
    assert calls["n"] == 3  # checked once per stage, and nothing ran after the cancel
    assert not any("SACB-Net" in m or "warping" in m for m in messages), messages


def test_failed_save_leaves_nothing_half_written(pair, tiny_package, tmp_path, monkeypatch):
    fixed, moving, _, _ = pair
    result = register(fixed, moving, model=tiny_package, cluster_maps=False)
    out = tmp_path / "out"
    result.save(out)
    first = sorted(p.name for p in out.iterdir())
    report = (out / "report.json").read_text()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(outputs_module, "overview_picture", broken)  # fails after most files are written
    with pytest.raises(OSError, match="disk full"):
        result.save(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == first and (out / "report.json").read_text() == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder or lock left
    with pytest.raises(OSError, match="disk full"):
        result.save(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_domain_warnings(tiny_package):
    ct = make_image(np.random.default_rng(0).uniform(-1000, 1500, (20, 20, 20)).astype(np.float32))
    mr = make_image(smooth_volume((20, 20, 20), 1), (1.0, 1.0, 5.0))
    one_mm = dataclasses.replace(tiny_package, spacing_mm=[1.0, 1.0, 1.0])
    notes = domain_warnings(ct, mr, one_mm)
    assert any("looks like CT" in n for n in notes)
    assert any("5.0 mm voxels" in n for n in notes) and any("anisotropic" in n for n in notes)
    iso = make_image(smooth_volume((20, 20, 20), 1), (1.0, 1.0, 1.0))
    assert domain_warnings(iso, iso, one_mm) == []


def test_images_too_large_for_the_machine(monkeypatch):
    import SACBRegistrationLib.pipeline.resources as resources
    monkeypatch.setattr(resources, "available_memory", lambda device: 10 * 2 ** 20)
    with pytest.raises(ResourceError, match="needs about .* only 0.0 GB is available; crop the images"):
        plan_device("cpu", 512 ** 3, 512 ** 3, [])


def test_small_gpu_falls_back_to_the_cpu(monkeypatch):
    import SACBRegistrationLib.pipeline.resources as resources
    monkeypatch.setattr(resources, "resolve_device", lambda requested: torch.device("cuda"))
    monkeypatch.setattr(resources, "available_memory",
                        lambda device: 2 ** 20 if device.type == "cuda" else 64 * 2 ** 30)
    notes = []
    assert plan_device("cuda", 160 * 192 * 160, 10 ** 6, notes).type == "cpu"
    assert "running on the CPU instead" in notes[0]


def test_options_are_validated(pair, tiny_package):
    fixed, moving, _, _ = pair
    for bad, message in (({"affine": "similarity"}, "expected affine"), ({"clusters": 0}, "expected clusters"),
                         ({"io_steps": -1}, "expected io_steps"), ({"device": "gpu"}, "expected device")):
        with pytest.raises(ValueError, match=message):
            register(fixed, moving, model=tiny_package, **bad)
    with pytest.raises(ValueError, match="either options or keyword"):
        register(fixed, moving, options=RegistrationOptions(), model=tiny_package)


def test_api_misuse_gets_messages_that_say_what_to_pass(pair, tiny_package):
    fixed, moving, fixed_seg, _ = pair
    with pytest.raises(InputError, match="got ndarray .*sitk.GetImageFromArray"):
        register(sitk.GetArrayFromImage(fixed), moving, model=tiny_package)
    with pytest.raises(InputError, match="for the moving image, got NoneType"):
        register(fixed, None, model=tiny_package)
    with pytest.raises(TypeError, match="expected options as a RegistrationOptions"):
        register(fixed, moving, options={})


def test_one_sided_segmentation_and_identical_inputs_are_warned_about(pair, tiny_package):
    fixed, moving, fixed_seg, _ = pair
    result = register(fixed, moving, fixed_seg, model=tiny_package, quality="fast", cluster_maps=False)
    assert any("only a fixed segmentation was given" in w for w in result.warnings)
    same = register(fixed, fixed, model=tiny_package, quality="fast", cluster_maps=False)
    assert any("the fixed and moving images are the same data" in w for w in same.warnings)
    assert not any("same data" in w for w in result.warnings)


def test_a_segmentation_differing_only_in_direction_is_described(pair, tiny_package):
    fixed, moving, fixed_seg, moving_seg = pair
    turned = sitk.Image(fixed_seg)
    turned.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(InputError, match=r"direction \(0\.0, 1\.0, 0\.0.* vs \(1\.0, 0\.0"):
        register(fixed, moving, turned, moving_seg, model=tiny_package)


def test_symmetric_inference_leaves_an_image_registered_to_itself_alone(pair, tiny_package):
    """Every preset runs the network both ways (symmetric); an explicit False wins. With it, an
    image and itself give the identity to float rounding (the untrained network alone moves it)."""
    fixed = pair[0]
    fields = {}
    for symmetric in (True, False):
        result = register(fixed, fixed, model=tiny_package, quality="fast", affine="off", symmetric=symmetric,
                          cluster_maps=False)
        assert result.options["symmetric"] is symmetric
        fields[symmetric] = sitk.GetArrayFromImage(result.field)
    assert np.abs(fields[True]).max() < 1e-3  # mm
    assert np.abs(fields[False]).max() > 0.1
    for quality in ("fast", "balanced", "accurate"):
        assert RegistrationOptions(quality=quality).resolved().symmetric is True
    with pytest.raises(ValueError, match="expected symmetric"):
        RegistrationOptions(symmetric="yes").validate()


def test_finer_levels_images_are_prepared_before_torch_is_needed(pair, tiny_package):
    """The images of levels finer than the network grid come from SimpleITK and NumPy alone (so the
    sacb command prepares them while torch is still being imported) and are what the level uses."""
    from SACBRegistrationLib.pipeline.geometry import level_grid, network_grid
    from SACBRegistrationLib.pipeline.io import SAME_GRID_TOLERANCE, same_geometry
    from SACBRegistrationLib.pipeline.registration import _Inputs, _LevelImages, finer_level_arrays, level_arrays
    from SACBRegistrationLib.preprocessing import normalise_intensity

    fixed, moving, fixed_seg, _ = pair
    inputs = _Inputs(fixed, moving, None, None, None)
    grid = network_grid(fixed, tiny_package.spacing_mm)
    affine = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.05, -0.02, 0.01, (1.0, -2.0, 0.5))
    options = RegistrationOptions(model=tiny_package, quality="balanced").resolved()
    prepared = finer_level_arrays(inputs, grid, affine, tiny_package, options)
    assert set(prepared) == {0.5}  # balanced's one level finer than the network grid
    fine_fixed, fine_moving, mask = prepared[0.5]
    assert fine_fixed.shape == tuple(reversed(level_grid(grid, 0.5).GetSize())) and mask is None
    again = level_arrays(inputs, level_grid(grid, 0.5), affine, tiny_package)
    assert np.array_equal(fine_moving, again[1]) and np.array_equal(fine_fixed, again[0])
    # the fixed image at a level of its own grid is copied, not resampled: the values are the voxels'
    even, even_seg = fixed[:34, :40, :36], fixed_seg[:34, :40, :36]  # sizes that halve exactly
    coarse = level_grid(even, 2.0)
    assert same_geometry(level_grid(coarse, 0.5), even, SAME_GRID_TOLERANCE)  # the copy applies
    own = finer_level_arrays(_Inputs(even, moving, None, None, even_seg), coarse, None, tiny_package, options)[0.5]
    resampled = sitk.Resample(even, even, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    assert np.allclose(own[0], normalise_intensity(sitk.GetArrayFromImage(resampled), tiny_package.intensity), atol=1e-6)
    assert np.array_equal(own[2], (sitk.GetArrayFromImage(even_seg) != 0).astype(np.float32))
    assert not finer_level_arrays(inputs, grid, affine, tiny_package,
                                  RegistrationOptions(model=tiny_package, quality="fast").resolved())
    network = (np.zeros(tuple(reversed(grid.GetSize())), np.float32),) * 2 + (None,)
    images = _LevelImages(inputs, grid, affine, tiny_package, torch.device("cpu"), {1.0: network, **prepared})
    level = images(0.5)
    assert torch.equal(level[1][0, 0], torch.from_numpy(fine_moving)) and images(0.5) is level  # cached tensors


def test_the_fine_pass_runs_the_network_again_at_twice_its_resolution(pair, tiny_package, monkeypatch):
    """``fine_pass``: the network once more on the images at twice its resolution, warped half-way
    (networks/symmetric.py); the field stays on the network grid, an image registered to itself
    still stays put, and the option is off in every preset."""
    import SACBRegistrationLib.networks.symmetric as symmetric
    from SACBRegistrationLib.pipeline.geometry import level_grid, network_grid
    from SACBRegistrationLib.pipeline.registration import _Inputs, finer_level_arrays

    fixed, moving, _, _ = pair
    seen = []
    original = symmetric.half_way_velocity

    def spy(net, moving_image, fixed_image, velocity, steps, **options):
        seen.append((tuple(moving_image.shape[2:]), steps))
        return original(net, moving_image, fixed_image, velocity, steps, **options)

    monkeypatch.setattr(symmetric, "half_way_velocity", spy)
    once = register(fixed, moving, model=tiny_package, quality="fast", cluster_maps=False)
    twice = register(fixed, moving, model=tiny_package, quality="fast", fine_pass=True, cluster_maps=False)
    grid = network_grid(fixed, tiny_package.spacing_mm)
    assert seen == [(tuple(reversed(level_grid(grid, 0.5).GetSize())), 7)]  # once, at 2 mm for this 4 mm model
    assert once.options["fine_pass"] is False and twice.options["fine_pass"] is True
    assert "fine_pass" in twice.timings and "fine_pass" not in once.timings
    assert twice.field.GetSize() == once.field.GetSize() == grid.GetSize()  # stored on the network grid
    difference = np.abs(sitk.GetArrayFromImage(twice.field) - sitk.GetArrayFromImage(once.field)).max()
    assert difference > 1e-3  # the second pass changed the field
    itself = register(fixed, fixed, model=tiny_package, quality="fast", affine="off", fine_pass=True, cluster_maps=False)
    assert np.abs(sitk.GetArrayFromImage(itself.field)).max() < 1e-3  # mm
    # its images are prepared with the other finer levels' (before torch is needed)
    options = RegistrationOptions(model=tiny_package, quality="fast", fine_pass=True).resolved()
    assert set(finer_level_arrays(_Inputs(fixed, moving, None, None, None), grid, None, tiny_package, options)) == {0.5}
    for quality in ("fast", "balanced", "accurate"):
        assert RegistrationOptions(quality=quality).resolved().fine_pass is False
    with pytest.raises(ValueError, match="expected fine_pass True, False or None"):
        RegistrationOptions(fine_pass="yes").validate()
    with pytest.raises(ValueError, match="expected symmetric=True with fine_pass=True"):
        RegistrationOptions(fine_pass=True, symmetric=False).resolved()


def test_a_gpu_out_of_memory_in_the_fine_pass_finishes_it_on_the_cpu(pair, tiny_package, monkeypatch):
    import torch

    import SACBRegistrationLib.networks.symmetric as symmetric

    fixed, moving, _, _ = pair
    expected = register(fixed, moving, model=tiny_package, quality="fast", fine_pass=True, cluster_maps=False)
    original, calls = symmetric.half_way_velocity, []

    def out_of_memory_once(*args, **options):
        calls.append(args[1].device.type)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(*args, **options)

    monkeypatch.setattr(symmetric, "half_way_velocity", out_of_memory_once)
    result = register(fixed, moving, model=tiny_package, quality="fast", fine_pass=True, cluster_maps=False)
    assert calls == ["cpu", "cpu"]  # tried, then run again on the CPU
    assert any("ran out of memory in the fine pass" in w for w in result.warnings)
    assert np.array_equal(sitk.GetArrayFromImage(result.field), sitk.GetArrayFromImage(expected.field))


def test_a_custom_predictor_skips_the_fine_pass_and_says_so(pair, tiny_package):
    import torch

    fixed, moving, _, _ = pair

    def predictor(moving_tensor, fixed_tensor, grid):
        return torch.zeros(1, 3, *moving_tensor.shape[2:]), None

    result = register(fixed, moving, model=tiny_package, quality="fast", fine_pass=True, predictor=predictor,
                      cluster_maps=False)
    assert any("fine pass skipped" in w for w in result.warnings)
    assert np.abs(sitk.GetArrayFromImage(result.field)).max() == 0.0
