"""Synthetic training data: diffeomorphisms, augmentation, label maps, deterministic pairs."""

import numpy as np
import torch

from SACBRegistrationLib.data.deformations import random_affine_displacement, random_diffeomorphism
from SACBRegistrationLib.data.intensity import augment
from SACBRegistrationLib.data.labelmaps import random_label_map, synth_pair
from SACBRegistrationLib.data.pairs import MixedPairs, SynthPairs, TemplatePairs
from SACBRegistrationLib.metrics import negative_jacobian_percent


def g(seed):
    return torch.Generator().manual_seed(seed)


def test_random_diffeomorphisms_do_not_fold():
    for seed in range(3):
        disp = random_diffeomorphism((32, 36, 28), g(seed), max_std=4.0)
        assert disp.abs().max() > 0.5
        assert negative_jacobian_percent(disp[0].numpy()) == 0.0


def test_affine_displacement_is_affine():
    disp = random_affine_displacement((10, 12, 14), g(0))[0].numpy()
    # second differences of an affine map vanish
    assert np.abs(np.diff(disp, 2, axis=1)).max() < 1e-4 and np.abs(np.diff(disp, 2, axis=3)).max() < 1e-4


def test_augmentation_stays_in_range_and_is_seeded():
    image = torch.rand(1, 1, 16, 16, 16)
    a, b = augment(image, g(1), 0.5), augment(image, g(1), 0.5)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1


def test_label_maps_and_synth_pairs():
    labels = random_label_map((24, 24, 24), 6, g(2))
    assert labels.dtype == torch.int64 and int(labels.max()) < 6 and len(labels.unique()) >= 4
    moving, fixed, ml, fl = synth_pair((24, 24, 24), 6, g(3))
    assert moving.shape == fixed.shape == (1, 1, 24, 24, 24) and not torch.equal(ml, fl)


def test_pairs_are_deterministic_per_index():
    image = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    labels = (image > 0.5).astype(np.int64)
    for dataset in (TemplatePairs(image, labels, 10, seed=3), SynthPairs((16, 16, 16), 10, seed=4, labels=3),
                    MixedPairs([TemplatePairs(image, labels, 10), SynthPairs((16, 16, 16), 10, labels=3)], [1, 1], 10)):
        first, again, other = dataset[2], dataset[2], dataset[3]
        assert all(torch.equal(first[k], again[k]) for k in first)
        assert not torch.equal(first["fixed"], other["fixed"])
        assert first["moving"].shape == (1, 16, 16, 16) and first["moving_labels"].dtype == torch.int64


def test_atlas_to_subject_keeps_the_atlas_as_moving_image():
    image = np.random.default_rng(1).random((16, 16, 16)).astype(np.float32)
    item = TemplatePairs(image, None, 4, mode="atlas-to-subject")[0]
    assert torch.equal(item["moving"][0], torch.from_numpy(image))
