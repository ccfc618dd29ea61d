"""Frame sources: cameras, Picamera2, video files, streams, images — each read in its own thread.

Two layers:

- a *capture* (:class:`OpenCVCapture`, :class:`Picamera2Capture`, :class:`ImageFilesCapture`,
  :class:`PacedCapture`) knows how to open a device or file and decode the next frame;
- a :class:`FrameSource` runs one capture in a background thread and hands frames to the
  classifier. A **live** source (camera, stream) keeps only the newest frame, so inference never
  works on a stale one, and counts the frames it drops; a live capture that stops delivering is
  reopened with back-off before giving up with a clear error. A **file** source (video, images)
  delivers every frame through a short queue, so decoding overlaps inference.

The reader thread also runs the classifier's ``prepare`` (crop, resize, quantise) when given one,
so the interpreter only ever waits for ``invoke``.

:func:`open_source` turns the CLI's ``--camera`` / ``--source`` into a source.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from edgesqz.device.runtime import native_stderr
from edgesqz.errors import EdgesqzError
from edgesqz.imaging import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, VIDEO_SUFFIXES, list_images, read_image

log = logging.getLogger("edgesqz.device")

LIVE_URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "udp", "tcp", "srt")
PICAMERA2_HELP = (
    "install it with `sudo apt install python3-picamera2` (Raspberry Pi OS) and create the venv with "
    "`python3 -m venv --system-site-packages` so it can see the system package"
)
PICAMERA2_DEFAULT_SIZE = (640, 480)
STREAM_TIMEOUT_MS = 10_000  # FFmpeg's open and read timeouts for stream URLs
MAX_FRAME_PIXELS = MAX_IMAGE_PIXELS  # a video or camera frame, as an image file


@dataclass
class Frame:
    """One captured frame on its way to the classifier."""

    image: np.ndarray  # BGR uint8 as decoded (HxWx3, or HxWx4 BGRA from some cameras)
    index: int  # position in the source, 0-based; gaps are frames dropped by a live source
    # Unix time of the frame. Live sources (cameras, streams, a file played with --fps): the wall clock
    # (time.time()) when it was captured. A video file read as fast as possible: the source's own clock,
    # the wall time of its first frame plus the frame's media timestamp (see FrameSource.clock).
    timestamp: float
    captured: float  # time.perf_counter() at capture, for latencies
    name: str | None = None  # the file name, for image sources
    input: np.ndarray | None = None  # the model input, when the source was started with ``prepare``
    prepare_ms: float = 0.0
    zones: list[Any] | None = None  # per zone (edgesqz.device.site.ZoneInput), when the camera has zones


class Capture(Protocol):
    """Opens a device or file and decodes frames; used from one thread at a time."""

    description: str

    def open(self) -> None:
        """Open, or raise :class:`EdgesqzError` with what to do."""

    def read(self) -> tuple[np.ndarray, str | None] | None:
        """The next frame (BGR) and its name, or None at the end (file) or when the device stopped (live)."""

    def close(self) -> None: ...

    @property
    def fps(self) -> float | None: ...


# --------------------------------------------------------------------------- captures


def _ffmpeg_reason(lines: list[str]) -> str:
    """The most useful captured FFmpeg/OpenCV line, without its ``[mov,mp4 @ 0x...]`` prefix."""
    for line in lines:
        text = line.split("] ", 1)[1] if line.startswith("[") and "] " in line else line
        if text and "VIDEOIO" not in text and not text.startswith("global "):
            return text
    return ""


class OpenCVCapture:
    """``cv2.VideoCapture`` on a camera index (V4L2), a device path, a video file or a stream URL."""

    def __init__(self, target: int | str, *, width: int | None = None, height: int | None = None,
                 fps: float | None = None, description: str | None = None, decode_threads: int | None = 1,
                 loop: bool = False) -> None:
        self.target = target
        self.loop = loop  # a video file starts again at its end
        self.width, self.height, self.req_fps = width, height, fps
        # One FFmpeg decoding thread by default: the interpreter owns the cores, and a single thread
        # decodes 640x480 video several times faster than a small classifier runs.
        self.decode_threads = decode_threads
        self.description = description or (f"camera {target}" if isinstance(target, int) else str(target))
        self._cap: Any = None
        self.media_s: float | None = None  # a video file's clock: the last frame's media timestamp, in seconds
        self._media_offset = 0.0  # with --loop: where the current pass starts on the clock
        self._frames_read = 0  # in this pass

    @property
    def media_clock(self) -> bool:
        """A video file has its own clock (its timestamps); cameras and streams are timed by the wall clock."""
        return not self.is_camera and not self.is_stream

    @property
    def is_camera(self) -> bool:
        return isinstance(self.target, int) or str(self.target).startswith("/dev/video")

    @property
    def is_stream(self) -> bool:
        return "://" in str(self.target)

    @property
    def lost_hint(self) -> str:
        """What to check when the source stops delivering frames and does not come back."""
        if self.is_stream:
            return "check that the stream's server is running and reachable, and the URL"
        return "check the cable and power" if self.is_camera else "check the file"

    def open(self) -> None:
        if isinstance(self.target, int) and sys.platform.startswith("linux") \
                and not Path(f"/dev/video{self.target}").exists():
            cams = sorted(p.name for p in Path("/dev").glob("video*"))
            found = f"cameras present: {', '.join(cams)}" if cams else "no /dev/video* devices at all"
            raise EdgesqzError(f"no camera at index {self.target} (/dev/video{self.target} does not exist; {found}); "
                               "plug a USB camera in, or use --camera picamera2 for a Raspberry Pi camera module")
        with native_stderr() as lines:
            if self.is_camera:
                cap = cv2.VideoCapture(self.target, cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY)
            else:
                params = [cv2.CAP_PROP_N_THREADS, self.decode_threads] if self.decode_threads else []
                if self.is_stream:  # a server that stops answering must not block the reader for ever
                    params += [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
                               cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS]
                cap = cv2.VideoCapture(str(self.target), cv2.CAP_FFMPEG, params)
            if cap.isOpened() and self.is_camera:
                self._request(cap)
        if not cap.isOpened():
            reason = _ffmpeg_reason(lines)
            raise EdgesqzError(self._open_error(reason))
        self._cap = cap
        size = self.frame_size
        if size is not None and size[0] * size[1] > MAX_FRAME_PIXELS:
            self.close()
            raise EdgesqzError(f"{self.description} delivers {size[0]}x{size[1]} frames; edgesqz reads frames up to "
                               f"{MAX_FRAME_PIXELS / 1e6:.0f} megapixels")

    def _open_error(self, reason: str) -> str:
        why = f" ({reason})" if reason else ""
        if isinstance(self.target, int) and not sys.platform.startswith("linux"):
            return f"no camera at index {self.target}, or it cannot be opened{why}"
        if self.is_camera:
            return (f"cannot open {self.description}{why}; check it is a capture device, not in use by another "
                    "program (fuser /dev/video*), and that you may read it (group 'video')")
        if self.is_stream:
            reachable = _reachable(str(self.target))
            if reachable is True:
                return (f"cannot open stream {self.target}{why}: the server answers but sends nothing OpenCV can "
                        "decode as video; check the URL's path and the credentials, and that it is a video stream "
                        "(RTSP, MJPEG over HTTP, ...)")
            if reachable:
                return (f"cannot open stream {self.target}{why}: cannot connect ({reachable}); check the URL, the "
                        "network, and that the camera or server is on")
            return f"cannot open stream {self.target}{why}; check the URL, the network and the credentials"
        return f"cannot read video {self.target}{why}: not a video, or a codec this OpenCV/FFmpeg cannot decode"

    def _request(self, cap: Any) -> None:
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a queue of old ones
        if self.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        if self.req_fps:
            cap.set(cv2.CAP_PROP_FPS, self.req_fps)

    def read(self) -> tuple[np.ndarray, str | None] | None:
        ok, image = self._cap.read()
        if not ok and self.loop and not self.is_camera and not self.is_stream:
            self.close()
            self.open()
            if self.media_s is not None:  # the next pass continues the clock, one frame later
                self._media_offset = self.media_s + 1.0 / (self.fps or 30.0)
            self._frames_read = 0
            ok, image = self._cap.read()
        if not (ok and image is not None):
            return None
        if self.media_clock:
            self._tick()
        return image, None

    def _tick(self) -> None:
        """The media timestamp of the frame just read: its PTS (CAP_PROP_POS_MSEC), else frame index / fps."""
        pts = self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
        fps = self.fps or 30.0
        if not math.isfinite(pts) or pts < 0 or (pts == 0 and self._frames_read > 0):
            pts = self._frames_read / fps
        self._frames_read += 1
        media = self._media_offset + pts
        if self.media_s is not None and media <= self.media_s:  # never backwards, whatever the file says
            media = self.media_s + 1e-6
        self.media_s = media

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    @property
    def fps(self) -> float | None:
        value = self._cap.get(cv2.CAP_PROP_FPS) if self._cap is not None else 0.0
        return float(value) if value and 0 < value < 1000 else None

    @property
    def frame_size(self) -> tuple[int, int] | None:
        if self._cap is None:
            return None
        w, h = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        return (w, h) if w > 0 and h > 0 else None

    @property
    def frame_count(self) -> int | None:
        n = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT)) if self._cap is not None else 0
        return n if n > 0 else None


class Picamera2Capture:
    """A Raspberry Pi camera module through Picamera2 (libcamera); imported only when used."""

    lost_hint = "check the ribbon cable and `rpicam-hello --list-cameras`"

    def __init__(self, *, width: int | None = None, height: int | None = None, fps: float | None = None,
                 index: int = 0) -> None:
        self.size = (width or PICAMERA2_DEFAULT_SIZE[0], height or PICAMERA2_DEFAULT_SIZE[1])
        self.req_fps = fps
        self.index = index
        self.description = f"picamera2:{index}"
        self._cam: Any = None

    def open(self) -> None:
        try:
            from picamera2 import Picamera2  # only on a Raspberry Pi with python3-picamera2
        except ImportError as exc:
            raise EdgesqzError(f"--camera picamera2 needs the Picamera2 library, which is not installed ({exc}); "
                               f"{PICAMERA2_HELP}") from exc
        try:
            cam = Picamera2(self.index)
            controls = {"FrameRate": float(self.req_fps)} if self.req_fps else {}
            # RGB888 is B, G, R in memory: what OpenCV calls BGR.
            config = cam.create_video_configuration(main={"size": self.size, "format": "RGB888"}, controls=controls,
                                                    buffer_count=2)
            cam.configure(config)
            cam.start()
        except (IndexError, RuntimeError, OSError, ValueError) as exc:
            raise EdgesqzError(f"Picamera2 found no usable camera ({str(exc).splitlines()[0] if str(exc) else exc}); "
                               "check the ribbon cable and `rpicam-hello --list-cameras`") from exc
        self._cam = cam

    def read(self) -> tuple[np.ndarray, str | None] | None:
        try:
            return self._cam.capture_array("main"), None
        except (RuntimeError, OSError):
            return None

    def close(self) -> None:
        if self._cam is not None:
            with contextlib.suppress(Exception):  # best effort: the camera may already be gone
                self._cam.stop()
                self._cam.close()
            self._cam = None

    @property
    def fps(self) -> float | None:
        return float(self.req_fps) if self.req_fps else None

    @property
    def frame_size(self) -> tuple[int, int] | None:
        return self.size


class ImageFilesCapture:
    """Image files, in order; unreadable ones are skipped with a warning."""

    def __init__(self, paths: list[Path], description: str) -> None:
        if not paths:
            raise EdgesqzError(f"no images in {description}")
        self.paths = paths
        self.description = description
        self.skipped: list[str] = []
        self._next = 0

    def open(self) -> None:
        self._next = 0

    def read(self) -> tuple[np.ndarray, str | None] | None:
        while self._next < len(self.paths):
            path = self.paths[self._next]
            self._next += 1
            try:
                return read_image(path), str(path)
            except EdgesqzError as exc:
                self.skipped.append(str(path))
                log.warning("warning: skipping %s", exc)
        return None

    def close(self) -> None:
        pass

    @property
    def fps(self) -> float | None:
        return None

    @property
    def frame_size(self) -> tuple[int, int] | None:
        return None


class PacedCapture:
    """Plays a file capture in real time at ``fps``, like a camera (to rehearse a live source)."""

    def __init__(self, inner: OpenCVCapture, fps: float) -> None:
        self.inner = inner
        self.lost_hint = inner.lost_hint
        self.rate = float(fps)
        self.description = f"{inner.description} (played live at {fps:g} fps)"
        self._t0 = 0.0
        self._n = 0

    def open(self) -> None:
        self.inner.open()
        self._t0, self._n = time.perf_counter(), 0

    def read(self) -> tuple[np.ndarray, str | None] | None:
        if self._n == 0:  # the playback clock starts with the first frame asked for, not at open (no burst
            self._t0 = time.perf_counter()  # after a slow start, e.g. waiting 5 s for an MQTT broker)
        due = self._t0 + self._n / self.rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        self._n += 1
        return self.inner.read()

    def close(self) -> None:
        self.inner.close()

    @property
    def fps(self) -> float | None:
        return self.rate

    @property
    def frame_size(self) -> tuple[int, int] | None:
        return self.inner.frame_size


# --------------------------------------------------------------------------- threaded source


@dataclass(frozen=True)
class Retry:
    """Back-off for a live capture that stopped delivering: reopen after ``first_delay``, doubling up to
    ``max_delay``, at most ``attempts`` times (None: no limit) and until ``max_wait`` seconds were spent
    waiting (None: no limit). Both None: for ever."""

    attempts: int | None = 5
    first_delay: float = 0.5
    max_delay: float = 8.0
    max_wait: float | None = None

    def delays(self) -> Iterator[float]:
        d, waited, n = self.first_delay, 0.0, 0
        while (self.attempts is None or n < self.attempts) and (self.max_wait is None or waited < self.max_wait):
            yield d
            waited += d
            n += 1
            d = min(d * 2, self.max_delay)

    def describe(self) -> str:
        if self.attempts is None:
            return "for ever" if self.max_wait is None else f"for up to {self.max_wait:g} s"
        return f"{self.attempts} time{'s' if self.attempts != 1 else ''}"


def parse_reconnect(text: str) -> Retry:
    """``--reconnect``: N attempts (0: never), a time bound (``90s``, ``10m``, ``2h``) or ``forever``."""
    value = text.strip().lower()
    if value in ("forever", "always", "inf"):
        return Retry(attempts=None)
    if value.isdigit():
        return Retry(attempts=int(value))
    units = {"s": 1, "m": 60, "h": 3600}
    if len(value) > 1 and value[-1] in units:
        try:
            seconds = float(value[:-1]) * units[value[-1]]
        except ValueError:
            seconds = float("nan")
        if math.isfinite(seconds) and seconds > 0:
            return Retry(attempts=None, max_wait=seconds)
    raise EdgesqzError(f"--reconnect takes a number of attempts (0: never), a time such as 90s, 10m or 2h, or "
                       f"forever, not {text!r}")


_END = object()


class FrameSource:
    """Runs a capture in a background thread.

    ``live=True``: keep only the newest frame (older unread frames are counted in :attr:`dropped`)
    and, with a ``retry`` policy, reopen a capture that stops delivering (without one, a live
    source ends when its capture does). ``live=False``: deliver every frame in order through a
    queue of ``queue_size`` frames.

    Use as a context manager, or call :meth:`start` and :meth:`close`. :meth:`read` returns the
    next :class:`Frame`, or None when nothing arrived within ``timeout`` or the source has ended
    (then :attr:`ended` is true); it raises the reader thread's error (:class:`EdgesqzError`).
    """

    def __init__(self, capture: Capture, *, live: bool, retry: Retry | None = None, queue_size: int = 4,
                 sleep: Callable[[float], Any] | None = None) -> None:
        self.capture = capture
        self.live = live
        self.retry = retry
        self.description = capture.description
        self.dropped = 0
        self.captured = 0
        self.reconnects = 0
        self._sleep = sleep or self._stop_aware_sleep
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_size))
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._ended = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prepare: Callable[[np.ndarray], np.ndarray] | None = None
        self._prepare_frame: Callable[[Frame], None] | None = None
        self._opened = False
        self._open_in_thread = False
        self.state = "connecting"  # online, reconnecting, ended, unavailable
        self.notify: threading.Event | None = None  # set whenever a frame arrives or the source ends
        self._media_anchor: float | None = None  # wall time of media time 0 (clock "media")

    @property
    def clock(self) -> str:
        """``"media"``: frames are timed by the file's own timestamps (a video file read as fast as it decodes,
        not live), so events happen at the right moments of the video however fast it is processed;
        ``"wall"``: by the wall clock at capture (cameras, streams, a file played live with --fps, images)."""
        return "media" if not self.live and getattr(self.capture, "media_clock", False) else "wall"

    def _stop_aware_sleep(self, delay: float) -> None:
        self._stop.wait(delay)

    # -- lifecycle

    def open(self) -> FrameSource:
        """Open the capture now (errors raise here, in the caller's thread); :meth:`start` does it otherwise."""
        if not self._opened:
            self.capture.open()
            self._opened = True
        return self

    def start(self, prepare: Callable[[np.ndarray], np.ndarray] | None = None, *,
              prepare_frame: Callable[[Frame], None] | None = None, open_in_thread: bool = False) -> FrameSource:
        """Open the capture if needed, then start the reader thread (``prepare`` runs on each frame there).

        ``prepare_frame`` instead fills the frame's inputs itself (zones). ``open_in_thread``: a capture that
        does not open yet is retried with back-off in the reader thread (one camera of several), instead of
        raising here.
        """
        if self._thread is not None:
            raise RuntimeError("this source was already started")
        self._prepare = prepare
        self._prepare_frame = prepare_frame
        if open_in_thread and not self._opened:
            self._open_in_thread = True
        else:
            self.open()
        self._thread = threading.Thread(target=self._run, name=f"edgesqz-source:{self.description}", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        with contextlib.suppress(queue.Empty):  # unblock a reader waiting on a full queue
            while True:
                self._queue.get_nowait()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self.capture.close()
            self._opened = False

    def __enter__(self) -> FrameSource:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fps(self) -> float | None:
        return self.capture.fps

    @property
    def frame_size(self) -> tuple[int, int] | None:
        return getattr(self.capture, "frame_size", None)

    @property
    def ended(self) -> bool:
        """True once the source has delivered its last frame (end of file, or a live capture given up)."""
        if self.live:
            with self._cond:
                return self._ended and self._latest is None
        return self._ended

    # -- consumer side

    def read(self, timeout: float | None = None) -> Frame | None:
        if self.live:
            return self._read_latest(timeout)
        if self._ended:
            return None
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END:
            self._ended = True
            if self._error is not None:
                raise self._error
            return None
        return item

    def _read_latest(self, timeout: float | None) -> Frame | None:
        with self._cond:
            if self._latest is None and not self._ended:
                self._cond.wait_for(lambda: self._latest is not None or self._ended, timeout)
            frame, self._latest = self._latest, None
            if frame is None and self._ended and self._error is not None:
                error, self._error = self._error, None
                raise error
            return frame

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.read(timeout=0.1)
            if frame is not None:
                yield frame
            elif self.ended:
                return

    # -- reader thread

    def _run(self) -> None:
        try:
            if self._open_in_thread and not self._open_with_retry():
                return
            self.state = "online"
            while not self._stop.is_set():
                got = self.capture.read()
                if got is None and self.live and self.retry is not None:
                    got = self._read_again() or self._reconnect()
                if got is None:
                    break
                self._emit(*got)
        except EdgesqzError as exc:
            self._error = exc
        except Exception as exc:  # a reader thread must never die silently
            self._error = EdgesqzError(f"{self.description}: reading failed: {type(exc).__name__}: {exc}")
        finally:
            self.state = "unavailable" if self._error is not None else "ended"
            self._finish()

    def _open_with_retry(self) -> bool:
        """Open the capture in the reader thread, with the retry policy's back-off; False when stopped."""
        try:
            with _opencv_quiet():
                self.capture.open()
            self._opened = True
            return True
        except EdgesqzError as exc:
            last = str(exc)
        log.warning("warning: %s does not open (%s); retrying %s", self.description, last,
                    (self.retry or Retry(attempts=0)).describe())
        attempts = 0
        for delay in (self.retry.delays() if self.retry is not None else ()):
            self._sleep(delay)
            attempts += 1
            if self._stop.is_set():
                return False
            try:
                with _opencv_quiet():
                    self.capture.open()
                self._opened = True
                log.warning("warning: %s is open", self.description)
                return True
            except EdgesqzError as exc:
                last = str(exc)
        raise EdgesqzError(f"{self.description} did not open after {attempts} more attempts ({last})")

    def _emit(self, image: np.ndarray, name: str | None) -> None:
        timestamp = time.time()
        media = getattr(self.capture, "media_s", None) if self.clock == "media" else None
        if media is not None:
            if self._media_anchor is None:
                self._media_anchor = timestamp - media
            timestamp = self._media_anchor + media
        frame = Frame(image=image, index=self.captured, timestamp=timestamp, captured=time.perf_counter(),
                      name=name)
        self.captured += 1
        if self._prepare_frame is not None:
            t0 = time.perf_counter()
            self._prepare_frame(frame)
            frame.prepare_ms = (time.perf_counter() - t0) * 1e3
        elif self._prepare is not None:
            t0 = time.perf_counter()
            frame.input = self._prepare(image)
            frame.prepare_ms = (time.perf_counter() - t0) * 1e3
        self._deliver(frame)

    def _deliver(self, frame: Frame) -> None:
        if self.live:
            with self._cond:
                if self._latest is not None:
                    self.dropped += 1
                self._latest = frame
                self._cond.notify_all()
        else:
            self._put(frame)
        if self.notify is not None:
            self.notify.set()

    def _finish(self) -> None:
        if self.live:
            with self._cond:
                self._ended = True
                self._cond.notify_all()
        else:
            self._put(_END)
        if self.notify is not None:
            self.notify.set()

    def _put(self, item: object) -> None:
        """Queue ``item`` for the consumer (files: nothing is dropped), giving up only when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _read_again(self, tries: int = 2, pause: float = 0.05) -> tuple[np.ndarray, str | None] | None:
        """A live capture can miss a frame now and then; only repeated misses mean it is gone."""
        for _ in range(tries):
            if self._stop.wait(pause):
                return None
            got = self.capture.read()
            if got is not None:
                return got
        return None

    def _reconnect(self) -> tuple[np.ndarray, str | None] | None:
        """Reopen a live capture with back-off: its first frame, None when stopped meanwhile, or a clear error."""
        if self.retry is None or self._stop.is_set():
            return None
        waited, last, attempts = 0.0, "no frames", 0
        limit = self.retry.attempts
        for attempt, delay in enumerate(self.retry.delays(), 1):
            of = f" of {limit}" if limit is not None else ""
            self.state = "reconnecting"
            log.warning("warning: %s stopped delivering frames; reopening in %.1f s (attempt %d%s)",
                        self.description, delay, attempt, of)
            self.capture.close()
            self._sleep(delay)
            waited += delay
            attempts = attempt
            if self._stop.is_set():
                return None
            try:
                with _opencv_quiet():  # our warning says what happens; OpenCV's own WARN lines only confuse
                    self.capture.open()
            except EdgesqzError as exc:
                last = str(exc)
                continue
            got = self.capture.read()
            if got is not None:
                self.reconnects += 1
                self.state = "online"
                log.warning("warning: %s is back", self.description)
                return got
            last = ("the server answers but sends nothing OpenCV can decode as video"
                    if getattr(self.capture, "is_stream", False) else "it opened but delivered no frame")
        hint = getattr(self.capture, "lost_hint", "check the cable and power")
        if not attempts:
            raise EdgesqzError(f"{self.description} stopped delivering frames (--reconnect 0: not reopened); {hint}")
        raise EdgesqzError(f"{self.description} disappeared and did not come back after {attempts} attempts over "
                           f"{waited:.1f} s ({last}); {hint}, or allow more with --reconnect")


_DEFAULT_PORTS = {"http": 80, "https": 443, "rtsp": 554, "rtsps": 322, "rtmp": 1935}


def _reachable(url: str, timeout: float = 2.0) -> bool | str:
    """True when a TCP connection to the URL's host and port succeeds, else why not ("" if not a TCP URL)."""
    import socket
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
        host = parts.hostname
    except ValueError:
        return ""
    if not host or not port:
        return ""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError as exc:
        return exc.strerror or type(exc).__name__


@contextlib.contextmanager
def _opencv_quiet() -> Iterator[None]:
    """OpenCV's log level set to silent meanwhile (it is global; only the reconnecting thread uses this)."""
    logging_ = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_ is None:
        yield
        return
    level = logging_.getLogLevel()
    logging_.setLogLevel(logging_.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        logging_.setLogLevel(level)


# --------------------------------------------------------------------------- from the CLI


CAMERA_USAGE = "--camera takes N (0, 1, ...), picamera2[:N] (Raspberry Pi camera module) or v4l2:N (USB camera)"


def parse_camera(value: str) -> tuple[str, int]:
    """``--camera`` value -> (stack, index): ``auto`` for a bare N, ``picamera2`` or ``v4l2`` when forced."""
    v = value.strip().lower()
    stack, sep, number = v.partition(":")
    if not sep:
        stack, number = ("picamera2", "0") if v == "picamera2" else ("auto", v)
    if stack not in ("auto", "picamera2", "v4l2") or not (number.isascii() and number.isdigit()) \
            or len(number) > 3:
        raise EdgesqzError(f"{CAMERA_USAGE}, not {value!r}")
    return stack, int(number)


def libcamera_cameras() -> list[dict[str, Any]] | None:
    """The cameras libcamera lists through Picamera2 (index order), or None when Picamera2 is not importable."""
    try:
        from picamera2 import Picamera2  # only on a Raspberry Pi with python3-picamera2
    except ImportError:
        return None
    try:
        with native_stderr():
            info = Picamera2.global_camera_info()
    except Exception:  # libcamera without a camera manager: treat as none
        return []
    return [dict(item) for item in info or []]


def v4l2_cameras() -> list[str]:
    """``/dev/videoN`` capture nodes (Linux)."""
    return sorted((p.name for p in Path("/dev").glob("video*") if p.name[5:].isdigit()), key=lambda n: int(n[5:]))


def resolve_camera(value: str) -> tuple[str, int]:
    """(stack, index) that ``--camera VALUE`` opens: a bare N is libcamera's camera N when Picamera2 is
    importable and libcamera lists cameras (the camera module; OpenCV cannot open it since libcamera),
    else V4L2's /dev/videoN."""
    stack, index = parse_camera(value)
    if stack != "auto":
        return stack, index
    cams = libcamera_cameras()
    if cams and index < len(cams):
        return "picamera2", index
    return "v4l2", index


def camera_inventory() -> list[dict[str, str]]:
    """Every camera each stack sees, and the ``--camera`` value that opens it (for ``edgesqz doctor``)."""
    out = []
    cams = libcamera_cameras() or []
    for i, info in enumerate(cams):
        what = " ".join(str(info[k]) for k in ("Model", "Location", "Id") if info.get(k) not in (None, ""))
        out.append({"stack": "libcamera (Picamera2)", "device": what or f"camera {i}",
                    "open_with": f"--camera {i} (or picamera2:{i})"})
    for name in v4l2_cameras():
        n = int(name[5:])
        value = f"--camera v4l2:{n}" + ("" if n < len(cams) else f" (or {n})")
        out.append({"stack": "V4L2 (OpenCV)", "device": f"/dev/{name}", "open_with": value})
    return out


def _is_url(value: str) -> bool:
    return "://" in value


def _url_is_live(url: str) -> bool:
    scheme = url.split("://", 1)[0].lower()
    if scheme in LIVE_URL_SCHEMES:
        return True
    path = url.split("?", 1)[0]
    return Path(path).suffix.lower() not in VIDEO_SUFFIXES  # MJPEG/HLS streams; an .mp4 URL is a file


def open_source(
    *,
    camera: str | int | None = None,
    source: str | os.PathLike[str] | None = None,
    width: int | None = None,
    height: int | None = None,
    fps: float | None = None,
    retry: Retry | None = None,
    loop: bool = False,
) -> FrameSource:
    """A (not yet started) :class:`FrameSource` for ``--camera`` or ``--source``; camera 0 when neither is given.

    A video file with ``fps`` is played in real time at that rate as a live source (frames the
    classifier cannot keep up with are dropped), to rehearse a camera.
    """
    retry = retry or Retry()
    if camera is not None and source is not None:
        raise EdgesqzError("give either --camera or --source, not both")
    for name, value in (("--width", width), ("--height", height), ("--fps", fps)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise EdgesqzError(f"{name} must be > 0, got {value}")
    if fps is not None and fps > 1000:
        raise EdgesqzError(f"--fps must be at most 1000, got {fps:g}")
    if loop and (source is None or _is_url(os.fspath(source)) or not Path(source).is_file()
                 or Path(source).suffix.lower() in IMAGE_SUFFIXES):
        raise EdgesqzError("--loop plays a video file again and again; give --source VIDEO_FILE")
    if source is None:
        stack, index = resolve_camera(str(camera) if camera is not None else "0")
        if stack == "picamera2":
            return FrameSource(Picamera2Capture(width=width, height=height, fps=fps, index=index), live=True,
                               retry=retry)
        return FrameSource(OpenCVCapture(index, width=width, height=height, fps=fps), live=True, retry=retry)

    text = os.fspath(source)
    if _is_url(text):
        live = _url_is_live(text)
        return FrameSource(OpenCVCapture(text), live=live, retry=retry)
    if text.startswith("/dev/video"):
        if not Path(text).exists():
            raise EdgesqzError(f"no camera at {text}: the device does not exist")
        return FrameSource(OpenCVCapture(text, width=width, height=height, fps=fps), live=True, retry=retry)
    path = Path(text)
    if not path.exists():
        raise EdgesqzError(f"source {path} does not exist")
    if path.is_dir():
        images = list_images(path)
        if not images:
            raise EdgesqzError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
        return FrameSource(ImageFilesCapture(images, f"{path}/ ({len(images)} images)"), live=False)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return FrameSource(ImageFilesCapture([path], str(path)), live=False)
    video = OpenCVCapture(str(path), loop=loop)
    if fps is not None:
        return FrameSource(PacedCapture(video, fps), live=True)
    return FrameSource(video, live=False)
