"""Options remembered across Slicer sessions (SACBRegistrationLib/slicer_settings.py), with a
dict-backed stand-in for qt.QSettings."""

import pytest

from SACBRegistrationLib.slicer_settings import SETTINGS_PREFIX, ModuleSettings
from SACBRegistrationLib.vocabulary import DEFAULT_DEVICE, DEFAULT_QUALITY


class DictSettings:
    """qt.QSettings' value / setValue over a dict; counts writes."""

    def __init__(self, values=None):
        self.values = dict(values or {})
        self.writes = 0

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value):
        self.values[key] = value
        self.writes += 1


def test_nothing_stored_gives_the_defaults():
    assert ModuleSettings(DictSettings()).restore(["tiny"]) == {"device": DEFAULT_DEVICE, "quality": DEFAULT_QUALITY,
                                                                "model": ""}


def test_values_round_trip_under_the_module_group():
    store = DictSettings()
    settings = ModuleSettings(store)
    settings.set("device", "cpu")
    settings.set("quality", "accurate")
    settings.set("model", "tiny")
    assert store.values == {"SACBRegistration/device": "cpu", "SACBRegistration/quality": "accurate",
                            "SACBRegistration/model": "tiny"}
    assert ModuleSettings(store).restore(["tiny", "other"]) == {"device": "cpu", "quality": "accurate",
                                                                "model": "tiny"}


@pytest.mark.parametrize("stored, name", [("gpu", "device"), ("ultra", "quality"), ("", "device"), (3, "quality"),
                                          (None, "device")])
def test_stale_or_foreign_values_fall_back_to_the_default(stored, name):
    store = DictSettings({SETTINGS_PREFIX + name: stored})
    assert ModuleSettings(store).get(name) == {"device": DEFAULT_DEVICE, "quality": DEFAULT_QUALITY}[name]


def test_a_removed_model_falls_back_to_the_default_model():
    store = DictSettings({SETTINGS_PREFIX + "model": "deleted-model"})
    assert ModuleSettings(store).restore(["tiny"])["model"] == ""
    assert ModuleSettings(store).restore(["tiny", "deleted-model"])["model"] == "deleted-model"


def test_set_refuses_values_outside_the_vocabulary():
    settings = ModuleSettings(DictSettings())
    with pytest.raises(ValueError, match="expected device in"):
        settings.set("device", "tpu")
    with pytest.raises(KeyError, match="expected a remembered setting"):
        settings.set("clusters", "7")


def test_remember_writes_only_changes_and_skips_invalid_values():
    store = DictSettings()
    settings = ModuleSettings(store)
    settings.remember({"device": "cuda", "quality": "fast", "model": "tiny", "clusters": 4})
    assert store.writes == 3 and SETTINGS_PREFIX + "clusters" not in store.values
    settings.remember({"device": "cuda", "quality": "fast", "model": "tiny"})
    assert store.writes == 3  # nothing changed: nothing written
    settings.remember({"device": "bogus", "quality": "balanced", "model": ""})
    assert store.writes == 4
    assert store.values[SETTINGS_PREFIX + "device"] == "cuda" and store.values[SETTINGS_PREFIX + "model"] == "tiny"
    assert store.values[SETTINGS_PREFIX + "quality"] == "balanced"
