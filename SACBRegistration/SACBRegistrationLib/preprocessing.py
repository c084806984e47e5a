"""Intensity normalisation and resampling shared by the pipeline and training (numpy / SimpleITK)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .packages import IntensityNormalisation

FOREGROUND_FRACTION = 0.01
"""Percentiles are taken over non-zero voxels when at least this fraction of the volume is non-zero
(skull-stripped MR has a zero background that would otherwise dominate the low percentile)."""
PERCENTILE_SAMPLE_STRIDE = 2
"""Checks and pictures of a whole volume take its percentiles from every second voxel along each
spatial axis (an eighth of them, 0.15 s less per 1 mm brain pair): warnings and display windows,
not measurements."""


def normalise_intensity(array: np.ndarray, settings: IntensityNormalisation,
                        mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Scale an image to [0, 1] as a model package says (float32, same shape).

    Raises ``ValueError`` for an image with no intensity range (constant or empty).
    """
    array = np.asarray(array, dtype=np.float32)
    if settings.method == "none":
        return array.copy()
    if settings.method == "window":
        return np.clip((array - settings.min) / (settings.max - settings.min), 0.0, 1.0).astype(np.float32)
    values = array[mask] if mask is not None else array
    nonzero = values[values != 0]
    if nonzero.size >= FOREGROUND_FRACTION * values.size:
        values = nonzero
    if values.size == 0:
        raise ValueError("expected an image with some non-zero voxels, got an empty image")
    low, high = np.percentile(values, [settings.low, settings.high])
    if not high > low:
        raise ValueError(f"expected an image with an intensity range, got a constant image (value {low:g}); "
                         f"check that the right volume was selected")
    return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)


def sampled_percentiles(array: np.ndarray, q):
    """Percentiles ``q`` of a volume ``(D, H, W)`` (or ``(D, H, W, C)``, all components together)
    from a regular eighth of its voxels (:data:`PERCENTILE_SAMPLE_STRIDE`)."""
    array = np.asarray(array)
    every_other = (slice(None, None, PERCENTILE_SAMPLE_STRIDE),) * min(array.ndim, 3)
    return np.percentile(array[every_other], q)


def centred_grid(image, spacing_mm: float, shape: Sequence[int]):
    """An empty SimpleITK image: an identity-direction grid of ``shape`` (array order D, H, W)
    and isotropic ``spacing_mm``, centred on the centre of ``image``'s physical extent."""
    import SimpleITK as sitk

    corner_index = [(n - 1) / 2.0 for n in image.GetSize()]
    centre = image.TransformContinuousIndexToPhysicalPoint(corner_index)
    size_xyz = [int(s) for s in reversed(tuple(shape))]
    grid = sitk.Image(size_xyz, sitk.sitkFloat32)
    grid.SetSpacing([float(spacing_mm)] * 3)
    grid.SetOrigin([c - (n - 1) * spacing_mm / 2.0 for c, n in zip(centre, size_xyz)])
    return grid


def resample_like(image, reference, interpolator=None, default: float = 0.0, transform=None,
                  pixel_type=None):
    """Resample ``image`` onto ``reference``'s grid (optionally through ``transform``, which maps
    reference points to ``image`` points, ITK's convention)."""
    import SimpleITK as sitk

    return sitk.Resample(image, reference, transform or sitk.Transform(), interpolator or sitk.sitkLinear,
                         default, pixel_type if pixel_type is not None else image.GetPixelID())
