"""Source -> classifier -> sinks, until the source ends, a limit is reached or a signal arrives.

``Pipeline(source, classifier, sinks).run()`` is all ``edgesqz run`` does. The source's reader
thread decodes and prepares frame N+1 while the interpreter runs on frame N; the main thread
only sets the input tensor, invokes, post-processes and hands the :class:`Result` to each sink.
SIGINT, SIGTERM and SIGHUP (a dropped SSH session) stop the loop cleanly; the sinks then receive the
:class:`Summary`, so JSON lines end with it and a recording is finalised. A second SIGINT never
interrupts that (a KeyboardInterrupt in the middle of finalising a video aborted the process in the
encoder's C++ thread, rc 134, and left the clip it had announced as a hidden ``.part``): it sets
:data:`edgesqz.device.shutdown.HURRY` instead, so the drains at the end (webhooks, MQTT, queued clip
frames) stop waiting and the run ends within a second or two, with every announced file complete.
When the close was quicker than the second Ctrl-C, that one is absorbed too (within 2 s after the run).
A SIGHUP that is ignored (``nohup``) stays ignored.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from edgesqz.device.classifier import Classifier
from edgesqz.device.config import CameraConfig
from edgesqz.device.results import Result, Summary, ZoneResult
from edgesqz.device.shutdown import HURRY
from edgesqz.device.sinks import Sink
from edgesqz.device.site import CameraRun
from edgesqz.device.sources import Frame, FrameSource
from edgesqz.errors import EdgesqzError

log = logging.getLogger("edgesqz.device")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Pipeline:
    """Classify every frame a source delivers and pass the results to sinks.

    ``top_k`` / ``threshold`` default to the classifier's. ``max_frames`` and ``duration`` (seconds)
    limit the run. The source must not be started yet: the pipeline starts it with the
    classifier's ``prepare`` so preprocessing runs in the reader thread. ``opencv_threads``: the
    size of OpenCV's thread pool while running (1; None leaves it alone).
    """

    def __init__(
        self,
        source: FrameSource | Sequence[CameraRun],
        classifier: Classifier,
        sinks: Sequence[Sink] = (),
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        max_frames: int | None = None,
        duration: float | None = None,
        handle_signals: bool = True,
        opencv_threads: int | None = 1,
    ) -> None:
        if max_frames is not None and max_frames < 1:
            raise EdgesqzError(f"--max-frames must be >= 1, got {max_frames}")
        if duration is not None and not (math.isfinite(duration) and duration > 0):
            raise EdgesqzError(f"--duration must be a number of seconds > 0, got {duration}")
        if top_k is not None and top_k < 1:
            raise EdgesqzError(f"--top-k must be >= 1, got {top_k}")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise EdgesqzError(f"--threshold must be between 0 and 1, got {threshold}")
        if not isinstance(source, (list, tuple)):  # one source (a FrameSource, or anything that acts like one)
            self.cameras = [CameraRun(CameraConfig(name="camera", named=False), source)]  # type: ignore[arg-type]
        else:
            self.cameras = list(source)
            if not self.cameras:
                raise EdgesqzError("no camera or source to classify")
        self.multi = len(self.cameras) > 1 or any(c.config.named or c.zones for c in self.cameras)
        self.source = self.cameras[0].source  # the (first) source
        self.classifier = classifier
        self.sinks = list(sinks)
        self.top_k = top_k
        self.threshold = threshold
        self.max_frames = max_frames
        self.duration = duration
        self.handle_signals = handle_signals
        self.opencv_threads = opencv_threads
        self.summary = Summary(source=" + ".join(c.source.description for c in self.cameras),
                               runtime=classifier.runtime_info())
        self._stop_reason: str | None = None
        self._lock = threading.Lock()
        self._identity = getattr(classifier, "identity", None)
        self._pending: tuple[Classifier, Callable[[], None] | None] | None = None
        self.on_swap: list[Callable[[Classifier, Classifier], None]] = []  # (old, new), between two frames
        self.swaps = 0

    def swap(self, classifier: Classifier, done: Callable[[], None] | None = None) -> None:
        """Use ``classifier`` from the next frame on (thread-safe; the caller has checked it). ``done`` is
        called in the pipeline's thread once the swap happened."""
        with self._lock:
            self._pending = (classifier, done)

    def _apply_swap(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        new, done = pending
        old, self.classifier = self.classifier, new
        self._identity = new.identity
        self.summary.runtime = new.runtime_info()
        for cam in self.cameras:  # a zone's last result came from the old model: classify every zone again
            cam.last_scores = [None] * len(cam.zones)
        self.swaps += 1
        for hook in self.on_swap:
            hook(old, new)
        if done is not None:
            done()

    def stop(self, reason: str = "stop") -> None:
        """Ask the loop to finish after the current frame (thread- and signal-safe)."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason

    @property
    def stopping(self) -> bool:
        return self._stop_reason is not None

    # -- running

    def run(self) -> Summary:
        """Run to the end, feeding every sink; returns (and gives the sinks) the summary."""
        with self._signals(), self._opencv_threads():
            opened: list[Sink] = []
            ok = False
            try:
                for sink in self.sinks:
                    sink.open(self)
                    opened.append(sink)
                with contextlib.closing(self.results()) as results:
                    for result in results:
                        for sink in opened:
                            sink.write(result)
                        if any(sink.stop_requested for sink in opened):
                            self.stop(next(s.stop_reason for s in opened if s.stop_requested))
                ok = True
            finally:
                if not ok and self._stop_reason is None:
                    self.summary.stopped_by = "error"
                errors = []
                for sink in reversed(opened):  # last opened, first closed: a sink may write into earlier ones
                    try:
                        sink.close(self.summary if ok else None)
                    except EdgesqzError as exc:
                        errors.append(exc)
                if ok and errors:
                    raise errors[0]
        return self.summary

    def results(self) -> Iterator[Result]:
        """Classify frames one by one, from every camera (the sources are started here and closed at the end)."""
        summary = self.summary
        cams = self.cameras
        wake = threading.Event()
        several = len(cams) > 1
        for cam in cams:
            cam.source.notify = wake if several else None
            # the current classifier's preprocessing, also after a hot swap (same input contract)
            cam.source.start(prepare_frame=cam.preparer(lambda image: self.classifier.prepare(image)),
                             open_in_thread=several)
        t_start = time.perf_counter()
        deadline = t_start + self.duration if self.duration else None
        first: float | None = None
        last = t_start
        try:
            while not self.stopping:
                self._apply_swap()
                now = time.perf_counter()
                if deadline is not None and now >= deadline:
                    self.stop("duration")
                    break
                timeout = 0.1 if deadline is None else max(0.0, min(0.1, deadline - now))
                got = False
                for cam in cams:
                    if cam.finished:
                        continue
                    frame = self._read(cam, 0.0 if several else timeout)
                    if frame is None:
                        continue
                    got = True
                    if first is None:
                        first = time.perf_counter()
                    self._apply_swap()
                    result = self._classify(cam, frame)
                    last = time.perf_counter()
                    yield result
                    if self.max_frames is not None and summary.frames >= self.max_frames:
                        self.stop("max_frames")
                    if self.stopping:
                        break
                if all(cam.finished for cam in cams):
                    failed = [cam for cam in cams if cam.failed]
                    if several and len(failed) == len(cams):
                        raise EdgesqzError("every camera failed: " + "; ".join(f"{c.name}: {c.failed}" for c in failed))
                    self.stop("end_of_source")
                    break
                if several and not got:
                    wake.wait(timeout)
                    wake.clear()
        finally:
            statuses = {c.name: c.status() for c in cams}  # as they were, before closing says "ended"
            for cam in cams:
                cam.source.close()
            summary.duration_s = (last - first) if first is not None else 0.0
            summary.captured = sum(c.source.captured for c in cams)
            summary.dropped = sum(c.source.dropped for c in cams)
            summary.skipped = sum(len(getattr(c.source.capture, "skipped", ())) for c in cams)
            summary.reconnects = sum(c.source.reconnects for c in cams)
            if self.multi:
                summary.cameras = statuses
            summary.stopped_by = self._stop_reason or "stop"

    def _read(self, cam: CameraRun, timeout: float) -> Frame | None:
        """The camera's next frame; a camera of several that fails for good is reported and left out."""
        try:
            frame = cam.source.read(timeout=timeout)
        except EdgesqzError as exc:
            if len(self.cameras) == 1:
                raise
            cam.failed, cam.finished = str(exc), True
            log.warning("warning: camera %s is unavailable: %s; the other cameras go on", cam.name, exc)
            return None
        if frame is None and cam.source.ended:
            cam.finished = True
        return frame

    def _classify(self, cam: CameraRun, frame: Frame) -> Result:
        classifier = self.classifier
        zones: list[ZoneResult] | None = None
        if frame.zones is not None:
            for i, zin in enumerate(frame.zones):
                if zin.tensor is None and cam.last_scores[i] is None:  # gated, but nothing to reuse (a new model)
                    x, y, w, h = zin.rect
                    zin.tensor = classifier.prepare(frame.image[y:y + h, x:x + w])
            todo = [i for i, z in enumerate(frame.zones) if z.tensor is not None]
            outs = classifier.infer_many([frame.zones[i].tensor for i in todo])  # type: ignore[misc]
            timings: dict[str, float] = {"inference": 0.0, "postprocess": 0.0}
            for i, out in zip(todo, outs, strict=True):
                cam.last_scores[i] = out.scores
                for key in timings:
                    timings[key] += out.timings.get(key, 0.0)
            zones = []
            for i, (view, zin) in enumerate(zip(cam.zones, frame.zones, strict=True)):
                scores = cam.last_scores[i]
                assert scores is not None  # the first frame classifies every zone
                zones.append(ZoneResult(name=view.name, rect=zin.rect, scores=scores,
                                        top_k=classifier.top(scores, self.top_k, self.threshold),
                                        classified=zin.tensor is not None, motion=zin.motion))
                zin.tensor = None
            scores_all = zones[0].scores
            top: list[dict[str, Any]] = []
        else:
            if frame.input is None:  # a source started without prepare
                t0 = time.perf_counter()
                frame.input = classifier.prepare(frame.image)
                frame.prepare_ms = (time.perf_counter() - t0) * 1e3
            out = classifier.infer(frame.input)
            timings, scores_all = out.timings, out.scores
            top = classifier.top(out.scores, self.top_k, self.threshold)
        done = time.perf_counter()
        fps = cam.tick(done)
        latency = {"preprocess": frame.prepare_ms, **timings, "end_to_end": (done - frame.captured) * 1e3}
        self.summary.add(latency)
        frame.input = None  # the tensor is no longer needed; keep results light
        return Result(source=cam.source.description, frame=frame, seq=self.summary.frames - 1, top_k=top,
                      scores=scores_all, latency_ms=latency, fps=fps, camera=cam.name if self.multi else None,
                      zones=zones, model=self._identity)

    @contextlib.contextmanager
    def _opencv_threads(self) -> Iterator[None]:
        """OpenCV's own thread pool off while running (``opencv_threads=1``, the default).

        The interpreter's threads own the cores; OpenCV splitting each resize over a pool of
        spinning workers only takes CPU time away from them. Restored afterwards.
        """
        if self.opencv_threads is None:
            yield
            return
        import cv2

        previous = cv2.getNumThreads()
        cv2.setNumThreads(self.opencv_threads)
        try:
            yield
        finally:
            cv2.setNumThreads(previous)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM/SIGHUP -> stop after the current frame; a second SIGINT -> hurry the end (HURRY)."""
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: Any) -> None:
            name = signal.Signals(signum).name
            if self.stopping and signum == signal.SIGINT:
                HURRY.set()  # never KeyboardInterrupt while closing: shorten the drains instead
                return
            self.stop(name)

        HURRY.clear()

        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS
                    if not (s == signal.SIGHUP and signal.getsignal(s) is signal.SIG_IGN)}  # nohup
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self._absorb_late_sigint(previous.get(signal.SIGINT))

    def _absorb_late_sigint(self, previous: Any, grace_s: float = 2.0) -> None:
        """After a run a signal stopped, the second Ctrl-C may come just after the (quick) close: within
        ``grace_s`` it only sets HURRY, once, instead of interrupting the exit that is under way."""
        if not (callable(previous) and self._stop_reason in {s.name for s in STOP_SIGNALS}) or HURRY.is_set():
            return
        until = time.monotonic() + grace_s

        def late(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, previous)
            if time.monotonic() < until:
                HURRY.set()
                return
            previous(signum, frame)

        signal.signal(signal.SIGINT, late)
