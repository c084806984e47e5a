"""Datasets of registration pairs for training, generated on the fly and deterministic.

Each item is a dict with ``moving``, ``fixed`` ``(1, D, H, W)`` float images in [0, 1] and,
when labels exist, ``moving_labels``, ``fixed_labels`` ``(1, D, H, W)`` int64; template pairs
also carry ``identical`` (a float32 scalar, 1 when the moving image is the fixed subject itself). Item ``i`` of a
dataset built with seed ``s`` is always the same, whichever worker process makes it.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..spatial.warping import compose, warp
from ..vocabulary import PAIR_MODES
from .deformations import random_affine_displacement, random_diffeomorphism
from .intensity import augment, gaussian_noise
from .labelmaps import synth_pair

IDENTICAL_MAX_NOISE = 0.02
"""Largest noise standard deviation (image range [0, 1]) between the two images of an identical pair."""


def item_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for item ``index`` of a dataset seeded with ``seed``."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2 ** 63 - 1))


class TemplatePairs(Dataset):
    """Pairs made from one template image and its labels (the MNI template by default).

    A synthetic subject is the template deformed by a small random affine map composed with a
    random stationary-velocity diffeomorphism, with random gamma, bias field, blur and noise
    (and optionally contrast inversion); labels are warped along (nearest neighbour).

    Args:
        image: ``(D, H, W)`` template in [0, 1]; labels: ``(D, H, W)`` integer labels or None.
        length: number of items.
        seed: base seed.
        mode: ``"atlas-to-subject"`` (moving = the template, fixed = a subject, as the paper's
            IXI set-up) or ``"subject-to-subject"`` (both subjects, as LPBA).
        max_std: largest velocity standard deviation (voxels).
        affine: include the random affine part.
        invert_probability: chance of a contrast inversion per subject.
        identical_probability: chance that the moving image is the fixed subject itself, with
            at most independent noise (the network must then predict the identity: a model
            trained without such pairs moves an image registered to itself).
        control_spacing: voxels between the random velocity's control points.
        coarsening: integrate the random velocity on a grid this many times coarser
            (:func:`.deformations.random_diffeomorphism`; for large grids).
    """

    def __init__(self, image: np.ndarray, labels: Optional[np.ndarray], length: int, seed: int = 0,
                 mode: str = "subject-to-subject", max_std: float = 3.0, affine: bool = True,
                 invert_probability: float = 0.0, identical_probability: float = 0.0,
                 control_spacing: int = 8, coarsening: int = 1) -> None:
        if mode not in PAIR_MODES:
            raise ValueError(f"expected mode in {PAIR_MODES}, got {mode!r}")
        if not 0.0 <= identical_probability <= 1.0:
            raise ValueError(f"expected identical_probability in [0, 1], got {identical_probability!r}")
        self.identical_probability = float(identical_probability)
        self.image = torch.as_tensor(np.asarray(image, np.float32))[None, None]
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels, np.int64))[None, None]
        self.length, self.seed, self.mode = int(length), int(seed), mode
        self.max_std, self.affine, self.invert_probability = max_std, affine, invert_probability
        self.control_spacing = int(control_spacing)  # voxels between the random velocity's control points
        self.coarsening = int(coarsening)  # the velocity integrated on a grid this many times coarser

    def __len__(self) -> int:
        return self.length

    def _subject(self, generator: torch.Generator):
        shape = self.image.shape[2:]
        disp = random_diffeomorphism(shape, generator, self.max_std, self.control_spacing, self.coarsening)
        if self.affine:
            disp = compose(random_affine_displacement(shape, generator), disp, padding_mode="border")
        image = augment(warp(self.image, disp), generator, self.invert_probability)
        labels = None
        if self.labels is not None:
            labels = warp(self.labels.float(), disp, mode="nearest").long()
        return image, labels

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        generator = item_generator(self.seed, index)
        fixed, fixed_labels = self._subject(generator)
        identical = float(torch.rand(1, generator=generator)) < self.identical_probability
        if identical:
            # the same subject twice; independent noise of at most IDENTICAL_MAX_NOISE
            moving = (gaussian_noise(fixed, generator, IDENTICAL_MAX_NOISE)).clamp(0, 1)
            moving_labels = fixed_labels
        elif self.mode == "subject-to-subject":
            moving, moving_labels = self._subject(generator)
        else:
            moving, moving_labels = self.image.clone(), self.labels
        item = {"moving": moving[0], "fixed": fixed[0], "identical": torch.tensor(float(identical))}
        if self.labels is not None:
            item["moving_labels"], item["fixed_labels"] = moving_labels[0], fixed_labels[0]
        return item


class SynthPairs(Dataset):
    """SynthMorph-style pairs of random label maps with random contrasts (no data needed)."""

    def __init__(self, shape: Sequence[int], length: int, seed: int = 0, labels: int = 16,
                 max_std: float = 3.0) -> None:
        self.shape, self.length, self.seed = tuple(int(s) for s in shape), int(length), int(seed)
        self.labels, self.max_std = int(labels), max_std

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        moving, fixed, moving_labels, fixed_labels = synth_pair(self.shape, self.labels,
                                                                item_generator(self.seed, index), self.max_std)
        return {"moving": moving[0], "fixed": fixed[0], "moving_labels": moving_labels[0],
                "fixed_labels": fixed_labels[0]}


class MixedPairs(Dataset):
    """Item ``i`` comes from one of several datasets, chosen with the given weights by a seeded
    draw (deterministic). All datasets must make items of one shape."""

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float], length: int, seed: int = 0) -> None:
        if len(datasets) != len(weights) or not datasets or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"expected one non-negative weight per dataset, got {list(weights)}")
        self.datasets, self.length, self.seed = list(datasets), int(length), int(seed)
        self.weights = torch.tensor(weights, dtype=torch.float64)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        generator = item_generator(self.seed + 7919, index)
        which = int(torch.multinomial(self.weights, 1, generator=generator))
        source = self.datasets[which]
        inner = int(torch.randint(len(source), (1,), generator=generator))
        return source[inner]


class WithSimilarityWeight(Dataset):
    """Adds ``similarity_weight`` (a float32 scalar tensor) to every item of ``dataset``: the
    weight of the intensity similarity (NCC) term for that item. 0 for sources whose two images
    have unrelated contrasts (SynthMorph-style pairs), which only a label loss can train. Items
    without an ``identical`` flag get 0, so that every source's items collate together."""

    def __init__(self, dataset: Dataset, weight: float) -> None:
        self.dataset, self.weight = dataset, torch.tensor(float(weight), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"identical": torch.tensor(0.0), **self.dataset[index], "similarity_weight": self.weight.clone()}
