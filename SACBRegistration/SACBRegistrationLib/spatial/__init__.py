"""Dense displacement utilities: warping, composition, resampling, padding."""

from .padding import pad_to_multiple, padding_for
from .warping import compose, identity_grid, resize_displacement, upsample_displacement, warp

__all__ = ["compose", "identity_grid", "pad_to_multiple", "padding_for", "resize_displacement",
           "upsample_displacement", "warp"]
