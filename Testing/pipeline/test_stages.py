"""Pipeline stages in isolation: the CUDA out-of-memory fallback, torch's thread count, the
accuracy of the pre-alignment, the metrics table, and the geometry of the cluster maps."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from SACBRegistrationLib.networks.sacbnet import SACBNet
from SACBRegistrationLib.pipeline import register
from SACBRegistrationLib.pipeline.affine import WORKING_SPACING_MM, pre_align
from SACBRegistrationLib.pipeline.resources import torch_threads

from .conftest import make_image, rotation, smooth_volume


def test_cuda_out_of_memory_falls_back_to_the_cpu_with_a_warning(pair, tiny_package, monkeypatch):
    """The first network run raises ``torch.cuda.OutOfMemoryError`` (as a too-small GPU would):
    the pipeline runs the network again on the CPU, says so, and gives the ordinary result."""
    fixed, moving, _, _ = pair
    expected = register(fixed, moving, model=tiny_package, quality="fast", cluster_maps=False, affine="off")
    both_ways, calls = SACBNet.forward_both_ways, []  # what symmetric inference (every preset) calls

    def first_run_out_of_memory(self, moving_t, fixed_t, **kwargs):
        calls.append(moving_t.device.type)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return both_ways(self, moving_t, fixed_t, **kwargs)

    monkeypatch.setattr(SACBNet, "forward_both_ways", first_run_out_of_memory)
    result = register(fixed, moving, model=tiny_package, quality="fast", cluster_maps=False, affine="off")
    assert calls == ["cpu", "cpu"]  # failed once, then ran on the CPU
    assert result.device == "cpu"
    assert "the GPU ran out of memory: finished on the CPU instead" in result.warnings
    assert "the GPU ran out of memory: finished on the CPU instead" not in expected.warnings
    assert np.array_equal(sitk.GetArrayFromImage(result.displacement), sitk.GetArrayFromImage(expected.displacement))


def test_torch_threads_sets_and_restores_the_thread_count():
    before = torch.get_num_threads()
    inside = 1 if before != 1 else 2
    with torch_threads(inside):
        assert torch.get_num_threads() == inside
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="stage failed"):
        with torch_threads(inside):
            assert torch.get_num_threads() == inside
            raise RuntimeError("stage failed")
    assert torch.get_num_threads() == before  # restored on the way out of an exception too
    with torch_threads(None):
        assert torch.get_num_threads() == before  # None: torch's setting is left alone
    with pytest.raises(ValueError, match="expected threads >= 1"):
        with torch_threads(-2):
            pass
    assert torch.get_num_threads() == before


def textured_ball(shape) -> sitk.Image:
    """A smooth random texture inside a soft-edged ball with a zero background (2 mm voxels):
    every affine parameter is pinned down by the texture, and nothing leaves the grid when moved."""
    volume = smooth_volume(shape, 0, sigma=2.0)
    axes = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    ball = ndimage.gaussian_filter((np.linalg.norm(axes, axis=-1) < 0.7).astype(float), 1.5)
    return make_image((volume * ball).astype(np.float32), (2.0, 2.0, 2.0))


PRE_ALIGN_TOLERANCE_MM = {"rigid": 0.25, "affine": WORKING_SPACING_MM / 3}
"""Largest error (mm) of a recovered map over the object (measured here: 0.08 rigid, 0.54 affine; the
affine optimiser stops short of the rigid one's accuracy on the 3 mm working grid)."""


@pytest.mark.parametrize("mode", ["rigid", "affine"])
def test_pre_align_recovers_a_known_map(mode):
    fixed = textured_ball((40, 44, 36))
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()])
    truth = sitk.Euler3DTransform(centre, 0.12, -0.08, 0.1, (4.0, -3.0, 5.0))  # fixed -> moving points
    if mode == "affine":
        truth = sitk.AffineTransform(truth.GetMatrix(), truth.GetTranslation(), centre)
        truth.Scale((1.08, 0.94, 1.0))
    # moving(T(x)) = fixed(x): resample the fixed image through the inverse map
    moving = sitk.Resample(fixed, fixed, truth.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    found = pre_align(fixed, moving, mode)
    assert isinstance(found, sitk.Euler3DTransform if mode == "rigid" else sitk.AffineTransform)
    array = sitk.GetArrayViewFromImage(fixed)
    inside = np.argwhere(array > 0.2 * array.max())[::7]  # (k, j, i) voxels of the object
    points = [fixed.TransformIndexToPhysicalPoint([int(i), int(j), int(k)]) for k, j, i in inside]
    errors = [np.linalg.norm(np.subtract(found.TransformPoint(p), truth.TransformPoint(p))) for p in points]
    moved = [np.linalg.norm(np.subtract(truth.TransformPoint(p), p)) for p in points]
    assert min(moved) > 2.0  # the map moves every point of the object by more than the tolerances
    assert max(errors) < PRE_ALIGN_TOLERANCE_MM[mode], (np.mean(errors), max(errors))


def test_pre_align_working_copies_do_not_depend_on_the_thread_count():
    """pre_align smooths and resamples with all of ITK's threads (only the optimiser runs on one):
    per-line and per-voxel filters, so the working copies, hence the transform, are the same bits."""
    from SACBRegistrationLib.pipeline.affine import _working_copy

    image = make_image(smooth_volume((40, 36, 30), 3).astype(np.float32), (1.0, 0.9, 1.2),
                       direction=rotation(0.3, -0.2, 0.1), origin=(-20.3, 11.7, 5.1))
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    copies = []
    try:
        for count in (1, 2, 5):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
            copies.append(sitk.GetArrayFromImage(_working_copy(image)))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    assert all(np.array_equal(copies[0], c) for c in copies[1:])


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.2, 1.0)])
def test_metrics_table_is_each_comparison_on_its_own(spacing):
    """Before and after share the fixed segmentation's work: every value is still, bit for bit, the
    pair's Dice and whole-volume surface distances (exact 1 mm and inexact 0.8 mm lattices)."""
    from SACBRegistrationLib.metrics import surface_distances
    from SACBRegistrationLib.metrics.overlap import dice
    from SACBRegistrationLib.pipeline.metrics_table import evaluate_segmentations

    rng = np.random.default_rng(5)
    fixed = np.digitize(ndimage.gaussian_filter(rng.random((30, 28, 24)), 2), [0.47, 0.5, 0.53]).astype(np.int32)
    before = np.roll(fixed, 4, axis=2)
    after = np.where(rng.random(fixed.shape) < 0.85, fixed, before)
    images = [make_image(a, spacing[::-1]) for a in (fixed, before, after)]
    table = evaluate_segmentations(*images)
    assert [row["label"] for row in table.rows] == [1, 2, 3]
    for row in table.rows:
        label = row["label"]
        assert row["fixed_voxels"] == int((fixed == label).sum())
        for when, moved in (("before", before), ("after", after)):
            d_ab, d_ba = surface_distances(moved == label, fixed == label, spacing)
            both = np.concatenate([d_ab, d_ba])
            assert row[f"dice_{when}"] == dice(moved == label, fixed == label)
            assert row[f"hd95_{when}_mm"] == float(np.percentile(both, 95))
            assert row[f"assd_{when}_mm"] == float(both.mean())


def test_cluster_maps_lie_on_their_level_grid_where_the_network_saw_them(tiny_package):
    """A level-2 cluster map holds the labels (+1) as the network computed them, on the level-2 grid
    (level-2 voxel ``q`` pools network voxels ``2q`` and ``2q + 1`` per axis: its centre is network
    index ``2q + 0.5``), in the fixed image's direction (an oblique, anisotropic fixed image here); a
    viewer's nearest-neighbour look-up at a fixed voxel gives the label of the level-2 voxel containing it."""
    fixed = make_image(smooth_volume((22, 26, 19), 7), (2.5, 2.2, 3.1), rotation(0.3, -0.2, 0.25), (10, -5, 3))
    seen = {}

    def predictor(moving_t, fixed_t, grid):
        seen["grid"] = grid
        shape = tuple(n // 2 for n in fixed_t.shape[2:])  # level 2: half the network grid
        k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        labels = torch.from_numpy((3 * k + 5 * j + 7 * i) % 4)[None]  # a pattern that pins down every axis
        seen["labels"] = labels[0].numpy()
        return torch.zeros((1, 3) + tuple(fixed_t.shape[2:])), {2: {"fixed": labels, "moving": labels}}

    result = register(fixed, fixed, model=tiny_package, predictor=predictor, quality="fast", affine="off")
    assert sorted(result.cluster_maps) == ["level2_fixed", "level2_moving"]
    cluster_map = result.cluster_maps["level2_fixed"]
    grid, labels = seen["grid"], seen["labels"]
    assert cluster_map.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(cluster_map), labels + 1)
    assert np.allclose(cluster_map.GetDirection(), fixed.GetDirection())
    assert np.allclose(cluster_map.GetSpacing(), 2 * np.array(grid.GetSpacing()))
    for q in [(0, 0, 0), tuple(n - 1 for n in cluster_map.GetSize()), (1, 2, 3)]:
        centre = grid.TransformContinuousIndexToPhysicalPoint([2 * v + 0.5 for v in q])
        assert np.allclose(cluster_map.TransformIndexToPhysicalPoint(q), centre)
    # what a viewer shows on the fixed grid
    got = sitk.GetArrayFromImage(sitk.Resample(cluster_map, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    checked = 0
    for k, j, i in np.ndindex(*got.shape):
        point = fixed.TransformIndexToPhysicalPoint((i, j, k))
        network = np.array(grid.TransformPhysicalPointToContinuousIndex(point))[::-1]  # (d, h, w)
        level = (network + 0.5) / 2  # level-2 voxel q spans network indices 2q - 0.5 .. 2q + 1.5
        if np.any(np.abs(level - np.round(level)) < 0.05):
            continue  # on a boundary between level-2 voxels: either label is right
        q = np.floor(level).astype(int)
        assert np.all(q >= 0) and np.all(q < labels.shape)  # the level grid covers the fixed image
        assert got[k, j, i] == labels[tuple(q)] + 1, (k, j, i)
        checked += 1
    assert checked > 0.5 * got.size
