import json

import pytest

from SACBRegistrationLib.networks.config import KMeansConfig, SACBNetConfig


def test_defaults_are_the_papers_configuration():
    cfg = SACBNetConfig()
    assert cfg.level_channels == (8, 16, 32, 64, 64)
    assert cfg.clusters == (7, 7, 7, 7)
    assert cfg.cluster_feature == "spatial"
    assert cfg.kernel_size == 3 and cfg.search_window == 3


def test_dict_round_trip_through_json():
    cfg = SACBNetConfig(clusters=(5, 6, 7, 8), cluster_feature="both", kmeans=KMeansConfig(max_iter=10, seed=3))
    again = SACBNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.clusters_at(2) == 5 and again.clusters_at(5) == 8


def test_integer_clusters_apply_to_every_level():
    assert SACBNetConfig(clusters=3).clusters == (3, 3, 3, 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"cluster_feature": "s"}, "expected cluster_feature in"),
    ({"clusters": (7, 7)}, "expected clusters"),
    ({"clusters": 0}, "expected clusters"),
    ({"kernel_size": 4}, "odd kernel_size"),
    ({"search_window": 0}, "odd search_window"),
    ({"base_channels": 0}, "base_channels >= 1"),
    ({"kmeans": KMeansConfig()}, None),
])
def test_validation(kwargs, message):
    if message is None:
        SACBNetConfig(**kwargs)
        return
    with pytest.raises(ValueError, match=message):
        SACBNetConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_iter": 0}, "max_iter"), ({"tol": -1.0}, "tol"), ({"max_points": 0}, "max_points"),
])
def test_kmeans_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KMeansConfig(**kwargs)


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="unknown keys"):
        SACBNetConfig.from_dict({"channels": 3})
