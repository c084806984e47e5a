"""Losses: local NCC (supplement Eq. 12), the gradient regulariser of Eq. 1, bending energy, MIND, soft Dice."""

from .flow import GradientL2Loss
from .functional import (
                         bending_energy,
                         box_sum,
                         fixed_window_stats,
                         gradient_l2,
                         local_ncc,
                         local_ncc_map,
                         masked_mean,
                         mind_loss,
                         one_hot_labels,
                         soft_dice,
                         weighted_displacement_l2,
)
from .image import LocalNCCLoss
from .label import SoftDiceLoss

__all__ = ["GradientL2Loss", "LocalNCCLoss", "SoftDiceLoss", "bending_energy", "box_sum", "fixed_window_stats",
           "gradient_l2", "local_ncc",
           "local_ncc_map", "masked_mean", "mind_loss", "one_hot_labels", "soft_dice",
           "weighted_displacement_l2"]
