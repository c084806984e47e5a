#!/usr/bin/env python
"""Pairs already in a common space: does the default affine pre-alignment cost anything? (a
benchmark, not a test)

Held-out 1 mm template pairs as in ``evaluate_presets.py`` but *without* the random affine part
(random diffeomorphisms and intensity changes only), scored on ``--labels``. For each pair it prints
the mean Dice with no registration, after the pipeline's affine pre-alignment alone, and after
``register(quality=...)`` with the preset's pre-alignment and with ``affine="off"``.

    python benchmarks/evaluate_aligned_pairs.py [--pairs 4] [--seed 919191] [--quality balanced]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=919191)
    parser.add_argument("--quality", default="balanced")
    parser.add_argument("--labels", choices=("parcels16", "parcels33"), default="parcels33")
    args = parser.parse_args(argv)
    from evaluate_presets import field_scores

    from SACBRegistrationLib.data.pairs import TemplatePairs
    from SACBRegistrationLib.data.template import template_volumes
    from SACBRegistrationLib.pipeline import register
    from SACBRegistrationLib.pipeline.affine import pre_align

    spacing, shape = 1.0, (160, 192, 160)
    image, labels, _ = template_volumes(spacing, shape, label_set=args.labels)
    dataset = TemplatePairs(image, labels, args.pairs, seed=args.seed, mode="subject-to-subject", max_std=4.0,
                            control_spacing=8, affine=False)
    rows = []
    for index in range(args.pairs):
        item = dataset[index]
        pair = {}
        for key in ("moving", "fixed", "moving_labels", "fixed_labels"):
            img = sitk.GetImageFromArray(item[key][0].numpy())
            img.SetSpacing([spacing] * 3)
            pair[key] = sitk.Cast(img, sitk.sitkInt32 if "labels" in key else sitk.sitkFloat32)
        identity = field_scores(pair["fixed_labels"], pair["moving_labels"])["dice"]
        transform = pre_align(pair["fixed"], pair["moving"], "affine")
        aligned = sitk.Resample(pair["moving_labels"], pair["fixed"], transform, sitk.sitkNearestNeighbor, 0,
                                sitk.sitkInt32)
        row = [identity, field_scores(pair["fixed_labels"], aligned)["dice"]]
        for affine in (None, "off"):  # None: the preset's pre-alignment
            result = register(pair["fixed"], pair["moving"], pair["fixed_labels"], pair["moving_labels"],
                              quality=args.quality, affine=affine, device="cpu", cluster_maps=False)
            row.append(field_scores(pair["fixed_labels"], result.warped_segmentation)["dice"])
        rows.append(row)
        print(f"pair {index}: identity {row[0]:.3f}  affine alone {row[1]:.3f}  {args.quality} {row[2]:.3f}  "
              f"{args.quality} with --affine off {row[3]:.3f}", flush=True)
    mean = np.mean(rows, axis=0)
    print(f"mean: identity {mean[0]:.3f}  affine alone {mean[1]:.3f}  {args.quality} {mean[2]:.3f}  "
          f"{args.quality} with --affine off {mean[3]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
