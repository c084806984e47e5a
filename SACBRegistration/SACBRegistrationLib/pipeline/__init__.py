"""The registration pipeline (no Slicer needed): images in, physical transform and results out.

``from SACBRegistrationLib.pipeline import register`` is the Python API used by the Slicer
module, the console and the ``sacb`` command.
"""

from .io import InputError
from .registration import Cancelled, RegistrationOptions, RegistrationResult, register

__all__ = ["Cancelled", "InputError", "RegistrationOptions", "RegistrationResult", "register"]
