#!/usr/bin/env bash
# Set up auxilia in ./.venv: the CPU wheel of torch first (so nothing pulls a CUDA build),
# then the package with its development tools and the language-model extra (transformers, so
# that CI runs the language-model selection tests). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev,lm]"
