#!/usr/bin/env python
"""Render Resources/UI/SACBRegistration.ui offscreen to a PNG (developer aid, needs PySide6).

Slicer's custom widgets are replaced by plain Qt stand-ins of the same role (ctkCollapsibleButton by a
titled QGroupBox, qMRMLNodeComboBox by a QComboBox showing its node types, qMRMLWidget by QWidget),
so the picture shows the layout, labels and tool tips as laid out in the .ui file.

    QT_QPA_PLATFORM=offscreen python scripts/render_ui.py ui.png
"""

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QBuffer, QByteArray, QIODevice  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402
from PySide6.QtWidgets import QApplication, QComboBox, QGroupBox  # noqa: E402

UI = Path(__file__).resolve().parents[1] / "SACBRegistration" / "Resources" / "UI" / "SACBRegistration.ui"
STAND_INS = {"ctkCollapsibleButton": "QGroupBox", "qMRMLNodeComboBox": "QComboBox", "qMRMLWidget": "QWidget"}


def main(out: str) -> None:
    tree = ET.parse(UI)
    node_types = {}
    for widget in tree.iter("widget"):
        cls = widget.get("class")
        if cls == "ctkCollapsibleButton":
            for prop in widget.findall("property"):
                if prop.get("name") == "text":
                    prop.set("name", "title")
                if prop.get("name") == "collapsed":
                    widget.remove(prop)
        if cls == "qMRMLNodeComboBox":
            props = {p.get("name"): p for p in widget.findall("property")}
            none_display = props.get("noneDisplay")
            types = [s.text for s in props["nodeTypes"].iter("string")] if "nodeTypes" in props else []
            node_types[widget.get("name")] = (none_display.find("string").text if none_display is not None else None,
                                              types)
            for name in ("nodeTypes", "showChildNodeTypes", "noneEnabled", "addEnabled", "removeEnabled",
                         "renameEnabled", "noneDisplay"):
                if name in props:
                    widget.remove(props[name])
        if cls in STAND_INS:
            widget.set("class", STAND_INS[cls])
    root = tree.getroot()
    for element in (root.find("customwidgets"), root.find("connections")):
        if element is not None:
            root.remove(element)
    data = QByteArray(ET.tostring(root))
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    _app = QApplication.instance() or QApplication(sys.argv)  # Qt widgets need a live application object
    widget = QUiLoader().load(buffer)
    for name, (none_display, types) in node_types.items():
        combo = widget.findChild(QComboBox, name)
        combo.addItem(none_display or f"({', '.join(t.replace('vtkMRML', '').replace('Node', '') for t in types)})")
    for combo, items in (("deviceComboBox", ["auto", "cpu", "cuda"]), ("affineComboBox", ["off", "rigid", "affine"]),
                         ("modelComboBox", ["sacb-brain-t1-2mm (MR T1w, 2 mm)"])):
        widget.findChild(QComboBox, combo).addItems(items)
    for box in widget.findChildren(QGroupBox):
        box.setStyleSheet("QGroupBox { font-weight: bold; }")
    widget.resize(460, widget.sizeHint().height())
    widget.grab().save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ui.png")
