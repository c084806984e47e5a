"""Training pairs for the fine pass: what the network sees in its second run at twice its resolution.

At inference the fine pass (:func:`..networks.symmetric.half_way_velocity`) runs the network on the
two images warped half-way along its first, coarse answer. :class:`HalfWayPairs` makes those
inputs from pairs generated on the fine grid: the pair is average-pooled to the network grid, a
frozen first-pass network gives its symmetric velocity ``v`` there, ``exp(v / 2)`` and
``exp(-v / 2)`` are integrated there and resampled to the fine grid
(:func:`..spatial.warping.change_scale`), and the moving image (and its labels) is warped by the
first, the fixed one by the second. A window of ``crop`` voxels at a random place
(the same for both images) keeps a training step affordable on a CPU: the network is fully
convolutional, and its k-means clusters are computed per image.

Shapes: items as in :mod:`..data.pairs` (``(1, D, H, W)`` images and labels), on the crop.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.pairs import item_generator
from ..networks.symmetric import symmetric_velocity
from ..pipeline.presets import PRESETS
from ..spatial.warping import change_scale, integrate_velocity, warp

INTEGRATION_STEPS = int(PRESETS["fast"]["io_integration_steps"])
"""Squarings of the half velocities: the network-alone preset's."""

CROP_SEED_OFFSET = 7919
"""Added to the dataset seed for the crop positions (independent of the pair's own random draws)."""


class HalfWayPairs(Dataset):
    """``pairs`` (a dataset on the fine grid, whose shape is ``1 / scale`` times the network grid's)
    warped half-way along ``first_pass``'s symmetric answer on the network grid, cropped to ``crop``.

    Args:
        pairs: items with ``moving`` / ``fixed`` ``(1, D, H, W)`` and optionally labels, on the fine grid.
        first_pass: the frozen network of the first pass (kept in eval mode, run without gradients).
        scale: the fine grid's spacing relative to the network grid (:data:`..pipeline.presets.FINE_PASS_SCALE`).
        crop: ``(d, h, w)`` window on the fine grid, each a multiple of 16 and at most the grid's size.
        seed: base seed of the crop positions.
    """

    def __init__(self, pairs: Dataset, first_pass: nn.Module, scale: float, crop: Sequence[int], seed: int) -> None:
        factor = round(1.0 / scale)
        if factor < 2 or abs(factor * scale - 1.0) > 1e-6:
            raise ValueError(f"expected a scale 1/n for an integer n >= 2, got {scale}")
        self.pairs, self.scale, self.factor, self.seed = pairs, float(scale), factor, int(seed)
        self.crop = tuple(int(c) for c in crop)
        self.first_pass = first_pass.eval()
        for parameter in self.first_pass.parameters():
            parameter.requires_grad_(False)

    def __len__(self) -> int:
        return len(self.pairs)

    def half_way_maps(self, moving: torch.Tensor, fixed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(exp(v / 2), exp(-v / 2))`` as displacements ``(1, 3, D, H, W)`` in fine-grid voxels, for
        the first pass's symmetric velocity ``v`` of ``(1, 1, D, H, W)`` fine-grid images. The two
        half velocities are integrated on the network grid and the maps resampled (8 times fewer
        voxels to square than the fine grid; the fields are smooth at that scale)."""
        coarse_moving = F.avg_pool3d(moving, self.factor)  # (1, 1, D/n, H/n, W/n): the network grid
        coarse_fixed = F.avg_pool3d(fixed, self.factor)
        velocity, _ = symmetric_velocity(self.first_pass, coarse_moving, coarse_fixed)  # (1, 3, D/n, H/n, W/n)
        size = moving.shape[2:]
        return tuple(change_scale(integrate_velocity(sign * velocity / 2, INTEGRATION_STEPS), 1.0, self.scale, size)
                     for sign in (1.0, -1.0))

    def window(self, index: int, shape: Sequence[int]) -> tuple:
        """The crop of item ``index`` as slices of a ``(..., D, H, W)`` tensor."""
        if any(c > s for c, s in zip(self.crop, shape)):
            raise ValueError(f"expected a crop of at most the fine grid {tuple(shape)}, got {self.crop}")
        generator = item_generator(self.seed + CROP_SEED_OFFSET, index)
        starts = [int(torch.randint(0, s - c + 1, (1,), generator=generator)) for c, s in zip(self.crop, shape)]
        return (Ellipsis,) + tuple(slice(a, a + c) for a, c in zip(starts, self.crop))

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        item = dict(self.pairs[index])
        moving, fixed = item["moving"][None], item["fixed"][None]  # (1, 1, D, H, W) on the fine grid
        with torch.no_grad():
            # pull-back warps half-way: the moving image forward along v, the fixed one backward
            half, back = self.half_way_maps(moving, fixed)
            window = self.window(index, moving.shape[2:])
            item["moving"] = warp(moving, half)[0][window]  # (1, d, h, w)
            item["fixed"] = warp(fixed, back)[0][window]
            if "moving_labels" in item:
                item["moving_labels"] = warp(item["moving_labels"][None].float(), half, mode="nearest")[0].long()[window]
                item["fixed_labels"] = warp(item["fixed_labels"][None].float(), back, mode="nearest")[0].long()[window]
        return item
