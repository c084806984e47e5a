"""Progress reporting shared by the pipeline, training and the command line.

Long operations call a ``progress(fraction, message)`` callback: ``fraction`` in [0, 1] (or
``None`` when unknown) and a short human-readable message. :func:`console_progress` prints them
as a bar on a terminal and as plain lines otherwise; :func:`worker_progress` prints the
machine-readable lines the Slicer module parses (``PROGRESS <percent> <message>``).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

ProgressCallback = Callable[[Optional[float], str], None]
WORKER_PREFIX = "PROGRESS"


def no_progress(fraction: Optional[float], message: str) -> None:
    """A callback that ignores everything."""


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def console_progress(stream: TextIO = sys.stderr, width: int = 28) -> ProgressCallback:
    """A callback drawing ``[#####.....]  42%  message  (elapsed)`` on a terminal, or printing
    one line per new message elsewhere (logs, CI)."""
    start = time.monotonic()
    state = {"last": None}
    interactive = hasattr(stream, "isatty") and stream.isatty()

    def report(fraction: Optional[float], message: str) -> None:
        elapsed = format_duration(time.monotonic() - start)
        if fraction is None:
            line = f"{message}  ({elapsed})"
        else:
            fraction = min(1.0, max(0.0, fraction))
            filled = int(round(width * fraction))
            line = f"[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:3.0f}%  {message}  ({elapsed})"
        if interactive:
            stream.write("\r" + line[:160].ljust(100) + ("\n" if fraction is not None and fraction >= 1.0 else ""))
            stream.flush()
        elif message != state["last"]:
            stream.write(line + "\n")
            stream.flush()
        state["last"] = message

    return report


def worker_progress(stream: TextIO = sys.stdout) -> ProgressCallback:
    """A callback printing ``PROGRESS <0-100> <message>`` lines for a parent process to parse."""

    def report(fraction: Optional[float], message: str) -> None:
        percent = -1 if fraction is None else int(round(100 * min(1.0, max(0.0, fraction))))
        stream.write(f"{WORKER_PREFIX} {percent} {message}\n")
        stream.flush()

    return report


def parse_worker_line(line: str):
    """``(percent or None, message)`` for a ``PROGRESS`` line, else ``None``."""
    if not line.startswith(WORKER_PREFIX + " "):
        return None
    parts = line.rstrip("\n").split(" ", 2)
    try:
        percent = int(parts[1])
    except (IndexError, ValueError):
        return None
    return (None if percent < 0 else percent, parts[2] if len(parts) > 2 else "")
