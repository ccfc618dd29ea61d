"""`edgesqz compare`: two real models on a labelled folder (no TensorFlow needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgesqz.imaging import list_images


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, imagenet_sample: Path) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    for f in list_images(imagenet_sample)[5::40]:  # 25 images, none of them among the first calibration picks
        (root / f.name).symlink_to(f)
    return root


def _compare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesqz", "compare", *args], capture_output=True, text=True)


def test_compare_float_and_int8(float_model: Path, int8_model: Path, folder: Path) -> None:
    result = _compare(str(float_model), str(int8_model), "--data", str(folder), "--json", "--threads", "1")
    assert result.returncode == 0, result.stderr
    rep = json.loads(result.stdout)
    assert rep["schema"] == "edgesqz/1" and rep["kind"] == "compare_report" and rep["images"] == 25
    assert rep["a"]["format"] == "float32" and rep["b"]["format"] == "int8"
    assert rep["a"]["size_bytes"] > 3 * rep["b"]["size_bytes"]
    assert 70 <= rep["top1_agreement"] <= 100
    lo, hi = rep["top1_agreement_ci95"]
    assert lo < rep["top1_agreement"] <= hi <= 100 and hi - lo > 1  # 25 images cannot pin it down
    lo, hi = rep["top1_difference_ci95"]
    assert lo < rep["top1_difference"] < hi
    assert "95 % interval" in _compare(str(float_model), str(int8_model), "--data", str(folder)).stdout
    assert rep["output_difference"]["max_abs"] > 0
    for key in ("a", "b"):
        assert 0 <= rep[key]["top1"] <= rep[key]["top5"] <= 100
        assert 0 < rep[key]["latency"]["p50_ms"] <= rep[key]["latency"]["p90_ms"]


def test_a_model_agrees_with_itself(int8_model: Path, folder: Path) -> None:
    rep = json.loads(_compare(str(int8_model), str(int8_model), "--data", str(folder), "--json").stdout)
    assert rep["top1_agreement"] == 100 and rep["output_difference"]["max_abs"] == 0
    assert rep["classes_changed"] == []


def test_compare_errors(int8_model: Path, folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(int8_model.read_bytes()[:3000])
    for args, fragment in (([str(int8_model), str(bad), "--data", str(folder)], "not a valid .tflite"),
                           ([str(int8_model), str(int8_model), "--data", str(tmp_path)], "no images")):
        result = _compare(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.startswith("error:") and fragment in result.stderr, result.stderr
