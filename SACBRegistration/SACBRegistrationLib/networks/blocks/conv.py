"""Convolution block of SACB-Net: ``Conv3d -> InstanceNorm3d -> LeakyReLU`` (paper Sec. 3.1).

Attribute names follow the authors' code (``<block>.conv.weight``) so their checkpoints load.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

_STATS_ROWS = 1 << 16
"""Voxels per block when accumulating statistics: small temporaries that stay in cache."""


_WELL_CONDITIONED = 1e2
"""Largest ``mean^2 / var`` for which ``E[x^2] - mean^2`` keeps ~1e-5 relative accuracy in
float32 block sums; beyond it the variance is recomputed from centred values."""


def _channel_moments(flat: torch.Tensor, voxel_dim: int):
    """Per-channel mean and (biased) variance of ``flat`` over ``voxel_dim``.

    ``flat``: ``(B, C, V)`` (``voxel_dim = 2``) or ``(B, V, C)`` (``voxel_dim = 1``); returns two
    ``(B, C)`` float64 tensors and whether the data is well conditioned. Sums are cascade-summed in float32 per cache-sized block and
    accumulated in float64 (a single BLAS sum of squares loses ~1e-3 relative accuracy over
    millions of voxels). The fast ``E[x^2] - mean^2`` is used when well conditioned; otherwise
    a second pass sums the squares of the centred values.
    """
    count = flat.shape[voxel_dim]
    blocks = torch.split(flat, _STATS_ROWS, dim=voxel_dim)
    # accumulate in at least float32: half-precision sums of squares overflow (autocast inference)
    acc = torch.promote_types(flat.dtype, torch.float32)
    mean = flat.sum(voxel_dim, dtype=acc).double() / count
    squares = sum(block.to(acc).square().sum(voxel_dim).double() for block in blocks) / count
    var = squares - mean * mean
    well_conditioned = not bool((mean * mean > _WELL_CONDITIONED * var.clamp_min(1e-30)).any())
    if not well_conditioned:
        centre = mean.to(acc).unsqueeze(voxel_dim)
        var = sum((block.to(acc) - centre).square_().sum(voxel_dim).double() for block in blocks) / count
    return mean, var, well_conditioned


def _instance_norm_leaky_relu_(x: torch.Tensor, negative_slope: float, eps: float) -> torch.Tensor:
    """In-place InstanceNorm (no affine) then LeakyReLU; inference only (no extra full copies).

    x: ``(B, C, D, H, W)`` float32, contiguous or channels-last. About one pass for the
    statistics, one for ``x * rstd - mean * rstd``, one for the activation.
    """
    batch, channels = x.shape[:2]
    count = x[0, 0].numel()
    shape = (batch, channels) + (1,) * (x.dim() - 2)
    # (B, C, D, H, W) -> (B, V, C) view when channels-last, (B, C, V) view when contiguous
    if x.is_contiguous():
        mean, var, well_conditioned = _channel_moments(x.view(batch, channels, count), 2)
    else:
        mean, var, well_conditioned = _channel_moments(x.permute(0, 2, 3, 4, 1).reshape(batch, count, channels), 1)
    rstd = torch.rsqrt(var.clamp_min(0) + eps)
    if well_conditioned:  # one pass: x * rstd - mean * rstd
        torch.addcmul((-mean * rstd).view(shape).to(x.dtype), x, rstd.view(shape).to(x.dtype), out=x)
    else:  # a large mean: subtract it first, or x * rstd would round away the signal
        x.sub_(mean.view(shape).to(x.dtype)).mul_(rstd.view(shape).to(x.dtype))
    return F.leaky_relu_(x, negative_slope)


class ConvBlock(nn.Module):
    """3x3x3 convolution, optionally followed by InstanceNorm (no affine) and LeakyReLU.

    Shapes: ``(B, C_in, D, H, W) -> (B, C_out, D, H, W)``.

    Args:
        in_channels, out_channels: channel counts.
        negative_slope: LeakyReLU slope; ``None`` for a plain convolution (the flow head's
            last layer has neither norm nor activation).
        kernel_size: odd convolution size, zero padding keeps the spatial size.
    """

    eps = 1e-5  # InstanceNorm3d's default

    def __init__(self, in_channels: int, out_channels: int, negative_slope: Optional[float] = 0.1,
                 kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.convolve(x))

    def convolve(self, x: torch.Tensor, in_channels: Optional[slice] = None, bias: bool = True) -> torch.Tensor:
        """The convolution alone; ``in_channels`` restricts it to a slice of the input channels
        (``x`` then holds only those), so a convolution over a concatenation can be computed as
        a sum of parts without materialising the concatenation."""
        weight = self.conv.weight if in_channels is None else self.conv.weight[:, in_channels]
        # channels-last: about twice as fast for these few-channel 3D convolutions (oneDNN, and
        # cuDNN under autocast); a no-op when the input is already in that layout
        x = x.contiguous(memory_format=torch.channels_last_3d)
        return F.conv3d(x, weight, self.conv.bias if bias else None, padding=self.conv.padding)

    def activate(self, y: torch.Tensor) -> torch.Tensor:
        """InstanceNorm and LeakyReLU of a convolution output (identity without activation)."""
        if self.negative_slope is None:
            return y
        if torch.is_grad_enabled():
            if y[0, 0].numel() > 1:
                y = F.instance_norm(y, eps=self.eps)
            else:  # a single voxel normalises to 0 (F.instance_norm refuses it when training)
                y = y - y.mean(dim=(2, 3, 4), keepdim=True)
            return F.leaky_relu(y, self.negative_slope)
        # Inference: normalise in place, so a block holds one output-sized buffer, not three.
        return _instance_norm_leaky_relu_(y, self.negative_slope, self.eps)


def conv_stack(in_channels: int, out_channels: int, negative_slope: float, first: Optional[nn.Module] = None,
               last: Optional[nn.Module] = None) -> nn.Sequential:
    """Two conv blocks ``in -> out -> out`` between optional ``first`` and ``last`` modules.

    The layout ``Sequential(first | Identity, block, block, last | Identity)`` reproduces the
    authors' ``double_conv`` so parameter names (``<name>.1.conv.weight`` ...) match.
    """
    return nn.Sequential(
        first if first is not None else nn.Identity(),
        ConvBlock(in_channels, out_channels, negative_slope),
        ConvBlock(out_channels, out_channels, negative_slope),
        last if last is not None else nn.Identity(),
    )
