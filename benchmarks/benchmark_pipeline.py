#!/usr/bin/env python
"""Where a user's time goes: `sacb register` end to end on a 1 mm pair with labels, per preset (a
benchmark, not a test).

For each preset it runs the installed command in a fresh process, as a user does
(``sacb register FIXED MOVING --fixed-seg .. --moving-seg .. --quality Q --out DIR``), and prints the
wall time of the whole command, the stages from ``report.json`` (``timings_s``), what is left for
process start, imports, model loading and writing the outputs, and the size of the output folder.
Then ``sacb demo`` (outputs, cluster maps and the picture). With ``antspyx`` installed it also checks
that ANTs reads the written ``transform.h5``: ``ants.apply_transforms`` with it reproduces
``warped.nii.gz``.

The pair: the MNI ICBM152 2009a template at 1 mm (160 x 192 x 160, 16 labels; ``--labels parcels33``: 33) against a random
diffeomorphic and affine deformation of it (``benchmarks/evaluate_presets.py``'s held-out maker,
seed 424242, pair 0).

    python benchmarks/benchmark_pipeline.py [--presets fast balanced accurate] [--threads 2] [--repeat N]

With ``--repeat N`` the presets run N times, alternating (fast, balanced, ..., fast, balanced, ...), one
table row per run, then the minimum, median and maximum per preset of the wall time and of the time
beyond the network and instance optimisation (issue 13's target: at most 3 s): on a shared 2-core VM
single runs vary by several tenths of a second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def sacb(*args: str, env) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "SACBRegistrationLib.cli", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sacb {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def check_ants(folder: Path, fixed: Path, moving: Path) -> str:
    try:
        import ants
    except ImportError:
        return "antspyx not installed: ANTs check skipped (pip install antspyx)"
    warped = ants.apply_transforms(ants.image_read(str(fixed)), ants.image_read(str(moving)),
                                   transformlist=[str(folder / "transform.h5")], interpolator="linear")
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "warped.nii.gz")))
    theirs = warped.numpy().transpose(2, 1, 0)  # ANTs arrays are (x, y, z); SimpleITK's (z, y, x)
    inside = (slice(2, -2),) * 3
    difference = np.abs(ours - theirs)[inside]
    scale = float(np.ptp(ours))
    return (f"ANTs reads transform.h5: ants.apply_transforms vs warped.nii.gz, median |diff| "
            f"{np.median(difference) / scale:.2e}, 99th percentile {np.percentile(difference, 99) / scale:.2e} "
            f"of the intensity range")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["fast", "balanced", "accurate"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="run the presets this many times, alternating")
    parser.add_argument("--no-demo", action="store_true")
    parser.add_argument("--labels", choices=("parcels16", "parcels33"), default="parcels16",
                        help="the pair's label set: 16 tissue parcels or 33 smaller structures (the issue's count)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"expected --repeat of at least 1, got {args.repeat}")
    import torch
    from evaluate_presets import make_pairs

    from SACBRegistrationLib.training.trainer import hardware_description

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads))
    work = Path(tempfile.mkdtemp(prefix="sacb-bench-"))
    pair = make_pairs(1, 424242, 1.0, (160, 192, 160), 4.0, label_set=args.labels)[0]
    paths = {}
    for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
        paths[key] = work / f"{key}.nii.gz"
        sitk.WriteImage(pair[key], str(paths[key]), True)
    labels = len(np.unique(sitk.GetArrayViewFromImage(pair["fixed_labels"]))) - 1
    print(f"machine: {hardware_description(torch.device('cpu'))} in this process, {args.threads} for the command; pair 160x192x160 at 1 mm, {labels} labels")
    header = ("| preset | wall s | read | model | affine | device | preprocess | network | IO | transform | warp | metrics "
              "| outputs | rest (start, imports, writing) | beyond network + IO | folder MB |")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    ants_note = ""
    figures: dict = {}  # preset -> [(wall, beyond network + IO)] over the runs
    runs = [(i, preset) for i in range(args.repeat) for preset in args.presets]
    for i, preset in runs:
        out = work / f"out_{preset}_{i}"  # one folder per run: a preset listed or repeated twice gets two
        wall = sacb("register", str(paths["fixed"]), str(paths["moving"]), "--fixed-seg", str(paths["fixed_labels"]),
                    "--moving-seg", str(paths["moving_labels"]), "--quality", preset, "--threads", str(args.threads),
                    "--out", str(out), "--quiet", env=env)
        timings = json.loads((out / "report.json").read_text())["timings_s"]
        stages = ["read", "model", "affine", "device", "preprocess", "network", "instance_optimisation", "transform",
                  "warp", "metrics", "outputs"]
        cells = [f"{timings.get(s, 0.0):.2f}" for s in stages]
        rest = wall - sum(timings.values())
        beyond = wall - timings.get("network", 0.0) - timings.get("instance_optimisation", 0.0)  # the target: <= 3 s
        print(f"| {preset} | {wall:.1f} | " + " | ".join(cells) + f" | {rest:.1f} | {beyond:.2f} | {folder_mb(out):.1f} |",
              flush=True)
        figures.setdefault(preset, []).append((wall, beyond))
        if not ants_note:
            ants_note = check_ants(out, paths["fixed"], paths["moving"])
    if len(runs) > len(figures):
        for preset, values in figures.items():
            walls, beyonds = (np.array(v) for v in zip(*values))
            print(f"{preset}, {len(values)} runs: wall {walls.min():.2f} / {np.median(walls):.2f} / {walls.max():.2f} s, "
                  f"beyond network + IO {beyonds.min():.2f} / {np.median(beyonds):.2f} / {beyonds.max():.2f} s "
                  f"(min / median / max)")
    print(ants_note)
    if not args.no_demo:
        out = work / "demo"
        wall = sacb("demo", "--out", str(out), "--quiet", "--threads", str(args.threads), env=env)
        timings = json.loads((out / "report.json").read_text())["timings_s"]
        registration = sum(timings.values())
        print(f"sacb demo: {wall:.1f} s wall, of which registration stages {registration:.1f} s "
              f"(cluster maps and RGB: {timings.get('outputs', 0.0):.2f} s); writing, the picture, start and "
              f"imports: {wall - registration:.1f} s; folder {folder_mb(out):.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
