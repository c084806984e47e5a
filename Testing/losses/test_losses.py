import pytest
import torch
import torch.nn.functional as F

from SACBRegistrationLib.losses import (
    GradientL2Loss,
    LocalNCCLoss,
    SoftDiceLoss,
    box_sum,
    gradient_l2,
    local_ncc,
    one_hot_labels,
    soft_dice,
)


def test_box_sum_equals_a_convolution_with_ones():
    x = torch.randn(2, 3, 10, 11, 12, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(3, 1, 9, 9, 9)
    assert torch.allclose(box_sum(x, 9), F.conv3d(x, ones, padding=4, groups=3), atol=1e-3)


def voxelmorph_ncc(i, j, win=9):
    """voxelmorph's NCC (what the authors train with), written out for comparison."""
    filt = torch.ones(1, 1, win, win, win)
    conv = lambda t: F.conv3d(t, filt, padding=win // 2)
    i_sum, j_sum, i2_sum, j2_sum, ij_sum = map(conv, (i, j, i * i, j * j, i * j))
    size = win ** 3
    u_i, u_j = i_sum / size, j_sum / size
    cross = ij_sum - u_j * i_sum - u_i * j_sum + u_i * u_j * size
    i_var = i2_sum - 2 * u_i * i_sum + u_i * u_i * size
    j_var = j2_sum - 2 * u_j * j_sum + u_j * u_j * size
    return -torch.mean(cross * cross / (i_var * j_var + 1e-5))


def test_ncc_matches_voxelmorph():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 1, 1, 14, 12, 13, generator=g).unbind(0)
    assert torch.allclose(local_ncc(a, b), voxelmorph_ncc(a, b), atol=1e-5)


def test_ncc_of_identical_and_affinely_related_images():
    a = torch.rand(1, 1, 12, 12, 12, generator=torch.Generator().manual_seed(2))
    assert local_ncc(a, a).item() == pytest.approx(-1.0, abs=1e-3)
    assert local_ncc(a, 3 * a).item() == pytest.approx(-1.0, abs=1e-3)
    # an intensity offset is invariant inside, not where windows reach the zero padding
    assert -1.0 < local_ncc(a, a + 2).item() < local_ncc(a, torch.rand(1, 1, 12, 12, 12)).item()
    assert local_ncc(a, -a, squared=False).item() == pytest.approx(1.0, abs=1e-3)
    assert local_ncc(a, torch.rand(1, 1, 12, 12, 12)).item() > -0.5  # shared zero padding correlates the borders


def test_ncc_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 1, 5, 5, 5, generator=g, dtype=torch.float64)
    b = torch.rand(1, 1, 5, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: local_ncc(a, t, window=3), (b,))
    assert torch.autograd.gradcheck(lambda t: local_ncc(a, t, window=3, squared=False), (b,))


def test_gradient_l2_of_a_linear_field():
    # u_d = 0.5 * d  -> forward differences 0.5 along d, 0 elsewhere, for one of 3 components
    disp = torch.zeros(1, 3, 6, 6, 6)
    disp[:, 0] = 0.5 * torch.arange(6.0).view(6, 1, 1)
    expected = (0.25 / 3 + 0 + 0) / 3  # mean over components and axes of squared differences
    assert gradient_l2(disp).item() == pytest.approx(expected)
    assert GradientL2Loss()(disp).item() == pytest.approx(expected)
    assert gradient_l2(torch.full((1, 3, 4, 4, 4), 7.0)).item() == 0.0


def test_soft_dice():
    labels = torch.zeros(1, 1, 6, 6, 6, dtype=torch.long)
    labels[..., :3, :, :] = 1
    labels[..., 3:, :3, :] = 2
    one_hot = one_hot_labels(labels, 3)
    assert soft_dice(one_hot, one_hot).item() == pytest.approx(0.0, abs=1e-6)
    swapped = one_hot[:, [0, 2, 1]]
    assert soft_dice(swapped, one_hot).item() == pytest.approx(1.0, abs=1e-6)
    half = one_hot.clone()
    half[:, 1] *= 0.5
    # label 1: 2 * 0.5 n / (0.5 n + n) = 2/3; label 2: 1
    assert SoftDiceLoss()(half, one_hot).item() == pytest.approx(1 - (2 / 3 + 1) / 2, abs=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        local_ncc(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5))
    with pytest.raises(ValueError, match="odd window"):
        LocalNCCLoss(window=4)
    with pytest.raises(ValueError, match="integer labels"):
        one_hot_labels(torch.zeros(1, 1, 4, 4, 4), 2)


def test_local_ncc_with_the_fixed_window_stats_given_is_the_same_bit_for_bit():
    # instance optimisation computes the fixed image's window statistics once per level
    from SACBRegistrationLib.losses import fixed_window_stats, local_ncc

    generator = torch.Generator().manual_seed(3)
    fixed, warped = torch.rand(2, 1, 1, 12, 14, 10, generator=generator)
    mask = (torch.rand(1, 1, 12, 14, 10, generator=generator) > 0.3).float()
    for window in (3, 5):
        given = local_ncc(fixed, warped, window, mask=mask, fixed_stats=fixed_window_stats(fixed, window))
        assert torch.equal(given, local_ncc(fixed, warped, window, mask=mask))
    assert not torch.equal(local_ncc(fixed, warped, 5, fixed_stats=fixed_window_stats(warped, 5)), local_ncc(fixed, warped, 5))


def test_weighted_displacement_l2_counts_only_weighted_pairs():
    from SACBRegistrationLib.losses.functional import weighted_displacement_l2
    disp = torch.stack([torch.full((3, 4, 4, 4), 2.0), torch.full((3, 4, 4, 4), 5.0)])
    assert float(weighted_displacement_l2(disp, torch.tensor([1.0, 0.0]))) == pytest.approx(4.0 / 2)
    assert float(weighted_displacement_l2(disp, torch.tensor([1.0, 1.0]))) == pytest.approx((4.0 + 25.0) / 2)
    with pytest.raises(ValueError, match="one weight per batch item"):
        weighted_displacement_l2(disp, torch.tensor([1.0]))
