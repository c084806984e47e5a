"""Extension packaging: every shipped file is listed in CMake, the catalog entries are valid, and
nothing heavy happens when Slicer imports the module."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "SACBRegistration"


def cmake_list(name: str):
    text = (MODULE / "CMakeLists.txt").read_text()
    block = re.search(rf"set\({name}\n(.*?)\n  \)", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_every_shipped_file_is_listed_and_exists():
    listed = set(cmake_list("MODULE_PYTHON_SCRIPTS")) | set(cmake_list("MODULE_PYTHON_RESOURCES"))
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=MODULE,
                             capture_output=True, text=True).stdout.split()
    shipped = {f for f in tracked if f.endswith(".py") or f.startswith("Resources/")}
    shipped -= {f for f in shipped if f.startswith("Testing/")}
    missing = sorted(shipped - listed)
    assert missing == [], f"not listed in SACBRegistration/CMakeLists.txt: {missing} (run scripts/update_cmake_lists.py)"
    assert sorted(f for f in listed if not (MODULE / f).is_file()) == []
    assert subprocess.run([sys.executable, str(ROOT / "scripts" / "update_cmake_lists.py"), "--check"]).returncode == 0


def test_module_cmake_uses_the_slicer_macros():
    text = (MODULE / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert (MODULE / "Testing" / "CMakeLists.txt").is_file() and (MODULE / "Testing" / "Python" / "CMakeLists.txt").is_file()


def test_top_level_cmake_and_descriptions():
    text = (ROOT / "CMakeLists.txt").read_text()
    for key in ("project(SACBRegistration)", "EXTENSION_HOMEPAGE", 'EXTENSION_CATEGORY "Registration"',
                "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS",
                'EXTENSION_DEPENDS "PyTorch"', "add_subdirectory(SACBRegistration)"):
        assert key in text, key
    entry = json.loads((ROOT / "SACBRegistration.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert set(entry) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision",
                          "scm_url", "tier", "scm_type", "enabled"}
    assert entry["category"] == "Registration" and entry["tier"] in (1, 3, 5) and "PyTorch" in entry["build_dependencies"]
    assert "/SlicerSACBRegistration" in entry["scm_url"]  # the catalog wants repositories named Slicer*
    s4ext = dict(line.split(" ", 1) for line in (ROOT / "SACBRegistration.s4ext").read_text().splitlines()
                 if line and not line.startswith("#"))
    assert s4ext["depends"] == "PyTorch" and s4ext["category"] == "Registration"
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert (ROOT / "Resources" / "Icons" / "SACBRegistration.png").is_file() and (MODULE / "Resources" / "Icons" / "SACBRegistration.png").is_file()


def test_module_file_imports_nothing_heavy():
    tree = ast.parse((MODULE / "SACBRegistration.py").read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top_level for a in n.names} | {n.module for n in top_level if isinstance(n, ast.ImportFrom)}
    assert not {"torch", "numpy", "SimpleITK", "scipy"} & names
    # what the module imports from the engine must not pull in torch either
    code = ("import sys; import SACBRegistrationLib.slicer_logic, SACBRegistrationLib.registry, "
            "SACBRegistrationLib.packages, SACBRegistrationLib.progress; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_sample_data_registration_uses_checksums():
    text = (MODULE / "SACBRegistration.py").read_text()
    assert "registerCustomSampleDataSource" in text and "SHA256:" in text and 'slicer.app.connect("startupCompleted()"' in text
