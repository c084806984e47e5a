"""Batch registration (``sacb register-batch PAIRS.csv --out DIR``): many pairs, the model loaded
once, resumable, and shardable over ``torchrun`` ranks.

The CSV has a header; ``fixed`` and ``moving`` are required, the other columns of
:data:`~..vocabulary.BATCH_PATH_COLUMNS` (segmentations, mask, an ``id`` naming the pair's output
folder) and :data:`~..vocabulary.BATCH_OPTION_COLUMNS` (per-row options overriding the command's)
are optional; an empty cell means "not given". Relative paths are relative to the CSV's folder.
Every row is checked before any work starts (a bad row refuses the whole batch, naming row and
column).

Each pair's outputs go to ``DIR/<id>/``, published all at once (see :class:`~.io.StagedOutput`), so
a pair whose folder holds ``report.json`` is finished: a re-run skips it (resume). A pair that fails
is recorded (status ``failed`` and the message) and the others go on. ``DIR/summary.csv`` lists every
row of the CSV with its status and metrics.

Sharding: with ``WORLD_SIZE`` ranks (``torchrun --nproc_per_node N -m SACBRegistrationLib.cli
register-batch ...``), rank ``r`` registers rows ``r, r + N, r + 2N, ...``; every rank writes its
part of the summary, and rank 0 merges them into ``summary.csv`` after a barrier. On a machine with
GPUs each rank uses ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..vocabulary import BATCH_OPTION_COLUMNS, BATCH_PATH_COLUMNS, BATCH_SUMMARY_COLUMNS, IMAGE_SUFFIXES
from .io import InputError

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_INTEGER_OPTIONS = ("io_steps",)


@dataclass
class BatchRow:
    """One pair of the CSV: ``index`` (0-based data row), ``id`` (its output folder's name), the
    paths (None when not given) and the per-row options."""

    index: int
    id: str
    fixed: str
    moving: str
    fixed_seg: Optional[str] = None
    moving_seg: Optional[str] = None
    fixed_mask: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_pairs(csv_path, base_options: Optional[Dict[str, Any]] = None) -> List[BatchRow]:
    """The rows of a pairs CSV, checked (see the module docstring); ``base_options`` are the
    command's options, checked together with each row's overrides."""
    from .registration import RegistrationOptions

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"pairs file not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        allowed = BATCH_PATH_COLUMNS + BATCH_OPTION_COLUMNS
        unknown = [h for h in header if h not in allowed]
        if unknown or not {"fixed", "moving"} <= set(header):
            raise InputError(f"{csv_path}: expected a header with 'fixed' and 'moving' and optionally "
                             f"{', '.join(c for c in allowed if c not in ('fixed', 'moving'))}; got {', '.join(header) or 'none'}"
                             + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        records = [{k.strip(): (v or "").strip() for k, v in record.items() if k is not None} for record in reader]
    if not records:
        raise InputError(f"{csv_path}: no pairs (the file has a header but no rows)")
    rows: List[BatchRow] = []
    seen: Dict[str, int] = {}
    for index, record in enumerate(records):
        where = f"{csv_path} row {index + 2}"  # the header is line 1
        paths: Dict[str, Optional[str]] = {}
        for column in ("fixed", "moving", "fixed_seg", "moving_seg", "fixed_mask"):
            value = record.get(column) or None
            if value is not None:
                path = Path(value) if Path(value).is_absolute() else csv_path.parent / value
                if not path.exists():
                    raise InputError(f"{where}: {column} not found: {path}")
                value = str(path)
            paths[column] = value
        if paths["fixed"] is None or paths["moving"] is None:
            raise InputError(f"{where}: 'fixed' and 'moving' are required")
        pair_id = record.get("id") or f"{index:04d}_{_stem(paths['moving'])}"
        if not _SAFE_ID.match(pair_id):
            raise InputError(f"{where}: id {pair_id!r} cannot name a folder (use letters, digits, '.', '_', '-')")
        if pair_id in seen:
            raise InputError(f"{where}: id {pair_id!r} repeats row {seen[pair_id] + 2}; ids name output folders and must be unique")
        seen[pair_id] = index
        options: Dict[str, Any] = {}
        for column in BATCH_OPTION_COLUMNS:
            value = record.get(column)
            if value:
                if column in _INTEGER_OPTIONS:
                    try:
                        value = int(value)
                    except ValueError:
                        raise InputError(f"{where}: expected an integer for {column}, got {value!r}") from None
                options[column] = value
        try:
            RegistrationOptions(**{**(base_options or {}), **options}).validate()
        except (ValueError, TypeError) as error:
            raise InputError(f"{where}: {error}") from None
        rows.append(BatchRow(index, pair_id, paths["fixed"], paths["moving"], paths["fixed_seg"], paths["moving_seg"],
                             paths["fixed_mask"], options))
    return rows


def shard(rows: Sequence[BatchRow], rank: int, world_size: int) -> List[BatchRow]:
    """Rank ``rank``'s rows: ``rank, rank + world_size, ...`` (every row on exactly one rank)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"expected 0 <= rank < world size, got rank {rank} of {world_size}")
    return list(rows[rank::world_size])


def _summary_of(row: BatchRow, status: str, rank: int, seconds: float, report: Dict[str, Any], folder: Path,
                message: str = "") -> Dict[str, Any]:
    metrics = report.get("metrics", {}) if report else {}
    summary, regularity = metrics.get("summary", {}), metrics.get("regularity", {})
    out = {"index": row.index, "id": row.id, "status": status, "rank": rank, "seconds": round(seconds, 3),
           "fixed": row.fixed, "moving": row.moving, "output": str(folder) if status != "failed" else "",
           "message": message}
    for key in ("dice_before", "dice_after", "hd95_before_mm", "hd95_after_mm"):
        out[key] = summary.get(key)
    for key in ("negative_jacobian_percent", "sdlogj"):
        out[key] = regularity.get(key)
    return out


def run_batch(rows: Sequence[BatchRow], out_dir, base_options: Dict[str, Any], *, rank: int = 0,
              extras: Sequence[str] = (), overview: bool = True, overwrite: bool = False,
              report_line: Callable[[str], None] = lambda line: None) -> List[Dict[str, Any]]:
    """Register ``rows`` (this rank's) into ``out_dir/<id>/``; returns their summary rows.

    The model is resolved and loaded once (the package object caches its network). A finished pair
    (``report.json`` in its folder) is skipped unless ``overwrite``; a failing pair is recorded and the batch goes on;
    ``KeyboardInterrupt`` (Ctrl-C, SIGTERM) stops the batch (the pair being written is not
    published).
    """
    from ..errors import classify
    from ..registry import get_model
    from .registration import RegistrationOptions, register

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = dict(base_options)
    package = get_model(options.get("model"))
    options["model"] = package
    results: List[Dict[str, Any]] = []
    for number, row in enumerate(rows, start=1):
        folder = out_dir / row.id
        prefix = f"[{number}/{len(rows)}] {row.id}"
        if (folder / "report.json").is_file() and not overwrite:
            report = json.loads((folder / "report.json").read_text())
            results.append(_summary_of(row, "done earlier", rank, 0.0, report, folder))
            report_line(f"{prefix}: already done, skipped")
            continue
        start = time.perf_counter()
        try:
            result = register(row.fixed, row.moving, row.fixed_seg, row.moving_seg,
                              RegistrationOptions(**{**options, **row.options}), fixed_mask=row.fixed_mask)
            result.save(folder, overview=overview, overwrite=overwrite, extras=extras)
        except Exception as error:  # one pair's failure is recorded, the batch goes on (Ctrl-C is not an Exception)
            failure = classify(error)
            results.append(dict(_summary_of(row, "failed", rank, time.perf_counter() - start, {}, folder,
                                            failure.message), code=failure.code))
            report_line(f"{prefix}: FAILED ({failure.kind}): {failure.message}")
            continue
        seconds = time.perf_counter() - start
        results.append(_summary_of(row, "ok", rank, seconds, result.report(), folder))
        s = result.metrics.summary
        dice = f", Dice {s['dice_before']:.3f} -> {s['dice_after']:.3f}" if s else ""
        report_line(f"{prefix}: done in {seconds:.1f} s{dice}")
    return results


def write_summary(out_dir, rows: Sequence[Dict[str, Any]]) -> Path:
    """``out_dir/summary.csv``: one line per CSV row (in the CSV's order), columns
    :data:`~..vocabulary.BATCH_SUMMARY_COLUMNS`."""
    path = Path(out_dir) / "summary.csv"
    tmp = path.with_name(".summary.csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(BATCH_SUMMARY_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in sorted(rows, key=lambda r: r["index"]):
            writer.writerow({k: ("" if row.get(k) is None else (f"{row[k]:.4f}" if isinstance(row[k], float) else row[k]))
                             for k in BATCH_SUMMARY_COLUMNS})
    tmp.replace(path)
    return path


def rank_part_path(out_dir, rank: int) -> Path:
    """Where rank ``rank`` leaves its summary rows for rank 0 to merge."""
    return Path(out_dir) / f".summary-rank{rank}.json"
