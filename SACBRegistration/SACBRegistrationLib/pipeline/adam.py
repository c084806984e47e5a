"""Adam for one tensor, without ``torch.optim`` (instance optimisation's optimiser).

``torch.optim.Optimizer`` imports ``torch._dynamo`` the first time an optimiser is built: 1.2 s of
imports on this project's CPU, paid by every ``sacb register`` process and Slicer worker that runs
instance optimisation. This is the same update as ``torch.optim.Adam`` (no weight decay, no
AMSGrad), in the same order of operations as its single-tensor path, so the numbers are the same
(a test compares them bit for bit on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

BETAS = (0.9, 0.999)
"""Decay rates of the first and second moment averages (``torch.optim.Adam``'s defaults)."""


@dataclass
class Adam:
    """Adam state for ``param`` (a leaf tensor with ``requires_grad``); :meth:`step` updates it in place
    from ``param.grad``."""

    param: torch.Tensor
    lr: float
    eps: float
    betas: Tuple[float, float] = BETAS

    def __post_init__(self) -> None:
        self.steps = 0
        self.exp_avg = torch.zeros_like(self.param, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(self.param, memory_format=torch.preserve_format)

    def zero_grad(self) -> None:
        self.param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        grad = self.param.grad
        self.steps += 1
        # moment averages: m <- m + (g - m)(1 - b1); v <- b2 v + (1 - b2) g^2
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # bias-corrected step: p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
        bias_correction1 = 1 - beta1 ** self.steps
        bias_correction2_sqrt = (1 - beta2 ** self.steps) ** 0.5
        denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-(self.lr / bias_correction1))
