"""edgesqz.device.sources: file and live sources, newest-frame delivery, reconnects, bad sources."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgesqz.device.sources import (
    FrameSource,
    ImageFilesCapture,
    OpenCVCapture,
    Retry,
    open_source,
    parse_camera,
)
from edgesqz.errors import EdgesqzError


def write_numbered_video(path: Path, frames: int, size: tuple[int, int] = (320, 240), fps: float = 30) -> Path:
    """Frame i is filled with grey level 4*i (readable back despite compression)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*("MJPG" if path.suffix == ".avi" else "mp4v")), fps,
                             size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), (4 * i) % 256, np.uint8))
    writer.release()
    return path


def grey(frame_image: np.ndarray) -> int:
    return round(float(frame_image.mean()) / 4)


@pytest.fixture(scope="module")
def numbered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_numbered_video(tmp_path_factory.mktemp("src") / "numbered.avi", 40)


def test_video_file_delivers_every_frame_in_order(numbered: Path) -> None:
    source = open_source(source=str(numbered))
    assert not source.live
    seen = []
    with source.start(prepare=lambda img: img[:2, :2].copy()) as src:
        for frame in src:
            assert frame.input is not None and frame.input.shape == (2, 2, 3)
            seen.append((frame.index, grey(frame.image)))
    assert [i for i, _ in seen] == list(range(40))
    assert [g for _, g in seen] == list(range(40))
    assert source.dropped == 0 and source.captured == 40 and source.ended


def test_reader_overlaps_the_consumer(numbered: Path) -> None:
    """While the consumer is busy, the reader thread has already decoded the next frames."""
    with open_source(source=str(numbered)).start() as src:
        first = src.read(timeout=5)
        assert first is not None
        time.sleep(0.3)
        assert src._queue.qsize() >= 3  # queued, decoded, waiting


def test_paced_video_is_live_and_drops_stale_frames(numbered: Path) -> None:
    source = open_source(source=str(numbered), fps=400)
    assert source.live
    got = []
    with source.start() as src:
        for frame in src:
            got.append(frame.index)
            time.sleep(0.02)  # a slow classifier
    assert got == sorted(got) and len(set(got)) == len(got)
    assert source.dropped > 0
    assert len(got) + source.dropped == source.captured == 40
    assert got[-1] == 39  # the newest frame is never lost


def test_image_folder_and_single_image(tmp_path: Path) -> None:
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), np.full((50, 60, 3), 10 * i, np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    source = open_source(source=str(tmp_path))
    with source.start() as src:
        frames = list(src)
    assert [Path(f.name).name for f in frames] == ["img0.png", "img1.png", "img2.png"]
    assert [f.index for f in frames] == [0, 1, 2]
    assert isinstance(source.capture, ImageFilesCapture)
    assert [Path(p).name for p in source.capture.skipped] == ["broken.jpg"]
    single = open_source(source=str(tmp_path / "img1.png"))
    with single.start() as src:
        assert [float(f.image.mean()) for f in src] == [10.0]


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(EdgesqzError, match="does not exist"):
        open_source(source=str(tmp_path / "missing.mp4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgesqzError, match="no images"):
        open_source(source=str(tmp_path / "empty"))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(5000))
    with pytest.raises(EdgesqzError, match=r"cannot read video .*bad\.mp4"):
        open_source(source=str(bad)).open()
    with pytest.raises(EdgesqzError, match="either --camera or --source"):
        open_source(camera="0", source=str(bad))
    with pytest.raises(EdgesqzError, match="--fps must be > 0"):
        open_source(source=str(bad), fps=0)
    with pytest.raises(EdgesqzError, match="no camera at /dev/video77"):
        open_source(source="/dev/video77")


def test_camera_argument() -> None:
    assert parse_camera("0") == ("auto", 0) and parse_camera("12") == ("auto", 12)
    assert parse_camera("PiCamera2") == ("picamera2", 0) and parse_camera("picamera2:1") == ("picamera2", 1)
    assert parse_camera("v4l2:2") == ("v4l2", 2)
    with pytest.raises(EdgesqzError, match="--camera takes N"):
        parse_camera("usb")


def test_no_camera_at_index_7() -> None:
    """A real absent camera (no fake): opening index 7 fails with one clear line."""
    if Path("/dev/video7").exists():
        pytest.skip("this machine has a /dev/video7")
    source = open_source(camera=7)
    assert source.live
    with pytest.raises(EdgesqzError, match="no camera at index 7") as info:
        source.start()
    assert "\n" not in str(info.value)


def test_missing_picamera2_is_a_clear_error() -> None:
    try:
        import picamera2  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("picamera2 is installed here")
    with pytest.raises(EdgesqzError, match=r"needs the Picamera2 library.*python3-picamera2"):
        open_source(camera="picamera2").open()


def test_stream_urls_are_live_and_file_urls_are_not() -> None:
    assert open_source(source="rtsp://192.0.2.1/stream").live
    assert open_source(source="http://192.0.2.1:8080/video").live  # MJPEG stream
    assert not open_source(source="http://192.0.2.1/clip.mp4").live


# --------------------------------------------------------------------------- reconnecting (fake camera)


class FakeCamera:
    """A camera that delivers ``bursts[k]`` frames after its k-th successful open, then goes away.

    ``fail_opens`` lists open attempts (0-based) that fail as if the device were unplugged.
    """

    description = "fake camera"
    fps = 30.0

    def __init__(self, bursts: list[int], fail_opens: set[int] = frozenset()) -> None:
        self.bursts = bursts
        self.fail_opens = set(fail_opens)
        self.opens = 0
        self.successful = 0
        self.left = 0
        self.delivered = 0
        self.lock = threading.Lock()

    def open(self) -> None:
        attempt = self.opens
        self.opens += 1
        if attempt in self.fail_opens or self.successful >= len(self.bursts):
            raise EdgesqzError("no camera at index 0")
        self.left = self.bursts[self.successful]
        self.successful += 1

    def read(self) -> tuple[np.ndarray, None] | None:
        time.sleep(0.002)
        if self.left <= 0:
            return None
        self.left -= 1
        self.delivered += 1
        return np.full((4, 4, 3), self.delivered, np.uint8), None

    def close(self) -> None:
        pass


def test_reconnect_with_back_off_then_clear_error() -> None:
    camera = FakeCamera(bursts=[3, 2], fail_opens={1})  # 3 frames, unplugged, one failed reopen, 2 frames, gone
    delays: list[float] = []
    source = FrameSource(camera, live=True, retry=Retry(attempts=4, first_delay=0.5, max_delay=2.0),
                         sleep=delays.append)
    received = []
    source.start()
    with pytest.raises(EdgesqzError) as info:
        while True:
            frame = source.read(timeout=1)
            if frame is not None:
                received.append(frame.index)
    source.close()
    message = str(info.value)
    assert "fake camera disappeared and did not come back after 4 attempts" in message
    assert "\n" not in message
    assert source.reconnects == 1
    assert source.captured == camera.delivered == 5
    assert received == sorted(received) and len(received) + source.dropped == 5
    # first outage: 0.5 (open fails), 1.0 (back); second outage: the full schedule, capped at 2.0
    assert delays == [0.5, 1.0, 0.5, 1.0, 2.0, 2.0]


def test_close_stops_a_waiting_reconnect() -> None:
    camera = FakeCamera(bursts=[2])
    source = FrameSource(camera, live=True, retry=Retry(attempts=3, first_delay=30.0))
    source.start()
    assert source.read(timeout=2) is not None
    t0 = time.perf_counter()
    source.close(timeout=5)
    assert time.perf_counter() - t0 < 2  # the 30 s back-off sleep was interrupted
    assert not source._thread.is_alive()


def test_opencv_capture_reports_size_and_fps(numbered: Path) -> None:
    cap = OpenCVCapture(str(numbered))
    cap.open()
    try:
        assert cap.frame_size == (320, 240)
        assert cap.fps == pytest.approx(30)
        assert cap.frame_count == 40
    finally:
        cap.close()
