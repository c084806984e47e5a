"""Deterministic, bounded k-means in torch (the clustering of SACB, paper Eq. 3-4).

Shapes: points ``(B, P, F)`` (B samples, P points, F features); every sample is clustered on
its own. The result depends only on the points, ``k`` and the settings, never on global random
state or on the other samples of the batch:

- greedy k-means++ initialisation (as scikit-learn's), driven by a CPU ``torch.Generator``
  seeded per sample, so the same random draws are used on every device;
- Lloyd iterations with an iteration cap and scikit-learn's relative tolerance;
- an empty cluster is moved to the point farthest from its centroid;
- cluster sums use a one-hot matrix product, which is deterministic on CUDA too (scatter-adds
  with float atomics are not);
- clusters are finally ordered by the sum of their centroid's features, so label maps are stable
  and comparable between images.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch


class KMeansResult(NamedTuple):
    """Labels ``(B, P)`` int64 in ``[0, k)``, centroids ``(B, k, F)``, inertia ``(B,)`` (sum of
    squared distances of every point to its centroid) and the Lloyd iterations run ``(B,)``."""

    labels: torch.Tensor
    centroids: torch.Tensor
    inertia: torch.Tensor
    iterations: torch.Tensor


def _shifted_distances(points_t: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``||c||^2 - 2 c.x`` ``(K, P)``: squared distances minus the per-point ``||x||^2``, enough
    to find the nearest centroid at a third of the memory traffic. ``points_t``: the points
    transposed, ``(F, P)`` contiguous; ``centroids`` ``(K, F)``. A few centroids against many
    points multiply about three times faster on a CPU this way round than as ``(P, F) @ (F, K)``
    (oneDNN / MKL with a 7-column output), and the points are transposed once per clustering."""
    return torch.addmm((centroids * centroids).sum(-1, keepdim=True), centroids, points_t, alpha=-2)


def _squared_distances(points_t: torch.Tensor, norms: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``(K, P)`` squared Euclidean distances, clamped at zero; ``norms``: ``||x||^2`` ``(P,)``."""
    return _shifted_distances(points_t, centroids).add_(norms).clamp_min_(0)


def _uniform(generator: torch.Generator, n: int) -> torch.Tensor:
    """``n`` uniform draws in [0, 1) from a CPU generator (device-independent), float64."""
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _sample_by_weight(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices drawn with probability proportional to ``weights`` (P,), one per value of ``u``."""
    cdf = torch.cumsum(weights.double(), 0)
    total = cdf[-1]
    if not torch.isfinite(total) or total <= 0:  # every point sits on a centre: draw uniformly
        return (u * weights.numel()).long().clamp_(max=weights.numel() - 1).to(weights.device)
    idx = torch.searchsorted(cdf, (u.to(cdf.device) * total).unsqueeze(-1)).squeeze(-1)
    return idx.clamp_(max=weights.numel() - 1)


def kmeans_plusplus(points: torch.Tensor, k: int, generator: torch.Generator,
                    n_local_trials: Optional[int] = None, points_t: Optional[torch.Tensor] = None,
                    norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy k-means++ seeding of one sample: ``(P, F) -> (k, F)`` initial centroids.

    Each new centre is the best (lowest potential) of ``2 + ln k`` candidates drawn with
    probability proportional to the squared distance to the nearest chosen centre. ``points_t``
    ``(F, P)`` and ``norms`` ``(P,)`` (the points transposed and their squared norms) are computed
    when not given.
    """
    n = points.shape[0]
    points_t = points.t().contiguous() if points_t is None else points_t
    norms = (points * points).sum(-1) if norms is None else norms
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))
    first = int(_uniform(generator, 1).item() * n) % n
    centres = [points[first]]
    closest = _squared_distances(points_t, norms, points[first:first + 1]).squeeze(0)  # (P,)
    for _ in range(1, k):
        candidates = _sample_by_weight(closest, _uniform(generator, trials))  # (T,)
        dist = _squared_distances(points_t, norms, points[candidates])  # (T, P)
        candidate_closest = torch.minimum(closest.unsqueeze(0), dist)  # (T, P)
        best = int(candidate_closest.sum(1).argmin().item())
        centres.append(points[candidates[best]])
        closest = candidate_closest[best]
    return torch.stack(centres)


def _lloyd(points: torch.Tensor, points_t: torch.Tensor, norms: torch.Tensor, centroids: torch.Tensor,
           max_iter: int, tol_abs: float):
    """Lloyd iterations of one sample until the squared centre shift is <= ``tol_abs``: ``points``
    ``(P, F)``, ``points_t`` ``(F, P)`` the same transposed, ``norms`` ``||x||^2`` ``(P,)``."""
    k = centroids.shape[0]
    clusters = torch.arange(k, device=points.device).unsqueeze(1)  # (K, 1)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        dist = _shifted_distances(points_t, centroids)  # (K, P), minus ||x||^2
        nearest, labels = dist.min(0)  # (P,), (P,)
        one_hot = (labels.unsqueeze(0) == clusters).to(points.dtype)  # (K, P)
        counts = one_hot.sum(1)  # (K,)
        sums = one_hot @ points  # (K, F)
        new = sums / counts.clamp_min(1).unsqueeze(1)
        empty = counts == 0
        if bool(empty.any()):
            # move each empty cluster to one of the points worst served by its centroid
            far = torch.topk(nearest + norms, int(empty.sum().item())).indices
            new[empty] = points[far]
        shift = float(((new - centroids) ** 2).sum().item())
        centroids = new
        if shift <= tol_abs:
            break
    return centroids, iterations


def kmeans(points: torch.Tensor, k: int, *, max_iter: int = 50, tol: float = 1e-4, seed: int = 0,
           max_points: Optional[int] = None) -> KMeansResult:
    """Cluster each sample of ``points`` ``(B, P, F)`` into ``k`` groups.

    Args:
        points: float tensor ``(B, P, F)``; computed in float32 (or float64 if given), without
            autograd and outside autocast.
        k: number of clusters, ``1 <= k``. With ``k = 1`` the centroid is the mean.
        max_iter: Lloyd iteration cap.
        tol: relative tolerance (times the mean per-feature variance of the sample).
        seed: seed of each sample's generator.
        max_points: fit centroids on at most this many points drawn with the seeded generator
            (then assign all points); ``None`` uses all points.

    Returns:
        :class:`KMeansResult`; labels index the centroids, which are ordered by the sum of
        their features.
    """
    if points.dim() != 3:
        raise ValueError(f"expected points of shape (B, P, F), got {tuple(points.shape)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"expected k >= 1 clusters, got {k!r}")
    if points.shape[1] < 1:
        raise ValueError("expected at least one point per sample, got 0")
    device_type = points.device.type
    with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
        data = points.detach()
        if data.dtype not in (torch.float32, torch.float64):
            data = data.float()
        labels_out, centroids_out, inertia_out, iterations_out = [], [], [], []
        for sample in data:  # (P, F)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            n = sample.shape[0]
            fit = sample
            if max_points is not None and n > max_points:
                subset = torch.randperm(n, generator=generator)[:max_points].sort().values
                fit = sample[subset.to(sample.device)]
            kk = min(k, fit.shape[0])
            variance = fit.var(0, unbiased=False).mean()
            tol_abs = float(variance.item()) * tol
            fit_t = fit.t().contiguous()  # (F, P'): the layout the distances are computed in
            fit_norms = (fit * fit).sum(-1)  # (P',)
            centroids = kmeans_plusplus(fit, kk, generator, points_t=fit_t, norms=fit_norms)
            centroids, iterations = _lloyd(fit, fit_t, fit_norms, centroids, max_iter, tol_abs)
            if kk < k:  # fewer points than clusters: pad with copies (those clusters stay empty)
                centroids = torch.cat([centroids, centroids[-1:].expand(k - kk, -1)])
            # order clusters by the sum of their features: label maps become stable
            order = torch.argsort(centroids.sum(1), stable=True)
            centroids = centroids[order]
            # every point assigned: the fitted layout again when the fit used all of them
            sample_t, norms = (fit_t, fit_norms) if fit is sample else (sample.t().contiguous(), (sample * sample).sum(-1))
            nearest, labels = _shifted_distances(sample_t, centroids).min(0)  # (P,), (P,)
            labels_out.append(labels)
            centroids_out.append(centroids)
            inertia_out.append((nearest + norms).clamp_min_(0).sum())
            iterations_out.append(iterations)
        return KMeansResult(
            labels=torch.stack(labels_out),
            centroids=torch.stack(centroids_out),
            inertia=torch.stack(inertia_out),
            iterations=torch.tensor(iterations_out),
        )
