"""Instance optimisation: levels that keep paying, the diffeomorphic option, MIND, masks, presets."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from SACBRegistrationLib.metrics import negative_jacobian_percent
from SACBRegistrationLib.pipeline import RegistrationOptions
from SACBRegistrationLib.pipeline.instance_optimisation import change_scale, instance_optimise
from SACBRegistrationLib.pipeline.presets import PRESETS, IOLevel, IOSettings
from SACBRegistrationLib.spatial.warping import integrate_velocity, warp


def texture(n: int, sigma: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.random((n, n, n)), sigma)
    volume = (volume - volume.min()) / (volume.max() - volume.min())
    return torch.tensor(volume, dtype=torch.float32)[None, None]


def smooth_displacement(n: int, sigma: float, amplitude: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    u = ndimage.gaussian_filter(rng.standard_normal((3, n, n, n)), (0, sigma, sigma, sigma))
    return torch.tensor(u / np.abs(u).max() * amplitude, dtype=torch.float32)[None]


def pooled_levels(fixed: torch.Tensor, moving: torch.Tensor, mask=None, network_factor: int = 2):
    """``images_at`` for images given at twice the network grid's resolution (1 mm images, 2 mm model)."""
    def at(scale):
        k = int(network_factor * scale)
        pool = (lambda t: F.avg_pool3d(t, k)) if k > 1 else (lambda t: t)
        return pool(fixed), pool(moving), None if mask is None else (pool(mask) > 0.5).float()
    return at


def settings(levels, **kw) -> IOSettings:
    return IOSettings(levels=tuple(IOLevel(float(s), int(n)) for s, n in levels), **kw)


def to_fine(field: torch.Tensor, n: int) -> torch.Tensor:
    """A field on the network grid (2 mm) in 1 mm voxels on the ``n^3`` image grid."""
    return change_scale(field, 1.0, 0.5, (n, n, n))


def test_multi_level_halves_the_error_of_the_coarse_only_variant():
    # a known smooth deformation of a 1 mm image (detail at ~4 mm) and a 2 mm network grid that
    # predicted nothing: the 4 mm level alone cannot express it, the levels down to 1 mm can (the
    # 1 mm level compares the images at 1 mm, its field stays on the 2 mm grid)
    n = 48
    fixed = texture(n, 1.5, 0)
    truth = smooth_displacement(n, 4.0, 2.5, 1)
    moving = warp(fixed, -truth)  # fixed(x) ~ moving(x + truth(x)) for a small, smooth truth
    start = torch.zeros(1, 3, n // 2, n // 2, n // 2)
    inside = (0, slice(None)) + (slice(6, -6),) * 3

    def error(levels):
        field, _ = instance_optimise(pooled_levels(fixed, moving), start, settings(levels, smoothness=0.5))
        assert field.shape == start.shape  # returned on the network grid
        return float((to_fine(field, n) - truth).norm(dim=1, keepdim=True)[inside].mean())

    coarse, network, multi = error(((2, 100),)), error(((2, 100), (1, 100))), error(((2, 100), (1, 100), (0.5, 100)))
    assert multi < 0.5 * coarse, (multi, coarse)
    # comparing at 1 mm pays even though the field stays on the 2 mm grid (measured 0.125 vs 0.23)
    assert multi < 0.7 * network, (multi, network)


def test_velocity_transform_does_not_fold_where_the_displacement_does():
    # a large smooth diffeomorphism (velocity up to 6 voxels on a 32^3 grid)
    n = 32
    fixed = texture(n, 1.5, 2)
    truth = integrate_velocity(smooth_displacement(n, 3.0, 6.0, 9))
    assert negative_jacobian_percent(truth[0].numpy()) == 0.0
    moving = warp(fixed, -truth)
    start = torch.zeros(1, 3, n, n, n)
    images = pooled_levels(fixed, moving, network_factor=1)
    common = dict(smoothness=0.5, lr=0.2, patience=1000)
    disp, _ = instance_optimise(images, start, settings(((2, 60), (1, 60)), transform="displacement", **common))
    velo, _ = instance_optimise(images, start, settings(((2, 60), (1, 60)), transform="velocity", **common))
    assert negative_jacobian_percent(disp[0].numpy()) > 0.1
    assert negative_jacobian_percent(velo[0].numpy()) == 0.0
    assert float(velo.abs().max()) > 2.0  # it did follow the deformation


def test_mind_aligns_a_pair_of_different_contrasts_where_local_ncc_does_not():
    # three tissues; the moving image maps them to unrelated grey levels (not a monotonic map)
    n = 40
    rng = np.random.default_rng(4)
    labels = np.digitize(ndimage.gaussian_filter(rng.random((n, n, n)), 2.0), [0.48, 0.52])
    fixed_lut, moving_lut = np.array([0.1, 0.5, 0.9]), np.array([0.5, 0.9, 0.1])
    fixed = torch.tensor(ndimage.gaussian_filter(fixed_lut[labels], 0.7), dtype=torch.float32)[None, None]
    other = torch.tensor(ndimage.gaussian_filter(moving_lut[labels], 0.7), dtype=torch.float32)[None, None]
    truth = smooth_displacement(n, 5.0, 2.0, 5)
    moving = warp(other, -truth)
    start = torch.zeros(1, 3, n, n, n)
    images = pooled_levels(fixed, moving, network_factor=1)
    inside = (0, slice(None)) + (slice(5, -5),) * 3

    def error(similarity):
        field, _ = instance_optimise(images, start, settings(((2, 80), (1, 80)), similarity=similarity, smoothness=1.0))
        return float((field - truth).norm(dim=1, keepdim=True)[inside].mean())

    before = float(truth.norm(dim=1, keepdim=True)[inside].mean())
    mind, lncc = error("mind"), error("lncc")
    assert mind < 0.6 * before, (mind, before)
    assert mind < 0.8 * lncc, (mind, lncc)


def test_a_mask_restricts_where_the_images_are_compared():
    # the images differ only by a shift of the half outside the mask: with the mask nothing moves
    n = 32
    fixed = texture(n, 1.5, 6)
    shifted = torch.roll(fixed, 2, dims=4)
    moving = fixed.clone()
    moving[..., n // 2:, :, :] = shifted[..., n // 2:, :, :]
    mask = torch.zeros_like(fixed)
    mask[..., : n // 2 - 4, :, :] = 1
    start = torch.zeros(1, 3, n, n, n)
    common = settings(((1, 60),), smoothness=0.1)
    masked, _ = instance_optimise(pooled_levels(fixed, moving, mask, network_factor=1), start, common)
    free, _ = instance_optimise(pooled_levels(fixed, moving, None, network_factor=1), start, common)
    far = (0, 2, slice(n // 2 + 4, None))  # the w component deep in the shifted half
    assert float(free[far].abs().mean()) > 0.5
    assert float(masked[far].abs().mean()) < 0.25 * float(free[far].abs().mean())


def test_presets_resolve_to_their_documented_options_and_explicit_values_win():
    for quality, values in PRESETS.items():
        resolved = RegistrationOptions(quality=quality).resolved()
        assert resolved.affine == values["affine"] and resolved.io_transform == values["io_transform"]
        assert tuple(resolved.io_levels) == values["io_levels"]
        assert resolved.io_steps == sum(steps for _, steps in values["io_levels"])
        assert resolved.io_integration_steps == values["io_integration_steps"]
        assert resolved.io_settings("lncc").integration_steps == values["io_integration_steps"]
    assert RegistrationOptions().resolved().quality == "balanced"  # the default
    assert RegistrationOptions(io_integration_steps=9).resolved().io_settings("lncc").integration_steps == 9
    explicit = RegistrationOptions(quality="accurate", affine="off", io_transform="displacement", io_steps=7).resolved()
    assert explicit.affine == "off" and explicit.io_transform == "displacement"
    assert [steps for _, steps in explicit.io_levels] == [7] * len(PRESETS["accurate"]["io_levels"])
    assert RegistrationOptions(io_steps=0).resolved().io_levels == ()
    assert RegistrationOptions(quality="fast", io_steps=30).resolved().io_levels == ((1.0, 30),)  # network grid


@pytest.mark.parametrize("bad, message", [
    ({"quality": "best"}, "expected quality"), ({"clusters": True}, "expected clusters"),
    ({"io_lr": float("nan")}, "expected io_lr"), ({"io_levels": ((3, 10),)}, "expected a level scale"),
    ({"similarity": "ncc"}, "expected similarity"), ({"io_transform": "bspline"}, "expected io_transform"),
    ({"io_regulariser": "tv"}, "expected io_regulariser"), ({"threads": 0}, "expected threads"),
    ({"io_integration_steps": 0}, "expected io_integration_steps"), ({"io_integration_steps": 2.5}, "expected io_integration"),
])
def test_bad_options_are_refused_up_front(bad, message):
    with pytest.raises(ValueError, match=message):
        RegistrationOptions(**bad).resolved()


def test_early_stop_ends_a_level_that_no_longer_improves():
    n = 16
    fixed = texture(n, 1.5, 7)
    field, report = instance_optimise(pooled_levels(fixed, fixed.clone(), network_factor=1), torch.zeros(1, 3, n, n, n),
                                      settings(((1, 500),), patience=5))
    assert report.levels[0]["steps"] < 50 and float(field.abs().max()) < 0.05


@pytest.mark.parametrize("with_mask", [False, True])
def test_local_ncc_inside_the_fixed_images_box_is_the_whole_grid_loss(with_mask):
    # a fixed image with an empty (zero) background around an off-centre box: the loss and its
    # gradient computed inside the box equal those over the whole grid
    from SACBRegistrationLib.losses.functional import local_ncc
    from SACBRegistrationLib.pipeline.instance_optimisation import _local_ncc_of, similarity_region

    n = 28
    fixed = torch.zeros(1, 1, n, n, n, dtype=torch.float64)
    fixed[..., 4:15, 9:20, 6:24] = texture(n, 1.5, 7).double()[..., 4:15, 9:20, 6:24]
    moving = texture(n, 1.5, 8).double()
    mask = (torch.rand(1, 1, n, n, n, generator=torch.Generator().manual_seed(1)) > 0.4).double() if with_mask else None
    region = similarity_region(fixed, 5)
    assert region == (slice(0, 19), slice(5, 24), slice(2, 28))
    disp = (smooth_displacement(n, 3.0, 2.0, 3).double()).requires_grad_(True)
    loss = _local_ncc_of(fixed, moving, mask, 5)
    boxed = loss(disp, 1)
    (grad_boxed,) = torch.autograd.grad(boxed, disp)
    whole = local_ncc(fixed, warp(moving, disp), 5, mask=mask)
    (grad_whole,) = torch.autograd.grad(whole, disp)
    assert torch.allclose(boxed, whole, rtol=1e-12, atol=1e-15), (float(boxed), float(whole))
    assert torch.allclose(grad_boxed, grad_whole, rtol=1e-9, atol=1e-15)
    assert float(grad_whole.abs().max()) > 0
    # a field on a grid of half the resolution (a finer level's): upsampled inside the warp
    coarse = (F.avg_pool3d(disp.detach(), 2) / 2).requires_grad_(True)
    boxed = loss(coarse, 2)
    (grad_boxed,) = torch.autograd.grad(boxed, coarse)
    whole = local_ncc(fixed, warp(moving, 2 * F.interpolate(coarse, scale_factor=2, mode="trilinear")), 5, mask=mask)
    (grad_whole,) = torch.autograd.grad(whole, coarse)
    assert torch.allclose(boxed, whole, rtol=1e-12, atol=1e-15), (float(boxed), float(whole))
    assert torch.allclose(grad_boxed, grad_whole, rtol=1e-9, atol=1e-15)
    assert similarity_region(moving.float(), 5) is None  # no empty background: the whole grid
