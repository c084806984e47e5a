"""The model registry: embedded packages, user-imported packages, and imports.

* Embedded packages live in ``SACBRegistration/Resources/Models/<name>/`` and are listed in
  :data:`EMBEDDED_MANIFEST` with the SHA-256 of each file: a modified shipped package fails
  verification even if its ``model.json`` was edited to match.
* User packages live in ``$SACB_MODELS_DIR`` (default ``~/.sacbregistration/models``).
* :func:`import_official_checkpoint` turns an authors' ``.pth.tar`` into a package (the user
  supplies modality, spacing and normalisation, which the checkpoint cannot tell);
  :func:`import_package` copies a package folder or ``.zip`` after verifying it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from .packages import (
    MODEL_JSON,
    IntensityNormalisation,
    ModelPackage,
    PackageError,
    extract_package_archive,
    file_sha256,
    read_package,
    write_package,
)
from .staging import staged_folder

DEFAULT_MODEL = "sacb-brain-t1-2mm"
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models"
EMBEDDED_MANIFEST: Dict[str, Dict[str, str]] = {
    "sacb-brain-t1-2mm": {
        "model.json": "ac8decc60e7e2d7669da1b5b869a30f700516e9b20420a47ee27cd5f7353d1dc",
        "weights.pt": "ef59d0b3ea1a9b824a41c722834fe6a87e85535db2528859a33dd866f533c21f"
    }
}
"""``{package name: {file name: sha256}}`` of the packages shipped with the extension."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def user_models_dir() -> Path:
    root = os.environ.get("SACB_MODELS_DIR")
    return Path(root) if root else Path.home() / ".sacbregistration" / "models"


@dataclass
class RegistryEntry:
    """A package found by :func:`list_models`; ``error`` is set when it cannot be used."""

    name: str
    path: Path
    embedded: bool
    package: Optional[ModelPackage] = None
    error: str = ""


def _verify_embedded(path: Path, name: str) -> None:
    manifest = EMBEDDED_MANIFEST.get(name)
    if manifest is None:
        raise PackageError(f"embedded package {name} is not in the manifest of shipped models")
    present = {p.name for p in path.iterdir() if p.is_file()}
    if set(manifest) - present:
        raise PackageError(f"embedded package {name} is missing {sorted(set(manifest) - present)}; re-install the extension")
    for file_name, expected in manifest.items():
        if file_sha256(path / file_name) != expected:
            raise PackageError(f"embedded package {name}: {file_name} differs from the shipped file (SHA-256 mismatch); "
                               f"re-install the extension")


def _folders(root: Path) -> List[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MODEL_JSON).is_file()) if root.is_dir() else []


def list_models(verify: bool = False, user_dir: Optional[Path] = None) -> List[RegistryEntry]:
    """All packages, embedded first; unusable ones are listed with their error."""
    entries = []
    for embedded, root in ((True, EMBEDDED_DIR), (False, user_dir or user_models_dir())):
        for folder in _folders(root):
            entry = RegistryEntry(folder.name, folder, embedded)
            try:
                if embedded and verify:
                    _verify_embedded(folder, folder.name)
                entry.package = read_package(folder, verify=verify, embedded=embedded)
                entry.name = entry.package.name
            except PackageError as error:
                entry.error = str(error)
            entries.append(entry)
    return entries


def get_model(name_or_path: Union[None, str, os.PathLike] = None, user_dir: Optional[Path] = None) -> ModelPackage:
    """A verified package by name (embedded first, then user), by folder path, or the default."""
    wanted = name_or_path or DEFAULT_MODEL
    path = Path(wanted)
    if (path / MODEL_JSON).is_file():
        return read_package(path, verify=True)
    if path.suffix == ".zip" and path.is_file():
        raise PackageError(f"{path} is a package archive: import it first (sacb models import {path})")
    for embedded, root in ((True, EMBEDDED_DIR), (False, user_dir or user_models_dir())):
        folder = root / str(wanted)
        if (folder / MODEL_JSON).is_file():
            if embedded:
                _verify_embedded(folder, folder.name)
            return read_package(folder, verify=True, embedded=embedded)
    known = [e.name for e in list_models(user_dir=user_dir)]
    raise PackageError(f"no model named {wanted!r}; available: {', '.join(known) or 'none'} "
                       f"(import one with 'sacb models import')")


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise PackageError(f"expected a package name of letters, digits, '.', '_' or '-' (max 64), got {name!r}")
    return name


def _destination(name: str, user_dir: Optional[Path], overwrite: bool) -> Path:
    destination = (user_dir or user_models_dir()) / _check_name(name)
    if (EMBEDDED_DIR / name).exists():
        raise PackageError(f"{name!r} is the name of a shipped model; choose another name")
    if destination.exists() and not overwrite:
        raise PackageError(f"a model named {name!r} is already imported ({destination}); pass overwrite to replace it")
    return destination


def import_official_checkpoint(checkpoint: Union[str, os.PathLike], name: str, *, spacing_mm: Sequence[float],
                               intensity: Union[IntensityNormalisation, dict], modality: str, anatomy: str,
                               clusters: int = 7, version: str = "1.0.0", description: str = "",
                               licence: str = "see the SACB-Net authors' release", user_dir: Optional[Path] = None,
                               overwrite: bool = False) -> ModelPackage:
    """Import an authors' ``{'state_dict': ...}`` ``.pth.tar`` (read with ``weights_only=True``)."""
    from .networks.checkpoints import CheckpointError, load_official_checkpoint

    destination = _destination(name, user_dir, overwrite)
    if len(spacing_mm) != 3 or any(float(s) <= 0 for s in spacing_mm):
        raise PackageError(f"expected three positive spacings in mm, got {list(spacing_mm)}")
    try:
        model = load_official_checkpoint(checkpoint, clusters=clusters)
    except CheckpointError as error:
        raise PackageError(str(error)) from None
    return write_package(destination, model, name=name, version=version, spacing_mm=spacing_mm, intensity=intensity,
                         modality=modality, anatomy=anatomy, licence=licence,
                         description=description or f"imported from the SACB-Net authors' checkpoint {Path(checkpoint).name}",
                         source=f"official SACB-Net checkpoint {Path(checkpoint).name} (sha256 {file_sha256(checkpoint)[:16]}...)",
                         overwrite=overwrite)


def import_package(source: Union[str, os.PathLike], name: Optional[str] = None, user_dir: Optional[Path] = None,
                   overwrite: bool = False) -> ModelPackage:
    """Copy a package folder or ``.zip`` into the user folder after verifying its checksums."""
    source = Path(source)
    with tempfile.TemporaryDirectory(prefix="sacb-import-") as tmp:
        folder = extract_package_archive(source, Path(tmp)) if source.suffix == ".zip" else source
        package = read_package(folder, verify=True)
        package.load_model()  # the weights must also fit the network
        destination = _destination(name or package.name, user_dir, overwrite)
        with staged_folder(destination) as staging:
            for file_name in [MODEL_JSON] + list(package.files):
                shutil.copy2(folder / file_name, staging / file_name)
            if name and name != package.name:
                # the package is known by the name inside it (list, remove, --model): rename it there too
                # (model.json is not among the checksummed files, so the checksums stay valid)
                description = json.loads((staging / MODEL_JSON).read_text(encoding="utf-8"))
                description["name"] = name
                (staging / MODEL_JSON).write_text(json.dumps(description, indent=2), encoding="utf-8")
    return read_package(destination, verify=True)


def verify_model(name_or_path: Union[None, str, os.PathLike] = None, user_dir: Optional[Path] = None) -> ModelPackage:
    """Full check: checksums (and the shipped manifest), then load the weights into the network."""
    package = get_model(name_or_path, user_dir)
    package.load_model()
    return package


def remove_model(name: str, user_dir: Optional[Path] = None) -> None:
    folder = (user_dir or user_models_dir()) / _check_name(name)
    if not (folder / MODEL_JSON).is_file():
        raise PackageError(f"no imported model named {name!r} (shipped models cannot be removed)")
    shutil.rmtree(folder)
