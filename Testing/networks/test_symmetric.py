"""Symmetric inference: antisymmetric in the two images, zero (to rounding) for an image and itself."""

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from SACBRegistrationLib.networks.config import SACBNetConfig
from SACBRegistrationLib.networks.sacbnet import SACBNet
from SACBRegistrationLib.networks.symmetric import symmetric_velocity


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
