"""Helpers for the ``--serve`` tests: a synthetic video, ``edgesqz run --serve`` in a subprocess, and plain
HTTP clients (raw sockets and ``http.client``) for pages, MJPEG parts and server-sent events."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import cv2
import numpy as np

SERVING = re.compile(r"^serving: (http://(\S+?):(\d+)/\S*)")


def write_video(path: Path, photos: list[Path], frames: int, per_photo: int, fps: float = 30) -> Path:
    """640x480 mp4v frames panning over each photo in turn (``per_photo`` frames each), with cv2.VideoWriter."""
    scenes = [cv2.resize(cv2.imread(str(p)), (800, 620)) for p in photos]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (640, 480))
    assert writer.isOpened()
    for i in range(frames):
        scene = scenes[(i // per_photo) % len(scenes)]
        x, y = (i * 2) % 160, i % 140
        writer.write(np.ascontiguousarray(scene[y: y + 480, x: x + 640]))
    writer.release()
    return path


class ServeRun:
    """``edgesqz run ... --serve ...`` in a subprocess; stderr is collected in a thread.

    ``output``: also write the JSON lines there (``--output``), to compare with what is served.
    """

    def __init__(self, cli: list[str], *args: object, output: Path | None = None) -> None:
        self.output = output
        extra = ["--output", str(output)] if output is not None else []
        command = [sys.executable, *cli, "run", *map(str, args), *extra]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True)
        self._reader.start()
        self.url = self.host = ""
        self.port = 0

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def wait_serving(self, timeout: float = 90) -> ServeRun:
        """Wait for the ``serving: URL`` line (the socket is bound by then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if match := SERVING.match(line):
                    self.url, self.host, self.port = match.group(1), match.group(2), int(match.group(3))
                    return self
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"exited {self.proc.returncode} before serving:\n{self.stderr}")
            time.sleep(0.05)
        raise AssertionError(f"no 'serving:' line within {timeout} s:\n{self.stderr}")

    def stop(self, sig: int | None = signal.SIGINT, timeout: float = 30) -> int:
        """Send ``sig`` (None: let it end by itself) and wait for the exit status."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(5)
        return code


# --------------------------------------------------------------------------- raw HTTP


def raw_request(port: int, data: bytes, *, host: str = "127.0.0.1", timeout: float = 10) -> tuple[int, bytes]:
    """Send bytes as they are, read the reply to the end: (status code or 0, whole reply)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = bytearray()
        while chunk := _recv(sock):
            reply += chunk
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", bytes(reply))
    return (int(match.group(1)) if match else 0), bytes(reply)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def get(port: int, path: str, *, method: str = "GET", headers: dict[str, str] | None = None,
        host: str = "127.0.0.1", timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """A complete (non-streaming) request: (status, headers with lower-case names, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def open_stream(port: int, path: str, *, headers: dict[str, str] | None = None, host: str = "127.0.0.1",
                timeout: float = 10) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Start a streaming GET; the caller reads the response and closes the connection."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.request("GET", path, headers=headers or {})
    return conn, conn.getresponse()


def close_stream(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
    """Really close a stream: the response holds the socket open after the connection is closed."""
    resp.close()
    conn.close()


def read_events(resp: http.client.HTTPResponse, count: int | None = None) -> list[dict]:
    """Parse server-sent events (``data:`` lines as JSON) until ``count`` events or the end of the stream."""
    events: list[dict] = []
    data: list[str] = []
    while count is None or len(events) < count:
        line = resp.readline()
        if not line:
            break
        text = line.decode().rstrip("\r\n")
        if text.startswith("data:"):
            data.append(text[5:].strip())
        elif not text and data:
            events.append(json.loads("\n".join(data)))
            data = []
    return events


def start_parts(resp: http.client.HTTPResponse) -> bytes:
    """The boundary of a multipart/x-mixed-replace response, after reading its first boundary line."""
    boundary = resp.getheader("Content-Type").split("boundary=", 1)[1].encode()
    assert resp.readline().rstrip() == b"--" + boundary
    return boundary


def read_part(resp: http.client.HTTPResponse, boundary: bytes) -> tuple[dict[str, str], bytes]:
    """One part (its headers with lower-case names, its body) and the boundary line after it."""
    headers = {}
    while (line := resp.readline().rstrip(b"\r\n")) != b"":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = resp.read(int(headers["content-length"]))
    assert resp.readline() == b"\r\n"
    assert resp.readline().rstrip() == b"--" + boundary
    return headers, body


def read_parts(resp: http.client.HTTPResponse, count: int) -> list[tuple[dict[str, str], bytes]]:
    boundary = start_parts(resp)
    return [read_part(resp, boundary) for _ in range(count)]


def jpeg_markers(data: bytes) -> bool:
    """Starts with a JPEG's start-of-image marker and ends with its end-of-image marker (cheap)."""
    return data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")


def is_jpeg(data: bytes, size: tuple[int, int] | None = (640, 480)) -> bool:
    """A complete JPEG that OpenCV decodes, of ``size`` (width, height) when given."""
    if not jpeg_markers(data):
        return False
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return image is not None and (size is None or (image.shape[1], image.shape[0]) == size)


class StreamReader(threading.Thread):
    """A viewer that keeps reading an MJPEG stream and counts its frames (until :meth:`close`); it checks
    only the JPEG markers, so that viewers cost the machine little CPU next to the pipeline they watch."""

    def __init__(self, port: int, path: str, host: str = "127.0.0.1") -> None:
        super().__init__(daemon=True)
        self.conn = http.client.HTTPConnection(host, port, timeout=10)
        self.conn.request("GET", path)
        self._sock = self.conn.sock  # the response takes it over; kept to unblock the reading thread
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.frames = 0
        self.bad = 0
        self.error: BaseException | None = None
        self._closing = False

    def run(self) -> None:
        try:
            boundary = start_parts(self.resp)
            while not self._closing:
                _, body = read_part(self.resp, boundary)
                self.frames += 1
                self.bad += not jpeg_markers(body)
        except Exception as exc:
            if not self._closing:
                self.error = exc

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(OSError):  # unblock the reading thread, then close
            self._sock.shutdown(socket.SHUT_RDWR)
        if self.is_alive():
            self.join(5)
        close_stream(self.conn, self.resp)
