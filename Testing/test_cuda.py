"""CUDA checks: the engine on a GPU agrees with the CPU, and autocast (bf16 / fp16) works.

These tests need a CUDA device and skip without one. No machine this project has used has a GPU
(CI included), so none of them has been run: they have not passed anywhere yet, and their
tolerances are estimates, not measurements. Run ``pytest Testing/test_cuda.py -s`` on a GPU
machine before relying on the CUDA paths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from SACBRegistrationLib.networks.config import SACBNetConfig
from SACBRegistrationLib.networks.sacbnet import SACBNet
from SACBRegistrationLib.ops.adaptive_conv import spatially_adaptive_conv3d
from SACBRegistrationLib.ops.kmeans import kmeans
from SACBRegistrationLib.spatial.warping import warp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def _pair(size=(64, 64, 64), batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = F.avg_pool3d(torch.rand(2 * batch, 1, *size, generator=g), 5, 1, 2)  # smooth random images
    return images[:batch], images[batch:]


def _model(clusters=7, seed=0):
    torch.manual_seed(seed)
    return SACBNet(SACBNetConfig(clusters=clusters)).eval()


def test_forward_on_cuda_matches_cpu():
    moving, fixed = _pair()
    model = _model()
    with torch.no_grad():
        cpu = model(moving, fixed).displacement
        gpu = model.to(CUDA)(moving.to(CUDA), fixed.to(CUDA)).displacement
    assert gpu.device.type == "cuda"
    # different kernels (cuDNN convolutions may use TF32, torch's default) and possibly a different
    # k-means partition at a boundary voxel: compare the fields, not bits
    difference = (gpu.cpu() - cpu).abs()
    assert difference.mean() < 1e-3
    assert difference.max() < 0.05


def test_cuda_forward_is_deterministic():
    moving, fixed = (t.to(CUDA) for t in _pair())
    model = _model().to(CUDA)
    with torch.no_grad():
        first = model(moving, fixed, return_clusters=True)
        second = model(moving, fixed, return_clusters=True)
    for level, maps in first.clusters.items():
        assert torch.equal(maps["fixed"], second.clusters[level]["fixed"]), f"level {level} clusters differ"
    # the cluster maps are identical; the fields agree up to the rounding of GPU reductions
    assert (first.displacement - second.displacement).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_close_to_float32(dtype):
    moving, fixed = (t.to(CUDA) for t in _pair(batch=2))
    model = _model().to(CUDA)
    with torch.no_grad():
        reference = model(moving, fixed).displacement
        with torch.autocast("cuda", dtype=dtype):
            half = model(moving, fixed)
    assert half.displacement.dtype == torch.float32  # flows are kept in float32 under autocast
    assert torch.isfinite(half.displacement).all() and torch.isfinite(half.warped).all()
    error = (half.displacement - reference).abs().mean().item()
    size = reference.abs().mean().item()
    print(f"{dtype}: mean |u| {size:.4f} voxel, mean error {error:.5f} voxel")
    assert error < 0.1 * size + 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_step_has_finite_gradients(dtype):
    moving, fixed = (t.to(CUDA) for t in _pair(size=(48, 48, 48)))
    model = _model().to(CUDA).train()
    with torch.autocast("cuda", dtype=dtype):
        out = model(moving, fixed)
    loss = F.mse_loss(out.warped.float(), fixed) + out.displacement.float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_batch_of_two_equals_two_batches_of_one_on_cuda():
    moving, fixed = (t.to(CUDA) for t in _pair(batch=2))
    model = _model().to(CUDA)
    with torch.no_grad():
        both = model(moving, fixed).displacement
        one = torch.cat([model(moving[i:i + 1], fixed[i:i + 1]).displacement for i in range(2)])
    assert (both - one).abs().max() < 1e-4


def test_adaptive_conv_gradcheck_on_cuda():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, 4, 6, generator=g, dtype=torch.float64).to(CUDA).requires_grad_()
    weight = torch.randn(3, 2, 27, generator=g, dtype=torch.float64).to(CUDA).requires_grad_()
    attention = torch.rand(1, 2, 27, generator=g, dtype=torch.float64).to(CUDA).requires_grad_()
    bias = torch.randn(1, 2, 3, generator=g, dtype=torch.float64).to(CUDA).requires_grad_()
    labels = torch.randint(0, 2, (1, 5, 4, 6), generator=g).to(CUDA)
    assert torch.autograd.gradcheck(
        lambda *a: spatially_adaptive_conv3d(*a, labels, slab_elements=64), (x, weight, attention, bias))


def test_kmeans_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(5, 8, generator=g) * 4
    points = (centres[torch.randint(0, 5, (4000,), generator=g)] + torch.randn(4000, 8, generator=g))[None]
    cpu = kmeans(points, 5, seed=7)
    gpu = kmeans(points.to(CUDA), 5, seed=7)
    assert torch.equal(cpu.labels, gpu.labels.cpu())
    assert torch.allclose(cpu.centroids, gpu.centroids.cpu(), atol=1e-4)


def test_warp_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(4)
    image = torch.rand(1, 2, 20, 24, 16, generator=g)
    disp = torch.randn(1, 3, 20, 24, 16, generator=g) * 2
    assert torch.allclose(warp(image, disp), warp(image.to(CUDA), disp.to(CUDA)).cpu(), atol=1e-5)
