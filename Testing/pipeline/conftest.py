"""Fixtures for pipeline tests: a tiny model package and synthetic images with real geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from SACBRegistrationLib.networks.config import SACBNetConfig
from SACBRegistrationLib.networks.sacbnet import SACBNet
from SACBRegistrationLib.packages import write_package


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    t = sitk.Euler3DTransform()
    t.SetRotation(ax, ay, az)
    return np.array(t.GetMatrix()).reshape(3, 3)


def make_image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), direction=None, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    """array in (z, y, x) order -> SimpleITK image with the given geometry."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection((np.eye(3) if direction is None else np.asarray(direction)).ravel().tolist())
    image.SetOrigin([float(o) for o in origin])
    return image


def smooth_volume(shape, seed: int, sigma: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.random(shape), sigma)
    volume = (volume - volume.min()) / (volume.max() - volume.min())
    return (100 * volume).astype(np.float32)


def labels_of(volume: np.ndarray) -> np.ndarray:
    """Three labels by intensity terciles (integer label map)."""
    low, high = np.percentile(volume, [33, 66])
    return np.digitize(volume, [low, high]).astype(np.int16)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory):
    """A random-weight package at 4 mm with 2 clusters (fast; not a trained model)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SACBNet(SACBNetConfig(clusters=2))
    return write_package(tmp_path_factory.mktemp("pkg") / "tiny", model, name="tiny", version="0.0.1",
                         spacing_mm=[4.0, 4.0, 4.0], intensity={"method": "percentile", "low": 0.5, "high": 99.5},
                         modality="MR T1w", anatomy="test")


@pytest.fixture(scope="session")
def pair():
    """Fixed (identity direction, 1.5 mm) and moving (rotated, anisotropic, odd size) images
    with label maps, both covering about the same physical region."""
    fixed_array = smooth_volume((37, 41, 35), 0)
    fixed = make_image(fixed_array, (1.5, 1.5, 1.5), origin=(-26, -30, -27))
    direction = rotation(0.1, -0.2, 0.3)
    moving_ref = make_image(np.zeros((29, 45, 39), np.float32), (1.3, 1.25, 2.1), direction)
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    size = np.array(moving_ref.GetSize())
    moving_ref.SetOrigin((centre - direction @ ((size - 1) * np.array(moving_ref.GetSpacing()) / 2)).tolist())
    moving = sitk.Resample(fixed, moving_ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    fixed_seg = make_image(labels_of(fixed_array), fixed.GetSpacing(), origin=fixed.GetOrigin())
    moving_seg = sitk.Resample(fixed_seg, moving_ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    return fixed, moving, fixed_seg, moving_seg
