"""Regularity of displacement fields: Jacobian determinant, folding percentage, SDlogJ.

A displacement ``u`` ``(3, D, H, W)`` has components in array-axis order (``(d, h, w)``, the
network's voxel convention). The map is ``phi(p) = p + u(p)`` and its Jacobian
``J = I + grad u`` is taken with central differences (one-sided at the borders,
``np.gradient``). Pass ``spacing`` (array-axis order) when ``u`` is in millimetres; for a
voxel-unit ``u`` leave it out. The determinant is the same in voxel and physical frames, since
they differ by a similarity.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def _check_field(disp: np.ndarray) -> np.ndarray:
    disp = np.asarray(disp, dtype=np.float64)
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise ValueError(f"expected a displacement of shape (3, D, H, W), got {disp.shape}")
    if min(disp.shape[1:]) < 2:
        raise ValueError(f"expected at least 2 voxels along every axis, got {disp.shape[1:]}")
    if not np.isfinite(disp).all():
        raise ValueError("expected a finite displacement, got NaN or Inf")
    return disp


def jacobian_matrix(disp: np.ndarray, spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """``(D, H, W, 3, 3)`` Jacobian of ``p -> p + u(p)``; ``J[..., i, j] = d phi_i / d x_j``."""
    disp = _check_field(disp)
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise ValueError(f"expected 3 positive spacings, got {spacing}")
    jac = np.empty(disp.shape[1:] + (3, 3))
    for i in range(3):
        grads = np.gradient(disp[i], *spacing)
        for j in range(3):
            jac[..., i, j] = grads[j] + (1.0 if i == j else 0.0)
    return jac


def jacobian_determinant(disp: np.ndarray, spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """``(D, H, W)`` determinant of the Jacobian of ``p -> p + u(p)``."""
    return np.linalg.det(jacobian_matrix(disp, spacing))


def _masked(values: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    if mask is None:
        return values.ravel()
    mask = np.asarray(mask, bool)
    if mask.shape != values.shape:
        raise ValueError(f"expected a mask of shape {values.shape}, got {mask.shape}")
    return values[mask]


def negative_jacobian_percent(disp: np.ndarray, mask: Optional[np.ndarray] = None,
                              spacing: Optional[Sequence[float]] = None) -> float:
    """Percentage of voxels (inside ``mask``) whose Jacobian determinant is negative: |J|<0 %."""
    det = _masked(jacobian_determinant(disp, spacing), mask)
    return float(100.0 * np.mean(det < 0)) if det.size else float("nan")


def sdlogj(disp: np.ndarray, mask: Optional[np.ndarray] = None, spacing: Optional[Sequence[float]] = None,
           floor: float = 1e-9) -> float:
    """Standard deviation of ``log |J|`` (inside ``mask``), determinants clipped at ``floor``."""
    det = _masked(jacobian_determinant(disp, spacing), mask)
    return float(np.log(np.clip(det, floor, None)).std()) if det.size else float("nan")
