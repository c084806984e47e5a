import pytest
import torch
import torch.nn.functional as F

from SACBRegistrationLib.ops.adaptive_conv import spatially_adaptive_conv3d


def per_cluster_reference(x, weight, attention, bias, labels):
    """The paper's Eq. 5-6 evaluated the plain way: one full convolution per cluster, kept where
    the output voxel belongs to that cluster (what the authors' loop does)."""
    batch, c_in = x.shape[:2]
    c_out, taps = weight.shape[0], weight.shape[2]
    k = round(taps ** (1 / 3))
    out = torch.zeros(batch, c_out, *x.shape[2:], dtype=x.dtype)
    for b in range(batch):
        for n in range(attention.shape[1]):
            kernel = (attention[b, n].view(1, 1, taps) * weight).view(c_out, c_in, k, k, k)
            y = F.conv3d(x[b:b + 1], kernel, bias[b, n], padding=k // 2)
            out[b:b + 1] += y * (labels[b] == n).to(x.dtype)
    return out


def random_case(seed, batch=2, c_in=5, c_out=4, clusters=3, shape=(6, 7, 5), k=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, *shape, generator=g, dtype=dtype)
    weight = torch.randn(c_out, c_in, k ** 3, generator=g, dtype=dtype)
    attention = torch.rand(batch, clusters, k ** 3, generator=g, dtype=dtype)
    bias = torch.randn(batch, clusters, c_out, generator=g, dtype=dtype)
    labels = torch.randint(0, clusters, (batch, *shape), generator=g)
    return x, weight, attention, bias, labels


@pytest.mark.parametrize("slab_elements", [1, 500, None])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_per_cluster_reference(seed, slab_elements):
    case = random_case(seed)
    ours = spatially_adaptive_conv3d(*case, slab_elements=slab_elements)
    assert torch.allclose(ours, per_cluster_reference(*case), atol=1e-4, rtol=1e-5)


def test_equals_reference_with_kernel_5_and_one_cluster():
    case = random_case(2, batch=1, clusters=1, k=5, shape=(7, 6, 8))
    assert torch.allclose(spatially_adaptive_conv3d(*case), per_cluster_reference(*case), atol=1e-4)


def test_channels_last_input():
    x, *rest = random_case(3)
    ours = spatially_adaptive_conv3d(x.contiguous(memory_format=torch.channels_last_3d), *rest)
    assert torch.allclose(ours, per_cluster_reference(x, *rest), atol=1e-4)


def test_gradcheck_float64():
    case = random_case(4, batch=2, c_in=2, c_out=2, clusters=3, shape=(3, 4, 3), dtype=torch.float64)
    x, weight, attention, bias, labels = case
    inputs = [t.clone().requires_grad_(True) for t in (x, weight, attention, bias)]
    assert torch.autograd.gradcheck(
        lambda *t: spatially_adaptive_conv3d(*t, labels, slab_elements=40), inputs, eps=1e-6, atol=1e-6)


def test_backward_matches_reference_autograd():
    case = random_case(5)
    x, weight, attention, bias, labels = case
    ours_inputs = [t.clone().requires_grad_(True) for t in (x, weight, attention, bias)]
    ref_inputs = [t.clone().requires_grad_(True) for t in (x, weight, attention, bias)]
    g = torch.randn(x.shape[0], weight.shape[0], *x.shape[2:])
    (spatially_adaptive_conv3d(*ours_inputs, labels, slab_elements=100) * g).sum().backward()
    (per_cluster_reference(*ref_inputs, labels) * g).sum().backward()
    for ours, ref in zip(ours_inputs, ref_inputs):
        assert torch.allclose(ours.grad, ref.grad, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    (lambda c: (c[0][0],) + c[1:], "x of shape"),
    (lambda c: (c[0], c[1][:, :2]) + c[2:], "weight of shape"),
    (lambda c: (c[0], c[1][..., :26], c[2][..., :26]) + c[3:], "cubic number of taps"),
    (lambda c: c[:2] + (c[2][:, :, :5],) + c[3:], "attention of shape"),
    (lambda c: c[:3] + (c[3][:, :, :1],) + c[4:], "bias of shape"),
    (lambda c: c[:4] + (c[4].int(),), "int64 labels"),
])
def test_bad_input(change, message):
    with pytest.raises(ValueError, match=message):
        spatially_adaptive_conv3d(*change(random_case(6)))


def test_half_precision_gradients_are_accumulated_in_float32():
    """AMP training hands the op float16 tensors: gradients summed over many slabs must be
    accumulated in float32 (accumulating in float16 doubles the weight gradient's error here)."""
    x, weight, attention, bias, labels = random_case(7, batch=1, c_in=4, c_out=4, clusters=2, shape=(32, 24, 24))
    g = torch.randn(1, 4, 32, 24, 24, generator=torch.Generator().manual_seed(0)) * 4
    grads = {}
    for dtype in (torch.float64, torch.float16):
        inputs = [t.detach().to(dtype).clone().requires_grad_(True) for t in (x, weight, attention, bias)]
        (spatially_adaptive_conv3d(*inputs, labels, slab_elements=1) * g.to(dtype)).sum().backward()
        grads[dtype] = [t.grad for t in inputs]
    errors = []
    for half, full in zip(grads[torch.float16], grads[torch.float64]):
        assert half.dtype == torch.float16 and torch.isfinite(half).all()
        errors.append(((half.double() - full).abs().max() / full.abs().max()).item())
    assert max(errors) < 2e-3
    assert errors[1] < 7e-4  # the weight gradient, summed over 32 slabs (float16 accumulation: 1.1e-3)
