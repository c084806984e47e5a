import itertools

import pytest
import torch
import torch.nn.functional as F

from SACBRegistrationLib.ops.matching import matching_scores, offset_grid, similarity_matching_flow


def unfold_reference(fixed, moving, window=3):
    """The paper's Eq. 8-10 with an explicit unfold of the zero-padded moving features."""
    r = window // 2
    b, c, d, h, w = fixed.shape
    m = F.pad(moving, (r,) * 6).unfold(2, window, 1).unfold(3, window, 1).unfold(4, window, 1)
    m = m.reshape(b, c, d * h * w, window ** 3).permute(0, 2, 3, 1)  # (B, V, T, C)
    f = fixed.reshape(b, c, d * h * w).permute(0, 2, 1).unsqueeze(-1)  # (B, V, C, 1)
    p = (m @ f).squeeze(-1).softmax(-1)  # (B, V, T)
    grid = torch.tensor(list(itertools.product(range(-r, r + 1), repeat=3)), dtype=fixed.dtype)
    return (p @ grid).permute(0, 2, 1).reshape(b, 3, d, h, w)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_equals_unfold_reference(window):
    g = torch.Generator().manual_seed(0)
    fixed, moving = torch.randn(2, 2, 6, 5, 7, 4, generator=g).unbind(0)
    assert torch.allclose(similarity_matching_flow(fixed, moving, window), unfold_reference(fixed, moving, window),
                          atol=1e-5)


def test_grad_and_inference_paths_agree():
    g = torch.Generator().manual_seed(1)
    fixed, moving = torch.randn(2, 1, 8, 6, 5, 4, generator=g).unbind(0)
    with torch.no_grad():
        fast = matching_scores(fixed, moving)
    slow = matching_scores(fixed.requires_grad_(True), moving)
    assert torch.allclose(fast, slow.detach(), atol=1e-5)


def test_recovers_a_one_voxel_shift():
    # distinctive features: moving(v) = fixed(v - s)  =>  fixed(v) matches moving(v + s)
    g = torch.Generator().manual_seed(2)
    fixed = 6.0 * F.normalize(torch.randn(1, 16, 8, 8, 8, generator=g), dim=1)
    shift = (1, -1, 0)
    moving = torch.roll(fixed, shifts=shift, dims=(2, 3, 4))
    flow = similarity_matching_flow(fixed, moving)
    interior = flow[:, :, 2:-2, 2:-2, 2:-2]
    for axis, s in enumerate(shift):
        assert torch.allclose(interior[:, axis], torch.full_like(interior[:, axis], float(s)), atol=1e-3)


def test_offset_grid_order_matches_unfold():
    grid = offset_grid(3, torch.device("cpu"), torch.float32)
    assert grid.shape == (27, 3)
    assert grid[0].tolist() == [-1, -1, -1] and grid[1].tolist() == [-1, -1, 0] and grid[13].tolist() == [0, 0, 0]


def test_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        similarity_matching_flow(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 2))
    with pytest.raises(ValueError, match="odd search window"):
        similarity_matching_flow(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4), window=2)


def test_half_precision_features_give_float32_flows():
    g = torch.Generator().manual_seed(3)
    fixed, moving = torch.randn(2, 1, 16, 8, 8, 8, generator=g).unbind(0)
    half = similarity_matching_flow(fixed.half(), moving.half())
    assert half.dtype == torch.float32
    assert torch.allclose(half, similarity_matching_flow(fixed, moving), atol=5e-3)
