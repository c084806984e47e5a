"""The minimal HDF5 writer: its checksum against the published lookup3 values, and files that the
real HDF5 library (linked by SimpleITK) reads back exactly."""

import struct

import numpy as np
import pytest
import SimpleITK as sitk

from SACBRegistrationLib.pipeline import hdf5
from SACBRegistrationLib.pipeline.hdf5 import Group, lookup3, to_bytes


def test_lookup3_matches_the_reference_values():
    # the self-test values of Bob Jenkins' lookup3.c (driver5: hashlittle of these strings)
    assert lookup3(b"") == 0xDEADBEEF
    assert lookup3(b"", 0xDEADBEEF) == 0xBD5B7DDE
    assert lookup3(b"Four score and seven years ago") == 0x17770551
    assert lookup3(b"Four score and seven years ago", 1) == 0xCD628161


def test_superblock_checksum_is_the_one_libhdf5_writes(tmp_path):
    # a file written by the real library (SimpleITK's HDF5 transform writer): its superblock
    # (version 2) ends with lookup3 of the 44 bytes before
    path = tmp_path / "affine.h5"
    sitk.WriteTransform(sitk.AffineTransform(3), str(path))
    head = path.read_bytes()[:hdf5.SUPERBLOCK_BYTES]
    assert head[8] == 2
    assert struct.unpack("<I", head[44:48])[0] == lookup3(head[:44])


def _itk_tree(parameters: np.ndarray, compress: bool) -> Group:
    root = Group()
    root.add("TransformGroup/0/TransformType", "TranslationTransform_double_3_3")
    root.add("TransformGroup/0/TransformFixedParameters", np.zeros(0))
    root.add("TransformGroup/0/TransformParameters", parameters, compress=compress)
    return root


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True])
def test_libhdf5_reads_back_datasets_and_strings(tmp_path, dtype, compress):
    path = tmp_path / "t.h5"
    path.write_bytes(to_bytes(_itk_tree(np.array([1.5, -2.25, 3.125], dtype), compress)))
    transform = sitk.ReadTransform(str(path))
    assert transform.GetName() == "TranslationTransform"
    assert transform.GetParameters() == (1.5, -2.25, 3.125)


def test_compressed_dataset_spans_several_chunks_exactly(tmp_path):
    # more than one chunk and a partial last chunk: every element comes back bit for bit
    n = 3 * (hdf5.CHUNK_ELEMENTS + 7)  # a translation has 3 parameters; pad the tree with a field instead
    values = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    field = sitk.GetImageFromArray(values.reshape(1, 1, -1, 3).astype(np.float64), isVector=True)
    root = Group()
    root.add("TransformGroup/0/TransformType", "DisplacementFieldTransform_double_3_3")
    root.add("TransformGroup/0/TransformFixedParameters",
             np.array(list(field.GetSize()) + [0.0] * 3 + [1.0] * 3 + list(np.eye(3).ravel()), np.float64))
    root.add("TransformGroup/0/TransformParameters", values, compress=True)
    path = tmp_path / "field.h5"
    path.write_bytes(to_bytes(root))
    read = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(path))).GetDisplacementField()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(read).reshape(-1), values.astype(np.float64))
    assert path.stat().st_size < values.nbytes  # deflated (random floats: only the exponent bytes shrink)


def test_same_tree_gives_the_same_bytes():
    values = np.linspace(0, 1, 5000, dtype=np.float32)
    assert to_bytes(_itk_tree(values, True)) == to_bytes(_itk_tree(values, True))


def test_bad_trees_are_refused():
    with pytest.raises(ValueError, match="expected a float32 or float64 array"):
        to_bytes(_itk_tree(np.arange(3), False))
    root = Group()
    root.add("a", "x")
    with pytest.raises(ValueError, match="expected a group"):
        root.add("a/b", "y")
