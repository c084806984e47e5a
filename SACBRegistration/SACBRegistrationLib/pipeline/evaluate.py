"""Metrics of an existing transform (``sacb evaluate``): any ITK transform file or displacement
field image, applied fixed -> moving as ITK resampling does."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import SimpleITK as sitk

from .geometry import field_in_index_frame
from .io import ImageLike, InputError, read_image, read_segmentation
from .metrics_table import MetricsTable, evaluate_segmentations, regularity
from .registration import warp_segmentation


def read_transform(path: Union[str, Path]) -> sitk.Transform:
    """An ITK transform file (``.h5``, ``.tfm``, ``.txt``, ``.mat``) or a displacement-field image
    (vector image, LPS mm, e.g. ``displacement.nii.gz`` or an ANTs warp)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"transform not found: {path}")
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError:
        pass
    try:
        field = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"cannot read {path} as an ITK transform or a displacement-field image") from None
    if field.GetNumberOfComponentsPerPixel() != 3 or field.GetDimension() != 3:
        raise InputError(f"{path} is an image but not a 3D displacement field (3 components per voxel)")
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def evaluate_transform(fixed: ImageLike, moving: ImageLike, transform: Union[str, Path, sitk.Transform],
                       fixed_segmentation: Optional[ImageLike] = None, moving_segmentation: Optional[ImageLike] = None,
                       label_names: Optional[Dict[int, str]] = None) -> MetricsTable:
    """Dice / HD95 / ASSD before and after, and folding / SDlogJ of the transform on the fixed grid."""
    fixed_image, moving_image = read_image(fixed, "fixed"), read_image(moving, "moving")
    transform = transform if isinstance(transform, sitk.Transform) else read_transform(transform)
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fixed_image.GetSize(),
                                              fixed_image.GetOrigin(), fixed_image.GetSpacing(),
                                              fixed_image.GetDirection())
    components, spacing = field_in_index_frame(field)
    reg = regularity(components, spacing)
    if fixed_segmentation is None or moving_segmentation is None:
        return MetricsTable(regularity=reg)
    fixed_seg = read_segmentation(fixed_segmentation, fixed_image, "fixed")
    moving_seg = read_segmentation(moving_segmentation, moving_image, "moving")
    before = warp_segmentation(moving_seg, fixed_image, sitk.Transform())
    after = warp_segmentation(moving_seg, fixed_image, transform)
    return evaluate_segmentations(fixed_seg, before, after, label_names, reg)
