#!/usr/bin/env bash
# Fresh machine -> register the bundled sample pair with the embedded default model.
#   bash scripts/demo.sh [OUTPUT_FOLDER]      (default: sacb-demo)
# Writes the warped image, the ITK transform (.h5 and .nii.gz), the RGB field, the SACB cluster
# maps, the Dice/HD95/ASSD table and overview.png into the output folder.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-sacb-demo}
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet -e .          # keep the torch you have (e.g. a CUDA build)
else
    python -m pip install --quiet -c ci/constraints.txt -e .   # no torch yet: the CPU build
fi
sacb demo --out "$OUT"
echo "overview picture: $OUT/overview.png"
