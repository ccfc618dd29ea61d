"""Events in the JSON lines (``--json``), on the web preview (``--serve``) and the event options' errors.

Real model, real photos: coffee.png is "espresso", rocket.jpg is not.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from event_helpers import write_scenes
from serve_client import ServeRun, close_stream, get, is_jpeg, open_stream, read_events
from test_device_run import CLI, edgesqz, jsonl, one_error_line

from edgesqz.schema import KINDS

EVENT_KEYS = {"schema", "kind", "state", "id", "name", "label", "labels", "min_score", "device", "source", "clock",
              "timestamp", "start", "end", "duration_s", "frames", "first_frame", "last_frame", "peak_frame",
              "peak_score", "mean_score", "reason", "snapshot", "clip"}


@pytest.fixture(scope="module")
def video(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Espresso 2 s, then background 3 s."""
    return write_scenes(tmp_path_factory.mktemp("outputs") / "v.mp4",
                        [(photos_dir / "coffee.png", 60), (photos_dir / "rocket.jpg", 90)])


def test_event_lines_sit_between_the_frames_and_before_the_summary(int8_model: Path, video: Path) -> None:
    p = edgesqz("run", "--model", int8_model, "--source", video, "--fps", 30, "--threads", 1, "--json",
                "--event", "espresso", "--event", "rocket=pole,missile,projectile", "--event-end", 10)
    assert p.returncode == 0, p.stderr
    objs = jsonl(p.stdout)
    assert "event" in KINDS and objs[-1]["kind"] == "run_summary"
    events = [(i, o) for i, o in enumerate(objs) if o["kind"] == "event"]
    assert [(o["name"], o["state"]) for _, o in events] == [("espresso", "start"), ("rocket", "start"),
                                                            ("espresso", "end"), ("rocket", "end")]
    for i, event in events:
        assert set(event) == EVENT_KEYS
        before = objs[i - 1]
        if event["state"] == "start":  # right after the frame that confirmed it
            assert before["kind"] in ("classification", "event") and event["timestamp"] >= before["timestamp"] - 1e-6
            frame = next(o for o in reversed(objs[:i]) if o["kind"] == "classification")
            assert frame["timestamp"] == event["timestamp"] and frame["frame"] == event["last_frame"]
        else:  # ended by the end of the run (the hold time is longer than what was left)
            assert event["reason"] == "run_ended" and event["end"] is not None
    espresso = [o for _, o in events if o["name"] == "espresso"]
    assert espresso[0]["id"] == espresso[1]["id"] and espresso[0]["first_frame"] <= 3  # a live source may drop some
    assert 1.6 <= espresso[1]["duration_s"] <= 2.2 and espresso[1]["last_frame"] in range(50, 62)
    assert espresso[1]["label"] == "espresso" and 0.5 < espresso[1]["mean_score"] <= espresso[1]["peak_score"]
    assert "event: espresso started" in p.stderr and "event: espresso ended after" in p.stderr


def test_serve_lists_events_with_their_snapshots(int8_model: Path, video: Path, tmp_path: Path) -> None:
    run = ServeRun(CLI, "--model", int8_model, "--source", video, "--fps", 30, "--threads", 1, "--serve",
                   "127.0.0.1:0", "--event", "espresso", "--event-end", 1, output=tmp_path / "run.jsonl")
    try:
        run.wait_serving()
        conn, resp = open_stream(run.port, "/events", timeout=30)
        ended = None
        deadline = time.monotonic() + 60
        while ended is None and time.monotonic() < deadline:
            code, _, body = get(run.port, "/status")
            if code == 200:
                events = json.loads(body)["events"]
                ended = next((e for e in events if e["state"] == "end"), None)
            time.sleep(0.1)
        assert ended is not None and ended["snapshot_url"] == f"/snapshot/{ended['id']}.jpg"
        code, headers, jpeg = get(run.port, ended["snapshot_url"])
        assert code == 200 and headers["content-type"] == "image/jpeg" and is_jpeg(jpeg, (320, 240))
        assert get(run.port, "/snapshot/nope.jpg")[0] == 404
        assert get(run.port, "/snapshot/../../etc/passwd")[0] == 404
        page = get(run.port, "/")[2].decode()
        assert 'id="events"' in page and "snapshot_url" in page
        streamed = read_events(resp)
        close_stream(conn, resp)
    finally:
        code = run.stop(None)  # the video ends by itself (the event stream ended with it)
    assert code == 0, run.stderr
    kinds = [o["kind"] for o in streamed]
    assert kinds.count("event") == 2 and kinds[-1] == "run_summary"
    written = [o for o in jsonl((tmp_path / "run.jsonl").read_text()) if o["kind"] == "event"]
    assert [o for o in streamed if o["kind"] == "event"] == written  # the same objects as --output


@pytest.mark.parametrize(("args", "needle"), [
    (["--snapshot-dir", "snaps"], "--snapshot-dir needs at least one --event"),
    (["--webhook", "http://127.0.0.1:9/x"], "--webhook needs at least one --event"),
    (["--event", "espresso", "--keep", "3"], "--preroll, --keep and --max-disk need --snapshot-dir"),
    (["--event", "expresso"], "no label 'expresso'; did you mean 'espresso'"),
    (["--event", "espresso>=1.5"], "the score must be in (0, 1]"),
    (["--event", "espresso", "--event", "espresso"], "both called 'espresso'"),
    (["--event", "espresso", "--event-end", "-1"], "--event-end must be"),
    (["--event", "espresso", "--mqtt", "http://broker"], "--mqtt takes mqtt://"),
    (["--event", "espresso", "--mqtt-discovery", "off"], "--mqtt-discovery needs --mqtt"),
    (["--event", "espresso", "--webhook", "ftp://x"], "--webhook takes an http:// or https:// URL"),
    (["--mqtt", "mqtt://127.0.0.1:9", "--device-id", "Kitchen Pi"], "--device-id 'Kitchen Pi'"),
    (["--event", "espresso", "--snapshot-dir", "snaps", "--keep", "0"], "--keep must be >= 1"),
])
def test_option_errors_are_one_line(int8_model: Path, video: Path, tmp_path: Path, args: list[str],
                                    needle: str) -> None:
    args = [str(tmp_path / a) if a == "snaps" else a for a in args]
    one_error_line(edgesqz("run", "--model", int8_model, "--source", video, *args), needle)


def test_events_import_no_tensorflow_or_torch(int8_model: Path, video: Path, tmp_path: Path) -> None:
    from test_device_imports import CLI_CODE, _imports

    found = _imports(CLI_CODE, "run", "--model", int8_model, "--source", video, "--max-frames", 30, "--json",
                     "--event", "espresso", "--event-start", 0, "--snapshot-dir", tmp_path, "--clip-dir", tmp_path)
    assert found == {"attempted": [], "loaded": []}
    assert any(p.suffix == ".mp4" for p in tmp_path.iterdir())  # the event happened, its clip was written
