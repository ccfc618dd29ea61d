"""``--webhook URL`` against a local HTTP server: normal, slow, failing and refusing endpoints.

Proves: each event start and end is POSTed as its JSON record, in order; a failing endpoint is
retried with back-off until it answers; a 4xx other than 408/429 is not retried; the queue is
bounded; a slow endpoint never slows the camera loop (the pipeline keeps a 30 fps camera's rate).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from event_helpers import CAT, Run, events_of, jsonl, write_scenes
from test_device_run import CLI

from edgesqz.device.classifier import Classifier
from edgesqz.device.eventsink import EventSink
from edgesqz.device.pipeline import Pipeline
from edgesqz.device.sources import open_source
from edgesqz.device.webhook import WebhookOutput
from edgesqz.errors import EdgesqzError


class Hooks(ThreadingHTTPServer):
    """Records POSTs. Paths: /ok; /slow (answers after 2 s); /flaky (503 twice per body, then 200); /bad (400)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.received: list[tuple[str, float, dict]] = []
        self.attempts: dict[bytes, int] = {}
        self.lock = threading.Lock()
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), Handler)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def bodies(self, path: str) -> list[dict]:
        with self.lock:
            return [body for p, _, body in self.received if p == path]


class Handler(BaseHTTPRequestHandler):
    server: Hooks

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.headers["Content-Type"] == "application/json"
        with self.server.lock:
            tries = self.server.attempts[data] = self.server.attempts.get(data, 0) + 1
        if self.path == "/slow":
            self.server.release.wait(2.0)
        if self.path == "/flaky" and tries <= 2:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status = 400 if self.path == "/bad" else 200
        if status == 200:
            with self.server.lock:
                self.server.received.append((self.path, time.time(), json.loads(data)))
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def hooks() -> Iterator[Hooks]:
    server = Hooks()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def video(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    coffee, cat, rocket = photos_dir / "coffee.png", photos_dir / "chelsea.png", photos_dir / "rocket.jpg"
    return write_scenes(tmp_path_factory.mktemp("hook") / "v.mp4", [(coffee, 45), (rocket, 45), (cat, 45),
                                                                     (rocket, 45)] * 2)


def records(n: int) -> list[dict]:
    return [{"schema": "edgesqz/1", "kind": "event", "id": f"e{i}", "state": "start"} for i in range(n)]


def test_events_are_posted_in_order(int8_model: Path, video: Path, hooks: Hooks, tmp_path: Path) -> None:
    out = tmp_path / "run.jsonl"
    run = Run(CLI, "--model", int8_model, "--source", video, "--fps", 30, "--threads", 1, "--event", "espresso",
              "--event", CAT, "--event-end", 1, "--webhook", hooks.url("/ok"), "--output", out)
    assert run.wait(120) == 0, run.stderr
    expected = events_of(jsonl(out))
    assert len(expected) == 8 and hooks.bodies("/ok") == expected
    assert "event: webhook POST http://127.0.0.1" in run.stderr and "Traceback" not in run.stderr


def test_a_failing_endpoint_is_retried_until_it_answers(hooks: Hooks) -> None:
    out = WebhookOutput(hooks.url("/flaky"), backoff=(0.05, 0.2))
    out.open()
    for rec in records(3):
        out.event(rec)
    out.close()
    assert [b["id"] for b in hooks.bodies("/flaky")] == ["e0", "e1", "e2"]  # in order, each after two 503s
    assert out.attempts == 9 and out.delivered == 3 and out.failed == 0


def test_refusals_and_unreachable_endpoints_give_up(hooks: Hooks) -> None:
    bad = WebhookOutput(hooks.url("/bad"), backoff=(0.01, 0.01))
    bad.open()
    bad.event(records(1)[0])
    bad.close()
    assert (bad.attempts, bad.failed, bad.delivered) == (1, 1, 0)  # a 400 is not retried
    gone = WebhookOutput("http://127.0.0.1:9/none", retries=2, backoff=(0.01, 0.02), timeout=1)
    gone.open()
    gone.event(records(1)[0])
    gone.close()
    assert (gone.attempts, gone.failed) == (3, 1)
    with pytest.raises(EdgesqzError, match="--webhook takes an http"):
        WebhookOutput("ftp://example.org/x")


def test_a_stalled_endpoint_never_blocks_and_the_queue_is_bounded(hooks: Hooks) -> None:
    out = WebhookOutput(hooks.url("/slow"), max_queued=5, drain_s=0.5, timeout=3)
    out.open()
    t0 = time.perf_counter()
    for rec in records(200):
        out.event(rec)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.2, elapsed  # 200 events handed over in well under a frame each
    assert len(out._queue) <= 5 and out.dropped >= 194
    hooks.release.set()
    out.close()


def test_a_slow_endpoint_does_not_slow_the_camera_loop(int8_model: Path, video: Path, hooks: Hooks) -> None:
    """The same camera-paced video with no webhook and with one that takes 2 s per event.

    What matters is that the camera loop never waits for the endpoint: each EventSink.write (which
    hands the events over) is timed, and must stay far below the endpoint's 2 s. The rates of the
    two runs are compared loosely: on a shared machine they move by several % from run to run.
    """
    classifier = Classifier(int8_model, threads=1)

    class TimedEvents(EventSink):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self.write_s: list[float] = []

        def write(self, result: object) -> None:
            t0 = time.perf_counter()
            super().write(result)  # type: ignore[arg-type]
            self.write_s.append(time.perf_counter() - t0)

    def one(outputs: list) -> tuple[float, TimedEvents]:
        sink = TimedEvents(["espresso", CAT], outputs, end_s=1.0, device="t")
        summary = Pipeline(open_source(source=str(video), fps=30), classifier, [sink], handle_signals=False).run()
        return summary.fps, sink

    base_fps, _ = one([])
    slow = WebhookOutput(hooks.url("/slow"), drain_s=0.2, timeout=3)
    fps, sink = one([slow])
    assert sink.events_started == 4 and slow.attempts >= 1
    assert max(sink.write_s) < 0.25, max(sink.write_s)  # the 2 s requests never held up a frame
    assert fps >= 0.85 * base_fps and fps > 25, (fps, base_fps)
    assert len(hooks.bodies("/slow")) < 8  # it really was slow: not every event got through during the run
