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
