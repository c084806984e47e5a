"""Image similarity: structural similarity index (SSIM) of 3D images.

Wang et al.'s SSIM with a Gaussian window (sigma 1.5, truncated at 3.5 sigma), population
covariances, ``K1 = 0.01``, ``K2 = 0.03``, reflective borders, and the mean taken after cropping
half a window at every border: the same definition as ``skimage.metrics.structural_similarity(
..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``, against which it is
tested.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

SIGMA = 1.5
TRUNCATE = 3.5
K1, K2 = 0.01, 0.03


def ssim(a: np.ndarray, b: np.ndarray, data_range: Optional[float] = None, mask: Optional[np.ndarray] = None) -> float:
    """Mean SSIM of two images of one shape.

    ``data_range``: the intensity range (default: ``max - min`` over both images). ``mask``:
    optional boolean array; the mean is then taken inside the mask instead of the cropped
    volume.
    """
    from scipy import ndimage  # here, not at import: the registration imports the metrics early

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"expected images of one shape, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("expected finite images, got NaN or Inf")
    if data_range is None:
        data_range = float(max(a.max(), b.max()) - min(a.min(), b.min()))
    if data_range <= 0:
        raise ValueError(f"expected a positive data range, got {data_range} (constant images?)")

    def blur(x: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(x, sigma=SIGMA, truncate=TRUNCATE, mode="reflect")

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != s.shape:
            raise ValueError(f"expected a mask of shape {s.shape}, got {mask.shape}")
        return float(s[mask].mean())
    pad = int(TRUNCATE * SIGMA + 0.5)  # half the window (skimage crops it before averaging)
    return float(s[tuple(slice(pad, n - pad) for n in s.shape)].mean())
