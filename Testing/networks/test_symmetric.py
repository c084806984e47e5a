"""Symmetric inference: antisymmetric in the two images, zero (to rounding) for an image and itself."""

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from SACBRegistrationLib.networks.config import SACBNetConfig
from SACBRegistrationLib.networks.sacbnet import SACBNet
from SACBRegistrationLib.networks.symmetric import half_way_velocity, symmetric_velocity
from SACBRegistrationLib.spatial.padding import pad_to_multiple
from SACBRegistrationLib.spatial.warping import integrate_velocity, warp


def tiny_net():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return SACBNet(SACBNetConfig(clusters=2)).eval()


def test_swapping_the_images_negates_the_velocity_and_identical_images_give_zero():
    net = tiny_net()
    generator = torch.Generator().manual_seed(1)
    a, b = torch.rand(1, 1, 32, 32, 32, generator=generator), torch.rand(1, 1, 32, 32, 32, generator=generator)
    with torch.no_grad():
        forward, clusters = symmetric_velocity(net, a, b, return_clusters=True)
        backward, none = symmetric_velocity(net, b, a)
        itself, _ = symmetric_velocity(net, a, a)
        plain = net(a, a).displacement
    assert forward.shape == (1, 3, 32, 32, 32) and forward.dtype == torch.float32
    assert float(forward.abs().max()) > 1e-3  # a real field
    assert torch.allclose(forward, -backward, atol=1e-4)  # the same batch of two in the other order: rounding only
    assert float(plain.abs().max()) > 1e-3  # the network alone moves an image registered to itself ...
    assert float(itself.abs().max()) < 1e-4  # ... the symmetric velocity does not (float rounding of the batch)
    assert none is None  # clusters only when asked: those of the (moving, fixed) pass
    with torch.no_grad():
        alone = net(a, b, return_clusters=True)
    for level, roles in clusters.items():
        for role, maps in roles.items():
            assert maps.shape == alone.clusters[level][role].shape and maps.shape[0] == 1
            # the same partition as the one-way pass finds (k-means numbers its clusters arbitrarily)
            assert adjusted_rand_score(alone.clusters[level][role].flatten(), maps.flatten()) > 0.95
    assert torch.allclose(forward * 2, alone.displacement - net(b, a).displacement, atol=2e-3)  # batch of two vs one


def test_both_ways_shares_the_encoder_and_gives_the_batch_of_two():
    net = tiny_net()
    generator = torch.Generator().manual_seed(2)
    a, b = torch.rand(1, 1, 32, 32, 32, generator=generator), torch.rand(1, 1, 32, 32, 32, generator=generator)
    calls = []
    hook = net.encoder.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    with torch.no_grad():
        shared = net.forward_both_ways(a, b, return_clusters=True)
        assert calls == [2]  # each image encoded once (the plain batch encodes four images)
        calls.clear()
        batch = net(torch.cat([a, b]), torch.cat([b, a]), return_clusters=True)
        assert calls == [2, 2]
    hook.remove()
    assert shared.displacement.shape == (2, 3, 32, 32, 32)
    assert float(batch.displacement.abs().max()) > 1e-3
    assert torch.allclose(shared.displacement, batch.displacement, atol=1e-5)
    assert torch.allclose(shared.warped, batch.warped, atol=1e-5)
    for level, roles in batch.clusters.items():
        for role, maps in roles.items():
            assert torch.equal(shared.clusters[level][role], maps)


def test_both_ways_takes_one_pair():
    net = tiny_net()
    pair = torch.rand(2, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="one pair"):
        net.forward_both_ways(pair, pair)


def smooth_velocity(shape, amplitude, seed):
    """A smooth random velocity ``(1, 3, *shape)`` in voxels (a few voxels at most)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=generator) * amplitude
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def test_the_fine_pass_keeps_the_symmetry_and_adds_the_half_way_residual():
    net = tiny_net()
    generator = torch.Generator().manual_seed(3)
    shape = (24, 40, 20)  # not multiples of 16: padded for the network, cropped back
    a, b = torch.rand(1, 1, *shape, generator=generator), torch.rand(1, 1, *shape, generator=generator)
    v = smooth_velocity(shape, 1.5, 4)
    with torch.no_grad():
        forward = half_way_velocity(net, a, b, v, 5)
        backward = half_way_velocity(net, b, a, -v, 5)  # the images swapped: the first answer negated too
        itself = half_way_velocity(net, a, a, torch.zeros_like(v), 5)
        # by hand: the two images warped half-way, padded, their symmetric velocity cropped back
        half_a = warp(a, integrate_velocity(v / 2, 5))
        half_b = warp(b, integrate_velocity(-v / 2, 5))
        padded_a, crop = pad_to_multiple(half_a)
        padded_b, _ = pad_to_multiple(half_b)
        residual, _ = symmetric_velocity(net, padded_a, padded_b)
    assert forward.shape == (1, 3, *shape)
    assert float((forward - v).abs().max()) > 1e-3  # the pass adds a real residual
    assert torch.allclose(forward, v + residual[crop], atol=1e-6)
    assert torch.allclose(forward, -backward, atol=1e-4)  # antisymmetric in the two images, as one pass is
    assert float(itself.abs().max()) < 1e-4  # an image registered to itself still stays put


def test_the_fine_pass_wants_the_velocity_on_the_images_grid():
    net = tiny_net()
    a = torch.rand(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match=r"expected a velocity \(1, 3, 16, 16, 16\) on the images' grid"):
        half_way_velocity(net, a, a, torch.zeros(1, 3, 8, 8, 8), 5)
