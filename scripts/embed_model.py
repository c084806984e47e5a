#!/usr/bin/env python
"""Embed a trained package as a shipped model.

    python scripts/embed_model.py RUN/package [--evaluation eval.json] [--notes "..."]
    python scripts/embed_model.py --rehash NAME     (after editing an embedded package's model.json)

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
    from SACBRegistrationLib.packages import read_package

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path, nargs="?")
    parser.add_argument("--evaluation", type=Path, help="JSON written by benchmarks/evaluate_model.py")
    parser.add_argument("--notes", default="", help="added to model.json's training record")
    parser.add_argument("--rehash", metavar="NAME", help="only re-hash the embedded package NAME into the manifest")
    args = parser.parse_args()
    if args.rehash:
        write_manifest(args.rehash, MODELS / args.rehash)
        return 0
    if args.package is None:
        parser.error("give a package folder, or --rehash NAME")
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
    write_manifest(package.name, destination)
    return 0


def write_manifest(name: str, folder: Path) -> None:
    """The SHA-256 of every file of the embedded package ``folder`` into registry.EMBEDDED_MANIFEST,
    and the module's CMake file lists regenerated."""
    from SACBRegistrationLib.packages import file_sha256

    if not (folder / "model.json").is_file():
        raise SystemExit(f"no embedded package {name} in {MODELS}")
    manifest = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    text = REGISTRY.read_text()
    new = f"EMBEDDED_MANIFEST: Dict[str, Dict[str, str]] = {json.dumps({name: manifest}, indent=4)}"
    text = re.sub(r"EMBEDDED_MANIFEST: Dict\[str, Dict\[str, str\]\] = \{.*?\n\}|EMBEDDED_MANIFEST: Dict\[str, Dict\[str, str\]\] = \{\}",
                  new.replace("\\", "\\\\"), text, count=1, flags=re.S)
    REGISTRY.write_text(text)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "update_cmake_lists.py")], check=True)
    print(f"embedded {name}: {manifest}")


if __name__ == "__main__":
    sys.exit(main())
