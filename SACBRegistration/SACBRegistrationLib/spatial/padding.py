"""Padding volumes to the network's size multiple and cropping results back."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from ..vocabulary import SIZE_MULTIPLE


def padding_for(shape: Sequence[int], multiple: int = SIZE_MULTIPLE) -> Tuple[Tuple[int, int], ...]:
    """``((before, after), ...)`` per spatial axis making every size a positive multiple of
    ``multiple``, split as evenly as possible (the extra voxel goes after)."""
    if multiple < 1:
        raise ValueError(f"expected a positive multiple, got {multiple}")
    pads = []
    for size in shape:
        target = max(multiple, -(-int(size) // multiple) * multiple)
        extra = target - int(size)
        pads.append((extra // 2, extra - extra // 2))
    return tuple(pads)


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE, mode: str = "constant", value: float = 0.0
                    ) -> Tuple[torch.Tensor, Tuple[slice, ...]]:
    """Pad the spatial axes of ``x`` ``(B, C, D, H, W)``; return the padded tensor and the
    slices ``(slice(None), slice(None), d, h, w)`` that crop a same-grid result back."""
    if x.dim() != 5:
        raise ValueError(f"expected (B, C, D, H, W), got {tuple(x.shape)}")
    pads = padding_for(x.shape[2:], multiple)
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants (w_lo, w_hi, h_lo, h_hi, d_lo, d_hi)
    padded = F.pad(x, flat, mode=mode, value=value) if mode == "constant" else F.pad(x, flat, mode=mode)
    crop = (slice(None), slice(None)) + tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, x.shape[2:]))
    return padded, crop
