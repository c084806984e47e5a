"""Label-overlap loss modules for label-supervised training."""

from __future__ import annotations

import torch
from torch import nn

from .functional import soft_dice


class SoftDiceLoss(nn.Module):
    """Module form of :func:`~.functional.soft_dice` over one-hot / probability maps."""

    def __init__(self, include_background: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        self.include_background, self.eps = include_background, eps

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_dice(prediction, target, self.eps, self.include_background)
