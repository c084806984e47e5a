import pytest
import torch
import torch.nn.functional as F

from SACBRegistrationLib.spatial.warping import (
    change_scale,
    compose,
    identity_grid,
    resize_displacement,
    upsample2_channels_last,
    upsample_displacement,
    warp,
)


def authors_spatial_transformer(src, flow):
    """The authors' SpatialTransformer (voxelmorph's), written out for comparison."""
    shape = flow.shape[2:]
    grid = torch.stack(torch.meshgrid([torch.arange(s, dtype=flow.dtype) for s in shape], indexing="ij"))[None]
    locs = grid + flow
    locs = torch.stack([2 * (locs[:, i] / (shape[i] - 1) - 0.5) for i in range(3)], 1)
    locs = locs.permute(0, 2, 3, 4, 1)[..., [2, 1, 0]]
    return F.grid_sample(src, locs, align_corners=True, mode="bilinear")


def test_matches_the_authors_transformer():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(2, 3, 6, 7, 8, generator=g)
    flow = 2 * torch.randn(2, 3, 6, 7, 8, generator=g)
    assert torch.allclose(warp(src, flow), authors_spatial_transformer(src, flow), atol=1e-5)


def test_zero_displacement_is_identity():
    src = torch.randn(1, 2, 5, 6, 7)
    assert torch.allclose(warp(src, torch.zeros(1, 3, 5, 6, 7)), src, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_integer_shift(axis):
    src = torch.randn(1, 1, 8, 9, 10)
    disp = torch.zeros(1, 3, 8, 9, 10)
    disp[:, axis] = 2.0  # sample 2 voxels further along this tensor axis
    expected = torch.roll(src, shifts=-2, dims=2 + axis)
    inside = [slice(None)] * 5
    inside[2 + axis] = slice(0, -2)
    assert torch.allclose(warp(src, disp)[tuple(inside)], expected[tuple(inside)], atol=1e-5)


def test_compose_translations_adds_them():
    a = torch.zeros(1, 3, 8, 8, 8)
    b = torch.zeros(1, 3, 8, 8, 8)
    a[:, 0], b[:, 1] = 1.0, -2.0
    c = compose(a, b, padding_mode="border")
    assert torch.allclose(c[:, 0], torch.ones(1, 8, 8, 8)) and torch.allclose(c[:, 1], torch.full((1, 8, 8, 8), -2.0))


def test_compose_equals_sequential_warping():
    g = torch.Generator().manual_seed(1)
    src = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 12, 12, 12, generator=g), 3, 1, 1)
    outer = 0.8 * torch.nn.functional.avg_pool3d(torch.randn(1, 3, 12, 12, 12, generator=g), 5, 1, 2)
    inner = 0.8 * torch.nn.functional.avg_pool3d(torch.randn(1, 3, 12, 12, 12, generator=g), 5, 1, 2)
    # warping by "inner then outer" = warp(warp(src, outer), inner)
    once = warp(src, compose(outer, inner, padding_mode="border"), padding_mode="border")
    twice = warp(warp(src, outer, padding_mode="border"), inner, padding_mode="border")
    assert (once - twice)[..., 2:-2, 2:-2, 2:-2].abs().max() < 0.05


def test_upsample_displacement_doubles_a_constant():
    disp = torch.full((1, 3, 4, 5, 6), 1.5)
    up = upsample_displacement(disp)
    assert up.shape == (1, 3, 8, 10, 12) and torch.allclose(up, torch.full_like(up, 3.0))


def test_resize_displacement_keeps_a_linear_map():
    # u(p) = 0.1 * p_d in voxels; on a grid resampled over the same extent (aligned corners)
    # the displacement in new voxels must be the same linear map
    old = torch.zeros(1, 3, 9, 5, 5)
    old[:, 0] = 0.1 * torch.arange(9.0).view(9, 1, 1)
    new = resize_displacement(old, (17, 5, 5))
    expected = 0.1 * torch.arange(17.0).view(17, 1, 1) / 2 * 2  # d_new = 2 d_old; u_new = 2 u_old
    assert torch.allclose(new[0, 0], expected.expand(17, 5, 5) * 1.0, atol=1e-5)


def test_identity_grid_is_cached_per_shape_device_and_dtype():
    a = identity_grid((4, 5, 6), torch.device("cpu"), torch.float32)
    assert identity_grid((4, 5, 6), torch.device("cpu"), torch.float32) is a
    assert identity_grid((4, 5, 6), torch.device("cpu"), torch.float64) is not a
    assert a.shape == (1, 4, 5, 6, 3)
    assert a[0, 0, 0, 0].tolist() == [-1, -1, -1] and a[0, -1, -1, -1].tolist() == [1, 1, 1]


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(B, 3, D, H, W\)"):
        warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="expected an image"):
        warp(torch.zeros(1, 1, 4, 4, 5), torch.zeros(1, 3, 4, 4, 4))


@pytest.mark.parametrize("shape, batch", [((13, 6, 7), 1), ((1, 5, 5), 1), ((8, 4, 4), 3)])
def test_cpu_slab_parallel_sampling_equals_one_thread(shape, batch):
    g = torch.Generator().manual_seed(2)
    src = torch.randn(batch, 4, *shape, generator=g).contiguous(memory_format=torch.channels_last_3d)
    disp = 1.5 * torch.randn(batch, 3, *shape, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        parallel = warp(src, disp)
        torch.set_num_threads(1)
        single = warp(src, disp)
    finally:
        torch.set_num_threads(threads)
    assert parallel.shape == single.shape == (batch, 4, *shape)
    assert torch.equal(parallel, single)


def test_slab_parallel_sampling_gradients():
    g = torch.Generator().manual_seed(3)
    src = torch.randn(1, 2, 9, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    disp = torch.randn(1, 3, 9, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert torch.autograd.gradcheck(lambda s, d: warp(s, d), (src, disp), atol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(4, 5, 3), (1, 6, 2), (7, 1, 1)])
def test_upsample2_channels_last_is_half_voxel_aligned_trilinear(shape):
    """The values of F.interpolate(scale 2, trilinear, align_corners=False), borders included."""
    field = torch.randn(2, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = F.interpolate(field, scale_factor=2, mode="trilinear", align_corners=False)
    got = upsample2_channels_last(field.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12)
    assert torch.autograd.gradcheck(upsample2_channels_last, (field.permute(0, 2, 3, 4, 1).clone().requires_grad_(),))


def test_warp_with_a_field_on_a_coarser_grid():
    """coarser=2: the same values as resampling the field onto the image grid first (trilinear,
    half-voxel aligned, values doubled), on the whole grid and on a region, with the same gradients."""
    g = torch.Generator().manual_seed(2)
    image = torch.randn(1, 2, 12, 10, 8, dtype=torch.float64, generator=g)
    coarse = 1.5 * torch.randn(1, 3, 6, 5, 4, dtype=torch.float64, generator=g)
    fine = 2 * F.interpolate(coarse, scale_factor=2, mode="trilinear", align_corners=False)
    assert torch.allclose(warp(image, coarse, coarser=2), warp(image, fine), atol=1e-12)
    region = (slice(2, 9), slice(0, 10), slice(3, 7))
    assert torch.allclose(warp(image, coarse, region=region, coarser=2), warp(image, fine)[(slice(None),) * 2 + region],
                          atol=1e-12)
    assert torch.autograd.gradcheck(lambda c: warp(image, c, region=region, coarser=2), (coarse.clone().requires_grad_(),))
    with pytest.raises(ValueError, match="coarser 1 or 2"):
        warp(image, coarse, coarser=3)
    with pytest.raises(ValueError, match="expected an image"):
        warp(image, fine, coarser=2)  # a field on the image grid itself


def test_change_scale_moves_a_linear_field_between_cell_centred_grids():
    # u(x) = 0.1 (x - 3.5) along d, in voxels of a reference grid of 8 voxels per axis; on the grid of
    # twice its resolution voxel q is centred at reference index 0.5 q - 0.25, and its values are in
    # its own (half-size) voxels: 2 u
    n = 8
    x = torch.arange(n, dtype=torch.float64)
    field = torch.zeros(1, 3, n, n, n, dtype=torch.float64)
    field[0, 0] = (0.1 * (x - 3.5)).view(n, 1, 1)
    fine = change_scale(field, 1.0, 0.5, (2 * n,) * 3)
    q = torch.arange(2 * n, dtype=torch.float64)
    expected = 2 * 0.1 * (0.5 * q - 0.25 - 3.5)
    inner = slice(1, 2 * n - 1)  # the outermost half-voxels clamp (align_corners=False)
    assert fine.shape == (1, 3, 2 * n, 2 * n, 2 * n)
    assert torch.allclose(fine[0, 0, inner, 5, 5], expected[inner], atol=1e-12)
    assert float(fine[0, 1:].abs().max()) == 0.0
    back = change_scale(fine, 0.5, 1.0, (n,) * 3)
    assert torch.allclose(back[0, 0, 1:-1], field[0, 0, 1:-1], atol=1e-12)  # and back again
    assert change_scale(field, 1.0, 1.0, (n,) * 3) is field  # same grid: untouched
    with pytest.raises(ValueError, match="expected a displacement"):
        change_scale(field[:, :2], 1.0, 0.5, (2 * n,) * 3)
