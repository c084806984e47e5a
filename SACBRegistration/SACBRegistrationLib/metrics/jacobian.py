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
    disp = np.asarray(disp)
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise ValueError(f"expected a displacement of shape (3, D, H, W), got {disp.shape}")
    if min(disp.shape[1:]) < 2:
        raise ValueError(f"expected at least 2 voxels along every axis, got {disp.shape[1:]}")
    if not np.isfinite(disp).all():
        raise ValueError("expected a finite displacement, got NaN or Inf")
    return disp


def jacobian_determinant(disp: np.ndarray, spacing: Optional[Sequence[float]] = None,
                         dtype=np.float32) -> np.ndarray:
    """``(D, H, W)`` determinant of the Jacobian of ``p -> p + u(p)``.

    Computed by cofactor expansion along the first row, so at most six of the nine derivative
    arrays are held at once, in ``dtype`` (float32: ample for determinants near 1, and half
    the memory of float64 on large volumes).
    """
    disp = _check_field(disp)
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise ValueError(f"expected 3 positive spacings, got {spacing}")

    def row(i: int):
        grads = [g.astype(dtype, copy=False) for g in np.gradient(disp[i].astype(dtype), *spacing)]
        grads[i] += 1  # d phi_i / d x_i = 1 + d u_i / d x_i
        return grads

    j1, j2 = row(1), row(2)
    c0 = j1[1] * j2[2] - j1[2] * j2[1]
    c1 = j1[0] * j2[2] - j1[2] * j2[0]
    c2 = j1[0] * j2[1] - j1[1] * j2[0]
    del j1, j2
    j0 = row(0)
    return j0[0] * c0 - j0[1] * c1 + j0[2] * c2


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
