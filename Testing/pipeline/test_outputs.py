"""Output helpers of :mod:`SACBRegistrationLib.pipeline.outputs`."""

import numpy as np
import pytest
import SimpleITK as sitk

from SACBRegistrationLib.pipeline.outputs import compact_labels


@pytest.mark.parametrize("largest, pixel_type", [(0, sitk.sitkUInt8), (255, sitk.sitkUInt8), (256, sitk.sitkUInt16),
                                                 (65535, sitk.sitkUInt16), (65536, sitk.sitkInt32)])
def test_compact_labels_keeps_every_label_in_the_smallest_type(largest, pixel_type):
    labels = np.zeros((4, 5, 6), np.int32)
    labels[1, 2, 3], labels[2, 2, 2] = largest, largest // 2
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((0.5, 1.0, 2.0))
    image.SetOrigin((1.0, -2.0, 3.0))
    compact = compact_labels(image)
    assert compact.GetPixelID() == pixel_type
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(compact), labels)
    assert compact.GetSpacing() == image.GetSpacing() and compact.GetOrigin() == image.GetOrigin()
