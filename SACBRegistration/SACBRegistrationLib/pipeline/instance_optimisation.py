"""Instance optimisation: refine one pair's displacement field with Adam (Learn2Reg style).

The displacement itself is optimised (no network weights are touched, so runs never affect each
other), at half resolution by default: the images are 2x average-pooled, the network's field is
brought to that grid, Adam minimises ``local NCC + smoothness * gradient_l2``, and the change
(not the field) is upsampled and added back, keeping the network's full-resolution detail.

Shapes: images ``(1, 1, D, H, W)``, displacement ``(1, 3, D, H, W)`` network voxels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses.functional import gradient_l2, local_ncc
from ..progress import ProgressCallback, no_progress
from ..spatial.warping import warp


def _half(disp: torch.Tensor) -> torch.Tensor:
    # half grid: voxel q covers full voxels 2q, 2q+1, so sample at 2q + 0.5 (align_corners=False); units halve
    return F.interpolate(disp, scale_factor=0.5, mode="trilinear", align_corners=False) * 0.5


def _double(disp: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(disp, size=size, mode="trilinear", align_corners=False) * 2.0


def instance_optimise(fixed: torch.Tensor, moving: torch.Tensor, initial: torch.Tensor, steps: int = 50,
                      lr: float = 0.1, smoothness: float = 1.0, window: int = 5, half_resolution: bool = True,
                      progress: ProgressCallback = no_progress) -> torch.Tensor:
    """Return the refined displacement (same grid and units as ``initial``)."""
    if steps <= 0:
        return initial
    if steps > 10000:
        raise ValueError(f"expected at most 10000 instance-optimisation steps, got {steps}")
    with torch.no_grad():
        if half_resolution and min(fixed.shape[2:]) >= 4:
            fixed_s, moving_s, start = F.avg_pool3d(fixed, 2), F.avg_pool3d(moving, 2), _half(initial)
        else:
            fixed_s, moving_s, start = fixed, moving, initial.clone()
    field = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([field], lr=lr)
    report_every = max(1, steps // 20)
    with torch.enable_grad():
        for step in range(steps):
            loss = local_ncc(fixed_s, warp(moving_s, field), window) + smoothness * gradient_l2(field)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if (step + 1) % report_every == 0 or step + 1 == steps:
                progress((step + 1) / steps, f"instance optimisation {step + 1}/{steps}, NCC {float(loss.detach()):.4f}")
    with torch.no_grad():
        change = field.detach() - start
        if change.shape[2:] != initial.shape[2:]:
            change = _double(change, initial.shape[2:])
        return initial + change
