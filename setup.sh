#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with
# torch (pinned through constraints.txt; never torchvision) and this package.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first: the constraints file keeps pip from pulling a CUDA build.
.venv/bin/python -m pip install -q -c constraints.txt torch
.venv/bin/python -m pip install -q -c constraints.txt ".[test]"
