"""Spatially adaptive convolution (SAC) of SACB (paper Eq. 5-6), without a pass per cluster.

For a voxel ``v`` of cluster ``n = labels[v]`` the paper applies the kernel ``W_n = a_n * W``
(``a_n`` has one entry per kernel tap, broadcast over the channels) and the bias ``b_n``::

    out[o, v] = sum_{i, t} a[n, t] * W[o, i, t] * x[i, v + offset_t] + b[n, o]

The authors evaluate this with one full-volume pass per cluster. Here every voxel's unfolded
patch is scaled by its own cluster's tap weights while it is gathered, then one matrix product
with ``W`` gives all output channels: the work of a single convolution whatever the number of
clusters. The volume is processed in slabs along depth, so memory stays bounded, and the
backward pass recomputes the patches slab by slab instead of storing them.

Shape vocabulary:
    x          ``(B, C_in, D, H, W)``
    weight     ``(C_out, C_in, T)`` with ``T = k**3`` taps in (d, h, w) row-major order
    attention  ``(B, N, T)`` tap weights of each cluster
    bias       ``(B, N, C_out)``
    labels     ``(B, D, H, W)`` int64 cluster of each voxel
    out        ``(B, C_out, D, H, W)``
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

DEFAULT_CPU_SLAB_ELEMENTS = 1 << 22
"""Patch elements per slab on CPU (16 MiB in float32): small enough to stay in cache."""

DEFAULT_GPU_SLAB_ELEMENTS = 1 << 27
"""Patch elements per slab on GPUs (512 MiB in float32): few launches, bounded memory."""


def tap_offsets(kernel_size: int) -> List[Tuple[int, int, int]]:
    """Offsets ``(dd, dh, dw)`` of the ``k**3`` taps into the zero-padded volume, row-major
    (d slowest, w fastest), matching ``Tensor.unfold`` over d, h, w."""
    return list(itertools.product(range(kernel_size), repeat=3))


def _slab_depth(channels: int, taps: int, height: int, width: int, slab_elements: int) -> int:
    return max(1, slab_elements // max(1, channels * taps * height * width))


def _default_slab_elements(device: torch.device) -> int:
    return DEFAULT_CPU_SLAB_ELEMENTS if device.type == "cpu" else DEFAULT_GPU_SLAB_ELEMENTS


def _gather_patches(x_padded: torch.Tensor, d0: int, depth: int, size: Tuple[int, int], kernel_size: int,
                    out: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fill ``out`` ``(C, T, depth, H, W)`` with the patches of output slices ``d0 .. d0+depth``.

    ``x_padded``: ``(C, D + 2r, H + 2r, W + 2r)``; ``scale``: optional ``(T, depth, H, W)`` tap
    weight of every output voxel, multiplied in while copying (one pass over memory).
    """
    height, width = size
    for t, (dd, dh, dw) in enumerate(tap_offsets(kernel_size)):
        window = x_padded[:, d0 + dd:d0 + dd + depth, dh:dh + height, dw:dw + width]
        if scale is None:
            out[:, t].copy_(window)
        else:
            torch.mul(window, scale[t], out=out[:, t])
    return out


def _scatter_patches_(grad_padded: torch.Tensor, patches_grad: torch.Tensor, d0: int, depth: int,
                      size: Tuple[int, int], kernel_size: int) -> None:
    """Adjoint of :func:`_gather_patches` (without scale): add every tap back where it came from."""
    height, width = size
    for t, (dd, dh, dw) in enumerate(tap_offsets(kernel_size)):
        grad_padded[:, d0 + dd:d0 + dd + depth, dh:dh + height, dw:dw + width].add_(patches_grad[:, t])


def _per_voxel(table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``table (N, E)``, ``labels (...)`` -> contiguous ``(E, ...)``: each voxel's row of the table."""
    return table.t()[:, labels.reshape(-1)].view(table.shape[1], *labels.shape)


def _padded(x: torch.Tensor, r: int) -> torch.Tensor:
    """``(C, D, H, W)`` in any memory format -> contiguous zero-padded ``(C, D+2r, H+2r, W+2r)``."""
    channels, depth, height, width = x.shape
    out = x.new_zeros(channels, depth + 2 * r, height + 2 * r, width + 2 * r)
    out[:, r:r + depth, r:r + height, r:r + width].copy_(x)
    return out


def _per_cluster_sum(values: torch.Tensor, labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """``values (E, V)``, ``labels (V,)`` -> ``(N, E)``: sum of the values of each cluster, in at
    least float32 (half precision would overflow over many voxels).

    Computed as a product with a one-hot matrix, which is deterministic on every device.
    """
    acc = torch.promote_types(values.dtype, torch.float32)
    one_hot = F.one_hot(labels, clusters).to(acc)  # (V, N)
    return (values.to(acc) @ one_hot).t()


class _SpatiallyAdaptiveConv3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, attention, bias, labels, kernel_size, slab_elements):
        batch, c_in, depth, height, width = x.shape
        c_out, taps = weight.shape[0], weight.shape[2]
        r = kernel_size // 2
        w_matrix = weight.reshape(c_out, c_in * taps)  # (C_out, C_in*T), column index i*T + t
        slab = _slab_depth(c_in, taps, height, width, slab_elements)
        out = x.new_empty(batch, c_out, depth, height, width)
        patches = x.new_empty(c_in, taps, min(slab, depth), height, width)
        for b in range(batch):
            x_padded = _padded(x[b], r)  # (C_in, D+2r, H+2r, W+2r), zero padding
            out_b = out[b].view(c_out, -1)  # (C_out, D*H*W)
            for d0 in range(0, depth, slab):
                n = min(slab, depth - d0)
                tap_weight = _per_voxel(attention[b], labels[b, d0:d0 + n])  # (T, n, H, W), cache-sized
                p = _gather_patches(x_padded, d0, n, (height, width), kernel_size, patches[:, :, :n],
                                    scale=tap_weight)
                voxels = slice(d0 * height * width, (d0 + n) * height * width)
                bias_slab = _per_voxel(bias[b], labels[b, d0:d0 + n]).view(c_out, -1)  # (C_out, n*H*W)
                # out = bias + W @ patches, written straight into the output slab
                torch.addmm(bias_slab, w_matrix, p.reshape(c_in * taps, -1), out=out_b[:, voxels])
        ctx.save_for_backward(x, weight, attention, labels)
        ctx.kernel_size = kernel_size
        ctx.slab_elements = slab_elements
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, attention, labels = ctx.saved_tensors
        kernel_size = ctx.kernel_size
        batch, c_in, depth, height, width = x.shape
        c_out, taps = weight.shape[0], weight.shape[2]
        clusters = attention.shape[1]
        r = kernel_size // 2
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        grad_out = grad_out.contiguous()
        w_matrix = weight.reshape(c_out, c_in * taps)
        slab = _slab_depth(c_in, taps, height, width, ctx.slab_elements)
        # gradients summed over many slabs and voxels accumulate in at least float32
        acc = torch.promote_types(x.dtype, torch.float32)
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros(w_matrix.shape, dtype=acc, device=x.device) if need_w else None
        grad_a = torch.zeros(attention.shape, dtype=acc, device=x.device) if need_a else None
        grad_bias = None
        if need_b:
            grad_bias = torch.stack([
                _per_cluster_sum(grad_out[b].reshape(c_out, -1), labels[b].reshape(-1), clusters)
                for b in range(batch)])  # (B, N, C_out)
        if need_x or need_w or need_a:
            patches = x.new_empty(c_in, taps, min(slab, depth), height, width)
            for b in range(batch):
                x_padded = _padded(x[b], r)
                grad_padded = torch.zeros_like(x_padded) if need_x else None
                for d0 in range(0, depth, slab):
                    n = min(slab, depth - d0)
                    g = grad_out[b, :, d0:d0 + n].reshape(c_out, -1)  # (C_out, n*H*W)
                    u = _gather_patches(x_padded, d0, n, (height, width), kernel_size, patches[:, :, :n])
                    s = _per_voxel(attention[b], labels[b, d0:d0 + n])  # (T, n, H, W)
                    # gradient w.r.t. the scaled patches q = s * u
                    grad_q = (w_matrix.t() @ g).view(c_in, taps, n, height, width)
                    if need_w:
                        grad_w.addmm_(g.to(acc), (u * s).reshape(c_in * taps, -1).t().to(acc))
                    if need_a:
                        per_voxel = (grad_q * u).sum(0).reshape(taps, -1)  # (T, n*H*W)
                        grad_a[b] += _per_cluster_sum(per_voxel, labels[b, d0:d0 + n].reshape(-1), clusters)
                    if need_x:
                        _scatter_patches_(grad_padded, grad_q.mul_(s), d0, n, (height, width), kernel_size)
                if need_x:
                    grad_x[b] = grad_padded[:, r:r + depth, r:r + height, r:r + width]
        if grad_w is not None:
            grad_w = grad_w.view_as(weight).to(weight.dtype)
        if grad_a is not None:
            grad_a = grad_a.to(attention.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(x.dtype)  # the wrapper gives all four inputs one dtype
        return grad_x, grad_w, grad_a, grad_bias, None, None, None


def spatially_adaptive_conv3d(x: torch.Tensor, weight: torch.Tensor, attention: torch.Tensor,
                              bias: torch.Tensor, labels: torch.Tensor,
                              slab_elements: Optional[int] = None) -> torch.Tensor:
    """Apply the cluster-specific kernels ``attention[n] * weight`` and biases ``bias[n]``.

    See the module docstring for shapes. Zero padding keeps the spatial size. Under autocast
    the computation runs in the autocast dtype. ``slab_elements`` bounds the temporary patch
    buffer (default: 16 MiB on CPU, 512 MiB on GPUs).
    """
    if x.dim() != 5:
        raise ValueError(f"expected x of shape (B, C, D, H, W), got {tuple(x.shape)}")
    batch, c_in = x.shape[:2]
    if weight.dim() != 3 or weight.shape[1] != c_in:
        raise ValueError(f"expected weight of shape (C_out, {c_in}, T), got {tuple(weight.shape)}")
    c_out, taps = weight.shape[0], weight.shape[2]
    kernel_size = round(taps ** (1 / 3))
    if kernel_size ** 3 != taps or kernel_size % 2 == 0:
        raise ValueError(f"expected an odd cubic number of taps (27 for 3x3x3), got {taps}")
    if attention.dim() != 3 or attention.shape[0] != batch or attention.shape[2] != taps:
        raise ValueError(f"expected attention of shape ({batch}, N, {taps}), got {tuple(attention.shape)}")
    clusters = attention.shape[1]
    if bias.shape != (batch, clusters, c_out):
        raise ValueError(f"expected bias of shape ({batch}, {clusters}, {c_out}), got {tuple(bias.shape)}")
    if labels.shape != (batch,) + tuple(x.shape[2:]) or labels.dtype != torch.int64:
        raise ValueError(f"expected int64 labels of shape {(batch,) + tuple(x.shape[2:])}, "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    tensors = [t.to(dtype) for t in (x, weight, attention, bias)]
    slab = slab_elements if slab_elements is not None else _default_slab_elements(x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _SpatiallyAdaptiveConv3d.apply(*tensors, labels, kernel_size, slab)
