"""Failures of the ``sacb`` command and the Slicer worker: exception -> exit code, kind, message.

Torch-free and cheap to import: classifying an error imports nothing. The engine's exception
classes live in modules that need torch, NumPy or SimpleITK; an instance of one of them can only
exist once its module has been imported, so :func:`classify` looks the classes up in
``sys.modules`` instead of importing them. Exit codes are ``vocabulary.EXIT_CODES``.
"""

from __future__ import annotations

import sys
from typing import Optional, Tuple, Type

from .vocabulary import EXIT_CODES

_PACKAGE = __name__.rpartition(".")[0]


class Failure(Exception):
    """A failure already classified: exit ``code``, short ``kind`` (``input``, ``model``, ...) and
    a one-line ``message`` for the user."""

    def __init__(self, code: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.code, self.kind, self.message = code, kind, message


def _loaded(module: str, name: str) -> Tuple[Type[BaseException], ...]:
    """``(class,)`` if ``module`` (relative to this package, or absolute when it has no leading
    dot) is already imported, else ``()``: no instance can exist before its module is imported."""
    full = f"{_PACKAGE}{module}" if module.startswith(".") else module
    loaded = sys.modules.get(full)
    if loaded is None:
        return ()
    cls = getattr(loaded, name, None)
    return (cls,) if isinstance(cls, type) and issubclass(cls, BaseException) else ()


def _cuda_out_of_memory() -> Tuple[Type[BaseException], ...]:
    cuda = sys.modules.get("torch.cuda")
    cls: Optional[type] = getattr(cuda, "OutOfMemoryError", None) if cuda is not None else None
    return (cls,) if isinstance(cls, type) else ()


def classify(error: BaseException) -> Failure:
    """Map an exception to a :class:`Failure`.

    * ``Failure``: unchanged;
    * ``InputError``, ``ConfigError``: ``input`` (exit 3);
    * ``PackageError``: ``model`` (exit 4);
    * ``ResourceError``, ``MemoryError``, ``torch.cuda.OutOfMemoryError``: ``resources`` (exit 5);
    * ``Cancelled``, ``KeyboardInterrupt``: ``cancelled`` (exit 6);
    * ``TrainingError``, other ``ValueError``: ``input`` (exit 3);
    * anything else: ``internal`` (exit 1), the message prefixed with the exception's class name.
    """
    if isinstance(error, Failure):
        return error
    if isinstance(error, _loaded(".pipeline.io", "InputError") + _loaded(".training.config", "ConfigError")):
        return Failure(EXIT_CODES["input"], "input", str(error))
    if isinstance(error, _loaded(".packages", "PackageError")):
        return Failure(EXIT_CODES["package"], "model", str(error))
    if isinstance(error, _cuda_out_of_memory()):
        return Failure(EXIT_CODES["resources"], "resources",
                       "the GPU ran out of memory; use the CPU (device 'cpu') or crop the images")
    if isinstance(error, _loaded(".pipeline.resources", "ResourceError") + (MemoryError,)):
        return Failure(EXIT_CODES["resources"], "resources", str(error) or "out of memory")
    if isinstance(error, _loaded(".pipeline.registration", "Cancelled") + (KeyboardInterrupt,)):
        return Failure(EXIT_CODES["cancelled"], "cancelled", "cancelled")
    if isinstance(error, _loaded(".training.trainer", "TrainingError") + (ValueError,)):
        return Failure(EXIT_CODES["input"], "input", str(error))
    return Failure(EXIT_CODES["unexpected"], "internal", f"{error.__class__.__name__}: {error}")
