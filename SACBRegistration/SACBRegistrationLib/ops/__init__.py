"""Functional building blocks of SACB-Net (pure tensor functions)."""

from .adaptive_conv import spatially_adaptive_conv3d
from .cluster_features import cluster_features, patch_mean
from .kmeans import KMeansResult, kmeans
from .local_ncc import box_sum, fixed_window_stats, squared_local_ncc_sum
from .matching import matching_scores, similarity_matching_flow

__all__ = ["KMeansResult", "box_sum", "cluster_features", "fixed_window_stats", "kmeans", "matching_scores", "patch_mean",
           "similarity_matching_flow", "spatially_adaptive_conv3d", "squared_local_ncc_sum"]
