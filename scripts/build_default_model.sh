#!/usr/bin/env bash
# Rebuild the default model installed with edgesqz (edgesqz/models/squeezenet1_1-int8.tflite) with
# edgesqz's own convert, and record how: the exact command, the weights' sha256, the calibration
# images, the edgesqz commit and the accuracy check (edgesqz/models/squeezenet1_1-int8.json).
#
# Needs the host install (.venv with ".[convert]") and the development data (EDGESQZ_SHARED, default
# ../shared): torchvision's SqueezeNet 1.1 ImageNet weights and the 1000 labelled ImageNet photos. The
# model is calibrated on 200 of them (a reproducible sample, --seed 0) and checked on the other 800.
#   bash scripts/build_default_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SHARED=${EDGESQZ_SHARED:-../shared}
OUT=edgesqz/models/squeezenet1_1-int8.tflite
WEIGHTS="$SHARED/weights/squeezenet1_1-torchvision-fp16r.pth"
PHOTOS="$SHARED/data/imagenet-sample-1000"
LABELS="$SHARED/data/labels/imagenet_class_index.json"  # wnids, so --check can read the photos' labels
command=(edgesqz convert --int8 --weights "$WEIGHTS" --calib "$PHOTOS" --calib-count 200 --seed 0
         --labels edgesqz/data/imagenet1k_labels.txt --check "$PHOTOS" --max-drop 1.5 -o "$OUT" --force)
echo "+ ${command[*]}"
"$PY" -m "${command[@]}" --json > "$OUT.report.tmp"
"$PY" - "$OUT" "$WEIGHTS" "$PHOTOS" "${command[*]}" <<'PY'
import json
import subprocess
import sys
from pathlib import Path

from edgesqz.datasets import calibration_files, sample_files
from edgesqz.weights import sha256_file

out, weights, photos, command = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
report = json.loads(Path(f"{out}.report.tmp").read_text())
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
provenance = {
    "model": out.name,
    "command": command.replace(str(weights), weights.name).replace(str(photos), photos.name),
    "edgesqz_commit": commit,
    "edgesqz_version": report["edgesqz_version"],
    "weights": {"file": weights.name, "sha256": sha256_file(weights),
                "what": "torchvision squeezenet1_1 IMAGENET1K_V1 as a plain state_dict (values once through fp16)"},
    "calibration": {"folder": photos.name, "count": 200, "seed": 0,
                    "files": [p.name for p in sample_files(calibration_files(photos), 200, 0)]},
    "accuracy": {k: report["accuracy"][k] for k in ("images", "reference", "model", "top1_drop", "top1_drop_ci95",
                                                   "top1_agreement", "top1_agreement_ci95")},
    "size_bytes": report["size_bytes"],
    "graph": report["graph"],
}
out.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
print(f"wrote {out} ({report['size_bytes']} bytes) and {out.with_suffix('.json')}: top-1 agreement with float "
      f"{report['accuracy']['top1_agreement']} % on {report['accuracy']['images']} held-out photos")
PY
rm -f "$OUT.report.tmp" "${OUT%.tflite}.report.json"
