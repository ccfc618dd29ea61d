"""A new model while ``edgesqz run`` runs: checked in the background, swapped between two frames.

:class:`ModelSwapper` takes a candidate model file (from the :class:`ModelWatcher`, when the file the
run was given is replaced or the models folder's ``latest`` moves, or from a fleet deployment) and,
in the caller's thread — never the camera loop's:

1. loads it as a :class:`Classifier` (the model validator reads every table before the runtime sees
   the file; the interpreter is built and warmed up),
2. checks it takes the same input as the running one (shape, type, quantisation of the input, colour
   order, normalisation: the cameras' reader threads prepare frames for it),
3. checks the run's event rules still name labels it has,
4. runs it once on the last frame (finite scores),

then hands it to :meth:`Pipeline.swap`, which switches between two frames: no frame is dropped, the
window, the web page and the MQTT connection stay as they are. A candidate that fails a step is
refused with its reason and the running model goes on. Every result names the model that produced
it (``model``: name, sha256 prefix, version).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesqz.errors import EdgesqzError

log = logging.getLogger("edgesqz.device")

WATCH_INTERVAL_S = 1.0


@dataclass(frozen=True)
class _Stamp:
    target: str
    inode: int
    size: int
    mtime_ns: int


def _stamp(path: Path) -> _Stamp | None:
    try:
        target = os.path.realpath(path)
        info = os.stat(target)
    except OSError:
        return None
    return _Stamp(target, info.st_ino, info.st_size, info.st_mtime_ns)


def input_contract(classifier: Any) -> dict[str, Any]:
    """What the cameras' reader threads prepare for a model: it must not change in a hot swap."""
    detail = classifier._input
    quant = detail.get("quantization") or (0.0, 0)
    spec = classifier.spec
    return {"shape": [int(v) for v in detail["shape"]], "dtype": str(np.dtype(detail["dtype"])),
            "quantization": [float(quant[0]), int(quant[1])], "color_order": getattr(spec, "color_order", None),
            "mean": [float(v) for v in np.ravel(getattr(spec, "mean", ()))],
            "std": [float(v) for v in np.ravel(getattr(spec, "std", ()))]}


class ModelSwapper:
    """Checks candidate models and swaps them into a running :class:`Pipeline` (see the module docstring).

    ``make``: builds a classifier from a path with the run's options (threads, delegate, top-k, ...).
    ``events``: the run's EventSink, if any (its rules must resolve against the new labels).
    ``on_result``: told of every outcome, ``(path, identity or None, reason or None)``.
    """

    def __init__(self, pipeline: Any, make: Callable[[Path], Any], *, events: Any = None,
                 say: Callable[[str], None] | None = None,
                 on_result: Callable[[Path, dict[str, Any] | None, str | None], None] | None = None) -> None:
        self.pipeline = pipeline
        self.make = make
        self.events = events
        self.say = say or (lambda message: log.warning("%s", message))
        self.on_result = on_result
        self.last_frame: np.ndarray | None = None
        self.swapped = 0
        self.refused = 0
        self.swap_ms: list[float] = []
        self._lock = threading.Lock()  # one candidate at a time
        pipeline.on_swap.append(self._swapped)

    def note_frame(self, image: np.ndarray) -> None:
        """The newest frame, for the smoke test (the pipeline's thread calls this; no copy)."""
        self.last_frame = image

    def offer(self, path: str | os.PathLike[str], *, version: str | None = None, wait: float = 10.0) -> str | None:
        """Check the model at ``path`` and swap it in; None when it is in use, else why it was refused."""
        path = Path(path)
        with self._lock:
            t0 = time.perf_counter()
            try:
                candidate = self._check(path, version)
            except EdgesqzError as exc:
                reason = str(exc)
                self.refused += 1
                self.say(f"warning: model {path} refused, the running model goes on: {reason}")
                if self.on_result is not None:
                    self.on_result(path, None, reason)
                return reason
            done = threading.Event()
            self.pipeline.swap(candidate, done.set)
            if not done.wait(wait) and not self.pipeline.stopping:
                self.say(f"model: {path} is checked and will be used from the next frame")
            elapsed = (time.perf_counter() - t0) * 1e3
            self.swap_ms.append(elapsed)
            ident = candidate.identity
            self.say(f"model: now {ident['name']} (sha256 {ident['sha256']}, version {ident['version']}); checked "
                     f"and swapped in {elapsed:.0f} ms without stopping")
            if self.on_result is not None:
                self.on_result(path, ident, None)
            return None

    def _check(self, path: Path, version: str | None) -> Any:
        running = self.pipeline.classifier
        candidate = self.make(path)
        if version is not None:
            candidate.version = version
        old, new = input_contract(running), input_contract(candidate)
        if old != new:
            diff = ", ".join(f"{k} {old[k]} -> {new[k]}" for k in old if old[k] != new[k])
            raise EdgesqzError(f"it takes another input than the running model ({diff}); convert it with the same "
                               "input size, type and preprocessing")
        if self.events is not None:
            self.events.check_labels(candidate.labels, candidate.num_classes)
        frame = self.last_frame
        if frame is not None:
            scores = candidate.scores(frame).scores
            if scores.shape != (candidate.num_classes,) or not np.isfinite(scores).all():
                raise EdgesqzError("it computes no finite scores on the last frame")
        return candidate

    def _swapped(self, old: Any, new: Any) -> None:
        self.swapped += 1
        if self.events is not None:
            self.events.relabel(new.labels, new.num_classes, new.identity)


class ModelWatcher:
    """Polls the model file the run was given (or the ``latest`` link it came from) and offers a new one.

    A replaced file (a new inode, size or modification time, seen twice in a row so a file still being
    copied is not read half-way) or a ``latest`` link that points elsewhere goes to ``offer``.
    """

    def __init__(self, path: Path, offer: Callable[[Path], Any], *, interval: float = WATCH_INTERVAL_S) -> None:
        self.path = Path(path)
        self.offer = offer
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgesqz-model-watch", daemon=True)
        self._current = _stamp(self.path)

    def start(self) -> ModelWatcher:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def _run(self) -> None:
        seen: _Stamp | None = None
        while not self._stop.wait(self.interval):
            stamp = _stamp(self.path)
            if stamp is None or stamp == self._current:
                seen = None
                continue
            if stamp != seen:  # changed since the last look: wait until it stays the same for one interval
                seen = stamp
                continue
            self._current = stamp
            seen = None
            try:
                self.offer(Path(stamp.target))
            except Exception as exc:  # the watcher must outlive any candidate
                log.warning("warning: model %s: %s", stamp.target, exc)
