"""The ``--serve`` page in a real headless browser: Debian's chromium (``/usr/bin/chromium``) driven by Playwright.

Runs ``edgesqz run --serve`` on a synthetic video of the shared photos, opens the page, waits for
frames and results, and checks that the top-1 label the page shows is the top-1 of the same frame
in the run's JSON lines. Screenshots go to ``test-artifacts/`` (desktop and phone widths). Without
chromium or Playwright the test skips, except in CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_client import ServeRun, write_video
from test_device_run import CLI, jsonl

CHROMIUM = Path(os.environ.get("EDGESQZ_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
TOKEN = "browser-token"
PER_PHOTO = 75  # frames of each photo in turn: 5 s at 15 fps
TOP1 = {  # what SqueezeNet may call each photo's frames (panning crops of it)
    "coffee.png": {"espresso", "consomme", "cup", "coffee mug", "eggnog", "soup bowl", "chocolate sauce"},
    "chelsea.png": {"Egyptian cat", "tiger cat", "tabby", "lynx", "Persian cat"},
}
SHOWN = """() => {
  const top = document.getElementById("top");
  const first = top.querySelector("li .label");
  return {frame: Number(top.dataset.frame), label: first && first.textContent,
          state: document.getElementById("state").textContent, fps: document.getElementById("fps").textContent,
          model: document.getElementById("model").textContent, device: document.getElementById("device").textContent,
          image: document.getElementById("stream").naturalWidth,
          overflow: document.documentElement.scrollWidth - window.innerWidth};
}"""


def _playwright() -> Any:
    """playwright.sync_api.sync_playwright, or skip (fail in CI) with what is missing."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package (pip install -e '.[dev]')"
    if not CHROMIUM.exists():
        missing = f"Debian's chromium at {CHROMIUM} (apt-get install chromium)"
    if missing is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the browser test: install {missing}")
        pytest.skip(f"needs {missing}")
    return sync_playwright


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_playwright = _playwright()
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def run(int8_model: Path, photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeRun]:
    tmp = tmp_path_factory.mktemp("browser")
    photos = [photos_dir / name for name in TOP1]
    video = write_video(tmp / "photos.mp4", photos, frames=8 * PER_PHOTO, per_photo=PER_PHOTO)
    served = ServeRun(CLI, "--model", int8_model, "--source", video, "--fps", 15, "--threads", 1, "--serve",
                      "127.0.0.1:0", "--token", TOKEN, output=tmp / "run.jsonl")
    try:
        yield served.wait_serving()
    finally:
        served.stop()


def _shown(page: Any) -> dict[str, Any]:
    return page.evaluate(SHOWN)


def _save(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / name
    page.screenshot(path=str(target))
    return target


def test_the_page_shows_the_stream_and_the_json_top1(browser: Any, run: ServeRun) -> None:
    assert run.url.endswith(f"?token={TOKEN}")
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.goto(run.url)
    page.wait_for_function("() => document.getElementById('stream').naturalWidth === 640"
                           " && document.querySelector('#top li .label') !== null"
                           " && document.getElementById('model').children.length > 0", timeout=60_000)
    samples = []
    for _ in range(4):  # across the photos: the shown frame and label, read in one go
        samples.append(_shown(page))
        page.wait_for_timeout(1500)
    written = {o["frame"]: o for o in jsonl(run.output.read_text().rsplit("\n", 1)[0]) if o["kind"] == "classification"}
    for shown in samples:
        expected = written[shown["frame"]]["top_k"][0]["label"]
        assert shown["label"] == expected, shown
        photo = list(TOP1)[(shown["frame"] // PER_PHOTO) % len(TOP1)]
        assert shown["label"] in TOP1[photo], (photo, shown)
    last = samples[-1]
    assert last["state"] == "live" and float(last["fps"]) > 5 and last["image"] == 640
    assert "squeezenet1_1-int8.tflite" in last["model"] and "ai_edge_litert" in last["model"]
    assert "cores" in last["device"] and last["overflow"] <= 0
    assert len({s["frame"] for s in samples}) == len(samples)  # it is live
    _save(page, "serve.png")
    page.close()
    assert problems == []


def test_the_page_fits_a_phone_and_shows_the_end_of_the_run(browser: Any, run: ServeRun) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                            has_touch=True)
    page.goto(run.url)
    page.wait_for_function("() => document.getElementById('stream').naturalWidth === 640"
                           " && document.querySelector('#top li .label') !== null", timeout=60_000)
    shown = _shown(page)
    assert shown["overflow"] <= 0, "the page scrolls sideways on a phone"
    box = page.locator("#stream").bounding_box()
    assert box is not None and 300 < box["width"] <= 390
    _save(page, "serve-phone.png")
    assert run.stop() == 0, run.stderr
    page.wait_for_function("() => document.getElementById('state').textContent.startsWith('ended')", timeout=20_000)
    assert "SIGINT" in _shown(page)["state"]
    page.close()

