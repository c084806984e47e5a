#!/usr/bin/env python
"""Evaluate a model package on held-out synthetic pairs against classical baselines (a benchmark).

Pairs (never seen in training: their own seeds): subject-to-subject pairs of the MNI ICBM152 2009a
template under random diffeomorphisms + affines with intensity changes ("template"), and
SynthMorph-style random label-map pairs ("synth"), on the model's training grid and spacing.

Methods, each on the same pairs:
  identity   no registration
  affine     SimpleITK affine (the pipeline's pre-alignment, Mattes MI)
  syn        ANTs SyN (antspyx ``ants.registration(type_of_transform="SyN")``: affine + SyN); used only here
  sacb       the model through the pipeline (no pre-alignment)
  sacb_io    the model followed by instance optimisation

Reports mean +- standard deviation of the foreground Dice, HD95 (mm), % voxels with a negative
Jacobian, and seconds per pair (wall clock of the registration alone, 2 CPU threads for every
method), then paired comparisons (on how many of the same pairs one method beats another)::

    python benchmarks/evaluate_model.py --model SACBRegistration/Resources/Models/sacb-brain-t1-2mm --json eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import SimpleITK as sitk

METHODS = ("identity", "affine", "syn", "sacb", "sacb_io")


def to_sitk(array: np.ndarray, spacing: float, pixel=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(spacing)] * 3)
    return sitk.Cast(image, pixel) if pixel is not None else image


def make_pairs(kind: str, count: int, seed: int, spacing: float, shape) -> List[Dict[str, sitk.Image]]:
    from SACBRegistrationLib.data.pairs import SynthPairs, TemplatePairs
    from SACBRegistrationLib.data.template import template_volumes

    if kind == "template":
        image, labels, _ = template_volumes(spacing, shape)
        dataset = TemplatePairs(image, labels, count, seed=seed, mode="subject-to-subject", max_std=3.0)
    else:
        dataset = SynthPairs(shape, count, seed=seed, labels=16, max_std=4.0)
    pairs = []
    for i in range(count):
        item = dataset[i]
        pairs.append({key: to_sitk(item[key][0].numpy(), spacing, sitk.sitkInt32 if "labels" in key else sitk.sitkFloat32)
                      for key in ("moving", "fixed", "moving_labels", "fixed_labels")})
    return pairs


def scores(fixed_labels: sitk.Image, warped_labels: sitk.Image, spacing: float, folding: float) -> Dict[str, float]:
    from SACBRegistrationLib.metrics import dice_per_label, surface_metrics_per_label

    f, w = sitk.GetArrayFromImage(fixed_labels), sitk.GetArrayFromImage(warped_labels)
    dice = np.nanmean(list(dice_per_label(w, f).values()))
    hd95 = np.nanmean([v["hd95"] for v in surface_metrics_per_label(w, f, (spacing,) * 3).values()])
    return {"dice": float(dice), "hd95": float(hd95), "folding_percent": float(folding)}


def run_method(method: str, pair, package, spacing: float, io_steps: int) -> Dict[str, float]:
    moving, fixed, moving_labels, fixed_labels = pair["moving"], pair["fixed"], pair["moving_labels"], pair["fixed_labels"]
    start = time.perf_counter()
    if method == "identity":
        return dict(scores(fixed_labels, moving_labels, spacing, 0.0), seconds=0.0)
    if method == "affine":
        from SACBRegistrationLib.pipeline.affine import pre_align
        transform = pre_align(fixed, moving, "affine")
        warped = sitk.Resample(moving_labels, fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
        return dict(scores(fixed_labels, warped, spacing, 0.0), seconds=time.perf_counter() - start)
    if method == "syn":
        import ants

        def to_ants(image):
            return ants.from_numpy(sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32),
                                   spacing=image.GetSpacing())

        f, m = to_ants(fixed), to_ants(moving)
        reg = ants.registration(fixed=f, moving=m, type_of_transform="SyN")
        seconds = time.perf_counter() - start
        warped = ants.apply_transforms(fixed=f, moving=to_ants(moving_labels), transformlist=reg["fwdtransforms"],
                                       interpolator="genericLabel")
        warped_sitk = to_sitk(np.rint(warped.numpy().transpose(2, 1, 0)).astype(np.int32), spacing)
        jacobian = ants.create_jacobian_determinant_image(f, reg["fwdtransforms"][0]).numpy()
        return dict(scores(fixed_labels, warped_sitk, spacing, 100.0 * float(np.mean(jacobian < 0))), seconds=seconds)
    from SACBRegistrationLib.pipeline import register
    result = register(fixed, moving, fixed_labels, moving_labels, model=package, affine="off", device="cpu",
                      io_steps=io_steps if method == "sacb_io" else 0, cluster_maps=False)
    # like the other methods' times, without the evaluation itself (register() also computes the
    # before / after metrics table of the segmentations, which is not part of registering)
    seconds = time.perf_counter() - start - result.timings.get("metrics", 0.0)
    return dict(scores(fixed_labels, result.warped_segmentation, spacing,
                       result.metrics.regularity["negative_jacobian_percent"]), seconds=seconds)


def summarise(rows: List[Dict[str, float]]) -> Dict[str, float]:
    out = {}
    for key in ("dice", "hd95", "folding_percent", "seconds"):
        values = [r[key] for r in rows]
        out[key] = float(np.mean(values))
        out[key + "_std"] = float(np.std(values))
    out["per_pair"] = rows
    return out


def paired(results: Dict[str, Dict[str, float]], method: str, baseline: str) -> str:
    """'method beats baseline on a/n pairs, mean Dice difference d (min m)': a paired comparison."""
    a = [r["dice"] for r in results[method]["per_pair"]]
    b = [r["dice"] for r in results[baseline]["per_pair"]]
    diff = np.array(a) - np.array(b)
    return (f"{method} vs {baseline}: higher Dice on {int((diff > 0).sum())}/{len(diff)} pairs, "
            f"mean difference {diff.mean():+.3f} (min {diff.min():+.3f}, max {diff.max():+.3f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model package folder or name")
    parser.add_argument("--pairs", type=int, default=8, help="pairs of each kind")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--kinds", nargs="+", default=["template", "synth"], choices=["template", "synth"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--io-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)

    from SACBRegistrationLib.registry import get_model
    from SACBRegistrationLib.training.trainer import hardware_description
    package = get_model(args.model)
    spacing = package.spacing_mm[0]
    shape = tuple(package.shape or (80, 96, 80))
    results: Dict[str, Dict[str, Dict[str, float]]] = {}
    for kind in args.kinds:
        pairs = make_pairs(kind, args.pairs, args.seed + (0 if kind == "template" else 1), spacing, shape)
        results[kind] = {}
        for method in args.methods:
            rows = [run_method(method, pair, package, spacing, args.io_steps) for pair in pairs]
            results[kind][method] = summarise(rows)
            r = results[kind][method]
            print(f"{kind:9} {method:9} Dice {r['dice']:.3f} +- {r['dice_std']:.3f}  HD95 {r['hd95']:.2f} mm  "
                  f"|J|<0 {r['folding_percent']:.3f}%  {r['seconds']:.1f} s/pair", flush=True)
    print()
    print("| pairs | method | Dice | HD95 (mm) | \\|J\\|<0 (%) | s / pair |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, methods in results.items():
        for method, r in methods.items():
            print(f"| {kind} | {method} | {r['dice']:.3f} ± {r['dice_std']:.3f} | {r['hd95']:.2f} ± {r['hd95_std']:.2f} | "
                  f"{r['folding_percent']:.3f} | {r['seconds']:.1f} |")
    print()
    comparisons = {}
    for kind, methods in results.items():
        for method, baseline in (("sacb", "affine"), ("sacb_io", "affine"), ("sacb", "syn"), ("sacb_io", "syn")):
            if method in methods and baseline in methods:
                line = paired(methods, method, baseline)
                comparisons.setdefault(kind, []).append(line)
                print(f"{kind}: {line}")
    if args.json:
        args.json.write_text(json.dumps({"model": package.name, "pairs_per_kind": args.pairs, "seed": args.seed,
                                         "spacing_mm": spacing, "shape": list(shape), "threads": args.threads,
                                         "io_steps": args.io_steps, "machine": hardware_description(torch.device("cpu")),
                                         "results": results,
                                         "paired": comparisons}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
