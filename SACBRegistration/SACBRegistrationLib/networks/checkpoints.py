"""Saving and loading SACB-Net weights, ours and the authors'.

Our checkpoints are plain dictionaries of tensors and JSON-compatible values::

    {"format": "sacbnet-checkpoint", "version": 1, "config": SACBNetConfig.to_dict(),
     "state_dict": {...}, "metadata": {...}}

so ``torch.load(..., weights_only=True)`` reads them without unpickling any code, and the
config rebuilds the model (voxelmorph's ``LoadableModel`` idea). The authors' ``.pth.tar``
files are ``{"state_dict": ...}`` with the same parameter names plus shape-bound
``transformer.<i>.grid`` buffers, which are dropped.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from ..errors import CheckpointError  # noqa: F401  (defined in errors.py; importable from here as before)
from .config import SACBNetConfig
from .sacbnet import SACBNet

CHECKPOINT_FORMAT = "sacbnet-checkpoint"
CHECKPOINT_VERSION = 1
_GRID_BUFFER = re.compile(r"^(module\.)?transformer\.\d+\.grid$")

PathLike = Union[str, "os.PathLike[str]"]


def load_tensor_file(path: PathLike) -> Any:
    """``torch.load`` with ``weights_only=True`` (never unpickles code) and a readable error."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupted, truncated, or holding pickled objects
        raise CheckpointError(f"cannot read checkpoint {path}: {_loader_reason(error)} (the file is damaged, "
                              f"truncated, or contains Python objects other than tensors, which are refused for "
                              f"safety: loading them could run code)") from None


_ANSI_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _loader_reason(error: Exception) -> str:
    """The first line of a loader error, without terminal colour codes and without torch's advice to
    retry with ``weights_only=False`` (never disable the safe loader for an untrusted file)."""
    text = _ANSI_CODES.sub("", str(error)).strip()
    if "weights only load failed" in text.lower() or "weights_only" in text:
        return f"{error.__class__.__name__}: the file holds pickled Python objects"
    first = text.splitlines()[0] if text else ""
    return f"{error.__class__.__name__}: {first}" if first else error.__class__.__name__


def _unwrap_state_dict(data: Any, path: PathLike) -> Dict[str, torch.Tensor]:
    state = data.get("state_dict", data) if isinstance(data, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"expected a state dict of tensors (or {{'state_dict': ...}}) in {path}")
    return dict(state)


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the authors' shape-bound ``transformer.*.grid`` buffers and a DataParallel
    ``module.`` prefix; every other name is already ours."""
    converted = {}
    for key, value in state_dict.items():
        if _GRID_BUFFER.match(key):
            continue
        converted[key[len("module."):] if key.startswith("module.") else key] = value
    return converted


def infer_official_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> SACBNetConfig:
    """Rebuild the architecture from the weights of an authors' checkpoint.

    Channels come from the first convolution, the clustering feature from the input width of
    the kernel MLP. Clusters carry no weights: pass ``clusters=`` (default: the paper's 7).
    """
    try:
        first = state_dict["encoder.conv0.0.conv.weight"]  # (c, in_channels, 3, 3, 3)
        kernel_in = state_dict["sacb_proj2.get_kernel.0.weight"].shape[1]
        taps = state_dict["sacb_proj2.get_kernel.4.weight"].shape[0]
        kernel_hidden = state_dict["sacb_proj2.get_kernel.0.weight"].shape[0]
        bias_hidden = state_dict["sacb_proj2.get_bias.0.weight"].shape[0]
    except KeyError as missing:
        raise CheckpointError(f"not a SACB-Net state dict: parameter {missing} is missing") from None
    base, in_channels = int(first.shape[0]), int(first.shape[1])
    channels2 = 4 * base
    kernel_size = round(taps ** (1 / 3))
    by_width = {channels2: "spatial", taps: "channel", channels2 + taps: "both"}
    if kernel_in not in by_width:
        raise CheckpointError(f"cannot tell the clustering feature from an MLP input width of {kernel_in}")
    values = dict(in_channels=in_channels, base_channels=base, cluster_feature=by_width[kernel_in],
                  kernel_size=kernel_size, kernel_hidden=int(kernel_hidden), bias_hidden=int(bias_hidden))
    values.update(overrides)
    return SACBNetConfig(**values)


def _load_into(model: SACBNet, state_dict: Mapping[str, torch.Tensor], path: PathLike) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("wrong shapes " + ", ".join(
                f"{k}: {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:5]))
        raise CheckpointError(f"weights in {path} do not fit the network: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def load_official_checkpoint(path: PathLike, **config_overrides: Any) -> SACBNet:
    """Build a :class:`SACBNet` from an authors' ``{'state_dict': ...}`` ``.pth.tar`` file.

    ``config_overrides`` (e.g. ``clusters=7``) complete what the weights cannot tell.
    """
    state = convert_official_state_dict(_unwrap_state_dict(load_tensor_file(path), path))
    model = SACBNet(infer_official_config(state, **config_overrides))
    _load_into(model, state, path)
    return model.eval()


def checkpoint_dict(model: SACBNet, metadata: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The dictionary :func:`save_checkpoint` writes (tensors on the CPU)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "metadata": dict(metadata or {}),
    }


def save_tensor_file(data: Any, path: PathLike) -> None:
    """``torch.save`` atomically: written to ``<path>.partial``, then renamed over ``path``, so a
    partial file never replaces a good one (and none is left behind on failure). The counterpart of
    :func:`load_tensor_file` for checkpoints and training states."""
    tmp = f"{os.fspath(path)}.partial"
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(model: SACBNet, path: PathLike, metadata: Optional[Mapping[str, Any]] = None) -> None:
    """Write weights and config atomically (a partial file never replaces a good one)."""
    save_tensor_file(checkpoint_dict(model, metadata), path)


def load_checkpoint(path: PathLike, **config_overrides: Any) -> Tuple[SACBNet, Dict[str, Any]]:
    """Rebuild a model from :func:`save_checkpoint`'s file (or an authors' file, detected by its
    lack of a config). Returns the model in eval mode and the metadata."""
    data = load_tensor_file(path)
    if isinstance(data, Mapping) and data.get("format") == CHECKPOINT_FORMAT:
        if data.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint {path} has format version {data.get('version')!r}; "
                                  f"this engine reads version {CHECKPOINT_VERSION}")
        config = SACBNetConfig.from_dict(data["config"])
        if config_overrides:
            config = config.replace(**config_overrides)
        model = SACBNet(config)
        _load_into(model, _unwrap_state_dict(data, path), path)
        return model.eval(), dict(data.get("metadata") or {})
    return load_official_checkpoint(path, **config_overrides), {"source": "official SACB-Net checkpoint"}
