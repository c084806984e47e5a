"""Label overlap: Dice similarity coefficient per label.

Label maps are integer arrays ``(D, H, W)`` (numpy or anything ``np.asarray`` accepts); label 0
is the background.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np


def check_label_maps(a: np.ndarray, b: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` are integer label maps of one shape."""
    for name, x in (("first", a), ("second", b)):
        if not (np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
            raise ValueError(f"expected an integer label map, got {x.dtype} for the {name} map "
                             f"(round and cast a float label image, e.g. np.rint(x).astype(int))")
    if a.shape != b.shape:
        raise ValueError(f"expected label maps of one shape, got {a.shape} and {b.shape}")


def present_labels(*maps: np.ndarray) -> list:
    """Sorted foreground labels present in any of the maps."""
    labels = set()
    for m in maps:
        m = np.asarray(m)
        if m.size and np.issubdtype(m.dtype, np.integer) and m.min() >= 0:
            labels.update(int(v) for v in np.flatnonzero(np.bincount(m.ravel())))  # one pass, no sort
        else:
            labels.update(int(v) for v in np.unique(m))
    labels.discard(0)
    return sorted(labels)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; ``nan`` when both are empty (the label is absent)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"expected masks of one shape, got {a.shape} and {b.shape}")
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(np.logical_and(a, b))) / total


Extent = Tuple[Tuple[int, ...], Tuple[int, ...]]
"""A label's bounding box as ``(first, stop)`` voxel indices per array axis (stop exclusive)."""


def label_extents(m: np.ndarray) -> Dict[int, Extent]:
    """``{label: (first, stop)}``: the bounding box of every foreground label of one map, all found
    in one pass with ``scipy.ndimage.find_objects``."""
    from scipy import ndimage

    m = np.asarray(m)
    if m.size == 0 or int(m.max(initial=0)) <= 0:
        return {}
    if m.min() < 0:
        raise ValueError("expected labels >= 0")
    if m.dtype == bool:
        m = m.view(np.uint8)  # find_objects takes integer maps only
    return {index: (tuple(s.start for s in box), tuple(s.stop for s in box))
            for index, box in enumerate(ndimage.find_objects(m), start=1) if box is not None}


def merge_boxes(extents: Sequence[Dict[int, Extent]], shape: Sequence[int], margin: int = 0
                ) -> Dict[int, Tuple[slice, ...]]:
    """``{label: slices}``: the bounding box of each label over several maps' :func:`label_extents`,
    grown by ``margin`` voxels and clipped to ``shape``."""
    boxes: Dict[int, Extent] = {}
    for per_map in extents:
        for label, (lo, hi) in per_map.items():
            if label in boxes:
                old_lo, old_hi = boxes[label]
                lo, hi = tuple(map(min, lo, old_lo)), tuple(map(max, hi, old_hi))
            boxes[label] = (lo, hi)
    return {label: tuple(slice(max(0, l - margin), min(n, h + margin)) for l, h, n in zip(lo, hi, shape))
            for label, (lo, hi) in sorted(boxes.items())}


def label_boxes(*maps: np.ndarray, margin: int = 0) -> Dict[int, Tuple[slice, ...]]:
    """``{label: slices}``: the bounding box of each foreground label over all ``maps`` (found in
    one pass per map with ``scipy.ndimage.find_objects``), grown by ``margin`` voxels and clipped."""
    return merge_boxes([label_extents(m) for m in maps], np.shape(maps[0]), margin)


def dice_per_label(a: np.ndarray, b: np.ndarray, labels: Optional[Iterable[int]] = None) -> Dict[int, float]:
    """Dice of every foreground label (default: labels present in either map).

    Each label is compared inside its bounding box only (found once for all labels), so the cost
    does not grow with the number of labels times the volume."""
    a, b = np.asarray(a), np.asarray(b)
    check_label_maps(a, b)
    labels = present_labels(a, b) if labels is None else [int(v) for v in labels]
    boxes = label_boxes(a, b)
    out = {}
    for label in labels:
        box = boxes.get(label)
        out[label] = float("nan") if box is None else dice(a[box] == label, b[box] == label)
    return out
