"""Writing a registration's outputs, all at once or not at all.

Files (in the output folder):

=============================  ==========================================================
``transform.h5``               ITK transform fixed -> moving, LPS mm: the pre-alignment
                               composed with the displacement field on the grid it was
                               estimated on (``sitk.ReadTransform``, Slicer, ANTs; the
                               field in float32, compressed: :mod:`.transform_file`)
``warped.nii.gz``              moving image resampled onto the fixed grid
``warped_segmentation.nii.gz`` moving segmentation warped likewise (when given; uint8 or
                               uint16 when its labels fit: :func:`compact_labels`)
``displacement_rgb.nrrd``      8-bit RGB picture of the field on its grid (R, G, B = x,
                               y, z; grey = 0)
``clusters_level<l>_<role>``   SACB k-means labels (1..k) of level l (2..5) on the level's
                               own grid (2^(l-1) network voxels per voxel)
``metrics.csv`` / ``.json``    Dice, HD95, ASSD per label before / after; folding, SDlogJ
``overview.png``               fixed / moving / warped / checkerboard / field / clusters
``report.json``                model, device, options, timings, warnings, summary, files
``displacement.nii.gz``        on request: the whole map as a float32 vector image on the
                               fixed grid (LPS mm; ANTs' warp-field convention)
``jacobian.nii.gz``            on request: its Jacobian determinant (float32, fixed grid)
=============================  ==========================================================
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..runtime import keep_signals_for_main_thread
from ..vocabulary import EXTRA_OUTPUTS, check_choice
from .image_writer import write_image
from .io import StagedOutput
from .transform_file import write_transform
from .visualisation import overview, write_png


def footer_lines(result) -> List[str]:
    """The overview picture's footer: model, device and time, then the metrics' summary lines."""
    return ([f"MODEL {result.model.get('name', '?')}  DEVICE {result.device.upper()}  "
             f"TIME {sum(result.timings.values()):.1f} S"] + result.metrics.summary_lines(surface_distance=False))


def overview_picture(result) -> np.ndarray:
    before = sitk.Resample(result.moving, result.fixed, result.affine or sitk.Transform(), sitk.sitkLinear,
                           float(sitk.GetArrayViewFromImage(result.moving).min()), sitk.sitkFloat32)
    clusters = result.cluster_maps.get("level2_fixed")
    return overview(result.fixed, before, result.warped, result.displacement_rgb, clusters, footer_lines(result))


def compact_labels(segmentation: sitk.Image) -> sitk.Image:
    """A label map (labels >= 0, as the pipeline checks its inputs) in the smallest unsigned integer type
    that holds its largest label: uint8 up to 255, uint16 up to 65535, otherwise as it is. The same
    labels in a quarter (or half) of int32's bytes, which ITK compresses in a quarter of the time
    (a 1 mm brain with 16 labels, uint8: 0.05 against 0.07 s, 0.26 against 0.34 MB)."""
    largest = int(np.max(sitk.GetArrayViewFromImage(segmentation), initial=0))
    for pixel_type, limit in ((sitk.sitkUInt8, np.iinfo(np.uint8).max), (sitk.sitkUInt16, np.iinfo(np.uint16).max)):
        if largest <= limit:
            return sitk.Cast(segmentation, pixel_type)
    return segmentation


WRITER_THREADS = 2
"""Files compressed at once by :func:`save_result`: the two large ones (the warped image, the
transform) in parallel; more threads would only share out the small ones."""


def _write(what: Union[sitk.Image, sitk.Transform], path: Path) -> None:
    """One output file: a transform (:func:`~.transform_file.write_transform`) or a compressed image
    (:func:`~.image_writer.write_image`)."""
    if isinstance(what, sitk.Transform):
        write_transform(what, path)
    else:
        write_image(what, path)


def save_result(result, folder: Union[str, Path], with_overview: bool = True, overwrite: bool = False,
                extras: Sequence[str] = ()) -> Dict[str, Path]:
    """Write the outputs of :class:`~.register.RegistrationResult` into ``folder``, all or nothing
    (see :class:`~.io.StagedOutput` for the policy on an existing folder); ``extras``: optional
    outputs of :data:`~..vocabulary.EXTRA_OUTPUTS`."""
    for extra in extras:
        check_choice("extra output", extra, EXTRA_OUTPUTS)
    folder = Path(folder)
    images = [("transform", "transform.h5", result.transform)]  # (kind, file name, what), written in this order
    images += [(kind, f"{kind}.nii.gz", getattr(result, kind)) for kind in EXTRA_OUTPUTS if kind in extras]
    images.append(("warped", "warped.nii.gz", result.warped))
    if result.warped_segmentation is not None:
        images.append(("warped_segmentation", "warped_segmentation.nii.gz", compact_labels(result.warped_segmentation)))
    images.append(("displacement_rgb", "displacement_rgb.nrrd", result.displacement_rgb))
    images += [(f"clusters_{key}", f"clusters_{key}.nii.gz", image)
               for key, image in result.cluster_maps.items()]
    written: Dict[str, str] = {kind: name for kind, name, _ in images}
    with StagedOutput(folder, overwrite) as out, ThreadPoolExecutor(
            WRITER_THREADS, initializer=keep_signals_for_main_thread) as writers:
        # SimpleITK's writers and the transform file's zlib release the GIL: the files are compressed
        # in parallel while this thread renders the overview picture
        pending = [writers.submit(_write, what, out.path(name)) for _, name, what in images]
        try:
            result.metrics.write_csv(out.path("metrics.csv"))
            result.metrics.write_json(out.path("metrics.json"))
            written["metrics_csv"], written["metrics_json"] = "metrics.csv", "metrics.json"
            if with_overview:
                write_png(overview_picture(result), out.path("overview.png"))
                written["overview"] = "overview.png"
            for future in pending:  # the first error in writing order, before the report says a file was written
                future.result()
        except BaseException:  # a failure or a cancel: files not started are not written (StagedOutput cleans up)
            for future in pending:
                future.cancel()
            raise
        written["report"] = "report.json"
        report = dict(result.report(), files=written)
        out.path("report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return {kind: folder / name for kind, name in written.items()}
