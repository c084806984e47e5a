"""The Slicer Logic's user-facing error (:class:`~.errors.RegistrationError`), and how its messages name nodes.

Shared by every stage of the Logic (:mod:`.slicer_inputs`, :mod:`.slicer_worker`,
:mod:`.slicer_results`, :mod:`.slicer_logic`); imports nothing (no MRML, no torch).
"""

from __future__ import annotations

from .errors import RegistrationError  # noqa: F401  (defined in errors.py; importable from here as before)


def describeNode(node) -> str:
    """A node as messages name it: its name in quotes, or ``(none)``."""
    return f"'{node.GetName()}'" if node is not None else "(none)"
