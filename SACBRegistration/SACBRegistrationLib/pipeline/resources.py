"""Devices, memory estimates and thread counts for a registration."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from ..errors import ResourceError  # noqa: F401  (defined in errors.py; importable from here as before)
from ..vocabulary import DEVICES

NETWORK_BYTES_PER_VOXEL = {"cpu": 260, "cuda": 220}
"""Peak bytes per network-grid voxel of a float32 SACB-Net forward pass (measured: 1.41 GB at
160x192x160 on the CPU, interpreter and libraries included), with a margin."""
OUTPUT_BYTES_PER_FIXED_VOXEL = 120
"""Peak bytes per fixed-image voxel for the outputs: the float64 displacement field on the fixed
grid, its temporaries, warped images and metrics."""


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"expected device in {DEVICES}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ResourceError("device 'cuda' was requested but no CUDA GPU is available to torch; use 'auto' or 'cpu' "
                            "(or install a CUDA build of torch)")
    return torch.device(device)


def available_memory(device: torch.device) -> Optional[int]:
    """Free bytes on ``device`` (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # ships with Slicer
        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def estimate_memory(network_voxels: int, fixed_voxels: int, device: torch.device) -> dict:
    """Bytes the network (on ``device``) and the outputs (host memory) will need at peak."""
    return {"network": NETWORK_BYTES_PER_VOXEL[device.type] * int(network_voxels),
            "outputs": OUTPUT_BYTES_PER_FIXED_VOXEL * int(fixed_voxels)}


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GB"


def plan_device(requested: str, network_voxels: int, fixed_voxels: int, notes: list) -> torch.device:
    """Pick the device, falling back from CUDA to the CPU when the GPU is too small, and refuse
    work the host cannot hold (with the figures and what to change)."""
    device = resolve_device(requested)
    need = estimate_memory(network_voxels, fixed_voxels, device)
    if device.type == "cuda":
        free = available_memory(device)
        if free is not None and need["network"] > 0.9 * free:
            notes.append(f"the GPU has {gib(free)} free but the network needs about {gib(need['network'])}: "
                         f"running on the CPU instead")
            device = torch.device("cpu")
            need = estimate_memory(network_voxels, fixed_voxels, device)
    host = need["outputs"] + (need["network"] if device.type == "cpu" else 0)
    free = available_memory(torch.device("cpu"))
    if free is not None and host > free:
        raise ResourceError(f"this registration needs about {gib(host)} of memory but only {gib(free)} is available; "
                            f"crop the images to the region of interest, use a model with a coarser spacing, or "
                            f"close other programs")
    return device


@contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Use ``threads`` intra-op threads inside the block (None: leave torch's setting)."""
    if not threads:
        yield
        return
    if threads < 1:
        raise ValueError(f"expected threads >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
