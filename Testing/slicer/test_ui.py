"""Static checks of Resources/UI/SACBRegistration.ui against the module code and its parameter node,
and an offscreen rendering of it (with Qt stand-ins for Slicer's widgets) where PySide6 is installed."""

import ast
import importlib.util
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[2] / "SACBRegistration"
UI = MODULE / "Resources" / "UI" / "SACBRegistration.ui"
SOURCE = (MODULE / "SACBRegistration.py").read_text()


def widgets():
    tree = ET.parse(UI)
    out = {}
    for w in tree.iter("widget"):
        props = {p.get("name"): p for p in w.findall("property")}
        parameter = props.get("SlicerParameterName")
        node_types = props.get("nodeTypes")
        out[w.get("name")] = {
            "class": w.get("class"),
            "parameter": parameter.find("string").text if parameter is not None else None,
            "nodeTypes": [s.text for s in node_types.iter("string")] if node_types is not None else [],
        }
    return tree, out


def parameter_fields():
    """name -> annotation source of the @parameterNodeWrapper class."""
    module = ast.parse(SOURCE)
    for node in module.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            return {item.target.id: ast.unparse(item.annotation) for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class")


def test_ui_parses_and_has_the_top_level_widget():
    tree, found = widgets()
    assert tree.getroot().find("class").text == "SACBRegistration"
    assert found["SACBRegistration"]["class"] == "qMRMLWidget"


def test_every_widget_the_code_uses_exists_with_the_right_class():
    _, found = widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    expected_class = {"applyButton": "QPushButton", "importModelButton": "QPushButton", "loadSampleButton": "QPushButton",
                      "modelComboBox": "QComboBox", "progressBar": "QProgressBar", "statusLabel": "QLabel",
                      "logTextEdit": "QPlainTextEdit", "fixedMaskSelector": "qMRMLNodeComboBox",
                      "fixedMaskSegmentComboBox": "QComboBox", "logCollapsibleButton": "ctkCollapsibleButton"}
    assert used - set(found) == set(), f"used in code but not in the .ui: {used - set(found)}"
    for name, cls in expected_class.items():
        assert name in used and found[name]["class"] == cls, name


COMPATIBLE = {"QCheckBox": "bool", "QSpinBox": "int", "QComboBox": "Choice", "qMRMLNodeComboBox": "vtkMRML"}


def test_every_slicer_parameter_name_maps_to_a_compatible_field():
    _, found = widgets()
    fields = parameter_fields()
    bound = {w["parameter"]: (name, w) for name, w in found.items() if w["parameter"]}
    assert set(bound) - set(fields) == set(), f"SlicerParameterName without a field: {set(bound) - set(fields)}"
    # every field is bound in the .ui, except those the widget fills: the model (from the registry) and
    # the mask's segment (from the chosen segmentation)
    assert set(fields) - set(bound) == {"model", "fixedMaskSegment"}
    for parameter, (name, widget) in bound.items():
        annotation = fields[parameter]
        assert COMPATIBLE[widget["class"]] in annotation, (parameter, widget["class"], annotation)
        if widget["class"] == "qMRMLNodeComboBox":
            classes = set(re.findall(r"vtkMRML\w+", annotation))
            assert set(widget["nodeTypes"]) == classes, (parameter, widget["nodeTypes"], classes)


def test_every_node_combo_is_given_the_scene():
    tree, found = widgets()
    receivers = {c.find("receiver").text for c in tree.iter("connection")
                 if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    combos = {name for name, w in found.items() if w["class"] == "qMRMLNodeComboBox"}
    assert combos == receivers


PARAMETER_NODE_SCRIPT = """
import importlib.util, json, sys, types, typing

def stand_in(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module

class Choice:
    def __init__(self, choices):
        self.choices = choices

class WithinRange:
    def __init__(self, low, high):
        self.low, self.high = low, high

# the Qt side of Slicer, absent from slicer-core: the decorator keeps the class as written
stand_in("qt")
stand_in("slicer.i18n", tr=lambda text: text)
stand_in("slicer.parameterNodeWrapper", Choice=Choice, WithinRange=WithinRange, parameterNodeWrapper=lambda cls: cls)
stand_in("slicer.ScriptedLoadableModule", **{name: type(name, (), {}) for name in (
    "ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest", "ScriptedLoadableModuleWidget")})
spec = importlib.util.spec_from_file_location("SACBRegistration", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
node = module.SACBRegistrationParameterNode
hints = typing.get_type_hints(node, include_extras=True)
choices = {name: {"choices": [m.choices for m in hint.__metadata__ if isinstance(m, Choice)][0],
                  "default": getattr(node, name)}
           for name, hint in hints.items()
           if any(isinstance(m, Choice) for m in getattr(hint, "__metadata__", ()))}
print(json.dumps(choices))
"""


def test_choices_of_the_parameter_node_match_the_engine():
    """The parameter node class itself (imported with stand-ins for Slicer's Qt-side modules): its
    Choice lists are the engine's vocabulary, and each default is one of its choices."""
    import json

    pytest.importorskip("slicer")
    from SACBRegistrationLib.vocabulary import (
        AFFINE_MODES,
        DEFAULT_DEVICE,
        DEFAULT_QUALITY,
        DEVICES,
        QUALITY_PRESETS,
        SIMILARITIES,
    )
    result = subprocess.run([sys.executable, "-c", PARAMETER_NODE_SCRIPT, str(MODULE / "SACBRegistration.py")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    fields = json.loads(result.stdout.strip().splitlines()[-1])
    assert {name: field["choices"] for name, field in fields.items()} == {
        "device": list(DEVICES), "affine": ["preset"] + list(AFFINE_MODES), "quality": list(QUALITY_PRESETS),
        "similarity": list(SIMILARITIES)}
    for name, field in fields.items():
        assert field["default"] in field["choices"], name
    assert fields["device"]["default"] == DEFAULT_DEVICE and fields["quality"]["default"] == DEFAULT_QUALITY
    assert fields["affine"]["default"] == "preset" and fields["similarity"]["default"] == "auto"


def test_new_gui_items_are_bound_to_their_fields():
    _, found = widgets()
    fields = parameter_fields()
    assert found["fixedMaskSelector"]["parameter"] == "fixedMask"
    assert set(found["fixedMaskSelector"]["nodeTypes"]) == {"vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode"}
    assert found["keepTemporaryFilesCheckBox"] == {"class": "QCheckBox", "parameter": "keepTemporaryFiles",
                                                   "nodeTypes": []}
    assert fields["keepTemporaryFiles"] == "bool" and fields["fixedMaskSegment"] == "str"
    assert found["finePassCheckBox"] == {"class": "QCheckBox", "parameter": "finePass", "nodeTypes": []}
    assert fields["finePass"] == "bool"


def test_advanced_section_is_collapsed_and_holds_keep_temporary_files():
    tree, _ = widgets()
    advanced = next(w for w in tree.iter("widget") if w.get("name") == "advancedCollapsibleButton")
    assert advanced.get("class") == "ctkCollapsibleButton"
    props = {p.get("name"): p for p in advanced.findall("property")}
    assert props["text"].find("string").text == "Advanced" and props["collapsed"].find("bool").text == "true"
    assert "keepTemporaryFilesCheckBox" in {w.get("name") for w in advanced.iter("widget")}


RENDER_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "render_ui.py"


@pytest.mark.skipif(importlib.util.find_spec("PySide6") is None,
                    reason="PySide6 is not installed (pip install pyside6-essentials to render the .ui offscreen)")
def test_ui_renders_offscreen(tmp_path):
    """scripts/render_ui.py loads the .ui with Qt stand-ins for Slicer's widgets (every widget must
    load: a broken layout or an unknown class fails here) and writes a PNG of the whole panel."""
    out = tmp_path / "ui.png"
    result = subprocess.run([sys.executable, str(RENDER_SCRIPT), str(out)], capture_output=True, text=True,
                            env=dict(os.environ, QT_QPA_PLATFORM="offscreen"), timeout=120)
    assert result.returncode == 0, result.stderr
    from PySide6.QtGui import QImage
    image = QImage(str(out))
    # the panel with its six sections (collapsed ones drawn open by the stand-ins) is tall
    assert not image.isNull() and image.width() >= 460 and image.height() > 900, (image.width(), image.height())


def test_the_parameter_node_has_a_switch_and_a_node_field_per_output():
    from SACBRegistrationLib.slicer_results import createParameterName
    from SACBRegistrationLib.vocabulary import SLICER_OUTPUT_NODE_CLASSES
    fields = parameter_fields()
    for name, node_class in SLICER_OUTPUT_NODE_CLASSES.items():
        assert fields[createParameterName(name)] == "bool", name
        assert fields[name] == node_class, name
    switches = {f for f, annotation in fields.items() if f.startswith("create") and annotation == "bool"}
    assert switches == {createParameterName(name) for name in SLICER_OUTPUT_NODE_CLASSES}
