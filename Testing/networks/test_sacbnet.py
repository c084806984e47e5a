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
        single = model(moving, fixed)
    assert out.displacement.dtype == torch.float64
    # the same network: float32 rounding aside, the same field
    assert (out.displacement - single.displacement.double()).abs().max().item() < 1e-3


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


def hand_features(x: torch.Tensor, feature: str) -> torch.Tensor:
    """Cluster features ``(B, V, F)`` of ``x`` ``(B, C, D, H, W)`` by an explicit unfold of zero-padded
    3x3x3 patches (paper Table 4): per-channel patch means, per-tap channel means, or both."""
    patches = torch.nn.functional.pad(x, (1,) * 6).unfold(2, 3, 1).unfold(3, 3, 1).unfold(4, 3, 1)
    patches = patches.reshape(*x.shape, 27)  # (B, C, D, H, W, 27)
    spatial = patches.mean(-1).flatten(2).transpose(1, 2)
    channel = patches.mean(1).flatten(1, 3)
    return {"spatial": spatial, "channel": channel, "both": torch.cat([spatial, channel], -1)}[feature]


@pytest.mark.parametrize("feature", ["spatial", "channel", "both"])
def test_cluster_maps_are_kmeans_of_the_configured_features(feature):
    """Every level's cluster map is a k-means partition (the block's settings) of the hand-computed
    features of what the block's projection produced."""
    from SACBRegistrationLib.ops.kmeans import kmeans

    torch.manual_seed(0)
    net = SACBNet(SACBNetConfig(clusters=3, cluster_feature=feature)).eval()
    projected = {level: [] for level in (2, 3, 4, 5)}
    for level in projected:
        net.sacb(level).proj_in.register_forward_hook(lambda m, i, out, level=level: projected[level].append(out))
    moving, fixed = smooth_pair((16, 16, 32), seed=5)
    with torch.no_grad():
        out = net(moving, fixed, return_clusters=True)
    for level, (fixed_proj, moving_proj) in projected.items():  # the block runs on fixed, then moving
        settings = net.sacb(level).kmeans
        for role, proj in (("fixed", fixed_proj), ("moving", moving_proj)):
            want = kmeans(hand_features(proj, feature), 3, max_iter=settings.max_iter, tol=settings.tol,
                          seed=settings.seed, max_points=settings.max_points).labels
            got = out.clusters[level][role].flatten(1)
            # the same partition (the label numbers may permute: the block's box sums and the unfold
            # round differently, which can change which point k-means++ seeds first)
            assert torch.equal(got[0, :, None] == got[0, None, :], want[0, :, None] == want[0, None, :]), (level, role)
            if proj.shape[2:].numel() >= 8:
                assert len(got.unique()) > 1, (level, role)  # a real partition, not one cluster


def test_cpu_autocast_bfloat16_is_close_to_float32(model):
    moving, fixed = smooth_pair((16, 16, 16))
    with torch.no_grad():
        reference = model(moving, fixed).displacement
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(moving, fixed)
    assert out.displacement.dtype == torch.float32  # flows are kept in float32 under autocast
    # bf16 keeps 8 bits of mantissa (relative rounding 4e-3); through ~30 layers and k-means the
    # field moves by about 2% of its mean size here (measured: mean |u| 0.87 voxel, mean error 0.020)
    error = (out.displacement - reference).abs().mean().item()
    assert error < 0.05 * reference.abs().mean().item()


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


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    net = SACBNet(SACBNetConfig(clusters=2))
    moving, fixed = smooth_pair((16, 16, 16), seed=6)
    calls = []
    net.sacb(2).proj_in.register_forward_hook(lambda *args: calls.append(1))
    runs = {}
    for checkpointing in (False, True):
        net.zero_grad()
        calls.clear()
        net.gradient_checkpointing = checkpointing
        out = net(moving, fixed)
        loss = ((out.warped - fixed) ** 2).mean() + out.displacement.pow(2).mean()
        loss.backward()
        runs[checkpointing] = (loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}, len(calls))
    (plain_loss, plain, plain_calls), (ckpt_loss, ckpt, ckpt_calls) = runs[False], runs[True]
    # the checkpointed blocks really are recomputed in the backward pass (fixed + moving, twice)
    assert (plain_calls, ckpt_calls) == (2, 4)
    assert torch.equal(plain_loss, ckpt_loss)
    # (at 16^3 the coarsest levels are a voxel wide, normalised to zero: their gradients vanish)
    assert sum(bool(grad.abs().max() > 0) for grad in plain.values()) > 0.75 * len(plain)
    for name, grad in plain.items():
        assert torch.allclose(ckpt[name], grad, rtol=1e-5, atol=1e-7), name
