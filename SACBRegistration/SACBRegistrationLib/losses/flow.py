"""Regularisers of displacement fields."""

from __future__ import annotations

import torch
from torch import nn

from .functional import gradient_l2


class GradientL2Loss(nn.Module):
    """Module form of :func:`~.functional.gradient_l2`, the smoothness term of Eq. 1."""

    def forward(self, disp: torch.Tensor) -> torch.Tensor:
        return gradient_l2(disp)
