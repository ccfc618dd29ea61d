"""``--webhook URL``: POST each event (start and end) as JSON, from a background thread.

The camera loop only appends the event's record to a bounded queue (``max_queued``, default 100;
when it is full the oldest waiting event is dropped and counted). One thread per URL sends them
in order: ``POST URL`` with ``Content-Type: application/json`` and the ``event`` record as body,
a ``timeout`` per request (5 s). A connection error, a timeout, HTTP 5xx, 408 or 429 is retried
with back-off (0.5 s doubling to 30 s, or the server's ``Retry-After``), up to ``retries`` times
(default 5), then the event is dropped with a warning; another 4xx is not retried. Any 2xx is
delivered. At the end of the run the queue gets ``drain_s`` (10 s) to empty.

Home Assistant's webhook trigger takes these as they are: ``--webhook http://homeassistant.local:8123/api/webhook/ID``.
"""

from __future__ import annotations

import collections
import logging
import threading
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from edgesqz._version import __version__
from edgesqz.device.eventsink import EventOutput
from edgesqz.errors import EdgesqzError
from edgesqz.schema import dumps

if TYPE_CHECKING:
    from edgesqz.device.events import Event
    from edgesqz.device.eventsink import EventSink
    from edgesqz.device.results import Result

log = logging.getLogger("edgesqz.device.webhook")

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


def check_webhook_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EdgesqzError(f"--webhook takes an http:// or https:// URL, not {url!r}")
    return url.strip()


class WebhookOutput(EventOutput):
    """POSTs event records to ``url`` in order from its own thread (see the module docstring)."""

    def __init__(self, url: str, *, timeout: float = 5.0, retries: int = 5, max_queued: int = 100,
                 backoff: tuple[float, float] = (0.5, 30.0), drain_s: float = 10.0,
                 headers: dict[str, str] | None = None) -> None:
        self.url = check_webhook_url(url)
        self.timeout = timeout
        self.retries = retries
        self.max_queued = max_queued
        self.backoff = backoff
        self.drain_s = drain_s
        self.headers = {"Content-Type": "application/json", "User-Agent": f"edgesqz/{__version__}",
                        **(headers or {})}
        self.delivered = 0
        self.failed = 0  # given up after the retries, or refused with a 4xx
        self.dropped = 0  # pushed out of a full queue
        self.attempts = 0
        self._queue: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._busy = False
        self._thread: threading.Thread | None = None

    def describe(self) -> str:
        return f"POST {urlsplit(self.url)._replace(query='', fragment='').geturl()} (timeout {self.timeout:g} s)"

    # -- EventOutput (camera loop: never blocks)

    def open(self, sink: EventSink | None = None) -> None:
        self._thread = threading.Thread(target=self._run, name="edgesqz-webhook", daemon=True)
        self._thread.start()

    def event(self, record: dict[str, Any], event: Event | None = None, best: Result | None = None) -> None:
        body = dumps(record).encode()
        with self._cond:
            if len(self._queue) >= self.max_queued:
                self._queue.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 100 == 0:
                    log.warning("warning: webhook %s: %d events waiting; dropped the oldest (%d so far)",
                                self.url, self.max_queued, self.dropped)
            self._queue.append(body)
            self._cond.notify()

    def close(self) -> None:
        """Give the queue ``drain_s`` seconds to empty, then stop."""
        if self._thread is None:
            return
        with self._cond:
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._queue and not self._busy, self.drain_s)
            left = len(self._queue) + (1 if self._busy else 0)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(self.timeout + 1.0)
        self._thread = None
        if left:
            log.warning("warning: webhook %s: %d events not delivered when the run ended", self.url, left)

    # -- sender thread

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stop.is_set())
                if self._stop.is_set():
                    return
                body = self._queue[0]
                self._busy = True
            try:
                self._deliver(body)
            finally:
                with self._cond:
                    if self._queue and self._queue[0] is body:
                        self._queue.popleft()
                    self._busy = False
                    self._cond.notify_all()

    def _deliver(self, body: bytes) -> None:
        delay, max_delay = self.backoff
        for attempt in range(self.retries + 1):
            self.attempts += 1
            retry_after: float | None = None
            try:
                request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read(65536)
                self.delivered += 1
                return
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRY_STATUS:
                    self.failed += 1
                    log.warning("warning: webhook %s answered HTTP %d %s; event not delivered", self.url, exc.code,
                                exc.reason)
                    return
                why = f"HTTP {exc.code}"
                header = exc.headers.get("Retry-After") if exc.headers else None
                if header and header.strip().isdigit():
                    retry_after = float(header.strip())
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                why = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
            if attempt == self.retries:
                self.failed += 1
                log.warning("warning: webhook %s failed %d times (last: %s); event dropped", self.url,
                            self.retries + 1, why)
                return
            wait = min(max_delay, retry_after if retry_after is not None else delay)
            if self._stop.wait(wait):
                return
            delay = min(max_delay, delay * 2)
