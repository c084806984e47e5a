"""Shared encoder of SACB-Net (paper Sec. 3.1, supplement Fig. 5)."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from .conv import ConvBlock, conv_stack


class SharedEncoder(nn.Module):
    """Five-level convolutional encoder applied to the moving and the fixed image alike.

    Level 1 is ``ConvBlock(in, c)`` then two blocks ``c -> 2c``; levels 2..5 are a 2x average
    pooling then two blocks. Channels at levels 1..5: ``2c, 4c, 8c, 16c, 16c``.

    Shapes: ``(B, C_in, D, H, W)`` -> list of five ``(B, C_i, D / 2**(i-1), H / 2**(i-1),
    W / 2**(i-1))`` tensors, level 1 first. Attribute names (``conv0`` .. ``conv4``) are the
    authors'.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 4, negative_slope: float = 0.1) -> None:
        super().__init__()
        c = base_channels
        slope = negative_slope
        self.conv0 = conv_stack(c, 2 * c, slope, first=ConvBlock(in_channels, c, slope))
        self.conv1 = conv_stack(2 * c, 4 * c, slope, first=nn.AvgPool3d(2))
        self.conv2 = conv_stack(4 * c, 8 * c, slope, first=nn.AvgPool3d(2))
        self.conv3 = conv_stack(8 * c, 16 * c, slope, first=nn.AvgPool3d(2))
        self.conv4 = conv_stack(16 * c, 16 * c, slope, first=nn.AvgPool3d(2))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = []
        for stage in (self.conv0, self.conv1, self.conv2, self.conv3, self.conv4):
            x = stage(x)
            features.append(x)
        return features
