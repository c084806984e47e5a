"""The metrics table of a registration: per-label overlap and surface distances before and after,
and the regularity of the displacement field."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..metrics import jacobian_determinant, label_metrics, present_labels
from ..vocabulary import METRIC_COLUMNS

COLUMNS = METRIC_COLUMNS


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    return value


@dataclass
class MetricsTable:
    """``rows``: one dict per label (:data:`COLUMNS`); ``summary``: label means;
    ``regularity``: ``negative_jacobian_percent``, ``sdlogj``, ``jacobian_min``, ``jacobian_max``."""

    rows: List[Dict[str, Any]] = field(default_factory=list)
    summary: Dict[str, Any] = field(default_factory=dict)
    regularity: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"labels": [{k: _clean(v) for k, v in row.items()} for row in self.rows],
                "summary": {k: _clean(v) for k, v in self.summary.items()},
                "regularity": {k: _clean(v) for k, v in self.regularity.items()}}

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            for row in self.rows + ([dict(self.summary, label="mean", name="")] if self.rows else []):
                writer.writerow(["" if _clean(row.get(c)) is None else _fmt(row.get(c)) for c in COLUMNS])
            writer.writerow([])
            writer.writerow(["regularity", "value"])
            for key, value in self.regularity.items():
                writer.writerow([key, _fmt(value)])

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary_lines(self, surface_distance: bool = True) -> List[str]:
        """The figures in words, one line for the labels (when compared) and one for the field:
        ``mean Dice 0.62 -> 0.86, HD95 ... mm[, ASSD ... mm]`` and ``folding |J|<0: ...% of voxels,
        SDlogJ ...`` (the command line's summary and the overview picture's footer)."""
        def change(before: str, after: str, unit: str = "") -> str:
            b, a = self.summary.get(before), self.summary.get(after)
            if b is None or a is None or not (math.isfinite(b) and math.isfinite(a)):
                return "N/A"
            return f"{b:.3f} -> {a:.3f}{unit}" if not unit else f"{b:.2f} -> {a:.2f}{unit}"

        lines = []
        if self.summary:
            text = f"mean Dice {change('dice_before', 'dice_after')}, HD95 {change('hd95_before_mm', 'hd95_after_mm', ' mm')}"
            if surface_distance:
                text += f", ASSD {change('assd_before_mm', 'assd_after_mm', ' mm')}"
            lines.append(text)
        if self.regularity:
            lines.append(f"folding |J|<0: {self.regularity['negative_jacobian_percent']:.3f}% of voxels, "
                         f"SDlogJ {self.regularity['sdlogj']:.3f}")
        return lines


def _fmt(value: Any) -> Any:
    return f"{value:.4f}" if isinstance(value, float) else value


def regularity(components: np.ndarray, spacing: Sequence[float], mask: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Folding and SDlogJ of a displacement given along the array axes in mm (see
    :func:`~.geometry.field_in_index_frame`)."""
    return regularity_of(jacobian_determinant(components, spacing), mask)


def regularity_of(det: np.ndarray, mask: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Folding (% of voxels with a negative determinant), SDlogJ, min and max of Jacobian
    determinants ``det`` (over ``mask`` when given)."""
    values = det[mask] if mask is not None else np.asarray(det).ravel()
    return {"negative_jacobian_percent": float(100.0 * np.mean(values < 0)),
            "sdlogj": float(np.log(np.clip(values, 1e-9, None)).std()),
            "jacobian_min": float(values.min()), "jacobian_max": float(values.max())}


def evaluate_segmentations(fixed: sitk.Image, before: sitk.Image, after: sitk.Image,
                           names: Optional[Dict[int, str]] = None,
                           regularity_values: Optional[Dict[str, float]] = None) -> MetricsTable:
    """Dice / HD95 / ASSD (mm) of every label present in the fixed or moving segmentation,
    comparing the fixed labels with the moving labels before (identity) and after warping.

    ``before``: the moving segmentation on the fixed grid without registration. Both comparisons
    share the fixed segmentation's work (label boxes, surfaces, k-d trees; see
    :func:`~..metrics.label_metrics`)."""
    f = sitk.GetArrayViewFromImage(fixed)
    a = sitk.GetArrayViewFromImage(after)
    spacing = tuple(reversed(fixed.GetSpacing()))  # array-axis order
    b = sitk.GetArrayViewFromImage(before)
    labels = present_labels(f, b)
    before_rows, after_rows = label_metrics(f, [b, a], spacing, labels)
    counts = np.bincount(np.asarray(f, np.int64).ravel(), minlength=max(labels, default=0) + 1)
    rows = []
    for label in labels:
        old, new = before_rows[label], after_rows[label]
        rows.append({"label": label, "name": (names or {}).get(label, ""), "fixed_voxels": int(counts[label]),
                     "dice_before": old["dice"], "dice_after": new["dice"],
                     "hd95_before_mm": old["hd95"], "hd95_after_mm": new["hd95"],
                     "assd_before_mm": old["assd"], "assd_after_mm": new["assd"]})
    summary = {}
    for column in COLUMNS[3:]:
        values = [row[column] for row in rows if row[column] is not None and math.isfinite(row[column])]
        summary[column] = float(np.mean(values)) if values else float("nan")
    return MetricsTable(rows=rows, summary=summary, regularity=dict(regularity_values or {}))
