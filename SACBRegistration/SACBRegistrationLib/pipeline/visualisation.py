"""Pictures of a registration: the RGB displacement image and a PNG overview.

Drawn with numpy and written with SimpleITK (no plotting library needed). Slices are shown in
radiological convention after reorienting to LPS: axial with anterior up and the patient's left
on the right of the picture; coronal and sagittal with superior up.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..preprocessing import sampled_percentiles

PANEL = 180
"""Panel size in pixels."""

# 5 x 7 bitmap font: each glyph is 7 rows of 5 bits (most significant bit = leftmost pixel)
_FONT = {
    "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30), "C": (14, 17, 16, 16, 16, 17, 14),
    "D": (28, 18, 17, 17, 17, 18, 28), "E": (31, 16, 16, 30, 16, 16, 31), "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17), "I": (14, 4, 4, 4, 4, 4, 14),
    "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17), "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17), "O": (14, 17, 17, 17, 17, 17, 14),
    "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13), "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4), "U": (17, 17, 17, 17, 17, 17, 14),
    "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10), "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 10, 4, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12), " ": (0, 0, 0, 0, 0, 0, 0), ".": (0, 0, 0, 0, 0, 12, 12),
    "-": (0, 0, 0, 31, 0, 0, 0), ">": (8, 4, 2, 1, 2, 4, 8), "<": (2, 4, 8, 16, 8, 4, 2),
    "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8), ":": (0, 12, 12, 0, 12, 12, 0),
    "%": (24, 25, 2, 4, 8, 19, 3), "/": (0, 1, 2, 4, 8, 16, 0), "=": (0, 0, 31, 0, 31, 0, 0),
    "+": (0, 4, 4, 31, 4, 4, 0), ",": (0, 0, 0, 0, 12, 4, 8), "|": (4, 4, 4, 4, 4, 4, 4), "_": (0, 0, 0, 0, 0, 0, 31),
}

PALETTE = np.array([
    [0, 0, 0], [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
    [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207], [174, 199, 232], [255, 187, 120],
    [152, 223, 138], [255, 152, 150], [197, 176, 213], [196, 156, 148],
], dtype=np.uint8)
"""Label colours (label 0 black, then the tab20-like colours, cycled)."""


def draw_text(canvas: np.ndarray, text: str, row: int, col: int, scale: int = 2,
              colour: Sequence[int] = (255, 255, 255)) -> None:
    """Write ``text`` (upper-cased; unknown characters become spaces) into an RGB canvas."""
    for i, char in enumerate(text.upper()):
        glyph = _FONT.get(char, _FONT[" "])
        for r, bits in enumerate(glyph):
            for c in range(5):
                if bits & (1 << (4 - c)):
                    y, x = row + r * scale, col + (i * 6 + c) * scale
                    canvas[y:y + scale, x:x + scale] = colour


def displacement_rgb(displacement: sitk.Image, percentile: float = 99.0) -> sitk.Image:
    """RGB picture of a displacement field (as the paper's figures): the x, y, z (LPS)
    components become R, G, B around mid-grey (no displacement), scaled by the
    ``percentile``-th percentile of their magnitudes (:func:`sampled_percentiles`). ``sitkVectorUInt8``
    on the field's grid."""
    w = sitk.GetArrayViewFromImage(displacement)
    scale = max(float(sampled_percentiles(np.abs(w), percentile)), 1e-6)
    rgb = np.clip(0.5 + 0.5 * w / scale, 0.0, 1.0)
    image = sitk.GetImageFromArray(np.round(255 * rgb).astype(np.uint8), isVector=True)
    image.CopyInformation(displacement)
    return image


def _oriented(image: sitk.Image) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    oriented = sitk.DICOMOrient(image, "LPS")
    return sitk.GetArrayFromImage(oriented), oriented.GetSpacing()


def _slices(array: np.ndarray, spacing: Sequence[float]) -> List[Tuple[np.ndarray, float, float]]:
    """Axial, coronal, sagittal middle slices ``(slice, row spacing, column spacing)`` of an LPS
    array ``(z, y, x[, c])``; superior goes up in coronal and sagittal views."""
    sx, sy, sz = spacing
    z, y, x = (n // 2 for n in array.shape[:3])
    return [(array[z], sy, sx), (array[::-1, y], sz, sx), (array[::-1, :, x], sz, sy)]


def _fit(panel: np.ndarray, row_spacing: float, col_spacing: float, order: int) -> np.ndarray:
    """Resample a slice to square pixels and fit it (centred) into a ``PANEL`` square."""
    from scipy import ndimage  # here, not at import: only the overview needs SciPy

    height, width = panel.shape[0] * row_spacing, panel.shape[1] * col_spacing
    pixel = max(height, width) / PANEL
    zoom = (row_spacing / pixel, col_spacing / pixel) + ((1,) if panel.ndim == 3 else ())
    resized = ndimage.zoom(panel, zoom, order=order, mode="nearest")[:PANEL, :PANEL]
    out = np.zeros((PANEL, PANEL) + panel.shape[2:], dtype=resized.dtype)
    r0, c0 = (PANEL - resized.shape[0]) // 2, (PANEL - resized.shape[1]) // 2
    out[r0:r0 + resized.shape[0], c0:c0 + resized.shape[1]] = resized
    return out


def _grey(panel: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = np.clip((panel - low) / max(high - low, 1e-9), 0, 1)
    return np.repeat(np.round(255 * scaled).astype(np.uint8)[..., None], 3, -1)


def overview(fixed: sitk.Image, moving_before: sitk.Image, warped: sitk.Image, rgb: sitk.Image,
             clusters: Optional[sitk.Image] = None, footer: Sequence[str] = ()) -> np.ndarray:
    """``(H, W, 3)`` uint8 picture: rows axial / coronal / sagittal; columns fixed, moving (before,
    on the fixed grid), warped, checkerboard of fixed and warped, RGB displacement, clusters."""
    f_arr, spacing = _oriented(fixed)
    m_arr, _ = _oriented(moving_before)
    w_arr, _ = _oriented(warped)
    rgb_arr, rgb_spacing = _oriented(rgb)  # on the field's own grid (centred on the fixed image)
    low, high = sampled_percentiles(f_arr, [1, 99.5])
    m_low, m_high = sampled_percentiles(m_arr, [1, 99.5])
    columns: List[Tuple[str, List[np.ndarray]]] = []
    for title, arr, window in (("FIXED", f_arr, (low, high)), ("MOVING", m_arr, (m_low, m_high)),
                               ("WARPED", w_arr, (m_low, m_high))):
        columns.append((title, [_grey(_fit(s, rs, cs, 1), *window) for s, rs, cs in _slices(arr, spacing)]))
    tiles = ((np.arange(PANEL)[:, None] // (PANEL // 8)) + (np.arange(PANEL)[None, :] // (PANEL // 8))) % 2 == 0
    # the fixed and warped panels drawn above, alternating in tiles
    checker = [np.where(tiles[..., None], a, b) for a, b in zip(columns[0][1], columns[2][1])]
    columns.append(("CHECKERBOARD", checker))
    columns.append(("DISPLACEMENT", [_fit(s, rs, cs, 1).astype(np.uint8) for s, rs, cs in _slices(rgb_arr, rgb_spacing)]))
    if clusters is not None:
        c_arr, c_spacing = _oriented(clusters)  # on the level's own grid (centred on the fixed image)
        columns.append(("CLUSTERS L2", [PALETTE[_fit(s, rs, cs, 0) % len(PALETTE)] for s, rs, cs in _slices(c_arr, c_spacing)]))
    title_h, gap = 26, 4
    footer_h = 8 + 18 * len(footer)
    height = title_h + 3 * (PANEL + gap) + footer_h
    width = len(columns) * (PANEL + gap) + gap
    canvas = np.full((height, width, 3), 24, np.uint8)
    for c, (title, panels) in enumerate(columns):
        left = gap + c * (PANEL + gap)
        draw_text(canvas, title, 6, left + max(0, (PANEL - 12 * len(title)) // 2))
        for r, panel in enumerate(panels):
            top = title_h + r * (PANEL + gap)
            canvas[top:top + PANEL, left:left + PANEL] = panel
    for i, line in enumerate(footer):
        draw_text(canvas, line, title_h + 3 * (PANEL + gap) + 4 + 18 * i, gap)
    return canvas


def write_png(rgb: np.ndarray, path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(rgb), isVector=True), str(path))
