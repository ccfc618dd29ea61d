"""edgesqz.device.pipeline and sinks, in-process, with the real model on synthetic videos."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import video_frames

from edgesqz.device.classifier import Classifier
from edgesqz.device.pipeline import Pipeline
from edgesqz.device.results import LatencyStats, Result
from edgesqz.device.sinks import JsonLinesSink, Sink, VideoRecordSink, annotate, display_status
from edgesqz.device.sources import Frame, open_source
from edgesqz.errors import EdgesqzError


@pytest.fixture(scope="module")
def classifier(int8_model: Path) -> Classifier:
    return Classifier(int8_model, threads=1)


def _scene() -> np.ndarray:
    shared = os.environ.get("EDGESQZ_SHARED")
    path = Path(shared) / "data" / "photos" / "coffee.png" if shared else None
    if path is not None and path.exists():
        return cv2.imread(str(path))
    rng = np.random.default_rng(3)
    return rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pan_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 frames of 640x480 panning over a photo, written with cv2.VideoWriter (mp4v)."""
    path = tmp_path_factory.mktemp("pipe") / "pan.mp4"
    scene = cv2.resize(_scene(), (800, 600))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 480))
    for i in range(30):
        writer.write(np.ascontiguousarray(scene[2 * i: 2 * i + 480, 3 * i: 3 * i + 640]))
    writer.release()
    return path


class Collect(Sink):
    def __init__(self, stop_after: int | None = None) -> None:
        self.results: list[Result] = []
        self.summary = None
        self.closed = False
        self.stop_after = stop_after

    def write(self, result: Result) -> None:
        self.results.append(result)
        if self.stop_after is not None and len(self.results) >= self.stop_after:
            self.stop_requested, self.stop_reason = True, "collector"

    def close(self, summary: object) -> None:
        self.summary, self.closed = summary, True


def test_pipeline_classifies_every_frame_of_a_video(classifier: Classifier, pan_video: Path) -> None:
    sink = Collect()
    summary = Pipeline(open_source(source=str(pan_video)), classifier, [sink], top_k=3, handle_signals=False).run()
    assert sink.closed and sink.summary is summary
    assert summary.frames == summary.captured == 30 and summary.dropped == 0
    assert summary.stopped_by == "end_of_source"
    assert [r.frame.index for r in sink.results] == list(range(30))
    assert [r.seq for r in sink.results] == list(range(30))
    if os.environ.get("EDGESQZ_SHARED"):
        assert sink.results[0].top_k[0]["label"] == "espresso"
    for r in sink.results:
        assert len(r.top_k) == 3
        assert r.latency_ms["inference"] > 0 and r.latency_ms["end_to_end"] >= r.latency_ms["inference"]
        assert r.frame.input is None  # released after inference
    assert summary.fps > 0 and summary.duration_s > 0
    inf = summary.latency["inference"].to_dict()
    assert 0 < inf["p50"] <= inf["p90"]


def test_reader_thread_prepares_exactly_what_the_classifier_would(classifier: Classifier, pan_video: Path) -> None:
    direct = [classifier.scores(img).scores for img in video_frames(pan_video)]
    sink = Collect()
    Pipeline(open_source(source=str(pan_video)), classifier, [sink], handle_signals=False).run()
    assert len(direct) == len(sink.results)
    for a, r in zip(direct, sink.results, strict=True):
        np.testing.assert_array_equal(a, r.scores)


def test_limits_threshold_and_sink_stop(classifier: Classifier, pan_video: Path) -> None:
    s = Pipeline(open_source(source=str(pan_video)), classifier, [Collect()], max_frames=5, handle_signals=False).run()
    assert s.frames == 5 and s.stopped_by == "max_frames"
    sink = Collect(stop_after=4)
    s = Pipeline(open_source(source=str(pan_video)), classifier, [sink], handle_signals=False).run()
    assert s.frames == 4 and s.stopped_by == "collector"
    sink = Collect()
    Pipeline(open_source(source=str(pan_video)), classifier, [sink], top_k=10, threshold=0.05, max_frames=3,
             handle_signals=False).run()
    for r in sink.results:
        assert 1 <= len(r.top_k) < 10 and all(p["score"] >= 0.05 for p in r.top_k)
    # paced as a 30 fps camera for 0.5 s
    s = Pipeline(open_source(source=str(pan_video), fps=30), classifier, [Collect()], duration=0.5,
                 handle_signals=False).run()
    assert s.stopped_by == "duration" and 5 <= s.frames <= 17
    with pytest.raises(EdgesqzError, match="--max-frames"):
        Pipeline(open_source(source=str(pan_video)), classifier, max_frames=0)


def test_stop_from_another_thread(classifier: Classifier, pan_video: Path) -> None:
    pipeline = Pipeline(open_source(source=str(pan_video), fps=30), classifier, [], handle_signals=False)

    class StopSoon(Sink):
        def write(self, result: Result) -> None:
            if result.seq == 2:
                import threading

                threading.Thread(target=pipeline.stop, args=("remote",)).start()

    pipeline.sinks.append(StopSoon())
    summary = pipeline.run()
    assert summary.stopped_by == "remote" and 3 <= summary.frames <= 6


def test_json_lines_sink(classifier: Classifier, pan_video: Path, tmp_path: Path) -> None:
    stream = io.StringIO()
    out = tmp_path / "r.jsonl"
    Pipeline(open_source(source=str(pan_video)), classifier, [JsonLinesSink(stream), JsonLinesSink(out)],
             max_frames=4, handle_signals=False).run()
    lines = stream.getvalue().splitlines()
    assert lines == out.read_text().splitlines()
    objs = [json.loads(line) for line in lines]
    assert [o["kind"] for o in objs] == ["classification"] * 4 + ["run_summary"]
    assert all(o["schema"] == "edgesqz/1" for o in objs)
    with pytest.raises(EdgesqzError, match="cannot write"):
        JsonLinesSink(tmp_path / "no" / "such" / "dir.jsonl").open(None)


def test_record_sink_writes_annotated_video(classifier: Classifier, pan_video: Path, tmp_path: Path) -> None:
    out = tmp_path / "annotated.avi"
    sink = VideoRecordSink(out)
    Pipeline(open_source(source=str(pan_video)), classifier, [sink], max_frames=12, handle_signals=False).run()
    cap = cv2.VideoCapture(str(out))
    assert cap.isOpened() and cap.get(cv2.CAP_PROP_FPS) == pytest.approx(30)
    frames = video_frames(out)
    assert len(frames) == 12 and frames[0].shape == (480, 640, 3)
    with pytest.raises(EdgesqzError, match=r"use a \.mp4"):
        VideoRecordSink(tmp_path / "x.gif")
    with pytest.raises(EdgesqzError, match="does not exist"):
        VideoRecordSink(tmp_path / "missing" / "x.mp4")


def test_annotate_draws_on_a_copy() -> None:
    image = np.full((480, 640, 3), 200, np.uint8)
    frame = Frame(image=image, index=0, timestamp=0.0, captured=0.0)
    result = Result(source="t", frame=frame, seq=0, top_k=[{"index": 1, "label": "espresso", "score": 0.84}],
                    scores=np.zeros(2, np.float32), latency_ms={"inference": 5.0, "end_to_end": 7.0}, fps=99.0)
    drawn = annotate(image, result)
    assert (image == 200).all()  # untouched
    assert drawn.shape == image.shape and (drawn[:40, :200] != 200).any() and (drawn[-50:, -50:] == 200).all()


def test_latency_stats_reservoir() -> None:
    stats = LatencyStats(capacity=100)
    for v in range(1, 1001):
        stats.add(float(v))
    d = stats.to_dict()
    assert stats.count == 1000 and d["mean"] == pytest.approx(500.5)
    assert 300 < d["p50"] < 700 and d["p50"] <= d["p90"]
    assert LatencyStats().to_dict() == {"mean": None, "p50": None, "p90": None}


def test_headless_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    ok, why = display_status()
    assert not ok and ("no GUI support" in why or "no display" in why)


class DyingCamera:
    """A live capture that delivers a few frames, then is gone for good (a fake for the reconnect path)."""

    description = "camera 0"
    fps = 30.0

    def __init__(self, frames: int) -> None:
        self.left = frames
        self.opened = 0

    def open(self) -> None:
        if self.opened:
            raise EdgesqzError("no camera at index 0")
        self.opened += 1

    def read(self) -> tuple[np.ndarray, None] | None:
        if self.left <= 0:
            return None
        self.left -= 1
        return np.full((240, 320, 3), 128, np.uint8), None

    def close(self) -> None:
        pass


def test_camera_lost_mid_run_ends_with_a_clear_error(classifier: Classifier) -> None:
    from edgesqz.device.sources import FrameSource, Retry

    source = FrameSource(DyingCamera(frames=5), live=True, retry=Retry(attempts=2, first_delay=0.01))
    sink = Collect()
    pipeline = Pipeline(source, classifier, [sink], handle_signals=False)
    with pytest.raises(EdgesqzError, match=r"camera 0 disappeared and did not come back after 2 attempts"):
        pipeline.run()
    assert 1 <= pipeline.summary.frames <= 5 and pipeline.summary.frames == len(sink.results)
    assert sink.closed and sink.summary is None  # no summary record after an error
