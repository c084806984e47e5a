"""Symmetric inference: antisymmetric in the two images, exactly zero for an image and itself."""

import torch

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
    assert torch.equal(forward, -backward)
    assert float(plain.abs().max()) > 1e-3  # the network alone moves an image registered to itself ...
    assert float(itself.abs().max()) == 0.0  # ... the symmetric velocity does not
    assert set(clusters) and none is None  # clusters of the (moving, fixed) pass only when asked
