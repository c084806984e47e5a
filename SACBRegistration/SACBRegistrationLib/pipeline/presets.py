"""Quality presets (``fast``, ``balanced`` = the default, ``accurate``) and the settings of
instance optimisation they resolve to (torch-free).

A preset fills every option the caller left at ``None``; explicit options always win. The
figures behind the choices (held-out 1 mm pairs, 2-core CPU) are in the README's "Quality presets"
section and come from ``benchmarks/evaluate_presets.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from ..vocabulary import (
    DEFAULT_QUALITY,
    MAX_INTEGRATION_STEPS,
    MAX_IO_STEPS,
    QUALITY_PRESETS,
    REGULARISERS,
    SIMILARITIES,
    TRANSFORM_MODELS,
    check_choice,
)

Levels = Tuple[Tuple[float, int], ...]
"""Instance-optimisation levels: ``(scale, steps)`` with scale = level spacing / network spacing."""

PRESETS: Dict[str, Dict[str, Any]] = {
    # every preset runs the network in both directions ("symmetric", networks/symmetric.py): on
    # held-out 1 mm pairs (model 2.2.0, network alone) Dice 0.804 against 0.803, SDlogJ 0.19 against
    # 0.32, and an image registered to itself stays put (0.04 mm against 1.34), for ~0.3 s more.
    # fast: the network alone, its symmetric velocity integrated with 7 squarings
    "fast": {"affine": "affine", "symmetric": True, "fine_pass": False, "io_levels": (), "io_transform": "displacement",
             "io_smoothness": 1.0, "io_integration_steps": 7},
    # the network, then instance optimisation of a stationary velocity field (diffeomorphic: no
    # folding) starting from the network's symmetric velocity, integrated with 4 squarings: 10 Adam
    # steps at half the network's resolution, 10 on its grid, then 6 comparing the images at twice
    # its resolution (the field stays on the network grid). Chosen on three held-out sets of 8 pairs
    # at 1 mm (README "Quality presets", model 2.2.0; Dice of 10 + 3 steps without the coarse level /
    # with 10 coarse steps / with 20): like the training pairs 0.849 / 0.842 / 0.838, larger
    # deformations 0.827 / 0.826 / 0.822, large smooth deformations the network underestimates
    # 0.784 / 0.803 / 0.807: 10 coarse steps lose little where the network is already good and
    # recover much where it is not. The 10 steps on the network grid pay (earlier: 5 steps Dice
    # -0.009, none -0.031); each fine step costs ~0.5 s and adds ~0.002 Dice. 6 fine steps instead
    # of 3 (session 13, model 2.3.0, tuning pairs of seed 262626, after the command's allocator
    # change saved ~1-2 s): Dice 0.858 against 0.852, higher on 8 of 8 pairs, in 9.8 against 8.3 s
    # per pair, where a third of ANTs SyN's time in the same run was 12.3 s
    "balanced": {"affine": "affine", "symmetric": True, "fine_pass": False, "io_levels": ((2.0, 10), (1.0, 10), (0.5, 6)),
                 "io_transform": "velocity", "io_smoothness": 1.0, "io_integration_steps": 4},
    # balanced's levels with 13 steps comparing at twice the network's resolution (without the coarse
    # level: Dice 0.862 in 19.8 s per pair on the first set, 14 fine steps the same Dice in 21.6 s),
    # under elastix's ~24 s
    "accurate": {"affine": "affine", "symmetric": True, "fine_pass": False, "io_levels": ((2.0, 10), (1.0, 10), (0.5, 13)),
                 "io_transform": "velocity", "io_smoothness": 1.0, "io_integration_steps": 4},
}
assert tuple(PRESETS) == QUALITY_PRESETS, "every preset of the vocabulary has settings, and only those"

FINE_PASS_SCALE = 0.5
"""The fine pass's grid (``fine_pass``, :func:`..networks.symmetric.half_way_velocity`): spacing
relative to the network grid (1 mm for a 2 mm model). Off in every preset: on held-out 1 mm pairs
(session 19, 2-core CPU, 33 labels) it lifts the network alone from Dice 0.781 to 0.815 (16 labels:
0.809 -> 0.841) for ~15 s more per pair, where ``balanced``'s instance optimisation reaches 0.823 in
~10 s in all and gains only 0.003 from it (at 1.5 mm, scale 0.75: 0.803 for ~3 s more). On a GPU
the pass should cost far less; not measured here."""

SINGLE_LEVEL_SCALE = 1.0
"""With ``io_steps`` > 0 and a preset without levels (``fast``), one level on the network grid (a
level at half its resolution alone lowered Dice below the network's on held-out pairs)."""


def preset(quality: str = DEFAULT_QUALITY) -> Dict[str, Any]:
    """The settings of a preset (a copy)."""
    check_choice("quality", quality, QUALITY_PRESETS)
    return dict(PRESETS[quality])


def levels_with_steps(levels: Levels, steps: int) -> Levels:
    """``levels`` with every level's steps set to ``steps`` (``io_steps`` overrides the preset's);
    0 turns instance optimisation off."""
    if steps == 0:
        return ()
    if not levels:
        return ((SINGLE_LEVEL_SCALE, steps),)
    return tuple((scale, steps) for scale, _ in levels)


def check_integration_steps(value: Any, name: str) -> None:
    """Scaling-and-squaring steps: an int from 1 to :data:`MAX_INTEGRATION_STEPS` (``ValueError`` naming ``name``)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_INTEGRATION_STEPS:
        raise ValueError(f"expected {name} between 1 and {MAX_INTEGRATION_STEPS}, got {value!r}")


RESOLVED_SIMILARITIES = tuple(s for s in SIMILARITIES if s != "auto")
"""What ``similarity="auto"`` resolves to, one of these, before instance optimisation runs."""


@dataclass(frozen=True)
class IOLevel:
    """One level: its grid's spacing relative to the network grid (a power of two) and its Adam steps."""

    scale: float
    steps: int

    def __post_init__(self) -> None:
        allowed = (0.25, 0.5, 1.0, 2.0, 4.0)
        if self.scale not in allowed:
            raise ValueError(f"expected a level scale in {allowed}, got {self.scale!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 0 <= self.steps <= MAX_IO_STEPS:
            raise ValueError(f"expected level steps between 0 and {MAX_IO_STEPS}, got {self.steps!r}")


@dataclass(frozen=True)
class IOSettings:
    """Settings of :func:`instance_optimise` (see the module docstring).

    ``lr``: Adam step in voxels of each level; ``smoothness``: regulariser weight; ``window``: local
    NCC window (voxels of each level); ``patience`` / ``min_improvement``: early stop per level.
    """

    levels: Tuple[IOLevel, ...] = (IOLevel(2.0, 50),)
    lr: float = 0.1
    smoothness: float = 1.0
    regulariser: str = "diffusion"
    similarity: str = "lncc"
    transform: str = "displacement"
    window: int = 5
    patience: int = 10
    min_improvement: float = 1e-4
    integration_steps: int = 7

    def __post_init__(self) -> None:
        check_integration_steps(self.integration_steps, "integration steps")
        check_choice("regulariser", self.regulariser, REGULARISERS)
        check_choice("similarity", self.similarity, RESOLVED_SIMILARITIES)
        check_choice("io transform", self.transform, TRANSFORM_MODELS)
        for name, value in (("lr", self.lr), ("smoothness", self.smoothness), ("min_improvement", self.min_improvement)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value == value or value < 0:
                raise ValueError(f"expected a non-negative number for io {name}, got {value!r}")
        if self.lr == 0:
            raise ValueError("expected io lr > 0, got 0")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"expected an odd io window >= 1, got {self.window!r}")

    @property
    def total_steps(self) -> int:
        return sum(level.steps for level in self.levels)
