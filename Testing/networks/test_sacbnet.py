import pytest
import torch

from SACBRegistrationLib.networks.config import SACBNetConfig
from SACBRegistrationLib.networks.sacbnet import SACBNet


def smooth_pair(shape, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2 * batch, 1, *shape, generator=g)
    x = torch.nn.functional.avg_pool3d(x, 3, 1, 1)
    return x[:batch], x[batch:]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SACBNet(SACBNetConfig(clusters=3)).eval()


def test_parameter_count_matches_the_paper():
    assert sum(p.numel() for p in SACBNet().parameters()) == 1_105_591


def test_no_shape_bound_buffers():
    assert list(SACBNet().buffers()) == []


@pytest.mark.parametrize("shape, batch", [((16, 16, 16), 1), ((32, 16, 48), 2), ((16, 32, 32), 3)])
def test_shapes_and_dtypes(model, shape, batch):
    moving, fixed = smooth_pair(shape, batch)
    with torch.no_grad():
        out = model(moving, fixed, return_clusters=True)
    assert out.warped.shape == (batch, 1, *shape) and out.warped.dtype == torch.float32
    assert out.displacement.shape == (batch, 3, *shape) and out.displacement.dtype == torch.float32
    assert torch.isfinite(out.displacement).all()
    assert sorted(out.clusters) == [2, 3, 4, 5]
    for level, maps in out.clusters.items():
        size = tuple(s // 2 ** (level - 1) for s in shape)
        for labels in maps.values():
            assert labels.shape == (batch, *size) and labels.dtype == torch.int64
            assert 0 <= int(labels.min()) and int(labels.max()) < 3


def test_float64_model_and_inputs(model):
    moving, fixed = smooth_pair((16, 16, 16))
    model64 = SACBNet(model.config).double().eval()
    model64.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = model64(moving.double(), fixed.double())
    assert out.displacement.dtype == torch.float64


def test_deterministic_and_independent_of_global_random_state(model):
    moving, fixed = smooth_pair((32, 32, 16), seed=1)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(moving, fixed)
        torch.manual_seed(2)
        torch.rand(100)
        b = model(moving, fixed)
    assert torch.equal(a.displacement, b.displacement)


def test_batch_elements_are_independent(model):
    moving, fixed = smooth_pair((16, 16, 32), batch=2, seed=2)
    with torch.no_grad():
        together = model(moving, fixed, return_clusters=True)
        alone = model(moving[1:], fixed[1:], return_clusters=True)
    assert torch.equal(together.clusters[2]["fixed"][1], alone.clusters[2]["fixed"][0])
    assert torch.allclose(together.displacement[1], alone.displacement[0], atol=1e-4)


def test_inference_fast_path_equals_autograd_path(model):
    moving, fixed = smooth_pair((16, 32, 16), seed=3)
    with torch.no_grad():
        fast = model(moving, fixed).displacement
    slow = model(moving, fixed).displacement.detach()
    assert torch.allclose(fast, slow, atol=1e-4)


def test_cluster_override(model):
    moving, fixed = smooth_pair((16, 16, 16))
    with torch.no_grad():
        out = model(moving, fixed, clusters=(1, 2, 1, 1), return_clusters=True)
    assert int(out.clusters[2]["fixed"].max()) == 0
    assert int(out.clusters[3]["fixed"].max()) <= 1
    with pytest.raises(ValueError, match="expected clusters"):
        model(moving, fixed, clusters=(1, 2))


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = SACBNet(SACBNetConfig(clusters=2))
    moving, fixed = smooth_pair((16, 16, 16), seed=4)
    out = net(moving, fixed)
    ((out.warped - fixed) ** 2).mean().add(out.displacement.pow(2).mean()).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


@pytest.mark.parametrize("feature", ["channel", "both"])
def test_other_cluster_features(feature):
    net = SACBNet(SACBNetConfig(clusters=2, cluster_feature=feature)).eval()
    moving, fixed = smooth_pair((16, 16, 16))
    with torch.no_grad():
        assert torch.isfinite(net(moving, fixed).displacement).all()


def test_cpu_autocast_bfloat16(model):
    moving, fixed = smooth_pair((16, 16, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(moving, fixed)
    assert out.displacement.dtype == torch.float32
    assert torch.isfinite(out.displacement).all()


@pytest.mark.parametrize("moving, fixed, message", [
    (torch.zeros(1, 16, 16, 16), torch.zeros(1, 16, 16, 16), r"\(B, C, D, H, W\)"),
    (torch.zeros(1, 1, 16, 16, 20), torch.zeros(1, 1, 16, 16, 20), "multiples of 16"),
    (torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 32), "one shape"),
    (torch.zeros(1, 2, 16, 16, 16), torch.zeros(1, 2, 16, 16, 16), "1 channel"),
    (torch.zeros(1, 1, 16, 16, 16, dtype=torch.int32), torch.zeros(1, 1, 16, 16, 16), "floating-point"),
    (torch.full((1, 1, 16, 16, 16), float("nan")), torch.zeros(1, 1, 16, 16, 16), "NaN or Inf"),
    (torch.zeros(1, 1, 16, 16, 16), torch.full((1, 1, 16, 16, 16), float("inf")), "NaN or Inf"),
    ("not a tensor", torch.zeros(1, 1, 16, 16, 16), "torch.Tensor"),
])
def test_bad_input(model, moving, fixed, message):
    with pytest.raises(ValueError, match=message):
        model(moving, fixed)
