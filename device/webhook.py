"""``--webhook URL``: POST each event (start and end) as JSON, from a background thread.

The camera loop only appends the event's record to a bounded queue (``max_queued``, default 100;
when it is full the oldest waiting event is dropped and counted). One thread per URL sends them
in order: ``POST URL`` with ``Content-Type: application/json`` and the ``event`` record as body,
a ``timeout`` per request (5 s). A connection error, a timeout, HTTP 5xx, 408 or 429 is retried
with back-off (0.5 s doubling to 30 s, or the server's ``Retry-After``), up to ``retries`` times
(default 5), then the event is dropped with a warning; another 4xx is not retried. Any 2xx is
delivered. At the end of the run the queues of all the URLs get ``drain_s`` (10 s) together to empty,
in parallel (:class:`~edgesqz.device.shutdown.Drain`: one deadline, however many URLs hang), less
after a second Ctrl-C; then each URL's counts and its last failure are printed.

A redirect is followed only when it keeps the POST and its body (307, 308); 301, 302 and 303 would turn
it into a GET without the event, so the event is reported as not delivered, with the redirect's target.
``http://USER:PASSWORD@host/...`` sends HTTP Basic authentication; the password is never printed
(``http://USER:***@host/``).

Home Assistant's webhook trigger takes these as they are: ``--webhook http://homeassistant.local:8123/api/webhook/ID``.
"""

from __future__ import annotations

import base64
import collections
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from edgesqz._version import __version__
from edgesqz.device import options
from edgesqz.device.eventsink import EventOutput
from edgesqz.device.shutdown import HURRY, Drain
from edgesqz.schema import dumps

if TYPE_CHECKING:
    from edgesqz.device.events import Event
    from edgesqz.device.eventsink import EventSink
    from edgesqz.device.results import Result

log = logging.getLogger("edgesqz.device.webhook")

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


WEBHOOK_USAGE = "--webhook takes an http:// or https:// URL"


def check_webhook_url(url: str) -> str:
    """The URL (stripped) when it is an http(s) URL with a valid host and port (see :mod:`~edgesqz.device.options`)."""
    options.parse_url(url, "--webhook", {"http": 80, "https": 443}, WEBHOOK_USAGE)
    return url.strip()


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow 307/308 with the same method, body and headers; refuse 301/302/303 (they would drop the POST)."""

    max_redirections = 5

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if code not in (307, 308):
            raise urllib.error.HTTPError(req.full_url, code, f"{msg}, redirect to {options.redact_url(newurl)} not "
                                         "followed (only 307/308 keep the POST and its body)", headers, fp)
        kept = {k: v for k, v in req.header_items()
                if k.lower() != "authorization" or urlsplit(newurl).netloc == urlsplit(req.full_url).netloc}
        return urllib.request.Request(newurl, data=req.data, headers=kept, method=req.get_method())


_OPENER = urllib.request.build_opener(_Redirects)


class WebhookOutput(EventOutput):
    """POSTs event records to ``url`` in order from its own thread (see the module docstring)."""

    def __init__(self, url: str, *, timeout: float = 5.0, retries: int = 5, max_queued: int = 100,
                 backoff: tuple[float, float] = (0.5, 30.0), drain_s: float = 10.0,
                 headers: dict[str, str] | None = None, drain: Drain | None = None,
                 say: Any = None) -> None:
        target = options.parse_url(url, "--webhook", {"http": 80, "https": 443}, WEBHOOK_USAGE)
        self.shown = options.redact_url(url.strip())  # what messages print: never the password
        self.url = target.without_userinfo()  # what is sent; the user and password go in a header
        self.timeout = timeout
        self.retries = retries
        self.max_queued = max_queued
        self.backoff = backoff
        self.drain_s = drain_s
        self.headers = {"Content-Type": "application/json", "User-Agent": f"edgesqz/{__version__}",
                        **(headers or {})}
        if target.username is not None:
            token = base64.b64encode(f"{target.username}:{target.password or ''}".encode()).decode()
            self.headers.setdefault("Authorization", f"Basic {token}")
        self.drain = drain or Drain(drain_s)
        self._say = say
        self.last_reason: str | None = None  # why the last event was not delivered
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
        auth = " with Basic authentication" if "Authorization" in self.headers else ""
        return (f"POST {urlsplit(self.shown)._replace(query='', fragment='').geturl()}{auth} "
                f"(timeout {self.timeout:g} s)")

    def report(self) -> str:
        """This URL's counts, and the last reason an event was not delivered."""
        lost = self.failed + self.dropped
        text = f"webhook {self.shown}: {self.delivered} delivered, {lost} not delivered"
        return text + (f" (last: {self.last_reason})" if lost and self.last_reason else "")

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
                    self.last_reason = "the queue was full"
                    log.warning("warning: webhook %s: %d events waiting; dropped the oldest (%d so far)",
                                self.shown, self.max_queued, self.dropped)
            self._queue.append(body)
            self._cond.notify()

    def close(self) -> None:
        """Let the queue empty until the shared deadline (``drain_s`` for all URLs together), then stop."""
        if self._thread is None:
            return
        deadline = self.drain.deadline()
        with self._cond:
            self._cond.notify_all()
            while (self._queue or self._busy) and not HURRY.is_set():
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    break
                self._cond.wait(min(0.1, left_s))
            left = len(self._queue)  # the one being sent is still the queue's first
            busy = self._busy
            self._stop.set()
            self._cond.notify_all()
        # A request still under way is not waited for beyond the deadline (the thread is a daemon).
        self._thread.join(max(0.0, deadline - time.monotonic()) if not HURRY.is_set() else 0.0)
        self._thread = None
        if left:
            self.failed += left
            self.last_reason = self.last_reason or ("no answer before the run ended" if busy else
                                                    "the run ended first")
            log.warning("warning: webhook %s: %d events not delivered when the run ended (last: %s)", self.shown,
                        left, self.last_reason)
        if self._say is not None:
            self._say(f"event: {self.report()}")

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
                with _OPENER.open(request, timeout=self.timeout) as response:
                    response.read(65536)
                self.delivered += 1
                return
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRY_STATUS:
                    self.failed += 1
                    self.last_reason = f"HTTP {exc.code} {exc.reason}"
                    log.warning("warning: webhook %s answered HTTP %d %s; event not delivered", self.shown, exc.code,
                                exc.reason)
                    return
                why = f"HTTP {exc.code}"
                header = exc.headers.get("Retry-After") if exc.headers else None
                if header and header.strip().isdigit():
                    retry_after = float(header.strip())
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                why = _why(reason)
            if self._stop.is_set():  # the run ended meanwhile; close() counts it
                self.last_reason = why
                return
            if attempt == self.retries:
                self.failed += 1
                self.last_reason = why
                log.warning("warning: webhook %s failed %d times (last: %s); event dropped", self.shown,
                            self.retries + 1, why)
                return
            wait = min(max_delay, retry_after if retry_after is not None else delay)
            if self._stop.wait(wait):
                return
            delay = min(max_delay, delay * 2)


def _why(reason: object) -> str:
    """A short reason for a failed request: ``refused``, ``timeout``, or the error."""
    if isinstance(reason, str):
        return reason
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return "timeout"
    return f"{type(reason).__name__}: {reason}"
