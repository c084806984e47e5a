"""Loss functions of SACB-Net training as pure tensor functions.

Shapes: images ``(B, C, D, H, W)``; displacement ``(B, 3, D, H, W)`` (voxels, tensor-axis
order); label probabilities / one-hot maps ``(B, L, D, H, W)``. Every function returns a scalar
(mean over the batch) and is differentiable.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.local_ncc import box_sum, fixed_window_stats, squared_local_ncc_sum

NCC_EPS = 1e-5
"""Stabiliser of the NCC denominator (voxelmorph's value, used by the authors)."""


def _check_5d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 5:
        raise ValueError(f"expected {name} of shape (B, C, D, H, W), got {tuple(x.shape)}")


def local_ncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, squared: bool = True,
              eps: float = NCC_EPS, mask: Optional[torch.Tensor] = None,
              fixed_stats: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Negative local normalised cross-correlation (supplement Eq. 12), window ``w = 9``.

    With ``squared=True`` (default) each local term is ``cross^2 / (var_f * var_w + eps)``, the
    voxelmorph ``NCC`` the authors train with; ``squared=False`` gives Eq. 12's
    ``cross / sqrt(var_f * var_w + eps)``. The result is minus the mean over voxels (over the
    voxels of ``mask`` when given), in ``[-1, 0]`` for the squared form. ``fixed_stats``: see
    :func:`local_ncc_map`.

    The squared form with a constant ``fixed`` (no gradient wanted for it: training's and instance
    optimisation's case) runs :func:`~..ops.local_ncc.squared_local_ncc_sum`, whose gradient is
    written out (several times faster than autograd through :func:`local_ncc_map`; equal to it up
    to float rounding).
    """
    if not squared or fixed.requires_grad:
        return -masked_mean(local_ncc_map(fixed, warped, window, squared, eps, fixed_stats), mask)
    _check_pair(fixed, warped)
    weights, total = _mean_weights(warped, mask)
    return -squared_local_ncc_sum(fixed, warped, window, eps, fixed_stats, weights) / total


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of ``values`` ``(B, C, D, H, W)``, or its weighted mean with weights ``mask``
    ``(B, 1, D, H, W)`` (broadcast over channels; an all-zero mask gives the plain mean)."""
    weights, total = _mean_weights(values, mask)
    return values.mean() if weights is None else (values * weights).sum() / total


def _mean_weights(values: torch.Tensor, mask: Optional[torch.Tensor]):
    """``(weights, total)`` of :func:`masked_mean` for ``values``: the mask broadcast to them and its
    sum, or ``(None, number of values)`` for no mask or an all-zero one (the plain mean)."""
    if mask is not None:
        weights = mask.to(values).expand_as(values)
        total = weights.sum()
        if float(total) > 0:
            return weights, total
    return None, float(values.numel())


def _check_pair(fixed: torch.Tensor, warped: torch.Tensor) -> None:
    _check_5d("fixed", fixed)
    if fixed.shape != warped.shape:
        raise ValueError(f"expected images of one shape, got {tuple(fixed.shape)} and {tuple(warped.shape)}")


def local_ncc_map(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, squared: bool = True,
                  eps: float = NCC_EPS, fixed_stats: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The per-voxel local correlation of :func:`local_ncc`, ``(B, C, D, H, W)`` (higher is better),
    differentiable by autograd in both images.

    ``fixed_stats``: :func:`~..ops.local_ncc.fixed_window_stats` of ``fixed`` with the same window,
    when already known (the same values as computing them here).
    """
    _check_pair(fixed, warped)
    size = float(window ** 3)
    if fixed_stats is None:
        fixed_stats = fixed_window_stats(fixed, window)
    f_mean, f_var = torch.chunk(fixed_stats, 2, dim=1)
    w_sum, ww_sum, fw_sum = torch.chunk(box_sum(torch.cat([warped, warped * warped, fixed * warped], 1), window), 3, dim=1)
    w_mean = w_sum / size
    cross = fw_sum - f_mean * w_sum  # S_fw - S_f S_w / n
    w_var = ww_sum - w_mean * w_sum  # S_ww - S_w^2 / n
    if squared:
        cc = cross * cross / (f_var * w_var + eps)
    else:
        cc = cross / torch.sqrt((f_var * w_var).clamp_min(0) + eps)
    return cc


def gradient_l2(disp: torch.Tensor) -> torch.Tensor:
    """Smoothness term of Eq. 1, ``||grad phi||_2^2``: mean squared forward difference of the
    displacement along each axis, averaged over the three axes (the authors' ``Grad3d('l2')``)."""
    _check_5d("displacement", disp)
    dd = disp[:, :, 1:, :, :] - disp[:, :, :-1, :, :]
    dh = disp[:, :, :, 1:, :] - disp[:, :, :, :-1, :]
    dw = disp[:, :, :, :, 1:] - disp[:, :, :, :, :-1]
    return ((dd * dd).mean() + (dh * dh).mean() + (dw * dw).mean()) / 3.0


def weighted_displacement_l2(disp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``weights[b] * mean(disp[b] ** 2)`` for a displacement ``(B, 3, D, H, W)``
    (voxels) and ``(B,)`` weights: the squared distance from the identity, counted only for the
    pairs given weight (pairs whose true displacement is zero, such as an image and itself)."""
    _check_5d("displacement", disp)
    if weights.shape != disp.shape[:1]:
        raise ValueError(f"expected one weight per batch item {tuple(disp.shape[:1])}, got {tuple(weights.shape)}")
    per_item = (disp * disp).mean(dim=(1, 2, 3, 4))  # (B,)
    return (weights.to(per_item) * per_item).mean()


def bending_energy(disp: torch.Tensor) -> torch.Tensor:
    """Bending energy of a displacement ``(B, 3, D, H, W)`` (voxels): the mean over voxels of
    ``sum_ij (d^2 u / dx_i dx_j)^2`` from central second differences (mixed terms counted twice),
    averaged over the three components. Penalises curvature, not affine motion."""
    _check_5d("displacement", disp)

    def second(x: torch.Tensor, axis: int) -> torch.Tensor:
        n = x.shape[axis]
        return x.narrow(axis, 2, n - 2) - 2 * x.narrow(axis, 1, n - 2) + x.narrow(axis, 0, n - 2)

    def first(x: torch.Tensor, axis: int) -> torch.Tensor:
        n = x.shape[axis]
        return (x.narrow(axis, 2, n - 2) - x.narrow(axis, 0, n - 2)) / 2

    total = disp.new_zeros(())
    for a in range(2, 5):
        total = total + (second(disp, a) ** 2).mean()
        for b in range(a + 1, 5):
            total = total + 2 * (first(first(disp, a), b) ** 2).mean()
    return total / 3.0


def mind_loss(fixed_features: torch.Tensor, warped_features: torch.Tensor,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared difference of MIND descriptors ``(B, 12, D, H, W)`` (0 = identical structure)."""
    if fixed_features.shape != warped_features.shape:
        raise ValueError(f"expected descriptors of one shape, got {tuple(fixed_features.shape)} and "
                         f"{tuple(warped_features.shape)}")
    return masked_mean((fixed_features - warped_features) ** 2, mask)


def soft_dice(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-5,
              include_background: bool = False) -> torch.Tensor:
    """Soft Dice loss ``1 - mean_l 2|P_l T_l| / (|P_l| + |T_l|)`` over label channels.

    ``prediction``, ``target``: ``(B, L, D, H, W)`` probabilities or one-hot maps (e.g. the
    moving one-hot labels warped with bilinear interpolation, and the fixed one-hot labels).
    Channel 0 is the background and is left out unless ``include_background``.
    """
    _check_5d("prediction", prediction)
    if prediction.shape != target.shape:
        raise ValueError(f"expected prediction and target of one shape, got {tuple(prediction.shape)} "
                         f"and {tuple(target.shape)}")
    if not include_background:
        if prediction.shape[1] < 2:
            raise ValueError("expected at least one foreground label channel besides the background")
        prediction, target = prediction[:, 1:], target[:, 1:]
    dims = (2, 3, 4)
    intersection = (prediction * target).sum(dims)
    total = prediction.sum(dims) + target.sum(dims)
    return 1.0 - ((2.0 * intersection + eps) / (total + eps)).mean()


def one_hot_labels(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``(B, 1, D, H, W)`` integer labels -> ``(B, L, D, H, W)`` float one-hot maps."""
    _check_5d("labels", labels)
    if labels.shape[1] != 1 or labels.is_floating_point():
        raise ValueError(f"expected integer labels of shape (B, 1, D, H, W), got {labels.dtype} {tuple(labels.shape)}")
    return F.one_hot(labels[:, 0].long(), num_labels).permute(0, 4, 1, 2, 3).float()
