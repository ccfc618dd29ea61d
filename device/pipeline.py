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
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from edgesqz.device.classifier import Classifier
from edgesqz.device.results import Result, Summary
from edgesqz.device.shutdown import HURRY
from edgesqz.device.sinks import Sink
from edgesqz.device.sources import FrameSource
from edgesqz.errors import EdgesqzError

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
        source: FrameSource,
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
        self.source = source
        self.classifier = classifier
        self.sinks = list(sinks)
        self.top_k = top_k
        self.threshold = threshold
        self.max_frames = max_frames
        self.duration = duration
        self.handle_signals = handle_signals
        self.opencv_threads = opencv_threads
        self.summary = Summary(source=source.description, runtime=classifier.runtime_info())
        self._stop_reason: str | None = None
        self._lock = threading.Lock()

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
        """Classify frames one by one (the source is started here and closed at the end)."""
        summary = self.summary
        source = self.source
        source.start(prepare=self.classifier.prepare)
        t_start = time.perf_counter()
        deadline = t_start + self.duration if self.duration else None
        first: float | None = None
        last = t_start
        recent: deque[float] = deque(maxlen=30)
        try:
            while not self.stopping:
                now = time.perf_counter()
                if deadline is not None and now >= deadline:
                    self.stop("duration")
                    break
                timeout = 0.1 if deadline is None else max(0.0, min(0.1, deadline - now))
                frame = source.read(timeout=timeout)
                if frame is None:
                    if source.ended:
                        self.stop("end_of_source")
                    continue
                if first is None:
                    first = time.perf_counter()
                if frame.input is None:  # a source started without prepare
                    t0 = time.perf_counter()
                    frame.input = self.classifier.prepare(frame.image)
                    frame.prepare_ms = (time.perf_counter() - t0) * 1e3
                out = self.classifier.infer(frame.input)
                top = self.classifier.top(out.scores, self.top_k, self.threshold)
                last = time.perf_counter()
                recent.append(last)
                latency = {"preprocess": frame.prepare_ms, **out.timings, "end_to_end": (last - frame.captured) * 1e3}
                summary.add(latency)
                span = recent[-1] - recent[0]
                fps = (len(recent) - 1) / span if span > 0 else 0.0
                frame.input = None  # the tensor is no longer needed; keep results light
                yield Result(source=source.description, frame=frame, seq=summary.frames - 1, top_k=top,
                             scores=out.scores, latency_ms=latency, fps=fps)
                if self.max_frames is not None and summary.frames >= self.max_frames:
                    self.stop("max_frames")
        finally:
            source.close()
            summary.duration_s = (last - first) if first is not None else 0.0
            summary.captured = source.captured
            summary.dropped = source.dropped
            summary.skipped = len(getattr(source.capture, "skipped", ()))
            summary.reconnects = source.reconnects
            summary.stopped_by = self._stop_reason or "stop"

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
