"""MIND-SSC: the modality-independent neighbourhood descriptor with the self-similarity context
(Heinrich et al., MICCAI 2013), as used by Learn2Reg's instance-optimisation baselines.

Each voxel gets 12 numbers: for the 12 pairs of its six face neighbours that are sqrt(2) apart
(the edges of the octahedron they form), the patch distance between the two neighbours, turned
into ``exp(-distance / local variance)``. The descriptor depends on the local structure, not on
the intensities, so descriptors of a T1 and a T2 image (or MR and CT) of one anatomy agree.

Shapes: ``(B, 1, D, H, W)`` image in, ``(B, 12, D, H, W)`` descriptor out.
"""

from __future__ import annotations

import itertools
from typing import List, Tuple

import torch
import torch.nn.functional as F

MIND_CHANNELS = 12
VARIANCE_CLAMP = (1e-3, 1e3)
"""Local variance clamped to these multiples of its mean (stops division by ~0 in flat regions)."""

_NEIGHBOURS: List[Tuple[int, int, int]] = [(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)]


def ssc_pairs() -> List[Tuple[Tuple[int, int, int], Tuple[int, int, int]]]:
    """The 12 pairs of face-neighbour offsets at squared distance 2 (orthogonal neighbours)."""
    return [(a, b) for a, b in itertools.combinations(_NEIGHBOURS, 2)
            if sum((x - y) ** 2 for x, y in zip(a, b)) == 2]


def _shifted(padded: torch.Tensor, offset: Tuple[int, int, int], pad: int, shape) -> torch.Tensor:
    """``image[p + offset]`` for every voxel ``p`` of ``shape``, read from an image padded by ``pad``."""
    d, h, w = (pad + o for o in offset)
    return padded[:, :, d:d + shape[0], h:h + shape[1], w:w + shape[2]]


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor of ``image`` (``(B, 1, D, H, W)`` -> ``(B, 12, D, H, W)``).

    ``dilation``: distance (voxels) of the neighbours; ``radius``: half-size of the box over which
    squared differences are averaged (the patch).
    """
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"expected an image of shape (B, 1, D, H, W), got {tuple(image.shape)}")
    shape = image.shape[2:]
    padded = F.pad(image, (dilation,) * 6, mode="replicate")
    # squared difference of the two neighbours of every pair: (B, 12, D, H, W)
    differences = torch.cat([(_shifted(padded, tuple(dilation * x for x in a), dilation, shape)
                              - _shifted(padded, tuple(dilation * x for x in b), dilation, shape)) ** 2
                             for a, b in ssc_pairs()], dim=1)
    # patch distance: box mean over (2 radius + 1)^3, edges replicated
    kernel = 2 * radius + 1
    distance = F.avg_pool3d(F.pad(differences, (radius,) * 6, mode="replicate"), kernel, stride=1)
    # normalise: subtract the smallest distance, divide by the local variance (mean over the 12)
    distance = distance - distance.min(dim=1, keepdim=True).values
    variance = distance.mean(dim=1, keepdim=True)
    mean_variance = variance.mean()
    variance = variance.clamp(mean_variance * VARIANCE_CLAMP[0], mean_variance * VARIANCE_CLAMP[1])
    return torch.exp(-distance / variance)
