"""The bundled sample pair (``SACBRegistration/Resources/SampleData``), made from the template.

Two synthetic "subjects" are the MNI template under different random diffeomorphisms (about
3 mm mean, up to ~15 mm displacement); the moving one also gets a bias field and gamma change
and is stored on a different grid (rotated by about 10 degrees, 1.1 x 1.1 x 1.6 mm voxels,
shifted), so the demo exercises orientation, spacing and resampling for real. Both come with the
16 grey / white matter parcels of :func:`~.template.tissue_parcels`. Deterministic: running
``sacb data make-sample`` again writes identical files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import numpy as np
import SimpleITK as sitk
import torch

from ..packages import file_sha256
from .deformations import random_diffeomorphism
from .intensity import bias_field, gamma
from .template import NOTICE, fetch_template, tissue_parcels

SEED = 2025
DESCRIPTION = ("Synthetic brain T1 pair with 16 grey/white-matter parcel labels, derived from the MNI ICBM152 2009a "
               "template by random diffeomorphisms; the moving image is rotated, anisotropic and shifted.")


def _deformed(template: sitk.Image, generator: torch.Generator) -> sitk.Transform:
    """A random diffeomorphism of the template grid as an ITK displacement-field transform."""
    from ..pipeline.geometry import vector_image, voxel_displacement_to_physical

    shape = tuple(reversed(template.GetSize()))
    disp = random_diffeomorphism(shape, generator, max_std=6.0, control_spacing=20)[0].numpy()
    field = vector_image(voxel_displacement_to_physical(disp, template), template)
    return sitk.DisplacementFieldTransform(field)


def _rotated_grid(reference: sitk.Image) -> sitk.Image:
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(0.08, -0.05, 0.15)
    direction = np.array(rotation.GetMatrix()).reshape(3, 3) @ np.array(reference.GetDirection()).reshape(3, 3)
    spacing = np.array([1.1, 1.1, 1.6])
    extent = (np.array(reference.GetSize()) - 1) * np.array(reference.GetSpacing())
    size = np.ceil(extent / spacing).astype(int) + 1
    centre = np.array(reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in reference.GetSize()]))
    centre = centre + np.array([4.0, -6.0, 3.0])
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin((centre - direction @ ((size - 1) * spacing / 2)).tolist())
    return grid


def make_sample_pair(out: Path, cache_dir: Path = None) -> Dict[str, Path]:
    """Write ``fixed.nii.gz``, ``moving.nii.gz``, their ``*_segmentation.nii.gz`` and
    ``SampleData.json`` (SHA-256 of each file) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = fetch_template(cache_dir)
    t1 = sitk.ReadImage(str(paths["t1"]), sitk.sitkFloat32)
    gm, wm = (sitk.GetArrayFromImage(sitk.ReadImage(str(paths[k]), sitk.sitkFloat32)) / 255.0 for k in ("gm", "wm"))
    brain = np.argwhere(gm + wm > 0.5)
    labels = sitk.GetImageFromArray(tissue_parcels(gm, wm, brain.mean(0)).astype(np.uint8))
    labels.CopyInformation(t1)
    # crop to the brain plus a margin: smaller files, same anatomy
    lo, hi = np.maximum(brain.min(0) - 8, 0), np.minimum(brain.max(0) + 9, gm.shape)
    index, size = [int(v) for v in lo[::-1]], [int(v) for v in (hi - lo)[::-1]]
    t1, labels = sitk.RegionOfInterest(t1, size, index), sitk.RegionOfInterest(labels, size, index)

    generator = torch.Generator().manual_seed(SEED)
    fixed_tf, moving_tf = _deformed(t1, generator), _deformed(t1, generator)
    fixed = sitk.Resample(t1, t1, fixed_tf, sitk.sitkLinear, 0.0)
    fixed_labels = sitk.Resample(labels, t1, fixed_tf, sitk.sitkNearestNeighbor, 0)
    grid = _rotated_grid(t1)
    moving = sitk.Resample(t1, grid, moving_tf, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moving_labels = sitk.Resample(labels, grid, moving_tf, sitk.sitkNearestNeighbor, 0)
    # a different scanner: smooth bias field and gamma on the moving image
    array = torch.from_numpy(sitk.GetArrayFromImage(moving) / 255.0)[None, None].float()
    array = gamma(bias_field(array, generator, max_strength=0.25), generator).clamp(0, 1)[0, 0].numpy()
    moving_out = sitk.GetImageFromArray(np.round(255 * array / max(array.max(), 1e-6)).astype(np.uint8))
    moving_out.CopyInformation(moving)

    files = {"fixed": ("fixed.nii.gz", sitk.Cast(sitk.Round(fixed), sitk.sitkUInt8)),
             "moving": ("moving.nii.gz", moving_out),
             "fixed_segmentation": ("fixed_segmentation.nii.gz", fixed_labels),
             "moving_segmentation": ("moving_segmentation.nii.gz", moving_labels)}
    written = {}
    for key, (name, image) in files.items():
        sitk.WriteImage(image, str(out / name), True)
        written[key] = out / name
    meta = {"description": DESCRIPTION, "labels": "1-8 grey matter, 9-16 white matter octants", "seed": SEED,
            "notice": NOTICE,
            "files": {key: {"file": path.name, "sha256": file_sha256(path)} for key, path in written.items()}}
    (out / "SampleData.json").write_text(json.dumps(meta, indent=2) + "\n")
    return written
