#!/usr/bin/env python
"""The same SACB-Net forward pass, naive and optimised, side by side on this machine (a benchmark).

The naive variant swaps the engine's optimised pieces for the straightforward implementations the
authors' code uses (no library change; the swaps happen in this process only):

* the spatially adaptive convolution: one convolution per cluster over the whole volume, masked;
* k-means: every voxel, 300 iterations at most, tolerance 1e-9 (the authors run to convergence);
* similarity matching: an explicit unfold of the 3x3x3 neighbourhoods and a batched matrix product;
* convolutions in the default (NCDHW) layout, InstanceNorm and LeakyReLU out of place;
* ``F.grid_sample`` on one core (no slabs).

Both run in fresh processes, alternating, so drift of a shared machine affects both alike::

    python benchmarks/benchmark_naive_vs_optimised.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _install_naive() -> None:
    import itertools

    import torch
    import torch.nn.functional as F

    from SACBRegistrationLib.networks.blocks import conv as conv_module
    from SACBRegistrationLib.networks.blocks import matching as matching_module
    from SACBRegistrationLib.networks.blocks import sacb as sacb_module
    from SACBRegistrationLib.ops.kmeans import kmeans as full_kmeans
    from SACBRegistrationLib.spatial import warping

    def per_cluster_sac(x, weight, attention, bias, labels, slab_elements=None):
        batch, c_in = x.shape[:2]
        c_out, taps = weight.shape[0], weight.shape[2]
        k = round(taps ** (1 / 3))
        out = torch.zeros(batch, c_out, *x.shape[2:], dtype=x.dtype)
        for b in range(batch):
            for n in range(attention.shape[1]):
                kernel = (attention[b, n].view(1, 1, taps) * weight).view(c_out, c_in, k, k, k)
                out[b:b + 1] += F.conv3d(x[b:b + 1], kernel, bias[b, n], padding=k // 2) * (labels[b] == n).to(x.dtype)
        return out

    def converged_kmeans(points, k, **options):
        return full_kmeans(points, k, max_iter=300, tol=1e-9, seed=options.get("seed", 0), max_points=None)

    def unfold_matching(fixed, moving, window=3):
        r = window // 2
        b, c, d, h, w = fixed.shape
        m = F.pad(moving, (r,) * 6).unfold(2, window, 1).unfold(3, window, 1).unfold(4, window, 1)
        m = m.reshape(b, c, d * h * w, window ** 3).permute(0, 2, 3, 1)  # (B, V, T, C)
        f = fixed.reshape(b, c, d * h * w).permute(0, 2, 1).unsqueeze(-1)  # (B, V, C, 1)
        p = (m @ f).squeeze(-1).softmax(-1)
        grid = torch.tensor(list(itertools.product(range(-r, r + 1), repeat=3)), dtype=fixed.dtype)
        return (p @ grid).permute(0, 2, 1).reshape(b, 3, d, h, w)

    def plain_convolve(self, x, in_channels=None, bias=True):
        weight = self.conv.weight if in_channels is None else self.conv.weight[:, in_channels]
        return F.conv3d(x.contiguous(), weight, self.conv.bias if bias else None, padding=self.conv.padding)

    def plain_activate(self, y):
        if self.negative_slope is None:
            return y
        return F.leaky_relu(F.instance_norm(y, eps=self.eps), self.negative_slope)

    sacb_module.spatially_adaptive_conv3d = per_cluster_sac
    sacb_module.kmeans = converged_kmeans
    matching_module.similarity_matching_flow = unfold_matching
    conv_module.ConvBlock.convolve = plain_convolve
    conv_module.ConvBlock.activate = plain_activate
    warping._grid_sample_cpu_parallel = lambda image, grid, **options: F.grid_sample(image, grid, **options)


def _worker(variant: str, size, clusters: int) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SACBRegistration"))
    if variant == "naive":
        _install_naive()
    from SACBRegistrationLib.networks.config import SACBNetConfig
    from SACBRegistrationLib.networks.sacbnet import SACBNet

    torch.manual_seed(0)
    model = SACBNet(SACBNetConfig(clusters=clusters)).eval()
    pair = F.avg_pool3d(torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(1)), 5, 1, 2)
    with torch.no_grad():
        start = time.perf_counter()
        model(pair[:1], pair[1:])
        seconds = time.perf_counter() - start
    return {"variant": variant, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs=3, type=int, default=[160, 192, 160])
    parser.add_argument("--clusters", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=["naive", "optimised"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.size, args.clusters)))
        return 0
    runs = {"naive": [], "optimised": []}
    for _ in range(args.rounds):
        for variant in ("naive", "optimised"):
            cmd = [sys.executable, __file__, "--worker", variant, "--size", *map(str, args.size), "--clusters",
                   str(args.clusters)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ,
                                                                             "THP_MEM_ALLOC_ENABLE": "1"})
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[variant].append(result)
            print(f"{variant:9} {result['seconds']:7.2f} s  peak {result['peak_rss_mb']:6.0f} MB", flush=True)
    naive = min(r["seconds"] for r in runs["naive"])
    fast = min(r["seconds"] for r in runs["optimised"])
    print(f"\nSACB-Net forward {'x'.join(map(str, args.size))}, {args.clusters} clusters, first pass of a fresh process, "
          f"min of {args.rounds}: naive {naive:.1f} s, optimised {fast:.1f} s -> {naive / fast:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
