"""The registration pipeline: one call from two images (and optional segmentations) to a physical
transform, warped images, metrics, cluster maps and pictures.

Stages (one function each): read and check inputs -> device plan -> optional affine pre-alignment
-> resample both images onto the network grid (model spacing over the fixed image's extent, fixed
direction, padded to a multiple of 16) and normalise them as the model package says -> predict
(SACB-Net) -> refine (multi-level instance optimisation, as the quality preset says) -> to
physical (the displacement on the grid it was estimated on, LPS mm, and the transform: the
pre-alignment composed with it) -> the whole map on the fixed grid (its displacement and Jacobian
determinant) -> warp (image and segmentations through that displacement, one interpolation,
straight from the original moving image) -> evaluate (metrics) -> render (cluster maps). The RGB
picture, and the whole map's displacement once more when asked for (``--write-field``), are
computed when first read from the result (saving them, Slicer, the overview).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..errors import Cancelled  # noqa: F401  (defined in errors.py; importable from here as before)
from ..packages import ModelPackage
from ..preprocessing import normalise_intensity, sampled_percentiles
from ..progress import ProgressCallback, no_progress
from ..runtime import parallel_map
from ..vocabulary import (
    AFFINE_MODES,
    DEFAULT_QUALITY,
    DEVICES,
    LABEL_INTERPOLATIONS,
    MAX_CLUSTERS,
    MAX_IO_STEPS,
    QUALITY_PRESETS,
    REGULARISERS,
    SIMILARITIES,
    TRANSFORM_MODELS,
    check_choice,
)
from .affine import pre_align
from .geometry import (
    affine_parts,
    array_components,
    composed_rows,
    composed_with_affine,
    field_on_reference,
    interpolate_rows,
    level_grid,
    network_grid,
    reference_positions,
    vector_image,
    voxel_displacement_to_physical,
)
from .io import SAME_GRID_TOLERANCE, ImageLike, InputError, check_image, check_segmentation, read_image_files, same_geometry
from .metrics_table import MetricsTable, evaluate_segmentations, regularity_of
from .presets import FINE_PASS_SCALE, IOLevel, IOSettings, check_integration_steps, levels_with_steps, preset
from .transform_file import round_field
from .visualisation import displacement_rgb

SAME_CONTRAST_CORRELATION = 0.5
"""``similarity="auto"`` picks local NCC when the fixed image and the network-warped moving image
correlate at least this much inside the fixed foreground (same contrast), else MIND-SSC."""
FOREGROUND_LEVEL = 0.05
"""Normalised intensity above which a voxel counts as foreground when the similarity is chosen."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class RegistrationOptions:
    """Settings of :func:`register`. ``None`` means "as the quality preset says".

    Attributes:
        quality: ``"fast" | "balanced" | "accurate"`` (default ``balanced``): fills every option
            left at None (see :mod:`.presets`).
        model: package name, package folder, a loaded :class:`ModelPackage`, or None for the
            default embedded model.
        device: ``"auto" | "cpu" | "cuda"``.
        clusters: k-means clusters per SACB block (None: the model's).
        affine: pre-alignment ``"off" | "rigid" | "affine"``.
        symmetric: run the network in both directions and use ``(u_fm - u_mf) / 2`` as a stationary
            velocity (:mod:`..networks.symmetric`: no drift on identical images, smoother fields).
        fine_pass: run the network once more at twice its resolution on the two images warped
            half-way (:func:`..networks.symmetric.half_way_velocity`; needs ``symmetric``): the best
            network-alone result, ~10x one pass's time on a CPU (off in every preset: see
            :data:`.presets.FINE_PASS_SCALE`).
        io_steps: Adam steps of every instance-optimisation level (0 = no instance optimisation;
            with the ``fast`` preset, N > 0 adds one level on the network grid).
        io_levels: ``((scale, steps), ...)`` levels of instance optimisation, scale = level
            spacing / network spacing (2, 1, 0.5, ...).
        io_transform: ``"displacement" | "velocity"`` (velocity: diffeomorphic, no folding).
        io_integration_steps: scaling-and-squaring steps of a velocity field (``v / 2**n`` composed
            ``n`` times).
        io_regulariser: ``"diffusion" | "bending"``; io_smoothness: its weight.
        io_lr: Adam step size (voxels of each level).
        similarity: ``"auto" | "lncc" | "mind"`` for instance optimisation.
        threads: torch CPU threads (None: torch's default).
        label_interpolation: warp segmentations with ``"nearest"`` neighbour or ``"linear"``
            interpolation of each label's mask (smoother edges, slower).
        label_names: optional ``{label: name}`` for the metrics table.
        cluster_maps: compute the SACB cluster maps.
    """

    quality: str = DEFAULT_QUALITY
    model: Union[None, str, Path, ModelPackage] = None
    device: str = "auto"
    clusters: Optional[int] = None
    affine: Optional[str] = None
    symmetric: Optional[bool] = None
    fine_pass: Optional[bool] = None
    io_steps: Optional[int] = None
    io_levels: Optional[Sequence[Sequence[float]]] = None
    io_transform: Optional[str] = None
    io_integration_steps: Optional[int] = None
    io_regulariser: str = "diffusion"
    io_smoothness: Optional[float] = None
    io_lr: float = 0.1
    similarity: str = "auto"
    threads: Optional[int] = None
    label_interpolation: str = "nearest"
    label_names: Dict[int, str] = field(default_factory=dict)
    cluster_maps: bool = True

    def validate(self) -> None:
        """Check every value (types included); ``ValueError("expected ..., got ...")`` otherwise."""
        check_choice("quality", self.quality, QUALITY_PRESETS)
        check_choice("device", self.device, DEVICES)
        check_choice("label_interpolation", self.label_interpolation, LABEL_INTERPOLATIONS)
        check_choice("similarity", self.similarity, SIMILARITIES)
        check_choice("io_regulariser", self.io_regulariser, REGULARISERS)
        if self.affine is not None:
            check_choice("affine", self.affine, AFFINE_MODES)
        if self.io_transform is not None:
            check_choice("io_transform", self.io_transform, TRANSFORM_MODELS)
        if self.clusters is not None and (not isinstance(self.clusters, int) or isinstance(self.clusters, bool)
                                          or not 1 <= self.clusters <= MAX_CLUSTERS):
            raise ValueError(f"expected clusters between 1 and {MAX_CLUSTERS} (or None for the model's), "
                             f"got {self.clusters!r}")
        if self.io_steps is not None and (not isinstance(self.io_steps, int) or isinstance(self.io_steps, bool)
                                          or not 0 <= self.io_steps <= MAX_IO_STEPS):
            raise ValueError(f"expected io_steps between 0 and {MAX_IO_STEPS}, got {self.io_steps!r}")
        if self.io_integration_steps is not None:
            check_integration_steps(self.io_integration_steps, "io_integration_steps")
        if not _is_number(self.io_lr) or self.io_lr <= 0:
            raise ValueError(f"expected io_lr > 0, got {self.io_lr!r}")
        if self.io_smoothness is not None and (not _is_number(self.io_smoothness) or self.io_smoothness < 0):
            raise ValueError(f"expected io_smoothness >= 0, got {self.io_smoothness!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads < 1):
            raise ValueError(f"expected threads >= 1 (or None), got {self.threads!r}")
        if not isinstance(self.cluster_maps, bool):
            raise ValueError(f"expected cluster_maps True or False, got {self.cluster_maps!r}")
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise ValueError(f"expected symmetric True, False or None (the preset's), got {self.symmetric!r}")
        if self.fine_pass is not None and not isinstance(self.fine_pass, bool):
            raise ValueError(f"expected fine_pass True, False or None (the preset's), got {self.fine_pass!r}")
        if self.io_levels is not None:
            for level in self.io_levels:
                if not isinstance(level, (tuple, list)) or len(level) != 2:
                    raise ValueError(f"expected io_levels as ((scale, steps), ...), got {self.io_levels!r}")
                IOLevel(float(level[0]), level[1])

    def resolved(self) -> "RegistrationOptions":
        """A copy with the preset's values in every field left at None (explicit values win)."""
        self.validate()
        values = preset(self.quality)
        out = dataclasses.replace(self)
        out.affine = self.affine if self.affine is not None else values["affine"]
        out.symmetric = self.symmetric if self.symmetric is not None else values["symmetric"]
        out.fine_pass = self.fine_pass if self.fine_pass is not None else values["fine_pass"]
        if out.fine_pass and not out.symmetric:
            raise ValueError("expected symmetric=True with fine_pass=True (the fine pass runs the network both ways on "
                             "the half-way images), got symmetric=False")
        out.io_transform = self.io_transform if self.io_transform is not None else values["io_transform"]
        out.io_smoothness = self.io_smoothness if self.io_smoothness is not None else values["io_smoothness"]
        out.io_integration_steps = (self.io_integration_steps if self.io_integration_steps is not None
                                    else values["io_integration_steps"])
        levels = tuple((float(a), int(b)) for a, b in self.io_levels) if self.io_levels is not None else values["io_levels"]
        if self.io_steps is not None:
            levels = levels_with_steps(levels, self.io_steps)
        out.io_levels = levels
        out.io_steps = sum(steps for _, steps in levels)
        return out

    def io_settings(self, similarity: str) -> IOSettings:
        """Instance-optimisation settings of resolved options, with the chosen similarity."""
        return IOSettings(levels=tuple(IOLevel(float(a), int(b)) for a, b in self.io_levels), lr=float(self.io_lr),
                          smoothness=float(self.io_smoothness), regulariser=self.io_regulariser, similarity=similarity,
                          transform=self.io_transform, integration_steps=int(self.io_integration_steps))


@dataclass
class RegistrationResult:
    """Everything a registration produced (SimpleITK images on the fixed image's grid).

    Attributes:
        transform: fixed -> moving (LPS mm): ``sitk.Resample(moving, fixed, transform)`` gives
            ``warped``. A ``CompositeTransform([affine, deformable])`` (``x -> A(x + v(x))``) with a
            pre-alignment, else the ``DisplacementFieldTransform`` ``deformable`` alone; ``v`` lives
            on the grid it was estimated on (``field``).
        field: ``v``, the deformable part (``sitkVectorFloat64``, LPS mm) on the grid it was estimated
            on (the network grid).
        displacement: the whole map's displacement ``A(x + v(x)) - x`` on the fixed grid
            (``sitkVectorFloat32``, LPS mm; ANTs' warp-field convention), computed on first use
            (60 MB at 1 mm that most runs never read).
        jacobian: determinant of the whole map's Jacobian on the fixed grid (``sitkFloat32``; 1 = volume
            kept, < 1 shrinking, > 1 expanding, <= 0 folding).
        affine: the pre-alignment alone (None when off).
        warped: the moving image resampled (linear) onto the fixed grid.
        warped_segmentation: the moving segmentation warped likewise (when given).
        displacement_rgb: RGB picture of the whole map's displacement on ``field``'s grid (x, y, z
            components as R, G, B; grey = 0), computed on first use.
        cluster_maps: ``{"level2_fixed": image, ...}`` SACB k-means labels (1..N, 0 outside).
        metrics: Dice / HD95 / ASSD per label before and after, and field regularity.
    """

    fixed: sitk.Image
    moving: sitk.Image
    transform: sitk.Transform
    field: sitk.Image
    jacobian: sitk.Image
    affine: Optional[sitk.Transform]
    warped: sitk.Image
    metrics: MetricsTable
    fixed_segmentation: Optional[sitk.Image] = None
    moving_segmentation: Optional[sitk.Image] = None
    warped_segmentation: Optional[sitk.Image] = None
    cluster_maps: Dict[str, sitk.Image] = field(default_factory=dict)
    model: Dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    warnings: List[str] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    options: Dict[str, Any] = field(default_factory=dict)

    @cached_property
    def displacement(self) -> sitk.Image:
        return vector_image(field_on_reference(sitk.GetArrayViewFromImage(self.field), self.field, self.fixed, self.affine),
                            self.fixed, sitk.sitkVectorFloat32)

    @cached_property
    def displacement_rgb(self) -> sitk.Image:
        whole = composed_with_affine(sitk.GetArrayViewFromImage(self.field), self.field, self.affine)
        return displacement_rgb(vector_image(whole, self.field, sitk.sitkVectorFloat32))

    def save(self, folder: Union[str, Path], overview: bool = True, overwrite: bool = False,
             extras: Sequence[str] = ()) -> Dict[str, Path]:
        """Write the outputs into ``folder``, published with one rename; an existing previous output
        is replaced only with ``overwrite``. ``extras``: optional outputs (``"displacement"``,
        ``"jacobian"``, see :data:`~..vocabulary.EXTRA_OUTPUTS`). Returns ``{kind: path}``."""
        from .outputs import save_result
        return save_result(self, folder, overview, overwrite, extras)

    def report(self) -> Dict[str, Any]:
        """JSON-friendly summary: model, device, options, timings, warnings, metrics."""
        return {"model": self.model, "device": self.device, "options": self.options, "timings_s": self.timings,
                "warnings": self.warnings, "metrics": self.metrics.to_dict()}


def domain_warnings(fixed: sitk.Image, moving: sitk.Image, package: ModelPackage) -> List[str]:
    """Warnings for inputs far outside the model's training domain (modality, resolution)."""
    notes = []
    model_spacing = max(package.spacing_mm)
    for role, image in (("fixed", fixed), ("moving", moving)):
        array = sitk.GetArrayViewFromImage(image)
        low, high = (float(v) for v in sampled_percentiles(array, [1, 99]))
        looks_ct = low < -500 and high > 100
        if package.modality.upper().startswith("MR") and looks_ct:
            notes.append(f"the {role} image looks like CT (intensities {low:.0f} to {high:.0f}) but model "
                         f"{package.name} was trained on {package.modality}; results may be poor")
        if package.modality.upper().startswith("CT") and not looks_ct and low >= 0:
            notes.append(f"the {role} image does not look like CT (no negative Hounsfield units) but model "
                         f"{package.name} was trained on CT; results may be poor")
        spacing = image.GetSpacing()
        if max(spacing) > 2.0 * model_spacing:
            notes.append(f"the {role} image has {max(spacing):.1f} mm voxels, much coarser than the model's "
                         f"{model_spacing:g} mm: fine structures cannot be aligned")
        if max(spacing) > 3.0 * min(spacing):
            notes.append(f"the {role} image is strongly anisotropic (spacing {tuple(round(s, 2) for s in spacing)})")
    return notes


def _resample_to_grid(image: sitk.Image, grid: sitk.Image, transform: Optional[sitk.Transform]) -> np.ndarray:
    """Linear resampling onto the network grid; outside the image: its minimum (background). Onto
    the image's own grid with no transform (the fixed image at a level of its own resolution) it is
    a copy: interpolation at the voxel centres gives the voxel values."""
    if transform is None and same_geometry(image, grid, SAME_GRID_TOLERANCE):
        return sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    background = float(sitk.GetArrayViewFromImage(image).min())
    out = sitk.Resample(image, grid, transform or sitk.Transform(), sitk.sitkLinear, background, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def warp_segmentation(segmentation: sitk.Image, reference: sitk.Image, transform: sitk.Transform,
                      interpolation: str = "nearest") -> sitk.Image:
    """Warp a label map onto ``reference`` (nearest, or label-wise linear + arg-max)."""
    if interpolation == "nearest":
        return sitk.Resample(segmentation, reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    array = sitk.GetArrayViewFromImage(segmentation)
    labels = [int(v) for v in np.unique(array) if v != 0]
    best = np.full(tuple(reversed(reference.GetSize())), 0.5, np.float32)  # background wins below 0.5
    out = np.zeros(best.shape, np.int32)
    for label in labels:
        mask = sitk.Cast(segmentation == label, sitk.sitkFloat32)
        prob = sitk.GetArrayFromImage(sitk.Resample(mask, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        better = prob > best
        out[better], best[better] = label, prob[better]
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(reference)
    return image


def _cluster_images(clusters: Dict[int, Dict[str, Any]], grid: sitk.Image) -> Dict[str, sitk.Image]:
    """k-means labels of each level (tensors ``(1, D_l, H_l, W_l)``) -> label images (1..k,
    ``sitkUInt8``) on the level's own grid, where the network computed them: level ``l`` voxel ``q``
    pools network voxels ``2^(l-1) q .. 2^(l-1) (q + 1) - 1`` (:func:`~.geometry.level_grid`). The
    grid covers the fixed image (it is the network grid, centred on it), so viewers overlay the maps
    on the fixed image as they are; upsampled onto a 1 mm fixed grid they took 20 MB each and
    0.3 s more per run, with nothing more to see.
    """
    images = {}
    for level, maps in sorted(clusters.items()):
        geometry = level_grid(grid, 2 ** (level - 1))
        for role, labels in maps.items():
            level_image = sitk.GetImageFromArray(labels[0].cpu().numpy().astype(np.uint8) + 1)  # (D_l, H_l, W_l), 1..k
            level_image.CopyInformation(geometry)
            images[f"level{level}_{role}"] = level_image
    return images


Predictor = Callable[[Any, Any, sitk.Image], Any]
"""``(moving, fixed, grid) -> (displacement, clusters)``: replaces the network (tests, other
networks). ``moving``, ``fixed``: normalised ``(1, 1, D, H, W)`` tensors on ``grid`` (the network
grid); returns a ``(1, 3, D, H, W)`` displacement in network voxels and a (possibly empty) dict
of cluster maps."""


@dataclass
class _Inputs:
    fixed: sitk.Image
    moving: sitk.Image
    fixed_seg: Optional[sitk.Image]
    moving_seg: Optional[sitk.Image]
    fixed_mask: Optional[sitk.Image]


class _Stages:
    """Times the stages of one run, checks for cancellation between them and reports progress."""

    def __init__(self, progress: ProgressCallback, cancel: Optional[Callable[[], bool]]) -> None:
        self.progress, self.cancel = progress, cancel
        self.timings: Dict[str, float] = {}
        self.clock = time.perf_counter()

    def done(self, name: str, fraction: float, next_message: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(self.timings.get(name, 0.0) + now - self.clock, 3)
        self.clock = now
        if self.cancel is not None and self.cancel():
            raise Cancelled("registration cancelled")
        self.progress(fraction, next_message)

    def sub(self, start: float, end: float) -> ProgressCallback:
        return lambda f, m: self.progress(start + (end - start) * (f if f is not None else 0.0), m)


def read_inputs(fixed: ImageLike, moving: ImageLike, fixed_segmentation: Optional[ImageLike],
                moving_segmentation: Optional[ImageLike], fixed_mask: Optional[ImageLike], notes: List[str]) -> _Inputs:
    """Stage 1: read and check the images, segmentations and mask."""
    files = read_image_files([(fixed, "fixed"), (moving, "moving"), (fixed_segmentation, "fixed segmentation"),
                              (moving_segmentation, "moving segmentation"), (fixed_mask, "fixed mask")],
                             optional=("fixed segmentation", "moving segmentation", "fixed mask"))
    fixed_image = check_image(files[0], "fixed", fixed)
    moving_image = check_image(files[1], "moving", moving)
    fixed_seg = check_segmentation(files[2], fixed_image, "fixed", fixed_segmentation) if files[2] is not None else None
    moving_seg = check_segmentation(files[3], moving_image, "moving", moving_segmentation) if files[3] is not None else None
    if (fixed_seg is None) != (moving_seg is None):
        given = "fixed" if fixed_seg is not None else "moving"
        notes.append(f"only a {given} segmentation was given: Dice / HD95 need both a fixed and a moving "
                     f"segmentation, so no overlap metrics are computed")
    mask = None
    if fixed_mask is not None:
        mask = check_segmentation(files[4], fixed_image, "fixed mask", fixed_mask)
        if not sitk.GetArrayViewFromImage(mask).any():
            raise InputError("the fixed mask is empty (no non-zero voxel); give a mask of the region to align, or none")
    if identical_images(fixed_image, moving_image):
        notes.append("the fixed and moving images are the same data: registering an image to itself should give "
                     "(close to) no motion; check that the intended moving image was selected")
    return _Inputs(fixed_image, moving_image, fixed_seg, moving_seg, mask)


def identical_images(a: sitk.Image, b: sitk.Image) -> bool:
    """Same grid and the same voxel values."""
    return same_geometry(a, b) and np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


LevelArrays = Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]
"""Normalised fixed and moving images and the fixed mask (or None) on one level grid, ``(D, H, W)`` float32."""


def finer_level_arrays(inputs: _Inputs, grid: sitk.Image, affine: Optional[sitk.Transform], package: ModelPackage,
                       options: "RegistrationOptions") -> Dict[float, LevelArrays]:
    """Stage (SimpleITK and NumPy only, so that it runs while the ``sacb`` command's torch import
    finishes): the images of instance optimisation's levels finer than the network grid, resampled
    from the originals (the moving one through the pre-alignment)."""
    scales = {scale for scale, steps in options.io_levels if steps and scale < 1.0} if options.io_steps else set()
    if options.fine_pass:
        scales.add(FINE_PASS_SCALE)
    scales = sorted(scales)
    return {scale: level_arrays(inputs, level_grid(grid, scale), affine, package) for scale in scales}


def level_arrays(inputs: _Inputs, grid: sitk.Image, affine: Optional[sitk.Transform],
                 package: ModelPackage) -> LevelArrays:
    """The normalised fixed and moving images and the fixed mask on ``grid`` (the two images in
    parallel threads: SimpleITK's resampling and most of NumPy's work release the GIL)."""
    fixed, moving = parallel_map(lambda job: network_input(*job), [(inputs.fixed, grid, None, package, "fixed"),
                                                                   (inputs.moving, grid, affine, package, "moving")])
    mask = None if inputs.fixed_mask is None else _resample_mask(inputs.fixed_mask, grid)
    return fixed, moving, mask


class _LevelImages:
    """Normalised fixed / moving images (and the fixed mask) on the level grids of instance
    optimisation, as tensors cached by scale. ``prepared`` holds the network grid's arrays (scale 1)
    and those of finer levels computed earlier (:func:`finer_level_arrays`); coarser levels
    average-pool the network-grid images, other finer ones resample the original images here."""

    def __init__(self, inputs: _Inputs, grid: sitk.Image, affine: Optional[sitk.Transform], package: ModelPackage,
                 device, prepared: Dict[float, LevelArrays]) -> None:
        self.inputs, self.grid, self.affine, self.package, self.device = inputs, grid, affine, package, device
        self.prepared = dict(prepared)
        self.network = self._tensors(self.prepared.pop(1.0))
        self.cache: Dict[float, Tuple[Any, Any, Any]] = {1.0: self.network}

    def _tensors(self, arrays: LevelArrays):
        import torch

        return tuple(None if a is None else torch.from_numpy(a)[None, None].to(self.device) for a in arrays)

    def __call__(self, scale: float):
        import torch.nn.functional as F

        if scale not in self.cache:
            if scale > 1:
                factor = int(scale)
                fixed, moving, mask = (None if t is None else F.avg_pool3d(t, factor) for t in self.network)
                mask = None if mask is None else (mask > 0.5).float()
            else:
                arrays = self.prepared.pop(scale, None)  # handed over once; the cache keeps the tensors
                if arrays is None:
                    arrays = level_arrays(self.inputs, level_grid(self.grid, scale), self.affine, self.package)
                fixed, moving, mask = self._tensors(arrays)
            self.cache[scale] = (fixed, moving, mask)
        return self.cache[scale]


def _resample_mask(mask: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """Binary float32 mask (non-zero labels) on ``grid`` (the mask's own grid: no resampling)."""
    if same_geometry(mask, grid, SAME_GRID_TOLERANCE):
        return (sitk.GetArrayViewFromImage(mask) != 0).astype(np.float32)
    binary = sitk.Cast(mask != 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(sitk.Resample(binary, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt8)).astype(np.float32)


def network_input(image: sitk.Image, grid: sitk.Image, transform: Optional[sitk.Transform], package: ModelPackage,
                  role: str) -> np.ndarray:
    """Stage: an image resampled onto the network grid and normalised as the model says."""
    resampled = _resample_to_grid(image, grid, transform)
    try:
        return normalise_intensity(resampled, package.intensity)
    except ValueError:
        extent = " x ".join(f"{n * s:.1f}" for n, s in zip(image.GetSize(), image.GetSpacing()))
        hint = ("; or register without pre-alignment (affine off): it may have moved the image out of the fixed "
                "image's extent") if transform is not None else ""
        raise InputError(f"the {role} image has no intensity range once resampled onto the model's "
                         f"{package.spacing_mm[0]:g} mm grid over the fixed image (it covers {extent} mm): it is nearly "
                         f"constant there or too small for that grid; check that it is the intended image{hint}") from None


@dataclass
class NetworkField:
    """What the network stage gives, on the network grid (``(1, 3, D, H, W)``, voxels, tensor-axis
    components): the displacement, and with symmetric inference the stationary velocity it
    integrates (None otherwise)."""

    displacement: Any
    velocity: Any = None

    def initial(self, transform: str):
        """Where instance optimisation of ``transform`` starts: a velocity optimisation from the
        velocity when there is one, else from the displacement (read as a velocity: small fields)."""
        return self.velocity if (transform == "velocity" and self.velocity is not None) else self.displacement


def _forward_overrides(options: RegistrationOptions) -> Dict[str, Any]:
    """The network's forward options that registration options override (the clusters per SACB block)."""
    return {} if options.clusters is None else {"clusters": options.clusters}


def _on_device_or_cpu(run: Callable[[Any], Any], device, notes: List[str], what: str) -> Tuple[Any, Any]:
    """``(run(device), device)``, or after a CUDA out-of-memory error ``(run(cpu), cpu)`` with a
    note saying that ``what`` finished on the CPU."""
    import torch

    try:
        return run(device), device
    except torch.cuda.OutOfMemoryError:
        notes.append(f"the GPU ran out of memory{what}: finished on the CPU instead")
        torch.cuda.empty_cache()
        cpu = torch.device("cpu")
        return run(cpu), cpu


def predict(package: ModelPackage, options: RegistrationOptions, moving_array: np.ndarray, fixed_array: np.ndarray,
            grid: sitk.Image, device, predictor: Optional[Predictor], notes: List[str]):
    """Stage: the network (or ``predictor``) on the network grid -> ``(NetworkField, clusters, device)``;
    with ``options.symmetric`` in both directions (:func:`..networks.symmetric.symmetric_velocity`).
    A CUDA out-of-memory error falls back to the CPU."""
    import torch

    from ..networks.symmetric import symmetric_velocity
    from ..spatial.warping import integrate_velocity

    if predictor is not None:
        disp, clusters = predictor(torch.from_numpy(moving_array)[None, None], torch.from_numpy(fixed_array)[None, None],
                                   grid)
        return NetworkField(disp), clusters, disp.device
    model = package.load_model(cache=True)  # loaded once per package object (a batch reuses it)
    overrides = _forward_overrides(options)

    def run_network(dev):
        net = model.to(dev)
        m = torch.from_numpy(moving_array)[None, None].to(dev)
        f = torch.from_numpy(fixed_array)[None, None].to(dev)
        with torch.no_grad():
            if options.symmetric:
                velocity, clusters = symmetric_velocity(net, m, f, return_clusters=options.cluster_maps, **overrides)
                return NetworkField(integrate_velocity(velocity, options.io_integration_steps), velocity), clusters
            out = net(m, f, return_clusters=options.cluster_maps, **overrides)
        return NetworkField(out.displacement.float()), out.clusters

    (field, clusters), device = _on_device_or_cpu(run_network, device, notes, "")
    return field, clusters, device


def fine_pass(package: ModelPackage, options: RegistrationOptions, images: "_LevelImages",
              network: NetworkField, notes: List[str]) -> NetworkField:
    """Stage: the network once more on the images at :data:`.presets.FINE_PASS_SCALE`, warped
    half-way (:func:`..networks.symmetric.half_way_velocity`) -> the refined :class:`NetworkField`
    on the network grid (the field stays there, as instance optimisation's finer levels keep it).
    A CUDA out-of-memory error runs the pass on the CPU and moves its answer back."""
    import torch

    from ..networks import symmetric
    from ..spatial.warping import change_scale, integrate_velocity

    fixed, moving, _ = images(FINE_PASS_SCALE)
    overrides = _forward_overrides(options)
    steps = int(options.io_integration_steps)

    def run(dev) -> torch.Tensor:
        net = package.load_model(cache=True).to(dev)
        first = network.velocity.to(dev)
        with torch.no_grad():
            start = change_scale(first, 1.0, FINE_PASS_SCALE, fixed.shape[2:])  # (1, 3, D_f, H_f, W_f)
            velocity = symmetric.half_way_velocity(net, moving.to(dev), fixed.to(dev), start, steps, **overrides)
            return change_scale(velocity, FINE_PASS_SCALE, 1.0, first.shape[2:])  # (1, 3, D, H, W)

    device = network.velocity.device
    velocity, _ = _on_device_or_cpu(run, device, notes, " in the fine pass")
    velocity = velocity.to(device)  # back where the rest of the run is
    with torch.no_grad():
        return NetworkField(integrate_velocity(velocity, steps), velocity)


def choose_similarity(requested: str, fixed, moving, disp) -> Tuple[str, str]:
    """Resolve ``similarity="auto"``: local NCC when the fixed image and the network-warped moving
    image correlate (same contrast), else MIND-SSC. Returns ``(similarity, reason)``."""
    import torch

    from ..spatial.warping import warp

    if requested != "auto":
        return requested, "as requested"
    with torch.no_grad():
        warped = warp(moving, disp)
    foreground = (fixed > FOREGROUND_LEVEL) | (warped > FOREGROUND_LEVEL)
    a, b = fixed[foreground].double(), warped[foreground].double()
    if a.numel() < 2 or float(a.std()) == 0 or float(b.std()) == 0:
        return "lncc", "auto: too little foreground to compare contrasts; local NCC"
    correlation = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))
    if correlation >= SAME_CONTRAST_CORRELATION:
        return "lncc", f"auto: same contrast (intensity correlation {correlation:.2f} after the network); local NCC"
    return "mind", (f"auto: different contrasts (intensity correlation {correlation:.2f} after the network); "
                    f"MIND-SSC")


def refine(options: RegistrationOptions, images: "_LevelImages", network: NetworkField, stages: _Stages,
           notes: List[str], report: Dict[str, Any]):
    """Stage: instance optimisation from the network's answer -> the refined displacement on the network grid."""
    from .instance_optimisation import instance_optimise

    fixed, moving, _ = images(1.0)
    similarity, reason = choose_similarity(options.similarity, fixed, moving, network.displacement)
    report["similarity"] = similarity
    report["similarity_reason"] = reason
    if options.similarity == "auto" and similarity == "mind":
        notes.append(f"instance optimisation uses MIND-SSC: {reason}")
    refined, io_report = instance_optimise(images, network.initial(options.io_transform), options.io_settings(similarity),
                                           stages.sub(0.6, 0.78))
    report["levels"] = io_report.levels
    return refined


def to_physical(disp, field_grid: sitk.Image, affine: Optional[sitk.Transform]) -> Tuple[sitk.Image, sitk.Transform]:
    """Stage: voxel displacement on ``field_grid`` -> ``(field, transform)``: the deformable part ``v``
    as an image on that grid (LPS mm) and the transform ``x -> A(x + v(x))`` (fixed -> moving)."""
    # rounded as transform.h5 stores it, so that the written file is exactly the transform that warped the outputs
    physical = round_field(voxel_displacement_to_physical(disp[0].cpu().numpy(), field_grid))
    field_image = vector_image(physical, field_grid)
    deformable = sitk.DisplacementFieldTransform(sitk.Image(field_image))  # the transform takes its own copy
    if affine is None:
        return field_image, deformable
    # a composite applies its last transform first: x -> affine(x + v(x))
    return field_image, sitk.CompositeTransform([affine, deformable])


def warp_inputs(inputs: _Inputs, displacement: sitk.Image, transform: sitk.Transform, label_interpolation: str):
    """Stage: the moving image (linear) and segmentation onto the fixed grid, straight from the originals,
    through the whole map's ``displacement`` on the fixed grid (:func:`map_on_fixed_grid`): one look-up
    per voxel instead of ITK evaluating ``transform`` (the pre-alignment after the field on its own grid)
    point by point, about 3x less work; the same positions to float32 rounding of the displacement
    (micrometres), so ``transform`` read back from ``transform.h5`` reproduces the outputs to that
    rounding. Label-wise linear interpolation of the segmentation resamples through ``transform``."""
    fixed = inputs.fixed
    grid = (fixed.GetSize(), fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
    background = float(sitk.GetArrayViewFromImage(inputs.moving).min())
    warped = sitk.Warp(inputs.moving, displacement, sitk.sitkLinear, *grid, background)  # float32 in and out
    warped_seg = None
    if inputs.moving_seg is not None:
        if label_interpolation == "nearest":
            warped_seg = sitk.Warp(inputs.moving_seg, displacement, sitk.sitkNearestNeighbor, *grid, 0)  # int32
        else:
            warped_seg = warp_segmentation(inputs.moving_seg, fixed, transform, label_interpolation)
    return warped, warped_seg


JACOBIAN_SLAB_ROWS = 16
"""Rows of the fixed grid's first array axis per piece of :func:`map_on_fixed_grid` (pieces run in threads)."""


def map_on_fixed_grid(fixed: sitk.Image, field_image: sitk.Image, affine: Optional[sitk.Transform],
                      slab_rows: int = JACOBIAN_SLAB_ROWS) -> Tuple[sitk.Image, sitk.Image]:
    """Stage: the whole map ``x -> A(x + v(x))`` on the fixed grid -> ``(displacement, jacobian)``: its
    displacement ``A(x + v(x)) - x`` (``sitkVectorFloat32``, LPS mm; what warps the images) and the
    determinant of its Jacobian (``sitkFloat32``), ``det(M) * det(I + Dv)`` for the pre-alignment's
    matrix ``M``. The finite differences of the affine part are exact, so the determinant equals
    differencing the composed displacement (to float rounding) without building it first.

    ``v`` (on the grid it was estimated on) is turned into array-axis components there, which commutes
    with its trilinear interpolation onto the fixed grid, and the fixed grid is done in slabs of
    ``slab_rows`` rows (each with a row of neighbours either side for the central differences) in
    threads: the same values as the whole grid at once, with any number of threads."""
    from ..metrics import jacobian_determinant

    # (3, D', H', W') components along the array axes (d, h, w) in mm, on the field grid (same direction as fixed)
    coarse, _ = array_components(np.asarray(sitk.GetArrayViewFromImage(field_image), np.float32), field_image)
    spacing = tuple(reversed(fixed.GetSpacing()))  # the differences are taken on the fixed grid, array order
    positions = reference_positions(field_image, fixed)
    shape = tuple(reversed(fixed.GetSize()))  # (D, H, W)
    displacement = np.empty(shape + (3,), np.float32)
    determinant = np.empty(shape, np.float32)

    def slab(start: int) -> None:
        stop = min(start + slab_rows, shape[0])
        below, above = max(start - 1, 0), min(stop + 1, shape[0])  # neighbours: interior rows get central differences
        v = interpolate_rows(coarse, positions, slice(below, above))  # (3, rows + halo, H, W) mm on the fixed grid
        determinant[start:stop] = jacobian_determinant(v, spacing)[start - below:stop - below]
        composed_rows(v[:, start - below:stop - below], fixed, affine, start, out=displacement[start:stop])

    parallel_map(slab, range(0, shape[0], slab_rows))  # each slab writes its own rows
    if affine is not None:
        determinant *= np.float32(np.linalg.det(affine_parts(affine)[0]))
    jacobian = sitk.GetImageFromArray(determinant)
    jacobian.CopyInformation(fixed)
    return vector_image(displacement, fixed, sitk.sitkVectorFloat32), jacobian


def evaluate(inputs: _Inputs, jacobian: sitk.Image, warped_seg: Optional[sitk.Image],
             label_names: Dict[int, str]) -> MetricsTable:
    """Stage: field regularity (folding, SDlogJ over the fixed grid) and, with both segmentations,
    Dice / HD95 / ASSD before (the moving segmentation on the fixed grid as it is) and after, in one
    pass that shares the fixed segmentation's work (cheaper than the "before" half in a background
    thread beside the threaded stages before this one: README, Where the time goes)."""
    metrics = MetricsTable(regularity=regularity_of(sitk.GetArrayViewFromImage(jacobian)))
    if inputs.fixed_seg is not None and inputs.moving_seg is not None:
        before = warp_segmentation(inputs.moving_seg, inputs.fixed, sitk.Transform(), "nearest")
        metrics = evaluate_segmentations(inputs.fixed_seg, before, warped_seg, label_names, metrics.regularity)
    return metrics


def register(fixed: ImageLike, moving: ImageLike, fixed_segmentation: Optional[ImageLike] = None,
             moving_segmentation: Optional[ImageLike] = None, options: Optional[RegistrationOptions] = None,
             progress: ProgressCallback = no_progress, cancel: Optional[Callable[[], bool]] = None,
             predictor: Optional[Predictor] = None, fixed_mask: Optional[ImageLike] = None,
             **option_values: Any) -> RegistrationResult:
    """Register ``moving`` to ``fixed``.

    Args:
        fixed, moving: paths (NIfTI, NRRD, MHA, DICOM folder) or SimpleITK images.
        fixed_segmentation, moving_segmentation: optional label maps on their image's grid.
        options: a :class:`RegistrationOptions`; keyword arguments set its fields instead
            (``register(f, m, quality="accurate", affine="rigid")``).
        progress: ``callback(fraction, message)``.
        cancel: returns True to stop; checked between stages (raises :class:`Cancelled`).
        fixed_mask: optional label map on the fixed grid; instance optimisation compares the
            images only inside its non-zero voxels.

    Raises:
        InputError: bad input (message names the problem and the fix).
        PackageError: the model cannot be found or fails its checksums.
        ResourceError: the machine cannot hold the work.
    """
    from ..registry import get_model
    from ..runtime import release_memory

    if options is not None and option_values:
        raise ValueError("pass either options or keyword arguments, not both")
    if options is not None and not isinstance(options, RegistrationOptions):
        raise TypeError(f"expected options as a RegistrationOptions (or keyword arguments), got {type(options).__name__}")
    options = (options or RegistrationOptions(**option_values)).resolved()
    notes: List[str] = []
    io_report: Dict[str, Any] = {}
    stages = _Stages(progress, cancel)

    release_memory()  # what earlier runs' dropped results freed goes back to the system before this run allocates
    progress(0.0, "reading inputs")
    inputs = read_inputs(fixed, moving, fixed_segmentation, moving_segmentation, fixed_mask, notes)
    stages.done("read", 0.04, "loading the model")

    package = options.model if isinstance(options.model, ModelPackage) else get_model(options.model)  # torch-free
    notes.extend(domain_warnings(inputs.fixed, inputs.moving, package))
    grid = network_grid(inputs.fixed, package.spacing_mm)
    stages.done("model", 0.08, f"{options.affine} pre-alignment" if options.affine != "off" else "preparing images")

    # SimpleITK and NumPy only up to the device plan: the sacb command imports torch in the background
    # meanwhile (runtime.import_in_background)
    affine = pre_align(inputs.fixed, inputs.moving, options.affine, stages.sub(0.08, 0.22))
    stages.done("affine", 0.22, "resampling and normalising")

    network_arrays = level_arrays(inputs, grid, affine, package)  # (fixed, moving, fixed mask) on the network grid
    fixed_array, moving_array, _ = network_arrays
    finer_arrays = finer_level_arrays(inputs, grid, affine, package, options)
    stages.done("preprocess", 0.26, "planning the device")

    from .resources import plan_device, torch_threads  # the first use of torch

    finest = min([1.0] + [scale for scale, steps in options.io_levels if steps])
    # the largest torch workload in network-grid voxels: the finest instance-optimisation level, or the
    # network's batch of two when it runs both ways
    workload = max(1.0 / finest ** 3, 2.0 if options.symmetric else 1.0,
                   2.0 / FINE_PASS_SCALE ** 3 if options.fine_pass else 0.0)
    device = plan_device(options.device, int(np.prod(grid.GetSize()) * workload), inputs.fixed.GetNumberOfPixels(), notes)
    stages.done("device", 0.28, f"running SACB-Net on {device.type.upper()} "
                                f"(grid {'x'.join(map(str, reversed(grid.GetSize())))})")

    with torch_threads(options.threads):
        network, clusters, device = predict(package, options, moving_array, fixed_array, grid, device, predictor, notes)
        images = (_LevelImages(inputs, grid, affine, package, device, {1.0: network_arrays, **finer_arrays})
                  if options.fine_pass or options.io_steps else None)
        last_stage = "network"
        if options.fine_pass and network.velocity is not None:
            stages.done("network", 0.45, f"running SACB-Net again at {package.spacing_mm[0] * FINE_PASS_SCALE:g} mm "
                                         f"(fine pass)")
            network, last_stage = fine_pass(package, options, images, network, notes), "fine_pass"
        elif options.fine_pass:
            notes.append("fine pass skipped: it needs the model's symmetric velocity (a custom predictor gives none)")
        disp = network.displacement
        stages.done(last_stage, 0.6, "instance optimisation" if options.io_steps else "building the transform")
        if options.io_steps:
            disp = refine(options, images, network, stages, notes, io_report)
            stages.done("instance_optimisation", 0.78, "building the transform")

    field_image, transform = to_physical(disp, grid, affine)
    displacement, jacobian = map_on_fixed_grid(inputs.fixed, field_image, affine)
    stages.done("transform", 0.82, "warping")

    warped, warped_seg = warp_inputs(inputs, displacement, transform, options.label_interpolation)
    del displacement  # 60 MB at 1 mm; the result recomputes it only when asked (RegistrationResult.displacement)
    stages.done("warp", 0.88, "computing metrics")

    metrics = evaluate(inputs, jacobian, warped_seg, options.label_names)
    stages.done("metrics", 0.94, "cluster maps")

    cluster_maps = _cluster_images(clusters, grid) if (options.cluster_maps and clusters) else {}
    stages.done("outputs", 1.0, "done")

    release_memory()  # the stages' freed buffers go back to the system (long-lived processes stay flat)
    recorded = {k: (str(v) if isinstance(v, (Path, ModelPackage)) else v) for k, v in options.__dict__.items()
                if k != "model"}
    recorded.update(model=package.name, io_levels=[list(level) for level in options.io_levels],
                    instance_optimisation=io_report)
    return RegistrationResult(
        fixed=inputs.fixed, moving=inputs.moving, transform=transform, field=field_image, jacobian=jacobian,
        affine=affine, warped=warped, metrics=metrics, fixed_segmentation=inputs.fixed_seg,
        moving_segmentation=inputs.moving_seg, warped_segmentation=warped_seg, cluster_maps=cluster_maps,
        model=package.reference(), device=device.type, warnings=notes, timings=stages.timings, options=recorded)
