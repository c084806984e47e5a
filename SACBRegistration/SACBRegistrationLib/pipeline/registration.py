"""The registration pipeline: one call from two images (and optional segmentations) to a physical
transform, warped images, metrics, cluster maps and pictures.

Stages: read and check inputs -> optional affine pre-alignment -> resample both images onto the
network grid (model spacing over the fixed image's extent, fixed direction, padded to a multiple
of 16) and normalise them as the model package says -> SACB-Net -> optional instance
optimisation -> physical displacement field on the fixed grid (LPS mm, affine composed in) ->
warped image and segmentations (one interpolation, straight from the original moving image) ->
metrics, cluster maps, RGB field.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import SimpleITK as sitk

from ..packages import ModelPackage
from ..preprocessing import normalise_intensity
from ..progress import ProgressCallback, no_progress
from .affine import AFFINE_MODES, pre_align
from .geometry import (field_in_index_frame, full_displacement_on, network_grid, vector_image,
                       voxel_displacement_to_physical)
from .io import ImageLike, InputError, read_image, read_segmentation
from .metrics_table import MetricsTable, evaluate_segmentations, regularity
from .visualisation import displacement_rgb

LABEL_INTERPOLATIONS = ("nearest", "linear")


class Cancelled(RuntimeError):
    """The registration was cancelled; nothing was written."""


@dataclass
class RegistrationOptions:
    """Settings of :func:`register`.

    Attributes:
        model: package name, package folder, a loaded :class:`ModelPackage`, or None for the
            default embedded model.
        device: ``"auto" | "cpu" | "cuda"``.
        clusters: k-means clusters per SACB block (None: the model's).
        io_steps: instance-optimisation Adam steps after the network (0 = off).
        io_smoothness, io_lr: its smoothness weight and step size (network voxels).
        affine: pre-alignment ``"off" | "rigid" | "affine"``.
        threads: torch CPU threads (None: torch's default).
        label_interpolation: warp segmentations with ``"nearest"`` neighbour or ``"linear"``
            interpolation of each label's mask (smoother edges, slower).
        label_names: optional ``{label: name}`` for the metrics table.
        cluster_maps: compute the SACB cluster maps.
    """

    model: Union[None, str, Path, ModelPackage] = None
    device: str = "auto"
    clusters: Optional[int] = None
    io_steps: int = 0
    io_smoothness: float = 1.0
    io_lr: float = 0.1
    affine: str = "off"
    threads: Optional[int] = None
    label_interpolation: str = "nearest"
    label_names: Dict[int, str] = field(default_factory=dict)
    cluster_maps: bool = True

    def validate(self) -> None:
        if self.affine not in AFFINE_MODES:
            raise ValueError(f"expected affine in {AFFINE_MODES}, got {self.affine!r}")
        if self.label_interpolation not in LABEL_INTERPOLATIONS:
            raise ValueError(f"expected label_interpolation in {LABEL_INTERPOLATIONS}, got {self.label_interpolation!r}")
        if self.clusters is not None and (not isinstance(self.clusters, int) or self.clusters < 1):
            raise ValueError(f"expected clusters >= 1, got {self.clusters!r}")
        if not isinstance(self.io_steps, int) or not 0 <= self.io_steps <= 10000:
            raise ValueError(f"expected io_steps between 0 and 10000, got {self.io_steps!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"expected device auto, cpu or cuda, got {self.device!r}")


@dataclass
class RegistrationResult:
    """Everything a registration produced (SimpleITK images on the fixed image's grid).

    Attributes:
        transform: ``DisplacementFieldTransform`` fixed -> moving (LPS mm), affine included:
            ``sitk.Resample(moving, fixed, transform)`` gives ``warped``.
        displacement: the same field as a vector image (``sitkVectorFloat64``).
        affine: the pre-alignment alone (None when off).
        warped: the moving image resampled (linear) onto the fixed grid.
        warped_segmentation: the moving segmentation warped likewise (when given).
        displacement_rgb: RGB picture of the field (x, y, z components as R, G, B; grey = 0).
        cluster_maps: ``{"level2_fixed": image, ...}`` SACB k-means labels (1..N, 0 outside).
        metrics: Dice / HD95 / ASSD per label before and after, and field regularity.
    """

    fixed: sitk.Image
    moving: sitk.Image
    transform: sitk.Transform
    displacement: sitk.Image
    affine: Optional[sitk.Transform]
    warped: sitk.Image
    displacement_rgb: sitk.Image
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

    def save(self, folder: Union[str, Path], overview: bool = True) -> Dict[str, Path]:
        """Write every output into ``folder`` (atomically); returns ``{kind: path}``."""
        from .outputs import save_result
        return save_result(self, folder, overview)

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
        low, high = float(np.percentile(array, 1)), float(np.percentile(array, 99))
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
    """Linear resampling onto the network grid; outside the image: its minimum (background)."""
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


def _cluster_images(clusters: Dict[int, Dict[str, Any]], grid: sitk.Image, fixed: sitk.Image) -> Dict[str, sitk.Image]:
    """k-means labels of each level (tensors ``(1, D_l, H_l, W_l)``) -> label images on the fixed grid.

    Level ``l`` voxel ``q`` pools network voxels ``2^(l-1) q .. 2^(l-1) (q + 1) - 1``, so its centre
    sits at network index ``2^(l-1) q + (2^(l-1) - 1) / 2``.
    """
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    images = {}
    for level, maps in sorted(clusters.items()):
        factor = 2 ** (level - 1)
        spacing = np.array(grid.GetSpacing()) * factor
        origin = np.array(grid.GetOrigin()) + direction @ (np.array(grid.GetSpacing()) * (factor - 1) / 2.0)
        for role, labels in maps.items():
            level_image = sitk.GetImageFromArray(labels[0].cpu().numpy().astype(np.int32) + 1)  # 0 stays "outside"
            level_image.SetSpacing([float(s) for s in spacing])
            level_image.SetOrigin([float(o) for o in origin])
            level_image.SetDirection(grid.GetDirection())
            images[f"level{level}_{role}"] = sitk.Resample(level_image, fixed, sitk.Transform(),
                                                           sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    return images


Predictor = Callable[[Any, Any, sitk.Image], Any]
"""``(moving, fixed, grid) -> (displacement, clusters)``: replaces the network (tests, other
networks). ``moving``, ``fixed``: normalised ``(1, 1, D, H, W)`` tensors on ``grid`` (the network
grid); returns a ``(1, 3, D, H, W)`` displacement in network voxels and a (possibly empty) dict
of cluster maps."""


def register(fixed: ImageLike, moving: ImageLike, fixed_segmentation: Optional[ImageLike] = None,
             moving_segmentation: Optional[ImageLike] = None, options: Optional[RegistrationOptions] = None,
             progress: ProgressCallback = no_progress, cancel: Optional[Callable[[], bool]] = None,
             predictor: Optional[Predictor] = None, **option_values: Any) -> RegistrationResult:
    """Register ``moving`` to ``fixed``.

    Args:
        fixed, moving: paths (NIfTI, NRRD, MHA, DICOM folder) or SimpleITK images.
        fixed_segmentation, moving_segmentation: optional label maps on their image's grid.
        options: a :class:`RegistrationOptions`; keyword arguments set its fields instead
            (``register(f, m, io_steps=50, affine="rigid")``).
        progress: ``callback(fraction, message)``.
        cancel: returns True to stop; checked between stages (raises :class:`Cancelled`).

    Raises:
        InputError: bad input (message names the problem and the fix).
        PackageError: the model cannot be found or fails its checksums.
        ResourceError: the machine cannot hold the work.
    """
    import torch

    from ..registry import get_model
    from .resources import plan_device, torch_threads

    if options is not None and option_values:
        raise ValueError("pass either options or keyword arguments, not both")
    options = options or RegistrationOptions(**option_values)
    options.validate()
    timings: Dict[str, float] = {}
    notes: List[str] = []
    clock = {"t": time.perf_counter()}

    def stage(name: str, fraction: float, message: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock["t"], 3)
        clock["t"] = now
        if cancel is not None and cancel():
            raise Cancelled("registration cancelled")
        progress(fraction, message)

    def sub(start: float, end: float) -> ProgressCallback:
        return lambda f, m: progress(start + (end - start) * (f if f is not None else 0.0), m)

    progress(0.0, "reading inputs")
    fixed_image = read_image(fixed, "fixed")
    moving_image = read_image(moving, "moving")
    fixed_seg = read_segmentation(fixed_segmentation, fixed_image, "fixed") if fixed_segmentation is not None else None
    moving_seg = read_segmentation(moving_segmentation, moving_image, "moving") if moving_segmentation is not None else None
    stage("read", 0.04, "loading the model")

    package = options.model if isinstance(options.model, ModelPackage) else get_model(options.model)
    notes.extend(domain_warnings(fixed_image, moving_image, package))
    grid = network_grid(fixed_image, package.spacing_mm)
    network_voxels = int(np.prod(grid.GetSize()))
    device = plan_device(options.device, network_voxels, fixed_image.GetNumberOfPixels(), notes)
    stage("model", 0.08, f"{options.affine} pre-alignment" if options.affine != "off" else "preparing images")

    affine = pre_align(fixed_image, moving_image, options.affine, sub(0.08, 0.22))
    stage("affine", 0.22, "resampling and normalising")

    fixed_array = normalise_intensity(_resample_to_grid(fixed_image, grid, None), package.intensity)
    moving_array = normalise_intensity(_resample_to_grid(moving_image, grid, affine), package.intensity)
    stage("preprocess", 0.28, f"running SACB-Net on {device.type.upper()} (grid {'x'.join(map(str, reversed(grid.GetSize())))})")

    with torch_threads(options.threads):
        if predictor is None:
            model = package.load_model()
            overrides = {} if options.clusters is None else {"clusters": options.clusters}

            def run_network(dev):
                net = model.to(dev)
                m = torch.from_numpy(moving_array)[None, None].to(dev)
                f = torch.from_numpy(fixed_array)[None, None].to(dev)
                with torch.no_grad():
                    out = net(m, f, return_clusters=options.cluster_maps, **overrides)
                return out.displacement.float(), out.clusters

            try:
                disp, clusters = run_network(device)
            except torch.cuda.OutOfMemoryError:
                notes.append("the GPU ran out of memory: finished on the CPU instead")
                torch.cuda.empty_cache()
                device = torch.device("cpu")
                disp, clusters = run_network(device)
        else:
            disp, clusters = predictor(torch.from_numpy(moving_array)[None, None], torch.from_numpy(fixed_array)[None, None],
                                       grid)
        stage("network", 0.6, "instance optimisation" if options.io_steps else "building the transform")

        if options.io_steps:
            from .instance_optimisation import instance_optimise
            f = torch.from_numpy(fixed_array)[None, None].to(disp.device)
            m = torch.from_numpy(moving_array)[None, None].to(disp.device)
            disp = instance_optimise(f, m, disp, options.io_steps, options.io_lr, options.io_smoothness,
                                     progress=sub(0.6, 0.75))
            stage("instance_optimisation", 0.75, "building the transform")

    physical = vector_image(voxel_displacement_to_physical(disp[0].cpu().numpy(), grid), grid)
    displacement = full_displacement_on(fixed_image, physical, affine)
    transform = sitk.DisplacementFieldTransform(sitk.Image(displacement))  # the transform takes its own copy
    stage("transform", 0.82, "warping")

    warped = sitk.Resample(moving_image, fixed_image, transform, sitk.sitkLinear,
                           float(sitk.GetArrayViewFromImage(moving_image).min()), sitk.sitkFloat32)
    warped_seg = None
    if moving_seg is not None:
        warped_seg = warp_segmentation(moving_seg, fixed_image, transform, options.label_interpolation)
    stage("warp", 0.88, "computing metrics")

    components, index_spacing = field_in_index_frame(displacement)
    metrics = MetricsTable(regularity=regularity(components, index_spacing))
    if fixed_seg is not None and moving_seg is not None:
        before = warp_segmentation(moving_seg, fixed_image, sitk.Transform(), "nearest")
        metrics = evaluate_segmentations(fixed_seg, before, warped_seg, options.label_names, metrics.regularity)
    stage("metrics", 0.94, "cluster maps and pictures")

    cluster_maps = _cluster_images(clusters, grid, fixed_image) if (options.cluster_maps and clusters) else {}
    rgb = displacement_rgb(displacement)
    stage("outputs", 1.0, "done")

    return RegistrationResult(
        fixed=fixed_image, moving=moving_image, transform=transform, displacement=displacement, affine=affine,
        warped=warped, displacement_rgb=rgb, metrics=metrics, fixed_segmentation=fixed_seg,
        moving_segmentation=moving_seg, warped_segmentation=warped_seg, cluster_maps=cluster_maps,
        model=package.summary(), device=device.type, warnings=notes, timings=timings,
        options={k: (str(v) if isinstance(v, (Path, ModelPackage)) else v) for k, v in options.__dict__.items()
                 if k != "model"} | {"model": package.name})
