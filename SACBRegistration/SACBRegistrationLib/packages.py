"""Model packages: a folder with ``model.json`` and the weights, checksummed.

Layout::

    <package>/
        model.json        description, network config, preprocessing, provenance, checksums
        weights.pt        {"format": "sacbnet-checkpoint", "config": ..., "state_dict": ...}
                          (or weights.safetensors when the optional safetensors package is used)

``model.json`` (``format_version`` 1)::

    {
      "format": "sacb-model-package", "format_version": 1,
      "name": "sacb-brain-t1-2mm", "version": "1.0.0", "description": "...",
      "network": {<SACBNetConfig.to_dict()>},
      "spacing_mm": [2.0, 2.0, 2.0],
      "shape": [80, 96, 80],                                # training grid (D, H, W), informative
      "intensity": {"method": "percentile", "low": 0.5, "high": 99.5}
                 | {"method": "window", "min": -1000, "max": 1000},
      "modality": "MR T1w", "anatomy": "brain",
      "training": {"data": "...", "steps": ..., "hardware": "...", "wall_time_hours": ..., "recipe": {...}},
      "validation": {...}, "licence": "...", "source": "...",
      "files": {"weights.pt": "<sha256>"}
    }

Loading verifies every listed file's SHA-256 before reading it, reads weights with
``torch.load(weights_only=True)`` (or safetensors), and never executes code from a package. A
package may also be a ``.zip`` of such a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .errors import PackageError  # noqa: F401  (defined in errors.py; importable from here as before)
from .networks.config import SACBNetConfig
from .staging import staged_folder

PACKAGE_FORMAT = "sacb-model-package"
PACKAGE_FORMAT_VERSION = 1
MODEL_JSON = "model.json"
INTENSITY_METHODS = ("percentile", "window", "none")

PathLike = Union[str, "os.PathLike[str]"]


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class IntensityNormalisation:
    """How images are scaled before the network.

    ``"percentile"``: the ``low`` and ``high`` percentiles of the image's non-zero voxels map to
    0 and 1 (MR); ``"window"``: ``[min, max]`` (e.g. CT Hounsfield units) maps to [0, 1];
    both clip to [0, 1]. ``"none"`` leaves the intensities alone.
    """

    method: str = "percentile"
    low: float = 0.5
    high: float = 99.5
    min: float = -1000.0
    max: float = 1000.0

    def __post_init__(self) -> None:
        if self.method not in INTENSITY_METHODS:
            raise PackageError(f"expected intensity method in {INTENSITY_METHODS}, got {self.method!r}")
        if self.method == "percentile" and not 0 <= self.low < self.high <= 100:
            raise PackageError(f"expected 0 <= low < high <= 100 percentiles, got {self.low}, {self.high}")
        if self.method == "window" and not self.min < self.max:
            raise PackageError(f"expected window min < max, got {self.min}, {self.max}")

    def to_dict(self) -> Dict[str, Any]:
        if self.method == "percentile":
            return {"method": "percentile", "low": self.low, "high": self.high}
        if self.method == "window":
            return {"method": "window", "min": self.min, "max": self.max}
        return {"method": "none"}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "IntensityNormalisation":
        unknown = set(data) - {"method", "low", "high", "min", "max"}
        if unknown:
            raise PackageError(f"unknown intensity settings {sorted(unknown)}")
        return cls(**dict(data))


@dataclass
class ModelPackage:
    """A loaded, verified package description (the weights are read by :meth:`load_model`)."""

    path: Path
    name: str
    version: str
    network: SACBNetConfig
    spacing_mm: List[float]
    intensity: IntensityNormalisation
    modality: str
    anatomy: str
    description: str = ""
    licence: str = ""
    source: str = ""
    shape: Optional[List[int]] = None
    training: Dict[str, Any] = field(default_factory=dict)
    validation: Dict[str, Any] = field(default_factory=dict)
    files: Dict[str, str] = field(default_factory=dict)
    embedded: bool = False
    _networks: Dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Networks loaded by :meth:`load_model` with ``cache=True``, by (device, overrides)."""

    @property
    def weights_file(self) -> Path:
        for name in self.files:
            if name.startswith("weights."):
                return self.path / name
        raise PackageError(f"package {self.path} lists no weights file")

    def summary(self) -> Dict[str, Any]:
        """JSON-friendly description (for ``sacb models list --json`` and the Slicer GUI)."""
        return {"name": self.name, "version": self.version, "path": str(self.path), "modality": self.modality,
                "anatomy": self.anatomy, "spacing_mm": self.spacing_mm, "intensity": self.intensity.to_dict(),
                "description": self.description, "source": self.source, "embedded": self.embedded,
                "clusters": list(self.network.clusters), "validation": self.validation}

    def reference(self) -> Dict[str, Any]:
        """What a registration's ``report.json`` records of the model: which one it was (name,
        version, path, the SHA-256 of its files), what it expects, and its headline validation
        figures (the scalar entries; the benchmark records stay in ``model.json``)."""
        headline = {key: value for key, value in self.validation.items() if not isinstance(value, (dict, list))}
        return dict(self.summary(), sha256=dict(self.files), validation=headline)

    def verify(self) -> None:
        """Check every listed file's SHA-256 (raises :class:`PackageError`)."""
        for name, expected in self.files.items():
            target = self.path / name
            if not target.is_file():
                raise PackageError(f"model package {self.path}: {name} is missing")
            actual = file_sha256(target)
            if actual != expected:
                raise PackageError(f"model package {self.path}: {name} fails its SHA-256 check (expected "
                                   f"{expected[:12]}..., got {actual[:12]}...); the file is damaged or was "
                                   f"modified: re-install or re-import the package")

    def load_model(self, device: Any = "cpu", cache: bool = False, **config_overrides: Any):
        """Verify the checksums, then build the network and load the weights (eval mode).

        ``cache=True`` keeps the network on this package object and returns the same one next time
        (a batch loads the model once); the network is not trained, so sharing it is safe."""
        import torch

        key = (str(torch.device(device)), tuple(sorted(config_overrides.items())))
        if cache and key in self._networks:
            return self._networks[key]
        model = self._load(device, **config_overrides)
        if cache:
            self._networks[key] = model
        return model

    def _load(self, device: Any, **config_overrides: Any):
        import torch

        from .networks.checkpoints import CheckpointError, load_checkpoint
        from .networks.sacbnet import SACBNet

        self.verify()
        weights = self.weights_file
        config = self.network.replace(**config_overrides) if config_overrides else self.network
        try:
            if weights.suffix == ".safetensors":
                try:
                    from safetensors.torch import load_file
                except ImportError:
                    raise PackageError(f"{weights.name} needs the optional 'safetensors' package "
                                       f"(pip install safetensors)") from None
                model = SACBNet(config)
                model.load_state_dict(load_file(str(weights)), strict=True)
                model.eval()
            else:
                model, _ = load_checkpoint(weights)
                if model.config != config:
                    rebuilt = SACBNet(config)
                    rebuilt.load_state_dict(model.state_dict(), strict=True)
                    model = rebuilt.eval()
        except CheckpointError as error:
            raise PackageError(f"model package {self.path}: {error}") from None
        return model.to(torch.device(device))


def _require(data: Mapping[str, Any], key: str, kind, path: Path):
    if key not in data:
        raise PackageError(f"{path / MODEL_JSON}: missing '{key}'")
    value = data[key]
    if not isinstance(value, kind):
        raise PackageError(f"{path / MODEL_JSON}: '{key}' should be {getattr(kind, '__name__', kind)}, "
                           f"got {type(value).__name__}")
    return value


OPTIONAL_TEXT_FIELDS = ("modality", "anatomy", "description", "licence", "source")
OPTIONAL_TABLE_FIELDS = ("training", "validation")


def _check_optional_fields(data: Mapping[str, Any], meta: Path) -> None:
    """The optional fields of ``model.json``: text, tables (JSON objects) and the grid shape.
    Every message names the file and the field."""
    for key in OPTIONAL_TEXT_FIELDS:
        if key in data and not isinstance(data[key], str):
            raise PackageError(f"{meta}: field '{key}' should be text, got {type(data[key]).__name__} "
                               f"({json.dumps(data[key])[:60]}); fix or remove the field")
    for key in OPTIONAL_TABLE_FIELDS:
        if key in data and data[key] is not None and not isinstance(data[key], dict):
            raise PackageError(f"{meta}: field '{key}' should be a JSON object ({{...}}), got "
                               f"{type(data[key]).__name__} ({json.dumps(data[key])[:60]}); fix or remove the field")
    shape = data.get("shape")
    if shape is not None and (not isinstance(shape, list) or len(shape) != 3 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise PackageError(f"{meta}: field 'shape' should be three positive whole numbers, got {json.dumps(shape)[:60]}")


def read_package(path: PathLike, verify: bool = True, embedded: bool = False) -> ModelPackage:
    """Read and validate ``model.json`` of a package folder (and its checksums if ``verify``)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".zip":
        raise PackageError(f"{path} is an archive: import it with import_package() first")
    meta = path / MODEL_JSON
    if not meta.is_file():
        raise PackageError(f"{path} is not a model package (no {MODEL_JSON})")
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PackageError(f"{meta}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{meta}: not a {PACKAGE_FORMAT} description")
    if data.get("format_version") != PACKAGE_FORMAT_VERSION:
        raise PackageError(f"{meta}: format_version {data.get('format_version')!r} is not supported "
                           f"(this engine reads {PACKAGE_FORMAT_VERSION}); update SACBRegistration")
    try:
        network = SACBNetConfig.from_dict(_require(data, "network", dict, path))
        intensity = IntensityNormalisation.from_dict(_require(data, "intensity", dict, path))
    except (ValueError, TypeError) as error:
        raise PackageError(f"{meta}: {error}") from None
    spacing = _require(data, "spacing_mm", list, path)
    if len(spacing) != 3 or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in spacing):
        raise PackageError(f"{meta}: expected three positive numbers in spacing_mm, got {spacing}")
    _check_optional_fields(data, meta)
    files = _require(data, "files", dict, path)
    for name, digest in files.items():
        if "/" in name or "\\" in name or name.startswith(".") or not isinstance(digest, str) or len(digest) != 64:
            raise PackageError(f"{meta}: bad file entry {name!r}")
    if not any(name.startswith("weights.") for name in files):
        raise PackageError(f"{meta}: lists no weights file")
    package = ModelPackage(
        path=path, name=str(_require(data, "name", str, path)), version=str(_require(data, "version", str, path)),
        network=network, spacing_mm=[float(s) for s in spacing], intensity=intensity,
        modality=str(data.get("modality", "")), anatomy=str(data.get("anatomy", "")),
        description=str(data.get("description", "")), licence=str(data.get("licence", "")),
        source=str(data.get("source", "")), shape=data.get("shape"), training=dict(data.get("training") or {}),
        validation=dict(data.get("validation") or {}), files=dict(files), embedded=embedded)
    if verify:
        package.verify()
    return package


def write_package(folder: PathLike, model, *, name: str, version: str, spacing_mm: Sequence[float],
                  intensity: Union[IntensityNormalisation, Mapping[str, Any]], modality: str, anatomy: str,
                  description: str = "", licence: str = "", source: str = "", shape: Optional[Sequence[int]] = None,
                  training: Optional[Mapping[str, Any]] = None, validation: Optional[Mapping[str, Any]] = None,
                  overwrite: bool = False) -> ModelPackage:
    """Write ``model`` (a :class:`SACBNet`) as a package folder, atomically.

    The folder is assembled under a temporary name and renamed at the end, so a failure never
    leaves a half-written package.
    """
    from .networks.checkpoints import save_checkpoint

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise PackageError(f"{folder} exists (pass overwrite=True to replace it)")
    if not isinstance(intensity, IntensityNormalisation):
        intensity = IntensityNormalisation.from_dict(intensity)
    with staged_folder(folder) as staging:
        save_checkpoint(model, staging / "weights.pt")
        data = {
            "format": PACKAGE_FORMAT, "format_version": PACKAGE_FORMAT_VERSION,
            "name": name, "version": version, "description": description,
            "network": model.config.to_dict(), "spacing_mm": [float(s) for s in spacing_mm],
            "shape": list(shape) if shape is not None else None, "intensity": intensity.to_dict(),
            "modality": modality, "anatomy": anatomy, "training": dict(training or {}),
            "validation": dict(validation or {}), "licence": licence, "source": source,
            "files": {"weights.pt": file_sha256(staging / "weights.pt")},
        }
        (staging / MODEL_JSON).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return read_package(folder)


def extract_package_archive(archive: PathLike, destination: PathLike) -> Path:
    """Unpack a ``.zip`` package safely (no absolute paths, no ``..``, no links) into
    ``destination`` and return the folder that holds ``model.json``."""
    archive, destination = Path(archive), Path(destination)
    try:
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                parts = Path(info.filename).parts
                if info.filename.startswith(("/", "\\")) or ".." in parts or (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise PackageError(f"{archive}: unsafe member {info.filename!r}")
            z.extractall(destination)
    except zipfile.BadZipFile:
        raise PackageError(f"{archive} is not a valid zip archive (damaged or truncated?)") from None
    candidates = [p.parent for p in destination.rglob(MODEL_JSON)]
    if len(candidates) != 1:
        raise PackageError(f"{archive}: expected exactly one {MODEL_JSON}, found {len(candidates)}")
    return candidates[0]
