"""Output images as written by :func:`write_image`: a float image bound for ``.nii.gz`` holds exactly
the bytes ITK would have written (header and voxels), deflated with the run-length strategy and
readable by SimpleITK and gzip; other images go through ITK's own writer; nothing is left behind."""

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from SACBRegistrationLib.pipeline import image_writer
from SACBRegistrationLib.pipeline.image_writer import write_image


def _image(pixel_type=sitk.sitkFloat32, components: int = 1) -> sitk.Image:
    rng = np.random.default_rng(7)
    shape = (9, 11, 13) + ((components,) if components > 1 else ())
    values = rng.random(shape).astype(np.float64)
    values[:3] = 0.0  # a run of background, what the run-length strategy compresses
    image = sitk.GetImageFromArray(values, isVector=components > 1)
    image = sitk.Cast(image, pixel_type)
    image.SetSpacing((1.0, 1.5, 0.75))
    image.SetOrigin((-20.0, 3.5, 11.0))
    image.SetDirection(sitk.VersorTransform((0.3, -0.1, 0.2), 0.5).GetMatrix())
    return image


def _same_image(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetPixelID() == b.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("pixel_type, components", [(sitk.sitkFloat32, 1), (sitk.sitkFloat64, 1),
                                                     (sitk.sitkVectorFloat32, 3)])
def test_float_nifti_is_itk_bytes_deflated_with_runs(tmp_path, pixel_type, components):
    image = _image(pixel_type, components)
    write_image(image, tmp_path / "ours.nii.gz")
    sitk.WriteImage(image, str(tmp_path / "itk.nii.gz"), True)
    ours = (tmp_path / "ours.nii.gz").read_bytes()
    assert ours[:2] == b"\x1f\x8b"  # a gzip file, as the suffix says
    assert gzip.decompress(ours) == gzip.decompress((tmp_path / "itk.nii.gz").read_bytes())
    _same_image(sitk.ReadImage(str(tmp_path / "ours.nii.gz")), image)
    assert len(ours) < image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["itk.nii.gz", "ours.nii.gz"]  # no temporary .nii left


def test_float_nifti_uses_the_run_length_strategy(tmp_path, monkeypatch):
    strategies = []
    real = image_writer.zlib.compressobj

    def spy(*args):
        strategies.append(args[-1])
        return real(*args)

    monkeypatch.setattr(image_writer.zlib, "compressobj", spy)
    write_image(_image(), tmp_path / "a.nii.gz")
    write_image(_image(sitk.sitkInt16), tmp_path / "labels.nii.gz")  # ITK's writer: zlib is not called here
    assert strategies == [image_writer.zlib.Z_RLE]


@pytest.mark.parametrize("name, pixel_type", [("labels.nii.gz", sitk.sitkInt32), ("float.nrrd", sitk.sitkFloat32),
                                              ("plain.nii", sitk.sitkFloat32)])
def test_other_images_go_through_itk(tmp_path, name, pixel_type):
    image = _image(pixel_type)
    write_image(image, tmp_path / name)
    sitk.WriteImage(image, str(tmp_path / f"itk_{name}"), True)
    assert (tmp_path / name).read_bytes() == (tmp_path / f"itk_{name}").read_bytes()


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(source, target):
        target.write_bytes(b"\x1f\x8b partial")
        raise OSError("disk full")

    monkeypatch.setattr(image_writer, "_deflate_file", fail)
    with pytest.raises(OSError, match="disk full"):
        write_image(_image(), tmp_path / "warped.nii.gz")
    assert list(tmp_path.iterdir()) == []
