"""Module wrapper of the similarity-matching flow estimator (paper Eq. 8-10)."""

from __future__ import annotations

import torch
from torch import nn

from ...ops.matching import similarity_matching_flow


class SimilarityMatching(nn.Module):
    """``(fixed, moving)`` features ``(B, C, D, H, W)`` -> flow ``(B, 3, D, H, W)`` voxels.

    No parameters: the flow is the softmax-weighted expectation of the offsets of a
    ``window**3`` neighbourhood of the moving features.
    """

    def __init__(self, window: int = 3) -> None:
        super().__init__()
        self.window = window

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return similarity_matching_flow(fixed, moving, self.window)

    def extra_repr(self) -> str:
        return f"window={self.window}"
