"""Process-level settings for the programs that run registrations (torch-free to import)."""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"


def enable_huge_pages(environment: Optional[MutableMapping[str, str]] = None) -> None:
    """Ask torch's CPU allocator for transparent huge pages (Linux), unless the user decided.

    The forward pass allocates several GB of full-resolution temporaries; without huge pages,
    first-touch page faults cost seconds. torch reads the variable once, before its first
    allocation, so the ``sacb`` command and the worker call this at start-up for their own
    process, and the Slicer logic sets it in the worker's environment; the engine itself never
    changes process settings.
    """
    (os.environ if environment is None else environment).setdefault(HUGE_PAGES, "1")


def release_memory() -> bool:
    """Hand memory the C allocator keeps for reuse back to the system (glibc's ``malloc_trim(0)``);
    returns whether it ran (False off glibc, e.g. macOS, Windows, musl).

    A registration allocates and frees several GB of buffers; glibc keeps much of it mapped, so a
    long-lived process (the Slicer Python console, a notebook, ``sacb register-batch``) grows by
    hundreds of MB over the first runs although nothing leaks (``benchmarks/soak.py``). Called at
    the end of every registration; it takes milliseconds.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
