"""Event snapshots and clips (``--snapshot-dir``, ``--clip-dir``): they play back, pre-roll included,
the pre-roll ring is bounded, disk use is bounded (``--keep``, ``--max-disk``), files appear whole or not
at all and an existing file is never replaced. Real model and real photos (videos made with cv2.VideoWriter).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import video_frames
from event_helpers import Run, events_of, jsonl, write_scenes
from test_device_run import CLI

from edgesqz.device.clips import EVENT_FILE, MediaWriter
from edgesqz.device.eventsink import EventSink
from edgesqz.device.results import Result
from edgesqz.device.sources import Frame
from edgesqz.errors import EdgesqzError

FPS = 30


@pytest.fixture(scope="module")
def video(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Background (rocket) 3 s, espresso 2 s, background 2 s."""
    rocket, coffee = photos_dir / "rocket.jpg", photos_dir / "coffee.png"
    return write_scenes(tmp_path_factory.mktemp("clips") / "v.mp4", [(rocket, 90), (coffee, 60), (rocket, 60)])


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_snapshot_and_clip_play_back_with_the_pre_roll(int8_model: Path, video: Path, tmp_path: Path) -> None:
    snaps, clips, out = tmp_path / "snaps", tmp_path / "clips", tmp_path / "run.jsonl"
    run = Run(CLI, "--model", int8_model, "--source", video, "--fps", FPS, "--threads", 1, "--event", "espresso",
              "--event-end", 1, "--snapshot-dir", snaps, "--clip-dir", clips, "--preroll", 2, "--output", out)
    assert run.wait(120) == 0, run.stderr
    start, end = events_of(jsonl(out))
    assert start["snapshot"] is None and start["clip"] is None  # written when the event ends
    assert end["clip"] == str((clips / f"{end['id']}.mp4").resolve())
    assert end["snapshot"] == {"annotated": str((snaps / f"{end['id']}.jpg").resolve()),
                               "raw": str((snaps / f"{end['id']}.raw.jpg").resolve())}
    source = video_frames(video)

    # snapshots: the best frame, as captured and annotated; readable by others (not mkstemp's 0600)
    raw = cv2.imread(end["snapshot"]["raw"])
    annotated = cv2.imread(end["snapshot"]["annotated"])
    assert raw.shape == annotated.shape == (480, 640, 3)
    assert mad(raw, source[end["peak_frame"]]) < 4
    assert mad(annotated[:40, :200], raw[:40, :200]) > 20 and mad(annotated[-100:, -100:], raw[-100:, -100:]) < 2
    assert os.stat(end["snapshot"]["raw"]).st_mode & 0o044 == 0o044

    # the clip: OpenCV reads every frame; it holds the classified frames from 2 s before the first espresso
    # frame to the one that ended the event (a live source may skip frames when the machine is busy)
    frames = video_frames(Path(end["clip"]))
    cap = cv2.VideoCapture(end["clip"])
    assert len(frames) == int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) and 5 <= cap.get(cv2.CAP_PROP_FPS) <= 35
    classified = [o for o in jsonl(out) if o["kind"] == "classification"]
    decided = next(o["frame"] for o in classified if o["timestamp"] == end["timestamp"])
    window = [o["frame"] for o in classified if o["timestamp"] >= end["start"] - 2.0 and o["frame"] <= decided]
    assert window[0] <= end["first_frame"] - 2 * FPS + 3  # the pre-roll is there
    first = int(np.argmin([mad(frames[0], f) for f in source]))
    last = int(np.argmin([mad(frames[-1], f) for f in source]))
    assert abs(first - window[0]) <= 2 and abs(last - decided) <= 2, (first, window[0], last, decided)
    left_out = [int(line.split("left out ")[1].split()[0]) for line in run.lines if "left out" in line]
    assert abs(len(frames) + sum(left_out) - len(window)) <= 2, (len(frames), left_out, len(window))
    pre = frames[: 2 * FPS - 10 : 10]  # the pre-roll shows what came before the event's first frame
    assert all(int(np.argmin([mad(p, f) for f in source])) < end["first_frame"] for p in pre)
    assert sorted(os.listdir(clips)) == [f"{end['id']}.mp4"] and len(os.listdir(snaps)) == 2  # no temporaries left
    assert "event: espresso ended" in run.stderr and end["clip"] in run.stderr


# --------------------------------------------------------------------------- MediaWriter in-process


LABELS = ["background", "espresso"]


def result(i: int, t0: float, present: bool, image: np.ndarray) -> Result:
    scores = np.array([0.1, 0.9] if present else [0.9, 0.1], np.float32)
    frame = Frame(image=image, index=i, timestamp=t0 + i / FPS, captured=0.0)
    return Result(source="test", frame=frame, seq=i, top_k=[], scores=scores,
                  latency_ms={"inference": 1.0, "end_to_end": 2.0}, fps=FPS)


def feed(sink: EventSink, pattern: list[tuple[bool, int]], t0: float = 1_800_000_000.0, start: int = 0) -> int:
    rng = np.random.default_rng(start)
    i = start
    for present, frames in pattern:
        for _ in range(frames):
            image = np.full((120, 160, 3), 40 if not present else 200, np.uint8)
            image[rng.integers(0, 120), :] = 255  # each frame a little different
            sink.write(result(i, t0, present, image))
            i += 1
    return i


def media_sink(media: MediaWriter) -> EventSink:
    media._mailbox.max_bytes = 10**10  # frames come faster than real time here: the writer must not drop them
    sink = EventSink(["espresso"], [media], start_s=0.5, end_s=1.0, device="t")
    sink.bind(LABELS, 2)
    sink.open(None)
    return sink


def test_keep_and_max_disk_delete_the_oldest_events_only(tmp_path: Path) -> None:
    snaps, clips = tmp_path / "s", tmp_path / "c"
    clips.mkdir()
    mine = [clips / "holiday.mp4", clips / "notes.txt", clips / ".hidden.part.mp4"]
    for path in mine:
        path.write_bytes(b"user's file")
    old = clips / "20200101T000000Z-espresso-beef-1.mp4"  # an event from an earlier run: counts, oldest
    old.write_bytes(b"x" * 1000)
    os.utime(old, (1e9, 1e9))
    media = MediaWriter(snapshot_dir=snaps, clip_dir=clips, keep=2, preroll_s=0.5)
    sink = media_sink(media)
    feed(sink, [(False, 30), (True, 30), (False, 45)] * 4)
    sink.close()
    assert media.errors == []
    groups = media.event_files()
    assert len(groups) == 2 and not old.exists()
    for paths in groups.values():
        assert sorted(p.suffix for p in paths) == [".jpg", ".jpg", ".mp4"]
    assert all(p.read_bytes() == b"user's file" for p in mine)
    assert max(int(i.rsplit("-", 1)[1]) for i in groups) == 4  # the newest two of four

    capped = tmp_path / "capped"
    media = MediaWriter(clip_dir=capped, max_disk_mb=0.001, preroll_s=0.5)  # 1 kB: only the newest event stays
    sink = media_sink(media)
    feed(sink, [(False, 30), (True, 30), (False, 45)] * 3)
    sink.close()
    assert [p.name.rsplit("-", 1)[1] for p in capped.iterdir()] == ["3.mp4"]


def test_an_existing_file_is_never_replaced(tmp_path: Path) -> None:
    snaps = tmp_path / "s"
    media = MediaWriter(snapshot_dir=snaps)
    sink = media_sink(media)
    sink.detector.run_id = "abcd"
    t0 = 1_800_000_000.0
    taken = snaps / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(t0 + 1.0))}-espresso-abcd-1.jpg"
    taken.write_bytes(b"mine")
    feed(sink, [(False, 30), (True, 30), (False, 45)], t0=t0)
    sink.close()
    assert taken.read_bytes() == b"mine"
    assert len(media.errors) == 1 and "a file of that name exists (it is kept)" in media.errors[0]
    assert taken.with_name(taken.name.replace(".jpg", ".raw.jpg")).exists()  # the other one was written
    assert sorted(os.listdir(snaps)) == sorted([taken.name, taken.name.replace(".jpg", ".raw.jpg")])


def test_the_pre_roll_ring_is_bounded(tmp_path: Path) -> None:
    media = MediaWriter(clip_dir=tmp_path / "c", preroll_s=1.0)
    sink = media_sink(media)
    feed(sink, [(False, 20 * FPS)])  # 20 s without an event
    sink.close()
    window = media.preroll_s + sink.start_s + 1.0
    assert len(media._ring) <= window * FPS + 1
    assert 0 < media.ring_peak_bytes <= len(media._ring) * 160 * 120 * 3  # JPEGs, not raw frames
    tight = MediaWriter(clip_dir=tmp_path / "d", preroll_s=3.0, ring_mb=0.02)  # 20 kB
    sink = media_sink(tight)
    feed(sink, [(False, 10 * FPS)])
    sink.close()
    assert tight.ring_peak_bytes <= 20_000 + 10_000 and len(tight._ring) < 3 * FPS


def test_options_are_checked(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(EdgesqzError, match="is a file, not a folder"):
        MediaWriter(snapshot_dir=tmp_path / "file")
    bad = [({"keep": 0}, "--keep"), ({"preroll_s": -1}, "--preroll"), ({"max_disk_mb": 0}, "--max-disk")]
    for kwargs, needle in bad:
        with pytest.raises(EdgesqzError, match=needle):
            MediaWriter(clip_dir=tmp_path / "c", **kwargs)


def test_a_killed_run_leaves_no_half_clip(int8_model: Path, photos_dir: Path, tmp_path: Path) -> None:
    long = write_scenes(tmp_path / "long.mp4", [(photos_dir / "coffee.png", 600)])  # 20 s of espresso
    clips = tmp_path / "clips"
    run = Run(CLI, "--model", int8_model, "--source", long, "--fps", FPS, "--threads", 1, "--event", "espresso",
              "--clip-dir", clips)
    try:
        deadline = time.monotonic() + 60
        while not any("event: espresso started" in line for line in run.lines):
            assert time.monotonic() < deadline and run.proc.poll() is None, run.stderr
            time.sleep(0.05)
        time.sleep(1.0)  # the clip is being written
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait(10)
    finally:
        run.kill()
    names = os.listdir(clips)
    assert not [n for n in names if EVENT_FILE.match(n)], names  # nothing under an event's name
    assert all(n.startswith(".") and ".part." in n for n in names), names
