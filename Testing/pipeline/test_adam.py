"""The instance-optimisation Adam is torch.optim.Adam's update, without importing torch._dynamo."""

import subprocess
import sys

import torch

from SACBRegistrationLib.pipeline.adam import Adam


def quadratic_steps(make_optimiser, steps: int = 25) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3, 4, 5, generator=generator)
    weights = torch.rand(2, 3, 4, 5, generator=generator) * 10
    param = torch.zeros_like(target, requires_grad=True)
    optimiser = make_optimiser(param)
    for _ in range(steps):
        loss = (weights * (param - target) ** 4).sum() + param.abs().sum() * 0.1
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return param.detach()


def test_the_same_values_as_torch_optim_adam_bit_for_bit():
    for lr, eps in ((0.1, 1e-4), (0.05, 1e-8)):
        ours = quadratic_steps(lambda p: Adam(p, lr=lr, eps=eps))
        theirs = quadratic_steps(lambda p: torch.optim.Adam([p], lr=lr, eps=eps, foreach=False))
        assert torch.equal(ours, theirs), float((ours - theirs).abs().max())
        assert float(ours.abs().max()) > 0.1  # it did move


def test_instance_optimisation_does_not_import_torch_dynamo():
    # torch.optim imports torch._dynamo (about a second) when the first optimiser is built
    code = ("import sys, torch\n"
            "from SACBRegistrationLib.pipeline.instance_optimisation import instance_optimise\n"
            "from SACBRegistrationLib.pipeline.presets import IOLevel, IOSettings\n"
            "fixed = torch.rand(1, 1, 16, 16, 16); moving = torch.roll(fixed, 1, 4)\n"
            "images = lambda scale: (fixed, moving, None)\n"
            "instance_optimise(images, torch.zeros(1, 3, 16, 16, 16), IOSettings(levels=(IOLevel(1.0, 3),)))\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
