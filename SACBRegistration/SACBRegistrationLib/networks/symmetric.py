"""Symmetric inference: the network run in both directions, its two answers made one stationary
velocity field.

SACB-Net predicts a displacement ``u_fm`` for (moving, fixed) and ``u_mf`` for the swapped pair.
For a consistent network ``exp(v)`` and ``exp(-v)`` would be inverse maps, so the two answers are
read as ``v`` and ``-v`` and averaged: ``v = (u_fm - u_mf) / 2``. Whatever the network adds in
both directions alike cancels (to float rounding): an image registered to itself gives ``v = 0`` (the network
alone moved it ~0.8 mm on validation; measured through the pipeline, the bundled fixed image
registered to itself moved 1.34 mm with the ``fast`` preset, 0.04 mm with this), and swapping the
images negates ``v``. Integrated by scaling and squaring, ``exp(v)`` is diffeomorphic for smooth
``v``. On held-out 1 mm pairs (model 2.2.0, network alone) Dice was 0.804 against 0.803, folding
0 against 0.0007% and SDlogJ in the brain 0.19 against 0.32, for a second forward pass.

**Fine pass** (:func:`half_way_velocity`): the network run once more on a finer grid (twice the
network's resolution: 1 mm for a 2 mm model), on the two images each warped half-way along the first
answer (the moving image by ``exp(v / 2)``, the fixed one by ``exp(-v / 2)``), and its symmetric
velocity ``r`` of that pair added: ``v + r``, the first-order (Baker-Campbell-Hausdorff) velocity of
``exp(v / 2) o exp(r) o exp(v / 2)``. Warping both images half-way keeps the properties above
exactly: swapping the images swaps the two half-way images, so ``r`` and ``v + r`` change sign, and
an image registered to itself still gives zero. The finer images show what the network grid cannot
(thin CSF, cortex), and the half-way pair is close, as the network's training pairs were.

Shapes: images ``(B, C, D, H, W)``; displacement and velocity ``(B, 3, D, H, W)`` in voxels of the
grid of the images they come with, components in tensor-axis order.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..spatial.padding import pad_to_multiple
from ..spatial.warping import integrate_velocity, warp


def symmetric_velocity(net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor,
                       **forward_options: Any) -> Tuple[torch.Tensor, Optional[Dict]]:
    """``(v, clusters)``: the stationary velocity ``(u(moving, fixed) - u(fixed, moving)) / 2`` of a
    registration network ``net`` for single pairs ``(1, C, D, H, W)`` (float32), and the clusters
    of the (moving, fixed) pass when ``return_clusters=True`` is among ``forward_options`` (else
    None). Both directions run as one batch of two (0.18 s faster than one after the other for a
    2 mm brain on a 2-core CPU; twice one pass's activation memory), through the network's
    ``forward_both_ways`` when it has one (:meth:`..sacbnet.SACBNet.forward_both_ways`: each image
    encoded once)."""
    if moving.shape[0] != 1 or fixed.shape[0] != 1:
        raise ValueError(f"expected one pair (batch 1), got batches {moving.shape[0]} and {fixed.shape[0]}")
    if hasattr(net, "forward_both_ways"):
        out = net.forward_both_ways(moving, fixed, **forward_options)  # (2, 3, D, H, W)
    else:
        out = net(torch.cat([moving, fixed]), torch.cat([fixed, moving]), **forward_options)  # (2, 3, D, H, W)
    forward, backward = out.displacement.float().unbind(0)
    velocity = ((forward - backward) / 2)[None]  # (1, 3, D, H, W)
    clusters = None
    if out.clusters is not None:
        # {level: {"fixed"|"moving": (2, D_l, H_l, W_l)}} -> the (moving, fixed) pass's (1, D_l, H_l, W_l)
        clusters = {level: {role: maps[:1] for role, maps in roles.items()} for level, roles in out.clusters.items()}
    return velocity, clusters


def half_way_velocity(net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, velocity: torch.Tensor,
                      integration_steps: int, **forward_options: Any) -> torch.Tensor:
    """The fine pass (module docstring): ``velocity + r``, where ``r`` is the symmetric velocity of
    ``moving`` warped by ``exp(velocity / 2)`` and ``fixed`` warped by ``exp(-velocity / 2)``.

    ``moving`` / ``fixed``: one pair ``(1, C, D, H, W)`` on any grid (the images are padded to the
    network's size multiple and the answer cropped back); ``velocity``: ``(1, 3, D, H, W)`` on that
    grid, in its voxels (already resampled there); ``integration_steps``: squarings of the two half
    velocities. Returns ``(1, 3, D, H, W)`` on the same grid."""
    if velocity.shape[0] != 1 or tuple(velocity.shape[2:]) != tuple(moving.shape[2:]):
        raise ValueError(f"expected a velocity (1, 3, {', '.join(map(str, moving.shape[2:]))}) on the images' grid, "
                         f"got {tuple(velocity.shape)}")
    # the two images half-way along the first answer (pull-back warps: moving forward, fixed backward)
    half = integrate_velocity(velocity / 2, integration_steps)
    back = integrate_velocity(-velocity / 2, integration_steps)
    moving_half, crop = pad_to_multiple(warp(moving, half))  # (1, C, D', H', W'), D' a multiple of 16
    fixed_half, _ = pad_to_multiple(warp(fixed, back))
    # the residual between them, symmetric, cropped back to the images' grid
    residual, _ = symmetric_velocity(net, moving_half, fixed_half, **forward_options)
    return velocity + residual[crop]  # (1, 3, D, H, W)
