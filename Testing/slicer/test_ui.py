"""Static checks of Resources/UI/SACBRegistration.ui against the module code and its parameter node."""

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

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
                      "logTextEdit": "QPlainTextEdit"}
    assert used - set(found) == set(), f"used in code but not in the .ui: {used - set(found)}"
    for name, cls in expected_class.items():
        assert name in used and found[name]["class"] == cls, name


COMPATIBLE = {"QCheckBox": "bool", "QSpinBox": "int", "QComboBox": "Choice", "qMRMLNodeComboBox": "vtkMRML"}


def test_every_slicer_parameter_name_maps_to_a_compatible_field():
    _, found = widgets()
    fields = parameter_fields()
    bound = {w["parameter"]: (name, w) for name, w in found.items() if w["parameter"]}
    assert set(bound) - set(fields) == set(), f"SlicerParameterName without a field: {set(bound) - set(fields)}"
    # every field is bound in the .ui, except the model (filled from the registry by the widget)
    assert set(fields) - set(bound) == {"model"}
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


def test_choices_of_the_parameter_node_match_the_engine():
    from SACBRegistrationLib.vocabulary import AFFINE_MODES, DEVICES, QUALITY_PRESETS, SIMILARITIES
    fields = parameter_fields()
    for name, choices in (("device", list(DEVICES)), ("affine", ["preset"] + list(AFFINE_MODES)),
                          ("quality", list(QUALITY_PRESETS)), ("similarity", list(SIMILARITIES))):
        assert f"Choice({choices})".replace("'", '"') in fields[name].replace("'", '"'), name
