"""Image-similarity loss modules."""

from __future__ import annotations

import torch
from torch import nn

from .functional import NCC_EPS, local_ncc


class LocalNCCLoss(nn.Module):
    """Module form of :func:`~.functional.local_ncc` (window 9 by default, supplement Eq. 12)."""

    def __init__(self, window: int = 9, squared: bool = True, eps: float = NCC_EPS) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"expected an odd window >= 1, got {window}")
        self.window, self.squared, self.eps = window, squared, eps

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        return local_ncc(fixed, warped, self.window, self.squared, self.eps)

    def extra_repr(self) -> str:
        return f"window={self.window}, squared={self.squared}"
