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
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import cv2
import numpy as np

from edgesqz.errors import EdgesqzError
from edgesqz.fileio import (
    OutputError,
    PendingFile,
    check_output,
    is_special,
    open_stream,
    os_error,
    reader_gone,
    silence,
)
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
    if sys.platform.startswith("linux"):
        from edgesqz.sysinfo import display_check

        found, what = display_check()
        if not found:
            return False, what
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
    if result.zones is not None:
        _draw_zones(out, result, scale, thick)
        lines = [result.camera] if result.camera else []
    else:
        lines = [f"{p['label']}  {p['score'] * 100:.1f}%" for p in result.top_k] or ["(below threshold)"]
        if result.camera:
            lines.insert(0, result.camera)
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


ZONE_COLOURS = [(80, 200, 255), (255, 160, 60), (120, 230, 120), (230, 120, 230), (90, 90, 255), (255, 255, 120)]


def _draw_zones(out: np.ndarray, result: Result, scale: float, thick: int) -> None:
    """Each zone's rectangle with its name, top-1 label and score (dimmed when the result was reused)."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    for i, zone in enumerate(result.zones or ()):
        x, y, w, h = zone.rect
        colour = ZONE_COLOURS[i % len(ZONE_COLOURS)]
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), colour, max(2, thick), cv2.LINE_AA)
        best = zone.top_k[0] if zone.top_k else None
        text = f"{zone.name}: {best['label']} {best['score'] * 100:.0f}%" if best else f"{zone.name}: -"
        if not zone.classified:
            text += " (still)"
        (tw, th), base = cv2.getTextSize(text, font, scale * 0.8, thick)
        ty = max(th + 4, y + h - base - 4)  # along the zone's bottom edge: the top-left corner has the run's facts
        cv2.rectangle(out, (x, ty - th - 4), (min(out.shape[1] - 1, x + tw + 6), ty + base), colour, -1)
        cv2.putText(out, text, (x + 3, ty), font, scale * 0.8, (0, 0, 0), thick, cv2.LINE_AA)


# --------------------------------------------------------------------------- sinks


class JsonLinesSink(Sink):
    """One ``classification`` object per frame, then the ``run_summary`` object, one JSON per line.

    ``target``: a text stream (e.g. ``sys.stdout``) or a file path (``.jsonl``), written line by line as
    the run goes (``tail -f`` works) through :func:`edgesqz.fileio.open_stream`: a new file, an existing
    one only with ``force``. A closed stdout pipe stops the run (``output_closed``); a write that fails
    otherwise (disk full) is an error that names the file.
    """

    stop_reason = "output_closed"

    def __init__(self, target: IO[str] | str | os.PathLike[str], *, summary: bool = True, force: bool = False) -> None:
        self.target = target
        self.summary = summary
        self.force = force
        self._stream: IO[str] | None = None
        self._owns = False
        self._lines = 0

    @property
    def name(self) -> str:
        return str(self.target) if self._owns else "standard output"

    def open(self, pipeline: Pipeline | None = None) -> None:
        if isinstance(self.target, (str, os.PathLike)):
            self._stream = open_stream(self.target, force=self.force)
            self._owns = True
        else:
            self._stream = self.target

    def _line(self, obj: dict[str, Any]) -> None:
        if self._stream is None or self.stop_requested:
            return
        try:
            self._stream.write(dumps(obj) + "\n")
            self._stream.flush()
        except OutputError as exc:  # stdout through the command line's guard
            if not exc.reader_gone:
                raise
            self.stop_requested = True  # e.g. `edgesqz run --json | head`, or the terminal hung up
            return
        except OSError as exc:
            silence(self._stream)
            if not self._owns and reader_gone(exc):
                self.stop_requested = True
                return
            self._stream = None
            raise os_error(self.name, exc) from exc
        self._lines += 1

    def write(self, result: Result) -> None:
        self._line(result.to_record())

    def write_record(self, obj: dict[str, Any]) -> None:
        """Another schema object on its own line (e.g. an ``event``), in order with the frames'."""
        self._line(obj)

    def close(self, summary: Summary | None) -> None:
        if summary is not None and self.summary:
            self._line(summary.to_record())
        if self._owns and self._stream is not None:
            try:
                self._stream.close()
            except OSError as exc:
                raise os_error(self.name, exc) from exc
            finally:
                self._stream = None
                if not self._lines and not is_special(self.target):  # a failed run that wrote nothing leaves nothing
                    with contextlib.suppress(OSError):
                        os.unlink(self.target)
        self._stream = None


class ConsoleSink(Sink):
    """A human line per frame: ``frame 12  espresso 84.1%  consomme 12.2%  ...  11.9 ms``."""

    stop_reason = "output_closed"

    def __init__(self, stream: IO[str] | None = None, *, top: int = 3) -> None:
        self.stream = stream
        self.top = top

    def write(self, result: Result) -> None:
        if self.stop_requested:
            return
        stream = self.stream or sys.stdout
        name = Path(result.frame.name).name if result.frame.name else f"frame {result.frame.index}"
        if result.camera is not None:
            name = f"{result.camera} {name}"
        if result.zones is None:
            preds = "  ".join(f"{p['label']} {p['score'] * 100:.1f}%" for p in result.top_k[: self.top]) or "-"
        else:
            preds = "  ".join(f"[{z.name}] " + (" ".join(f"{p['label']} {p['score'] * 100:.1f}%"
                                                         for p in z.top_k[: self.top]) or "-")
                              + ("" if z.classified else " (still)") for z in result.zones)
        try:
            stream.write(f"{name}  {preds}  ({result.latency_ms['inference']:.1f} ms)\n")
            stream.flush()
        except OutputError as exc:
            if not exc.reader_gone:
                raise
            self.stop_requested = True
        except OSError as exc:
            silence(stream)
            if not reader_gone(exc):
                raise os_error("standard output", exc) from exc
            self.stop_requested = True


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
    the first are resized to it. The video is written to a temporary file beside ``path`` and appears
    under its name only once finalised and read back (a playable file or none, also when the run is
    stopped by a signal or fails later); an existing file is replaced only with ``force``, and never
    when it is one of ``inputs`` (``(what, path)`` the run reads, e.g. its ``--source``).
    """

    def __init__(self, path: str | os.PathLike[str], *, fps: float | None = None, queue_size: int = 16,
                 force: bool = False, inputs: Sequence[tuple[str, str | os.PathLike[str] | None]] = (),
                 camera: str | None = None) -> None:
        self.camera = camera  # several cameras: one recording each, of this camera's frames
        self.codec = record_codec(Path(path))
        self.path = check_output(path, force=force, what="--record", option="--record", inputs=inputs,
                                 create_parents=False, special_ok=False)
        self.fps = fps
        self.force = force
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._error: EdgesqzError | None = None
        self._pending: PendingFile | None = None
        self.frames = 0
        self.saved = False  # the video is in place under its name

    def open(self, pipeline: Pipeline | None = None) -> None:
        if self.fps is None:
            source = pipeline.source if pipeline is not None else None
            if pipeline is not None and self.camera is not None:
                source = next((c.source for c in pipeline.cameras if c.name == self.camera), source)
            self.fps = (source.fps if source is not None else None) or DEFAULT_RECORD_FPS
        self._pending = PendingFile(self.path, force=self.force)
        self._thread = threading.Thread(target=self._run, name="edgesqz-record", daemon=True)
        self._thread.start()

    def write(self, result: Result) -> None:
        if self._error is not None:
            self.stop_requested, self.stop_reason = True, "record_failed"
            return
        if self.camera is not None and result.camera != self.camera:
            return
        self._queue.put(result)

    def close(self, summary: Summary | None) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            if self._error is None and self.frames:
                self._check_playable(pending.tmp)
        except EdgesqzError as exc:
            self._error = exc
        if self._error is not None or not self.frames:
            pending.discard()
            if self._error is not None:
                raise self._error
            return
        pending.commit()  # what was recorded is kept even when the run failed later
        self.saved = True

    def _check_playable(self, tmp: Path) -> None:
        cap = cv2.VideoCapture(str(tmp))
        try:
            ok = cap.isOpened() and cap.read()[0]
        finally:
            cap.release()
        if not ok:
            full = False
            with contextlib.suppress(OSError):
                st = os.statvfs(tmp.parent)
                full = st.f_bavail * st.f_frsize < 1 << 20
            raise EdgesqzError(f"recording to {self.path} failed: the video cannot be read back"
                               + ("; the disk is full, free some space or record somewhere else" if full else
                                  " (OpenCV could not finish it)"))

    def _run(self) -> None:
        writer = None
        size = None
        try:
            assert self._pending is not None
            target = str(self._pending.tmp)
            while (result := self._queue.get()) is not None:
                image = annotate(result.frame.image, result)
                if writer is None:
                    size = (image.shape[1], image.shape[0])
                    writer = cv2.VideoWriter(target, cv2.VideoWriter_fourcc(*self.codec), float(self.fps), size)
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


def record_codec(path: Path) -> str:
    """The codec for a ``--record`` file name."""
    codec = RECORD_CODECS.get(path.suffix.lower())
    if codec is None:
        raise EdgesqzError(f"--record {path}: use a .mp4, .avi, .mov, .m4v or .mkv file name")
    return codec
