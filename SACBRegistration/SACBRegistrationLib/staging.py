"""Publishing a folder all at once: it is assembled under a hidden name beside its destination and
then renamed into place, so that the destination holds either the complete new content or what it
held before, never a mix or a half-written file (stdlib only; the registration outputs'
:class:`~.pipeline.io.StagedOutput` and the model packages' :func:`staged_folder` both build on it).

Hidden names: ``.<destination>.sacb-staging-<pid>-<random>`` while assembling and
``.<destination>.sacb-old-<pid>-<random>`` for a replaced destination on its way out, so that a
later run can tell the leftovers of a killed process (:func:`leftovers`) from a live one's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Tuple

HIDDEN_TAG = "sacb"


def make_staging(destination: Path) -> Path:
    """A new empty hidden folder beside ``destination`` (whose parent must exist)."""
    return Path(tempfile.mkdtemp(prefix=f".{destination.name}.{HIDDEN_TAG}-staging-{os.getpid()}-",
                                 dir=destination.parent))


def publish(staging: Path, destination: Path) -> None:
    """Rename ``staging`` to ``destination``, replacing an existing destination as a whole (moved
    aside first, deleted after: there is no moment without a complete destination but the two
    renames')."""
    if destination.is_dir() and not any(destination.iterdir()):
        destination.rmdir()
    if destination.exists():
        old = destination.parent / f".{destination.name}.{HIDDEN_TAG}-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(destination, old)
        os.replace(staging, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, destination)


def leftovers(destination: Path) -> List[Tuple[Path, int]]:
    """``(folder, pid)`` of the hidden staging / replaced folders of ``destination`` left by any process."""
    found = []
    for leftover in destination.parent.glob(f".{destination.name}.{HIDDEN_TAG}-*-*"):
        parts = leftover.name[len(destination.name) + 2:].split("-")  # sacb, staging / old, pid, random
        if leftover.is_dir() and len(parts) >= 4 and parts[2].isdigit():
            found.append((leftover, int(parts[2])))
    return found


@contextmanager
def staged_folder(destination: os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``destination`` (its parents are created); on success it
    replaces ``destination`` as a whole, on failure it is deleted and ``destination`` is untouched."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging(destination)
    try:
        yield staging
        publish(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
