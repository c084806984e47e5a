"""Label overlap: Dice similarity coefficient per label.

Label maps are integer arrays ``(D, H, W)`` (numpy or anything ``np.asarray`` accepts); label 0
is the background.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

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
        labels.update(int(v) for v in np.unique(m))
    labels.discard(0)
    return sorted(labels)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; ``nan`` when both are empty (the label is absent)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"expected masks of one shape, got {a.shape} and {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def dice_per_label(a: np.ndarray, b: np.ndarray, labels: Optional[Iterable[int]] = None) -> Dict[int, float]:
    """Dice of every foreground label (default: labels present in either map)."""
    a, b = np.asarray(a), np.asarray(b)
    check_label_maps(a, b)
    labels = present_labels(a, b) if labels is None else [int(v) for v in labels]
    return {label: dice(a == label, b == label) for label in labels}
