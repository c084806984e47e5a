#!/usr/bin/env python
"""Soak: many registrations in one process, through the API and through the Slicer Logic (a
benchmark, not a test).

1. **API**: ``--runs`` consecutive ``register(...)`` + ``result.save(...)`` of the bundled sample
   pair (``SACBRegistration/Resources/SampleData``, 1 mm brain T1 with 16 labels, the embedded
   model) with ``quality="fast"`` in this process, then ``--default-runs`` with the default
   preset. After each run the result is dropped, the output folder deleted and ``gc.collect()``
   called; the resident memory (``VmRSS`` of ``/proc/self/status``) is printed. Target: the
   resident memory after the last fast run at most :data:`RSS_GROWTH_LIMIT_PERCENT` above the
   one after the third (the first runs warm up allocators and caches). With ``--trim``, glibc's
   ``malloc_trim(0)`` also runs after each run: memory the allocator keeps for reuse goes back to
   the system, so what remains is what the process still holds (a leak grows it, allocator
   retention does not).
2. **Logic** (needs ``slicer-core``): ``--logic-runs`` consecutive ``RegistrationLogic``
   registrations in one MRML scene (the sample pair and its 16-segment segmentations as nodes,
   every output requested, each run a worker process). After each run its output nodes (and
   their display and storage nodes) are removed, as a user deleting them would. Targets: the
   scene's node IDs after the last run equal those before the first (no node left by the Logic);
   no ``SACBRegistration-*`` folder left in the Logic's temporary root (a folder private to the
   soak: other programs' runs do not count); no worker process alive
   (a ``/proc`` scan for processes whose parent is this one).

Prints one line per run and a summary; exits 1 if a target is missed. Linux only (``/proc``).

Examples::

    OMP_NUM_THREADS=1 python benchmarks/soak.py                      # 50 + 3 API runs, 20 Logic runs
    OMP_NUM_THREADS=1 python benchmarks/soak.py --trim --default-runs 0 --logic-runs 0
    python benchmarks/soak.py --runs 10 --default-runs 0 --logic-runs 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SACBRegistration"))

RSS_GROWTH_LIMIT_PERCENT = 5.0
"""Issue 15's target: resident memory growth after the third API run."""
LOGIC_PREFIX = "SACBRegistration-"
"""Prefix of the Logic's temporary folders (``tempfile.mkdtemp(prefix=...)`` in ``slicer_logic``)."""


def rss_mb() -> float:
    """Resident memory of this process in MB (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def children() -> List[int]:
    """Processes alive whose parent is this process (zombies included: they are not reaped)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            found.append(int(entry.name))
    return found


def sample_pair() -> Dict[str, Path]:
    folder = ROOT / "SACBRegistration" / "Resources" / "SampleData"
    files = json.loads((folder / "SampleData.json").read_text())["files"]
    return {role: folder / entry["file"] for role, entry in files.items()}


def malloc_trim() -> None:
    """Give the memory glibc's allocator keeps for reuse back to the system."""
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def api_soak(runs: int, default_runs: int, work: Path, trim: bool) -> bool:
    from SACBRegistrationLib.pipeline import register
    from SACBRegistrationLib.vocabulary import DEFAULT_QUALITY

    pair = sample_pair()
    rss: List[float] = []
    print(f"API: {runs} x quality=fast, then {default_runs} x quality={DEFAULT_QUALITY}; sample pair "
          f"({pair['fixed'].name}, {pair['moving'].name}, 16 labels){'; malloc_trim(0) after each run' if trim else ''}; "
          f"RSS at start {rss_mb():.0f} MB", flush=True)
    for i in range(runs + default_runs):
        quality = "fast" if i < runs else DEFAULT_QUALITY
        start = time.perf_counter()
        result = register(pair["fixed"], pair["moving"], pair["fixed_segmentation"], pair["moving_segmentation"],
                          quality=quality, device="cpu")
        out = work / f"api-{i}"
        result.save(out)
        seconds = time.perf_counter() - start
        del result
        shutil.rmtree(out)
        gc.collect()
        if trim:
            malloc_trim()
        rss.append(rss_mb())
        print(f"  api run {i + 1:2d} ({quality:8}): {seconds:5.1f} s, RSS {rss[-1]:7.1f} MB", flush=True)
    ok = True
    if runs >= 4:
        third, last, peak = rss[2], rss[runs - 1], max(rss[3:runs])
        growth = 100 * (last - third) / third
        ok = growth < RSS_GROWTH_LIMIT_PERCENT
        print(f"API fast runs: RSS after run 3 {third:.1f} MB, after run {runs} {last:.1f} MB: growth {growth:+.2f}% "
              f"(target < {RSS_GROWTH_LIMIT_PERCENT:g}%: {'met' if ok else 'MISSED'}); highest after run 3: "
              f"{peak:.1f} MB ({100 * (peak - third) / third:+.2f}%)", flush=True)
    if default_runs:
        first, last = rss[runs], rss[-1]
        print(f"API {DEFAULT_QUALITY} runs: RSS after the first {first:.1f} MB, after the last {last:.1f} MB "
              f"({100 * (last - first) / first:+.2f}%; {default_runs} runs, not a target)", flush=True)
    return ok


def logic_soak(runs: int, work: Path) -> bool:
    try:
        import slicer
    except ImportError:
        print("Logic: skipped (the slicer-core package is not installed: pip install slicer-core)")
        return True
    from SACBRegistrationLib.slicer_logic import RegistrationLogic

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)  # Slicer's scene always has it

    def load(path: Path, className: str, name: str):
        node = scene.AddNewNodeByClass(className, name)
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            raise RuntimeError(f"cannot read {path}")
        return node

    def segmentation(path: Path, reference, name: str):
        labelmap = load(path, "vtkMRMLLabelMapVolumeNode", name + " labels")
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node)
        for display in [labelmap.GetNthDisplayNode(i) for i in range(labelmap.GetNumberOfDisplayNodes())]:
            scene.RemoveNode(display)
        scene.RemoveNode(labelmap)
        return node

    pair = sample_pair()
    fixed = load(pair["fixed"], "vtkMRMLScalarVolumeNode", "fixed")
    moving = load(pair["moving"], "vtkMRMLScalarVolumeNode", "moving")
    fixed_seg = segmentation(pair["fixed_segmentation"], fixed, "fixed segmentation")
    moving_seg = segmentation(pair["moving_segmentation"], moving, "moving segmentation")

    def node_ids() -> List[str]:
        return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))

    def remove(node) -> None:
        for getter, count in (("GetNthDisplayNode", "GetNumberOfDisplayNodes"),
                              ("GetNthStorageNode", "GetNumberOfStorageNodes")):
            if hasattr(node, count):
                for extra in [getattr(node, getter)(i) for i in range(getattr(node, count)())]:
                    if extra is not None:
                        scene.RemoveNode(extra)
        scene.RemoveNode(node)

    temp_root = work / "logic-temp"  # the Logic's temporary root (Slicer's temporaryPath there), private to the soak
    temp_root.mkdir()
    tempfile.tempdir = str(temp_root)
    before_ids, before_temp = node_ids(), sorted(p.name for p in temp_root.glob(LOGIC_PREFIX + "*"))
    before_children = children()
    print(f"Logic: {runs} runs (quality=fast, every output) in one scene of {len(before_ids)} nodes; temporary root "
          f"{temp_root} holds {len(before_temp)} {LOGIC_PREFIX}* folders; {len(before_children)} child processes",
          flush=True)
    logic = RegistrationLogic()
    for i in range(runs):
        start = time.perf_counter()
        outputs = logic.registerVolumes(fixed, moving, fixed_seg, moving_seg, quality="fast", device="cpu")
        seconds = time.perf_counter() - start
        created = len(node_ids()) - len(before_ids)
        for node in outputs.nodes():
            remove(node)
        print(f"  logic run {i + 1:2d}: {seconds:5.1f} s, {len(outputs.nodes())} output nodes ({created} nodes with "
              f"their display nodes), {len(node_ids())} nodes after removing them, RSS {rss_mb():.0f} MB", flush=True)
    after_ids, after_temp = node_ids(), sorted(p.name for p in temp_root.glob(LOGIC_PREFIX + "*"))
    after_children = children()
    leaked_nodes = sorted(set(after_ids) - set(before_ids))
    leaked_temp = sorted(set(after_temp) - set(before_temp))
    leaked_children = sorted(set(after_children) - set(before_children))
    print(f"Logic: nodes {len(before_ids)} before, {len(after_ids)} after ({len(leaked_nodes)} left: "
          f"{leaked_nodes[:6]}); temporary folders {len(before_temp)} before, {len(after_temp)} after "
          f"({leaked_temp[:3]}); child processes {len(before_children)} before, {len(after_children)} after "
          f"({leaked_children})", flush=True)
    return not leaked_nodes and after_ids == before_ids and not leaked_temp and not leaked_children


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="API runs with quality=fast (default 50)")
    parser.add_argument("--default-runs", type=int, default=3, help="API runs with the default preset afterwards")
    parser.add_argument("--logic-runs", type=int, default=20, help="Slicer Logic runs in one scene (default 20)")
    parser.add_argument("--trim", action="store_true", help="glibc malloc_trim(0) after each API run")
    parser.add_argument("--limit-retention", action="store_true",
                        help="runtime.limit_memory_retention() first (what sacb register-batch does)")
    args = parser.parse_args()
    if args.limit_retention:
        from SACBRegistrationLib.runtime import limit_memory_retention
        print(f"limit_memory_retention(): {'applied' if limit_memory_retention() else 'not available here'}")
    import torch

    from SACBRegistrationLib.training.trainer import hardware_description

    print(f"soak: {hardware_description(torch.device('cpu'))}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, Python {platform.python_version()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sacb-soak-") as work:
        ok = True
        if args.runs or args.default_runs:
            ok &= api_soak(args.runs, args.default_runs, Path(work), args.trim)
        if args.logic_runs:
            ok &= logic_soak(args.logic_runs, Path(work))
    print("soak: every target met" if ok else "soak: a target was MISSED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
