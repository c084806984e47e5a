"""SACB-Net (CVPR 2025): configuration, blocks, the network and checkpoint I/O.

``config`` imports nothing heavy; everything else needs torch.
"""

from .config import CLUSTER_FEATURES, KMeansConfig, SACBNetConfig

__all__ = ["CLUSTER_FEATURES", "KMeansConfig", "SACBNetConfig"]
