"""Process-level settings for the programs that run registrations (torch-free to import)."""

from __future__ import annotations

import importlib
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, List, TypeVar

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


def keep_signals_for_main_thread() -> None:
    """Block SIGINT and SIGTERM in the calling thread (a worker thread of ours), so that the kernel
    delivers them to the main thread (POSIX; nothing elsewhere).

    Python runs signal handlers only in the main thread, and a signal delivered to another thread
    does not interrupt what the main thread is waiting in: the command's SIGTERM -> cancel would
    then wait until that wait ends by itself. Every thread the engine starts calls this first (as a
    ``ThreadPoolExecutor`` initializer)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def parallel_map(function: Callable[[Item], Outcome], items: Iterable[Item]) -> List[Outcome]:
    """``[function(item) for item in items]``, in threads of ours (:func:`keep_signals_for_main_thread`),
    one per CPU at most, results in the items' order.

    For work that releases the GIL (NumPy array arithmetic, zlib, k-d tree queries, SimpleITK) split
    into pieces computed each on its own: the result is then the same bits with any number of
    threads, and on one CPU (or one item) the loop runs in the calling thread."""
    items = list(items)
    workers = min(len(items), os.cpu_count() or 1)
    if workers <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(workers, initializer=keep_signals_for_main_thread) as pool:
        return list(pool.map(function, items))


def import_in_background(module: str = "torch") -> threading.Thread:
    """Start importing ``module`` in a daemon thread and return it.

    For the ``sacb`` commands: importing torch takes most of a second, which a registration would
    otherwise wait for before its first step; ``register()`` first reads the images and pre-aligns
    them (SimpleITK, which needs no torch), so the import overlaps them. A later ``import torch``
    in the main thread waits for this one on the module's import lock and gets the same module;
    an import error is raised again there.
    """
    def load() -> None:
        keep_signals_for_main_thread()
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001  (the main thread's own import reports it)
            pass
    thread = threading.Thread(target=load, name=f"import {module}", daemon=True)
    thread.start()
    return thread


_retention = {"retained": False}
"""Whether this process asked glibc to keep freed memory (:func:`retain_freed_memory`): the process
state that setting creates, recorded where :func:`release_memory` can see it."""


def release_memory() -> bool:
    """Hand memory the C allocator keeps for reuse back to the system (glibc's ``malloc_trim(0)``);
    returns whether it ran (False off glibc, e.g. macOS, Windows, musl).

    A registration allocates and frees several GB of buffers; glibc keeps much of it mapped, so a
    long-lived process (the Slicer Python console, a notebook, ``sacb register-batch``) grows by
    hundreds of MB over the first runs although nothing leaks (``benchmarks/soak.py``). Called at
    the start of every registration (what the results the caller has dropped since the last run
    freed) and at its end (the stages' buffers); it takes milliseconds. A no-op (False) in a
    process that called :func:`retain_freed_memory`: it ends after its one job, and what it keeps
    serves the job's next buffers (writing the outputs).
    """
    import ctypes

    trim = _glibc_function("malloc_trim")
    if trim is None or _retention["retained"]:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def _glibc_function(name: str):
    """A function of glibc (ctypes), or None off Linux / off glibc."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim / mallopt)
        return None


MMAP_THRESHOLD_BYTES = 1 << 20
"""Allocations from this size up get their own memory mapping (see :func:`limit_memory_retention`)."""
RETAINED_MMAP_THRESHOLD_BYTES = 32 << 20
"""The largest mapping threshold glibc accepts on 64-bit systems (half its 64 MB heap size): a
1 mm image (160 x 192 x 160 float32, 20 MB) and smaller buffers come from the reusable heap
(see :func:`retain_freed_memory`)."""
RETAINED_TRIM_THRESHOLD_BYTES = (1 << 31) - 1
"""Free memory at the top of the heap kept for reuse (the largest value ``mallopt`` takes)."""
RETAINED_TOP_PAD_BYTES = 256 << 20
"""Extra heap requested from the system each time the heap grows (address space only until used)."""
# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _mallopt(settings) -> bool:
    """``mallopt(parameter, value)`` for each pair; whether every call applied (False off glibc)."""
    import ctypes

    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all([bool(mallopt(parameter, int(value))) for parameter, value in settings])


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for the process's next allocations instead of handing it back to
    the system; returns whether it applied (False off glibc: macOS, Windows, musl).

    For processes that run one registration and end (the ``sacb`` command, the Slicer module's
    worker): a registration allocates and frees the same few full-volume buffers over and over,
    and by default glibc serves each from a fresh memory mapping whose every page is then faulted in
    and zeroed by the kernel. Measured on a 2-core CPU (``sacb register --quality fast``, a 1 mm
    pair, four alternating runs; README "Where the time goes"): system time 1.8-2.2 -> 1.0-1.1 s,
    wall 7.5-8.0 -> 6.2-6.5 s, peak memory 0.85 -> 1.1 GB. :func:`release_memory` does nothing afterwards. A
    process-wide setting: the engine never calls it on its own; long-lived processes use
    :func:`limit_memory_retention` instead.
    """
    applied = _mallopt([(_M_MMAP_THRESHOLD, RETAINED_MMAP_THRESHOLD_BYTES),
                        (_M_TRIM_THRESHOLD, RETAINED_TRIM_THRESHOLD_BYTES),
                        (_M_TOP_PAD, RETAINED_TOP_PAD_BYTES)])
    _retention["retained"] = applied
    return applied


def limit_memory_retention(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more from its own memory mapping,
    returned to the system when freed; returns whether it applied (False off glibc).

    glibc raises its mapping threshold after large blocks are freed and then keeps later large
    blocks in its heaps: a process running many registrations grows by a few hundred MB although
    nothing leaks (``benchmarks/soak.py``: +23% resident memory over 50 runs without, +1.6% with).
    Fresh mappings cost page faults (runs were about 15% slower in the soak), so only long-lived
    batch processes call this (``sacb register-batch``); in a Python console call it yourself.
    A process-wide setting: the engine never calls it on its own.
    """
    applied = _mallopt([(_M_MMAP_THRESHOLD, threshold)])
    if applied:  # release_memory trims again
        _retention["retained"] = False
    return applied
