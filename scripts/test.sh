#!/usr/bin/env bash
# Set up the venvs and run lint + the whole test suite:
#   1. .venv        host stack (TensorFlow, PyTorch CPU, onnx2tf): every test, with real conversions;
#   2. .venv-device what `pip install .` gives a Raspberry Pi (no TensorFlow, no PyTorch): the device
#                   tests again, on the models stage 1 converted.
# Before stage 1, scripts/clients.sh builds .venv-mediapipe and .venv-tasklib (the standard classifier
# clients that tests/test_clients.py drives).
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
# The standard classifier clients (MediaPipe, TFLite Task Library) for tests/test_clients.py, each in its
# own venv (~1.5 min to build, ~0.9 GB). EDGESQZ_CLIENTS=1 (CI) makes a failed build fatal, =0 skips it.
if [ "${EDGESQZ_CLIENTS:-auto}" != 0 ]; then
    echo "== client venvs (MediaPipe, TFLite Task Library)"
    if ! bash scripts/clients.sh; then
        [ "${EDGESQZ_CLIENTS:-auto}" = 1 ] && exit 1
        echo "warning: client venvs not built; tests/test_clients.py will skip" >&2
    fi
fi
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
