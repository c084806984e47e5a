"""Configuration of SACB-Net, saved next to the weights so a checkpoint rebuilds its model.

The defaults are the paper's configuration (Sec. 3, Table 3): a 5-level shared encoder with
``base_channels = 4`` (feature channels 8, 16, 32, 64, 64 at levels 1..5), SACB blocks at levels
2..5 with 7 clusters each, the spatial mean of 3x3x3 patches as the clustering feature, and a
3x3x3 search window for similarity matching. With these values the network has 1,105,591
learned parameters (the paper's "1.11M").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ..vocabulary import CLUSTER_FEATURES, NUM_LEVELS, SACB_LEVELS, SIZE_MULTIPLE  # noqa: F401 (re-exported)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class KMeansConfig:
    """Settings of the per-sample k-means inside each SACB block.

    Attributes:
        max_iter: cap on Lloyd iterations.
        tol: relative tolerance; iterations stop once the summed squared centroid shift is at
            most ``tol`` times the mean per-feature variance of the data (scikit-learn's rule).
        seed: seed of the k-means++ initialisation. Each sample of a batch uses its own
            generator seeded with ``seed``, so results never depend on global random state or
            on which other samples share the batch.
        max_points: centroids are fitted on at most this many voxels, drawn with the seeded
            generator, and every voxel is then assigned to its nearest centroid. ``None`` fits on
            all voxels (exact, slower at full resolution).
    """

    max_iter: int = 50
    tol: float = 1e-4
    seed: int = 0
    max_points: Optional[int] = 16384

    def __post_init__(self) -> None:
        _expect(isinstance(self.max_iter, int) and self.max_iter >= 1,
                f"expected kmeans max_iter >= 1, got {self.max_iter!r}")
        _expect(self.tol >= 0, f"expected kmeans tol >= 0, got {self.tol!r}")
        _expect(isinstance(self.seed, int), f"expected an integer kmeans seed, got {self.seed!r}")
        _expect(self.max_points is None or (isinstance(self.max_points, int) and self.max_points >= 1),
                f"expected kmeans max_points >= 1 or None, got {self.max_points!r}")


@dataclass(frozen=True)
class SACBNetConfig:
    """Architecture of SACB-Net.

    Attributes:
        in_channels: image channels (1 for the paper's grey-value images).
        base_channels: ``c`` of the authors' code; level ``i`` has ``2c, 4c, 8c, 16c, 16c``
            feature channels for ``i = 1..5``.
        clusters: number of k-means clusters of the SACB blocks at levels 2, 3, 4, 5 (in that
            order). An integer applies to all four blocks. Clusters carry no weights, so a trained
            model can run with other values.
        cluster_feature: ``"spatial" | "channel" | "both"`` (paper Table 4).
        kernel_size: size of the unfolded patches and the adaptive kernel (odd).
        search_window: size of the similarity-matching neighbourhood (odd).
        kernel_hidden: width of the kernel-attention MLP (paper code: 128).
        bias_hidden: width of the bias MLP (paper code: 64).
        negative_slope: slope of every LeakyReLU.
        kmeans: settings of the k-means clustering.
    """

    in_channels: int = 1
    base_channels: int = 4
    clusters: tuple = (7, 7, 7, 7)
    cluster_feature: str = "spatial"
    kernel_size: int = 3
    search_window: int = 3
    kernel_hidden: int = 128
    bias_hidden: int = 64
    negative_slope: float = 0.1
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)

    def __post_init__(self) -> None:
        clusters = self.clusters
        if isinstance(clusters, int):
            clusters = (clusters,) * len(SACB_LEVELS)
        clusters = tuple(clusters)
        object.__setattr__(self, "clusters", clusters)
        if isinstance(self.kmeans, Mapping):
            object.__setattr__(self, "kmeans", KMeansConfig(**self.kmeans))
        _expect(len(clusters) == len(SACB_LEVELS) and all(isinstance(n, int) and n >= 1 for n in clusters),
                f"expected clusters as one integer >= 1 or four (levels 2, 3, 4, 5), got {self.clusters!r}")
        _expect(self.cluster_feature in CLUSTER_FEATURES,
                f"expected cluster_feature in {CLUSTER_FEATURES}, got {self.cluster_feature!r}")
        for name in ("in_channels", "base_channels", "kernel_hidden", "bias_hidden"):
            value = getattr(self, name)
            _expect(isinstance(value, int) and value >= 1, f"expected {name} >= 1, got {value!r}")
        for name in ("kernel_size", "search_window"):
            value = getattr(self, name)
            _expect(isinstance(value, int) and value >= 1 and value % 2 == 1,
                    f"expected an odd {name} >= 1, got {value!r}")
        _expect(self.negative_slope >= 0, f"expected negative_slope >= 0, got {self.negative_slope!r}")
        _expect(isinstance(self.kmeans, KMeansConfig), f"expected a KMeansConfig, got {self.kmeans!r}")

    @property
    def level_channels(self) -> tuple:
        """Feature channels at levels 1..5."""
        c = self.base_channels
        return (2 * c, 4 * c, 8 * c, 16 * c, 16 * c)

    def clusters_at(self, level: int) -> int:
        """Number of clusters of the SACB block at ``level`` (2..5)."""
        return self.clusters[SACB_LEVELS.index(level)]

    def replace(self, **changes: Any) -> "SACBNetConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-compatible dictionary (lists instead of tuples)."""
        data = dataclasses.asdict(self)
        data["clusters"] = list(self.clusters)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SACBNetConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (they signal a newer format)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        _expect(not unknown, f"expected SACBNetConfig keys {sorted(known)}, got unknown keys {unknown}")
        data = dict(data)
        if "kmeans" in data and isinstance(data["kmeans"], Mapping):
            kmeans_known = {f.name for f in dataclasses.fields(KMeansConfig)}
            kmeans_unknown = sorted(set(data["kmeans"]) - kmeans_known)
            _expect(not kmeans_unknown,
                    f"expected KMeansConfig keys {sorted(kmeans_known)}, got unknown keys {kmeans_unknown}")
            data["kmeans"] = KMeansConfig(**data["kmeans"])
        if "clusters" in data and isinstance(data["clusters"], list):
            data["clusters"] = tuple(data["clusters"])
        return cls(**data)
