#!/usr/bin/env bash
# Set up the venvs and run lint + the whole test suite:
#   1. .venv        host stack (TensorFlow, PyTorch CPU, onnx2tf): every test, with real conversions;
#   2. .venv-device what `pip install .` gives a Raspberry Pi (no TensorFlow, no PyTorch): the device
#                   tests again, on the models stage 1 converted.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${EDGESQZ_VENV:-.venv}
DEVICE=${EDGESQZ_DEVICE_VENV:-.venv-device}
export EDGESQZ_TEST_MODELS="$PWD/.test-models"
rm -rf "$EDGESQZ_TEST_MODELS"

echo "== host venv ($HOST): install"
[ -x "$HOST/bin/python" ] || python3 -m venv "$HOST"
"$HOST/bin/python" -m pip install -q --upgrade pip
"$HOST/bin/python" -m pip install -q -e ".[convert,dev]"
"$HOST/bin/ruff" check .
echo "== host venv: tests"
"$HOST/bin/python" -m pytest "$@"

echo "== device venv ($DEVICE): install without TensorFlow/PyTorch"
[ -x "$DEVICE/bin/python" ] || python3 -m venv "$DEVICE"
"$DEVICE/bin/python" -m pip install -q --upgrade pip
"$DEVICE/bin/python" -m pip install -q -e ".[dev]"
if "$DEVICE/bin/python" -c "import tensorflow" 2>/dev/null || "$DEVICE/bin/python" -c "import torch" 2>/dev/null; then
    echo "device venv must not contain tensorflow or torch" >&2
    exit 1
fi
echo "== device venv: device tests"
"$DEVICE/bin/python" -m pytest -m device "$@"
