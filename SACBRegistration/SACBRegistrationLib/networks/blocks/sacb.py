"""3D Spatial-Awareness Convolution Block (paper Sec. 3.2, Fig. 3, Eq. 2-7).

Attribute names (``proj_in``, ``w``, ``get_kernel``, ``get_bias``) are the authors' so their
checkpoints load.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.adaptive_conv import spatially_adaptive_conv3d
from ...ops.cluster_features import cluster_features, feature_size
from ...ops.kmeans import kmeans
from ..config import KMeansConfig
from .conv import ConvBlock


class SACBOutput(NamedTuple):
    """Refined features ``(B, C, D, H, W)`` and the cluster of every voxel ``(B, D, H, W)``."""

    features: torch.Tensor
    clusters: torch.Tensor


def cluster_centroids(features: torch.Tensor, labels: torch.Tensor, clusters: int,
                      fallback: torch.Tensor) -> torch.Tensor:
    """Differentiable centroids (paper Eq. 4): mean feature of each cluster.

    features ``(B, P, F)``, labels ``(B, P)``, fallback ``(B, N, F)`` (used for empty clusters)
    -> ``(B, N, F)``. Sums use a one-hot product (deterministic on every device).
    """
    # sums over up to millions of voxels: in at least float32 and outside autocast (half overflows)
    acc = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(features.device.type, enabled=False):
        features = features.to(acc)
        one_hot = F.one_hot(labels, clusters).to(acc)  # (B, P, N)
        counts = one_hot.sum(1).unsqueeze(-1)  # (B, N, 1)
        means = one_hot.transpose(1, 2) @ features / counts.clamp_min(1)  # (B, N, F)
        return torch.where(counts > 0, means, fallback.to(acc))


class SACB(nn.Module):
    """Spatial-awareness convolution block: ``F_hat = F + act(SAC(proj_in(F)))`` (Eq. 7).

    Args:
        channels: input = output channels (the residual needs equal counts).
        clusters: default number of k-means clusters ``N``.
        cluster_feature: ``"spatial" | "channel" | "both"`` (Table 4).
        kernel_size: patch / adaptive kernel size ``k`` (3 in the paper).
        kmeans: k-means settings.
        kernel_hidden, bias_hidden: widths of the kernel-attention and bias MLPs.
        negative_slope: LeakyReLU slope of ``proj_in`` and of the activation.
    """

    def __init__(self, channels: int, clusters: int = 7, cluster_feature: str = "spatial",
                 kernel_size: int = 3, kmeans: Optional[KMeansConfig] = None, kernel_hidden: int = 128,
                 bias_hidden: int = 64, negative_slope: float = 0.1) -> None:
        super().__init__()
        taps = kernel_size ** 3
        features = feature_size(cluster_feature, channels, kernel_size)
        self.clusters = clusters
        self.cluster_feature = cluster_feature
        self.kernel_size = kernel_size
        self.kmeans = kmeans if kmeans is not None else KMeansConfig()
        self.negative_slope = negative_slope
        # projection conv block applied before clustering and the adaptive convolution
        self.proj_in = ConvBlock(channels, channels, negative_slope, kernel_size)
        # the global kernel W of Eq. 5: (C_out, C_in, k^3)
        self.w = nn.Parameter(torch.empty(channels, channels, taps))
        nn.init.kaiming_uniform_(self.w, a=math.sqrt(5))  # the authors' initialisation
        # F_w of Eq. 5: centroid -> per-tap kernel attention in (0, 1)
        self.get_kernel = nn.Sequential(
            nn.Linear(features, kernel_hidden), nn.ReLU(),
            nn.Linear(kernel_hidden, kernel_hidden), nn.ReLU(),
            nn.Linear(kernel_hidden, taps), nn.Sigmoid(),
        )
        # F_b of Eq. 6: centroid -> bias
        self.get_bias = nn.Sequential(
            nn.Linear(features, bias_hidden), nn.ReLU(),
            nn.Linear(bias_hidden, bias_hidden), nn.ReLU(),
            nn.Linear(bias_hidden, channels),
        )

    def forward(self, x: torch.Tensor, clusters: Optional[int] = None) -> SACBOutput:
        """``(B, C, D, H, W) -> SACBOutput``; ``clusters`` overrides the default ``N``."""
        n = self.clusters if clusters is None else clusters
        batch, _, depth, height, width = x.shape
        # 1. projection
        projected = self.proj_in(x)
        # 2. spatial context estimation: per-voxel patch means (B, V, F), k-means per sample
        feats = cluster_features(projected, self.cluster_feature, self.kernel_size)
        km = kmeans(feats, n, max_iter=self.kmeans.max_iter, tol=self.kmeans.tol, seed=self.kmeans.seed,
                    max_points=self.kmeans.max_points)
        centroids = cluster_centroids(feats, km.labels, n, km.centroids)  # (B, N, F), differentiable
        # 3. adaptive kernel generator: tap attention a_n (B, N, k^3) and bias b_n (B, N, C)
        attention = self.get_kernel(centroids)
        bias = self.get_bias(centroids)
        labels = km.labels.view(batch, depth, height, width)  # (B, V) -> (B, D, H, W)
        # 4. spatially adaptive convolution with W_n = a_n * W, activation, residual
        out = spatially_adaptive_conv3d(projected, self.w, attention, bias, labels)
        out = F.leaky_relu(out, self.negative_slope, inplace=not torch.is_grad_enabled())
        return SACBOutput(features=x + out, clusters=labels)
