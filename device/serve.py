"""Live web preview of a run (``edgesqz run ... --serve [HOST:]PORT``): a sink of the pipeline.

Endpoints (GET and HEAD only; anything else is 405):

- ``/`` the page (from :mod:`edgesqz.device.serve_page`, held in memory: nothing reads a file);
- ``/stream.mjpg`` the annotated frames as MJPEG (``multipart/x-mixed-replace``);
- ``/frame.jpg`` the newest annotated frame;
- ``/events`` server-sent events: each frame's ``classification`` object exactly as ``--json``
  prints it, then the ``run_summary`` when the run ends (``id:`` is ``RUN-N``: this run's id and a
  sequence number; a ``Last-Event-ID`` of this run resumes from the last 256, any other, e.g. from
  before a service restart, starts from now);
- ``/status`` a ``serve_status`` JSON object (counters, recent latency, model and device facts, recent events);
- ``/snapshot/ID.jpg`` a recent event's best frame (with ``--event``; the last 32 events, held in memory).

How the pipeline is kept safe from viewers: :meth:`ServeSink.write` (the pipeline thread) only
serialises the result once into a shared ring of recent events and drops it into the encoder's
one-slot mailbox. One encoder thread annotates and JPEG-encodes the newest result, at most
``stream_fps`` times a second (once a second while nobody watches), into one latest-frame slot.
Each viewer thread waits on a condition for a sequence number newer than the one it sent last, so
a slow viewer only skips frames and nothing grows per viewer. Streams per channel are bounded
(``max_viewers``; 503 beyond), as are connections, the request line and headers; every socket has
a timeout, so a stalled client frees its thread.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import io
import ipaddress
import logging
import math
import os
import platform
import secrets
import socket
import socketserver
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, quote, urlsplit

import cv2
import numpy as np

from edgesqz.device import serve_page
from edgesqz.device.results import LatencyStats
from edgesqz.device.sinks import Sink, annotate
from edgesqz.errors import EdgesqzError
from edgesqz.schema import dumps, record

if TYPE_CHECKING:
    from edgesqz.device.pipeline import Pipeline
    from edgesqz.device.results import Result, Summary

log = logging.getLogger("edgesqz.device.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_VIEWERS = 4
MAX_REQUEST_LINE = 2048  # bytes, with the path and query
MAX_HEADER_BYTES = 8192
EVENT_HISTORY = 256  # recent events kept for Last-Event-ID
KEEPALIVE_S = 15.0  # an SSE comment when nothing happened for this long
IDLE_ENCODE_S = 1.0  # while nobody watches the stream, encode a frame this often (for /frame.jpg, new viewers)
STATS_WINDOW = 120  # frames behind the status' latency figures
STALE_S = 2.0  # /status reports 0 FPS when no result came for this long
BOUNDARY = "edgesqzframe"
SERVE_USAGE = "--serve takes [HOST:]PORT, e.g. 8080, 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080"
EVENTS_SHOWN = 20  # recent events in /status (and so on the page)
SNAPSHOTS_KEPT = 32  # recent events' thumbnails served at /snapshot/ID.jpg
PAGE, PAGE_CSP = serve_page.render()


class ViewerLimitError(Exception):
    """Every stream slot of a channel is taken."""


# --------------------------------------------------------------------------- address


def parse_address(value: str) -> tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); the host defaults to 127.0.0.1, port 0 picks a free one."""
    text = value.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise EdgesqzError(f"{SERVE_USAGE}, not {value!r}")
        port_text = rest[1:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise EdgesqzError(f"{SERVE_USAGE}, not {value!r} (write IPv6 addresses in brackets)")
    else:
        host, port_text = DEFAULT_HOST, text
    if not host or not _valid_host(host):
        raise EdgesqzError(f"{SERVE_USAGE}, not {value!r}")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise EdgesqzError(f"{SERVE_USAGE}, not {value!r} (the port is a number from 0 to 65535)")
    return host, int(port_text)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        labels = host.rstrip(".").split(".")
        return len(host) <= 253 and all(
            0 < len(label) <= 63 and label.isascii() and label.replace("-", "").isalnum()
            and not label.startswith("-") for label in labels)


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise EdgesqzError(f"--serve: cannot resolve host {host!r} ({exc.strerror}); use an IP address") from exc
    family, _, _, _, address = infos[0]
    return family, address


def _bind_error(host: str, port: int, exc: OSError) -> EdgesqzError:
    where = f"--serve {host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return EdgesqzError(f"{where}: the port is already in use (another edgesqz run?); choose another port")
    if exc.errno == errno.EACCES and 0 < port < 1024:
        return EdgesqzError(f"{where}: ports below 1024 are privileged and need root; use a port such as 8080")
    if exc.errno == errno.EADDRNOTAVAIL:
        return EdgesqzError(f"{where}: {host} is not an address of this machine; use 127.0.0.1 or 0.0.0.0")
    return EdgesqzError(f"{where}: cannot listen ({exc.strerror or exc})")


def _is_loopback(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    return False


def _is_wildcard(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.split("%")[0]).is_unspecified
    return False


def _local_host_header(value: str) -> bool:
    """True for the Host header of a loopback name (localhost, 127.x.x.x, [::1]) with or without a port."""
    host = value.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host == "localhost" or host.endswith(".localhost") or _is_loopback(host)


# --------------------------------------------------------------------------- shared state


class _Hub:
    """What the pipeline side publishes and viewer threads read: the newest JPEG and recent events."""

    def __init__(self, max_viewers: int) -> None:
        self.max_viewers = max_viewers
        self._cond = threading.Condition()
        self._jpeg: bytes | None = None
        self._frame_seq = 0
        self._events: deque[tuple[int, bytes]] = deque(maxlen=EVENT_HISTORY)
        self._event_seq = 0
        self.run_id = secrets.token_hex(4)  # in every SSE id: a Last-Event-ID from another run is not ours
        self._viewers = {"stream": 0, "events": 0}
        self.frames_encoded = 0
        self.closed = False

    # -- publishing (pipeline and encoder threads)

    def publish_frame(self, jpeg: bytes) -> None:
        with self._cond:
            self._jpeg = jpeg
            self._frame_seq += 1
            self.frames_encoded += 1
            self._cond.notify_all()

    def publish_event(self, data: str) -> None:
        with self._cond:
            self._event_seq += 1
            payload = f"id: {self.run_id}-{self._event_seq}\ndata: {data}\n\n".encode()
            self._events.append((self._event_seq, payload))
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    # -- reading (viewer threads)

    def latest_frame(self) -> bytes | None:
        return self._jpeg

    def next_frame(self, after: int, timeout: float) -> tuple[int, bytes | None]:
        """(sequence, JPEG) of a frame newer than ``after``, or (after, None) on timeout or close."""
        with self._cond:
            self._cond.wait_for(lambda: self._frame_seq > after or self.closed, timeout)
            if self._frame_seq > after:
                return self._frame_seq, self._jpeg
            return after, None

    def last_event_id(self) -> int:
        return self._event_seq

    def resume_after(self, header: str | None) -> int:
        """Where a viewer's ``/events`` starts: after its ``Last-Event-ID`` when that is one of this run's ids
        (``RUN-N`` with N not beyond the newest), else with the newest event (a new viewer; an id from
        another run, after a restart; a garbage or huge number)."""
        newest = self._event_seq
        run, _, seq = (header or "").strip().partition("-")
        if run == self.run_id and seq.isascii() and seq.isdigit() and len(seq) <= 18 and int(seq) <= newest:
            return int(seq)
        return max(0, newest - 1)

    def events_after(self, after: int, timeout: float) -> list[tuple[int, bytes]]:
        """The kept events newer than ``after`` (waiting up to ``timeout`` for one); [] on timeout or close."""
        with self._cond:
            self._cond.wait_for(lambda: self._event_seq > after or self.closed, timeout)
            return [item for item in self._events if item[0] > after]

    @property
    def watched(self) -> bool:
        return self._viewers["stream"] > 0

    def viewers(self) -> dict[str, int]:
        with self._cond:
            return {**self._viewers, "max": self.max_viewers}

    @contextlib.contextmanager
    def viewer(self, channel: str) -> Iterator[None]:
        """Hold one of the channel's ``max_viewers`` slots; :class:`ViewerLimitError` when all are taken."""
        with self._cond:
            if self._viewers[channel] >= self.max_viewers:
                raise ViewerLimitError(channel)
            self._viewers[channel] += 1
        try:
            yield
        finally:
            with self._cond:
                self._viewers[channel] -= 1
                self._cond.notify_all()

    def wait_for_no_viewers(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not any(self._viewers.values()), timeout)


class _Encoder:
    """One thread: annotate + JPEG-encode the newest result, at most ``fps`` times a second."""

    def __init__(self, hub: _Hub, *, quality: int, fps: float) -> None:
        self._hub = hub
        self._params = [cv2.IMWRITE_JPEG_QUALITY, quality]
        self._interval = 1.0 / fps
        self._cond = threading.Condition()
        self._pending: Result | None = None
        self._stopping = False
        self.cameras: list[Any] = []  # several cameras: one stream of a mosaic of their newest frames
        self._tiles: dict[str, np.ndarray] = {}
        self._thread = threading.Thread(target=self._run, name="edgesqz-serve-encoder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, result: Result) -> None:
        """Replace the waiting result (pipeline thread; never blocks for long)."""
        with self._cond:
            self._pending = result
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def _take(self) -> Result | None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending is not None or self._stopping)
            result, self._pending = self._pending, None
            return None if self._stopping else result

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, seconds)

    def _run(self) -> None:
        last = -math.inf
        while (result := self._take()) is not None:
            now = time.monotonic()
            if not self._hub.watched and now - last < IDLE_ENCODE_S:
                continue
            try:
                picture = annotate(result.frame.image, result)
                if len(self.cameras) > 1:
                    picture = self._mosaic(result.camera, picture)
                ok, buf = cv2.imencode(".jpg", picture, self._params)
            except cv2.error as exc:
                log.debug("cannot encode frame %d: %s", result.frame.index, exc)
                continue
            if ok:
                self._hub.publish_frame(buf.tobytes())
                last = now
            self._pause(last + self._interval - time.monotonic())


    TILE_WIDTH = 640

    def _mosaic(self, camera: str | None, picture: np.ndarray) -> np.ndarray:
        """Every camera's newest annotated frame in a grid (a camera without frames: a grey tile saying why)."""
        w = self.TILE_WIDTH
        h0, w0 = picture.shape[:2]
        tile_h = max(1, round(h0 * w / w0)) if not self._tiles else next(iter(self._tiles.values())).shape[0]
        self._tiles[str(camera)] = cv2.resize(picture, (w, tile_h), interpolation=cv2.INTER_AREA)
        tiles = []
        for cam in self.cameras:
            tile = self._tiles.get(cam.name)
            if tile is None or cam.state != "online":
                grey = np.full((tile_h, w, 3), 60, np.uint8) if tile is None else (tile * 0.35).astype(np.uint8)
                cv2.putText(grey, f"{cam.name}: {cam.state}", (12, tile_h // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.8,
                            (255, 255, 255), 2, cv2.LINE_AA)
                tile = grey
            tiles.append(tile)
        cols = math.ceil(math.sqrt(len(tiles)))
        rows = math.ceil(len(tiles) / cols)
        grid = np.zeros((rows * tile_h, cols * w, 3), np.uint8)
        for i, tile in enumerate(tiles):
            r, c = divmod(i, cols)
            grid[r * tile_h:(r + 1) * tile_h, c * w:(c + 1) * w] = tile
        return grid


class _RecentLatency:
    """Inference and end-to-end latency of the last frames, for /status (the pipeline's stats are its own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: deque[tuple[float, float]] = deque(maxlen=STATS_WINDOW)

    def add(self, latency_ms: dict[str, float]) -> None:
        with self._lock:
            self._values.append((latency_ms["inference"], latency_ms["end_to_end"]))

    def to_dict(self) -> dict[str, dict[str, float | None]]:
        with self._lock:
            values = list(self._values)
        stats = {"inference": LatencyStats(), "end_to_end": LatencyStats()}
        for inference, end_to_end in values:
            stats["inference"].add(inference)
            stats["end_to_end"].add(end_to_end)
        return {name: s.to_dict() for name, s in stats.items()}


# --------------------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    """One daemon thread per connection, at most ``max_connections`` at once (a bare 503 beyond)."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 32

    def __init__(self, address: tuple[Any, ...], family: socket.AddressFamily, app: _App,
                 max_connections: int) -> None:
        self.address_family = family
        self.app = app
        self.max_connections = max_connections
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's own would look the host name up in DNS
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            full = len(self._open) >= self.max_connections
            if not full:
                self._open.add(request)
        if full:
            self._refuse(request)
            return
        super().process_request(request, client_address)

    def _refuse(self, request: socket.socket) -> None:
        with contextlib.suppress(OSError):
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 5\r\n"
                            b"Connection: close\r\nContent-Length: 21\r\n\r\ntoo many connections\n")
        super().shutdown_request(request)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("error while serving %s", client_address, exc_info=True)

    def drop_connections(self) -> None:
        """Unblock every thread still writing to a client (at shutdown)."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _App:
    """What the request handler needs: the hub, the rules, and the status."""

    def __init__(self, hub: _Hub, *, token: str | None, timeout: float, local_only: bool,
                 status: Callable[[], dict[str, Any]], snapshot: Callable[[str], bytes | None],
                 collect: Callable[[str, str | None, str | None], str] | None = None) -> None:
        self.collect = collect
        self.hub = hub
        self.snapshot = snapshot
        self.token = token.encode() if token is not None else None
        self.timeout = timeout
        self.local_only = local_only
        self.status = status


def _head_end(buf: bytes | bytearray) -> int:
    """Where the blank line that ends a request head is, or -1."""
    ends = [i for i in (buf.find(b"\r\n\r\n"), buf.find(b"\n\n")) if i >= 0]
    return min(ends) if ends else -1


def _head_problem(buf: bytes | bytearray) -> tuple[int, str] | None:
    """(status, message) when the request line or the headers received so far are over their limits."""
    line_end = buf.find(b"\n")
    if line_end > MAX_REQUEST_LINE or (line_end < 0 and len(buf) > MAX_REQUEST_LINE):
        return HTTPStatus.REQUEST_URI_TOO_LONG, f"the request line is limited to {MAX_REQUEST_LINE} bytes"
    end = _head_end(buf)
    if line_end >= 0 and (end if end >= 0 else len(buf)) - line_end > MAX_HEADER_BYTES:
        return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request headers are limited to {MAX_HEADER_BYTES} bytes"
    return None


class _Handler(BaseHTTPRequestHandler):
    """One request per connection (HTTP/1.0 style); only the routes in :attr:`ROUTES`."""

    server: _Server
    ROUTES: ClassVar[dict[str, str]] = {"/": "_page", "/index.html": "_page", "/stream.mjpg": "_stream",
                                        "/frame.jpg": "_frame", "/events": "_events", "/status": "_status"}

    def version_string(self) -> str:
        return "edgesqz"

    def setup(self) -> None:
        self.timeout = self.server.app.timeout  # every blocking read and write on this socket
        super().setup()

    def handle(self) -> None:
        try:
            self.handle_one_request()
        except (OSError, ValueError):  # the client went away, stalled past the timeout, or sent garbage
            self.close_connection = True

    def handle_one_request(self) -> None:
        self.close_connection = True
        self.command, self.request_version, self.requestline = None, "HTTP/1.0", ""
        head = self._read_head()
        if head is None:
            return
        self.rfile.close()
        self.rfile = io.BytesIO(head)
        self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if not self.parse_request():  # 400, 431 or 505 already sent
            return
        if self.request_version == "HTTP/0.9":
            self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 is not supported")
        elif self.command == "POST" and urlsplit(self.path).path == "/collect":
            self._dispatch()
        elif self.command not in ("GET", "HEAD"):
            self._text(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD (and POST /collect)", [("Allow", "GET, HEAD")])
        else:
            self._dispatch()

    def _read_head(self) -> bytes | None:
        """The request line and headers, read within one timeout in all; None after an error was sent."""
        sock = self.connection
        deadline = time.monotonic() + self.server.app.timeout
        buf = bytearray()
        while _head_end(buf) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("request head not received in time")
            sock.settimeout(remaining)
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
            if problem := _head_problem(buf):
                self._text(*problem)
                return None
        sock.settimeout(self.server.app.timeout)
        return bytes(buf) if buf else None

    # -- checks and routing

    def _dispatch(self) -> None:
        if not self.path.startswith("/"):
            self.send_error(HTTPStatus.BAD_REQUEST, "the target must be a path")
            return
        url = urlsplit(self.path)
        try:
            query = dict(parse_qsl(url.query, keep_blank_values=True, max_num_fields=16))
        except ValueError:
            self.send_error(HTTPStatus.BAD_REQUEST, "too many query fields")
            return
        if not self._host_allowed():
            self._text(HTTPStatus.FORBIDDEN, "this server only answers to localhost (it listens on a loopback "
                                             "address); open it as http://localhost:PORT/")
            return
        if not self._authorised(query.get("token")):
            return
        if self.command == "POST":
            self._collect(query)
            return
        handler = self.ROUTES.get(url.path) or ("_snapshot" if url.path.startswith("/snapshot/") else None)
        if handler is None:
            self._text(HTTPStatus.NOT_FOUND, "not found; the page is /")
            return
        getattr(self, handler)()

    def _host_allowed(self) -> bool:
        """On a loopback address, answer only to loopback host names (no DNS rebinding from a web page)."""
        host = self.headers.get("Host")
        return not self.server.app.local_only or host is None or _local_host_header(host)

    def _authorised(self, query_token: str | None) -> bool:
        expected = self.server.app.token
        if expected is None:
            return True
        given = query_token
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if not given:
            self._text(HTTPStatus.UNAUTHORIZED, "a token is required: add ?token=TOKEN to the address, or send "
                                                "Authorization: Bearer TOKEN", [("WWW-Authenticate", "Bearer")])
            return False
        if not hmac.compare_digest(given.encode(), expected):
            self._text(HTTPStatus.FORBIDDEN, "wrong token")
            return False
        return True

    # -- responses

    def _headers(self, status: int, content_type: str, extra: Sequence[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Connection", "close")
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()

    def _body(self, status: int, body: bytes, content_type: str, extra: Sequence[tuple[str, str]] = ()) -> None:
        self._headers(status, content_type, [("Content-Length", str(len(body))), *extra])
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: int, message: str, extra: Sequence[tuple[str, str]] = ()) -> None:
        phrase = HTTPStatus(status).phrase
        self._body(status, f"{status} {phrase}: {message}\n".encode(), "text/plain; charset=utf-8", extra)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The errors http.server raises itself (400, 431, 505), as plain text."""
        if self.request_version == "HTTP/0.9":  # http.server's guess before it understood the request line
            self.request_version = "HTTP/1.0"  # answer with a status line all the same
        self._text(code, message or HTTPStatus(code).description)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _page(self) -> None:
        self._body(HTTPStatus.OK, PAGE, "text/html; charset=utf-8", [("Content-Security-Policy", PAGE_CSP)])

    def _status(self) -> None:
        self._body(HTTPStatus.OK, dumps(self.server.app.status()).encode(), "application/json")

    def _collect(self, query: dict[str, str]) -> None:
        """``POST /collect?label=L[&camera=C][&zone=Z]`` with ``X-Edgesqz: collect``: save the newest frame under L."""
        if self.headers.get("X-Edgesqz", "") != "collect":  # a cross-site form cannot send it (CORS preflight)
            self._text(HTTPStatus.FORBIDDEN, "send the header X-Edgesqz: collect")
            return
        collect = self.server.app.collect
        if collect is None:
            self._text(HTTPStatus.NOT_FOUND, "this run does not collect images; start it with --collect DIR")
            return
        try:
            saved = collect(query.get("label", ""), query.get("camera") or None, query.get("zone") or None)
        except EdgesqzError as exc:
            self._text(HTTPStatus.BAD_REQUEST, str(exc))
            return
        self._body(HTTPStatus.OK, dumps({"saved": saved}).encode(), "application/json")

    def _frame(self) -> None:
        jpeg = self.server.app.hub.latest_frame()
        if jpeg is None:
            self._text(HTTPStatus.SERVICE_UNAVAILABLE, "no frame yet", [("Retry-After", "1")])
        else:
            self._body(HTTPStatus.OK, jpeg, "image/jpeg")

    def _snapshot(self) -> None:
        name = urlsplit(self.path).path.removeprefix("/snapshot/")
        jpeg = self.server.app.snapshot(name.removesuffix(".jpg")) if name.endswith(".jpg") else None
        if jpeg is None:
            self._text(HTTPStatus.NOT_FOUND, "no such event snapshot (only the last 32 events are kept)")
        else:
            self._body(HTTPStatus.OK, jpeg, "image/jpeg")

    def _too_many(self, channel: str) -> None:
        limit = self.server.app.hub.max_viewers
        self._text(HTTPStatus.SERVICE_UNAVAILABLE, f"too many viewers: this server allows {limit} {channel} viewers "
                   "at once; try again later", [("Retry-After", "10")])

    def _stream(self) -> None:
        content_type = f"multipart/x-mixed-replace; boundary={BOUNDARY}"
        if self.command == "HEAD":
            self._headers(HTTPStatus.OK, content_type)
            return
        hub = self.server.app.hub
        try:
            with hub.viewer("stream"):
                self._headers(HTTPStatus.OK, content_type)
                self.wfile.write(f"--{BOUNDARY}\r\n".encode())
                seq = 0
                while True:
                    seq, jpeg = hub.next_frame(seq, timeout=1.0)
                    if jpeg is not None:  # each part is followed by the boundary, so browsers show it at once
                        self.wfile.write(b"Content-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%b\r\n--%b\r\n"
                                         % (len(jpeg), jpeg, BOUNDARY.encode()))
                    elif hub.closed:
                        return
        except ViewerLimitError:
            self._too_many("stream")

    def _events(self) -> None:
        if self.command == "HEAD":
            self._headers(HTTPStatus.OK, "text/event-stream; charset=utf-8")
            return
        hub = self.server.app.hub
        after = hub.resume_after(self.headers.get("Last-Event-ID"))
        try:
            with hub.viewer("events"):
                self._headers(HTTPStatus.OK, "text/event-stream; charset=utf-8", [("X-Accel-Buffering", "no")])
                self.wfile.write(b"retry: 2000\n\n")
                while True:
                    items = hub.events_after(after, timeout=KEEPALIVE_S)
                    if items:
                        self.wfile.write(b"".join(payload for _, payload in items))
                        after = items[-1][0]
                    elif hub.closed:
                        return
                    else:
                        self.wfile.write(b": keep-alive\n\n")
        except ViewerLimitError:
            self._too_many("events")


# --------------------------------------------------------------------------- the sink


class ServeSink(Sink):
    """Serve the run live over HTTP while the pipeline runs (see the module docstring for endpoints).

    The socket is bound here, so a bad address, a port in use or a privileged port fail before
    anything else starts (:class:`EdgesqzError`); serving starts in :meth:`open`. ``address`` is
    ``[HOST:]PORT`` (port 0: any free port; :attr:`url` says which) or a (host, port) pair;
    ``token``: required on every request (``?token=`` or ``Authorization: Bearer``);
    ``max_viewers``: concurrent MJPEG streams, and separately event streams, allowed (503 beyond);
    ``timeout``: seconds a client may take to send its request or to accept each write.
    """

    def __init__(self, address: str | tuple[str, int] = f"{DEFAULT_HOST}:8080", *, token: str | None = None,
                 max_viewers: int = DEFAULT_MAX_VIEWERS, jpeg_quality: int = 80, stream_fps: float = 30.0,
                 timeout: float = 10.0) -> None:
        _check_settings(token, max_viewers, jpeg_quality, stream_fps, timeout)
        host, port = parse_address(address) if isinstance(address, str) else address
        self._hub = _Hub(max_viewers)
        self._encoder = _Encoder(self._hub, quality=jpeg_quality, fps=stream_fps)
        self._latency = _RecentLatency()
        self._pipeline: Pipeline | None = None
        self._facts: dict[str, Any] = {}
        self._last: dict[str, Any] | None = None
        self._summary: dict[str, Any] | None = None
        self._events: OrderedDict[str, dict[str, Any]] = OrderedDict()  # recent events by id, newest last
        self._snapshots: OrderedDict[str, bytes] = OrderedDict()
        self._events_lock = threading.Lock()
        self._fps, self._last_at = 0.0, -math.inf
        self._started = 0.0
        self._thread: threading.Thread | None = None
        self._closed = False
        family, sockaddr = _resolve(host, port)
        self.collector: Any = None  # run --collect: the page's "save as" control saves through it
        app = _App(self._hub, token=token, timeout=timeout, local_only=_is_loopback(sockaddr[0]), status=self.status,
                   snapshot=self.snapshot, collect=self._collect)
        try:
            self._server = _Server(sockaddr, family, app, max_connections=2 * max_viewers + 16)
        except OSError as exc:
            raise _bind_error(host, port, exc) from exc
        self.host, self.port = str(self._server.server_address[0]), int(self._server.server_address[1])
        self.token = token
        if _is_wildcard(self.host):
            who = "and knows the token " if token else ""
            log.warning("warning: --serve %s listens on every network interface: anyone who can reach this "
                        "machine %scan watch%s", host, who, "" if token else "; add --token to require a secret")

    @property
    def url(self) -> str:
        """The page's address (with the token), as a browser on this machine or the network would open it."""
        host = socket.gethostname() if _is_wildcard(self.host) else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/" + (f"?token={quote(self.token, safe='')}" if self.token else "")

    # -- Sink

    def open(self, pipeline: Pipeline | None = None) -> None:
        self._pipeline = pipeline
        self._facts = _facts(pipeline)
        self._encoder.cameras = list(getattr(pipeline, "cameras", [])) if pipeline is not None else []
        if pipeline is not None and hasattr(pipeline, "on_swap"):  # a new model: the page says which
            pipeline.on_swap.append(lambda _old, _new: self._facts.update(model=_facts(pipeline)["model"]))
        self._started = time.monotonic()
        self._encoder.start()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="edgesqz-serve", daemon=True)
        self._thread.start()

    def write(self, result: Result) -> None:
        self._fps, self._last_at = result.fps, time.monotonic()
        self._last = result.to_record()
        self._hub.publish_event(dumps(self._last))
        self._latency.add(result.latency_ms)
        self._encoder.offer(result)

    def publish_event_record(self, record: dict[str, Any], jpeg: bytes | None = None) -> None:
        """An ``event`` object (start or end): onto ``/events``, into /status' recent events, its snapshot kept."""
        event_id = record.get("id", "")
        with self._events_lock:
            self._events[event_id] = record
            self._events.move_to_end(event_id)
            while len(self._events) > EVENTS_SHOWN:
                self._events.popitem(last=False)
            if jpeg is not None:
                self._snapshots[event_id] = jpeg
                self._snapshots.move_to_end(event_id)
                while len(self._snapshots) > SNAPSHOTS_KEPT:
                    self._snapshots.popitem(last=False)
        self._hub.publish_event(dumps(record))

    def _collect(self, label: str, camera: str | None, zone: str | None) -> str:
        if self.collector is None:
            raise EdgesqzError("this run does not collect images; start it with --collect DIR")
        return self.collector.save_as(label, camera=camera, zone=zone)

    def snapshot(self, event_id: str) -> bytes | None:
        """The JPEG of a recent event's best frame, or None."""
        with self._events_lock:
            return self._snapshots.get(event_id)

    def close(self, summary: Summary | None = None) -> None:
        """End the streams (after the ``run_summary`` event, when there is one) and stop serving."""
        if self._closed:
            return
        self._closed = True
        self._encoder.stop()
        if summary is not None:
            self._summary = summary.to_record()
            self._hub.publish_event(dumps(self._summary))
        self._hub.close()
        if self._thread is not None:
            self._hub.wait_for_no_viewers(1.0)  # let the streams send their last bytes
            self._server.shutdown()
            self._thread.join(5.0)
        self._server.drop_connections()
        self._server.server_close()

    # -- status

    def status(self) -> dict[str, Any]:
        """The ``serve_status`` object of /status."""
        pipeline = self._pipeline
        source = pipeline.source if pipeline is not None else None
        last = self._last
        with self._events_lock:
            events = [{**e, "snapshot_url": f"/snapshot/{e['id']}.jpg" if e["id"] in self._snapshots else None}
                      for e in reversed(self._events.values())]
        return record(
            "serve_status",
            running=self._pipeline is not None and not self._closed,
            source=source.description if source is not None else None,
            frames=pipeline.summary.frames if pipeline is not None else 0,
            captured=source.captured if source is not None else 0,
            dropped=source.dropped if source is not None else 0,
            fps=round(self._fps if time.monotonic() - self._last_at < STALE_S else 0.0, 2),
            latency_ms=self._latency.to_dict(),
            last=last,
            summary=self._summary,
            viewers=self._hub.viewers(),
            stream={"frames_encoded": self._hub.frames_encoded, "boundary": BOUNDARY},
            uptime_s=round(time.monotonic() - self._started, 3) if self._started else 0.0,
            model=self._facts.get("model", {}),
            device={**self._facts.get("device", {}), **_live_device_facts()},
            events=events,
            **({"cameras": [c.status() for c in pipeline.cameras]}
               if pipeline is not None and getattr(pipeline, "multi", False) else {}),
            **({"collect": {"folder": str(self.collector.folder), "saved": self.collector.saved,
                            "labels": sorted(self.collector.known_labels())}} if self.collector is not None else {}),
        )


def _check_settings(token: str | None, max_viewers: int, jpeg_quality: int, stream_fps: float,
                    timeout: float) -> None:
    if token is not None and (not token or not token.isascii() or not token.isprintable() or " " in token):
        raise EdgesqzError("--token must be a non-empty string of printable ASCII characters without spaces")
    if max_viewers < 1:
        raise EdgesqzError(f"--max-viewers must be >= 1, got {max_viewers}")
    if not 1 <= jpeg_quality <= 100:
        raise EdgesqzError(f"JPEG quality must be between 1 and 100, got {jpeg_quality}")
    if stream_fps <= 0 or timeout <= 0:
        raise EdgesqzError("the stream rate and the timeout must be > 0")


def _facts(pipeline: Pipeline | None) -> dict[str, Any]:
    """Model and device facts for /status, gathered once when serving starts."""
    from edgesqz import sysinfo

    device = {"cpu": sysinfo.cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
              "board": sysinfo.board_model(), "python": platform.python_version(), "throttled": sysinfo.throttled()}
    if pipeline is None:
        return {"device": device}
    clf = pipeline.classifier
    info = clf.runtime_info()
    ident = clf.identity
    model = {"name": clf.name, "file": Path(info["model"]).name, "sha256": ident["sha256"],
             "version": ident["version"], "input_size": clf.spec.size,
             "input_dtype": np.dtype(clf.spec.dtype).name,
             **{k: info[k] for k in ("output_kind", "classes", "backend", "backend_version", "threads", "delegate",
                                     "coverage")}}
    return {"model": model, "device": device}


def _live_device_facts() -> dict[str, Any]:
    from edgesqz import sysinfo

    return {"temperature_c": sysinfo.temperature_c(), "mhz": sysinfo.cpu_mhz()}
