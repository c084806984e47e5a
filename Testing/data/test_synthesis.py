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
    shape = (10, 12, 14)
    disp = random_affine_displacement(shape, g(0))[0].double().numpy().reshape(3, -1)
    # least-squares fit of u(p) = L (p - c) + t about the centre c: an affine map leaves no residual
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    centred = grid - np.array([(n - 1) / 2 for n in shape])[:, None]
    design = np.concatenate([centred, np.ones((1, centred.shape[1]))]).T  # (V, 4)
    solution, *_ = np.linalg.lstsq(design, disp.T, rcond=None)
    linear, translation = solution[:3].T, solution[3]
    assert np.abs(design @ solution - disp.T).max() < 1e-5
    # within the documented ranges (6 degrees, 6% scale, 3% shear: |L| well under 0.25; +-3 voxels),
    # and not the identity
    assert np.abs(translation).max() <= 3.0 and np.abs(linear).max() < 0.25
    assert np.abs(linear).max() > 1e-3 and np.abs(disp).max() > 0.5
    assert not np.allclose(disp, random_affine_displacement(shape, g(1))[0].double().numpy().reshape(3, -1))


def test_augmentation_stays_in_range_and_is_seeded():
    image = torch.rand(1, 1, 16, 16, 16, generator=g(0))
    a, b = augment(image, g(1), 0.5), augment(image, g(1), 0.5)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    # it does change the image, differently for another seed, and fills the documented range
    assert (a - image).abs().mean() > 0.01
    assert (a - augment(image, g(2), 0.5)).abs().mean() > 0.01
    assert float(a.min()) == 0.0 and float(a.max()) == 1.0


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


def test_identical_pairs_are_flagged_and_every_source_collates():
    from torch.utils.data import default_collate

    from SACBRegistrationLib.data.pairs import WithSimilarityWeight
    image = np.random.default_rng(2).random((16, 16, 16)).astype(np.float32)
    labels = (image > 0.5).astype(np.int64)
    same = TemplatePairs(image, labels, 3, identical_probability=1.0)[0]
    other = TemplatePairs(image, labels, 3, identical_probability=0.0)[0]
    assert float(same["identical"]) == 1.0 and float(other["identical"]) == 0.0
    assert torch.equal(same["moving_labels"], same["fixed_labels"])
    assert float((same["moving"] - same["fixed"]).abs().max()) < 0.2  # noise only
    synth = WithSimilarityWeight(SynthPairs((16, 16, 16), 2, labels=3), 0.0)[0]
    assert float(synth["identical"]) == 0.0
    batch = default_collate([WithSimilarityWeight(TemplatePairs(image, labels, 3, identical_probability=1.0), 1.0)[0],
                             synth])
    assert batch["identical"].tolist() == [1.0, 0.0] and batch["similarity_weight"].tolist() == [1.0, 0.0]


def test_coarsened_diffeomorphism_is_the_same_field_made_faster():
    """``coarsening=2``: the same control-point draws integrated on a grid twice as coarse give
    (nearly) the field made on the full grid, in full-grid voxels; a coarsening that does not
    divide the control spacing is refused."""
    import pytest

    def field(coarsening):
        return random_diffeomorphism((48, 56, 48), torch.Generator().manual_seed(11), 6.0, 16, coarsening)
    full, coarse = field(1), field(2)
    assert full.shape == coarse.shape == (1, 3, 48, 56, 48)
    assert full.abs().mean() > 0.3  # a real deformation, not a near-identity draw
    assert (full - coarse).abs().mean() < 0.05 * full.abs().mean()
    with pytest.raises(ValueError, match="divides control_spacing"):
        random_diffeomorphism((32, 32, 32), torch.Generator(), 2.0, 8, 3)
