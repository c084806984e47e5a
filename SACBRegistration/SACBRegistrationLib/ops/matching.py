"""Similarity-matching flow estimator of SACB-Net (paper Eq. 8-10).

For each voxel ``v`` of the fixed features, the dot products with the moving features at the
``k**3`` neighbours ``v + g`` (zero padding outside the volume) are turned into probabilities by
a softmax, and the displacement is their expectation over the offsets ``g``::

    p_g(v) = softmax_g <F_fixed(v), F_moving(v + g)>,    flow(v) = sum_g p_g(v) * g

Shapes: features ``(B, C, D, H, W)`` -> flow ``(B, 3, D, H, W)`` in voxels, tensor-axis order.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def offset_grid(window: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The paper's ``G``: ``(window**3, 3)`` offsets ``(dd, dh, dw)`` in ``[-r, r]``, row-major."""
    r = window // 2
    return torch.tensor(list(itertools.product(range(-r, r + 1), repeat=3)), device=device, dtype=dtype)


def matching_scores(fixed: torch.Tensor, moving: torch.Tensor, window: int = 3) -> torch.Tensor:
    """Dot products ``(B, window**3, D, H, W)`` of fixed features with shifted moving features."""
    if fixed.dim() != 5 or fixed.shape != moving.shape:
        raise ValueError(f"expected fixed and moving features of one shape (B, C, D, H, W), "
                         f"got {tuple(fixed.shape)} and {tuple(moving.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"expected an odd search window >= 1, got {window}")
    r = window // 2
    batch, channels, depth, height, width = fixed.shape
    fixed = fixed.contiguous()
    padded = F.pad(moving.contiguous(), (r,) * 6)  # zero padding outside the volume, as the authors'
    # scores accumulate in at least float32 (under autocast the features may be half precision)
    scores = fixed.new_empty(batch, window ** 3, depth, height, width, dtype=torch.promote_types(fixed.dtype, torch.float32))
    for t, (dd, dh, dw) in enumerate(itertools.product(range(window), repeat=3)):
        shifted = padded[:, :, dd:dd + depth, dh:dh + height, dw:dw + width]
        if torch.is_grad_enabled() and (fixed.requires_grad or moving.requires_grad):
            scores[:, t] = (fixed * shifted).sum(1)
            continue
        # inference: accumulate channel by channel (no (B, C, D, H, W) temporary, cache-friendly)
        score = scores[:, t]
        torch.mul(fixed[:, 0], shifted[:, 0], out=score)
        for c in range(1, channels):
            score.addcmul_(fixed[:, c], shifted[:, c])
    return scores


def similarity_matching_flow(fixed: torch.Tensor, moving: torch.Tensor, window: int = 3) -> torch.Tensor:
    """Expected offset under the softmax of the matching scores: ``(B, 3, D, H, W)`` voxels."""
    scores = matching_scores(fixed, moving, window)
    flow_dtype = torch.promote_types(fixed.dtype, torch.float32)  # flows: float32 at least, also under autocast
    probabilities = torch.softmax(scores.to(flow_dtype), dim=1)  # (B, T, D, H, W)
    grid = offset_grid(window, fixed.device, probabilities.dtype)  # (T, 3)
    batch, taps = probabilities.shape[:2]
    # flow[b, c, v] = sum_t G[t, c] * p[b, t, v]:  (3, T) @ (B, T, V) -> (B, 3, V)
    flow = grid.t() @ probabilities.reshape(batch, taps, -1)
    return flow.view(batch, 3, *fixed.shape[2:])
