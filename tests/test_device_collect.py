"""``run --collect`` and the hot model swap, on real videos of real photos with the installed default model.

Collection: the policies (every T seconds, an unsure model), near-duplicates skipped, the folder's bounds
(the oldest unsorted image goes, labelled ones stay), the page's "save as" control over real HTTP (token,
header), and the folder's layout as ``edgesqz train`` reads it. Hot swap: a model file replaced while
``run`` plays a video live at 30 FPS is checked and used between two frames (frame numbers continuous,
every line names its model), and a model for another input is refused while the old one goes on.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from event_helpers import jsonl
from serve_client import ServeRun
from test_device_run import CLI, edgesqz, one_error_line

from edgesqz.device.collect import Collector, CollectPolicy, check_label, dhash, manifest
from edgesqz.device.models import packaged_model
from edgesqz.device.results import Result
from edgesqz.device.sources import Frame
from edgesqz.errors import EdgesqzError


@pytest.fixture(scope="module")
def model() -> Path:
    path = packaged_model()
    if path is None:
        pytest.skip("no installed default model")
    return path


@pytest.fixture(scope="module")
def video(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Coffee, then the cat, then the rocket: 20 frames each, panning so frames are not identical."""
    path = tmp_path_factory.mktemp("collect") / "three.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 480))
    for name in ("coffee.png", "chelsea.png", "rocket.jpg"):
        image = cv2.resize(cv2.imread(str(photos_dir / name)), (800, 600))
        for i in range(20):
            writer.write(np.ascontiguousarray(image[60:540, i * 4:i * 4 + 640]))
    writer.release()
    return path


def test_collect_every_and_unsure_with_near_duplicates_skipped(model: Path, video: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    p = edgesqz("run", "--model", model, "--source", video, "--fps", 30, "--threads", 1, "--collect", folder,
                "--collect-every", 0.3, "--collect-unsure", 0.05, "--json")
    assert p.returncode == 0, p.stderr
    lines = manifest(folder)
    files = sorted((folder / "_unsorted").glob("*.jpg"))
    assert 3 <= len(lines) == len(files) <= 12, (len(lines), p.stderr)
    assert {line["reason"] for line in lines} <= {"every", "unsure"} and all(line["label"] is None for line in lines)
    first = lines[0]
    assert first["kind"] == "collected" and first["file"].startswith("_unsorted/") and first["model"]["sha256"]
    assert first["top_k"][0]["label"] in {"espresso", "consomme", "cup", "coffee mug", "eggnog"}
    assert all(cv2.imread(str(f)).shape == (480, 640, 3) for f in files)
    # a still scene saved every 0.1 s: near-duplicates are skipped
    still = tmp_path / "still.mp4"
    frame = cv2.imread(str(files[0]))
    writer = cv2.VideoWriter(str(still), cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 480))
    for _ in range(45):
        writer.write(frame)
    writer.release()
    p = edgesqz("run", "--model", model, "--source", still, "--fps", 30, "--collect", tmp_path / "still",
                "--collect-every", 0.1, "--json")
    assert p.returncode == 0 and len(manifest(tmp_path / "still")) == 1
    assert "near-duplicates skipped" in p.stderr


def _result(image: np.ndarray, index: int, camera: str | None = None) -> Result:
    frame = Frame(image=image, index=index, timestamp=1_800_000_000 + index, captured=0.0)
    scores = np.full(10, 0.1, np.float32)
    return Result(source="test", frame=frame, seq=index, top_k=[], scores=scores, latency_ms={}, fps=0.0,
                  camera=camera)


def test_the_folder_is_bounded_and_labelled_images_are_never_deleted(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    collector = Collector(tmp_path, CollectPolicy(every_s=0.06, max_files=4, duplicate_bits=0), say=lambda m: None)
    collector.open(None)
    images = [rng.integers(0, 255, (120, 160, 3), np.uint8) for _ in range(8)]
    collector.write(_result(images[0], 0))
    time.sleep(0.2)
    collector.save_as("door open")  # labelled
    for i, image in enumerate(images[1:], 1):
        time.sleep(0.08)
        collector.write(_result(image, i))
    collector.close(None)
    unsorted = sorted((tmp_path / "_unsorted").glob("*.jpg"))
    labelled = list((tmp_path / "door open").glob("*.jpg"))
    assert len(labelled) == 1 and len(unsorted) == 3 and collector.deleted >= 4
    assert unsorted[-1].name.startswith("20270115T") and "T080007" in unsorted[-1].name  # the newest kept
    for bad in ("", "../x", "_unsorted", "a/b", "x" * 65):
        with pytest.raises(EdgesqzError, match="label"):
            check_label(bad)
    assert dhash(images[0]) == dhash(images[0].copy()) and dhash(images[0]) != dhash(images[1])


def test_the_page_saves_the_current_frame_as_a_label(model: Path, video: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    run = ServeRun(CLI, "--model", model, "--source", video, "--loop", "--fps", 15, "--threads", 1, "--serve",
                   "127.0.0.1:0", "--token", "tok", "--collect", folder, "--collect-every", 3600)
    try:
        run.wait_serving()
        base = f"http://127.0.0.1:{run.port}/collect"

        def post(query: str, headers: dict[str, str]) -> tuple[int, str]:
            request = urllib.request.Request(f"{base}?{query}", method="POST", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        time.sleep(1.0)
        assert post("label=cup", {"X-Edgesqz": "collect"})[0] == 401  # no token
        assert post("label=cup&token=tok", {})[0] == 403  # no header: a cross-site form cannot save
        assert post("label=..%2Fx&token=tok", {"X-Edgesqz": "collect"})[0] == 400
        status, body = post("label=cup&token=tok", {"X-Edgesqz": "collect"})
        assert status == 200 and json.loads(body)["saved"].startswith("cup/")
        with urllib.request.urlopen(f"http://127.0.0.1:{run.port}/status?token=tok", timeout=10) as response:
            assert json.loads(response.read())["collect"]["labels"] == ["cup"]
    finally:
        run.stop()
    assert len(list((folder / "cup").glob("*.jpg"))) == 1
    assert [line["reason"] for line in manifest(folder) if line["label"] == "cup"] == ["page"]


def test_collect_options_need_collect(model: Path, video: Path) -> None:
    one_error_line(edgesqz("run", "--model", model, "--source", video, "--collect-every", 1), "needs --collect DIR")
    one_error_line(edgesqz("run", "--model", model, "--source", video, "--collect", "/tmp/x", "--collect-every",
                           "nan"), "--collect-every")
    one_error_line(edgesqz("run", "--model", model, "--source", video, "--collect", "/tmp/x", "--collect-events"),
                   "--collect-events needs")


# --------------------------------------------------------------------------- hot swap


def test_a_replaced_model_is_checked_and_swapped_between_two_frames(model: Path, video: Path, tmp_path: Path,
                                                                     float_model: Path, int8_model: Path) -> None:
    live = tmp_path / "model.tflite"
    shutil.copy(model, live)
    out = tmp_path / "run.jsonl"
    run = ServeRun(CLI, "--model", live, "--source", video, "--loop", "--fps", 30, "--threads", 1, "--duration", 9,
                   output=out)
    try:
        time.sleep(2.5)
        (tmp_path / "float.tmp").write_bytes(float_model.read_bytes())
        (tmp_path / "float.tmp").replace(live)  # another input (float32): refused, the old model goes on
        time.sleep(2.5)
        (tmp_path / "int8.tmp").write_bytes(int8_model.read_bytes())
        (tmp_path / "int8.tmp").replace(live)  # the same input, other weights: swapped in
        assert run.stop(None, timeout=60) == 0, run.stderr
    finally:
        run.stop()
    rows = [o for o in jsonl(out) if o["kind"] == "classification"]
    shas = [r["model"]["sha256"] for r in rows]
    old, new = shas[0], shas[-1]
    assert old != new and set(shas) == {old, new}
    switch = shas.index(new)
    assert shas[switch:] == [new] * (len(shas) - switch)  # one switch, between two frames
    frames = [r["frame"] for r in rows]
    assert frames[switch] == frames[switch - 1] + 1  # no frame lost at the switch
    assert "refused, the running model goes on: it takes another input" in run.stderr
    assert "swapped in" in run.stderr and "without stopping" in run.stderr
