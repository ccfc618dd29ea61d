#!/usr/bin/env bash
# Set up a development venv (host stack: TensorFlow, PyTorch CPU, onnx2tf) and run lint + tests.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EDGESQZ_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[convert,dev]"
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest "$@"
