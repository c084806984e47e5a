"""PyTorch inside 3D Slicer: is it there, is it new enough, and what to tell the user (Qt-free).

The Slicer module gets torch through the PyTorch extension (``PyTorchUtils.PyTorchUtilsLogic``:
``installTorch(askConfirmation, torchVersionRequirement=...)`` returns the ``torch`` module, ``None``
when the user declines, and raises when the installer fails). The widget asks :func:`torch_advice`
what to do before a registration and :func:`install_outcome` what to show after an install; it only
opens the dialogs. Nothing here imports torch: versions are read from the installed package's
metadata, so a broken or old torch is never loaded into Slicer (which would lock its files on
Windows and keep an uninstall or upgrade from working until a restart).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from dataclasses import dataclass
from typing import Optional, Tuple

from .vocabulary import MIN_TORCH_VERSION

TORCH_REQUIREMENT = f">={MIN_TORCH_VERSION}"
"""The requirement passed to the PyTorch extension's installer."""

ACTIONS: Tuple[str, ...] = ("ready", "install", "upgrade", "needs-extension")
"""What :func:`torch_advice` can say: go ahead, install torch, upgrade an old torch, or install
the PyTorch extension first."""

RESTART_QUESTION = ("Restart 3D Slicer now? Save your scene first: unsaved changes are lost. "
                    "(Choose No to restart later yourself.)")


def parse_version(text: str) -> Tuple[int, ...]:
    """The release numbers of a version string: ``"2.1.0+cu118"`` -> ``(2, 1, 0)``,
    ``"2.13.0.dev20250101"`` -> ``(2, 13, 0)``. Pre-release and local tags are ignored (a
    ``2.1.0rc1`` counts as 2.1.0). ``ValueError`` when the text does not start with a number."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(text))
    if not match:
        raise ValueError(f"expected a version like '2.1.0', got {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def version_at_least(installed: str, minimum: str = MIN_TORCH_VERSION) -> bool:
    """Whether ``installed`` >= ``minimum`` by release numbers (missing parts count as 0: 2.1 == 2.1.0)."""
    have, need = parse_version(installed), parse_version(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def installed_torch_version() -> Optional[str]:
    """The version of the installed ``torch`` distribution, or ``None`` when it is not installed;
    read from its metadata (torch is not imported). Caches are refreshed first, so an install made
    in this session is seen."""
    importlib.invalidate_caches()
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def too_old_message(installed: str) -> str:
    """Why an installed torch cannot be used, and the fix."""
    return (f"PyTorch {installed} is installed, but this module needs PyTorch {MIN_TORCH_VERSION} or newer. "
            f"Upgrade it: press Apply and accept the upgrade, or use the PyTorch Utils module (uninstall, "
            f"restart Slicer, install with version requirement '{TORCH_REQUIREMENT}').")


@dataclass(frozen=True)
class TorchAdvice:
    """What to do before a registration: ``action`` in :data:`ACTIONS`; ``message`` for the user
    (empty when ready; the confirmation question for an upgrade)."""

    action: str
    message: str = ""


def torch_advice(installed: Optional[str], extension_available: bool) -> TorchAdvice:
    """Decide from the installed torch version (``None``: not installed) and whether the PyTorch
    extension (``PyTorchUtils``) can be imported."""
    if installed is not None:
        try:
            new_enough = version_at_least(installed)
        except ValueError:  # an unreadable version: let the worker try, it reports its own errors
            new_enough = True
        if new_enough:
            return TorchAdvice("ready")
    if not extension_available:
        problem = (f"PyTorch {installed} is too old (this module needs {MIN_TORCH_VERSION} or newer)"
                   if installed is not None else "PyTorch is not installed")
        return TorchAdvice("needs-extension", f"{problem}, and the PyTorch extension that installs it is missing: "
                                              "install 'PyTorch' from the Extensions Manager, restart Slicer, then "
                                              "press Apply again.")
    if installed is None:
        return TorchAdvice("install", "PyTorch is needed to register; the PyTorch extension will install it.")
    return TorchAdvice("upgrade", f"PyTorch {installed} is installed, but this module needs PyTorch "
                                  f"{MIN_TORCH_VERSION} or newer. Upgrade it now with the PyTorch extension? This can "
                                  f"take several minutes, and Slicer should be restarted afterwards.")


@dataclass(frozen=True)
class InstallOutcome:
    """What to show after the PyTorch extension's installer ran.

    ok: the registration may go ahead. level: ``"info" | "warning" | "error"`` (the dialog).
    message: the dialog's text. details: its detailed text (the installer's error). offer_restart:
    ask :data:`RESTART_QUESTION` afterwards.
    """

    ok: bool
    level: str
    message: str
    details: str = ""
    offer_restart: bool = False


def _error_details(error: BaseException) -> str:
    parts = [f"{type(error).__name__}: {error}"]
    for attribute in ("output", "stderr"):  # subprocess.CalledProcessError from pip / light-the-torch
        value = getattr(error, attribute, None)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if value:
            parts.append(str(value).strip())
    return "\n".join(parts)


def install_outcome(before: Optional[str], after: Optional[str], error: Optional[BaseException] = None,
                    declined: bool = False, imported_before: bool = False) -> InstallOutcome:
    """Judge an install or upgrade attempt.

    Args:
        before, after: the installed torch version before and after (``None``: not installed).
        error: what the installer raised, if anything.
        declined: the installer returned ``None`` (the user cancelled its confirmation).
        imported_before: torch was already imported in this Slicer before the install (the running
            Slicer keeps the old module until it restarts).
    """
    if error is not None:
        return InstallOutcome(
            False, "error",
            f"PyTorch could not be installed: {str(error).splitlines()[0] if str(error) else type(error).__name__}. "
            "Some PyTorch files may be in use or damaged: restart Slicer, uninstall PyTorch in the PyTorch Utils "
            "module, restart again and press Apply (the module installs it again).",
            _error_details(error), offer_restart=True)
    if declined:
        return InstallOutcome(False, "warning", "PyTorch is needed to register; it was not installed.")
    if after is None:
        return InstallOutcome(False, "error", "The PyTorch installer finished but no PyTorch is found. Restart Slicer "
                                              "and press Apply again.", offer_restart=True)
    if not version_at_least(after):
        return InstallOutcome(
            False, "error",
            f"The PyTorch extension installed PyTorch {after}, older than the {MIN_TORCH_VERSION} this module needs "
            f"(it picks the newest build for your NVIDIA driver: update the driver, or choose another computation "
            f"backend in the PyTorch Utils module).")
    if before is not None or imported_before:
        changed = f"from {before} to {after}" if before is not None and before != after else f"to {after}"
        return InstallOutcome(
            True, "info",
            f"PyTorch was upgraded {changed}. The registration can run now (it uses a separate process), but restart "
            f"Slicer so that every module uses the new version.", offer_restart=True)
    return InstallOutcome(True, "info", f"PyTorch {after} was installed.")
