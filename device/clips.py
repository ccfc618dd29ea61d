"""Snapshots and clips of events (``--snapshot-dir``, ``--clip-dir``): written off the camera loop.

:class:`MediaWriter` is an event output with one writer thread:

- **Pre-roll ring** (clips only): each classified frame is JPEG-encoded in the writer thread into a
  ring that keeps the last ``preroll_s`` seconds (plus the time an event takes to be confirmed),
  bounded in bytes too (``ring_mb``). Never raw frames, never unbounded.
- **Clip**: when an event starts, a video ``ID.mp4`` (mp4v) is opened, the ring's frames from
  ``preroll_s`` seconds before the event's first frame are written, then every frame until the event
  ends (at most ``clip_max_s`` seconds). Frames are written as the camera delivered them (not annotated).
- **Snapshot**: when an event ends, its best frame (the highest score) as ``ID.jpg`` (annotated)
  and ``ID.raw.jpg`` (as captured).

Every file is written through :mod:`edgesqz.fileio`: under a temporary name, fsynced, then linked to
its name, which never replaces an existing file; a crash or a full disk leaves no half file under
an event's name. Disk use is bounded: after each event the oldest events' files are deleted until
at most ``keep`` events (default 100) and ``max_disk_mb`` remain, and nothing new is written while
the disk has less than ``min_free_mb`` free. Only files named like events (``20261127T101502Z-cat-3f2a-1.jpg``)
are ever deleted.

The camera loop only appends to a mailbox: frames beyond ``max_pending_mb`` (32 MB: about 35
frames of 640x480, a second at 30 fps, enough for the burst of writing a pre-roll) waiting are
dropped (oldest first, counted in :attr:`frames_dropped`), so a writer that falls behind costs
frames in the clips, never unbounded memory; event starts and ends are never dropped.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from edgesqz.device import options
from edgesqz.device.eventsink import EventOutput
from edgesqz.device.shutdown import HURRY
from edgesqz.device.sinks import annotate
from edgesqz.errors import EdgesqzError
from edgesqz.fileio import atomic_file, atomic_write, check_folder

if TYPE_CHECKING:
    from edgesqz.device.events import Event
    from edgesqz.device.eventsink import EventSink
    from edgesqz.device.results import Result

log = logging.getLogger("edgesqz.device.events")

DEFAULT_PREROLL_S = 3.0
DEFAULT_KEEP = 100
DEFAULT_CLIP_MAX_S = 300.0
DEFAULT_FPS = 30.0
EVENT_FILE = re.compile(r"^(\d{8}T\d{6}Z-[a-z0-9_]+-[0-9a-f]+-\d+)(\.raw|\.crop)?\.(jpg|mp4)$")
STALE_PART = re.compile(r"^\.\d{8}T\d{6}Z-[a-z0-9_]+-[0-9a-f]+-\d+(\.raw|\.crop)?\..+\.part\.(jpg|mp4)$")
STALE_PART_S = 600.0  # a temporary file untouched this long is left over from a crash


@dataclass
class _Frame:
    image: np.ndarray
    timestamp: float
    index: int


class _Mailbox:
    """The camera loop's side: frames (bounded, the oldest dropped) and commands (never dropped), in order.

    Frames wait as the arrays the camera delivered: at most ``max_bytes`` of them (but always
    ``min_frames``), so the bound is in memory whatever the resolution.
    """

    def __init__(self, max_bytes: int, min_frames: int = 4) -> None:
        self.max_bytes = max_bytes
        self.min_frames = min_frames
        self._items: collections.deque[tuple[str, Any]] = collections.deque()
        self._frames = 0
        self._bytes = 0
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, kind: str, item: Any) -> None:
        with self._cond:
            if kind == "frame":
                size = item.image.nbytes
                while self._frames >= self.min_frames and self._bytes + size > self.max_bytes:
                    i = next(i for i, (k, _) in enumerate(self._items) if k == "frame")
                    self._bytes -= self._items[i][1].image.nbytes
                    del self._items[i]
                    self._frames -= 1
                    self.dropped += 1
                self._frames += 1
                self._bytes += size
            self._items.append((kind, item))
            self._cond.notify()

    def get(self) -> tuple[str, Any]:
        with self._cond:
            self._cond.wait_for(lambda: bool(self._items))
            kind, item = self._items.popleft()
            if kind == "frame":
                self._frames -= 1
                self._bytes -= item.image.nbytes
            return kind, item


class _Clip:
    """One event's video, written to a temporary file until the event ends."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int], max_frames: int) -> None:
        self.path = path
        self.size = size
        self.max_frames = max_frames
        self.frames = 0
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_file(path, force=False))
        self.writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), size)
        if not self.writer.isOpened():
            self._stack.close()
            raise EdgesqzError(f"cannot write clip {path}: OpenCV could not open an mp4v writer")
        self._tmp = tmp

    def write(self, image: np.ndarray) -> None:
        if self.frames >= self.max_frames:
            return
        if image.ndim == 3 and image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        if (image.shape[1], image.shape[0]) != self.size:
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(image)
        self.frames += 1

    def finish(self) -> None:
        """Close the video and give it its name (raises EdgesqzError when that failed).

        The encoder does not report failed writes, so the finished file is checked: an MP4 needs its
        index (the ``moov`` box, written last); without it (a full disk, a file size limit) the file
        is removed and nothing appears under the clip's name.
        """
        self.writer.release()
        why = "it came out empty" if self._tmp.stat().st_size == 0 else mp4_incomplete(self._tmp)
        if why:
            self.abort()
            raise EdgesqzError(f"the encoder could not finish it: {why} (is the disk full, or a file size limit "
                               "reached?); nothing is left under its name")
        self._stack.close()

    def abort(self) -> None:
        self.writer.release()
        with contextlib.suppress(Exception):
            self._stack.__exit__(EdgesqzError, EdgesqzError("aborted"), None)


def mp4_incomplete(path: Path) -> str | None:
    """Why the MP4 (or MOV) file at ``path`` is unfinished, or None: its top-level boxes must chain to the end
    of the file and include the index (``moov``) and the media (``mdat``). Other formats: None."""
    if path.suffix.lower() not in (".mp4", ".mov", ".m4v"):
        return None
    try:
        with path.open("rb") as f:
            total = os.fstat(f.fileno()).st_size
            seen: set[bytes] = set()
            at = 0
            while at + 8 <= total:
                f.seek(at)
                size, kind = struct.unpack(">I4s", f.read(8))
                if size == 1:
                    size = struct.unpack(">Q", f.read(8))[0]
                elif size == 0:  # "to the end of the file": the muxer never came back to write the size
                    size = total - at if kind != b"mdat" else -1
                if size < 8:
                    return f"its {kind.decode('latin-1')!r} box was never closed"
                seen.add(kind)
                at += size
            if at != total:
                return "it ends in the middle of a box"
    except OSError as exc:
        return f"it cannot be read back ({exc.strerror or exc})"
    missing = [k.decode() for k in (b"moov", b"mdat") if k not in seen]
    return f"it has no {' and no '.join(missing)} box (the video's index is missing)" if missing else None


class MediaWriter(EventOutput):
    """Writes event snapshots and clips in a background thread (see the module docstring)."""

    def __init__(self, *, snapshot_dir: str | Path | None = None, clip_dir: str | Path | None = None,
                 preroll_s: float | None = None, keep: int | None = None, max_disk_mb: float | None = None,
                 clip_max_s: float = DEFAULT_CLIP_MAX_S, ring_mb: float = 64.0, min_free_mb: float = 100.0,
                 jpeg_quality: int = 90, ring_quality: int = 80, max_pending_mb: float = 32.0,
                 say: Callable[[str], Any] | None = None) -> None:
        if snapshot_dir is None and clip_dir is None:
            raise EdgesqzError("MediaWriter needs a snapshot folder, a clip folder or both")
        self.snapshot_dir = check_folder(snapshot_dir, option="--snapshot-dir").resolve() if snapshot_dir else None
        self.clip_dir = check_folder(clip_dir, option="--clip-dir").resolve() if clip_dir else None
        self.preroll_s = DEFAULT_PREROLL_S if preroll_s is None else options.finite(preroll_s, "--preroll", 0, 60,
                                                                                     unit="of seconds")
        self.keep = DEFAULT_KEEP if keep is None else options.positive_int(keep, "--keep", 1, 1_000_000)
        self.max_disk_bytes = None if max_disk_mb is None else int(
            options.finite(max_disk_mb, "--max-disk", 0, 1e9, lo_open=True, unit="of MB") * 1e6)
        self.clip_max_s = clip_max_s
        self.ring_bytes_max = int(ring_mb * 1e6)
        self.min_free_bytes = int(min_free_mb * 1e6)
        self.jpeg_params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
        self.ring_params = [cv2.IMWRITE_JPEG_QUALITY, ring_quality]
        self._mailbox = _Mailbox(int(max_pending_mb * 1e6))
        self._ring: collections.deque[tuple[float, int, bytes]] = collections.deque()
        self.ring_bytes = 0
        self.ring_peak_bytes = 0
        self._ring_window = self.preroll_s + 1.0
        self._clips: dict[str, _Clip] = {}
        self._started: set[str] = set()  # events whose clip is being written (pipeline side)
        self._fps: float | None = None
        self._thread: threading.Thread | None = None
        self.written: list[Path] = []
        self.errors: list[str] = []
        self.ring_peak_frames = 0
        self._say = say
        self._cv_log_level: int | None = None

    @property
    def frames_dropped(self) -> int:
        return self._mailbox.dropped

    def describe(self) -> str:
        parts = []
        if self.snapshot_dir:
            parts.append(f"snapshots to {self.snapshot_dir}")
        if self.clip_dir:
            parts.append(f"clips to {self.clip_dir} ({self.preroll_s:g} s pre-roll)")
        cap = f" and {self.max_disk_bytes / 1e6:g} MB" if self.max_disk_bytes else ""
        return f"{', '.join(parts)}; keeping the newest {self.keep} events{cap}"

    # -- EventOutput (camera loop)

    def open(self, sink: EventSink) -> None:
        self._fps = sink.fps
        self._ring_window = self.preroll_s + sink.start_s + 1.0
        self._remove_stale_parts()
        if self.clip_dir is not None:  # the encoder warns once per frame it cannot write; finish() says why, once
            logging_ = getattr(getattr(cv2, "utils", None), "logging", None)
            if logging_ is not None:
                self._cv_log_level = logging_.getLogLevel()
                logging_.setLogLevel(min(self._cv_log_level, logging_.LOG_LEVEL_ERROR))
        self._thread = threading.Thread(target=self._run, name="edgesqz-event-media", daemon=True)
        self._thread.start()

    def frame(self, result: Result) -> None:
        if self.clip_dir is not None:
            frame = result.frame
            self._mailbox.put("frame", _Frame(frame.image, frame.timestamp, frame.index))

    def prepare(self, event: Event, best: Result | None) -> None:
        if event.state == "active":
            if self.clip_dir is not None:
                self._started.add(event.id)
                self._mailbox.put("start", (event.id, event.start))
            return
        if self.clip_dir is not None and event.id in self._started:
            self._started.discard(event.id)
            event.clip = str(self.clip_dir / f"{event.id}.mp4")
        rect = None
        if self.snapshot_dir is not None and best is not None:
            event.snapshot = {"annotated": str(self.snapshot_dir / f"{event.id}.jpg"),
                              "raw": str(self.snapshot_dir / f"{event.id}.raw.jpg")}
            if event.zone is not None and best.zones:  # a zone's event: the zone's own crop too
                rect = next((z.rect for z in best.zones if z.name == event.zone), None)
                if rect is not None:
                    event.snapshot["crop"] = str(self.snapshot_dir / f"{event.id}.crop.jpg")
        self._mailbox.put("end", (event.id, best, event.clip is not None, event.snapshot is not None, rect))

    def close(self) -> None:
        if self._thread is not None:
            self._mailbox.put("stop", None)
            self._thread.join()
            self._thread = None
        if self._cv_log_level is not None:
            cv2.utils.logging.setLogLevel(self._cv_log_level)
            self._cv_log_level = None
        if self.frames_dropped:
            log.warning("warning: the clip writer could not keep up and left out %d frames", self.frames_dropped)
        if self._say is not None and self.clip_dir is not None:
            self._say(f"event: the pre-roll ring held at most {self.ring_peak_frames} frames, "
                      f"{self.ring_peak_bytes / 1e6:.1f} MB of JPEGs")

    # -- writer thread

    def _run(self) -> None:
        while True:
            kind, item = self._mailbox.get()
            try:
                if kind == "stop":
                    for event_id in list(self._clips):
                        self._finish_clip(event_id)
                    return
                if kind == "frame":
                    if not HURRY.is_set():  # a second Ctrl-C: finish the clips with what they have
                        self._on_frame(item)
                elif kind == "start":
                    self._start_clip(*item)
                elif kind == "end":
                    self._on_end(*item)
            except Exception as exc:  # the writer must go on: one lost file is a warning, not a dead run
                self._fail(f"{type(exc).__name__}: {exc}" if not isinstance(exc, EdgesqzError) else str(exc))

    def _fail(self, message: str) -> None:
        self.errors.append(message)
        log.warning("warning: %s", message)

    def _on_frame(self, frame: _Frame) -> None:
        ok, buf = cv2.imencode(".jpg", frame.image, self.ring_params)
        if ok:
            data = buf.tobytes()
            self._ring.append((frame.timestamp, frame.index, data))
            self.ring_bytes += len(data)
            while self._ring and (frame.timestamp - self._ring[0][0] > self._ring_window
                                  or self.ring_bytes > self.ring_bytes_max):
                self.ring_bytes -= len(self._ring.popleft()[2])
            self.ring_peak_bytes = max(self.ring_peak_bytes, self.ring_bytes)
            self.ring_peak_frames = max(self.ring_peak_frames, len(self._ring))
        for clip in self._clips.values():
            clip.write(frame.image)

    def _ring_fps(self) -> float:
        """The rate frames reach the clip: measured over the ring when it spans a second, else the source's."""
        if len(self._ring) >= 2:
            span = self._ring[-1][0] - self._ring[0][0]
            if span >= 1.0:
                return (len(self._ring) - 1) / span
        return self._fps or DEFAULT_FPS

    def _start_clip(self, event_id: str, start: float) -> None:
        assert self.clip_dir is not None
        if not self._room(self.clip_dir, f"clip {event_id}.mp4"):
            return
        frames = [(t, jpeg) for t, _, jpeg in self._ring if t >= start - self.preroll_s]
        if not frames:
            self._fail(f"no frames for clip {event_id}.mp4 (the clip writer fell behind)")
            return
        first = cv2.imdecode(np.frombuffer(frames[0][1], np.uint8), cv2.IMREAD_COLOR)
        fps = round(self._ring_fps(), 3)
        clip = _Clip(self.clip_dir / f"{event_id}.mp4", fps, (first.shape[1], first.shape[0]),
                     max_frames=max(1, int(self.clip_max_s * fps)))
        for i, (_, jpeg) in enumerate(frames):
            if HURRY.is_set() and i:
                break
            clip.write(first if i == 0 else cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
        self._clips[event_id] = clip

    def _finish_clip(self, event_id: str) -> None:
        clip = self._clips.pop(event_id, None)
        if clip is not None:
            try:
                clip.finish()
            except EdgesqzError as exc:
                message = str(exc).replace("; pass --force to replace it", " (it is kept)")
                raise EdgesqzError(f"clip {clip.path} not written: {message}") from None
            self.written.append(clip.path)

    def _on_end(self, event_id: str, best: Result | None, clip: bool, snapshot: bool,
                rect: tuple[int, int, int, int] | None = None) -> None:
        try:
            if clip:
                self._finish_clip(event_id)
            if snapshot and best is not None and self.snapshot_dir is not None:
                self._snapshot(event_id, best, rect)
        finally:
            self._prune()

    def _snapshot(self, event_id: str, best: Result, rect: tuple[int, int, int, int] | None = None) -> None:
        assert self.snapshot_dir is not None
        if not self._room(self.snapshot_dir, f"snapshot {event_id}.jpg"):
            return
        image = best.frame.image
        if image.ndim == 3 and image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        pictures = [(self.snapshot_dir / f"{event_id}.jpg", annotate(image, best)),
                    (self.snapshot_dir / f"{event_id}.raw.jpg", image)]
        if rect is not None:
            x, y, w, h = rect
            pictures.append((self.snapshot_dir / f"{event_id}.crop.jpg", image[y:y + h, x:x + w]))
        for path, picture in pictures:
            ok, buf = cv2.imencode(".jpg", picture, self.jpeg_params)
            if not ok:
                self._fail(f"cannot encode snapshot {path}")
                continue
            if path.exists():
                self._fail(f"snapshot {path} not written: a file of that name exists (it is kept)")
                continue
            try:
                atomic_write(path, buf.tobytes(), force=False)
            except EdgesqzError as exc:  # a full disk; or the name was taken meanwhile (never replaced)
                self._fail(f"snapshot {path} not written: {exc}")
                continue
            self.written.append(path)

    def _room(self, folder: Path, what: str) -> bool:
        """Enough free space to write (after deleting old events when that is what it takes)?"""
        if shutil.disk_usage(folder).free >= self.min_free_bytes:
            return True
        self._prune(extra=True)
        if shutil.disk_usage(folder).free >= self.min_free_bytes:
            return True
        self._fail(f"{what} not written: less than {self.min_free_bytes / 1e6:g} MB free in {folder}")
        return False

    # -- bounded disk use

    def event_files(self) -> dict[str, list[Path]]:
        """Our events' files in the snapshot and clip folders, by event id, oldest event first."""
        groups: dict[str, list[Path]] = {}
        for folder in {d for d in (self.snapshot_dir, self.clip_dir) if d is not None}:
            with contextlib.suppress(OSError):
                for path in folder.iterdir():
                    if match := EVENT_FILE.match(path.name):
                        groups.setdefault(match.group(1), []).append(path)

        def age(item: tuple[str, list[Path]]) -> tuple[float, str]:
            times = []
            for p in item[1]:
                with contextlib.suppress(OSError):
                    times.append(p.stat().st_mtime)
            return (min(times) if times else 0.0, item[0])

        return dict(sorted(groups.items(), key=age))

    def _prune(self, extra: bool = False) -> None:
        """Delete the oldest events' files beyond ``keep`` events / ``max_disk_mb`` (``extra``: one more)."""
        groups = self.event_files()
        open_ids = set(self._clips)
        ids = [i for i in groups if i not in open_ids]
        excess = max(0, len(groups) - self.keep) + (1 if extra else 0)
        victims = ids[:excess] if len(ids) > 1 or not extra else []
        if self.max_disk_bytes is not None:
            def size(paths: list[Path]) -> int:
                total = 0
                for p in paths:
                    with contextlib.suppress(OSError):
                        total += p.stat().st_size
                return total
            total = sum(size(paths) for paths in groups.values())
            total -= sum(size(groups[v]) for v in victims)
            for event_id in ids[len(victims):-1]:  # never the newest event
                if total <= self.max_disk_bytes:
                    break
                victims.append(event_id)
                total -= size(groups[event_id])
        for event_id in victims:
            for path in groups[event_id]:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _remove_stale_parts(self) -> None:
        """Temporary files a crashed run left (untouched for 10 minutes)."""
        now = time.time()
        for folder in {d for d in (self.snapshot_dir, self.clip_dir) if d is not None}:
            with contextlib.suppress(OSError):
                for path in folder.iterdir():
                    if STALE_PART.match(path.name):
                        with contextlib.suppress(OSError):
                            if now - path.stat().st_mtime > STALE_PART_S:
                                path.unlink()
