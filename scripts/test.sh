#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite, on every core (pytest-xdist).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -n auto "$@"
