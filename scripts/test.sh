#!/usr/bin/env bash
# Set up a fresh virtual environment in .venv and run the test suite.
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh -k kmeans  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# the CI / test lock (ci/requirements-lock.txt, from scripts/update_lock.sh): every package pinned,
# so the tests see the same libraries whatever day they run; the engine itself without dependencies
python -m pip install --quiet -r ci/requirements-lock.txt
python -m pip install --quiet --no-deps -e .
python -m ruff check .
python -m pytest "$@"
