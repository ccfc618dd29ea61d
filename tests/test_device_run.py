"""``edgesqz run`` and ``edgesqz classify`` end to end, in subprocesses, with the real converted model.

The commands are run through the main ``edgesqz`` CLI when it has them registered, otherwise
through a Typer app that only holds ``edgesqz.device.cli.register`` (the same functions).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import video_frames

CLI_BOOT = ("import typer; from edgesqz.device.cli import register; "
            "app = typer.Typer(pretty_exceptions_enable=False); register(app); app()")
CLASSIFICATION_KEYS = {"schema", "kind", "source", "frame", "timestamp", "top_k", "latency_ms", "model"}
LATENCY_KEYS = {"preprocess", "inference", "postprocess", "end_to_end"}


def _cli_prefix() -> list[str]:
    try:
        from edgesqz import cli as main_cli

        names = {c.name or c.callback.__name__ for c in main_cli.app.registered_commands}
    except Exception:  # the main CLI is being edited or broken: test the device commands alone
        names = set()
    return ["-m", "edgesqz"] if {"run", "classify"} <= names else ["-c", CLI_BOOT]


CLI = _cli_prefix()


def edgesqz(*args: object, timeout: float = 90, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def popen(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def one_error_line(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode != 0, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, p.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def check_classification(obj: dict, k: int) -> None:
    assert set(obj) - {"image"} == CLASSIFICATION_KEYS, obj.keys()
    assert set(obj["model"]) == {"name", "sha256", "version"} and len(obj["model"]["sha256"]) == 12
    assert obj["schema"] == "edgesqz/1" and obj["kind"] == "classification"
    assert isinstance(obj["frame"], int) and obj["frame"] >= 0
    assert abs(obj["timestamp"] - time.time()) < 600
    top = obj["top_k"]
    assert len(top) == k
    assert all(set(p) == {"index", "label", "score"} for p in top)
    assert all(0 <= p["score"] <= 1 and 0 <= p["index"] < 1000 and p["label"] for p in top)
    assert [p["score"] for p in top] == sorted((p["score"] for p in top), reverse=True)
    lat = obj["latency_ms"]
    assert set(lat) == LATENCY_KEYS
    assert 0 < lat["inference"] < 5000 and 0 <= lat["preprocess"] < 5000 and lat["postprocess"] >= 0
    assert lat["inference"] <= lat["end_to_end"] < 30000


def check_summary(obj: dict, frames: int) -> None:
    assert obj["schema"] == "edgesqz/1" and obj["kind"] == "run_summary"
    assert obj["frames"] == frames
    assert obj["dropped"] >= 0 and obj["captured"] >= frames
    assert obj["fps_mean"] > 0 and obj["duration_s"] > 0
    for key in ("inference", "end_to_end"):
        lat = obj["latency_ms"][key]
        assert 0 < lat["p50"] <= lat["p90"]
    assert obj["backend"] == "ai_edge_litert" and obj["coverage"]["full"] is True


def write_video(path: Path, frames: int, photo: Path | None = None, fps: float = 30) -> Path:
    """640x480 frames panning over a photo (or noise), written with cv2.VideoWriter."""
    if photo is not None:
        scene = cv2.resize(cv2.imread(str(photo)), (900, 700))
    else:
        scene = np.random.default_rng(0).integers(0, 255, (700, 900, 3), dtype=np.uint8)
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if path.suffix == ".avi" else "mp4v"))
    writer = cv2.VideoWriter(str(path), fourcc, fps, (640, 480))
    assert writer.isOpened()
    for i in range(frames):
        x, y = (i * 3) % 260, (i * 2) % 220
        writer.write(np.ascontiguousarray(scene[y: y + 480, x: x + 640]))
    writer.release()
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory, photos_dir: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("videos")
    return {
        "coffee": write_video(tmp / "coffee.mp4", 40, photos_dir / "coffee.png"),
        "long": write_video(tmp / "long.avi", 300, photos_dir / "chelsea.png"),
    }


# --------------------------------------------------------------------------- run


def test_run_json_on_a_video(int8_model: Path, videos: dict[str, Path]) -> None:
    p = edgesqz("run", "--model", int8_model, "--source", videos["coffee"], "--json", "--top-k", "3", "--threads", 1)
    assert p.returncode == 0, p.stderr
    objs = jsonl(p.stdout)
    frames, summary = objs[:-1], objs[-1]
    assert len(frames) == 40
    for obj in frames:
        check_classification(obj, 3)
        assert obj["source"] == str(videos["coffee"])
    assert [o["frame"] for o in frames] == list(range(40))
    assert [o["timestamp"] for o in frames] == sorted(o["timestamp"] for o in frames)
    assert frames[0]["top_k"][0]["label"] == "espresso"
    check_summary(summary, 40)
    assert summary["dropped"] == 0 and summary["stopped_by"] == "end_of_source" and summary["threads"] == 1
    # stderr says which backend and what XNNPACK covers; stdout is JSON only
    assert "runtime: ai_edge_litert" in p.stderr and "XNNPACK: covers the whole graph" in p.stderr
    assert "40 frames in" in p.stderr and "dropped 0" in p.stderr


def test_run_live_source_drops_stale_frames(int8_model: Path, videos: dict[str, Path], tmp_path: Path) -> None:
    """The video played live at 1000 fps: the classifier cannot keep up, the newest frame wins."""
    out = tmp_path / "live.jsonl"
    p = edgesqz("run", "--model", int8_model, "--source", videos["long"], "--fps", 1000, "--threads", 1,
                "--output", out, "--top-k", 1)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n") >= 1  # human lines on stdout without --json
    objs = jsonl(out.read_text())
    frames, summary = objs[:-1], objs[-1]
    indices = [o["frame"] for o in frames]
    assert indices == sorted(set(indices))  # strictly increasing, with gaps
    check_summary(summary, len(frames))
    assert summary["dropped"] > 0 and summary["captured"] == 300
    assert summary["frames"] + summary["dropped"] == 300
    assert indices[-1] == 299


def test_run_max_frames_and_duration(int8_model: Path, videos: dict[str, Path]) -> None:
    p = edgesqz("run", "--model", int8_model, "--source", videos["long"], "--json", "--max-frames", 7)
    assert p.returncode == 0, p.stderr
    objs = jsonl(p.stdout)
    assert len(objs) == 8 and objs[-1]["stopped_by"] == "max_frames"
    t0 = time.perf_counter()
    p = edgesqz("run", "--model", int8_model, "--source", videos["long"], "--fps", 30, "--json", "--duration", 1.0)
    assert p.returncode == 0, p.stderr
    summary = jsonl(p.stdout)[-1]
    assert summary["stopped_by"] == "duration" and 10 <= summary["frames"] <= 35
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_with_a_summary(int8_model: Path, videos: dict[str, Path], sig: signal.Signals) -> None:
    proc = popen("run", "--model", int8_model, "--source", videos["long"], "--fps", 30, "--json")
    lines = []
    try:
        while len(lines) < 5:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    objs = jsonl("".join(lines) + rest)
    summary = objs[-1]
    assert summary["kind"] == "run_summary" and summary["stopped_by"] == sig.name
    assert summary["frames"] == len(objs) - 1 < 300
    assert [o["frame"] for o in objs[:-1]] == sorted(o["frame"] for o in objs[:-1])
    assert "frames in" in err and f"stopped by {sig.name}" in err


def test_run_record_is_readable(int8_model: Path, videos: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "annotated.mp4"
    p = edgesqz("run", "--model", int8_model, "--source", videos["coffee"], "--max-frames", 15, "--record", out,
                "--no-display")
    assert p.returncode == 0, p.stderr
    frames = video_frames(out)
    assert len(frames) == 15 and frames[0].shape == (480, 640, 3)
    original = cv2.VideoCapture(str(videos["coffee"])).read()[1]
    assert np.abs(frames[0][:30, :150].astype(int) - original[:30, :150]).mean() > 20  # the overlay is drawn
    assert np.abs(frames[0][-100:, -100:].astype(int) - original[-100:, -100:]).mean() < 12  # the rest is not


def test_run_on_the_shared_photos(int8_model: Path, photos_dir: Path) -> None:
    p = edgesqz("run", "--model", int8_model, "--source", photos_dir, "--json", "--top-k", 5)
    assert p.returncode == 0, p.stderr
    objs = jsonl(p.stdout)
    by_name = {Path(o["image"]).name: o for o in objs[:-1]}
    assert set(by_name) >= {"coffee.png", "chelsea.png", "grace_hopper.jpg"}
    for obj in by_name.values():
        check_classification(obj, 5)
    assert by_name["coffee.png"]["top_k"][0]["label"] == "espresso"
    assert by_name["chelsea.png"]["top_k"][0]["label"] in {"Egyptian cat", "tiger cat", "tabby"}
    assert "military uniform" in [t["label"] for t in by_name["grace_hopper.jpg"]["top_k"]]
    check_summary(objs[-1], len(by_name))


def test_run_uses_the_default_model(int8_model: Path, photos_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "latest.tflite").symlink_to(int8_model)
    p = edgesqz("run", "--source", photos_dir / "coffee.png", "--json", env={"EDGESQZ_HOME": str(home)})
    assert p.returncode == 0, p.stderr
    assert jsonl(p.stdout)[0]["top_k"][0]["label"] == "espresso"
    assert str(home / "models" / "latest.tflite") in p.stderr


# --------------------------------------------------------------------------- classify


def test_classify_table_and_json(int8_model: Path, photos_dir: Path) -> None:
    images = [photos_dir / "coffee.png", photos_dir / "chelsea.png", photos_dir / "grace_hopper.jpg"]
    p = edgesqz("classify", "--model", int8_model, *images, "--json", "--threads", 1)
    assert p.returncode == 0, p.stderr
    objs = jsonl(p.stdout)
    assert len(objs) == 3
    for obj in objs:
        check_classification(obj, 5)
    assert [o["frame"] for o in objs] == [0, 1, 2]
    assert objs[0]["top_k"][0]["label"] == "espresso"
    assert objs[1]["top_k"][0]["label"] in {"Egyptian cat", "tiger cat", "tabby"}
    assert "military uniform" in [t["label"] for t in objs[2]["top_k"]]
    table = edgesqz("classify", "--model", int8_model, images[0], "--top-k", 2)
    assert table.returncode == 0, table.stderr
    assert "coffee.png" in table.stdout and "espresso" in table.stdout and "consomme" in table.stdout


def test_classify_bad_image_is_reported_and_the_rest_still_classified(int8_model: Path, photos_dir: Path,
                                                                      tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    p = edgesqz("classify", "--model", int8_model, bad, photos_dir / "coffee.png", "--json")
    one_error_line(p, "cannot decode image", "broken.jpg")
    assert jsonl(p.stdout)[0]["top_k"][0]["label"] == "espresso"


# --------------------------------------------------------------------------- bad input


def test_error_no_camera_at_index_7(int8_model: Path) -> None:
    if Path("/dev/video7").exists():
        pytest.skip("this machine has a /dev/video7")
    one_error_line(edgesqz("run", "--model", int8_model, "--camera", 7), "no camera at index 7")


def test_error_unreadable_video(int8_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(1).bytes(20000))
    one_error_line(edgesqz("run", "--model", int8_model, "--source", bad), "cannot read video", "corrupt.mp4")
    one_error_line(edgesqz("run", "--model", int8_model, "--source", tmp_path / "nope.mp4"), "does not exist")


def test_error_missing_picamera2(int8_model: Path) -> None:
    try:
        import picamera2  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("picamera2 is installed here")
    one_error_line(edgesqz("run", "--model", int8_model, "--camera", "picamera2"), "Picamera2", "python3-picamera2")


def test_error_missing_edge_tpu(int8_model: Path, photos_dir: Path) -> None:
    for delegate in ("edgetpu", "edgetpu:usb", "edgetpu:pci:0"):
        p = edgesqz("classify", "--model", int8_model, photos_dir / "coffee.png", "--delegate", delegate)
        one_error_line(p, "Edge TPU")
    one_error_line(edgesqz("classify", "--model", int8_model, photos_dir / "coffee.png", "--delegate", "gpu"),
                   "unknown delegate")


def test_no_model_named_uses_the_installed_default(photos_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"EDGESQZ_HOME": str(tmp_path / "empty-home"), "EDGESQZ_MODEL": ""}
    for command in (["run", "--source", photos_dir, "--json"], ["classify", photos_dir / "coffee.png", "--json"]):
        result = edgesqz(*command, env=env)
        assert result.returncode == 0, result.stderr
        assert "the default model installed with edgesqz" in result.stderr
    # an install without the default model (a trimmed build) says how to make one
    from edgesqz.device import models

    monkeypatch.setenv("EDGESQZ_HOME", str(tmp_path / "empty-home"))
    monkeypatch.delenv("EDGESQZ_MODEL", raising=False)
    monkeypatch.setattr(models, "packaged_model", lambda: None)
    with pytest.raises(models.NoModelError, match="edgesqz convert --int8 --weights"):
        models.choose_model(None)


def test_error_bad_options(int8_model: Path, videos: dict[str, Path], tmp_path: Path) -> None:
    src = ["--model", int8_model, "--source", videos["coffee"]]
    one_error_line(edgesqz("run", *src, "--camera", 0, "--camera", "0"), "same camera")
    one_error_line(edgesqz("run", *src, "--threshold", 1.5), "threshold")
    one_error_line(edgesqz("run", *src, "--max-frames", 0), "--max-frames")
    one_error_line(edgesqz("run", *src, "--threads", 0), "--threads")
    one_error_line(edgesqz("run", *src, "--record", tmp_path / "x.gif"), "--record")
    one_error_line(edgesqz("run", *src, "--labels", tmp_path / "none.txt"), "does not exist")
    one_error_line(edgesqz("run", "--model", int8_model, "--camera", "usb"), "--camera takes N")
