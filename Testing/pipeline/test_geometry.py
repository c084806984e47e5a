"""Coordinate frames: the network grid and the voxel <-> physical conversions, checked against
SimpleITK's own index / point arithmetic."""

import numpy as np
import pytest
import SimpleITK as sitk

from SACBRegistrationLib.pipeline.geometry import (
    affine_parts,
    field_in_index_frame,
    field_on_reference,
    network_grid,
    physical_points,
    physical_to_voxel_displacement,
    vector_image,
    voxel_displacement_to_physical,
)

from .conftest import make_image, rotation


def oblique_image():
    return make_image(np.zeros((23, 31, 17), np.float32), (1.7, 0.9, 2.3), rotation(0.3, -0.4, 0.5), (10, -20, 30))


def test_network_grid_covers_the_fixed_image_centred():
    fixed = oblique_image()
    grid = network_grid(fixed, [2.0, 2.0, 2.0])
    assert all(s % 16 == 0 for s in grid.GetSize())
    assert np.allclose(grid.GetDirection(), fixed.GetDirection())
    centre = lambda im: np.array(im.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in im.GetSize()]))
    assert np.allclose(centre(grid), centre(fixed), atol=1e-6)
    for corner in np.ndindex(2, 2, 2):
        point = fixed.TransformIndexToPhysicalPoint([c * (n - 1) for c, n in zip(corner, fixed.GetSize())])
        index = np.array(grid.TransformPhysicalPointToContinuousIndex(point))
        assert np.all(index >= -1e-6) and np.all(index <= np.array(grid.GetSize()) - 1 + 1e-6)


def test_voxel_displacement_to_physical_matches_simpleitk():
    grid = make_image(np.zeros((8, 9, 7), np.float32), (1.5, 2.0, 0.7), rotation(0.2, 0.5, -0.3), (3, 4, 5))
    rng = np.random.default_rng(0)
    disp = rng.normal(0, 1.5, (3, 8, 9, 7))  # (d, h, w) voxels
    physical = voxel_displacement_to_physical(disp, grid)
    for _ in range(20):
        k, j, i = (int(rng.integers(n)) for n in (8, 9, 7))
        start = np.array(grid.TransformIndexToPhysicalPoint((i, j, k)))
        moved_index = (i + disp[2, k, j, i], j + disp[1, k, j, i], k + disp[0, k, j, i])  # (x, y, z) index order
        end = np.array(grid.TransformContinuousIndexToPhysicalPoint(moved_index))
        assert np.allclose(physical[k, j, i], end - start)
    assert np.allclose(physical_to_voxel_displacement(physical, grid), disp)


def test_physical_points_match_simpleitk():
    image = oblique_image()
    points = physical_points(image)
    for index in [(0, 0, 0), (16, 30, 22), (3, 7, 11)]:
        assert np.allclose(points[index[2], index[1], index[0]], image.TransformIndexToPhysicalPoint(index))


def test_field_on_reference_is_the_composite_transform_itk_evaluates():
    """The whole map x -> A(x + v(x)) with v on a coarser grid (same direction, offset, padded like the
    network grid) equals ITK's own evaluation of the composite transform at every fixed voxel."""
    direction = rotation(0.1, 0.2, 0.3)
    fixed = make_image(np.zeros((10, 12, 11), np.float32), (1.2, 1.0, 1.5), direction, (1, 2, 3))
    grid = network_grid(fixed, (2.0, 2.0, 2.0), multiple=4)
    rng = np.random.default_rng(1)
    v = rng.normal(0, 2, tuple(reversed(grid.GetSize())) + (3,))
    deformable = vector_image(v, grid)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((np.eye(3) + rng.normal(0, 0.05, (3, 3))).ravel().tolist())
    affine.SetCenter((5.0, 6.0, 7.0))
    affine.SetTranslation((1.0, -2.0, 0.5))
    composite = sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(sitk.Image(deformable))])
    size, spacing = fixed.GetSize(), fixed.GetSpacing()
    for transform, a in ((composite, affine), (sitk.DisplacementFieldTransform(sitk.Image(deformable)), None)):
        want = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
            transform, sitk.sitkVectorFloat64, size, fixed.GetOrigin(), spacing, fixed.GetDirection()))
        got = field_on_reference(v, grid, fixed, a)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() < 1e-4  # float32 against ITK's float64
    matrix, offset = affine_parts(affine)
    assert np.allclose(matrix @ np.ones(3) + offset, affine.TransformPoint((1.0, 1.0, 1.0)))


def test_field_on_reference_refuses_another_direction():
    fixed = make_image(np.zeros((6, 6, 6), np.float32), (1.0, 1.0, 1.0), rotation(0.1, 0.0, 0.0))
    other = make_image(np.zeros((6, 6, 6), np.float32), (1.0, 1.0, 1.0), rotation(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="direction"):
        field_on_reference(np.zeros((6, 6, 6, 3)), other, fixed, None)


def test_field_in_index_frame_of_a_translation():
    image = make_image(np.zeros((4, 5, 6), np.float32), (1.0, 2.0, 3.0), rotation(0.0, 0.0, np.pi / 2))
    lps = np.zeros((4, 5, 6, 3))
    lps[..., 1] = 2.0  # 2 mm along LPS y = along the image's first index axis after a 90 degree turn
    components, spacing = field_in_index_frame(vector_image(lps, image))
    assert spacing == (3.0, 2.0, 1.0)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    along = direction.T @ np.array([0.0, 2.0, 0.0])  # (i, j, k) components
    assert np.allclose(components[:, 0, 0, 0], along[::-1])


def test_map_on_the_fixed_grid_factors_out_the_affine_part():
    """det(M) * det(I + Dv) equals the determinant of the finite differences of the composed
    displacement A(x + v(x)) - x on the fixed grid (an oblique grid, a smooth v on the coarser grid),
    and the displacement it gives is what ITK evaluates for the same map."""
    from SACBRegistrationLib.metrics import jacobian_determinant
    from SACBRegistrationLib.pipeline.geometry import array_components
    from SACBRegistrationLib.pipeline.registration import map_on_fixed_grid

    direction = rotation(0.2, -0.1, 0.3)
    fixed = make_image(np.zeros((20, 22, 18), np.float32), (1.0, 1.1, 0.9), direction, (4, -3, 2))
    grid = network_grid(fixed, (2.0, 2.0, 2.0), multiple=4)
    rng = np.random.default_rng(3)
    v = np.stack([np.cumsum(np.cumsum(rng.normal(0, 0.3, tuple(reversed(grid.GetSize()))), 0), 1) * 0.1
                  for _ in range(3)], -1)
    field = vector_image(v, grid)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((np.diag([1.1, 0.9, 1.05]) + rng.normal(0, 0.05, (3, 3))).ravel().tolist())
    affine.SetCenter((5.0, 6.0, 7.0))
    affine.SetTranslation((1.0, -2.0, 0.5))
    components, spacing = array_components(field_on_reference(v, grid, fixed, affine), fixed)
    composed = jacobian_determinant(components.astype(np.float64), spacing, dtype=np.float64)
    displacement, jacobian = map_on_fixed_grid(fixed, field, affine)
    got = sitk.GetArrayFromImage(jacobian)
    assert abs(np.linalg.det(affine_parts(affine)[0]) - 1) > 0.03  # the affine part changes volumes
    assert np.ptp(composed) > 0.1  # and the field is not affine
    assert np.abs(got - composed).max() < 1e-4
    without = sitk.GetArrayFromImage(map_on_fixed_grid(fixed, field, None)[1])
    assert np.abs(got - without * np.linalg.det(affine_parts(affine)[0])).max() < 1e-5
    # slabs (threads) give the very values of the whole grid at once, whatever their size
    # the displacement: ITK's own evaluation of the map (the pre-alignment after the field transform)
    assert displacement.GetPixelID() == sitk.sitkVectorFloat32
    assert np.allclose(displacement.GetDirection(), fixed.GetDirection()) and displacement.GetSize() == fixed.GetSize()
    composite = sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(sitk.Image(field))])
    itk = sitk.TransformToDisplacementField(composite, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                            fixed.GetSpacing(), fixed.GetDirection())
    assert np.abs(sitk.GetArrayFromImage(displacement) - sitk.GetArrayFromImage(itk)).max() < 1e-4  # mm
    assert np.ptp(sitk.GetArrayFromImage(itk)) > 1.0  # a field that moves
    # slabs (threads) give the very values of the whole grid at once, whatever their size
    whole = [sitk.GetArrayFromImage(image) for image in map_on_fixed_grid(fixed, field, affine, slab_rows=fixed.GetSize()[2])]
    assert np.array_equal(whole[0], field_on_reference(v, grid, fixed, affine))
    for rows in (1, 3, 7):
        pieces = [sitk.GetArrayFromImage(image) for image in map_on_fixed_grid(fixed, field, affine, slab_rows=rows)]
        assert all(np.array_equal(a, b) for a, b in zip(pieces, whole))
