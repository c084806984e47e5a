"""Grids and coordinate frames of the pipeline.

Frames (every field below says which one it is in):

* **network voxels**: the displacement the network returns, ``(3, D, H, W)`` on the network grid,
  components in tensor-axis order ``(d, h, w)``. SimpleITK arrays are ``(z, y, x)``, i.e. tensor
  axis ``d`` is ITK index axis ``k`` (the image's third axis), ``h`` is ``j`` and ``w`` is ``i``.
* **physical (LPS mm)**: ITK's world frame. A displacement-field transform maps a point ``x`` of
  the fixed image to ``x + w(x)`` in the moving image ("fixed to moving", what resampling uses).

The network grid shares the fixed image's direction, has the model's spacing, covers the fixed
image's physical extent (centred on it) and is padded to a multiple of 16 voxels per axis.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..networks.config import SIZE_MULTIPLE


def direction_matrix(image: sitk.Image) -> np.ndarray:
    return np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)


def network_grid(fixed: sitk.Image, spacing_mm: Sequence[float], multiple: int = SIZE_MULTIPLE) -> sitk.Image:
    """Empty float32 image defining the network grid for ``fixed`` (see the module docstring)."""
    spacing = np.array([float(s) for s in spacing_mm])
    extent = (np.array(fixed.GetSize()) - 1) * np.array(fixed.GetSpacing())  # per index axis (i, j, k), mm
    needed = np.floor(extent / spacing + 1e-6).astype(int) + 1
    size = np.maximum(multiple, np.ceil(needed / multiple).astype(int) * multiple)
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in fixed.GetSize()]))
    origin = centre - direction_matrix(fixed) @ ((size - 1) * spacing / 2.0)
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetDirection(fixed.GetDirection())
    grid.SetOrigin([float(o) for o in origin])
    return grid


def level_grid(grid: sitk.Image, scale: float) -> sitk.Image:
    """The grid over ``grid``'s extent with ``scale`` times its spacing (a pyramid level, or an
    instance-optimisation level): voxel ``q`` covers ``grid`` voxels ``scale q .. scale (q + 1)``, so
    its centre sits at ``grid`` index ``scale q + (scale - 1) / 2``."""
    size = [int(round(n / scale)) for n in grid.GetSize()]
    spacing = np.array(grid.GetSpacing()) * scale
    origin = np.array(grid.GetOrigin()) + direction_matrix(grid) @ (np.array(grid.GetSpacing()) * (scale - 1) / 2.0)
    out = sitk.Image(size, sitk.sitkFloat32)
    out.SetSpacing([float(v) for v in spacing])
    out.SetOrigin([float(v) for v in origin])
    out.SetDirection(grid.GetDirection())
    return out


def voxel_displacement_to_physical(disp: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """Network-voxel displacement ``(3, D, H, W)`` (components ``(d, h, w)``) on ``grid`` ->
    physical displacement ``(D, H, W, 3)`` (LPS mm, components ``(x, y, z)``) on the same grid."""
    disp = np.asarray(disp, dtype=np.float64)
    if disp.ndim != 4 or disp.shape[0] != 3 or disp.shape[1:] != tuple(reversed(grid.GetSize())):
        raise ValueError(f"expected a displacement (3, {', '.join(map(str, reversed(grid.GetSize())))}), got {disp.shape}")
    # axis flip: components (d, h, w) are the ITK index axes (k, j, i); reorder to (i, j, k)
    index_mm = disp[::-1] * np.array(grid.GetSpacing()).reshape(3, 1, 1, 1)
    # index-axis vectors to LPS: x_lps = Direction @ (spacing * index offset), (3, D, H, W) -> (D, H, W, 3)
    return apply_matrix(np.moveaxis(index_mm, 0, -1), direction_matrix(grid))


def vector_image(field: np.ndarray, reference: sitk.Image, pixel=sitk.sitkVectorFloat64) -> sitk.Image:
    """``(D, H, W, 3)`` array -> vector image with ``reference``'s geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(field), isVector=True)
    image.CopyInformation(reference)
    return image if image.GetPixelID() == pixel else sitk.Cast(image, pixel)  # a Cast to the same type copies


def apply_matrix(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``points @ matrix.T`` for ``(..., 3)`` points, written out component by component: a BLAS
    matrix product may split the work differently from run to run (threads, kernels), which changes
    the last bits; this keeps registrations bit-identical run to run."""
    out = np.empty(points.shape, np.float64)
    for row in range(3):
        out[..., row] = points[..., 0] * matrix[row, 0] + points[..., 1] * matrix[row, 1] + points[..., 2] * matrix[row, 2]
    return out


def physical_points(reference: sitk.Image) -> np.ndarray:
    """``(D, H, W, 3)`` LPS coordinates (mm) of every voxel centre of ``reference``."""
    size = reference.GetSize()
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in reversed(size)], indexing="ij"), -1)
    index_xyz = index[..., ::-1]  # (k, j, i) -> (i, j, k): axis flip to ITK index order
    scaled = index_xyz * np.array(reference.GetSpacing())
    return np.array(reference.GetOrigin()) + apply_matrix(scaled, direction_matrix(reference))


def affine_parts(transform: Optional[sitk.Transform]) -> Tuple[np.ndarray, np.ndarray]:
    """``(M, b)`` with ``T(x) = M x + b`` for an affine-family SimpleITK transform (identity for None)."""
    if transform is None:
        return np.eye(3), np.zeros(3)
    try:
        matrix = np.array(transform.GetMatrix()).reshape(3, 3)
        centre = np.array(transform.GetCenter())
        translation = np.array(transform.GetTranslation())
    except (AttributeError, RuntimeError):
        raise ValueError(f"expected an affine-family transform, got {transform.GetName()}") from None
    return matrix, centre + translation - matrix @ centre


def _interpolate_axis(array: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``array`` along ``axis`` at continuous indices ``positions``, clamped
    to the first / last sample (ITK's linear interpolation within half a voxel of the border)."""
    n = array.shape[axis]
    positions = np.clip(positions, 0.0, n - 1)
    below = np.minimum(np.floor(positions).astype(np.intp), max(n - 2, 0))
    weight = (positions - below).astype(array.dtype)
    above = np.minimum(below + 1, n - 1)
    shape = [1] * array.ndim
    shape[axis] = len(positions)
    weight = weight.reshape(shape)
    # below + weight * (above - below), in place: two arrays of the output's size instead of five
    out = np.take(array, below, axis)
    step = np.take(array, above, axis)
    step -= out
    step *= weight
    out += step
    return out


def reference_positions(field_grid: sitk.Image, reference: sitk.Image) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Continuous ``field_grid`` indices of ``reference``'s voxel centres along the array axes
    ``(d, h, w)``: one 1D array per axis.

    ``field_grid`` must share ``reference``'s direction (the network grid and its levels do), so
    each reference index axis maps linearly onto one ``field_grid`` index axis and trilinear
    interpolation between the two is three 1D interpolations."""
    if not np.allclose(direction_matrix(field_grid), direction_matrix(reference), atol=1e-6):
        raise ValueError("expected a field grid with the reference image's direction")
    ref_spacing, grid_spacing = np.array(reference.GetSpacing()), np.array(field_grid.GetSpacing())
    # reference index (i, j, k) -> field-grid continuous index: offset + (ref spacing / grid spacing) * index
    offset = direction_matrix(reference).T @ (np.array(reference.GetOrigin()) - np.array(field_grid.GetOrigin())) / grid_spacing
    ratio = ref_spacing / grid_spacing
    return tuple(offset[index_axis] + ratio[index_axis] * np.arange(reference.GetSize()[index_axis], dtype=np.float64)
                 for index_axis in (2, 1, 0))  # axis flip: array axes (d, h, w) are index axes (k, j, i)


def interpolate_rows(components: np.ndarray, positions: Sequence[np.ndarray], rows: slice = slice(None)) -> np.ndarray:
    """``(C, D', H', W')`` values on a field grid -> ``(C, R, H, W)`` float32 on the reference voxels
    of :func:`reference_positions` (``positions``), for the reference rows ``rows`` of array axis
    ``d`` only (all of them by default): trilinear, clamped at the border like ITK's, the rows first
    so that a slab costs its share of the work."""
    out = np.asarray(components, np.float32)
    out = _interpolate_axis(out, 1, positions[0][rows])  # (C, R, H', W')
    out = _interpolate_axis(out, 2, positions[1])  # (C, R, H, W')
    return _interpolate_axis(out, 3, positions[2])  # (C, R, H, W)


def field_on_reference(field: np.ndarray, field_grid: sitk.Image, reference: sitk.Image,
                       affine: Optional[sitk.Transform]) -> np.ndarray:
    """Displacement ``w`` (LPS mm, ``(D, H, W, 3)`` float32) on ``reference``'s voxels of the map
    ``x -> A(x + v(x))``, where ``v`` is ``field`` (``(D', H', W', 3)`` LPS mm) on ``field_grid`` and
    ``A`` the pre-alignment (fixed -> moving), or the identity for None.

    ``field_grid`` shares ``reference``'s direction (:func:`reference_positions`): the same values
    as ``sitk.Resample`` of ``field`` (and as the ``DisplacementFieldTransform`` on ``field_grid``
    evaluates), without building ITK's point by point evaluation. Float32 (sub-micrometre for
    fields and images of a few hundred mm), deterministic.
    """
    positions = reference_positions(field_grid, reference)
    components, _ = array_components(np.asarray(field, np.float32), field_grid)  # (3, D', H', W') mm along (d, h, w)
    return composed_rows(interpolate_rows(components, positions), reference, affine)


def composed_with_affine(field: np.ndarray, grid: sitk.Image, affine: Optional[sitk.Transform]) -> np.ndarray:
    """Displacement ``w`` (LPS mm, ``(D, H, W, 3)`` float32) on ``grid``'s voxels of ``x -> A(x + v(x))``
    for ``v`` = ``field`` on the same grid (``field`` itself, as float32, when ``affine`` is None)."""
    v = np.asarray(field, np.float32)
    if affine is None:
        return np.ascontiguousarray(v)
    return composed_rows(array_components(v, grid)[0], grid, affine)


def composed_rows(v: np.ndarray, grid: sitk.Image, affine: Optional[sitk.Transform], first_row: int = 0,
                  out: Optional[np.ndarray] = None) -> np.ndarray:
    """Displacement ``w`` (LPS mm, ``(R, H, W, 3)`` float32) of the map ``x -> A(x + v(x))`` on the
    rows ``first_row .. first_row + R - 1`` of ``grid``'s array axis ``d``, from ``v`` on those rows
    as ``(3, R, H, W)`` components along the array axes ``(d, h, w)`` in mm (:func:`array_components`);
    ``A`` is the pre-alignment (fixed -> moving), or the identity for None. Written into ``out``
    when given (e.g. a slab of a whole grid's array)."""
    # w(x) = M D v_ijk(x) + (M - I) x + b, with x = origin + D diag(spacing) index and v_ijk the
    # components along the index axes (i, j, k), i.e. v[2], v[1], v[0] (axis flip from (d, h, w))
    matrix, translation = affine_parts(affine) if affine is not None else (np.eye(3), np.zeros(3))
    direction = direction_matrix(grid)
    along = matrix @ direction  # column a: LPS displacement per mm of v along index axis a
    linear = (matrix - np.eye(3)) @ direction * np.array(grid.GetSpacing())  # column a: per step of index axis a
    constant = (matrix - np.eye(3)) @ np.array(grid.GetOrigin()) + translation
    rows = v.shape[1]
    size = grid.GetSize()
    steps = (np.arange(size[0], dtype=np.float32)[None, None, :],  # i along array axis w
             np.arange(size[1], dtype=np.float32)[None, :, None],  # j along h
             np.arange(first_row, first_row + rows, dtype=np.float32)[:, None, None])  # k along d
    out = np.empty(v.shape[1:] + (3,), np.float32) if out is None else out
    for row in range(3):
        component = out[..., row]
        component.fill(np.float32(constant[row]))
        for axis in range(3):  # index axis i, j, k: v[2 - axis], steps[axis]
            if along[row, axis] != 0:  # an identity direction without pre-alignment skips 6 of 9 products
                component += v[2 - axis] * np.float32(along[row, axis])
            if linear[row, axis] != 0:
                component += steps[axis] * np.float32(linear[row, axis])
    return out


def field_in_index_frame(field: sitk.Image) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    """Physical displacement image (LPS mm) -> ``(3, D, H, W)`` components along the array axes
    ``(d, h, w)`` in mm, and the array-order spacing: the input of the Jacobian metrics."""
    return array_components(sitk.GetArrayFromImage(field).astype(np.float64), field)


def array_components(field: np.ndarray, grid: sitk.Image) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    """``(D, H, W, 3)`` LPS mm displacement on ``grid`` -> ``(3, D, H, W)`` components along the array
    axes ``(d, h, w)`` in mm (the input dtype kept), and the array-order spacing."""
    direction = direction_matrix(grid)
    along_index = np.empty(field.shape, field.dtype)  # components along (i, j, k): D^T w, written out
    for axis in range(3):
        along_index[..., axis] = (field[..., 0] * direction[0, axis] + field[..., 1] * direction[1, axis]
                                  + field[..., 2] * direction[2, axis])
    components = np.moveaxis(along_index[..., ::-1], -1, 0)  # axis flip (i, j, k) -> (d, h, w)
    return components, tuple(reversed(grid.GetSpacing()))


def physical_to_voxel_displacement(field: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """Inverse of :func:`voxel_displacement_to_physical`: ``(D, H, W, 3)`` LPS mm -> ``(3, D, H, W)``
    network voxels, components ``(d, h, w)``."""
    along_index = apply_matrix(np.asarray(field, np.float64), direction_matrix(grid).T)  # D^T w: (i, j, k) mm
    voxels = along_index / np.array(grid.GetSpacing())
    return np.moveaxis(voxels[..., ::-1], -1, 0)  # axis flip to (d, h, w)
