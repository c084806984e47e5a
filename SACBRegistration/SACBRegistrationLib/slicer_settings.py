"""Options the Slicer module remembers across sessions (Qt-free adapter over ``qt.QSettings``).

The widget passes ``qt.QSettings()``; tests pass a dict-backed fake. Only ``value(key, default)``
and ``setValue(key, value)`` are used. A stored value that is no longer valid (an option renamed,
a model removed, a hand-edited settings file) falls back to the default instead of reaching the
parameter node, whose typed fields would refuse it.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Protocol, Sequence, Tuple

from .vocabulary import DEFAULT_DEVICE, DEFAULT_QUALITY, DEVICES, QUALITY_PRESETS

SETTINGS_PREFIX = "SACBRegistration/"
"""Every key lives under this group of Slicer's settings file."""

REMEMBERED: Dict[str, Tuple[Optional[Tuple[str, ...]], str]] = {
    "device": (DEVICES, DEFAULT_DEVICE),
    "quality": (QUALITY_PRESETS, DEFAULT_QUALITY),
    "model": (None, ""),  # the installed models change: checked against the caller's list
}
"""Remembered parameter -> (allowed values, or None for any non-empty text; default)."""


class Store(Protocol):
    def value(self, key: str, default: Any = None) -> Any: ...

    def setValue(self, key: str, value: Any) -> None: ...


class ModuleSettings:
    """Get and set the remembered options by name (keys ``SACBRegistration/<name>``)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _spec(name: str) -> Tuple[Optional[Tuple[str, ...]], str]:
        if name not in REMEMBERED:
            raise KeyError(f"expected a remembered setting in {tuple(REMEMBERED)}, got {name!r}")
        return REMEMBERED[name]

    def get(self, name: str, choices: Optional[Sequence[str]] = None) -> str:
        """The stored value of ``name``, or its default when nothing valid is stored. ``choices``
        narrows the valid values (e.g. the names of the installed models)."""
        allowed, default = self._spec(name)
        value = self.store.value(SETTINGS_PREFIX + name, default)
        if not isinstance(value, str) or not value:
            return default
        if allowed is not None and value not in allowed:
            return default
        if choices is not None and value not in choices:
            return default
        return value

    def set(self, name: str, value: str) -> None:
        """Store ``value``; ``ValueError`` when it is not one of the allowed values."""
        allowed, _ = self._spec(name)
        if not isinstance(value, str) or (allowed is not None and value not in allowed):
            raise ValueError(f"expected {name} in {allowed if allowed is not None else 'text'}, got {value!r}")
        self.store.setValue(SETTINGS_PREFIX + name, value)

    def restore(self, models: Optional[Sequence[str]] = None) -> Dict[str, str]:
        """Every remembered option (``models``: the installed model names, to drop a removed one)."""
        return {name: self.get(name, models if name == "model" else None) for name in REMEMBERED}

    def remember(self, values: Mapping[str, Any]) -> None:
        """Store the remembered options found in ``values`` (others are ignored); writes only what
        changed, and skips values that are not valid (e.g. an empty model name)."""
        for name in REMEMBERED:
            value = values.get(name)
            allowed, _ = REMEMBERED[name]
            if not isinstance(value, str) or not value or (allowed is not None and value not in allowed):
                continue
            if self.store.value(SETTINGS_PREFIX + name, None) != value:
                self.store.setValue(SETTINGS_PREFIX + name, value)
