#!/usr/bin/env python
"""End-to-end evaluation at the images' resolution (a benchmark, not a test).

Held-out 1 mm brain pairs (160 x 192 x 160): subject-to-subject pairs of the MNI ICBM152 2009a
template under random diffeomorphisms and small affines with intensity changes, made with seeds
never used in training or validation (training uses seeds 0-1 and their offsets, validation
20251121; these use ``--seed``, default 424242). Every method sees the same pairs and is scored by
one evaluator on the fixed grid: mean foreground Dice and HD95 over the 16 labels (``--labels
parcels33``: 33 smaller structures), % voxels with
a negative Jacobian and SDlogJ inside the brain (the fixed labels), wall seconds per pair.

Methods:
  identity, affine           no registration; the pipeline's MI affine pre-alignment alone
  syn                        ANTs SyN (antspyx defaults: affine + SyN)
  elastix                    elastix affine + B-spline (itk-elastix default parameter maps)
  fast, balanced, accurate   ``register()`` with that quality preset, end to end as a user gets it
                             (reading SimpleITK images, the metrics table included)
  net:<model>                a model package through ``register(quality="fast")`` (compare models)
  <preset>@<steps,...>       a preset with other steps per level (``balanced@10,4``: to measure
                             a trade-off before changing a preset), or other levels as
                             scale:steps (``balanced@2:20,1:10,0.5:3``: a coarse level first)
  <preset>[@...]~<n>         with n squarings integrating instance optimisation's velocity
                             (``balanced~3``)
  <preset>[@...][~n]^<w>     with regulariser weight w for instance optimisation
                             (``balanced^2``: io_smoothness 2.0)
  <method>+fine              with the fine pass (``fast+fine``: the network alone, once more at 1 mm)

    python benchmarks/evaluate_presets.py --pairs 8 --json presets.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import SimpleITK as sitk

BASELINES = ("identity", "affine", "syn", "elastix")
PRESETS = ("fast", "balanced", "accurate")


def make_pairs(count: int, seed: int, spacing: float, shape, max_std: float,
               control_spacing: int = 8, label_set: str = "parcels16") -> List[Dict[str, sitk.Image]]:
    from SACBRegistrationLib.data.pairs import TemplatePairs
    from SACBRegistrationLib.data.template import template_volumes

    image, labels, _ = template_volumes(spacing, shape, label_set=label_set)
    dataset = TemplatePairs(image, labels, count, seed=seed, mode="subject-to-subject", max_std=max_std,
                           control_spacing=control_spacing)
    pairs = []
    for i in range(count):
        item = dataset[i]
        pair = {}
        for key in ("moving", "fixed", "moving_labels", "fixed_labels"):
            img = sitk.GetImageFromArray(item[key][0].numpy())
            img.SetSpacing([float(spacing)] * 3)
            pair[key] = sitk.Cast(img, sitk.sitkInt32 if "labels" in key else sitk.sitkFloat32)
        pairs.append(pair)
    return pairs


def field_scores(fixed_labels: sitk.Image, warped_labels: sitk.Image, field: np.ndarray = None) -> Dict[str, float]:
    """Dice / HD95 over labels; folding and SDlogJ of ``field`` ((3, D, H, W) mm along the array axes) in the brain."""
    from SACBRegistrationLib.metrics import dice_per_label, negative_jacobian_percent, sdlogj, surface_metrics_per_label

    f, w = sitk.GetArrayFromImage(fixed_labels), sitk.GetArrayFromImage(warped_labels)
    spacing = tuple(reversed(fixed_labels.GetSpacing()))
    out = {"dice": float(np.nanmean(list(dice_per_label(w, f).values()))),
           "hd95": float(np.nanmean([v["hd95"] for v in surface_metrics_per_label(w, f, spacing).values()])),
           "folding_percent": 0.0, "sdlogj_brain": 0.0}
    if field is not None:
        brain = f > 0
        out["folding_percent"] = negative_jacobian_percent(field, brain, spacing)
        out["sdlogj_brain"] = sdlogj(field, brain, spacing)
    return out


def sitk_field_components(displacement: sitk.Image) -> np.ndarray:
    from SACBRegistrationLib.pipeline.geometry import field_in_index_frame
    return field_in_index_frame(displacement)[0]


def run_syn(pair) -> Dict[str, float]:
    import ants

    def to_ants(image):
        return ants.from_numpy(sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32), spacing=image.GetSpacing())

    start = time.perf_counter()
    f, m = to_ants(pair["fixed"]), to_ants(pair["moving"])
    reg = ants.registration(fixed=f, moving=m, type_of_transform="SyN")
    warped = ants.apply_transforms(fixed=f, moving=to_ants(pair["moving_labels"]), transformlist=reg["fwdtransforms"],
                                   interpolator="genericLabel")
    seconds = time.perf_counter() - start
    warped_sitk = sitk.GetImageFromArray(np.rint(warped.numpy().transpose(2, 1, 0)).astype(np.int32))
    warped_sitk.CopyInformation(pair["fixed_labels"])
    # the composed field (affine + SyN) on the fixed grid, as a displacement for the Jacobian
    composite = ants.apply_transforms(fixed=f, moving=f, transformlist=reg["fwdtransforms"], compose=os.path.join(
        reg["fwdtransforms"][0] + "_composed"))
    field = sitk.ReadImage(composite, sitk.sitkVectorFloat64)
    field.CopyInformation(pair["fixed"])
    return dict(field_scores(pair["fixed_labels"], warped_sitk, sitk_field_components(field)), seconds=seconds)


def run_elastix(pair) -> Dict[str, float]:
    import itk

    def to_itk(image, pixel=np.float32):
        out = itk.image_from_array(sitk.GetArrayFromImage(image).astype(pixel))
        out.SetSpacing([float(s) for s in image.GetSpacing()])
        return out

    start = time.perf_counter()
    parameters = itk.ParameterObject.New()
    for kind in ("affine", "bspline"):
        parameters.AddParameterMap(parameters.GetDefaultParameterMap(kind))
    _, transform = itk.elastix_registration_method(to_itk(pair["fixed"]), to_itk(pair["moving"]),
                                                   parameter_object=parameters, log_to_console=False)
    for index in range(transform.GetNumberOfParameterMaps()):
        transform.SetParameter(index, "FinalBSplineInterpolationOrder", "0")  # labels: nearest
    warped = itk.transformix_filter(to_itk(pair["moving_labels"]), transform, log_to_console=False)
    seconds = time.perf_counter() - start
    warped_sitk = sitk.GetImageFromArray(np.rint(itk.array_from_image(warped)).astype(np.int32))
    warped_sitk.CopyInformation(pair["fixed_labels"])
    with tempfile.TemporaryDirectory() as folder:  # transformix writes deformationField.nii there
        field = itk.transformix_deformation_field(to_itk(pair["moving"]), transform, log_to_console=False,
                                                  output_directory=folder)
    array = itk.array_from_image(field).astype(np.float64)  # (D, H, W, 3) x, y, z (identity direction)
    components = np.moveaxis(array[..., ::-1], -1, 0)  # axis flip to (d, h, w)
    return dict(field_scores(pair["fixed_labels"], warped_sitk, components), seconds=seconds)


def run_register(pair, quality: str, model, steps=None, squarings=None, smoothness=None,
                 fine_pass=None) -> Dict[str, float]:
    from SACBRegistrationLib.pipeline import register
    from SACBRegistrationLib.pipeline.presets import preset

    levels = None
    if steps is not None and all(":" in item for item in steps):  # scale:steps per level
        levels = tuple((float(scale), int(n)) for scale, n in (item.split(":") for item in steps))
    elif steps is not None:  # steps per level of the preset
        scales = [scale for scale, _ in preset(quality)["io_levels"]]
        if len(steps) != len(scales):
            raise SystemExit(f"{quality} has {len(scales)} levels; got steps {steps}")
        levels = tuple(zip(scales, [int(n) for n in steps]))
    start = time.perf_counter()
    result = register(pair["fixed"], pair["moving"], pair["fixed_labels"], pair["moving_labels"], model=model,
                      quality=quality, device="cpu", cluster_maps=False, io_levels=levels, fine_pass=fine_pass,
                      **({} if squarings is None else {"io_integration_steps": squarings}),
                      **({} if smoothness is None else {"io_smoothness": smoothness}))
    seconds = time.perf_counter() - start
    row = dict(field_scores(pair["fixed_labels"], result.warped_segmentation, sitk_field_components(result.displacement)),
               seconds=seconds)
    row["stages"] = result.timings
    return row


def run_method(method: str, pair, model) -> Dict[str, float]:
    if method == "identity":
        return dict(field_scores(pair["fixed_labels"], pair["moving_labels"]), seconds=0.0)
    if method == "affine":
        from SACBRegistrationLib.pipeline.affine import pre_align
        start = time.perf_counter()
        transform = pre_align(pair["fixed"], pair["moving"], "affine")
        warped = sitk.Resample(pair["moving_labels"], pair["fixed"], transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
        return dict(field_scores(pair["fixed_labels"], warped), seconds=time.perf_counter() - start)
    if method == "syn":
        return run_syn(pair)
    if method == "elastix":
        return run_elastix(pair)
    method, fine, _ = method.partition("+fine")
    fine_pass = True if fine else None
    if method.startswith("net:"):
        return run_register(pair, "fast", method[4:], fine_pass=fine_pass)
    method, _, smoothness = method.partition("^")
    smoothness = float(smoothness) if smoothness else None
    method, _, squarings = method.partition("~")
    squarings = int(squarings) if squarings else None
    if "@" in method:
        quality, steps = method.split("@")
        return run_register(pair, quality, model, steps.split(","), squarings, smoothness, fine_pass)
    return run_register(pair, method, model, squarings=squarings, smoothness=smoothness, fine_pass=fine_pass)


def summarise(rows):
    out = {}
    for key in ("dice", "hd95", "folding_percent", "sdlogj_brain", "seconds"):
        values = [r[key] for r in rows]
        out[key], out[key + "_std"] = float(np.mean(values)), float(np.std(values))
    out["per_pair"] = rows
    return out


def paired(results, method: str, baseline: str) -> str:
    a = np.array([r["dice"] for r in results[method]["per_pair"]])
    b = np.array([r["dice"] for r in results[baseline]["per_pair"]])
    d = a - b
    return (f"{method} vs {baseline}: higher Dice on {int((d > 0).sum())}/{len(d)} pairs, mean {d.mean():+.4f} "
            f"(min {d.min():+.4f}, max {d.max():+.4f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model for the presets (default: the embedded default)")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=424242)
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 192, 160])
    parser.add_argument("--max-std", type=float, default=4.0, help="velocity std of the random deformations (voxels)")
    parser.add_argument("--control-spacing", type=int, default=8,
                        help="voxels between the random velocities' control points (larger: smoother, larger-scale)")
    parser.add_argument("--labels", choices=("parcels16", "parcels33"), default="parcels16",
                        help="the template's label set: 16 tissue parcels (as in training) or 33 smaller structures")
    parser.add_argument("--methods", nargs="+", default=list(BASELINES + PRESETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    from SACBRegistrationLib.runtime import retain_freed_memory
    retain_freed_memory()  # as the sacb command does (every method in this process gains alike)
    import torch
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    from SACBRegistrationLib.training.trainer import hardware_description

    pairs = make_pairs(args.pairs, args.seed, args.spacing, tuple(args.shape), args.max_std, args.control_spacing,
                       args.labels)
    results = {}
    for method in args.methods:
        rows = [run_method(method, pair, args.model) for pair in pairs]
        results[method] = r = summarise(rows)
        print(f"{method:22} Dice {r['dice']:.3f} ± {r['dice_std']:.3f}  HD95 {r['hd95']:.2f} mm  |J|<0 "
              f"{r['folding_percent']:.4f}%  SDlogJ {r['sdlogj_brain']:.3f}  {r['seconds']:.1f} s/pair", flush=True)
        if args.json:  # after every method: a long run keeps what it has
            args.json.write_text(json.dumps({"machine": hardware_description(torch.device("cpu")), "args": vars(args) | {
                "json": str(args.json)}, "results": results}, indent=2, default=str))
    print("\n| method | Dice | HD95 (mm) | \\|J\\|<0 (%) | SDlogJ (brain) | s / pair |\n| --- | --- | --- | --- | --- | --- |")
    for method, r in results.items():
        print(f"| {method} | {r['dice']:.3f} ± {r['dice_std']:.3f} | {r['hd95']:.2f} | {r['folding_percent']:.4f} | "
              f"{r['sdlogj_brain']:.3f} | {r['seconds']:.1f} |")
    for method in [m for m in results if m.split("+")[0].split("@")[0].split("~")[0].split("^")[0] in PRESETS
                   or m.startswith("net:")]:
        for baseline in ("syn", "elastix", "affine"):
            if baseline in results:
                print(paired(results, method, baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
