"""Classify RGB arrays with a standard TFLite classifier client; one JSON object per line on stdout.

Runs inside a client's own venv (``scripts/clients.sh``), with only that client and numpy: it never
imports edgesqz. ::

    python classify_with.py mediapipe|tasklib MODEL.tflite IMAGE.npy [IMAGE.npy ...]

Each ``IMAGE.npy`` holds one ``H x W x 3`` uint8 RGB array, already cropped and resized to the model's
input size (both clients decode grayscale JPEGs badly from files, so the test hands them pixels).
Per image: ``{"image", "top": {"index", "label", "score"}, "scores": {"count", "sum", "min", "max"}}``
over all the classes the client reports. When the client refuses the model, one line
``{"error": "..."}`` and exit code 3.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REFUSED = 3


def _mediapipe(model: str) -> Any:
    import mediapipe as mp
    from mediapipe.tasks import python as mp_tasks
    from mediapipe.tasks.python import vision

    options = vision.ImageClassifierOptions(base_options=mp_tasks.BaseOptions(model_asset_path=model),
                                            max_results=-1)
    classifier = vision.ImageClassifier.create_from_options(options)

    def classify(rgb: np.ndarray) -> list[tuple[int, str, float]]:
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))
        result = classifier.classify(image)
        return [(c.index, c.category_name, c.score) for c in result.classifications[0].categories]

    return classify


def _tasklib(model: str) -> Any:
    from tflite_support.task import core, processor, vision

    options = vision.ImageClassifierOptions(base_options=core.BaseOptions(file_name=model),
                                            classification_options=processor.ClassificationOptions(max_results=-1))
    classifier = vision.ImageClassifier.create_from_options(options)

    def classify(rgb: np.ndarray) -> list[tuple[int, str, float]]:
        result = classifier.classify(vision.TensorImage.create_from_array(np.ascontiguousarray(rgb)))
        return [(c.index, c.category_name, c.score) for c in result.classifications[0].categories]

    return classify


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[1] not in ("mediapipe", "tasklib"):
        print(__doc__, file=sys.stderr)
        return 2
    client, model, images = sys.argv[1], sys.argv[2], sys.argv[3:]
    try:
        classify = (_mediapipe if client == "mediapipe" else _tasklib)(model)
    except Exception as exc:  # the clients raise RuntimeError/ValueError with the reason at load
        print(json.dumps({"error": f"{type(exc).__name__}: {str(exc).strip()}"}), flush=True)
        return REFUSED
    for path in images:
        rgb = np.load(path)
        try:
            categories = classify(rgb)
        except Exception as exc:  # MediaPipe only fails at the first classify for some models
            print(json.dumps({"error": f"{type(exc).__name__}: {str(exc).strip()}"}), flush=True)
            return REFUSED
        scores = np.array([c[2] for c in categories], np.float64)
        best = max(categories, key=lambda c: c[2])
        print(json.dumps({"image": Path(path).name,
                          "top": {"index": int(best[0]), "label": best[1], "score": float(best[2])},
                          "scores": {"count": len(categories), "sum": float(scores.sum()),
                                     "min": float(scores.min()), "max": float(scores.max())}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
