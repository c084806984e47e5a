"""transform.h5 as written by :func:`write_transform`: SimpleITK reads back the same transform
(displacements rounded to 16 significant bits), the same points map to the same places, and it is smaller
than SimpleITK's own float64 file."""

import numpy as np
import pytest
import SimpleITK as sitk

from SACBRegistrationLib.pipeline.transform_file import round_field, write_transform


def _field_transform(seed: int = 0) -> sitk.Transform:
    rng = np.random.default_rng(seed)
    shape = (12, 14, 10)
    # a smooth field (LPS mm) on an oblique, anisotropic grid
    z, y, x = np.meshgrid(*(np.linspace(0, np.pi, n) for n in shape), indexing="ij")
    field = np.stack([np.sin(x) * np.cos(y), np.sin(y + z), np.cos(x * z)], -1) * 2.0
    field += rng.normal(0, 0.01, field.shape)
    image = sitk.GetImageFromArray(field.astype(np.float32).astype(np.float64), isVector=True)
    image.SetSpacing((2.0, 1.5, 2.5))
    image.SetOrigin((-10.0, 4.0, 7.0))
    image.SetDirection(sitk.VersorTransform((0.1, 0.2, 0.3), 0.4).GetMatrix())
    return sitk.DisplacementFieldTransform(image)


def _affine() -> sitk.AffineTransform:
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.02, 0.05, -0.01, -0.03, 0.97, 0.02, 0.01, 0.04, 1.05))
    affine.SetTranslation((1.5, -2.0, 0.75))
    affine.SetCenter((3.0, 12.0, 20.0))
    return affine


def _field_of(transform: sitk.Transform) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.DisplacementFieldTransform(transform).GetDisplacementField())


def test_composite_round_trip(tmp_path):
    field = _field_transform()
    composite = sitk.CompositeTransform([_affine(), field])
    path = tmp_path / "transform.h5"
    write_transform(composite, path)
    read = sitk.CompositeTransform(sitk.ReadTransform(str(path)))
    assert read.GetNumberOfTransforms() == 2
    affine, deformable = read.GetNthTransform(0), read.GetNthTransform(1)
    assert affine.GetName() == "AffineTransform"
    assert affine.GetParameters() == _affine().GetParameters()  # linear parameters stay float64
    assert affine.GetFixedParameters() == _affine().GetFixedParameters()
    assert deformable.GetFixedParameters() == field.GetFixedParameters()  # size, origin, spacing, direction
    np.testing.assert_array_equal(_field_of(deformable), round_field(_field_of(field)))
    # the same mapping of points up to the rounding (displacements under 4 mm: 2**-14 mm)
    for point in [(0.0, 10.0, 12.0), (-4.0, 8.5, 20.0), (5.0, 15.0, 9.0)]:
        np.testing.assert_allclose(read.TransformPoint(point), composite.TransformPoint(point), atol=2e-4)


def test_displacement_field_alone_and_a_rigid_transform(tmp_path):
    write_transform(_field_transform(1), tmp_path / "field.h5")
    read = sitk.ReadTransform(str(tmp_path / "field.h5"))
    assert read.GetName() == "DisplacementFieldTransform"
    np.testing.assert_array_equal(_field_of(read), round_field(_field_of(_field_transform(1))))
    euler = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.3, (4.0, 5.0, 6.0))
    write_transform(euler, tmp_path / "euler.h5")
    back = sitk.ReadTransform(str(tmp_path / "euler.h5"))
    assert back.GetName() == "Euler3DTransform"
    assert back.GetParameters() == euler.GetParameters() and back.GetFixedParameters() == euler.GetFixedParameters()


def test_smaller_than_simpleitks_file(tmp_path):
    field = np.random.default_rng(2).normal(0, 1, (30, 30, 30, 3))
    smooth = np.cumsum(np.cumsum(field, 0), 1) / 30.0  # correlated, like a registration field
    image = sitk.GetImageFromArray(smooth.astype(np.float32).astype(np.float64), isVector=True)
    transform = sitk.DisplacementFieldTransform(image)
    write_transform(transform, tmp_path / "ours.h5")
    sitk.WriteTransform(transform, str(tmp_path / "sitk.h5"))
    assert (tmp_path / "ours.h5").stat().st_size < 0.5 * (tmp_path / "sitk.h5").stat().st_size


def test_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="expected a 3-D transform"):
        write_transform(sitk.AffineTransform(2), tmp_path / "x.h5")
    with pytest.raises(ValueError, match="expected a concrete transform"):
        write_transform(sitk.Transform(), tmp_path / "x.h5")
    nested = sitk.CompositeTransform([_affine(), sitk.CompositeTransform([_affine()])])
    with pytest.raises(ValueError, match="nested composite"):
        write_transform(nested, tmp_path / "x.h5")


def test_round_field_keeps_16_significant_bits_and_is_idempotent():
    values = np.random.default_rng(3).normal(0, 10, 100000).astype(np.float32)
    values[:4] = [0.0, -0.0, 1.0, -3.5]
    rounded = round_field(values)
    assert rounded.dtype == np.float32
    relative = np.abs(rounded.astype(np.float64) - values) / np.maximum(np.abs(values), 1e-30)
    assert relative.max() <= 2.0 ** -16  # half a unit in the 16th significant bit
    assert relative.max() > 2.0 ** -18  # and it did round (not a copy)
    np.testing.assert_array_equal(rounded[:4], values[:4])  # exactly representable values stay
    np.testing.assert_array_equal(round_field(rounded), rounded)
    low = rounded.view(np.uint32) & np.uint32((1 << 8) - 1)  # 24 - 16 dropped bits are zero
    assert not low.any()
    # ties go to even: 1 + 2**-16 lies halfway between 1 and 1 + 2**-15
    assert round_field(np.array([1 + 2.0 ** -16], np.float32))[0] == 1.0
    assert round_field(np.array([1 + 3 * 2.0 ** -16], np.float32))[0] == 1 + 2.0 ** -14
    with pytest.raises(ValueError, match="significant bits"):
        round_field(values, 0)
