import pytest
import torch
import torch.nn.functional as F

from SACBRegistrationLib.networks.blocks.conv import ConvBlock, conv_stack
from SACBRegistrationLib.networks.blocks.encoder import SharedEncoder


@pytest.mark.parametrize("scale, offset", [(3.0, 5.0), (1.0, 300.0), (1e-3, 1.0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_norm_matches_instance_norm(scale, offset, channels_last):
    x = torch.randn(2, 8, 20, 24, 20, generator=torch.Generator().manual_seed(0)) * scale + offset
    block = ConvBlock(8, 8)
    with torch.no_grad():
        y = block.conv(x.contiguous(memory_format=torch.channels_last_3d))
        expected = F.leaky_relu(F.instance_norm(y.double(), eps=1e-5), 0.1)
        if not channels_last:
            y = y.contiguous()
        got = block.activate(y.clone())
    # float32 inputs: as close as torch's own float32 instance_norm (ill-conditioned cases ~3e-5)
    assert (got.double() - expected).abs().max().item() < 1e-4


def test_inference_norm_in_half_precision_does_not_overflow():
    # autocast inference on GPUs hands the norm float16 activations; sums of squares of a large
    # block overflow float16 unless accumulated in float32
    x = torch.randn(1, 4, 48, 48, 40, generator=torch.Generator().manual_seed(1)) * 40 + 10
    expected = F.leaky_relu(F.instance_norm(x.double(), eps=1e-5), 0.1)
    got = ConvBlock(4, 4).activate(x.half())
    assert torch.isfinite(got).all()
    assert (got.double() - expected).abs().max().item() < 1e-2  # float16 resolution


def test_grad_and_inference_blocks_agree():
    block = ConvBlock(4, 6)
    x = torch.randn(1, 4, 9, 10, 11)
    with torch.no_grad():
        fast = block(x)
    assert torch.allclose(fast, block(x).detach(), atol=1e-5)


def test_single_voxel_normalises_to_zero_in_training():
    block = ConvBlock(2, 3)
    out = block(torch.randn(1, 2, 1, 1, 1, requires_grad=True))
    assert torch.equal(out, torch.zeros_like(out))


def test_split_convolution_equals_convolution_of_concatenation():
    block = ConvBlock(6, 5)
    a, b = torch.randn(2, 1, 3, 7, 8, 9).unbind(0)
    whole = block.convolve(torch.cat([a, b], 1))
    parts = block.convolve(a, slice(0, 3)) + block.convolve(b, slice(3, 6), bias=False)
    assert torch.allclose(whole, parts, atol=1e-5)


def test_encoder_levels_and_parameter_names():
    enc = SharedEncoder(1, 4)
    feats = enc(torch.randn(1, 1, 32, 32, 16))
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 32, 32, 16), (16, 16, 16, 8), (32, 8, 8, 4), (64, 4, 4, 2),
                                                   (64, 2, 2, 1)]
    assert "conv0.0.conv.weight" in enc.state_dict() and "conv4.2.conv.bias" in enc.state_dict()
    assert [type(m).__name__ for m in conv_stack(2, 3, 0.1)] == ["Identity", "ConvBlock", "ConvBlock", "Identity"]


def test_cluster_centroids_in_half_precision():
    from SACBRegistrationLib.networks.blocks.sacb import cluster_centroids
    features = torch.full((1, 200_000, 3), 2.0).half()  # the sum (400,000) exceeds float16's range
    labels = torch.zeros(1, 200_000, dtype=torch.long)
    centroids = cluster_centroids(features, labels, 2, torch.zeros(1, 2, 3))
    assert torch.allclose(centroids[0, 0], torch.full((3,), 2.0)) and torch.equal(centroids[0, 1], torch.zeros(3))
