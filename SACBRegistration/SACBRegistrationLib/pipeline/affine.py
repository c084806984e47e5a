"""Optional rigid or affine pre-alignment with SimpleITK (Mattes mutual information).

The result maps fixed points to moving points (ITK's resampling convention). Deterministic: the
metric is sampled at a fixed fraction with a fixed seed, and the registration runs single-threaded
(multi-threaded metric sums are not reproducible to the last bit). It works on copies of the
images smoothed and reduced to at most ``WORKING_SPACING_MM`` for speed, made with all threads
(line- and voxel-wise filters: the same bits with any thread count).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..progress import ProgressCallback, no_progress
from ..vocabulary import AFFINE_MODES

WORKING_SPACING_MM = 3.0
SAMPLING_FRACTION = 0.2
SEED = 20251121


def _working_copy(image: sitk.Image) -> sitk.Image:
    spacing = np.maximum(np.array(image.GetSpacing()), WORKING_SPACING_MM)
    size = np.maximum(4, np.round(np.array(image.GetSize()) * np.array(image.GetSpacing()) / spacing)).astype(int)
    smoothed = sitk.SmoothingRecursiveGaussian(image, float(WORKING_SPACING_MM) / 2.0)
    return sitk.Resample(smoothed, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         [float(s) for s in spacing], image.GetDirection(), 0.0, sitk.sitkFloat32)


def pre_align(fixed: sitk.Image, moving: sitk.Image, mode: str = "affine",
              progress: ProgressCallback = no_progress) -> Optional[sitk.Transform]:
    """Rigid (``"rigid"``) or affine (``"affine"``) transform mapping fixed to moving points, or
    ``None`` for ``"off"``. Starts from the alignment of the images' centres of mass."""
    if mode not in AFFINE_MODES:
        raise ValueError(f"expected affine mode in {AFFINE_MODES}, got {mode!r}")
    if mode == "off":
        return None
    # the working copies' filters compute every line / voxel on its own: the same bits with any
    # thread count, so they use all of them (the smoothing of the full-resolution images is most
    # of the cost outside the optimiser)
    fixed_w, moving_w = _working_copy(fixed), _working_copy(moving)
    # the registration's internal filters (pyramid, metric) run with ITK's global thread count and
    # their sums then round differently from run to run: one thread for the (small, 3 mm) problem
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        return _register_affine(fixed_w, moving_w, mode, progress)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _register_affine(fixed_w: sitk.Image, moving_w: sitk.Image, mode: str, progress: ProgressCallback) -> sitk.Transform:
    """The optimisation on the working copies (:func:`_working_copy`), single-threaded."""
    initial = sitk.Euler3DTransform() if mode == "rigid" else sitk.AffineTransform(3)
    # the image moments are sums over voxels: one thread, so their rounding (and every later bit)
    # is the same run to run
    initializer = sitk.CenteredTransformInitializerFilter()
    initializer.SetNumberOfThreads(1)
    initializer.MomentsOn()
    transform = initializer.Execute(fixed_w, moving_w, initial)
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(1)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING_FRACTION, SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200,
                                                    gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SetInitialTransform(transform, inPlace=True)
    levels = {"n": 0}

    def on_level() -> None:
        levels["n"] += 1
        progress(min(1.0, levels["n"] / 2.0), f"{mode} pre-alignment, level {levels['n']} of 2")

    method.AddCommand(sitk.sitkMultiResolutionIterationEvent, on_level)
    method.Execute(fixed_w, moving_w)
    return transform
