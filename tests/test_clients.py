"""edgesqz models in the two standard TFLite classifier clients, for real (issue 18).

MediaPipe Tasks (``mediapipe.tasks.python.vision.ImageClassifier``) and the TFLite Task Library
(``tflite_support.task.vision.ImageClassifier``, tflite-support 0.4.4) run in their own venvs
(``scripts/clients.sh``; ``scripts/test.sh`` builds them), through ``tests/clients/classify_with.py``.
Both get the SAME pixels as ``edgesqz classify``: real photos centre-cropped and resized by
``edgesqz.imaging.preprocess`` and handed over as RGB arrays (both clients decode grayscale JPEGs
badly from files). Checked: the int8 and float32 models ``edgesqz convert`` writes by default load
in both; their top-1 (index and label) equals ``edgesqz.device.classifier.Classifier``'s on every
photo; their scores are probabilities. edgesqz 0.x's int8 model (int8 input, class map output,
still written with ``--head class_map --io int8``) is refused by both: what issue 18 was about.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgesqz.device.classifier import Classifier
from edgesqz.imaging import preprocess, read_image

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().parent / "clients" / "classify_with.py"
CLIENTS = ("mediapipe", "tasklib")
VENV_ENV = {"mediapipe": "EDGESQZ_MEDIAPIPE_VENV", "tasklib": "EDGESQZ_TASKLIB_VENV"}
PHOTOS_EVERY = 25  # every 25th of the 1000 ImageNet photos: 40 real photos, all classes different


def client_python(client: str) -> Path:
    venv = Path(os.environ.get(VENV_ENV[client], ROOT / f".venv-{client}"))
    python = venv / "bin" / "python"
    if not python.exists():
        if os.environ.get("EDGESQZ_CLIENTS") == "1":  # CI: the venvs must exist
            pytest.fail(f"EDGESQZ_CLIENTS=1 but there is no {client} venv at {venv} (bash scripts/clients.sh)")
        pytest.skip(f"no {client} client venv at {venv}: build it with `bash scripts/clients.sh` "
                    f"(scripts/test.sh does; {VENV_ENV[client]} points elsewhere)")
    return python


def run_client(client: str, model: Path, arrays: list[Path]) -> tuple[int, list[dict[str, Any]]]:
    proc = subprocess.run([str(client_python(client)), str(RUNNER), client, str(model), *map(str, arrays)],
                          capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode not in (0, 3) or not lines:
        raise AssertionError(f"{client} runner failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return proc.returncode, lines


@pytest.fixture(scope="module")
def crops(imagenet_sample: Path, photos: list[Path], tmp_path_factory: pytest.TempPathFactory
          ) -> list[tuple[str, np.ndarray, Path]]:
    """(name, 224x224 RGB uint8, .npy path): the crop edgesqz classify makes, for the clients."""
    folder = tmp_path_factory.mktemp("crops")
    files = sorted(imagenet_sample.iterdir())[::PHOTOS_EVERY] + list(photos)
    out = []
    for f in files:
        rgb = preprocess(read_image(f), 224)
        path = folder / f"{f.stem}.npy"
        np.save(path, rgb)
        out.append((f.name, rgb, path))
    return out


def edgesqz_scores(model: Path, crops: list[tuple[str, np.ndarray, Path]]) -> tuple[Classifier, np.ndarray]:
    """``edgesqz classify``'s probabilities on the given crops (no second crop: the pixels go in as they are)."""
    clf = Classifier(model, threads=1)
    return clf, np.stack([clf.infer(clf.spec.to_tensor(rgb)).scores for _, rgb, _ in crops])


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_the_old_class_map_model_is_refused(client: str, int8_class_map_model: Path, crops: list) -> None:
    code, lines = run_client(client, int8_class_map_model, [crops[0][2]])
    assert code == 3 and "error" in lines[0], lines
    assert "INT8" in lines[0]["error"] or "13x13" in lines[0]["error"], lines[0]["error"]


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("which", ["int8", "float32"])
def test_client_top1_equals_edgesqz_classify(client: str, which: str, request: pytest.FixtureRequest,
                                             crops: list[tuple[str, np.ndarray, Path]]) -> None:
    model: Path = request.getfixturevalue("int8_model" if which == "int8" else "float_model")
    clf, ours = edgesqz_scores(model, crops)
    assert clf.output_kind == "probabilities"
    assert clf.labels is not None and len(clf.labels) == 1000
    code, lines = run_client(client, model, [p for _, _, p in crops])
    assert code == 0, lines  # (a) the client loads the model and classifies every photo
    assert len(lines) == len(crops)
    mismatches = []
    for (name, _, _), line, scores in zip(crops, lines, ours, strict=True):
        top = line["top"]
        best = int(np.argmax(scores))
        # An exact tie in the int8 class map (equal integer sums; ~0.1 % of photos) is broken by each
        # runtime's float summation order: accept the other class when edgesqz scores it equal to 1e-5.
        tie = top["index"] != best and scores[top["index"]] >= scores[best] * (1 - 1e-5)
        if (top["index"] != best and not tie) or top["label"] != clf.labels[top["index"]]:
            mismatches.append((name, top, best, clf.labels[best]))
        assert line["scores"]["count"] == 1000
        # (c) the scores are probabilities, and edgesqz's
        assert line["scores"]["min"] >= 0.0 and line["scores"]["max"] <= 1.0 + 1e-6
        assert abs(line["scores"]["sum"] - 1.0) < 1e-3, line["scores"]
        assert abs(top["score"] - float(scores[top["index"]])) < 1e-3, (top, float(scores[top["index"]]))
    # (b) the same top-1 (index and class name) as edgesqz classify on the same pixels
    assert not mismatches, f"{len(mismatches)}/{len(crops)} photos differ: {mismatches}"


def test_runner_explains_itself() -> None:
    import sys

    proc = subprocess.run([sys.executable, str(RUNNER)], capture_output=True, text=True)
    assert proc.returncode == 2 and "mediapipe|tasklib" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_int4_file_as_it_is(client: str, int4_model: Path, crops32: Path, tmp_path: Path) -> None:
    """A 4-bit model (packed INT4 filters, CONV_2D version 7), the file as it is: MediaPipe Tasks loads it and
    agrees with edgesqz (which widens the weights to int8); the Task Library 0.4.4's older runtime does not
    know INT4 packing and refuses it at load (docs/model-format.md)."""
    files = sorted((crops32 / "test").rglob("*.png"))[::16]
    arrays = []
    for f in files:
        path = tmp_path / f"{f.parent.name}-{f.stem}.npy"
        np.save(path, preprocess(read_image(f), 32, 1.0))
        arrays.append((f.name, np.load(path), path))
    code, lines = run_client(client, int4_model, [p for _, _, p in arrays])
    if client == "tasklib":
        assert code == 3 and "requires" in lines[0]["error"] and "bytes" in lines[0]["error"], lines
        return
    assert code == 0 and len(lines) == len(arrays), lines
    clf, ours = edgesqz_scores(int4_model, arrays)
    for line, scores in zip(lines, ours, strict=True):
        top = line["top"]
        # MediaPipe runs the INT4 convolutions on LiteRT's reference kernels, edgesqz on XNNPACK after widening:
        # int8 rounding may differ by a step, so a class edgesqz scores within 0.02 of its best also counts
        assert scores[top["index"]] >= scores.max() - 0.02, (top, scores)
        assert abs(top["score"] - float(scores[top["index"]])) < 0.02
        assert top["label"] == clf.labels[top["index"]]  # type: ignore[index]
