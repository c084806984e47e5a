#!/usr/bin/env python
"""Embed a trained package as a shipped model.

    python scripts/embed_model.py RUN/package [--evaluation eval.json] [--notes "..."]

Copies the package into SACBRegistration/Resources/Models/<name>/, merges the held-out evaluation
(benchmarks/evaluate_model.py --json) into model.json's "validation", writes the files' SHA-256 into
registry.EMBEDDED_MANIFEST and regenerates the module's CMake file lists.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "SACBRegistration" / "Resources" / "Models"
REGISTRY = ROOT / "SACBRegistration" / "SACBRegistrationLib" / "registry.py"


def main() -> int:
    from SACBRegistrationLib.packages import file_sha256, read_package

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--evaluation", type=Path, help="JSON written by benchmarks/evaluate_model.py")
    parser.add_argument("--notes", default="", help="added to model.json's training record")
    args = parser.parse_args()
    package = read_package(args.package)
    destination = MODELS / package.name
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(args.package, destination)
    meta_path = destination / "model.json"
    meta = json.loads(meta_path.read_text())
    if args.evaluation:
        meta["validation"]["held_out_evaluation"] = json.loads(args.evaluation.read_text())
    if args.notes:
        meta["training"]["notes"] = args.notes
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    manifest = {p.name: file_sha256(p) for p in sorted(destination.iterdir()) if p.is_file()}
    text = REGISTRY.read_text()
    new = f"EMBEDDED_MANIFEST: Dict[str, Dict[str, str]] = {json.dumps({package.name: manifest}, indent=4)}"
    text = re.sub(r"EMBEDDED_MANIFEST: Dict\[str, Dict\[str, str\]\] = \{.*?\n\}|EMBEDDED_MANIFEST: Dict\[str, Dict\[str, str\]\] = \{\}",
                  new.replace("\\", "\\\\"), text, count=1, flags=re.S)
    REGISTRY.write_text(text)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "update_cmake_lists.py")], check=True)
    print(f"embedded {package.name}: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
