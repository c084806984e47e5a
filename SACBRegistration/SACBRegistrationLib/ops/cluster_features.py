"""Clustering features of SACB (paper Eq. 2-3 and Table 4).

Every voxel's zero-padded ``k x k x k`` patch of the feature map ``(B, C, D, H, W)`` is reduced
to a feature vector for k-means:

- ``"spatial"``: mean over the ``k**3`` taps, one value per channel -> ``C`` features;
- ``"channel"``: mean over the channels, one value per tap -> ``k**3`` features;
- ``"both"``: the two concatenated (spatial first) -> ``C + k**3`` features (the paper's Mix).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ..vocabulary import CLUSTER_FEATURES


def feature_size(mode: str, channels: int, kernel_size: int = 3) -> int:
    """Length of the clustering feature vector."""
    sizes = {"spatial": channels, "channel": kernel_size ** 3, "both": channels + kernel_size ** 3}
    if mode not in sizes:
        raise ValueError(f"expected cluster feature in {CLUSTER_FEATURES}, got {mode!r}")
    return sizes[mode]


def _channel_mean_taps(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``(B, C, D, H, W) -> (B, k**3, D, H, W)``: channel mean at each tap of each patch."""
    r = kernel_size // 2
    mean = F.pad(x.mean(1), (r,) * 6)  # (B, D+2r, H+2r, W+2r)
    depth, height, width = x.shape[2:]
    taps = [mean[:, dd:dd + depth, dh:dh + height, dw:dw + width]
            for dd, dh, dw in itertools.product(range(kernel_size), repeat=3)]
    return torch.stack(taps, 1)


def _box_sum(x: torch.Tensor, kernel_size: int, dim: int) -> torch.Tensor:
    """Sum of ``kernel_size`` consecutive slices along ``dim`` (valid part only)."""
    n = x.shape[dim] - kernel_size + 1
    total = x.narrow(dim, 0, n).clone()
    for offset in range(1, kernel_size):
        total += x.narrow(dim, offset, n)
    return total


def patch_mean(x: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Mean of every zero-padded ``k x k x k`` patch, zeros included: ``(B, C, D, H, W)`` in
    and out. Separable box sums (3k additions per voxel instead of k^3)."""
    padded = F.pad(x.contiguous(), (kernel_size // 2,) * 6)
    for dim in (2, 3, 4):
        padded = _box_sum(padded, kernel_size, dim)
    return padded / kernel_size ** 3


def cluster_features(x: torch.Tensor, mode: str = "spatial", kernel_size: int = 3) -> torch.Tensor:
    """Clustering features ``(B, D*H*W, F)`` of the feature map ``x`` ``(B, C, D, H, W)``."""
    if mode not in CLUSTER_FEATURES:
        raise ValueError(f"expected cluster feature in {CLUSTER_FEATURES}, got {mode!r}")
    parts = []
    if mode in ("spatial", "both"):
        parts.append(patch_mean(x, kernel_size))
    if mode in ("channel", "both"):
        parts.append(_channel_mean_taps(x, kernel_size))
    features = torch.cat(parts, 1) if len(parts) > 1 else parts[0]  # (B, F, D, H, W)
    return features.flatten(2).transpose(1, 2)  # (B, F, D, H, W) -> (B, D*H*W, F)
