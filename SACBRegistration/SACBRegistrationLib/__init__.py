"""SACBRegistration engine: SACB-Net deformable registration for 3D Slicer and the command line.

Importing this package is cheap (no torch): Slicer imports the module at start-up. Import the
sub-packages for the engine, e.g. ``from SACBRegistrationLib.networks.sacbnet import SACBNet``.
"""

__version__ = "0.1.0"
