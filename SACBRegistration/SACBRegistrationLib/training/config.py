"""Training configuration: nested dataclasses read from TOML (or YAML) plus ``key=value`` overrides.

Example (``configs/brain_t1_2mm.toml``)::

    [model]
    clusters = 7

    [data]
    spacing_mm = 2.0
    shape = [80, 96, 80]
    [[data.sources]]
    kind = "template"
    weight = 0.7

    [optim]
    steps = 5000

Unknown keys are errors (a typo must not silently change nothing).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..errors import ConfigError  # noqa: F401  (defined in errors.py; importable from here as before)
from ..vocabulary import DEVICES, PAIR_MODES, check_choice

SOURCE_KINDS = ("template", "synth", "folder")
SCHEDULES = ("constant", "poly")
AMP_MODES = ("auto", "off", "bf16", "fp16")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelSection:
    clusters: Any = 7
    cluster_feature: str = "spatial"
    base_channels: int = 4
    init: str = ""
    """A model package or checkpoint to start from (fine-tuning); empty for random weights."""


@dataclass
class SourceSection:
    """One source of training pairs.

    ``kind``: ``"template"`` (the MNI template deformed at random), ``"synth"`` (SynthMorph-style
    label maps) or ``"folder"`` (your volumes: a folder of images or a CSV with columns
    ``image`` and optionally ``labels``). ``weight`` sets how often the source is drawn.
    ``similarity`` scales the NCC term for this source's pairs (0 for pairs whose two images have
    unrelated contrasts, such as SynthMorph-style pairs: only ``loss.dice`` can train on them).
    ``identical_probability`` (template sources): the share of pairs whose moving image is the
    fixed subject itself, teaching the network to leave aligned images alone.
    ``max_std`` and ``control_spacing`` (template sources; synth sources use ``max_std`` only) set the random velocity's
    standard deviation and the distance between its control points, both in voxels of the
    training grid: a smaller spacing gives finer-scale deformations.
    ``fine_pass`` (template sources): pairs for the fine pass (:mod:`.half_way`): made on the grid
    of the fine pass (spacing ``data.spacing_mm`` times :data:`..pipeline.presets.FINE_PASS_SCALE`,
    shape ``data.shape`` divided by it; ``max_std`` and ``control_spacing`` in its voxels), warped
    half-way along the symmetric answer of ``model.init`` (the first pass) and cropped to ``crop``
    (three multiples of 16).
    """

    kind: str = "template"
    weight: float = 1.0
    mode: str = "subject-to-subject"
    max_std: float = 3.0
    affine: bool = True
    invert_probability: float = 0.0
    labels: int = 16
    path: str = ""
    atlas: str = ""
    atlas_labels: str = ""
    similarity: float = 1.0
    identical_probability: float = 0.0
    control_spacing: int = 8
    fine_pass: bool = False
    crop: List[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(self.kind in SOURCE_KINDS, f"expected data source kind in {SOURCE_KINDS}, got {self.kind!r}")
        _check(self.mode in PAIR_MODES, f"expected mode in {PAIR_MODES}, got {self.mode!r}")
        _check(self.weight >= 0, f"expected a non-negative source weight, got {self.weight}")
        _check(self.similarity >= 0, f"expected a non-negative source similarity weight, got {self.similarity}")
        _check(0 <= self.identical_probability <= 1,
               f"expected identical_probability in [0, 1], got {self.identical_probability}")
        _check(isinstance(self.control_spacing, int) and self.control_spacing >= 2,
               f"expected control_spacing an integer of at least 2 voxels, got {self.control_spacing!r}")
        _check(self.kind != "folder" or bool(self.path), "a 'folder' data source needs path = <folder or CSV>")
        _check(not self.fine_pass or self.kind == "template",
               f"fine_pass pairs are made from the template; expected kind = 'template', got {self.kind!r}")
        _check(not self.fine_pass or (len(self.crop) == 3 and all(isinstance(c, int) and c > 0 and c % 16 == 0
                                                                  for c in self.crop)),
               f"a fine_pass source needs crop = three positive multiples of 16, got {self.crop}")
        _check(self.mode != "atlas-to-subject" or self.kind != "folder" or bool(self.atlas),
               "atlas-to-subject pairs from a folder need atlas = <image>")


@dataclass
class DataSection:
    spacing_mm: float = 2.0
    shape: List[int] = field(default_factory=lambda: [80, 96, 80])
    sources: List[SourceSection] = field(default_factory=lambda: [SourceSection()])
    validation: SourceSection = field(default_factory=lambda: SourceSection(kind="template"))
    validation_pairs: int = 8
    validation_seed: int = 20251121
    intensity: Dict[str, Any] = field(default_factory=lambda: {"method": "percentile", "low": 0.5, "high": 99.5})

    def __post_init__(self) -> None:
        _check(len(self.shape) == 3 and all(isinstance(s, int) and s > 0 and s % 16 == 0 for s in self.shape),
               f"expected data.shape as three positive multiples of 16, got {self.shape}")
        _check(self.spacing_mm > 0, f"expected a positive data.spacing_mm, got {self.spacing_mm}")
        _check(len(self.sources) > 0, "expected at least one [[data.sources]] entry")
        _check(self.validation_pairs >= 0, "expected data.validation_pairs >= 0")


@dataclass
class LossSection:
    ncc_window: int = 9
    smoothness: float = 0.3
    """Weight of the gradient regulariser (the authors' script uses 0.3; 1 and 3 are noted there)."""
    dice: float = 0.0
    """Weight of the soft Dice loss on warped labels (0 = unsupervised)."""
    identity: float = 0.0
    """Weight of the mean squared displacement (voxels^2) on identical pairs (the template sources'
    ``identical_probability``): pulls the prediction for an image and itself to the identity."""
    num_labels: int = 0
    """Labels including background for the Dice loss (0: inferred from template / synth sources;
    required with folder sources)."""

    def __post_init__(self) -> None:
        _check(self.ncc_window >= 1 and self.ncc_window % 2 == 1, f"expected an odd loss.ncc_window, got {self.ncc_window}")
        _check(self.smoothness >= 0 and self.dice >= 0 and self.identity >= 0, "expected non-negative loss weights")


@dataclass
class OptimSection:
    lr: float = 1e-4
    steps: int = 5000
    batch_size: int = 1
    schedule: str = "poly"
    power: float = 0.9
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        _check(self.lr > 0 and self.steps >= 1 and self.batch_size >= 1, "expected lr > 0, steps >= 1, batch_size >= 1")
        _check(self.schedule in SCHEDULES, f"expected optim.schedule in {SCHEDULES}, got {self.schedule!r}")


@dataclass
class RunSection:
    out: str = "runs/sacb"
    seed: int = 0
    val_every: int = 250
    checkpoint_every: int = 50
    log_every: int = 10
    workers: int = 1
    threads: int = 0
    device: str = "auto"
    amp: str = "auto"
    gradient_checkpointing: bool = False
    tensorboard: bool = False
    max_hours: float = 0.0
    resume: bool = True
    keep_validated: bool = True        # the weights of every validated step: checkpoints/step_<N>.pt
    select_max_sdlogj: float = 0.0     # > 0: the packaged "best" is the highest Dice among validations
    select_max_self_mm: float = 0.0    # with SDlogJ / self-registration (mm) at most these; 0: no limit

    def __post_init__(self) -> None:
        _check(self.select_max_sdlogj >= 0 and self.select_max_self_mm >= 0,
               "expected run.select_max_sdlogj >= 0 and run.select_max_self_mm >= 0 (0: no limit)")
        _check(self.amp in AMP_MODES, f"expected run.amp in {AMP_MODES}, got {self.amp!r}")
        try:
            check_choice("run.device", self.device, DEVICES)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        _check(self.val_every >= 0 and self.checkpoint_every >= 1 and self.log_every >= 1,
               "expected run.val_every >= 0, run.checkpoint_every >= 1 and run.log_every >= 1")


@dataclass
class PackageSection:
    name: str = "sacb-model"
    version: str = "0.1.0"
    modality: str = "MR T1w"
    anatomy: str = "brain"
    description: str = ""
    licence: str = "Apache-2.0"
    data_description: str = ""


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    package: PackageSection = field(default_factory=PackageSection)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, data: Mapping[str, Any], where: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table for [{where}], got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    _check(not unknown, f"unknown key(s) {unknown} in [{where}]; known: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        if cls is DataSection and name == "sources":
            _check(isinstance(value, list), "expected [[data.sources]] entries")
            values[name] = [_build(SourceSection, v, f"data.sources.{i}") for i, v in enumerate(value)]
        elif cls is DataSection and name == "validation":
            values[name] = _build(SourceSection, value, "data.validation")
        else:
            values[name] = value
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"[{where}]: {error}") from None


SECTIONS = {"model": ModelSection, "data": DataSection, "loss": LossSection, "optim": OptimSection,
            "run": RunSection, "package": PackageSection}


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    unknown = sorted(set(data) - set(SECTIONS))
    _check(not unknown, f"unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
    return TrainConfig(**{name: _build(cls, data.get(name, {}), name) for name, cls in SECTIONS.items()})


def read_config_file(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("YAML configs need PyYAML (pip install pyyaml); TOML works without it") from None
        return yaml.safe_load(text) or {}
    if path.suffix == ".json":
        return json.loads(text)
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("TOML configs need Python >= 3.11 or the 'tomli' package") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {error}") from None


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as JSON when possible:
    ``optim.steps=100``, ``data.shape=[32,32,32]``, ``run.out=runs/x``)."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        _check("=" in item, f"expected an override like section.key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        _check(len(parts) >= 2, f"expected section.key in override {item!r}")
        target = data
        for part in parts[:-1]:
            if isinstance(target, list):
                target = target[int(part)]
            else:
                target = target.setdefault(part, {})
        if isinstance(target, list):
            target[int(parts[-1])] = _parse_value(value)
        else:
            target[parts[-1]] = _parse_value(value)
    return data


def load_config(path: Optional[Path] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a config file (TOML, YAML or JSON; none = defaults) and apply overrides."""
    data = read_config_file(path) if path else {}
    return config_from_dict(apply_overrides(data, overrides))
