"""Training losses: local NCC (supplement Eq. 12), the gradient regulariser of Eq. 1, soft Dice."""

from .flow import GradientL2Loss
from .functional import box_sum, gradient_l2, local_ncc, one_hot_labels, soft_dice
from .image import LocalNCCLoss
from .label import SoftDiceLoss

__all__ = ["GradientL2Loss", "LocalNCCLoss", "SoftDiceLoss", "box_sum", "gradient_l2", "local_ncc",
           "one_hot_labels", "soft_dice"]
