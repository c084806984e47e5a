import pytest
import torch
import torch.nn.functional as F

from SACBRegistrationLib.ops.cluster_features import cluster_features, feature_size, patch_mean


def unfolded(x, k=3):
    """(B, C, D, H, W) -> (B, C, D, H, W, k^3) zero-padded patches, the authors' unfold."""
    r = k // 2
    p = F.pad(x, (r,) * 6).unfold(2, k, 1).unfold(3, k, 1).unfold(4, k, 1)
    return p.reshape(*x.shape, k ** 3)


@pytest.fixture
def x():
    return torch.randn(2, 5, 6, 4, 7, generator=torch.Generator().manual_seed(0))


def test_spatial_mean(x):
    expected = unfolded(x).mean(-1).flatten(2).transpose(1, 2)  # (B, V, C)
    assert torch.allclose(cluster_features(x, "spatial"), expected, atol=1e-6)
    assert torch.allclose(patch_mean(x), unfolded(x).mean(-1), atol=1e-6)


def test_channel_mean(x):
    expected = unfolded(x).mean(1).flatten(1, 3)  # (B, V, k^3)
    assert torch.allclose(cluster_features(x, "channel"), expected, atol=1e-6)


def test_both(x):
    both = cluster_features(x, "both")
    assert both.shape == (2, 6 * 4 * 7, 5 + 27)
    assert torch.allclose(both[..., :5], cluster_features(x, "spatial"))
    assert torch.allclose(both[..., 5:], cluster_features(x, "channel"))


def test_volume_smaller_than_kernel():
    tiny = torch.randn(1, 2, 1, 2, 1)
    assert torch.allclose(cluster_features(tiny, "spatial"), unfolded(tiny).mean(-1).flatten(2).transpose(1, 2))


def test_feature_sizes_and_bad_mode(x):
    assert feature_size("spatial", 16) == 16 and feature_size("channel", 16) == 27 and feature_size("both", 16) == 43
    with pytest.raises(ValueError, match="expected cluster feature"):
        cluster_features(x, "s")
