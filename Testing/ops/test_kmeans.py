import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from SACBRegistrationLib.ops.kmeans import _squared_distances, kmeans


def feature_like(seed: int, channels: int = 16, shape=(24, 28, 20)) -> torch.Tensor:
    """Smooth, normalised, rectified random feature maps flattened to (1, V, C), like SACB's input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, *shape, generator=g)
    x = F.avg_pool3d(x, 5, 1, 2)
    x = F.leaky_relu(F.instance_norm(x), 0.1)
    x = F.avg_pool3d(x, 3, 1, 1)
    return x.flatten(2).transpose(1, 2).contiguous()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_points", [None, 4096])
def test_inertia_within_5_percent_of_sklearn(seed, max_points):
    x = feature_like(seed)
    ours = kmeans(x, 7, max_points=max_points).inertia.item()
    reference = KMeans(7, n_init=1, random_state=seed).fit(x[0].numpy()).inertia_
    assert ours <= 1.05 * reference


def test_identical_runs_and_independent_of_global_random_state():
    x = feature_like(3)
    torch.manual_seed(123)
    np.random.seed(1)
    a = kmeans(x, 5, max_points=2048)
    torch.manual_seed(999)
    torch.rand(1000)
    b = kmeans(x, 5, max_points=2048)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.centroids, b.centroids)


def test_each_sample_is_clustered_on_its_own():
    x = torch.cat([feature_like(4), feature_like(5)])
    batch = kmeans(x, 6)
    alone = kmeans(x[1:], 6)
    assert torch.equal(batch.labels[1], alone.labels[0])
    assert torch.allclose(batch.centroids[1], alone.centroids[0])


def test_seed_changes_initialisation_but_clustering_stays_good():
    x = feature_like(6)
    a, b = kmeans(x, 7, seed=0), kmeans(x, 7, seed=1)
    assert abs(a.inertia.item() - b.inertia.item()) / a.inertia.item() < 0.05


def test_single_cluster_centroid_is_the_mean():
    x = feature_like(7)
    result = kmeans(x, 1)
    assert torch.all(result.labels == 0)
    assert torch.allclose(result.centroids[0, 0], x[0].mean(0), atol=1e-6)


def test_more_clusters_than_distinct_points_keeps_valid_labels():
    x = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]])
    result = kmeans(x, 5)
    assert result.labels.shape == (1, 4)
    assert result.labels.min() >= 0 and result.labels.max() < 5
    assert result.labels[0, 0] == result.labels[0, 1] != result.labels[0, 2] == result.labels[0, 3]
    assert result.inertia.item() == pytest.approx(0.0, abs=1e-6)


def test_fewer_points_than_clusters():
    x = torch.tensor([[[0.0], [3.0]]])
    result = kmeans(x, 4)
    assert result.centroids.shape == (1, 4, 1)
    assert result.inertia.item() == pytest.approx(0.0, abs=1e-6)


def test_iteration_cap_is_honoured():
    result = kmeans(feature_like(8), 7, max_iter=2, tol=0.0)
    assert int(result.iterations.max()) <= 2


def test_clusters_are_ordered_by_centroid_sum():
    result = kmeans(feature_like(9), 7)
    sums = result.centroids[0].sum(1)
    assert torch.all(sums[1:] >= sums[:-1])


def test_labels_are_nearest_centroids():
    x = feature_like(10)
    result = kmeans(x, 4)
    nearest = torch.cdist(x[0], result.centroids[0]).argmin(1)
    assert (nearest == result.labels[0]).float().mean() > 0.999  # ties aside


def test_distances_from_the_transposed_points_are_squared_euclidean():
    points = feature_like(11)[0].double()  # (P, F)
    centroids = points[[3, 500, 2000]] + 0.25
    ours = _squared_distances(points.t().contiguous(), (points * points).sum(-1), centroids)  # (K, P)
    assert ours.shape == (3, points.shape[0])
    assert torch.allclose(ours, torch.cdist(centroids, points) ** 2, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bad, k, message", [
    (torch.zeros(4, 2), 2, "(B, P, F)"),
    (torch.zeros(1, 4, 2), 0, "k >= 1"),
    (torch.zeros(1, 0, 2), 2, "at least one point"),
])
def test_bad_input(bad, k, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        kmeans(bad, k)
