#!/usr/bin/env bash
# Build the venvs of the two standard TFLite image-classifier clients, apart from edgesqz's own venvs
# (their dependencies clash with TensorFlow's: protobuf<4, opencv-contrib), for tests/test_clients.py:
#   .venv-mediapipe  MediaPipe Tasks (pip install mediapipe, the current release)
#   .venv-tasklib    the TFLite Task Library (pip install tflite-support==0.4.4, the last release;
#                    needs the system library libusb-1.0: Debian package libusb-1.0-0)
# Neither gets edgesqz: tests/clients/classify_with.py runs in them with the standard library, numpy
# and the client only. A venv that imports its client is kept (delete it to rebuild).
# Usage: bash scripts/clients.sh        (EDGESQZ_MEDIAPIPE_VENV / EDGESQZ_TASKLIB_VENV move them)
set -euo pipefail
cd "$(dirname "$0")/.."
MEDIAPIPE=${EDGESQZ_MEDIAPIPE_VENV:-.venv-mediapipe}
TASKLIB=${EDGESQZ_TASKLIB_VENV:-.venv-tasklib}

build() {  # build VENV IMPORT_CHECK PIP_ARGS...
    local venv=$1 check=$2
    shift 2
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" 2>/dev/null; then
        echo "$venv: ready ($("$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(mediapipe|tflite-support) ' | tr -s ' '))"
        return
    fi
    local start=$SECONDS
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "$@"
    if ! "$venv/bin/python" -c "$check"; then
        echo "$venv: $* installed but does not import (see above)" >&2
        return 1
    fi
    echo "$venv: built in $((SECONDS - start)) s ($("$venv/bin/python" -m pip list 2>/dev/null \
        | grep -iE '^(mediapipe|tflite-support) ' | tr -s ' '))"
}

build "$MEDIAPIPE" "from mediapipe.tasks.python import vision" mediapipe
if ! ldconfig -p 2>/dev/null | grep -q "libusb-1.0.so.0"; then
    echo "$TASKLIB: the TFLite Task Library needs libusb-1.0 (apt-get install libusb-1.0-0)" >&2
    exit 1
fi
build "$TASKLIB" "from tflite_support.task import vision" "tflite-support==0.4.4"
