"""A real MJPEG-over-HTTP stream server for tests: start it, stop it (connections dropped), start it again.

``MjpegServer(port).start()`` serves ``GET /stream.mjpg`` as ``multipart/x-mixed-replace`` JPEG frames at
``fps`` (what IP cameras and ``edgesqz run --serve`` send), on 127.0.0.1. ``stop()`` closes the listening
socket and every open stream, as a camera that loses power would; ``start()`` again binds the same port.
``garbage=True`` sends bytes that are not video. OpenCV's FFmpeg backend reads it like a camera.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import cv2
import numpy as np

BOUNDARY = b"frame"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MjpegServer:
    def __init__(self, port: int | None = None, *, fps: float = 30.0, size: tuple[int, int] = (320, 240),
                 garbage: bool = False) -> None:
        self.port = port or free_port()
        self.fps = fps
        self.size = size
        self.garbage = garbage
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self.frames_sent = 0
        self._listener: socket.socket | None = None
        self._clients: list[socket.socket] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _jpeg(self, n: int) -> bytes:
        w, h = self.size
        image = np.zeros((h, w, 3), np.uint8)
        image[:, :, 1] = (n * 7) % 256
        cv2.putText(image, str(n), (10, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 2, (255, 255, 255), 3)
        return cv2.imencode(".jpg", image)[1].tobytes()

    def start(self) -> MjpegServer:
        self._stop.clear()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(8)
        listener.settimeout(0.2)
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._clients.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            if self.garbage:
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: video/mp4\r\n\r\n")
                rng = np.random.default_rng(0)
                while not self._stop.is_set():
                    conn.sendall(rng.bytes(4096))
                    time.sleep(0.01)
                return
            conn.sendall(b"HTTP/1.0 200 OK\r\nCache-Control: no-cache\r\n"
                         b"Content-Type: multipart/x-mixed-replace; boundary=" + BOUNDARY + b"\r\n\r\n")
            t0 = time.perf_counter()
            n = 0
            while not self._stop.is_set():
                jpeg = self._jpeg(self.frames_sent)
                conn.sendall(b"--" + BOUNDARY + b"\r\nContent-Type: image/jpeg\r\nContent-Length: "
                             + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
                self.frames_sent += 1
                n += 1
                delay = t0 + n / self.fps - time.perf_counter()
                if delay > 0:
                    self._stop.wait(delay)
        except OSError:
            pass
        finally:
            conn.close()
