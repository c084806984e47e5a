import math

import numpy as np
import pytest
from medpy.metric import binary as medpy

from SACBRegistrationLib.metrics import assd, hd95, surface_distances, surface_metrics_per_label


def ball(shape, centre_mm, radius_mm, spacing):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm ** 2


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 0.7, 1.3)])
def test_concentric_spheres_are_their_radius_difference_apart(spacing):
    shape = tuple(int(70 / s) for s in spacing)
    centre = (35.0, 35.0, 35.0)
    inner, outer = ball(shape, centre, 12.0, spacing), ball(shape, centre, 20.0, spacing)
    # every surface point is 8 mm from the other surface, up to voxelisation (one voxel)
    tolerance = max(spacing)
    assert hd95(inner, outer, spacing) == pytest.approx(8.0, abs=tolerance)
    assert assd(inner, outer, spacing) == pytest.approx(8.0, abs=tolerance)


def test_offset_spheres():
    spacing = (1.0, 1.0, 1.0)
    a = ball((60, 60, 60), (30, 30, 25), 12.0, spacing)
    b = ball((60, 60, 60), (30, 30, 32), 12.0, spacing)
    d_ab, d_ba = surface_distances(a, b, spacing)
    assert max(d_ab.max(), d_ba.max()) == pytest.approx(7.0, abs=1.0)  # Hausdorff = the offset
    assert hd95(a, b, spacing) < 7.0 + 1.0
    assert assd(a, b, spacing) < hd95(a, b, spacing)


def test_identical_masks_are_zero_apart():
    a = ball((20, 20, 20), (10, 10, 10), 5, (1, 1, 1))
    assert hd95(a, a) == 0.0 and assd(a, a) == 0.0


def test_empty_mask_gives_nan():
    a = ball((10, 10, 10), (5, 5, 5), 3, (1, 1, 1))
    assert math.isnan(hd95(a, np.zeros_like(a))) and math.isnan(assd(np.zeros_like(a), a))


@pytest.mark.parametrize("seed", range(4))
def test_matches_medpy_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    spacing = tuple(rng.uniform(0.5, 2.5, 3))
    shape = tuple(rng.integers(12, 30, 3))
    from scipy import ndimage
    a = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    b = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    if not a.any() or not b.any():
        pytest.skip("random masks happened to be empty")
    assert hd95(a, b, spacing) == pytest.approx(medpy.hd95(a, b, voxelspacing=spacing), rel=1e-9)
    assert assd(a, b, spacing) == pytest.approx(medpy.assd(a, b, voxelspacing=spacing), rel=1e-9)


def test_per_label_matches_single_label_calls():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 3, (12, 12, 12))
    b = rng.integers(0, 3, (12, 12, 12))
    result = surface_metrics_per_label(a, b, (1.0, 2.0, 1.5))
    assert sorted(result) == [1, 2]
    assert result[2]["hd95"] == pytest.approx(hd95(a == 2, b == 2, (1.0, 2.0, 1.5)))


def test_bad_spacing():
    with pytest.raises(ValueError, match="positive spacings"):
        hd95(np.ones((3, 3, 3)), np.ones((3, 3, 3)), spacing=(1, 0, 1))


def test_per_label_boxes_give_the_whole_volume_values_even_at_the_border():
    # labels touching the volume's faces, and a label present in one map only
    from SACBRegistrationLib.metrics import dice_per_label
    from SACBRegistrationLib.metrics.overlap import dice
    from SACBRegistrationLib.metrics.surface import surface_distances
    rng = np.random.default_rng(3)
    from scipy import ndimage
    a = np.digitize(ndimage.gaussian_filter(rng.random((30, 26, 22)), 2), [0.45, 0.5, 0.55]).astype(np.int32)
    b = np.roll(a, 3, axis=0)
    b[b == 3] = 7
    spacing = (1.5, 1.0, 2.0)
    fast = surface_metrics_per_label(a, b, spacing)
    dices = dice_per_label(a, b)
    for label in (1, 2, 3, 7):
        d_ab, d_ba = surface_distances(a == label, b == label, spacing)  # the whole volume
        assert dices[label] == pytest.approx(dice(a == label, b == label))
        if d_ab.size == 0:
            assert np.isnan(fast[label]["hd95"])
        else:
            both = np.concatenate([d_ab, d_ba])
            assert fast[label]["hd95"] == pytest.approx(np.percentile(both, 95))
            assert fast[label]["assd"] == pytest.approx(both.mean())


def _same(x: float, y: float) -> bool:
    return x == y or (math.isnan(x) and math.isnan(y))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 1.0, 2.0), (0.5, 0.5, 0.5), (0.7, 1.3, 1.1)])
def test_shared_label_metrics_are_the_per_call_values_bit_for_bit(spacing):
    # one reference against several maps (near: lattice look-ups; far: k-d tree queries), labels at
    # the volume's faces and labels missing from one map, on exact (1, 1.5, 0.5 mm) and inexact
    # (0.7 mm) lattices: the same bits as each pair measured on its own on the whole volume
    from scipy import ndimage

    from SACBRegistrationLib.metrics import label_metrics
    from SACBRegistrationLib.metrics.overlap import dice
    from SACBRegistrationLib.metrics.surface import _REACH
    rng = np.random.default_rng(11)
    reference = np.digitize(ndimage.gaussian_filter(rng.random((34, 30, 26)), 2), [0.46, 0.49, 0.51, 0.54])
    near = np.where(rng.random(reference.shape) < 0.8, reference, np.roll(reference, 1, axis=1))
    far = np.roll(reference, _REACH + 3, axis=0)  # beyond the look-ups' reach: k-d tree queries
    far[far == 3] = 9
    maps = [near, far, np.zeros_like(reference)]
    labels = [1, 2, 3, 4, 9, 12]
    shared = label_metrics(reference, maps, spacing, labels)
    for m, result in zip(maps, shared):
        assert sorted(result) == labels
        for label in labels:
            a, b = m == label, reference == label
            expected = {"dice": dice(a, b), "hd95": float("nan"), "assd": float("nan")}
            d_ab, d_ba = surface_distances(a, b, spacing)
            if d_ab.size:
                both = np.concatenate([d_ab, d_ba])
                expected.update(hd95=float(np.percentile(both, 95)), assd=float(both.mean()))
            assert all(_same(result[label][k], v) for k, v in expected.items()), (label, result[label], expected)
    per_label = surface_metrics_per_label(far, reference, spacing, labels)
    assert all(_same(per_label[label][k], shared[1][label][k]) for label in labels for k in ("hd95", "assd"))


def test_exact_lattices():
    from SACBRegistrationLib.metrics.surface import _distances_are_exact
    assert _distances_are_exact((1.0, 1.0, 1.0), (160, 192, 160))
    assert _distances_are_exact((0.9375, 0.5, 2.0), (512, 512, 300))
    assert not _distances_are_exact((0.7, 1.0, 1.0), (160, 192, 160))
    assert not _distances_are_exact((1.0, 1.0, 1.0), (2 ** 27, 1, 1))
