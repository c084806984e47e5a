"""The squared local NCC with a hand-written gradient (ops/local_ncc.py): gradcheck in float64, and
the same values and gradients as autograd through the plain formula (losses.local_ncc_map)."""

import pytest
import torch

from SACBRegistrationLib.losses.functional import local_ncc, local_ncc_map
from SACBRegistrationLib.ops.local_ncc import box_sum, fixed_window_stats, squared_local_ncc_sum


def _images(channels=1, dtype=torch.float64, seed=0, shape=(7, 8, 6)):
    generator = torch.Generator().manual_seed(seed)
    fixed = torch.rand(1, channels, *shape, generator=generator, dtype=dtype)
    warped = 0.6 * fixed + 0.4 * torch.rand(1, channels, *shape, generator=generator, dtype=dtype)
    weights = (torch.rand(1, 1, *shape, generator=generator) > 0.3).to(dtype) * 0.5
    return fixed, warped, weights


def test_box_sum_is_its_own_adjoint_and_a_cube_of_ones():
    x, y, _ = _images(channels=2, shape=(6, 7, 5))
    assert torch.allclose((box_sum(x, 3) * y).sum(), (x * box_sum(y, 3)).sum(), rtol=1e-12)
    kernel = torch.ones(2, 1, 3, 3, 3, dtype=x.dtype)
    assert torch.allclose(box_sum(x, 3), torch.nn.functional.conv3d(x, kernel, padding=1, groups=2), rtol=1e-12)


def test_fixed_window_stats_are_the_window_mean_and_variance_term():
    fixed, _, _ = _images(shape=(5, 5, 5))
    stats = fixed_window_stats(fixed, 3)
    centre = fixed[0, 0, 1:4, 1:4, 1:4]  # the window of voxel (2, 2, 2), fully inside
    assert float(stats[0, 0, 2, 2, 2]) == pytest.approx(float(centre.mean()), rel=1e-12)
    assert float(stats[0, 1, 2, 2, 2]) == pytest.approx(float(((centre - centre.mean()) ** 2).sum()), rel=1e-10)


@pytest.mark.parametrize("channels,weighted", [(1, False), (1, True), (2, True)])
def test_gradcheck_float64(channels, weighted):
    fixed, warped, weights = _images(channels)
    warped.requires_grad_(True)
    stats = fixed_window_stats(fixed, 3)
    w = weights if weighted else None
    assert torch.autograd.gradcheck(lambda t: squared_local_ncc_sum(fixed, t, 3, 1e-5, stats, w), (warped,))


@pytest.mark.parametrize("window", [3, 5])
def test_same_value_and_gradient_as_autograd_through_the_formula(window):
    fixed, warped, weights = _images(dtype=torch.float32, seed=4, shape=(12, 14, 10))
    for w in (None, weights):
        ours_in = warped.clone().requires_grad_(True)
        ours = squared_local_ncc_sum(fixed, ours_in, window, 1e-5, weights=w)
        ours.backward()
        ref_in = warped.clone().requires_grad_(True)
        values = local_ncc_map(fixed, ref_in, window)
        ref = (values if w is None else values * w).sum()
        ref.backward()
        assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
        assert torch.allclose(ours_in.grad, ref_in.grad, rtol=1e-3, atol=1e-5 * float(ref_in.grad.abs().max()))


def test_local_ncc_takes_the_written_gradient_only_for_a_constant_fixed_image():
    fixed, warped, weights = _images(dtype=torch.float64, seed=2)
    mask = weights > 0
    fast = local_ncc(fixed, warped, 3, mask=mask)
    reference = -(local_ncc_map(fixed, warped, 3) * mask).sum() / mask.sum()
    assert float(fast) == pytest.approx(float(reference), rel=1e-12)
    # with a fixed image that wants a gradient, autograd through the formula (both images differentiable)
    fixed.requires_grad_(True)
    local_ncc(fixed, warped, 3).backward()
    assert fixed.grad is not None and float(fixed.grad.abs().sum()) > 0
    # an empty mask gives the plain mean, as masked_mean does
    empty = torch.zeros_like(mask)
    assert float(local_ncc(fixed.detach(), warped, 3, mask=empty)) == pytest.approx(float(local_ncc(fixed.detach(), warped, 3)))
