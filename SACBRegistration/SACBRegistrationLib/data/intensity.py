"""Intensity augmentation of images in [0, 1] (torch, deterministic per generator).

Images are ``(1, 1, D, H, W)``; every function returns a new tensor.
"""

from __future__ import annotations

import torch

from .deformations import smooth_noise_field


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


def rescale(image: torch.Tensor) -> torch.Tensor:
    """Min-max scaling to [0, 1] (a constant image becomes zeros)."""
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else torch.zeros_like(image)


def gamma(image: torch.Tensor, generator: torch.Generator, log_std: float = 0.25) -> torch.Tensor:
    """``image ** exp(N(0, log_std))``."""
    exponent = float(torch.exp(torch.randn(1, generator=generator) * log_std))
    return image.clamp_min(0) ** exponent


def bias_field(image: torch.Tensor, generator: torch.Generator, max_strength: float = 0.3,
               control_spacing: int = 16) -> torch.Tensor:
    """Multiply by ``exp(smooth noise)`` of standard deviation up to ``max_strength``."""
    strength = _uniform(generator, 0.0, max_strength)
    field = smooth_noise_field(image.shape[2:], 1, control_spacing, strength, generator)
    return image * torch.exp(field)


def gaussian_noise(image: torch.Tensor, generator: torch.Generator, max_std: float = 0.03) -> torch.Tensor:
    return image + torch.randn(image.shape, generator=generator) * _uniform(generator, 0.0, max_std)


def blur(image: torch.Tensor, generator: torch.Generator, max_sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur with sigma uniform in ``[0, max_sigma]`` voxels."""
    sigma = _uniform(generator, 0.0, max_sigma)
    if sigma < 0.1:
        return image
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = image
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        padding = [0, 0, 0]
        padding[axis] = radius
        out = torch.nn.functional.conv3d(out, kernel.view(shape), padding=tuple(padding))
    return out


def augment(image: torch.Tensor, generator: torch.Generator, invert_probability: float = 0.0) -> torch.Tensor:
    """Random gamma, bias field, blur, noise (and contrast inversion inside the foreground
    with probability ``invert_probability``), rescaled to [0, 1]."""
    foreground = image > 0.02
    out = gamma(rescale(image), generator)
    if float(torch.rand(1, generator=generator)) < invert_probability:
        out = torch.where(foreground, 1.0 - out, out)
    out = blur(bias_field(out, generator), generator)
    return rescale(gaussian_noise(out, generator)).clamp_(0, 1)
