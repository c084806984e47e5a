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
python -m pip install --quiet -c ci/constraints.txt -e ".[test]"
python -m pytest "$@"
