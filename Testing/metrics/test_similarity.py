import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from SACBRegistrationLib.metrics import ssim


@pytest.mark.parametrize("seed", range(3))
def test_matches_scikit_image(seed):
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.random((20, 22, 18)), 1.5)
    b = a + 0.05 * rng.standard_normal(a.shape)
    expected = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert ssim(a, b, data_range=1.0) == pytest.approx(expected, rel=1e-9)


def test_identical_images_and_bad_input():
    a = np.random.default_rng(3).random((15, 15, 15))
    assert ssim(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive data range"):
        ssim(np.zeros((15, 15, 15)), np.zeros((15, 15, 15)))
    with pytest.raises(ValueError, match="one shape"):
        ssim(a, a[:-1])
