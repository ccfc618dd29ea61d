"""The ``--serve`` page with two cameras and zones, in Debian's headless chromium (Playwright).

``edgesqz run --serve`` on two videos (one with two zones: coffee left, cat right; one whole frame) and a
third camera that never opens: the page must list every zone's label (the JSON's), show a stream as
wide as the two-tile mosaic, and list the cameras with their states. Skips like test_serve_browser.py
without chromium (fails in CI).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from serve_client import ServeRun
from test_device_run import CLI
from test_serve_browser import ARTIFACTS, browser  # noqa: F401  (the fixture: headless chromium)

ZONES = """() => Object.fromEntries([...document.querySelectorAll('#top li')].map((li) =>
  [li.dataset.zone, li.querySelector('.label').textContent]))"""


def _video(path: Path, left: np.ndarray, right: np.ndarray, frames: int) -> Path:
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:, :320] = cv2.resize(left, (320, 480))
    frame[:, 320:] = cv2.resize(right, (320, 480))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 480))
    for _ in range(frames):
        writer.write(frame)
    writer.release()
    return path


def test_the_page_shows_every_camera_and_zone(browser: Any, int8_model: Path, photos_dir: Path,  # noqa: F811
                                              tmp_path: Path) -> None:
    coffee, cat, rocket = (cv2.imread(str(photos_dir / n)) for n in ("coffee.png", "chelsea.png", "rocket.jpg"))
    desk = _video(tmp_path / "desk.mp4", coffee, cat, 90)
    shed = _video(tmp_path / "shed.mp4", rocket, rocket, 90)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    run = ServeRun(CLI, "--model", int8_model, "--source", f"desk={desk}", "--source", f"shed={shed}",
                   "--source", f"gate=rtsp://127.0.0.1:{dead}/x", "--reconnect", "1", "--loop", "--fps", 10,
                   "--threads", 1, "--zone", "desk/left=0,0,0.5,1", "--zone", "desk/right=0.5,0,0.5,1",
                   "--serve", "127.0.0.1:0")
    try:
        run.wait_serving()
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
        page.goto(run.url)
        page.wait_for_function("() => document.querySelectorAll('#top li').length === 3"
                               " && document.getElementById('stream').naturalWidth === 1280"
                               " && document.getElementById('device').textContent.includes('unavailable')",
                               timeout=60_000)
        shown = page.evaluate(ZONES)
        assert set(shown) == {"desk/left", "desk/right", "shed"}, shown
        assert any(c in shown["desk/left"] for c in ("espresso", "consomme", "cup")), shown
        assert any(c in shown["desk/right"] for c in ("cat", "tabby", "lynx")), shown
        device = page.evaluate("() => document.getElementById('device').textContent")
        assert "camera desk" in device and "zones left, right" in device and "camera gate" in device
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve-zones.png"))
        page.close()
        assert problems == []
    finally:
        run.stop()


def test_the_page_saves_the_frame_as_a_label(browser: Any, int8_model: Path, photos_dir: Path,  # noqa: F811
                                             tmp_path: Path) -> None:
    coffee, cat = (cv2.imread(str(photos_dir / n)) for n in ("coffee.png", "chelsea.png"))
    desk = _video(tmp_path / "desk.mp4", coffee, cat, 60)
    data = tmp_path / "data"
    run = ServeRun(CLI, "--model", int8_model, "--source", f"desk={desk}", "--loop", "--fps", 10, "--threads", 1,
                   "--zone", "left=0,0,0.5,1", "--zone", "right=0.5,0,0.5,1", "--serve", "127.0.0.1:0", "--token",
                   "tok", "--collect", data, "--collect-every", 3600)
    try:
        run.wait_serving()
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.goto(run.url)
        page.wait_for_function("() => !document.getElementById('collect').hidden"
                               " && document.querySelectorAll('#collect-zone option').length === 2", timeout=60_000)
        page.fill("#collect-label", "my cup")
        page.select_option("#collect-zone", "desk/left")
        page.click("#collect button")
        page.wait_for_function("() => document.getElementById('collect-result').textContent.startsWith('saved')",
                               timeout=30_000)
        shown = page.evaluate("() => document.getElementById('collect-result').textContent")
        page.close()
        assert problems == []
    finally:
        run.stop()
    saved = list((data / "my cup").glob("*.jpg"))
    assert len(saved) == 1 and shown == f"saved my cup/{saved[0].name}"
    assert saved[0].name.endswith("-desk-left.jpg") and cv2.imread(str(saved[0])).shape == (480, 320, 3)
