"""The engine's exception classes, and failures of the ``sacb`` command and the Slicer worker:
exception -> exit code, kind, message.

Torch-free and cheap to import (the vocabulary only): every layer raises these classes, and
classifying an error imports nothing. The modules that raise them re-export them under their old
names (``pipeline.io.InputError`` is :class:`InputError`). Exit codes are ``vocabulary.EXIT_CODES``.
"""

from __future__ import annotations

import sys
from typing import Optional, Tuple, Type

from .vocabulary import EXIT_CODES


class InputError(ValueError):
    """An input cannot be registered; the message says what is wrong and how to fix it."""


class PackageError(ValueError):
    """A model package is missing, malformed, or fails its checksums."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the network."""


class ResourceError(RuntimeError):
    """The machine cannot hold the registration; the message says what would."""


class Cancelled(RuntimeError):
    """The registration was cancelled; nothing was written."""


class ConfigError(ValueError):
    """The training configuration is invalid."""


class TrainingError(RuntimeError):
    """Training cannot start or continue."""


class TemplateError(RuntimeError):
    """The template could not be fetched or failed its checksum."""


class RegistrationError(RuntimeError):
    """The Slicer module's registration could not run or failed; the message is meant for the user."""


class Failure(Exception):
    """A failure already classified: exit ``code``, short ``kind`` (``input``, ``model``, ...) and
    a one-line ``message`` for the user."""

    def __init__(self, code: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.code, self.kind, self.message = code, kind, message


def _cuda_out_of_memory() -> Tuple[Type[BaseException], ...]:
    """torch's CUDA out-of-memory class when torch is loaded (no instance can exist before), else ()."""
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
    if isinstance(error, (InputError, ConfigError)):
        return Failure(EXIT_CODES["input"], "input", str(error))
    if isinstance(error, PackageError):
        return Failure(EXIT_CODES["package"], "model", str(error))
    if isinstance(error, _cuda_out_of_memory()):
        return Failure(EXIT_CODES["resources"], "resources",
                       "the GPU ran out of memory; use the CPU (device 'cpu') or crop the images")
    if isinstance(error, (ResourceError, MemoryError)):
        return Failure(EXIT_CODES["resources"], "resources", str(error) or "out of memory")
    if isinstance(error, (Cancelled, KeyboardInterrupt)):
        return Failure(EXIT_CODES["cancelled"], "cancelled", "cancelled")
    if isinstance(error, (TrainingError, ValueError)):
        return Failure(EXIT_CODES["input"], "input", str(error))
    return Failure(EXIT_CODES["unexpected"], "internal", f"{error.__class__.__name__}: {error}")
