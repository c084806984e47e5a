"""Writing an output image file, compressed with the deflate strategy that suits its voxels.

ITK's NIfTI writer deflates with zlib's default strategy, which searches the bytes of every voxel
for strings seen before. In float intensities the mantissas hardly ever repeat, so that search
costs most of the writing time and saves almost nothing. zlib's run-length strategy (``Z_RLE``)
keeps what does compress in such an image, the runs of background voxels and the skewed byte
frequencies (Huffman codes), at a third of the cost: a 1 mm brain image (20 MB of float32) took
0.15 s against ITK's 0.44 s, 15.61 against 15.60 MB (2-core Zen 4 VM, session 15).

So a float image bound for ``.nii.gz`` is written by ITK uncompressed to a temporary ``.nii``
beside the target (the very bytes ITK would have compressed: the same header and voxels), then
deflated here. Integer images (label maps, cluster maps) and other formats keep ITK's writer: in
them the repeated strings are what compresses.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path
from typing import Union

import SimpleITK as sitk

FLOAT_PIXEL_TYPES = frozenset({sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64})
"""Pixel types written with :data:`FLOAT_STRATEGY`."""

FLOAT_STRATEGY = zlib.Z_RLE
"""zlib strategy for float voxels: runs and Huffman codes only (no string search)."""

GZIP_WBITS = 16 + zlib.MAX_WBITS
"""zlib's largest window (32 KB) with a gzip header and trailer (what ``.gz`` readers expect)."""

NIFTI_GZ = ".nii.gz"
"""The suffix whose float images are written here (every other file goes to ITK's writer)."""

READ_CHUNK_BYTES = 1 << 24
"""Bytes of the uncompressed file deflated per call: memory stays bounded for any image size."""


def _deflate_file(source: Path, target: Path) -> None:
    """``source``'s bytes into ``target`` as one gzip member (:data:`FLOAT_STRATEGY`; zlib
    releases the GIL while it compresses, so other writers run meanwhile)."""
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, GZIP_WBITS, zlib.DEF_MEM_LEVEL,
                                  FLOAT_STRATEGY)
    with open(source, "rb") as raw, open(target, "wb") as out:
        while chunk := raw.read(READ_CHUNK_BYTES):
            out.write(compressor.compress(chunk))
        out.write(compressor.flush())


def write_image(image: sitk.Image, path: Union[str, os.PathLike]) -> None:
    """``image`` to ``path`` in the format its suffix names, compressed where the format allows."""
    path = Path(path)
    if not path.name.endswith(NIFTI_GZ) or image.GetPixelID() not in FLOAT_PIXEL_TYPES:
        sitk.WriteImage(image, str(path), True)
        return
    handle, name = tempfile.mkstemp(suffix=".nii", prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    raw = Path(name)
    try:
        sitk.WriteImage(image, str(raw), False)
        _deflate_file(raw, path)
    except BaseException:
        path.unlink(missing_ok=True)  # no half-written file left behind
        raise
    finally:
        raw.unlink(missing_ok=True)
