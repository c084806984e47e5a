"""The project's vocabulary: every option value, output kind, protocol string and limit, in one
torch-free module at the bottom of the package. The command line, the pipeline, training, the
worker and the Slicer module all import from here, so a value is written once.
"""

from __future__ import annotations

from typing import Dict, Tuple

# --------------------------------------------------------------------------- devices and options

DEVICES: Tuple[str, ...] = ("auto", "cpu", "cuda")
"""Where the network runs: ``auto`` picks CUDA when a device with enough memory exists."""

DEFAULT_DEVICE = "auto"

AFFINE_MODES: Tuple[str, ...] = ("off", "rigid", "affine")
"""Pre-alignment of the moving image before the network."""

LABEL_INTERPOLATIONS: Tuple[str, ...] = ("nearest", "linear")
"""How segmentations are warped: nearest neighbour, or label-wise linear + arg-max."""

PAIR_MODES: Tuple[str, ...] = ("atlas-to-subject", "subject-to-subject")
"""How synthetic training pairs are made from one template."""

SIMILARITIES: Tuple[str, ...] = ("auto", "lncc", "mind")
"""Similarity of instance optimisation: local NCC (same contrast), MIND-SSC (any contrast), or
``auto`` (decided from the model's modality and the pair)."""

REGULARISERS: Tuple[str, ...] = ("diffusion", "bending")
"""Regulariser of instance optimisation: first derivatives (diffusion) or second (bending energy)."""

TRANSFORM_MODELS: Tuple[str, ...] = ("displacement", "velocity")
"""What instance optimisation optimises: the displacement itself, or a stationary velocity field
integrated by scaling and squaring (diffeomorphic: no folding by construction)."""

QUALITY_PRESETS: Tuple[str, ...] = ("fast", "balanced", "accurate")
"""Quality presets; ``balanced`` is the default everywhere (command, API, Slicer module)."""

DEFAULT_QUALITY = "balanced"

MIN_TORCH_VERSION = "2.1"
"""The oldest PyTorch the engine runs with (``torch>=2.1`` in pyproject.toml's dependencies; the
Slicer module asks the PyTorch extension for at least this version and refuses older installs)."""

# --------------------------------------------------------------------------- limits

MAX_IO_STEPS = 10000
"""Upper bound of instance-optimisation steps per level (a typo guard)."""

MAX_INTEGRATION_STEPS = 12
"""Most scaling-and-squaring steps of a velocity field (2**12 sub-steps: far more than any field needs)."""

MAX_CLUSTERS = 64
"""Upper bound of k-means clusters per SACB block."""

CLUSTER_FEATURES: Tuple[str, ...] = ("spatial", "channel", "both")
"""Clustering feature of a SACB block (paper Eq. 3 and Table 4): the mean of each unfolded
3x3x3 patch over its spatial taps (one value per channel), over its channels (one value per
tap), or both concatenated (the paper's "Mix")."""

NUM_LEVELS = 5
"""Pyramid levels of SACB-Net; level ``i`` has spatial size ``(D, H, W) / 2**(i - 1)``."""

SACB_LEVELS: Tuple[int, ...] = (2, 3, 4, 5)
"""Levels that carry a SACB block and a similarity-matching flow estimator (level 1 is the head)."""

SIZE_MULTIPLE = 2 ** (NUM_LEVELS - 1)
"""Spatial sizes (and the network grid) must be multiples of this (four 2x poolings)."""

# --------------------------------------------------------------------------- inputs

IMAGE_SUFFIXES: Tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""Image files read as one volume (NIfTI, NRRD, MetaImage); DICOM is read from a folder of slices.
Lower case, longest first where one ends another (``.nii.gz`` before ``.nii``)."""

# --------------------------------------------------------------------------- outputs

METRIC_COLUMNS: Tuple[str, ...] = ("label", "name", "fixed_voxels", "dice_before", "dice_after", "hd95_before_mm",
                                   "hd95_after_mm", "assd_before_mm", "assd_after_mm")
"""Columns of the per-label metrics table (CSV, JSON)."""

EXTRA_OUTPUTS: Tuple[str, ...] = ("displacement", "jacobian")
"""Outputs written only on request (each a float32 volume on the fixed grid, tens of MB at 1 mm):
``displacement.nii.gz`` (the whole map as a vector image, ANTs' warp-field convention) and
``jacobian.nii.gz`` (its Jacobian determinant)."""

SLICER_OUTPUT_NODE_CLASSES: Dict[str, str] = {
    "warpedVolume": "vtkMRMLScalarVolumeNode", "transform": "vtkMRMLTransformNode",
    "displacementRGB": "vtkMRMLVectorVolumeNode", "clusterMaps": "vtkMRMLSegmentationNode",
    "metricsTable": "vtkMRMLTableNode", "warpedSegmentation": "vtkMRMLSegmentationNode",
    "jacobian": "vtkMRMLScalarVolumeNode"}
"""The Slicer module's outputs, in the order they are created, and the MRML class a selected output
node must have. Each name ``x`` is a field of ``OutputRequest`` (``x`` to create it, ``xNode`` to fill
a chosen node), of ``RegistrationOutputs`` and of the parameter node (``createX``, ``x``)."""

SLICER_OUTPUTS: Tuple[str, ...] = tuple(SLICER_OUTPUT_NODE_CLASSES)

BATCH_PATH_COLUMNS: Tuple[str, ...] = ("fixed", "moving", "fixed_seg", "moving_seg", "fixed_mask", "id")
"""Columns of a ``sacb register-batch`` pairs CSV naming files (``fixed``, ``moving`` required) and the
pair's output folder (``id``)."""

BATCH_OPTION_COLUMNS: Tuple[str, ...] = ("quality", "affine", "similarity", "io_steps", "label_interpolation")
"""Per-row option columns of a pairs CSV (override the command's options for that row)."""

BATCH_SUMMARY_COLUMNS: Tuple[str, ...] = ("index", "id", "status", "rank", "seconds", "dice_before", "dice_after",
                                          "hd95_before_mm", "hd95_after_mm", "negative_jacobian_percent", "sdlogj",
                                          "fixed", "moving", "output", "message")
"""Columns of a batch's ``summary.csv`` (status: ``ok``, ``done earlier`` (resumed), ``failed``)."""

# --------------------------------------------------------------------------- worker protocol

WORKER_RESULT = "RESULT "
WORKER_ERROR = "ERROR "
"""Line prefixes of the background worker's standard output: ``RESULT <json report>`` and
``ERROR <kind> <message>`` (progress lines are written by :mod:`.progress`)."""

# --------------------------------------------------------------------------- exit codes

EXIT_CODES: Dict[str, int] = {"ok": 0, "unexpected": 1, "usage": 2, "input": 3, "package": 4, "resources": 5,
                              "cancelled": 6}
"""Exit codes of the ``sacb`` command and the worker."""


def check_choice(name: str, value: object, choices: Tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError("expected ... , got ...")``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"expected {name} in {choices}, got {value!r}")
    return value
