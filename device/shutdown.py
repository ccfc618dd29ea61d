"""The end of a run: one shared deadline for everything that drains at exit, and a "hurry" flag.

:class:`Drain` is one overall deadline for several outputs that empty their queues when the run
ends (all the ``--webhook`` URLs together): it starts when the first of them closes, so N hanging
endpoints cost ``seconds`` once, not N times. Their threads keep sending in parallel meanwhile.

:data:`HURRY` is set by a second Ctrl-C while the run is closing (see
:meth:`edgesqz.device.pipeline.Pipeline._signals`): instead of raising KeyboardInterrupt in the
middle of a clip being finalised (which aborted the process, rc 134, and left an announced clip as a
hidden ``.part``), every drain gives up waiting at once, and the clip writer finalises the clips it
has without writing the frames still queued.
"""

from __future__ import annotations

import threading
import time

HURRY = threading.Event()


class Drain:
    """One deadline shared by several drains (started by the first :meth:`deadline` call)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self._end: float | None = None
        self._lock = threading.Lock()

    def deadline(self) -> float:
        """The ``time.monotonic()`` by which every drain sharing this object must be done."""
        with self._lock:
            if self._end is None:
                self._end = time.monotonic() + self.seconds
            return self._end

    def remaining(self) -> float:
        return 0.0 if HURRY.is_set() else max(0.0, self.deadline() - time.monotonic())
