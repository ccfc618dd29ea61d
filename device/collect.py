"""``edgesqz run --collect DIR``: frames (or zone crops) saved on the device as a dataset ``edgesqz train`` reads.

Layout (``edgesqz train --data DIR`` takes it as it is: one sub-folder per class; folders starting
with ``_`` are not classes)::

    DIR/_unsorted/20261206T101502.123Z-front-door.jpg    frames saved by a policy: you sort them
    DIR/open/20261206T101733.020Z-front-door.jpg         frames saved as a label (the --serve page)
    DIR/manifest.jsonl                                   one ``collected`` object per image

Policies (combinable): every ``every_s`` seconds; when the model is unsure (top-1 below
``unsure_below`` or a top-1/top-2 margin below ``margin_below`` — the frames that teach the most);
on each event start; and on request (``save_as(label)``, the page's "save as" control).

Near-duplicates are skipped (a 64-bit difference hash of a 9x8 grey image; within
``duplicate_bits`` bits of one of the recent images of the same camera and zone). The folder is
bounded (``max_files`` and ``max_mb``): the oldest unsorted images go first; labelled ones are
never deleted automatically (when only they are left, collection pauses and says so once).
Images are written whole (temporary file, rename) by a writer thread behind a bounded queue: the
camera loop never waits on the disk (an image the queue cannot take is counted, not waited for).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from edgesqz.device.eventsink import EventOutput
from edgesqz.device.sinks import Sink
from edgesqz.errors import EdgesqzError
from edgesqz.fileio import atomic_write, check_folder
from edgesqz.schema import dumps, record
from edgesqz.schema import top_k as schema_top_k

if TYPE_CHECKING:
    from edgesqz.device.events import Event
    from edgesqz.device.pipeline import Pipeline
    from edgesqz.device.results import Result, Summary

log = logging.getLogger("edgesqz.device")

UNSORTED = "_unsorted"
MANIFEST = "manifest.jsonl"
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.,'()-]{0,63}$")
QUEUE_SIZE = 8
RECENT_HASHES = 64


def dhash(image: np.ndarray) -> int:
    """A 64-bit difference hash: a 9x8 grey image, each bit says whether a pixel is brighter than its right one."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY if image.shape[2] == 4
                                                      else cv2.COLOR_BGR2GRAY)
    small = cv2.resize(grey, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def check_label(label: str) -> str:
    """A class name that is also a safe folder name."""
    text = label.strip()
    if not LABEL_RE.match(text) or text in (".", "..") or text.startswith("_"):
        raise EdgesqzError(f"label {label!r}: 1-64 letters, digits, spaces or _ . , ' ( ) -, starting with a letter "
                           "or digit")
    return text


@dataclass
class CollectPolicy:
    every_s: float | None = None
    unsure_below: float | None = None
    margin_below: float | None = None
    on_event: bool = False
    duplicate_bits: int = 6
    max_files: int = 2000
    max_mb: float = 500.0

    def check(self) -> CollectPolicy:
        import math

        for name, value, lo, hi in (("--collect-every", self.every_s, 0.05, 86400.0),
                                    ("--collect-unsure", self.unsure_below, 0.0, 1.0),
                                    ("--collect-margin", self.margin_below, 0.0, 1.0),
                                    ("--collect-max-mb", self.max_mb, 1.0, 1e7)):
            if value is not None and not (math.isfinite(value) and lo < value <= hi):
                raise EdgesqzError(f"{name} must be a number in ({lo:g}, {hi:g}], got {value}")
        if not 1 <= self.max_files <= 10_000_000:
            raise EdgesqzError(f"--collect-max-files must be 1..10000000, got {self.max_files}")
        if not 0 <= self.duplicate_bits <= 32:
            raise EdgesqzError(f"the duplicate threshold must be 0..32 bits, got {self.duplicate_bits}")
        return self


class Collector(Sink):
    """Saves frames or zone crops by policy (see the module docstring). A pipeline sink; also an event output
    (:meth:`event_output`) for the on-event policy, and :meth:`save_as` for the page's control."""

    def __init__(self, folder: str | os.PathLike[str], policy: CollectPolicy | None = None, *,
                 say: Callable[[str], None] | None = None) -> None:
        self.folder = check_folder(folder, option="--collect").resolve()
        self.policy = (policy or CollectPolicy(every_s=30.0)).check()
        self.say = say or (lambda message: log.warning("%s", message))
        self.saved = 0
        self.skipped_duplicates = 0
        self.dropped = 0  # the writer was busy
        self.deleted = 0
        self._latest: Result | None = None
        self._latest_by_camera: dict[str | None, Result] = {}
        self._last_saved: dict[tuple[str | None, str | None], float] = {}
        self._hashes: dict[tuple[str | None, str | None], collections.deque[int]] = {}
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name="edgesqz-collect", daemon=True)
        self._lock = threading.Lock()
        self._paused = False
        self._files = self._scan()

    # -- Sink

    def open(self, pipeline: Pipeline | None = None) -> None:
        self._thread.start()

    def write(self, result: Result) -> None:
        with self._lock:
            self._latest = result
            self._latest_by_camera[result.camera] = result
        now = result.frame.timestamp  # the source's clock (a video file's own time when read at full speed)
        p = self.policy
        for zone, scores, _top in result.scopes():
            key = (result.camera, zone)
            why = None
            order = np.argsort(scores)[::-1][:2]
            top1 = float(scores[order[0]])
            margin = top1 - float(scores[order[1]]) if len(order) > 1 else 1.0
            if p.unsure_below is not None and top1 < p.unsure_below:
                why = "unsure"
            elif p.margin_below is not None and margin < p.margin_below:
                why = "margin"
            elif p.every_s is not None and now - self._last_saved.get(key, -1e18) >= p.every_s:
                why = "every"
            if why is not None:
                self._offer(result, zone, why, None, now)

    def close(self, summary: Summary | None) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(10.0)
        if self.saved or self.dropped or self.skipped_duplicates:
            self.say(f"collect: {self.saved} images saved in {self.folder} ({self.skipped_duplicates} near-duplicates "
                     f"skipped, {self.dropped} left out while the disk was busy, {self.deleted} old unsorted deleted)")

    # -- other ways in

    def event_output(self) -> EventOutput:
        collector = self

        class _OnEvent(EventOutput):
            def event(self, rec: dict[str, Any], event: Event, best: Result | None) -> None:
                if rec["state"] == "start" and collector.policy.on_event:
                    latest = collector._latest
                    if latest is not None:
                        collector._offer(latest, event.zone, f"event:{event.name}", None, time.monotonic())

        return _OnEvent()

    def save_as(self, label: str, camera: str | None = None, zone: str | None = None) -> str:
        """Save the newest frame (its zone's crop with ``zone``) under ``label``; the file name it will have."""
        label = check_label(label)
        with self._lock:
            latest = self._latest_by_camera.get(camera) if camera is not None else self._latest
        if latest is None:
            raise EdgesqzError(f"no frame from camera {camera!r} yet" if camera else "no frame yet")
        if zone is not None and not any(z == zone for z, _, _ in latest.scopes()):
            raise EdgesqzError(f"no zone {zone!r} in the newest frame")
        name = self._offer(latest, zone, "page", label, time.monotonic(), force=True)
        if name is None:
            raise EdgesqzError("the writer is busy; try again")
        return name

    # -- policy -> queue

    def _offer(self, result: Result, zone: str | None, why: str, label: str | None, now: float,
               force: bool = False) -> str | None:
        key = (result.camera, zone)
        image = result.frame.image
        scores = result.scores
        if zone is not None and result.zones:
            z = next(z for z in result.zones if z.name == zone)
            x, y, w, h = z.rect
            image, scores = image[y:y + h, x:x + w], z.scores
        if self._paused and label is None:
            return None
        digest = dhash(image)
        recent = self._hashes.setdefault(key, collections.deque(maxlen=RECENT_HASHES))
        if not force and any(bin(digest ^ h).count("1") <= self.policy.duplicate_bits for h in recent):
            self.skipped_duplicates += 1
            self._last_saved[key] = now
            return None
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(result.frame.timestamp)) + \
            f".{int(result.frame.timestamp * 1000) % 1000:03d}Z"
        parts = [stamp, *(p for p in (result.camera, zone) if p)]
        name = "-".join(parts) + ".jpg"
        top = schema_top_k(scores, self.labels, 5)
        item = (image.copy(), label, name, {"time": round(result.frame.timestamp, 6), "camera": result.camera,
                                             "zone": zone, "frame": result.frame.index, "reason": why,
                                             "model": result.model, "top_k": top})
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            return None
        recent.append(digest)
        self._last_saved[key] = now
        return f"{label or UNSORTED}/{name}"

    # -- writer thread

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            image, label, name, facts = item
            try:
                self._write(image, label, name, facts)
            except EdgesqzError as exc:
                self.say(f"warning: collect: {exc}")
            except Exception as exc:  # the writer must not die silently
                self.say(f"warning: collect: {type(exc).__name__}: {exc}")

    def _write(self, image: np.ndarray, label: str | None, name: str, facts: dict[str, Any]) -> None:
        folder = self.folder / (label or UNSORTED)
        folder.mkdir(exist_ok=True)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise EdgesqzError(f"cannot encode {name}")
        data = buf.tobytes()
        if not self._room(len(data), label):
            return
        path = folder / name
        i = 1
        while path.exists():
            path = folder / f"{Path(name).stem}_{i}.jpg"
            i += 1
        atomic_write(path, data, force=False)
        line = record("collected", file=str(path.relative_to(self.folder)), label=label, **facts)
        with open(self.folder / MANIFEST, "a", encoding="utf-8") as f:
            f.write(dumps(line) + "\n")
        with self._lock:
            self._files.append((path, len(data), label is not None))
        self.saved += 1

    labels: list[str] | None = None

    def known_labels(self) -> set[str]:
        """The labels a user has saved images under (the folder's class sub-folders)."""
        return {d.name for d in self.folder.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))}

    def _scan(self) -> list[tuple[Path, int, bool]]:
        """Images already in the folder (oldest first): (path, bytes, labelled)."""
        found = []
        for sub in self.folder.iterdir() if self.folder.is_dir() else ():
            if not sub.is_dir() or sub.name.startswith("."):
                continue
            for f in sub.iterdir():
                if f.suffix.lower() == ".jpg" and f.is_file():
                    with contextlib.suppress(OSError):
                        st = f.stat()
                        found.append((st.st_mtime, f, st.st_size, sub.name != UNSORTED))
        found.sort(key=lambda t: (t[0], str(t[1])))
        return [(f, size, labelled) for _, f, size, labelled in found]

    def _room(self, size: int, label: str | None) -> bool:
        """Delete the oldest unsorted images until one more fits the bounds; False when only labelled ones are left
        (an unsorted image is then not written; a labelled one always is)."""
        p = self.policy
        with self._lock:
            files = self._files
            total = sum(s for _, s, _ in files)
            while len(files) + 1 > p.max_files or (total + size) / 1e6 > p.max_mb:
                victim = next((f for f in files if not f[2]), None)
                if victim is None:
                    break
                files.remove(victim)
                total -= victim[1]
                with contextlib.suppress(OSError):
                    victim[0].unlink()
                self.deleted += 1
            full = len(files) + 1 > p.max_files or (total + size) / 1e6 > p.max_mb
        if full and label is None:
            if not self._paused:
                self._paused = True
                self.say(f"warning: collect: {self.folder} holds {p.max_files} images or {p.max_mb:g} MB of labelled "
                         "images; no more unsorted frames are saved (labelled images are never deleted automatically)")
            return False
        return True


def manifest(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The ``collected`` objects of a collection folder."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
