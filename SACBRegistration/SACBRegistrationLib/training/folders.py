"""Training pairs from the user's own volumes (a folder of images, or a CSV listing them).

Every volume is read with SimpleITK, resampled onto an identity-direction grid of
``data.shape`` at ``data.spacing_mm`` centred on the volume (so differently stored orientations
line up), and normalised as ``data.intensity`` says; label maps are resampled with nearest
neighbour. Pairs are atlas-to-subject (moving = the atlas, fixed = each subject, the paper's
IXI set-up) or subject-to-subject (every ordered pair of distinct subjects, as LPBA and
Abdomen CT), visited in a seeded order.

A CSV has a header with ``image`` and optionally ``labels`` columns (paths relative to the CSV);
a folder holds images (``*.nii.gz``, ``*.nii``, ``*.nrrd``, ``*.nhdr``, ``*.mha``, ``*.mhd``), with labels in
a ``labels/`` sub-folder under the same file names when present.
"""

from __future__ import annotations

import csv
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.pairs import item_generator
from ..packages import IntensityNormalisation
from ..preprocessing import centred_grid, normalise_intensity, resample_like
from ..vocabulary import IMAGE_SUFFIXES
from .config import SourceSection, TrainConfig


def _is_image(path: Path) -> bool:
    return path.is_file() and any(path.name.endswith(s) for s in IMAGE_SUFFIXES)


def list_volumes(path: Path) -> List[Tuple[Path, Optional[Path]]]:
    """``[(image, labels or None)]`` from a folder or a CSV, sorted by file name for folders."""
    path = Path(path)
    if path.is_file() and path.suffix == ".csv":
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "image" not in rows[0]:
            raise ValueError(f"{path}: expected a CSV header with an 'image' column (and optionally 'labels')")
        out = []
        for row in rows:
            image = (path.parent / row["image"]).resolve()
            labels = (path.parent / row["labels"]).resolve() if row.get("labels") else None
            out.append((image, labels))
    elif path.is_dir():
        out = [(p, (path / "labels" / p.name) if (path / "labels" / p.name).is_file() else None)
               for p in sorted(path.iterdir()) if _is_image(p)]
    else:
        raise ValueError(f"training data not found: {path} (expected a folder of images or a CSV)")
    missing = [str(p) for pair in out for p in pair if p is not None and not p.is_file()]
    if missing:
        raise ValueError(f"files listed for training are missing: {missing[:3]}")
    if not out:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return out


class FolderPairs(Dataset):
    """Registration pairs of the user's volumes (see the module docstring)."""

    def __init__(self, source: SourceSection, config: TrainConfig, length: int, seed: int, cache: int = 8) -> None:
        self.volumes = list_volumes(Path(source.path))
        self.atlas = None
        if source.mode == "atlas-to-subject":
            self.atlas = (Path(source.atlas), Path(source.atlas_labels) if source.atlas_labels else None)
        elif len(self.volumes) < 2:
            raise ValueError(f"subject-to-subject pairs need at least two volumes in {source.path}")
        self.spacing, self.shape = config.data.spacing_mm, tuple(config.data.shape)
        self.intensity = IntensityNormalisation.from_dict(config.data.intensity)
        self.length, self.seed = int(length), int(seed)
        self._cache: "OrderedDict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]" = OrderedDict()
        self._cache_size = cache

    def __len__(self) -> int:
        return self.length

    def _load(self, image_path: Path, labels_path: Optional[Path]):
        key = str(image_path)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        import SimpleITK as sitk

        image = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
        grid = centred_grid(image, self.spacing, self.shape)
        array = normalise_intensity(sitk.GetArrayFromImage(resample_like(image, grid)), self.intensity)
        labels = None
        if labels_path is not None:
            seg = sitk.ReadImage(str(labels_path))
            seg = resample_like(seg, grid, sitk.sitkNearestNeighbor, pixel_type=sitk.sitkInt32)
            labels = torch.from_numpy(sitk.GetArrayFromImage(seg).astype(np.int64))[None]
        value = (torch.from_numpy(array)[None], labels)
        self._cache[key] = value
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return value

    def _pair(self, index: int) -> Tuple[Tuple[Path, Optional[Path]], Tuple[Path, Optional[Path]]]:
        generator = item_generator(self.seed, index)
        n = len(self.volumes)
        if self.atlas is not None:
            return self.atlas, self.volumes[int(torch.randint(n, (1,), generator=generator))]
        i = int(torch.randint(n, (1,), generator=generator))
        j = int(torch.randint(n - 1, (1,), generator=generator))
        return self.volumes[i], self.volumes[j + (j >= i)]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        moving_src, fixed_src = self._pair(index)
        moving, moving_labels = self._load(*moving_src)
        fixed, fixed_labels = self._load(*fixed_src)
        item = {"moving": moving, "fixed": fixed}
        if moving_labels is not None and fixed_labels is not None:
            item["moving_labels"], item["fixed_labels"] = moving_labels, fixed_labels
        return item
