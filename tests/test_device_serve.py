"""``edgesqz run --serve``: the live preview server, with the real int8 model on a synthetic video.

Most checks talk to one ``edgesqz run --serve 127.0.0.1:0 --token ...`` subprocess over real sockets;
the timeout and connection-limit checks run :class:`ServeSink` in-process with a short timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from serve_client import (
    ServeRun,
    close_stream,
    get,
    is_jpeg,
    open_stream,
    raw_request,
    read_events,
    read_parts,
    write_video,
)
from test_device_run import CLI, check_classification, edgesqz, one_error_line

from edgesqz.device.classifier import Classifier
from edgesqz.device.pipeline import Pipeline
from edgesqz.device.serve import ServeSink, parse_address
from edgesqz.device.sources import open_source
from edgesqz.errors import EdgesqzError

TOKEN = "s3cret-token"
PATHS = ("/", "/status", "/events", "/stream.mjpg", "/frame.jpg")
CHANNELS = {"/stream.mjpg": "stream", "/events": "events"}


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory, photos_dir: Path) -> Path:
    """600 frames (60 s at the 10 fps the server run plays it at): coffee, then the cat, in turn."""
    photos = [photos_dir / "coffee.png", photos_dir / "chelsea.png"]
    return write_video(tmp_path_factory.mktemp("serve") / "serve.mp4", photos, frames=600, per_photo=100)


@pytest.fixture(scope="module")
def run_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("served") / "run.jsonl"


@pytest.fixture(scope="module")
def served(int8_model: Path, video: Path, run_output: Path) -> Iterator[ServeRun]:
    """A live run serving on a free loopback port with a token and at most 2 viewers per channel."""
    run = ServeRun(CLI, "--model", int8_model, "--source", video, "--fps", 10, "--threads", 1, "--serve",
                   "127.0.0.1:0", "--token", TOKEN, "--max-viewers", 2, output=run_output)
    try:
        run.wait_serving()
        _wait_for_frames(run.port)
        yield run
    finally:
        code = run.stop()
    assert code == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "stopped by SIGINT" in run.stderr


def _wait_for_frames(port: int, timeout: float = 60) -> None:
    """Until a frame is encoded and a few are classified (the recent FPS needs two)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, body = get(port, f"/status?token={TOKEN}")
        if status == 200 and json.loads(body)["frames"] >= 3 and get(port, f"/frame.jpg?token={TOKEN}")[0] == 200:
            return
        time.sleep(0.1)
    raise AssertionError("no frames were served")


def _status(port: int) -> dict:
    code, headers, body = get(port, f"/status?token={TOKEN}")
    assert code == 200 and headers["content-type"] == "application/json"
    return json.loads(body)


def _until(condition: object, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def _no_viewers(port: int) -> None:
    """Wait until the streams of earlier tests have noticed their viewers left."""
    _until(lambda: _status(port)["viewers"] == {"stream": 0, "events": 0, "max": 2})


# --------------------------------------------------------------------------- endpoints


def test_status_json(served: ServeRun) -> None:
    status = _status(served.port)
    assert status["schema"] == "edgesqz/1" and status["kind"] == "serve_status"
    assert status["running"] is True and status["frames"] > 0 and status["dropped"] >= 0
    assert 0 < status["fps"] < 50
    assert status["source"].endswith("(played live at 10 fps)")
    check_classification(status["last"], 5)
    assert status["viewers"] == {"stream": 0, "events": 0, "max": 2}
    assert 0 < status["latency_ms"]["inference"]["p50"] <= status["latency_ms"]["end_to_end"]["p90"]
    model = status["model"]
    assert model["file"] == "squeezenet1_1-int8.tflite" and model["input_size"] == 224
    assert model["input_dtype"] == "uint8" and model["classes"] == 1000 and model["threads"] == 1
    assert model["backend"] == "ai_edge_litert" and model["coverage"]["full"] is True
    assert status["device"]["cores"] == os.cpu_count() and status["device"]["python"]
    assert status["summary"] is None


def test_page_and_head(served: ServeRun) -> None:
    code, headers, body = get(served.port, f"/?token={TOKEN}")
    assert code == 200 and headers["content-type"] == "text/html; charset=utf-8"
    page = body.decode()
    assert "new EventSource(url(\"events\"))" in page and "stream.mjpg" in page and "status" in page
    assert 'name="viewport"' in page
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp
    assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-store"
    assert headers["referrer-policy"] == "no-referrer"
    for path in PATHS:
        code, headers, body = get(served.port, f"{path}?token={TOKEN}", method="HEAD")
        assert code == 200 and body == b"", path
    assert get(served.port, f"/nothing-here?token={TOKEN}")[0] == 404


@pytest.mark.parametrize("path", PATHS)
def test_token_is_required_on_every_endpoint(served: ServeRun, path: str) -> None:
    code, headers, body = get(served.port, path)
    assert code == 401 and headers["www-authenticate"] == "Bearer" and b"token" in body
    assert get(served.port, f"{path}?token=wrong")[0] == 403
    assert get(served.port, f"{path}?token={TOKEN}x")[0] == 403
    assert get(served.port, path, headers={"Authorization": "Bearer wrong"})[0] == 403
    assert get(served.port, path, method="HEAD", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert get(served.port, f"{path}?token={TOKEN}", method="HEAD")[0] == 200


def test_events_are_the_json_output_objects(served: ServeRun, run_output: Path) -> None:
    _no_viewers(served.port)
    conn, resp = open_stream(served.port, f"/events?token={TOKEN}")
    try:
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream; charset=utf-8"
        events = read_events(resp, 8)
    finally:
        close_stream(conn, resp)
    frames = [e["frame"] for e in events]
    assert frames == sorted(set(frames))
    for event in events:
        check_classification(event, 5)
    complete_lines = run_output.read_text().split("\n")[:-1]
    written = {o["frame"]: o for o in map(json.loads, complete_lines)}
    assert [written[f] for f in frames] == events  # the very objects --json / --output write


def test_mjpeg_parts_are_jpegs_encoded_once(served: ServeRun) -> None:
    _no_viewers(served.port)
    viewers = [open_stream(served.port, f"/stream.mjpg?token={TOKEN}") for _ in range(2)]
    try:
        before = _status(served.port)
        parts = [read_parts(resp, 6) for _, resp in viewers]
        after = _status(served.port)
    finally:
        for viewer in viewers:
            close_stream(*viewer)
    for (_, resp), got in zip(viewers, parts, strict=True):
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("multipart/x-mixed-replace")
        for headers, body in got:
            assert headers["content-type"] == "image/jpeg" and int(headers["content-length"]) == len(body)
            assert is_jpeg(body)
        assert len({body for _, body in got}) == len(got)  # live: every part a new frame
    # two viewers, each frame encoded once: no more JPEGs than classified frames
    encoded = after["stream"]["frames_encoded"] - before["stream"]["frames_encoded"]
    assert 0 < encoded <= after["frames"] - before["frames"] + 1
    code, headers, body = get(served.port, f"/frame.jpg?token={TOKEN}")
    assert code == 200 and headers["content-type"] == "image/jpeg" and is_jpeg(body)


def test_viewers_are_bounded_with_503(served: ServeRun) -> None:
    _no_viewers(served.port)
    for path, channel in CHANNELS.items():
        held = [open_stream(served.port, f"{path}?token={TOKEN}") for _ in range(2)]
        try:
            assert [resp.status for _, resp in held] == [200, 200]
            for _ in range(3):
                code, headers, body = get(served.port, f"{path}?token={TOKEN}")
                assert code == 503 and headers["retry-after"] == "10" and b"too many viewers" in body
            assert get(served.port, f"/status?token={TOKEN}")[0] == 200  # short requests still served
        finally:
            for stream in held:
                close_stream(*stream)
        _until(lambda c=channel: _status(served.port)["viewers"][c] == 0)
        conn, resp = open_stream(served.port, f"{path}?token={TOKEN}")  # a freed slot can be taken again
        assert resp.status == 200
        close_stream(conn, resp)


def test_only_get_and_head(served: ServeRun) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"):
        code, reply = raw_request(served.port, f"{method} /?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                               "Content-Length: 5\r\n\r\nhello".encode())
        assert code == 405, (method, reply[:200])
        assert b"\r\nAllow: GET, HEAD\r\n" in reply


def test_malformed_and_oversized_requests(served: ServeRun) -> None:
    port = served.port
    cases = {
        b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n": 414,
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n": 431,
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n": 431,
        b"GARBAGE\r\n\r\n": 400,
        b"GET /\r\n\r\n": 400,  # HTTP/0.9
        b"GET / HTTP/1.1 extra\r\n\r\n": 400,
        b"GET / HTTP/1.x\r\n\r\n": 400,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)) + b"\r\n\r\n": 400,
        b"GET / HTTP/9.9\r\n\r\n": 505,
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n": 400,
        b"GET /?" + b"&".join(b"f%d=1" % i for i in range(40)) + b" HTTP/1.1\r\n\r\n": 400,
    }
    for request, expected in cases.items():
        code, reply = raw_request(port, request)
        assert code == expected, (request[:60], reply[:200])
        assert b"Traceback" not in reply
    # nothing maps a path onto the file system
    for path in ("/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/status/../../etc/hostname", "//etc/passwd"):
        code, reply = raw_request(port, f"GET {path}?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        assert code == 404, (path, reply[:200])
    assert get(port, f"/status?token={TOKEN}")[0] == 200  # and the server still answers


def test_a_loopback_server_answers_only_to_local_host_names(served: ServeRun) -> None:
    """A web page that rebinds its own DNS name to 127.0.0.1 must not read the stream."""
    port = served.port
    for host, expected in (("evil.example", 403), ("192.168.1.20", 403), ("localhost", 200),
                           (f"localhost:{port}", 200), (f"127.0.0.1:{port}", 200), ("[::1]", 200)):
        code, _, _ = get(port, f"/status?token={TOKEN}", headers={"Host": host})
        assert code == expected, host


# --------------------------------------------------------------------------- binding and bad input


@pytest.mark.parametrize(("value", "bound"), [("0", "127.0.0.1"), ("0.0.0.0:0", "0.0.0.0")])
def test_bind_address_and_the_wildcard_warning(int8_model: Path, video: Path, value: str, bound: str) -> None:
    run = ServeRun(CLI, "--model", int8_model, "--source", video, "--fps", 10, "--duration", 2, "--serve", value)
    try:
        run.wait_serving()
        listening = [c.laddr for c in psutil.Process(run.proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
    finally:
        code = run.stop(None, timeout=60)  # --duration ends it
    assert code == 0, run.stderr
    assert [(a.ip, a.port) for a in listening] == [(bound, run.port)]
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    if bound == "0.0.0.0":
        assert run.url == f"http://{socket.gethostname()}:{run.port}/"
        assert len(warnings) == 1 and "every network interface" in warnings[0] and "--token" in warnings[0]
    else:
        assert run.url == f"http://127.0.0.1:{run.port}/" and not warnings


def test_parse_address() -> None:
    assert parse_address("8080") == ("127.0.0.1", 8080)
    assert parse_address("0") == ("127.0.0.1", 0)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_address("localhost:9000") == ("localhost", 9000)
    assert parse_address("raspberrypi.local:8080") == ("raspberrypi.local", 8080)
    assert parse_address("[::1]:8080") == ("::1", 8080)
    for bad in ("", "abc", ":8080", "host:", "1.2.3.4:65536", "-1", "8080:", "::1:8080", "[::1]", "[::1]8080",
                "h o st:80", "exa_mple:80", "80.5", "٨٠٨٠"):
        with pytest.raises(EdgesqzError, match=r"--serve takes \[HOST:\]PORT"):
            parse_address(bad)


def test_bad_serve_options_are_one_line_errors(int8_model: Path, video: Path) -> None:
    src = ["--model", int8_model, "--source", video]
    one_error_line(edgesqz("run", *src, "--serve", "localhost:99999"), "--serve takes [HOST:]PORT", "99999")
    one_error_line(edgesqz("run", *src, "--token", TOKEN), "--token needs --serve")
    one_error_line(edgesqz("run", *src, "--serve", "0", "--max-viewers", 0), "--max-viewers must be >= 1")
    one_error_line(edgesqz("run", *src, "--serve", "no-such-host.invalid:8080"), "cannot resolve host")


def test_port_in_use_is_a_one_line_error(int8_model: Path, video: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = edgesqz("run", "--model", int8_model, "--source", video, "--serve", f"127.0.0.1:{port}")
        one_error_line(p, f"--serve 127.0.0.1:{port}", "already in use")
        with pytest.raises(EdgesqzError, match="already in use"):
            ServeSink(f"127.0.0.1:{port}")


def test_privileged_port_without_rights_is_a_one_line_error(int8_model: Path, video: Path) -> None:
    start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if start.exists() and int(start.read_text()) <= 80:
        pytest.skip("this kernel lets every user listen on port 80 (net.ipv4.ip_unprivileged_port_start)")
    prefix = []
    if os.geteuid() == 0:  # root: run the command without the capability to bind low ports
        if not Path("/usr/bin/setpriv").exists():
            pytest.skip("running as root and setpriv (util-linux) is missing to drop CAP_NET_BIND_SERVICE")
        prefix = ["/usr/bin/setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service"]
    p = subprocess.run([*prefix, sys.executable, *CLI, "run", "--model", str(int8_model), "--source", str(video),
                        "--serve", "127.0.0.1:80"], capture_output=True, text=True, timeout=90)
    one_error_line(p, "--serve 127.0.0.1:80", "privileged", "8080")


# --------------------------------------------------------------------------- in-process: timeouts, limits, the end


@contextlib.contextmanager
def idle_sink(timeout: float) -> Iterator[ServeSink]:
    """A sink serving without a pipeline, with a short client timeout and 1 viewer per channel."""
    sink = ServeSink(("127.0.0.1", 0), max_viewers=1, timeout=timeout)
    sink.open(None)
    try:
        yield sink
    finally:
        sink.close(None)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_stalled_clients_are_dropped_after_the_timeout() -> None:
    with idle_sink(timeout=1.0) as sink:
        silent = socket.create_connection(("127.0.0.1", sink.port))
        trickle = socket.create_connection(("127.0.0.1", sink.port))
        t0 = time.monotonic()
        trickle.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for _ in range(8):  # a header byte now and then never completes the request
            time.sleep(0.25)
            with contextlib.suppress(OSError):
                trickle.sendall(b"X")
        assert _closed_within(silent, 3.0) and _closed_within(trickle, 3.0)
        assert time.monotonic() - t0 < 5.0
        assert get(sink.port, "/status")[0] == 200
        silent.close()
        trickle.close()


def test_connections_are_bounded() -> None:
    with idle_sink(timeout=5.0) as sink:
        limit = 2 * 1 + 16
        idle = [socket.create_connection(("127.0.0.1", sink.port)) for _ in range(limit)]
        try:
            time.sleep(0.3)
            code, reply = raw_request(sink.port, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert code == 503 and b"too many connections" in reply
        finally:
            for sock in idle:
                sock.close()
        _until(lambda: get(sink.port, "/status")[0] == 200)


def test_the_run_summary_ends_the_streams(int8_model: Path, video: Path) -> None:
    sink = ServeSink(("127.0.0.1", 0))
    pipeline = Pipeline(open_source(source=video, fps=30), Classifier(int8_model, threads=1), [sink], max_frames=45)
    results: dict[str, object] = {}

    def watch(name: str, path: str) -> None:
        conn, resp = open_stream(sink.port, path)
        results[name] = read_events(resp) if name == "events" else resp.read()
        close_stream(conn, resp)

    watchers = [threading.Thread(target=watch, args=a) for a in (("events", "/events"), ("stream", "/stream.mjpg"))]
    for thread in watchers:
        thread.start()
    summary = pipeline.run()
    for thread in watchers:
        thread.join(15)
        assert not thread.is_alive(), "a stream did not end with the run"
    events = results["events"]
    assert events[-1] == summary.to_record() and events[-1]["frames"] == 45
    frames = [e["frame"] for e in events[:-1]]
    assert len(frames) >= 10 and frames == sorted(set(frames))
    assert results["stream"].count(b"Content-Type: image/jpeg") >= 1
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", sink.port), timeout=2).close()
