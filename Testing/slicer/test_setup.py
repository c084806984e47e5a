"""PyTorch set-up decisions of the Slicer module (SACBRegistrationLib/slicer_setup.py): version
parsing, what to do before a registration, what to show after the PyTorch extension's installer."""

import re
import subprocess
from pathlib import Path

import pytest

from SACBRegistrationLib import slicer_setup
from SACBRegistrationLib.slicer_setup import install_outcome, parse_version, torch_advice, version_at_least
from SACBRegistrationLib.vocabulary import MIN_TORCH_VERSION

ROOT = Path(__file__).resolve().parents[2]


def test_the_minimum_torch_version_is_pyprojects_floor():
    text = (ROOT / "pyproject.toml").read_text()
    floors = re.findall(r'"torch\s*>=\s*([0-9][0-9.]*)', text)
    assert floors == [MIN_TORCH_VERSION], f"pyproject.toml's torch floor {floors} != vocabulary {MIN_TORCH_VERSION}"
    assert slicer_setup.TORCH_REQUIREMENT == f">={MIN_TORCH_VERSION}"


@pytest.mark.parametrize("text, expected", [("2.1.0+cu118", (2, 1, 0)), ("2.13.0.dev20250101", (2, 13, 0)),
                                            ("1.12", (1, 12)), ("2.1.0rc1", (2, 1, 0)), ("v2.4.1", (2, 4, 1))])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_parse_version_refuses_garbage():
    with pytest.raises(ValueError, match="expected a version"):
        parse_version("unknown")


@pytest.mark.parametrize("installed, ok", [("2.1", True), ("2.1.0", True), ("2.0.1", False), ("2.10.0", True),
                                           ("1.13.1+cpu", False), ("3.0", True), ("2.1.0+cu121", True)])
def test_version_at_least_the_minimum(installed, ok):
    assert version_at_least(installed, "2.1") is ok


def test_version_comparison_is_numeric_not_textual():
    assert version_at_least("2.10", "2.9") and not version_at_least("2.9", "2.10")


def test_the_installed_torch_is_read_from_metadata():
    import importlib.metadata
    assert slicer_setup.installed_torch_version() == importlib.metadata.version("torch")


def test_advice_before_a_registration():
    assert torch_advice("2.5.1", extension_available=True).action == "ready"
    assert torch_advice("2.5.1", extension_available=False).action == "ready"  # torch from elsewhere is fine
    assert torch_advice("not-a-version", extension_available=False).action == "ready"  # the worker will tell
    install = torch_advice(None, extension_available=True)
    assert install.action == "install"
    upgrade = torch_advice("1.13.1", extension_available=True)
    assert upgrade.action == "upgrade" and "1.13.1" in upgrade.message and MIN_TORCH_VERSION in upgrade.message
    missing = torch_advice(None, extension_available=False)
    assert missing.action == "needs-extension" and "Extensions Manager" in missing.message
    old_no_extension = torch_advice("2.0.0", extension_available=False)
    assert old_no_extension.action == "needs-extension" and "2.0.0 is too old" in old_no_extension.message


def test_a_failed_install_shows_the_error_and_offers_a_restart():
    error = subprocess.CalledProcessError(1, ["ltt", "install"], output="ERROR: No matching distribution found for torch>=2.1")
    outcome = install_outcome(None, None, error=error)
    assert not outcome.ok and outcome.level == "error" and outcome.offer_restart
    assert "could not be installed" in outcome.message and "PyTorch Utils" in outcome.message
    assert "CalledProcessError" in outcome.details and "No matching distribution" in outcome.details


def test_a_declined_install_is_a_warning_without_restart():
    outcome = install_outcome(None, None, declined=True)
    assert not outcome.ok and outcome.level == "warning" and not outcome.offer_restart


def test_a_fresh_install_goes_ahead_without_restart():
    outcome = install_outcome(None, "2.5.1")
    assert outcome.ok and outcome.level == "info" and not outcome.offer_restart and "2.5.1" in outcome.message


def test_an_upgrade_goes_ahead_and_offers_the_restart():
    outcome = install_outcome("1.13.1", "2.5.1")
    assert outcome.ok and outcome.offer_restart and "from 1.13.1 to 2.5.1" in outcome.message


def test_torch_already_imported_in_slicer_needs_a_restart_after_install():
    outcome = install_outcome(None, "2.5.1", imported_before=True)
    assert outcome.ok and outcome.offer_restart


def test_an_installer_that_leaves_an_old_torch_is_an_error():
    outcome = install_outcome(None, "2.0.1")
    assert not outcome.ok and outcome.level == "error" and "2.0.1" in outcome.message


def test_an_installer_that_leaves_no_torch_is_an_error_with_restart():
    outcome = install_outcome(None, None)
    assert not outcome.ok and outcome.level == "error" and outcome.offer_restart
