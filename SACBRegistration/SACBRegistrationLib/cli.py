"""The ``sacb`` command.

::

    sacb register FIXED MOVING [--fixed-seg F] [--moving-seg M] [--model NAME|DIR] [--device auto|cpu|cuda]
                  [--clusters N] [--io-steps N] [--affine off|rigid|affine] [--out DIR] [--json]
    sacb models list [--json] [--verify]
    sacb models import CHECKPOINT.pth.tar --name N --modality M --spacing S [S S] [--window MIN MAX | --percentiles LO HI]
    sacb models import PACKAGE_DIR_OR_ZIP [--name N]
    sacb models verify [NAME]          sacb models remove NAME
    sacb evaluate --fixed F --moving M --transform T [--fixed-seg F] [--moving-seg M] [--json]
    sacb train --config FILE [--set section.key=value ...]
    sacb data fetch-template [--dir DIR]
    sacb demo [--out DIR]

Exit codes: 0 success, 2 usage error, 3 bad input, 4 model package problem, 5 not enough
memory / no such device, 6 cancelled, 1 unexpected error. ``--json`` prints one JSON object on
stdout (``{"ok": true, ...}`` or ``{"ok": false, "error": {"kind": ..., "message": ...}}``);
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import Failure, classify
from .vocabulary import (
    AFFINE_MODES,
    DEFAULT_QUALITY,
    DEVICES,
    EXIT_CODES,
    LABEL_INTERPOLATIONS,
    QUALITY_PRESETS,
    REGULARISERS,
    SIMILARITIES,
    TRANSFORM_MODELS,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INPUT, EXIT_PACKAGE, EXIT_RESOURCE, EXIT_CANCELLED = (
    EXIT_CODES[k] for k in ("ok", "unexpected", "usage", "input", "package", "resources", "cancelled"))


def _sample_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "Resources" / "SampleData"


def _progress(args):
    from .progress import console_progress, no_progress, worker_progress
    if getattr(args, "progress_lines", False):
        return worker_progress(sys.stdout)
    return no_progress if args.quiet else console_progress(sys.stderr)


def _print(args, payload: Dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"ok": True, **payload}, indent=2, default=str))
    elif text:
        print(text)


# --------------------------------------------------------------------------- commands


def _registration_summary(result, files: Dict[str, Path], out: Path) -> str:
    lines = [f"registered with {result.model['name']} on {result.device.upper()} in {sum(result.timings.values()):.1f} s",
             f"outputs in {out}/ (overview: {files.get('overview', '-')})"]
    lines += result.metrics.summary_lines()
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def cmd_register(args) -> int:
    from .pipeline import RegistrationOptions, register
    from .pipeline.io import check_output_folder, check_writable
    from .runtime import import_in_background

    import_in_background("torch")  # overlaps reading and pre-aligning the images

    out = check_output_folder(args.out, args.overwrite)  # fail before any work
    check_writable(out.parent)
    options = RegistrationOptions(**_options_of(args))
    result = register(args.fixed, args.moving, args.fixed_seg, args.moving_seg, options, progress=_progress(args),
                      fixed_mask=getattr(args, "fixed_mask", None))
    files = result.save(out, overview=not args.no_overview, overwrite=args.overwrite, extras=_extras_of(args))
    _print(args, {"outputs": {k: str(v) for k, v in files.items()}, **result.report()},
           _registration_summary(result, files, out))
    return EXIT_OK


def _options_of(args) -> Dict[str, Any]:
    """The registration options of ``sacb register`` / ``register-batch`` (RegistrationOptions fields)."""
    return dict(quality=args.quality, model=args.model, device=args.device, clusters=args.clusters,
                io_steps=args.io_steps, affine=args.affine, symmetric=args.symmetric, fine_pass=args.fine_pass,
                io_transform=args.io_transform,
                io_regulariser=args.io_regulariser, io_smoothness=args.io_smoothness, similarity=args.similarity,
                threads=args.threads,
                label_interpolation=args.label_interpolation, cluster_maps=not args.no_clusters)


def _extras_of(args) -> List[str]:
    return [kind for kind, wanted in (("displacement", args.write_field), ("jacobian", args.write_jacobian)) if wanted]


def cmd_register_batch(args) -> int:
    import os

    from .pipeline.batch import rank_part_path, read_pairs, run_batch, shard, write_summary
    from .runtime import limit_memory_retention

    base = _options_of(args)
    rows = read_pairs(args.pairs, base)  # every row checked before any work
    limit_memory_retention()  # a long-lived process: freed buffers go back to the system
    out = Path(args.out)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    distributed = world > 1
    if distributed:  # torchrun: each rank its slice of the rows; rank 0 merges the summary
        import datetime

        import torch
        import torch.distributed as dist

        if args.device != "cpu" and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" is this rank's GPU
        # gloo: only a barrier is exchanged; a long timeout, as ranks may finish hours apart
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    try:
        mine = shard(rows, rank, world)
        quiet = args.quiet or args.json
        if not quiet:
            print(f"rank {rank}/{world}: {len(mine)} of {len(rows)} pairs" if distributed else f"{len(rows)} pairs",
                  file=sys.stderr)
        results = run_batch(mine, out, base, rank=rank, extras=_extras_of(args), overview=not args.no_overview,
                            overwrite=args.overwrite,
                            report_line=(lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr)))
        merged = results
        if distributed:
            rank_part_path(out, rank).write_text(json.dumps(results))
            dist.barrier()
            if rank == 0:
                merged = []
                for r in range(world):
                    part = rank_part_path(out, r)
                    merged.extend(json.loads(part.read_text()))
                    part.unlink()
    finally:
        if distributed:
            dist.destroy_process_group()
    failed = [r for r in results if r["status"] == "failed"]
    if rank == 0:
        summary = write_summary(out, merged)
        counts = {status: sum(r["status"] == status for r in merged) for status in ("ok", "done earlier", "failed")}
        _print(args, {"summary": str(summary), "counts": counts, "pairs": merged},
               f"{counts['ok']} registered, {counts['done earlier']} already done, {counts['failed']} failed; "
               f"summary: {summary}")
    return failed[0]["code"] if failed else EXIT_OK


def cmd_demo(args) -> int:
    sample = _sample_dir()
    meta = sample / "SampleData.json"
    if not meta.is_file():
        raise Failure(EXIT_INPUT, "input", f"the bundled sample pair is missing ({sample}); re-install the package")
    description = json.loads(meta.read_text())
    from .packages import file_sha256
    for entry in description["files"].values():
        if file_sha256(sample / entry["file"]) != entry["sha256"]:
            raise Failure(EXIT_INPUT, "input", f"{entry['file']} of the sample pair fails its checksum; re-install")
    files = description["files"]
    args.fixed, args.moving = sample / files["fixed"]["file"], sample / files["moving"]["file"]
    args.fixed_seg, args.moving_seg = sample / files["fixed_segmentation"]["file"], sample / files["moving_segmentation"]["file"]
    return cmd_register(args)


def cmd_models(args) -> int:
    from . import registry
    from .packages import IntensityNormalisation, PackageError

    if args.models_command == "list":
        entries = registry.list_models(verify=args.verify)
        rows = [dict(e.package.summary() if e.package else {"name": e.name, "path": str(e.path)},
                     ok=not e.error, error=e.error, default=e.name == registry.DEFAULT_MODEL) for e in entries]
        text = "\n".join(
            f"{'*' if r['default'] else ' '} {r['name']:28} {'embedded' if r.get('embedded') else 'imported':9} "
            f"{r.get('modality', ''):10} {str(r.get('spacing_mm', '')):18} {'OK' if r['ok'] else 'ERROR: ' + r['error']}"
            for r in rows) or "no models installed"
        _print(args, {"models": rows}, text)
        return EXIT_OK
    if args.models_command == "verify":
        package = registry.verify_model(args.name)
        _print(args, {"model": package.summary()}, f"{package.name}: checksums and weights OK ({package.path})")
        return EXIT_OK
    if args.models_command == "remove":
        registry.remove_model(args.name)
        _print(args, {"removed": args.name}, f"removed {args.name}")
        return EXIT_OK
    source = Path(args.source)
    if source.is_dir() or source.suffix == ".zip":
        package = registry.import_package(source, args.name, overwrite=args.overwrite)
    else:
        missing = [flag for flag, value in (("--name", args.name), ("--modality", args.modality), ("--spacing", args.spacing))
                   if not value]
        if missing:
            raise Failure(EXIT_USAGE, "usage", f"importing an official checkpoint needs {', '.join(missing)} "
                                                f"(the checkpoint cannot tell its modality or spacing)")
        spacing = args.spacing * 3 if len(args.spacing) == 1 else args.spacing
        if args.window:
            intensity = IntensityNormalisation("window", min=args.window[0], max=args.window[1])
        else:
            low, high = args.percentiles or (0.5, 99.5)
            intensity = IntensityNormalisation("percentile", low=low, high=high)
        try:
            package = registry.import_official_checkpoint(source, args.name, spacing_mm=spacing, intensity=intensity,
                                                          modality=args.modality, anatomy=args.anatomy,
                                                          clusters=args.clusters, overwrite=args.overwrite)
        except PackageError:
            raise
    _print(args, {"model": package.summary()}, f"imported {package.name} into {package.path}")
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from .pipeline.evaluate import evaluate_transform
    from .pipeline.io import InputError

    if args.out:  # fail before the metrics are computed, not after
        out = Path(args.out)
        if out.is_dir():
            raise InputError(f"--out {out} is a folder; give a file name such as {out / 'metrics.csv'}")
        if not out.parent.is_dir():
            raise InputError(f"the folder of --out {out} does not exist; create {out.parent} first or choose another path")
        if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise InputError(f"--out {out} cannot be written (permissions); choose another path")
    table = evaluate_transform(args.fixed, args.moving, args.transform, args.fixed_seg, args.moving_seg)
    if args.out:
        table.write_csv(Path(args.out))
    _print(args, {"metrics": table.to_dict()}, "\n".join(table.summary_lines()))
    return EXIT_OK


def cmd_train(args) -> int:
    from .training.config import load_config
    from .training.trainer import train

    config = load_config(args.config, args.set or [])
    result = train(config, _progress(args))
    _print(args, {"steps": result.steps, "out": str(result.out), "package": str(result.package), "best": result.best,
                  "wall_seconds": result.wall_seconds},
           f"trained {result.steps} steps in {result.wall_seconds / 3600:.2f} h; package: {result.package}")
    return EXIT_OK


def cmd_data(args) -> int:
    from .data.template import TemplateError, fetch_template

    try:
        paths = fetch_template(args.dir)
    except TemplateError as error:
        raise Failure(EXIT_INPUT, "input", str(error)) from None
    _print(args, {"template": {k: str(v) for k, v in paths.items()}}, "\n".join(f"{k}: {v}" for k, v in paths.items()))
    return EXIT_OK


def cmd_worker(args) -> int:
    from .worker import run_request
    return run_request(Path(args.request))


# --------------------------------------------------------------------------- parser


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):  # nan fails the comparison
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected 1 or more, got 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sacb", description="SACB-Net deformable image registration.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--progress-lines", action="store_true", help=argparse.SUPPRESS)

    def registration_options(p):
        p.add_argument("--model", default=None, help="model name or package folder (default: the embedded model)")
        p.add_argument("--quality", default=DEFAULT_QUALITY, choices=QUALITY_PRESETS,
                       help=f"preset: fast (network only), balanced (+ diffeomorphic instance optimisation from half the network's "
                            f"resolution to twice it), accurate (the same, more steps); default {DEFAULT_QUALITY}; the "
                            f"options below override it")
        p.add_argument("--device", default="auto", choices=DEVICES)
        p.add_argument("--clusters", type=_positive_int, default=None,
                       help="k-means clusters per SACB block (default: the model's)")
        p.add_argument("--io-steps", type=_non_negative_int, default=None,
                       help="instance-optimisation steps per level (0 = off; default: the preset's)")
        p.add_argument("--io-transform", default=None, choices=TRANSFORM_MODELS,
                       help="optimise the displacement, or a velocity field (diffeomorphic); default: the preset's")
        p.add_argument("--io-regulariser", default="diffusion", choices=REGULARISERS)
        p.add_argument("--io-smoothness", type=_non_negative_float, default=None,
                       help="weight of the instance-optimisation regulariser (higher: smoother fields; default: the "
                            "preset's, 1.0)")
        p.add_argument("--similarity", default="auto", choices=SIMILARITIES,
                       help="instance-optimisation similarity: lncc (same contrast), mind (any contrast), auto")
        p.add_argument("--affine", default=None, choices=AFFINE_MODES, help="pre-alignment (default: the preset's)")
        p.add_argument("--symmetric", default=None, action=argparse.BooleanOptionalAction,
                       help="run the network in both directions and average them (no drift on identical images, "
                            "smoother fields; default: the preset's, on in every preset)")
        p.add_argument("--fine-pass", default=None, action=argparse.BooleanOptionalAction,
                       help="run the network once more at twice its resolution (1 mm for the default model) on the "
                            "images warped half-way: the best network-alone result, ~15 s more on a 2-core CPU "
                            "(default: the preset's, off in every preset)")
        p.add_argument("--label-interpolation", default="nearest", choices=LABEL_INTERPOLATIONS)
        p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
        p.add_argument("--no-overview", action="store_true", help="skip overview.png")
        p.add_argument("--write-field", action="store_true",
                       help="also write displacement.nii.gz: the whole map as a float32 vector image on the fixed grid "
                            "(LPS mm, ANTs' warp-field convention; about 60 MB at 1 mm); transform.h5 holds the same map")
        p.add_argument("--write-jacobian", action="store_true",
                       help="also write jacobian.nii.gz: the Jacobian determinant of the map on the fixed grid "
                            "(< 1 shrinking, > 1 expanding, <= 0 folding)")
        p.add_argument("--no-clusters", action="store_true", help="skip the SACB cluster maps")
        p.add_argument("--overwrite", action="store_true",
                       help="replace a previous registration's output folder as a whole (other folders are refused)")

    reg = sub.add_parser("register", parents=[common], help="register MOVING to FIXED")
    reg.add_argument("fixed")
    reg.add_argument("moving")
    reg.add_argument("--fixed-seg", default=None)
    reg.add_argument("--moving-seg", default=None)
    reg.add_argument("--fixed-mask", default=None, help="label map on the fixed grid: compare the images only inside it")
    reg.add_argument("--out", default="sacb-output", help="output folder (default: sacb-output)")
    registration_options(reg)
    reg.set_defaults(func=cmd_register)

    batch = sub.add_parser("register-batch", parents=[common],
                           help="register every pair of a CSV (resumable; shard with torchrun)",
                           description="Register every pair of PAIRS (CSV with a header: fixed, moving [, fixed_seg, "
                                       "moving_seg, fixed_mask, id, quality, affine, similarity, io_steps, "
                                       "label_interpolation]; relative paths are relative to the CSV) into OUT/<id>/, "
                                       "then write OUT/summary.csv. Finished pairs are skipped on a re-run; a failed "
                                       "pair is reported and the others go on. With torchrun --nproc_per_node N, each "
                                       "rank registers every N-th pair.")
    batch.add_argument("pairs", help="CSV of pairs")
    batch.add_argument("--out", required=True, help="output folder (one sub-folder per pair, and summary.csv)")
    registration_options(batch)
    batch.set_defaults(func=cmd_register_batch)

    demo = sub.add_parser("demo", parents=[common], help="register the bundled sample pair with the default model")
    demo.add_argument("--out", default="sacb-demo")
    registration_options(demo)
    demo.set_defaults(func=cmd_demo, overwrite=True)  # the demo replaces its own previous output

    models = sub.add_parser("models", help="list, import, verify or remove model packages")
    msub = models.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", parents=[common])
    ml.add_argument("--verify", action="store_true", help="also check checksums")
    mv = msub.add_parser("verify", parents=[common])
    mv.add_argument("name", nargs="?", default=None)
    mr = msub.add_parser("remove", parents=[common])
    mr.add_argument("name")
    mi = msub.add_parser("import", parents=[common], help="an authors' .pth.tar, or a package folder / .zip")
    mi.add_argument("source")
    mi.add_argument("--name")
    mi.add_argument("--modality", help="e.g. 'MR T1w' or 'CT'")
    mi.add_argument("--anatomy", default="", help="e.g. brain, abdomen")
    mi.add_argument("--spacing", type=float, nargs="+", help="training spacing in mm (one value or three)")
    norm = mi.add_mutually_exclusive_group()
    norm.add_argument("--window", type=float, nargs=2, metavar=("MIN", "MAX"), help="intensity window, e.g. -1000 1000 (CT)")
    norm.add_argument("--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"), help="percentile scaling (MR)")
    mi.add_argument("--clusters", type=int, default=7)
    mi.add_argument("--overwrite", action="store_true")
    for p in (ml, mv, mr, mi):
        p.set_defaults(func=cmd_models)

    ev = sub.add_parser("evaluate", parents=[common], help="metrics of an existing transform")
    ev.add_argument("--fixed", required=True)
    ev.add_argument("--moving", required=True)
    ev.add_argument("--transform", required=True, help="ITK transform file or displacement-field image (fixed -> moving)")
    ev.add_argument("--fixed-seg")
    ev.add_argument("--moving-seg")
    ev.add_argument("--out", help="write the table as CSV")
    ev.set_defaults(func=cmd_evaluate)

    tr = sub.add_parser("train", parents=[common], help="train or fine-tune a model")
    tr.add_argument("--config", type=Path, default=None, help="TOML / YAML / JSON config")
    tr.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    tr.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="training data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    ft = dsub.add_parser("fetch-template", parents=[common], help="the MNI ICBM152 2009a template from nilearn's wheel")
    ft.add_argument("--dir", type=Path, default=None)
    ft.set_defaults(func=cmd_data)

    worker = sub.add_parser("worker", help="(for the Slicer module) run one registration request file")
    worker.add_argument("request")
    worker.set_defaults(func=cmd_worker, json=False, quiet=True)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    previous = _terminate_like_interrupt()
    try:
        return args.func(args)
    except BaseException as error:  # report every failure readably
        if isinstance(error, SystemExit):
            raise
        failure = classify(error)
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": {"kind": failure.kind, "message": failure.message}}, indent=2))
        else:
            print(f"error: {failure.message}", file=sys.stderr)
            if failure.code == EXIT_ERROR:
                traceback.print_exc()
                print("this looks like a bug: please report it with the lines above", file=sys.stderr)
        return failure.code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _terminate_like_interrupt():
    """SIGTERM (``kill``, a job scheduler's time limit) is handled like Ctrl-C: the staged outputs are
    removed and the run exits as cancelled. Returns the previous handler (None off the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        return None


FAST_EXIT_COMMANDS = ("register", "demo", "evaluate")
"""Commands whose process ends with ``os._exit`` once the command has returned (its outputs written
and published) and the streams are flushed: the interpreter's teardown (torch, ITK and OpenMP
finalisers) took 0.3 s of a 4.4 s ``sacb register`` (1 mm pair, 2-core CPU)."""


def entry_point() -> None:
    """The ``sacb`` command: :func:`main` on ``sys.argv``, then exit with its code (for
    :data:`FAST_EXIT_COMMANDS` without the interpreter's teardown). ``main`` itself never exits
    the process, so tests and other programs can call it.

    Every command but ``register-batch`` (a long-lived process that limits what glibc keeps:
    :func:`~.runtime.limit_memory_retention`) runs one job and ends, so freed memory is kept for
    reuse (:func:`~.runtime.retain_freed_memory`) before anything large is allocated."""
    from .runtime import retain_freed_memory
    if len(sys.argv) < 2 or sys.argv[1] != "register-batch":
        retain_freed_memory()
    code = main()
    if len(sys.argv) > 1 and sys.argv[1] in FAST_EXIT_COMMANDS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
