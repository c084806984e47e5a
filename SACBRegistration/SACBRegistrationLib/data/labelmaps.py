"""SynthMorph-style synthesis: random smooth label maps and images drawn from them.

Hoffmann et al., "SynthMorph: learning contrast-invariant registration without acquired
images", IEEE TMI 2022. Label maps are the argmax of smooth random fields; images give every
label a random mean and spread, then blur, bias field, noise and gamma. Registration trained on
such pairs cannot rely on any particular contrast.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from ..spatial.warping import warp
from .deformations import random_diffeomorphism, smooth_noise_field
from .intensity import augment, rescale


def random_label_map(shape: Sequence[int], labels: int, generator: torch.Generator,
                     control_spacing: int = 6) -> torch.Tensor:
    """``(1, 1, D, H, W)`` int64 map: argmax of ``labels`` smooth noise fields, deformed once more
    by a random diffeomorphism for irregular shapes."""
    fields = smooth_noise_field(shape, labels, control_spacing, 1.0, generator)
    fields = warp(fields, random_diffeomorphism(shape, generator, max_std=4.0), padding_mode="border")
    return fields.argmax(1, keepdim=True)


def image_from_labels(label_map: torch.Tensor, labels: int, generator: torch.Generator) -> torch.Tensor:
    """``(1, 1, D, H, W)`` image in [0, 1]: per-label random intensity and noise level, then blur,
    bias field, noise and gamma."""
    means = torch.rand(labels, generator=generator)
    spreads = torch.rand(labels, generator=generator) * 0.1
    noise = torch.randn(label_map.shape, generator=generator)
    image = means[label_map] + spreads[label_map] * noise
    return augment(rescale(image), generator)


def synth_pair(shape: Sequence[int], labels: int, generator: torch.Generator, max_std: float = 3.0
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(moving, fixed, moving_labels, fixed_labels)``: one random label map seen through two
    random deformations, each with its own random contrast."""
    base = random_label_map(shape, labels, generator).float()
    maps = [warp(base, random_diffeomorphism(shape, generator, max_std), mode="nearest", padding_mode="border").long()
            for _ in range(2)]
    images = [image_from_labels(m, labels, generator) for m in maps]
    return images[0], images[1], maps[0], maps[1]
