"""SACB-Net: shared encoder + pyramid of SACB-refined similarity-matching flow estimators.

Paper Sec. 3, Fig. 2, Eq. 11. Module attribute names are the authors' (``encoder``,
``sacb_proj2`` .. ``sacb_proj5``, ``conv1``, ``conv1_out``) so their checkpoints load; their
shape-bound ``transformer.*.grid`` buffers do not exist here (grids are built per input shape).
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.utils.checkpoint
from torch import nn

from ..spatial.warping import compose, upsample_displacement, warp
from .blocks.conv import ConvBlock, conv_stack
from .blocks.encoder import SharedEncoder
from .blocks.matching import SimilarityMatching
from .blocks.sacb import SACB, SACBOutput
from .config import SACB_LEVELS, SIZE_MULTIPLE, SACBNetConfig


class SACBNetOutput(NamedTuple):
    """Result of a forward pass.

    Attributes:
        warped: moving image warped by ``displacement`` ``(B, C, D, H, W)``.
        displacement: ``(B, 3, D, H, W)`` voxels, tensor-axis order, fixed-grid pull-back
            (``fixed(p) ~ moving(p + u(p))``).
        clusters: with ``return_clusters=True``, ``{level: {"fixed": (B, D_l, H_l, W_l),
            "moving": ...}}`` int64 k-means labels of each SACB level (2..5); else ``None``.
            The moving labels are those of the moving features warped by the coarser flow.
    """

    warped: torch.Tensor
    displacement: torch.Tensor
    clusters: Optional[Dict[int, Dict[str, torch.Tensor]]]


def validate_pair(moving: torch.Tensor, fixed: torch.Tensor, in_channels: int,
                  check_finite: bool = True) -> None:
    """Raise ``ValueError`` naming the problem unless ``moving``/``fixed`` can enter the network."""
    for name, t in (("moving", moving), ("fixed", fixed)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"expected the {name} image as a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"expected the {name} image of shape (B, C, D, H, W), got {tuple(t.shape)} "
                             f"(add batch/channel axes with x[None, None] for a single volume)")
        if not t.is_floating_point():
            raise ValueError(f"expected a floating-point {name} image, got {t.dtype} (convert with .float())")
        if t.shape[1] != in_channels:
            raise ValueError(f"expected {in_channels} channel(s) in the {name} image, got {t.shape[1]}")
    if moving.shape != fixed.shape:
        raise ValueError(f"expected moving and fixed images of one shape, got {tuple(moving.shape)} "
                         f"and {tuple(fixed.shape)} (resample them onto one grid first)")
    if moving.device != fixed.device:
        raise ValueError(f"expected moving and fixed images on one device, got {moving.device} and {fixed.device}")
    spatial = tuple(moving.shape[2:])
    if any(s % SIZE_MULTIPLE or s < SIZE_MULTIPLE for s in spatial):
        padded = tuple(-(-s // SIZE_MULTIPLE) * SIZE_MULTIPLE for s in spatial)
        raise ValueError(f"expected spatial sizes that are positive multiples of {SIZE_MULTIPLE}, got {spatial} "
                         f"(pad to {padded}, e.g. with SACBRegistrationLib.spatial.padding.pad_to_multiple)")
    if check_finite:
        for name, t in (("moving", moving), ("fixed", fixed)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"expected finite values in the {name} image, got NaN or Inf "
                                 f"(replace them, e.g. with torch.nan_to_num)")


class SACBNet(nn.Module):
    """SACB-Net for 3D deformable registration.

    ``forward(moving, fixed)`` with ``(B, C, D, H, W)`` images of one shape, every spatial size
    a multiple of 16, any batch size, any device and dtype (autocast included).
    """

    def __init__(self, config: Optional[SACBNetConfig] = None) -> None:
        super().__init__()
        self.config = config if config is not None else SACBNetConfig()
        self.gradient_checkpointing = False
        """Recompute SACB blocks and level-1 convolutions in the backward pass instead of storing
        their activations (training memory for time). k-means is deterministic, so the recomputed
        clusters are the same."""
        cfg = self.config
        channels = cfg.level_channels
        slope = cfg.negative_slope
        self.encoder = SharedEncoder(cfg.in_channels, cfg.base_channels, slope)
        for level in SACB_LEVELS:
            self.add_module(f"sacb_proj{level}", SACB(
                channels[level - 1], cfg.clusters_at(level), cfg.cluster_feature, cfg.kernel_size, cfg.kmeans,
                cfg.kernel_hidden, cfg.bias_hidden, slope))
        self.matching = SimilarityMatching(cfg.search_window)
        c1 = channels[0]
        # level 1 (no matching, Sec. 3.3): two conv blocks per image, then a conv head on
        # [fixed, moving] whose last convolution has neither norm nor activation
        self.conv1 = conv_stack(c1, c1, slope)
        self.conv1_out = conv_stack(2 * c1, c1, slope, last=ConvBlock(c1, 3, negative_slope=None))

    def sacb(self, level: int) -> SACB:
        """The SACB block of ``level`` (2..5)."""
        return getattr(self, f"sacb_proj{level}")

    def _run(self, module: nn.Module, *args):
        """``module(*args)``, checkpointed when training with gradient checkpointing."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _clusters_per_level(self, clusters: Union[None, int, Sequence[int]]) -> Dict[int, int]:
        if clusters is None:
            return {level: self.config.clusters_at(level) for level in SACB_LEVELS}
        values = (clusters,) * len(SACB_LEVELS) if isinstance(clusters, int) else tuple(clusters)
        if len(values) != len(SACB_LEVELS) or not all(isinstance(n, int) and n >= 1 for n in values):
            raise ValueError(f"expected clusters as one integer >= 1 or four (levels 2, 3, 4, 5), got {clusters!r}")
        return dict(zip(SACB_LEVELS, values))

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, *,
                clusters: Union[None, int, Sequence[int]] = None,
                return_clusters: bool = False) -> SACBNetOutput:
        """Register ``moving`` to ``fixed``.

        Args:
            moving, fixed: ``(B, C, D, H, W)`` images, spatial sizes multiples of 16.
            clusters: override the configured clusters per SACB block (levels 2, 3, 4, 5).
            return_clusters: also return the k-means label maps of every SACB level.
        """
        validate_pair(moving, fixed, self.config.in_channels)
        # 1. shared encoder: features of levels 1..5 (index 0..4), level i at 1/2^(i-1) size
        moving_feats = self.encoder(moving)
        fixed_feats = self.encoder(fixed)
        return self._decode(moving, moving_feats, fixed_feats, self._clusters_per_level(clusters), return_clusters)

    def forward_both_ways(self, moving: torch.Tensor, fixed: torch.Tensor, *,
                          clusters: Union[None, int, Sequence[int]] = None,
                          return_clusters: bool = False) -> SACBNetOutput:
        """Both directions of one pair as a batch of two, doing the work they share once.

        The same output as ``forward(cat([moving, fixed]), cat([fixed, moving]))`` (to float
        rounding: every layer works per sample): batch item 0 registers ``moving`` to ``fixed``,
        item 1 ``fixed`` to ``moving``. Each image is encoded once instead of twice, and at the
        coarsest level, where the moving features are not warped yet, the moving role's SACB
        output is the fixed role's in the other batch order. The encoder is about a third of a
        forward pass on a CPU.

        Args:
            moving, fixed: one pair, ``(1, C, D, H, W)`` each.
            clusters, return_clusters: as in :meth:`forward`.
        """
        validate_pair(moving, fixed, self.config.in_channels)
        if moving.shape[0] != 1:  # validate_pair made the two shapes equal
            raise ValueError(f"expected one pair of (1, C, D, H, W) images, got {tuple(moving.shape)} and "
                             f"{tuple(fixed.shape)}")
        images = torch.cat([moving, fixed])  # (2, C, D, H, W): the moving role of (moving -> fixed, fixed -> moving)
        # 1. shared encoder, once per image; the fixed role is the same batch in the other order
        moving_feats = self.encoder(images)
        fixed_feats = [feats.flip(0) for feats in moving_feats]  # batch (fixed, moving)
        return self._decode(images, moving_feats, fixed_feats, self._clusters_per_level(clusters), return_clusters,
                            roles_swapped=True)

    def _decode(self, moving: torch.Tensor, moving_feats: List[Optional[torch.Tensor]],
                fixed_feats: List[Optional[torch.Tensor]], n_clusters: Dict[int, int],
                return_clusters: bool, roles_swapped: bool = False) -> SACBNetOutput:
        """Levels 5..1 and the final warp from the encoder's features of both roles (lists of
        ``(B, C_l, D_l, H_l, W_l)``, emptied as they are used). ``roles_swapped``: the fixed role's
        batch is the moving role's in reverse order (:meth:`forward_both_ways`)."""
        # 2. levels 5..2 (Eq. 11): warp the moving features with the upsampled coarser flow,
        #    refine both with the level's SACB, match, compose with the coarser flow, upsample
        flow = None  # (B, 3, D_l, H_l, W_l) voxels of the current level
        cluster_maps: Dict[int, Dict[str, torch.Tensor]] = {}
        for level in reversed(SACB_LEVELS):
            i = level - 1
            moving_feat = moving_feats[i] if flow is None else warp(moving_feats[i], flow)
            fixed_out = self._run(self.sacb(level), fixed_feats[i], n_clusters[level])
            if flow is None and roles_swapped:
                # the unwarped moving features are the fixed role's in the other batch order: so is the SACB output
                moving_out = SACBOutput(fixed_out.features.flip(0), fixed_out.clusters.flip(0))
            else:
                moving_out = self._run(self.sacb(level), moving_feat, n_clusters[level])
            moving_feats[i] = fixed_feats[i] = moving_feat = None  # free this level's features
            delta = self.matching(fixed_out.features, moving_out.features)
            flow = delta if flow is None else compose(flow, delta)
            flow = upsample_displacement(flow)  # to level (i - 1), values doubled
            if return_clusters:
                cluster_maps[level] = {"fixed": fixed_out.clusters, "moving": moving_out.clusters}

        # 3. level 1 (no matching): conv refinement of both images (moving warped first) and the
        #    conv head on their concatenation [fixed, moving]. The head's first convolution is
        #    linear, so it is computed as the sum of its fixed-channel and moving-channel parts:
        #    the full-resolution concatenation is never held, nor both refined feature maps.
        head_in, head_mid, head_out = self.conv1_out[1], self.conv1_out[2], self.conv1_out[3]
        c1 = self.config.level_channels[0]
        pre = head_in.convolve(self._run(self.conv1, fixed_feats[0]), slice(0, c1))
        fixed_feats[0] = None
        moving_1 = self._run(self.conv1, warp(moving_feats[0], flow))
        moving_feats[0] = None
        moving_part = head_in.convolve(moving_1, slice(c1, 2 * c1), bias=False)
        del moving_1
        pre = pre.add_(moving_part) if not torch.is_grad_enabled() else pre + moving_part
        del moving_part
        delta = head_out(head_mid(head_in.activate(pre)))
        displacement = compose(flow, delta.to(flow.dtype))  # head may run in a lower autocast dtype

        # 4. warp the moving image with the final displacement
        warped = warp(moving, displacement)
        return SACBNetOutput(warped=warped, displacement=displacement,
                             clusters=cluster_maps if return_clusters else None)
