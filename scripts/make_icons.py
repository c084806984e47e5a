#!/usr/bin/env python
"""Draw the module / extension icon and the sample-data thumbnail (deterministic).

    python scripts/make_icons.py
"""

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from SACBRegistrationLib.pipeline.visualisation import draw_text, write_png

ROOT = Path(__file__).resolve().parents[1]
ICONS = ROOT / "SACBRegistration" / "Resources" / "Icons"


def icon(size: int = 128) -> np.ndarray:
    """A smooth displacement field drawn as colours, with a grid deformed by it, and 'SACB'."""
    rng = np.random.default_rng(7)
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal((size, size)), 14) for _ in range(3)], -1)
    field /= np.abs(field).max()
    rgb = np.clip(0.5 + 0.45 * field, 0, 1)
    y, x = np.mgrid[0:size, 0:size].astype(float)
    yy, xx = y + 9 * field[..., 0], x + 9 * field[..., 1]
    grid = (np.abs(((yy + 2) % 16) - 8) > 7.0) | (np.abs(((xx + 2) % 16) - 8) > 7.0)
    image = np.round(255 * rgb).astype(np.uint8)
    image[grid] = (255 * (0.25 + 0.2 * rgb[grid])).astype(np.uint8)
    draw_text(image, "SACB", size - 30, 16, scale=4, colour=(255, 255, 255))
    return image


def thumbnail() -> np.ndarray:
    """Axial middle slices of the bundled fixed and moving images side by side (about 260 x 280)."""
    sample = ROOT / "SACBRegistration" / "Resources" / "SampleData"
    panels = []
    for name in ("fixed.nii.gz", "moving.nii.gz"):
        image = sitk.DICOMOrient(sitk.ReadImage(str(sample / name), sitk.sitkFloat32), "LPS")
        array = sitk.GetArrayFromImage(image)
        axial = array[array.shape[0] // 2]  # rows: posterior -> anterior flipped (LPS y), columns: x
        row_mm, col_mm = image.GetSpacing()[1], image.GetSpacing()[0]
        pixel = max(axial.shape[0] * row_mm / 236, axial.shape[1] * col_mm / 124)
        axial = ndimage.zoom(axial, (row_mm / pixel, col_mm / pixel), order=1)
        canvas = np.zeros((240, 128), np.uint8)
        scaled = np.clip(axial / np.percentile(array, 99.5), 0, 1)
        top, left = (240 - scaled.shape[0]) // 2, (128 - scaled.shape[1]) // 2
        canvas[top:top + scaled.shape[0], left:left + scaled.shape[1]] = np.round(255 * scaled)
        panels.append(np.repeat(canvas[..., None], 3, -1))
    picture = np.full((280, 260, 3), 24, np.uint8)
    picture[30:270, 1:129], picture[30:270, 131:259] = panels
    draw_text(picture, "FIXED", 8, 30)
    draw_text(picture, "MOVING", 8, 160)
    return picture


if __name__ == "__main__":
    ICONS.mkdir(parents=True, exist_ok=True)
    write_png(icon(), ICONS / "SACBRegistration.png")
    write_png(icon(), ROOT / "Resources" / "Icons" / "SACBRegistration.png")
    write_png(thumbnail(), ICONS / "SACBBrainPair.png")
    print("icons written")
