"""Where results go: a window, JSON lines, a console line per frame, an annotated video.

A sink has ``open(pipeline)``, ``write(result)`` and ``close(summary)`` (``summary`` is None
when the run failed). A sink sets ``stop_requested`` to end the run (the window's q/Esc key, a
closed stdout pipe).

The window needs an OpenCV build with a GUI (``opencv-python``, not ``-headless``) and a
display (``$DISPLAY`` or ``$WAYLAND_DISPLAY``); :func:`display_status` says whether both are
there, and ``edgesqz run`` falls back to headless when they are not.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import sys
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import cv2
import numpy as np

from edgesqz.errors import EdgesqzError
from edgesqz.schema import dumps

if TYPE_CHECKING:
    from edgesqz.device.pipeline import Pipeline
    from edgesqz.device.results import Result, Summary

RECORD_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}
DEFAULT_RECORD_FPS = 30.0


class Sink:
    """Base class: every method is optional."""

    stop_requested: bool = False
    stop_reason: str = "sink"

    def open(self, pipeline: Pipeline) -> None:
        pass

    def write(self, result: Result) -> None:
        pass

    def close(self, summary: Summary | None) -> None:
        pass


# --------------------------------------------------------------------------- display detection


def opencv_gui_backend() -> str | None:
    """The GUI backend OpenCV was built with (e.g. ``QT5``, ``GTK3``), or None for headless builds."""
    info = cv2.getBuildInformation()
    match = re.search(r"^\s*GUI:\s*(\S+)", info, re.MULTILINE)
    if match is None or match.group(1).upper() == "NONE":
        return None
    return match.group(1)


def display_status() -> tuple[bool, str]:
    """(can we open a window, why not / which backend)."""
    backend = opencv_gui_backend()
    if backend is None:
        return False, "this OpenCV has no GUI support (opencv-python-headless); pip install opencv-python for a window"
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False, "no display ($DISPLAY and $WAYLAND_DISPLAY are unset)"
    return True, f"OpenCV {backend} window"


# --------------------------------------------------------------------------- drawing


def annotate(image: np.ndarray, result: Result) -> np.ndarray:
    """A copy of the frame with the top-k labels and scores, FPS and latency drawn in the top-left corner."""
    out = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR) if image.ndim == 3 and image.shape[2] == 4 else image.copy()
    if out.ndim == 2:
        out = cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)
    h, w = out.shape[:2]
    scale = max(0.4, min(w, h) / 800)
    thick = max(1, round(scale * 2))
    lines = [f"{p['label']}  {p['score'] * 100:.1f}%" for p in result.top_k] or ["(below threshold)"]
    lat = result.latency_ms
    lines.append(f"{result.fps:.1f} FPS  inference {lat['inference']:.1f} ms  end-to-end {lat['end_to_end']:.1f} ms")
    font = cv2.FONT_HERSHEY_SIMPLEX
    sizes = [cv2.getTextSize(text, font, scale, thick)[0] for text in lines]
    line_h = max(s[1] for s in sizes) + round(10 * scale)
    box_w = min(w, max(s[0] for s in sizes) + round(16 * scale))
    box_h = min(h, line_h * len(lines) + round(10 * scale))
    roi = out[:box_h, :box_w]
    roi[:] = (roi * 0.4).astype(np.uint8)  # darken behind the text
    for i, text in enumerate(lines):
        colour = (255, 255, 255) if i < len(lines) - 1 else (120, 230, 120)
        y = line_h * (i + 1)
        cv2.putText(out, text, (round(8 * scale), y), font, scale, colour, thick, cv2.LINE_AA)
    return out


# --------------------------------------------------------------------------- sinks


class JsonLinesSink(Sink):
    """One ``classification`` object per frame, then the ``run_summary`` object, one JSON per line.

    ``target``: a text stream (e.g. ``sys.stdout``) or a file path (``.jsonl``; created/overwritten).
    """

    stop_reason = "output_closed"

    def __init__(self, target: IO[str] | str | os.PathLike[str], *, summary: bool = True) -> None:
        self.target = target
        self.summary = summary
        self._stream: IO[str] | None = None
        self._owns = False

    def open(self, pipeline: Pipeline | None = None) -> None:
        if isinstance(self.target, (str, os.PathLike)):
            path = Path(self.target)
            try:
                self._stream = path.open("w", encoding="utf-8")
            except OSError as exc:
                raise EdgesqzError(f"cannot write {path}: {exc.strerror or exc}") from exc
            self._owns = True
        else:
            self._stream = self.target

    def _line(self, obj: dict[str, Any]) -> None:
        if self._stream is None or self.stop_requested:
            return
        try:
            self._stream.write(dumps(obj) + "\n")
            self._stream.flush()
        except BrokenPipeError:  # e.g. `edgesqz run --json | head`
            self.stop_requested = True
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._stream.fileno())

    def write(self, result: Result) -> None:
        self._line(result.to_record())

    def write_record(self, obj: dict[str, Any]) -> None:
        """Another schema object on its own line (e.g. an ``event``), in order with the frames'."""
        self._line(obj)

    def close(self, summary: Summary | None) -> None:
        if summary is not None and self.summary:
            self._line(summary.to_record())
        if self._owns and self._stream is not None:
            self._stream.close()
        self._stream = None


class ConsoleSink(Sink):
    """A human line per frame: ``frame 12  espresso 84.1%  consomme 12.2%  ...  11.9 ms``."""

    def __init__(self, stream: IO[str] | None = None, *, top: int = 3) -> None:
        self.stream = stream
        self.top = top

    def write(self, result: Result) -> None:
        stream = self.stream or sys.stdout
        name = Path(result.frame.name).name if result.frame.name else f"frame {result.frame.index}"
        preds = "  ".join(f"{p['label']} {p['score'] * 100:.1f}%" for p in result.top_k[: self.top]) or "-"
        try:
            stream.write(f"{name}  {preds}  ({result.latency_ms['inference']:.1f} ms)\n")
            stream.flush()
        except BrokenPipeError:
            self.stop_requested = True
            self.stop_reason = "output_closed"


class WindowSink(Sink):
    """An OpenCV window with the annotated frames; q or Esc (or closing the window) stops the run."""

    stop_reason = "window_closed"

    def __init__(self, title: str = "edgesqz") -> None:
        self.title = title
        self._shown = False

    def open(self, pipeline: Pipeline | None = None) -> None:
        try:
            cv2.namedWindow(self.title, cv2.WINDOW_NORMAL)
        except cv2.error as exc:
            raise EdgesqzError(f"cannot open a window ({str(exc).strip().splitlines()[-1]}); use --no-display") from exc

    def write(self, result: Result) -> None:
        cv2.imshow(self.title, annotate(result.frame.image, result))
        self._shown = True
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27) or cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
            self.stop_requested = True

    def close(self, summary: Summary | None) -> None:
        with contextlib.suppress(cv2.error):
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)


class VideoRecordSink(Sink):
    """Writes the annotated frames to a video (``.mp4``/``.mov``/``.mkv``: mp4v, ``.avi``: MJPG).

    Annotation and encoding run in a writer thread, off the inference path. The frame rate is the
    source's (``fps`` overrides it; 30 when the source does not say). Frames of another size than
    the first are resized to it.
    """

    def __init__(self, path: str | os.PathLike[str], *, fps: float | None = None, queue_size: int = 16) -> None:
        self.path = Path(path)
        self.fps = fps
        self.codec = check_record_path(self.path)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._error: EdgesqzError | None = None
        self.frames = 0

    def open(self, pipeline: Pipeline | None = None) -> None:
        if self.fps is None:
            self.fps = (pipeline.source.fps if pipeline is not None else None) or DEFAULT_RECORD_FPS
        self._thread = threading.Thread(target=self._run, name="edgesqz-record", daemon=True)
        self._thread.start()

    def write(self, result: Result) -> None:
        if self._error is not None:
            self.stop_requested, self.stop_reason = True, "record_failed"
            return
        self._queue.put(result)

    def close(self, summary: Summary | None) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        writer = None
        size = None
        try:
            while (result := self._queue.get()) is not None:
                image = annotate(result.frame.image, result)
                if writer is None:
                    size = (image.shape[1], image.shape[0])
                    writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*self.codec), float(self.fps), size)
                    if not writer.isOpened():
                        raise EdgesqzError(f"cannot record to {self.path}: OpenCV could not open a {self.codec} writer")
                if (image.shape[1], image.shape[0]) != size:
                    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
                writer.write(image)
                self.frames += 1
        except Exception as exc:
            self._error = exc if isinstance(exc, EdgesqzError) else EdgesqzError(
                f"recording to {self.path} failed: {type(exc).__name__}: {exc}")
            while self._queue.get() is not None:  # keep draining so the producer never blocks
                pass
        finally:
            if writer is not None:
                writer.release()


def check_record_path(path: Path) -> str:
    """The codec for a ``--record`` path, after checking its folder exists."""
    codec = RECORD_CODECS.get(path.suffix.lower())
    if codec is None:
        raise EdgesqzError(f"--record {path}: use a .mp4, .avi, .mov, .m4v or .mkv file name")
    if not path.parent.is_dir():
        raise EdgesqzError(f"--record {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise EdgesqzError(f"--record {path}: the folder {path.parent} is not writable")
    return codec
