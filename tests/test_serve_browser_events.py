"""The ``--serve`` page lists recent events with their snapshots, in Debian's headless chromium (Playwright).

``edgesqz run --serve --event espresso`` on a video of the shared photos (espresso, then not, twice):
the page must show both events, newest first, each with its snapshot image loaded, the one going on
marked as such. Skips like tests/test_serve_browser.py without chromium (fails in CI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from event_helpers import write_scenes
from serve_client import ServeRun
from test_device_run import CLI, jsonl
from test_serve_browser import ARTIFACTS, browser  # noqa: F401  (the fixture: headless chromium)

EVENTS = """() => [...document.querySelectorAll('#events li')].map((li) => {
  const img = li.querySelector('img');
  return {id: li.dataset.id, state: li.dataset.state, name: li.querySelector('.name').textContent,
          meta: li.querySelector('.meta').textContent, image: img ? img.naturalWidth : 0};
})"""


def test_the_page_lists_events_with_their_snapshots(browser: Any, int8_model: Path, photos_dir: Path,  # noqa: F811
                                                    tmp_path: Path) -> None:
    coffee, rocket = photos_dir / "coffee.png", photos_dir / "rocket.jpg"
    video = write_scenes(tmp_path / "v.mp4", [(coffee, 60), (rocket, 75), (coffee, 60), (rocket, 300)])
    run = ServeRun(CLI, "--model", int8_model, "--source", video, "--fps", 30, "--threads", 1, "--serve",
                   "127.0.0.1:0", "--event", "espresso", "--event-end", 1, output=tmp_path / "run.jsonl")
    try:
        run.wait_serving()
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
        page.goto(run.url)
        page.wait_for_function("() => { const li = document.querySelectorAll('#events li');"
                               " return li.length === 2 && [...li].every((x) => x.dataset.state === 'end'"
                               " && x.querySelector('img') && x.querySelector('img').naturalWidth === 320); }",
                               timeout=60_000)
        shown = page.evaluate(EVENTS)
        assert page.locator("#events-box").is_visible()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve-events.png"))
        page.close()
    finally:
        code = run.stop()
    assert code == 0, run.stderr
    ended = [o for o in jsonl(run.output.read_text()) if o["kind"] == "event" and o["state"] == "end"]
    assert [s["id"] for s in shown] == [o["id"] for o in reversed(ended)]  # newest first
    assert all(s["name"].startswith("espresso") and "espresso" in s["meta"] for s in shown)
    assert problems == []
