"""Intensity normalisation as model packages describe it."""

import numpy as np
import pytest

from SACBRegistrationLib.packages import IntensityNormalisation
from SACBRegistrationLib.preprocessing import normalise_intensity


def test_window_maps_min_to_0_and_max_to_1_and_clips():
    ct = IntensityNormalisation("window", min=-1000.0, max=1000.0)
    hounsfield = np.array([[-3000.0, -1000.0, -500.0], [0.0, 500.0, 1000.0], [1200.0, 3071.0, 250.0]])
    got = normalise_intensity(hounsfield, ct)
    assert got.dtype == np.float32 and got.shape == hounsfield.shape
    assert np.array_equal(got, np.array([[0.0, 0.0, 0.25], [0.5, 0.75, 1.0], [1.0, 1.0, 0.625]], np.float32))


def test_window_is_fixed_not_fitted_to_the_image():
    # unlike percentiles, a window ignores the image's own range: a constant image is valid
    window = IntensityNormalisation("window", min=0.0, max=80.0)
    assert np.array_equal(normalise_intensity(np.full((2, 3, 4), 20.0), window), np.full((2, 3, 4), 0.25, np.float32))
    with pytest.raises(ValueError, match="constant image"):
        normalise_intensity(np.full((2, 3, 4), 20.0), IntensityNormalisation("percentile"))


def test_sampled_percentiles_come_from_every_second_voxel_of_the_volume():
    from SACBRegistrationLib.preprocessing import sampled_percentiles

    volume = np.random.default_rng(5).normal(size=(40, 30, 20)).astype(np.float32)
    assert np.allclose(sampled_percentiles(volume, [1, 99]), np.percentile(volume[::2, ::2, ::2], [1, 99]))
    assert np.allclose(sampled_percentiles(volume, [1, 99]), np.percentile(volume, [1, 99]), atol=0.15)
    # a vector volume: the spatial axes are sampled, every component of the chosen voxels counts
    field = np.zeros((4, 4, 4, 3), np.float32)
    field[::2, ::2, ::2, 2] = 7.0
    assert sampled_percentiles(field, 100) == 7.0 and sampled_percentiles(field, 50) == 0.0
