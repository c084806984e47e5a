#!/usr/bin/env python
"""Forward-pass time and peak memory of SACB-Net (a benchmark, not a test).

Every case runs in a fresh Python process, so the peak resident memory it reports is that
case's alone (interpreter, torch and the model included). Times are wall-clock seconds of
``model(moving, fixed)`` under ``torch.no_grad()`` after one warm-up pass; the minimum and the
median of the repeats are printed (shared machines are noisy: the minimum is the better
estimate of what the code costs).

Examples::

    python benchmarks/benchmark_forward.py                       # CPU, 160x192x160, 7 clusters
    python benchmarks/benchmark_forward.py --device cuda --precision fp32 bf16 fp16
    python benchmarks/benchmark_forward.py --stages              # time per network stage
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

AUTHORS_CPU = {"seconds": 33.5, "kmeans_seconds": 14.0, "peak_rss_gb": 2.4}
"""The authors' implementation on this project's 2-core CPU machine, 160x192x160, 7 clusters,
no grad (figures from the engine issue; their code hard-codes CUDA, so it was patched to run)."""

STAGES = ("encoder", "sacb_proj5", "sacb_proj4", "sacb_proj3", "sacb_proj2", "matching", "conv1", "conv1_out")


def _worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SACBRegistration"))
    from SACBRegistrationLib.networks.config import SACBNetConfig
    from SACBRegistrationLib.networks.sacbnet import SACBNet

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = SACBNet(SACBNetConfig(clusters=args.clusters)).eval().to(device)
    g = torch.Generator().manual_seed(1)
    pair = F.avg_pool3d(torch.rand(2, 1, *args.size, generator=g), 5, 1, 2)  # smooth random images
    moving, fixed = pair[:1].to(device), pair[1:].to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    stage_times: dict = {}
    if args.stages:
        starts = {}

        def before(name):
            def hook(module, inputs):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                starts[name] = time.perf_counter()
            return hook

        def after(name):
            def hook(module, inputs, output):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                stage_times[name] = stage_times.get(name, 0.0) + time.perf_counter() - starts[name]
            return hook

        for name in STAGES:
            module = getattr(model, name)
            module.register_forward_pre_hook(before(name))
            module.register_forward_hook(after(name))

    def run():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(moving, fixed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run()  # warm-up (allocator, oneDNN / cuDNN algorithm selection)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stage_times.clear()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    result = {
        "device": args.device, "precision": args.precision, "size": list(args.size), "clusters": args.clusters,
        "threads": torch.get_num_threads(), "min_s": min(times), "median_s": statistics.median(times),
        "times_s": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_forward_mb": rss_before, "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        result["gpu"] = torch.cuda.get_device_name()
    if args.stages:
        result["stages_s"] = {k: v / args.repeats for k, v in stage_times.items()}
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", nargs="+", default=["cpu"], help="cpu, cuda, or both")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                        help="fp32, or autocast to bf16 / fp16 (CUDA)")
    parser.add_argument("--size", nargs=3, type=int, default=[160, 192, 160], metavar=("D", "H", "W"))
    parser.add_argument("--clusters", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--stages", action="store_true", help="also time each network stage")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.device, args.precision = args.device[0], args.precision[0]
        print(json.dumps(_worker(args)))
        return 0

    results = []
    for device in args.device:
        for precision in args.precision:
            if device == "cpu" and precision == "fp16":
                continue  # no fp16 autocast for CPU convolutions
            cmd = [sys.executable, __file__, "--worker", "--device", device, "--precision", precision,
                   "--size", *map(str, args.size), "--clusters", str(args.clusters), "--repeats", str(args.repeats),
                   "--threads", str(args.threads)] + (["--stages"] if args.stages else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode != 0:
                print(f"{device} {precision}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    print(f"SACB-Net forward, {'x'.join(map(str, args.size))}, {args.clusters} clusters per SACB block, no grad")
    print(f"machine: {_cpu_name()}, {os.cpu_count()} CPUs")
    print(f"{'device':8} {'precision':9} {'threads':>7} {'min s':>8} {'median s':>9} {'peak RSS MB':>12} {'GPU peak MB':>12}")
    for r in results:
        gpu = f"{r['cuda_peak_allocated_mb']:.0f}" if "cuda_peak_allocated_mb" in r else "-"
        print(f"{r['device']:8} {r['precision']:9} {r['threads']:>7} {r['min_s']:>8.3f} {r['median_s']:>9.3f} "
              f"{r['peak_rss_mb']:>12.0f} {gpu:>12}")
        if "stages_s" in r:
            for name, seconds in r["stages_s"].items():
                print(f"    {name:12} {seconds:7.3f} s")
    cpu = [r for r in results if r["device"] == "cpu" and r["precision"] == "fp32"]
    if cpu and list(args.size) == [160, 192, 160] and args.clusters == 7:
        speedup = AUTHORS_CPU["seconds"] / cpu[0]["min_s"]
        print(f"authors' implementation on the same 2-core machine: {AUTHORS_CPU['seconds']} s, "
              f"{AUTHORS_CPU['peak_rss_gb']} GB peak -> {speedup:.1f}x faster")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
