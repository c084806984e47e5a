"""Blocks of SACB-Net, one concept per file."""

from .conv import ConvBlock, conv_stack
from .encoder import SharedEncoder
from .matching import SimilarityMatching
from .sacb import SACB, SACBOutput

__all__ = ["ConvBlock", "SACB", "SACBOutput", "SharedEncoder", "SimilarityMatching", "conv_stack"]
