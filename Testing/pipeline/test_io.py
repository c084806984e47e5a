"""Every bad input of the pipeline issue gives an InputError naming the problem (and nothing is
written)."""

import os

import numpy as np
import pytest
import SimpleITK as sitk

from SACBRegistrationLib.pipeline import InputError, register
from SACBRegistrationLib.pipeline.io import (
    REPORT_FILE,
    StagedOutput,
    check_writable,
    read_image,
    read_image_files,
    read_segmentation,
)

from .conftest import make_image, smooth_volume


def good():
    return make_image(smooth_volume((20, 22, 18), 1), (2.0, 2.0, 2.0))


def test_reads_files_and_passes_images_through(tmp_path):
    path = tmp_path / "image.nrrd"
    sitk.WriteImage(good(), str(path))
    image = read_image(path, "fixed")
    assert image.GetPixelID() == sitk.sitkFloat32 and image.GetSize() == (18, 22, 20)
    for suffix in (".nii.gz", ".mha"):
        sitk.WriteImage(good(), str(tmp_path / f"image{suffix}"))
        assert read_image(tmp_path / f"image{suffix}", "fixed").GetSize() == (18, 22, 20)


@pytest.mark.parametrize("pixel_type", [sitk.sitkFloat32, sitk.sitkInt16])
def test_a_callers_images_are_copied_and_left_as_they_were(pixel_type):
    """Images given as SimpleITK images come back as float32 / int32 copies (even when already of that
    type), so that nothing the pipeline holds is the caller's object; the caller's image is unchanged."""
    image = sitk.Cast(good(), pixel_type)
    labels = sitk.Cast(image > float(np.median(sitk.GetArrayViewFromImage(image))), sitk.sitkInt32)
    before, labels_before = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)
    checked = read_image(image, "fixed")
    checked_labels = read_segmentation(labels, checked, "fixed")
    assert checked is not image and checked_labels is not labels
    assert checked.GetPixelID() == sitk.sitkFloat32 and checked_labels.GetPixelID() == sitk.sitkInt32
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(checked), before.astype(np.float32))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(checked_labels), labels_before)
    checked[0, 0, 0] = 99.0  # the copy is the pipeline's own
    checked_labels[0, 0, 0] = 7
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), before)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labels), labels_before)
    assert image.GetPixelID() == pixel_type and labels.GetPixelID() == sitk.sitkInt32


def test_files_already_of_the_working_type_are_read_as_they_are(tmp_path):
    """A float32 image and an int32 label file read from disk keep their voxels and type."""
    image = good()
    labels = sitk.Cast(image > float(np.median(sitk.GetArrayViewFromImage(image))), sitk.sitkInt32)
    sitk.WriteImage(image, str(tmp_path / "image.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    checked = read_image(tmp_path / "image.nii.gz", "fixed")
    checked_labels = read_segmentation(tmp_path / "labels.nii.gz", checked, "fixed")
    assert checked.GetPixelID() == sitk.sitkFloat32 and checked_labels.GetPixelID() == sitk.sitkInt32
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(checked), sitk.GetArrayViewFromImage(image))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(checked_labels), sitk.GetArrayViewFromImage(labels))


def test_a_nii_gz_file_is_decompressed_once_and_read_as_simpleitk_reads_it(tmp_path, monkeypatch):
    """The integrity check's decompressed bytes are read through an uncompressed temporary copy
    (removed afterwards); without a writable temporary folder the file itself is read."""
    import tempfile

    from SACBRegistrationLib.pipeline import io

    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    original = make_image(smooth_volume((20, 22, 18), 4), (1.5, 2.0, 2.5), direction, (3.0, -4.0, 5.0))
    path = tmp_path / "image.nii.gz"
    sitk.WriteImage(original, str(path))
    expected = sitk.ReadImage(str(path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temporary"))
    (tmp_path / "temporary").mkdir()
    calls = []
    real_read = sitk.ReadImage
    monkeypatch.setattr(sitk, "ReadImage", lambda name, *a: calls.append(str(name)) or real_read(name, *a))
    for temporary_folder_works in (True, False):
        if not temporary_folder_works:
            monkeypatch.setattr(tempfile, "mkstemp", lambda **_: (_ for _ in ()).throw(OSError("read-only")))
        calls.clear()
        image = read_image(path, "fixed")
        assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected))
        assert image.GetOrigin() == expected.GetOrigin() and image.GetDirection() == expected.GetDirection()
        assert image.GetSpacing() == expected.GetSpacing() and image.GetPixelID() == expected.GetPixelID()
        assert calls == ([calls[0]] if temporary_folder_works else [str(path)])
        assert calls[0].endswith(".nii") == temporary_folder_works
        assert list((tmp_path / "temporary").iterdir()) == []  # the copy is gone
    assert io.check_file_integrity(path, "fixed") is not None and io.check_file_integrity(tmp_path, "fixed") is None


def test_several_files_are_read_at_once_in_order_and_errors_come_in_order(tmp_path):
    arrays = [smooth_volume((20, 22, 18), seed) for seed in range(3)]
    paths = []
    for k, array in enumerate(arrays):
        paths.append(tmp_path / f"image{k}.nii.gz")
        sitk.WriteImage(make_image(array, (2.0, 2.0, 2.0)), str(paths[-1]))
    images = read_image_files([(paths[0], "fixed"), (None, "fixed segmentation"), (paths[1], "moving"),
                               (paths[2], "fixed mask")], optional=("fixed segmentation", "fixed mask"))
    assert images[1] is None
    for image, array in zip([images[0], images[2], images[3]], arrays):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    # both missing: the first source's error, whichever thread finishes first
    with pytest.raises(InputError, match="fixed image not found"):
        read_image_files([(tmp_path / "nope.nii.gz", "fixed"), (tmp_path / "nope2.nii.gz", "moving")])
    with pytest.raises(InputError, match="moving image not found"):
        read_image_files([(paths[0], "fixed"), (tmp_path / "nope2.nii.gz", "moving")])
    with pytest.raises(InputError, match="expected a file path"):  # None where an image is required
        read_image_files([(None, "fixed"), (paths[0], "moving")])


def test_reads_a_dicom_series_folder(tmp_path):
    volume = sitk.Cast(sitk.RescaleIntensity(good(), 0, 1000), sitk.sitkInt16)
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.GetSize()[2]):
        slice_ = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (("0020|0032", "\\".join(map(str, position))), ("0020|0013", str(k + 1)),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.1"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0008|0060", "MR")):
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)
    image = read_image(folder, "moving")
    assert image.GetSize() == volume.GetSize()
    assert np.allclose(image.GetSpacing(), volume.GetSpacing(), atol=1e-3)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="fixed image not found"):
        read_image(tmp_path / "nope.nii.gz", "fixed")
    garbage = tmp_path / "broken.nii.gz"
    garbage.write_bytes(b"this is not an image" * 10)
    with pytest.raises(InputError, match="cannot read the moving image .* not a supported image"):
        read_image(garbage, "moving")
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    with pytest.raises(InputError, match="no readable DICOM series"):
        read_image(empty_folder, "fixed")


def test_2d_image():
    with pytest.raises(InputError, match="is 2D"):
        read_image(sitk.Image(10, 12, sitk.sitkFloat32) + 1, "fixed")


def test_single_slice_volume():
    with pytest.raises(InputError, match="single slice"):
        read_image(make_image(np.random.rand(1, 10, 10).astype(np.float32)), "fixed")


def test_4d_images():
    four_d = sitk.JoinSeries([good(), good()])
    with pytest.raises(InputError, match="4D with 2 volumes"):
        read_image(four_d, "moving")
    assert read_image(sitk.JoinSeries([good()]), "moving").GetDimension() == 3  # one volume: fine


def test_vector_and_rgb_images():
    rgb = sitk.Compose([sitk.Cast(good(), sitk.sitkUInt8)] * 3)
    with pytest.raises(InputError, match="3 components per voxel .* single grey-level volume"):
        read_image(rgb, "fixed")


def test_empty_constant_and_non_finite_images():
    with pytest.raises(InputError, match="empty"):
        read_image(make_image(np.zeros((8, 8, 8), np.float32)), "fixed")
    with pytest.raises(InputError, match="constant .* 7"):
        read_image(make_image(np.full((8, 8, 8), 7.0, np.float32)), "fixed")
    for bad in (np.nan, np.inf):
        array = smooth_volume((8, 8, 8), 2)
        array[3, 3, 3] = bad
        with pytest.raises(InputError, match="NaN or infinite"):
            read_image(make_image(array), "moving")


def test_segmentation_checks():
    image = good()
    seg = sitk.Cast(image > 50, sitk.sitkUInt8)
    assert read_segmentation(seg, image, "fixed").GetPixelID() == sitk.sitkInt32
    shifted = sitk.Image(seg)
    shifted.SetOrigin((5.0, 0.0, 0.0))
    with pytest.raises(InputError, match="does not match the geometry of its image"):
        read_segmentation(shifted, image, "fixed")
    with pytest.raises(InputError, match="does not match the geometry"):
        read_segmentation(sitk.Cast(image[:, :, :10] > 50, sitk.sitkUInt8), image, "moving")
    floats = sitk.Cast(seg, sitk.sitkFloat32) * 0.5
    with pytest.raises(InputError, match="non-integer values .* intensity image"):
        read_segmentation(floats, image, "fixed")
    assert read_segmentation(sitk.Cast(seg, sitk.sitkFloat32), image, "fixed").GetPixelID() == sitk.sitkInt32
    with pytest.raises(InputError, match="negative labels"):
        read_segmentation(sitk.Cast(seg, sitk.sitkInt16) - 1, image, "fixed")


def test_output_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot be written"):
        check_writable(blocker / "out")
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(InputError, match="cannot be written"):
            check_writable(locked)


def test_checking_an_output_folder_leaves_nothing_behind(tmp_path):
    nested = tmp_path / "new" / "out"
    assert check_writable(nested) == nested and not (tmp_path / "new").exists()
    assert check_writable(nested, keep=True).is_dir()


def test_staged_output_failure_removes_only_the_folders_it_created(tmp_path):
    nested = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError):
        with StagedOutput(nested) as out:
            out.path("a.txt").write_text("partial")
            raise RuntimeError("stage failed")
    assert not (tmp_path / "new").exists()
    with StagedOutput(nested) as out:
        out.path("a.txt").write_text("done")
        out.path(REPORT_FILE).write_text("{}")
    assert sorted(p.name for p in nested.iterdir()) == ["a.txt", REPORT_FILE]
    assert [p.name for p in nested.parent.iterdir()] == ["out"]  # no staging folder, no lock left


def test_an_existing_output_is_replaced_as_a_whole_only_when_asked(tmp_path):
    out_dir = tmp_path / "out"
    with StagedOutput(out_dir) as out:
        out.path("first_only.txt").write_text("1")
        out.path(REPORT_FILE).write_text("{}")
    with pytest.raises(InputError, match="previous registration's results; .*--overwrite"):
        StagedOutput(out_dir).__enter__()
    with pytest.raises(RuntimeError):  # a failed replacement keeps the previous set intact
        with StagedOutput(out_dir, overwrite=True) as out:
            out.path(REPORT_FILE).write_text("new")
            raise RuntimeError("stage failed")
    assert sorted(p.name for p in out_dir.iterdir()) == ["first_only.txt", REPORT_FILE]
    with StagedOutput(out_dir, overwrite=True) as out:
        out.path(REPORT_FILE).write_text("{}")
    assert [p.name for p in out_dir.iterdir()] == [REPORT_FILE]  # no file of the first run mixed in
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="not a previous registration's output"):
            StagedOutput(user, overwrite).__enter__()
    assert [p.name for p in user.iterdir()] == ["notes.txt"]


def test_two_runs_cannot_write_one_folder_and_killed_runs_are_cleaned_up(tmp_path):
    out_dir = tmp_path / "out"
    with StagedOutput(out_dir) as first:
        with pytest.raises(InputError, match=r"another registration \(process \d+\) is writing"):
            # a second writer (another process) finds the live lock
            (tmp_path / ".out.sacb-lock").write_text(str(os.getppid()))
            StagedOutput(out_dir).__enter__()
        (tmp_path / ".out.sacb-lock").write_text(str(os.getpid()))
        first.path(REPORT_FILE).write_text("{}")
    # leftovers of a killed run (its pid no longer exists): a lock and a staging folder
    dead = 2 ** 22 + 12345
    (tmp_path / ".out.sacb-lock").write_text(str(dead))
    stale = tmp_path / f".out.sacb-staging-{dead}-abcd"
    stale.mkdir()
    (stale / "transform.h5").write_text("partial")
    with StagedOutput(out_dir, overwrite=True) as out:
        out.path(REPORT_FILE).write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigterm_during_a_save_leaves_no_partial_output(tmp_path):
    import subprocess
    import sys
    import textwrap
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, time
        from SACBRegistrationLib import cli
        from SACBRegistrationLib.pipeline.io import StagedOutput
        cli._terminate_like_interrupt()
        try:
            with StagedOutput({str(tmp_path / "out")!r}) as out:
                out.path("transform.h5").write_text("partial")
                print("writing", flush=True)
                time.sleep(60)
        except KeyboardInterrupt:
            sys.exit(6)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.terminate()  # SIGTERM
    assert proc.wait(timeout=30) == 6
    assert list(tmp_path.iterdir()) == [script]  # no output folder, no staging, no lock


def test_register_refuses_bad_input_before_any_work(tiny_package, tmp_path):
    with pytest.raises(InputError, match="constant"):
        register(make_image(np.ones((20, 20, 20), np.float32)), good(), model=tiny_package)


def test_truncated_or_corrupted_files_are_refused(tmp_path):
    from SACBRegistrationLib.pipeline.io import InputError, read_image
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((30, 32, 28)).astype(np.float32))
    for name in ("whole.nii.gz", "whole.nii"):
        sitk.WriteImage(image, str(tmp_path / name))
        data = (tmp_path / name).read_bytes()
        assert read_image(tmp_path / name, "fixed").GetSize() == (28, 32, 30)  # the whole file reads
        cut = tmp_path / ("cut_" + name)
        cut.write_bytes(data[: len(data) * 2 // 3])  # `head -c` of the file
        with pytest.raises(InputError, match="truncated"):
            read_image(cut, "fixed")
    damaged = bytearray((tmp_path / "whole.nii.gz").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte in the compressed stream
    (tmp_path / "damaged.nii.gz").write_bytes(bytes(damaged))
    with pytest.raises(InputError, match="truncated or corrupted"):
        read_image(tmp_path / "damaged.nii.gz", "moving")


def test_non_finite_voxels_in_a_nifti_file_are_refused(tmp_path):
    from SACBRegistrationLib.pipeline.io import InputError, read_image
    array = np.random.default_rng(1).random((20, 22, 18)).astype(np.float32)
    array[3, 4, 5], array[6, 7, 8] = np.nan, np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(InputError, match="2 NaN or infinite voxels"):
        read_image(tmp_path / "nan.nii.gz", "fixed")
