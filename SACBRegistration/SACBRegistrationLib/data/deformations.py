"""Random smooth deformations for synthetic training pairs (torch, deterministic per generator).

Displacements follow the engine's convention: ``(B, 3, D, H, W)`` voxels, tensor-axis order,
pull-back (``moved = warp(image, u)``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..spatial.warping import integrate_velocity


def _coarse_shape(shape: Sequence[int], control_spacing: int) -> list:
    return [max(2, math.ceil(s / control_spacing) + 1) for s in shape]


def smooth_noise_field(shape: Sequence[int], channels: int, control_spacing: int, std: float,
                       generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise on a coarse control grid, upsampled (cubic-like, via trilinear on a grid
    with aligned corners): ``(1, channels, D, H, W)``, smooth at the scale of ``control_spacing``
    voxels, with standard deviation ``std`` at the control points."""
    coarse = torch.randn(1, channels, *_coarse_shape(shape, control_spacing), generator=generator) * std
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)


def random_diffeomorphism(shape: Sequence[int], generator: torch.Generator, max_std: float = 3.0,
                          control_spacing: int = 8, coarsening: int = 1) -> torch.Tensor:
    """Displacement ``(1, 3, D, H, W)`` of a random stationary-velocity diffeomorphism; the
    velocity standard deviation (voxels) is drawn uniformly in ``[0, max_std]``.

    ``coarsening`` ``n > 1``: the same random field (the same control-point draws) made and
    integrated on a grid ``n`` times coarser, its displacement resampled to ``shape`` (``n ** 3``
    times fewer voxels to square; the field is smooth at ``control_spacing`` voxels, which must be
    a multiple of ``n``)."""
    if coarsening < 1 or control_spacing % coarsening:
        raise ValueError(f"expected a coarsening >= 1 that divides control_spacing {control_spacing}, got {coarsening}")
    std = float(torch.rand(1, generator=generator)) * max_std
    if coarsening == 1:
        return integrate_velocity(smooth_noise_field(shape, 3, control_spacing, std, generator))
    coarse_shape = [math.ceil(s / coarsening) for s in shape]
    velocity = smooth_noise_field(coarse_shape, 3, control_spacing // coarsening, std / coarsening, generator)
    disp = integrate_velocity(velocity)  # (1, 3, D/n, H/n, W/n) in coarse voxels
    return F.interpolate(disp, size=tuple(shape), mode="trilinear", align_corners=True) * coarsening


def random_affine_displacement(shape: Sequence[int], generator: torch.Generator, rotation_deg: float = 6.0,
                               scale: float = 0.06, shear: float = 0.03, translation: float = 3.0) -> torch.Tensor:
    """Displacement ``(1, 3, D, H, W)`` of a small random affine map about the volume centre:
    rotations up to ``rotation_deg`` per axis, scales ``1 +- scale``, shears ``+- shear``,
    translations ``+- translation`` voxels (uniform)."""
    def uniform(n, bound):
        return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * bound

    angles = uniform(3, math.radians(rotation_deg))
    rotation = torch.eye(3, dtype=torch.float64)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        r = torch.eye(3, dtype=torch.float64)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = rotation @ r
    shearing = torch.eye(3, dtype=torch.float64)
    shearing[0, 1], shearing[0, 2], shearing[1, 2] = uniform(3, shear)
    matrix = rotation @ torch.diag(1 + uniform(3, scale)) @ shearing
    centre = torch.tensor([(s - 1) / 2.0 for s in shape], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    points = grid.reshape(3, -1) - centre[:, None]  # (3, V) voxel coordinates about the centre
    moved = matrix @ points + uniform(3, translation)[:, None]
    return (moved - points).reshape(1, 3, *shape).float()
