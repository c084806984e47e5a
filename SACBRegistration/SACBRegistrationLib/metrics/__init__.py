"""Evaluation metrics (numpy / scipy): Dice, HD95, ASSD in mm, Jacobian folding, SDlogJ, SSIM."""

from .jacobian import jacobian_determinant, negative_jacobian_percent, sdlogj
from .overlap import dice, dice_per_label, present_labels
from .similarity import ssim
from .surface import assd, hd95, label_metrics, surface_distances, surface_metrics_per_label

__all__ = ["assd", "dice", "dice_per_label", "hd95", "jacobian_determinant", "label_metrics",
           "negative_jacobian_percent", "present_labels", "sdlogj", "ssim", "surface_distances", "surface_metrics_per_label"]
