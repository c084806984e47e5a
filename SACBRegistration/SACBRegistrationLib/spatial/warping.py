"""Warping, composition and resampling of dense displacement fields.

Conventions (used everywhere in the engine):
    images        ``(B, C, D, H, W)``
    displacement  ``(B, 3, D, H, W)`` in voxels of the tensor grid, components in tensor-axis
                  order ``(d, h, w)``; it maps a point ``p`` of the fixed grid to ``p + u(p)`` in
                  the moving image ("pull-back", as ITK's resampling transforms).

``grid_sample`` wants normalised coordinates ordered ``(x, y, z) = (w, h, d)``; the conversion
lives only in :func:`warp`. Corners are aligned (``align_corners=True``): voxel 0 is -1 and
voxel ``n - 1`` is +1, as in the authors' spatial transformer.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

_GRID_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_GRID_CACHE_SIZE = 8


def _check_displacement(disp: torch.Tensor) -> None:
    if disp.dim() != 5 or disp.shape[1] != 3:
        raise ValueError(f"expected a displacement of shape (B, 3, D, H, W), got {tuple(disp.shape)}")


def identity_grid(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Normalised identity sampling grid ``(1, D, H, W, 3)`` in ``(x, y, z)`` order.

    Cached per (shape, device, dtype) in a small LRU cache; never stored in a state dict.
    """
    key = (tuple(int(s) for s in shape), str(device), dtype)
    grid = _GRID_CACHE.get(key)
    if grid is not None:
        _GRID_CACHE.move_to_end(key)
        return grid
    axes = [torch.linspace(-1.0, 1.0, int(s), device=device, dtype=dtype) if s > 1
            else torch.full((1,), -1.0, device=device, dtype=dtype) for s in shape]
    dd, hh, ww = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack((ww, hh, dd), dim=-1).unsqueeze(0)  # axis flip: (d, h, w) -> (x, y, z)
    _GRID_CACHE[key] = grid
    if len(_GRID_CACHE) > _GRID_CACHE_SIZE:
        _GRID_CACHE.popitem(last=False)
    return grid


def voxel_to_normalised_scale(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Factors ``2 / (n - 1)`` turning voxel offsets into normalised ones, in ``(x, y, z)`` order.

    A size-1 axis gets factor 0 (there is nowhere to move along it).
    """
    factors = [2.0 / (int(s) - 1) if s > 1 else 0.0 for s in reversed(tuple(shape))]  # (w, h, d)
    return torch.tensor(factors, device=device, dtype=dtype)


def _grid_sample_cpu_parallel(image: torch.Tensor, grid: torch.Tensor, **options) -> torch.Tensor:
    """``F.grid_sample`` on the CPU using every thread.

    PyTorch's 3D CPU kernel parallelises over the batch only, so a single volume runs on one
    core. The sampling grid of each sample is cut into depth slabs presented as a batch, with
    the image expanded (a view, not a copy) to match; the slabs are then put back together.
    """
    threads = torch.get_num_threads()
    batch, depth = grid.shape[:2]
    parts = min(threads, depth) if batch < threads else 1
    if parts <= 1:
        return F.grid_sample(image, grid, **options)
    slab = -(-depth // parts)
    padded_depth = slab * parts
    if padded_depth != depth:  # repeat the last slice so the slabs have equal depth
        grid = torch.cat([grid, grid[:, -1:].expand(-1, padded_depth - depth, -1, -1, -1)], 1)
    slabs = grid.reshape(batch * parts, slab, *grid.shape[2:])  # (B*T, slab, H, W, 3)
    images = image.unsqueeze(1).expand(-1, parts, *image.shape[1:]).reshape(batch * parts, *image.shape[1:])
    out = F.grid_sample(images, slabs, **options)  # (B*T, C, slab, H, W)
    channels = out.shape[1]
    # (B*T, C, slab, H, W) -> (B, C, T*slab, H, W)
    out = out.view(batch, parts, channels, slab, *out.shape[3:]).transpose(1, 2)
    return out.reshape(batch, channels, padded_depth, *out.shape[4:])[:, :, :depth]


def upsample2_channels_last(field: torch.Tensor) -> torch.Tensor:
    """Twice the resolution along each spatial axis: ``(B, D, H, W, C)`` -> ``(B, 2D, 2H, 2W, C)``,
    linear along each axis with half-voxel alignment and clamped borders: the values of
    ``F.interpolate(scale_factor=2, mode="trilinear", align_corners=False)`` on the channels-first
    tensor (to float rounding). Fine voxel ``2i`` lies a quarter of a coarse voxel before coarse
    voxel ``i``, ``2i + 1`` a quarter after it. Channels last, so that a displacement goes straight
    into a sampling grid, and made of slicing and ``lerp``, whose backward passes stay contiguous
    (``upsample_trilinear3d``'s backward on a permuted gradient copied it first)."""
    if field.dim() != 5:
        raise ValueError(f"expected a channels-last field (B, D, H, W, C), got {tuple(field.shape)}")
    for axis in (1, 2, 3):
        n = field.shape[axis]
        before = torch.cat([field.narrow(axis, 0, 1), field.narrow(axis, 0, n - 1)], axis)  # neighbour i - 1, clamped
        after = torch.cat([field.narrow(axis, 1, n - 1), field.narrow(axis, n - 1, 1)], axis)  # neighbour i + 1, clamped
        # (.., n, ..) twice -> (.., n, 2, ..) -> (.., 2n, ..): even fine voxels, then odd, interleaved
        field = torch.stack([torch.lerp(field, before, 0.25), torch.lerp(field, after, 0.25)], axis + 1).flatten(axis, axis + 1)
    return field


def warp(image: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
         region: Optional[Tuple[slice, slice, slice]] = None, coarser: int = 1) -> torch.Tensor:
    """Resample ``image`` at ``p + disp(p)``.

    Args:
        image: ``(B, C, D, H, W)``; a ``(1, ...)`` image is broadcast over a batch of fields.
        disp: ``(B, 3, D, H, W)`` voxels, tensor-axis order, same spatial size as ``image`` (or as
            ``region``); with ``coarser=2``, ``(B, 3, D/2, H/2, W/2)`` in voxels of that coarser grid.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"``.
        padding_mode: ``"zeros" | "border" | "reflection"`` for points outside the volume.
        region: ``(d, h, w)`` slices of ``image``'s grid: only the voxels ``p`` of that box are
            resampled (``disp`` is given there, or on the whole coarser grid), still reading ``image``
            anywhere; the same values as ``warp(image, full_disp)[..., d, h, w]``.
        coarser: 1, or 2 for a ``disp`` on a grid of half the resolution over the same extent (coarse
            voxel ``q`` covers image voxels ``2q, 2q + 1``): it is brought onto the image grid as
            ``F.interpolate(2 * disp, scale_factor=2, mode="trilinear", align_corners=False)`` would
            (:func:`upsample2_channels_last`) inside the sampling grid, measured 1.3x faster forward and
            backward at 1 mm than resampling the field first.

    Returns:
        ``(B, C, D, H, W)`` (the region's size with ``region``).
    """
    _check_displacement(disp)
    if coarser not in (1, 2):
        raise ValueError(f"expected coarser 1 or 2, got {coarser!r}")
    full = tuple(image.shape[2:]) if (region is not None or coarser != 1) else tuple(disp.shape[2:])
    expected = tuple(len(range(*r.indices(n))) for r, n in zip(region, full)) if region is not None else full
    given = expected if coarser == 1 else tuple(n // 2 for n in full)
    if (image.dim() != 5 or tuple(image.shape[2:]) != full or tuple(disp.shape[2:]) != given
            or any(n % coarser for n in full)):
        raise ValueError(f"expected an image (B, C, {', '.join(str(n * coarser) for n in disp.shape[2:])}) or a region "
                         f"of its size, got {tuple(image.shape)}")
    dtype = torch.promote_types(disp.dtype, torch.float32) if disp.dtype == torch.float16 else disp.dtype
    grid = identity_grid(full, disp.device, dtype)
    if region is not None:
        grid = grid[(slice(None),) + tuple(region)]  # (1, d, h, w, 3): the region's voxels
    scale = voxel_to_normalised_scale(full, disp.device, dtype)
    if coarser == 1:
        # (B, 3, D, H, W) in (d, h, w) -> (B, D, H, W, 3) in (x, y, z): flip the component axis
        offsets = disp.to(dtype).flip(1).permute(0, 2, 3, 4, 1)
        sample_at = torch.addcmul(grid, offsets, scale)
    else:
        # on the coarse grid (8x fewer voxels): flip to (x, y, z), coarse voxels -> normalised units of
        # the image grid (one coarse voxel = 2 image voxels), channels last (B, d, h, w, 3); then upsample
        coarse = (disp.to(dtype).flip(1) * (scale * coarser).view(1, 3, 1, 1, 1)).permute(0, 2, 3, 4, 1).contiguous()
        offsets = upsample2_channels_last(coarse)  # (B, D, H, W, 3)
        if region is not None:
            offsets = offsets[(slice(None),) + tuple(region)]
        sample_at = grid + offsets
    if image.shape[0] == 1 and disp.shape[0] > 1:
        image = image.expand(disp.shape[0], *image.shape[1:])
    options = dict(mode=mode, padding_mode=padding_mode, align_corners=True)
    if image.device.type == "cpu":
        return _grid_sample_cpu_parallel(image.to(dtype), sample_at, **options)
    return F.grid_sample(image.to(dtype), sample_at, **options)


def compose(outer: torch.Tensor, inner: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Displacement of "apply ``inner``, then ``outer``": ``u(p) = inner(p) + outer(p + inner(p))``.

    This is the paper's composition ``phi o delta-phi`` (Eq. 11) with ``outer = phi`` (the
    upsampled coarse flow) and ``inner = delta-phi`` (the residual). The authors sample ``outer``
    with zero padding, which is the default here for parity.
    """
    return warp(outer, inner, padding_mode=padding_mode) + inner


def upsample_displacement(disp: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Flow rescaling ``up_2x`` of Eq. 11: ``interpolate(factor * u)``, trilinear, aligned corners.

    Faithful to the authors' code (values multiplied by exactly ``factor`` and corners aligned),
    which is what their weights were trained with.
    """
    _check_displacement(disp)
    return F.interpolate(disp * factor, scale_factor=factor, mode="trilinear", align_corners=True)


def resize_displacement(disp: torch.Tensor, size: Tuple[int, int, int]) -> torch.Tensor:
    """Resample a displacement to another grid over the same extent (aligned corners), rescaling
    each component by ``(new_n - 1) / (old_n - 1)`` so it stays in voxels of the new grid."""
    _check_displacement(disp)
    old = disp.shape[2:]
    factors = [(n - 1) / (o - 1) if o > 1 else 1.0 for n, o in zip(size, old)]
    scale = torch.tensor(factors, device=disp.device, dtype=disp.dtype).view(1, 3, 1, 1, 1)
    return F.interpolate(disp, size=tuple(size), mode="trilinear", align_corners=True) * scale


def change_scale(field: torch.Tensor, from_scale: float, to_scale: float, size: Sequence[int]) -> torch.Tensor:
    """Resample a field ``(B, 3, D, H, W)`` from one level grid to another of ``size`` over the same
    extent, in voxels of the new grid. ``scale`` is a grid's spacing relative to a reference grid
    (the network grid): level voxel ``q`` covers reference voxels ``scale * q .. scale * (q + 1)``
    (cell-centred, ``align_corners=False``, :func:`..pipeline.geometry.level_grid`), so the values are
    multiplied by ``from_scale / to_scale``."""
    _check_displacement(field)
    if tuple(field.shape[2:]) == tuple(size) and from_scale == to_scale:
        return field
    return F.interpolate(field, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False) * (
        from_scale / to_scale)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: displacement of ``exp(v)`` for a stationary velocity field ``v``
    ``(B, 3, D, H, W)`` (voxels). The result is diffeomorphic for smooth enough ``v``."""
    disp = velocity / (2 ** steps)
    for _ in range(steps):
        disp = disp + warp(disp, disp, padding_mode="border")
    return disp
