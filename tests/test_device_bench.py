"""`edgesqz bench` on real models: structure and sanity of the figures (not speed)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesqz", "bench", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> Path:
    path = tmp_path_factory.mktemp("video") / "pan.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (640, 480))
    image = cv2.resize(cv2.imread(str(photos[0])), (800, 600))
    for i in range(30):
        writer.write(np.ascontiguousarray(image[i * 3:i * 3 + 480, i * 4:i * 4 + 640]))
    writer.release()
    return path


def test_two_models_two_thread_counts(int8_model: Path, float_model: Path, tmp_path: Path) -> None:
    out_json, out_csv = tmp_path / "b.json", tmp_path / "b.csv"
    result = bench(str(int8_model), str(float_model), "--threads", "1,2", "--runs", "12", "--warmup", "2",
                   "--json", str(out_json), "--csv", str(out_csv))
    assert result.returncode == 0, result.stderr
    rep = json.loads(out_json.read_text())
    assert rep["schema"] == "edgesqz/1" and rep["kind"] == "bench_report"
    assert [(Path(r["model"]).name, r["threads"]) for r in rep["results"]] == [
        (int8_model.name, 1), (float_model.name, 1), (int8_model.name, 2), (float_model.name, 2)]
    for r in rep["results"]:
        lat = r["latency"]
        assert lat["runs"] == 12 and len(r["samples_ms"]) == 12
        assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
        assert lat["min_ms"] <= lat["mean_ms"] and lat["fps"] == pytest.approx(1000 / lat["mean_ms"], rel=0.01)
        assert r["cold"]["create_ms"] > 0 and r["cold"]["first_invoke_ms"] > 0
        assert r["coverage"]["full"] and r["backend"] == "ai_edge_litert"
    assert rep["results"][0]["size_bytes"] == int8_model.stat().st_size
    dev = rep["device"]
    assert dev["cores"] >= 1 and dev["python"] and dev["ai_edge_litert"]
    assert rep["peak_rss_mb"] > 10
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 4 and float(rows[0]["p50_ms"]) == rep["results"][0]["latency"]["p50_ms"]
    ops = rep["results"][0]["coverage"]["total_ops"]
    assert f"XNNPACK {ops}/{ops}" in result.stdout


def test_pipeline_stages_on_a_video(int8_model: Path, video: Path) -> None:
    result = bench(str(int8_model), "--source", str(video), "--frames", "10", "--runs", "5", "--json", "-")
    assert result.returncode == 0, result.stderr
    rep = json.loads(result.stdout)
    (pipe,) = rep["pipeline"]
    stages = pipe["stages"]
    assert set(stages) == {"capture", "preprocess", "invoke", "postprocess", "end_to_end"}
    assert all(s["runs"] == 10 for s in stages.values())
    parts = sum(stages[k]["mean_ms"] for k in ("capture", "preprocess", "invoke", "postprocess"))
    assert stages["end_to_end"]["mean_ms"] == pytest.approx(parts, rel=0.05)


def test_duration_and_plot(int8_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "lat.png"
    result = bench(str(int8_model), "--duration", "0.5", "--plot", str(png), "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["settings"]["duration_s"] == 0.5 and rep["results"][0]["latency"]["runs"] >= 3


def test_bad_input(int8_model: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "c.tflite"
    corrupt.write_bytes(int8_model.read_bytes()[:4096])
    cases = [
        ((str(tmp_path / "missing.tflite"),), "does not exist"),
        ((str(corrupt),), "not a valid .tflite"),
        ((str(int8_model), "--threads", "0"), "--threads must be between 1 and 64"),
        ((str(int8_model), "--threads", "1,100000"), "--threads must be between 1 and 64"),
        ((str(int8_model), "--threads", "two"), "--threads takes numbers"),
        ((str(int8_model), "--delegate", "gpu"), "unknown delegate"),
        ((str(int8_model), "--delegate", "edgetpu:usb"), "Edge TPU"),
        ((str(int8_model), "--source", str(tmp_path / "none.mp4")), "does not exist"),
    ]
    for args, fragment in cases:
        result = bench(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.startswith("error:"), result.stderr
        assert fragment in result.stderr, (args, result.stderr)
