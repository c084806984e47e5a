"""Instance optimisation: refine one pair's field with Adam, coarse to fine (Learn2Reg style).

No network weight is touched (runs never affect each other). The field is refined over a list of
**levels**, each comparing the images on a grid over the network grid's extent with spacing
``scale`` times the network grid's (``2``: half resolution, ``1``: the network grid, ``0.5``: twice
its resolution, e.g. 1 mm for a 2 mm model). Every level optimises a *residual* starting from
everything before it, added to the state, which always lives on the network grid:

* a level on the network grid or coarser optimises its residual on its own grid, so a coarse level
  adds a smooth correction without blurring the network's detail;
* a finer level keeps its residual on the network grid and resamples the field to its own grid
  only to warp the moving image there: the similarity sees the fine structure the network grid
  cannot (thin CSF, cortex), as a B-spline registration's control grid is coarser than its image.
  Measured on held-out 1 mm pairs against putting the parameters on the fine grid itself: higher
  Dice on 3 of 4 pairs, smoother fields (SDlogJ 0.41 against 0.46), 2.5x less time, and the stored
  field stays on the network grid.

What is optimised (``transform``):

* ``"displacement"``: the displacement itself (network output + residuals);
* ``"velocity"``: a stationary velocity field, initialised with the network's displacement and
  integrated by scaling and squaring: the map is diffeomorphic by construction (no folding).

Similarity: local NCC (``"lncc"``, same contrast) or MIND-SSC (``"mind"``, any contrast), over a
fixed-image mask when given. Regulariser: ``"diffusion"`` (``gradient_l2``, first derivatives) or
``"bending"`` (second derivatives). A level stops early when its loss has not improved by
``min_improvement`` for ``patience`` steps.

Shapes and frames: images ``(1, 1, D, H, W)`` on a level grid; fields ``(1, 3, D, H, W)`` in voxels
of the grid they live on, components in tensor-axis order ``(d, h, w)``. Level grid voxel ``q``
covers network voxels ``scale * q .. scale * (q + 1)`` (``align_corners=False`` resampling), so
moving a field from scale ``a`` to scale ``b`` resamples it and multiplies it by ``a / b``.
The refined field is returned on the network grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch

from ..losses.functional import NCC_EPS, bending_energy, gradient_l2, local_ncc, mind_loss
from ..ops.local_ncc import fixed_window_stats, squared_local_ncc_sum
from ..ops.mind import mind_ssc
from ..progress import ProgressCallback, no_progress
from ..spatial.warping import change_scale, integrate_velocity, warp
from .adam import Adam
from .presets import IOSettings

ADAM_EPS = 1e-4
"""Adam's eps for the voxel-summed loss (see :func:`_optimise_level`)."""


@dataclass
class IOReport:
    """What ran: per level its scale, the steps taken (early stop) and the final loss."""

    levels: list = field(default_factory=list)


ImagesAt = Callable[[float], Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]
"""``scale -> (fixed, moving, mask)`` on that level's grid: ``(1, 1, D, H, W)`` tensors (mask or None)."""


def _regulariser(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return gradient_l2 if name == "diffusion" else bending_energy


def similarity_region(fixed: torch.Tensor, window: int) -> Optional[Tuple[slice, slice, slice]]:
    """The box of ``fixed``'s grid ``(1, 1, D, H, W)`` outside which local NCC is exactly zero, or
    None when that is the whole grid.

    Where a voxel's window holds only zeros of the fixed image (background set to 0 by the
    normalisation, the padding of the network grid beyond the image), the fixed window sums and
    variance are exactly 0, so its correlation is 0 and has no gradient. That is every voxel farther
    than the window's radius from the box of non-zero fixed voxels; the window sums of the voxels
    nearer are those of the box grown by twice the radius. Skull-stripped images and grids padded
    to the network's size multiple spend much of their volume there.
    """
    nonzero = (fixed[0, 0] != 0).nonzero()
    if nonzero.shape[0] == 0:
        return None
    grow = 2 * (window // 2)
    low = (nonzero.min(dim=0).values - grow).clamp_min(0).tolist()
    high = (nonzero.max(dim=0).values + grow + 1).tolist()
    region = tuple(slice(int(a), min(int(b), n)) for a, b, n in zip(low, high, fixed.shape[2:]))
    if all(r.start == 0 and r.stop == n for r, n in zip(region, fixed.shape[2:])):
        return None
    return region


def _local_ncc_of(fixed: torch.Tensor, moving: torch.Tensor, mask: Optional[torch.Tensor],
                  window: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``(disp, coarser) -> -local NCC`` of ``fixed`` and ``moving`` warped by ``disp`` (on the images'
    grid, or on one ``coarser`` times coarser: :func:`..spatial.warping.warp`), the
    mean over the grid's voxels (over ``mask``'s when given), computed only inside
    :func:`similarity_region` (outside it every term is exactly 0): the same loss and gradient at a
    fraction of the cost for images with an empty background."""
    region = similarity_region(fixed, window)
    if region is None:
        fixed_stats = fixed_window_stats(fixed, window)  # constant over the level's steps

        def whole(disp: torch.Tensor, coarser: int) -> torch.Tensor:
            return local_ncc(fixed, warp(moving, disp, coarser=coarser), window, mask=mask, fixed_stats=fixed_stats)
        return whole
    box = (slice(None), slice(None)) + region
    fixed_box = fixed[box].contiguous()
    fixed_stats = fixed_window_stats(fixed_box, window)
    # the mean over the whole grid (masked_mean's weights: the mask, or every voxel when it is
    # empty or absent) of values that are 0 outside the box
    weights = None if mask is None or float(mask.sum()) == 0 else mask[box].contiguous()
    total = float(mask.sum()) if weights is not None else float(fixed[0, 0].numel())

    def boxed(disp: torch.Tensor, coarser: int) -> torch.Tensor:
        warped = warp(moving, disp if coarser > 1 else disp[box], region=region, coarser=coarser)
        return -squared_local_ncc_sum(fixed_box, warped, window, NCC_EPS, fixed_stats, weights) / total
    return boxed


def _optimise_level(fixed: torch.Tensor, moving: torch.Tensor, mask: Optional[torch.Tensor], start: torch.Tensor,
                    steps: int, settings: IOSettings, progress: Callable[[int, float], None],
                    field_scale: float, image_scale: float) -> Tuple[torch.Tensor, int, float]:
    """Adam on a residual ``r`` (``start + r`` is the level's field, on the grid of scale
    ``field_scale``; the images are on the grid of scale ``image_scale``, equal or finer); returns
    ``(r, steps taken, loss)``."""
    regulariser = _regulariser(settings.regulariser)
    if settings.similarity == "mind":
        # descriptors once per level; the moving image's are warped (as Learn2Reg's baselines do)
        fixed_target, moving_source = mind_ssc(fixed), mind_ssc(moving)

        def dissimilarity(disp: torch.Tensor, coarser: int) -> torch.Tensor:
            return mind_loss(fixed_target, warp(moving_source, disp, coarser=coarser), mask)
    else:
        dissimilarity = _local_ncc_of(fixed, moving, mask, settings.window)
    residual = torch.zeros_like(start, requires_grad=True)
    # Adam on the loss summed over voxels (the mean times the voxel count), with an eps far below the
    # per-voxel gradients of real misalignment (~1e-2) and far above float noise (~1e-7): where the
    # images already agree the gradient is noise, and plain Adam (eps 1e-8) would turn it into
    # lr-sized steps, moving an image registered to itself
    voxels = float(start[0, 0].numel())
    # lr is in voxels of the level's images: on a field grid coarser than them, that many of its voxels
    optimiser = Adam(residual, lr=settings.lr * image_scale / field_scale, eps=ADAM_EPS)
    best, since_best, taken, value, kept = float("inf"), 0, 0, float("nan"), None
    # a field grid of half the images' resolution (a 1 mm level of a 2 mm model) is upsampled inside the
    # warp's sampling grid; other ratios resample the field onto the images' grid first
    coarser = 2 if (field_scale == 2 * image_scale
                    and tuple(fixed.shape[2:]) == tuple(2 * n for n in start.shape[2:])) else 1
    with torch.enable_grad():
        for step in range(steps):
            current = start + residual
            disp = integrate_velocity(current, settings.integration_steps) if settings.transform == "velocity" else current
            if coarser == 1:
                disp = change_scale(disp, field_scale, image_scale, fixed.shape[2:])  # onto the images' grid (if finer)
            loss = dissimilarity(disp, coarser) + settings.smoothness * regulariser(current)
            taken, value = step + 1, float(loss.detach())
            if value < best - settings.min_improvement:
                best, since_best = value, 0
                kept = residual.detach().clone()  # the residual this loss belongs to (before the step)
            else:
                since_best += 1
                if since_best >= settings.patience:
                    break
            optimiser.zero_grad()
            (loss * voxels).backward()
            optimiser.step()
            progress(taken, value)
    # the best residual seen (trilinear warping has one-sided derivatives at whole-voxel shifts, so
    # Adam keeps oscillating around an optimum; where nothing improves the residual stays zero)
    return (kept if kept is not None else residual.detach()), taken, (best if kept is not None else value)


def instance_optimise(images_at: ImagesAt, initial: torch.Tensor, settings: IOSettings,
                      progress: ProgressCallback = no_progress) -> Tuple[torch.Tensor, IOReport]:
    """Refine ``initial`` (``(1, 3, D, H, W)`` network voxels on the network grid).

    Returns the refined displacement on the network grid, in its voxels, and the report of what ran.
    """
    report = IOReport()
    state = initial.detach().clone()  # velocity or displacement, on the network grid (scale 1)
    total = max(1, settings.total_steps)
    done = 0
    for number, level in enumerate(settings.levels, start=1):
        if level.steps == 0:
            continue
        started = time.perf_counter()
        with torch.no_grad():
            fixed, moving, mask = images_at(level.scale)
            # the residual's grid: the level's own, or the network grid for a finer level
            field_scale = max(level.scale, 1.0)
            field_size = state.shape[2:] if level.scale < 1.0 else fixed.shape[2:]
            start = change_scale(state, 1.0, field_scale, field_size)

        def level_progress(step: int, loss: float, number=number, level=level) -> None:
            every = max(1, level.steps // 10)
            if step % every == 0 or step == level.steps:
                progress((done + step) / total, f"instance optimisation level {number}/{len(settings.levels)} "
                                                f"({level.scale:g}x network spacing), step {step}/{level.steps}, "
                                                f"loss {loss:.4f}")

        residual, taken, loss = _optimise_level(fixed, moving, mask, start, level.steps, settings, level_progress,
                                                field_scale, level.scale)
        with torch.no_grad():
            state = state + change_scale(residual, field_scale, 1.0, state.shape[2:])
        done += level.steps
        report.levels.append({"scale": level.scale, "steps": taken, "planned_steps": level.steps, "loss": round(loss, 6),
                              "seconds": round(time.perf_counter() - started, 3)})
    with torch.no_grad():
        if settings.transform == "velocity":
            state = integrate_velocity(state, settings.integration_steps)
    return state, report
