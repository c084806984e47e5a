"""The MNI ICBM152 2009a template (T1, grey- and white-matter maps), from nilearn's wheel.

The files ship inside the ``nilearn`` wheel on PyPI, so :func:`fetch_template` needs nothing
but the package registry: it runs ``pip download nilearn==<pinned> --no-deps``, checks the
wheel's SHA-256, extracts the three NIfTI files, checks theirs, and keeps them in a cache
folder. Nothing is downloaded at run time by the engine or the tests otherwise.

Licence of the template (``NOTICE``, written beside the files as NOTICE.txt): Copyright (C) 1993-2009 Louis
Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University;
free to use, copy, modify and distribute with the notice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Optional

from ..errors import TemplateError  # noqa: F401  (defined in errors.py; importable from here as before)
from ..packages import file_sha256

NILEARN_VERSION = "0.14.1"
NILEARN_WHEEL = f"nilearn-{NILEARN_VERSION}-py3-none-any.whl"
NILEARN_WHEEL_SHA256 = "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a"
_MEMBER = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
TEMPLATE_FILES: Dict[str, str] = {
    "t1": "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    "gm": "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
    "wm": "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
}
"""SHA-256 of each extracted file (keys: T1 image, grey-matter and white-matter maps)."""

NOTICE = (
    "MNI ICBM152 non-linear 2009a template. Copyright (C) 1993-2009 Louis Collins, McConnell Brain "
    "Imaging Centre, Montreal Neurological Institute, McGill University. Permission to use, copy, "
    "modify, and distribute this software and its documentation for any purpose and without fee is "
    "hereby granted, provided that the above copyright notice appear in all copies. The authors and "
    "McGill University make no representations about the suitability of this software for any "
    "purpose. It is provided \"as is\" without express or implied warranty. Reference: Fonov et al., "
    "NeuroImage 54(1), 2011; Fonov et al., NeuroImage 47, S102, 2009."
)


def default_cache_dir() -> Path:
    """``$SACB_DATA_DIR`` or ``~/.cache/sacbregistration``."""
    root = os.environ.get("SACB_DATA_DIR")
    return Path(root) if root else Path.home() / ".cache" / "sacbregistration"


def template_dir(cache_dir: Optional[Path] = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "icbm152_2009a"


def template_paths(cache_dir: Optional[Path] = None) -> Dict[str, Path]:
    folder = template_dir(cache_dir)
    return {name: folder / Path(_MEMBER.format(name)).name for name in TEMPLATE_FILES}


def template_available(cache_dir: Optional[Path] = None) -> bool:
    """True when the three files are present and match their checksums."""
    paths = template_paths(cache_dir)
    return all(p.is_file() and file_sha256(p) == TEMPLATE_FILES[name] for name, p in paths.items())


def fetch_template(cache_dir: Optional[Path] = None, wheel: Optional[Path] = None) -> Dict[str, Path]:
    """Make the template files available in the cache and return their paths.

    Args:
        cache_dir: where to keep them (default :func:`default_cache_dir`).
        wheel: an already downloaded nilearn wheel (otherwise ``pip download`` fetches it from
            the configured package index).

    Raises:
        TemplateError: the download failed or a checksum did not match.
    """
    paths = template_paths(cache_dir)
    if template_available(cache_dir):
        return paths
    folder = template_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sacb-nilearn-") as tmp:
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--dest", tmp, f"nilearn=={NILEARN_VERSION}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheel = Path(tmp) / NILEARN_WHEEL
            if proc.returncode != 0 or not wheel.is_file():
                raise TemplateError(f"could not download {NILEARN_WHEEL} from the package index: "
                                    f"{proc.stderr.strip()[-500:] or 'no wheel was written'}")
        wheel = Path(wheel)
        if file_sha256(wheel) != NILEARN_WHEEL_SHA256:
            raise TemplateError(f"{wheel} does not match the expected SHA-256 of {NILEARN_WHEEL}; "
                                f"refusing to use it")
        with zipfile.ZipFile(wheel) as archive:
            for name, path in paths.items():
                partial = path.with_suffix(path.suffix + ".partial")
                with archive.open(_MEMBER.format(name)) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                if file_sha256(partial) != TEMPLATE_FILES[name]:
                    partial.unlink()
                    raise TemplateError(f"{path.name} extracted from {wheel.name} fails its checksum")
                os.replace(partial, path)
    (folder / "NOTICE.txt").write_text(NOTICE + "\n")
    return paths


def _main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description="Fetch the MNI ICBM152 2009a template from nilearn's wheel.")
    parser.add_argument("--dir", type=Path, default=None, help="cache folder (default: $SACB_DATA_DIR or ~/.cache/sacbregistration)")
    args = parser.parse_args(argv)
    try:
        paths = fetch_template(args.dir)
    except TemplateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())


def resample_to_grid(image, spacing: float, shape, centre_mm, interpolator=None):
    """Resample a SimpleITK image onto an axis-aligned grid (identity direction) of ``shape``
    (array order ``(D, H, W)``) and isotropic ``spacing`` centred at ``centre_mm`` (LPS)."""
    import SimpleITK as sitk

    size_xyz = [int(s) for s in reversed(tuple(shape))]
    origin = [c - (n - 1) * spacing / 2.0 for c, n in zip(centre_mm, size_xyz)]
    return sitk.Resample(image, size_xyz, sitk.Transform(), interpolator or sitk.sitkLinear, origin,
                         [spacing] * 3, [1, 0, 0, 0, 1, 0, 0, 0, 1], 0.0, sitk.sitkFloat32)


TEMPLATE_LABELS = 16
"""Labels of :func:`template_volumes`: grey / white matter x left / right x anterior / posterior x
superior / inferior (1-8 grey matter, 9-16 white matter), from the template's tissue maps."""


def tissue_parcels(gm, wm, centre_index):
    """The 16 labels of :data:`TEMPLATE_LABELS` from grey / white matter probabilities ``(D, H, W)``
    in [0, 1] on an LPS-aligned grid (array axes: inferior -> superior, posterior -> anterior,
    right -> left), split into octants around ``centre_index`` (array order)."""
    import numpy as np

    tissue = np.where((wm >= 0.5) & (wm >= gm), 2, np.where((gm >= 0.5) & (gm > wm), 1, 0))
    grids = np.meshgrid(*[np.arange(n) for n in gm.shape], indexing="ij")
    octant = sum((g > c).astype(int) << bit for bit, (g, c) in enumerate(zip(grids, centre_index)))
    return np.where(tissue > 0, 1 + (tissue - 1) * 8 + octant, 0).astype(np.int64)


FINE_TEMPLATE_LABELS = 33
"""Labels of :func:`fine_parcels`: grey / white matter x left / right x anterior / posterior x four
inferior-superior bands (1-16 grey matter, 17-32 white matter), and the lateral ventricles (33)."""

LABEL_SETS = {"parcels16": TEMPLATE_LABELS, "parcels33": FINE_TEMPLATE_LABELS}
"""``template_volumes(label_set=...)`` choices and their label counts. ``parcels16`` is what training
uses; ``parcels33`` (smaller structures, the label count of the held-out pairs the issues describe) is
for benchmarks."""

_BANDS = 4
"""Inferior-superior bands of :func:`fine_parcels`, of equal brain-voxel counts."""

_VENTRICLE_DEPTH_MM = 15.0
"""Non-tissue voxels at least this deep inside the closed brain outline can be ventricle."""

_CLOSING_MM = 4.0
"""Radius (in iterations of a 6-neighbour closing) that seals the sulci before the depth is measured."""


def fine_parcels(gm, wm, spacing: float):
    """The 33 labels of :data:`FINE_TEMPLATE_LABELS` from grey / white matter probabilities
    ``(D, H, W)`` in [0, 1] on an LPS-aligned grid of isotropic ``spacing`` mm (array axes:
    inferior -> superior, posterior -> anterior, right -> left).

    Left / right and anterior / posterior split at the brain's centre (as :func:`tissue_parcels`);
    the inferior-superior axis is cut into :data:`_BANDS` bands holding equal numbers of brain
    voxels. The ventricles are the largest connected region of voxels that are neither grey nor
    white matter and lie at least :data:`_VENTRICLE_DEPTH_MM` inside the brain's closed outline.
    """
    import numpy as np
    from scipy import ndimage

    tissue = np.where((wm >= 0.5) & (wm >= gm), 2, np.where((gm >= 0.5) & (gm > wm), 1, 0))
    inside = tissue > 0
    coords = np.argwhere(inside)
    centre = coords.mean(0)
    grids = np.meshgrid(*[np.arange(n) for n in gm.shape], indexing="ij")
    edges = np.quantile(coords[:, 0], np.arange(1, _BANDS) / _BANDS)
    band = np.searchsorted(edges, grids[0], side="right")  # 0 .. _BANDS - 1, inferior to superior
    side = (grids[2] > centre[2]).astype(int) + 2 * (grids[1] > centre[1]).astype(int)  # left, anterior bits
    region = band * 4 + side  # 0 .. 15
    labels = np.where(inside, 1 + (tissue - 1) * 16 + region, 0)
    closed = ndimage.binary_fill_holes(ndimage.binary_closing((gm + wm) > 0.1,
                                                              iterations=max(1, round(_CLOSING_MM / spacing))))
    deep = closed & ~inside & (ndimage.distance_transform_edt(closed, sampling=spacing) >= _VENTRICLE_DEPTH_MM)
    components, count = ndimage.label(deep)
    if count:
        sizes = np.bincount(components.ravel())[1:]
        labels[components == 1 + int(np.argmax(sizes))] = FINE_TEMPLATE_LABELS
    return labels.astype(np.int64)


def template_volumes(spacing: float = 2.0, shape=(80, 96, 80), cache_dir: Optional[Path] = None,
                     label_set: str = "parcels16"):
    """The template on a training grid: ``(image, labels, brain_mask)`` numpy arrays ``(D, H, W)``.

    ``image`` is the T1 scaled to [0, 1]; ``labels`` are the 16 parcels of
    :data:`TEMPLATE_LABELS` (``label_set="parcels16"``) or the 33 of :func:`fine_parcels`
    (``"parcels33"``), 0 = background; the grid is centred on the brain. Fetches the template first
    if needed (package registry only).
    """
    if label_set not in LABEL_SETS:
        raise ValueError(f"expected label_set in {tuple(LABEL_SETS)}, got {label_set!r}")
    import numpy as np
    import SimpleITK as sitk

    paths = fetch_template(cache_dir)
    t1, gm, wm = (sitk.ReadImage(str(paths[k]), sitk.sitkFloat32) for k in ("t1", "gm", "wm"))
    brain = sitk.GetArrayFromImage(gm) + sitk.GetArrayFromImage(wm) > 0.5 * 255
    index_zyx = np.argwhere(brain).mean(0)
    centre = t1.TransformContinuousIndexToPhysicalPoint([float(i) for i in index_zyx[::-1]])
    t1_r, gm_r, wm_r = (sitk.GetArrayFromImage(resample_to_grid(im, spacing, shape, centre)) for im in (t1, gm, wm))
    image = np.clip(t1_r / 255.0, 0.0, 1.0).astype(np.float32)
    gm_r, wm_r = gm_r / 255.0, wm_r / 255.0
    if label_set == "parcels33":
        labels = fine_parcels(gm_r, wm_r, spacing)
    else:
        labels = tissue_parcels(gm_r, wm_r, (np.array(shape) - 1) / 2.0)
    mask = (gm_r + wm_r) > 0.1
    return image, labels, mask
