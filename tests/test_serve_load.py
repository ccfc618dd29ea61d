"""Load on ``edgesqz run --serve`` over loopback: 8 MJPEG viewers for 30 s plus one stalled viewer.

The source is paced like a camera (``--fps 30``): a camera delivers 30 frames a second whatever
happens, and the pipeline must keep classifying every one it can. A server that made the pipeline
wait for viewers (a blocking write to the stalled one, encoding per viewer on the pipeline thread,
a lock held while sending) shows as a lower classification rate, or, while the pipeline still has
headroom, as frames waiting longer between capture and result. One run: no viewer for 6 s, 9
viewers for 30 s, no viewer for 6 s again; the no-viewer windows on both sides make the baseline,
so a change in the machine's other load hits both alike. Rates and latencies come from the run's
own JSON lines (``--output``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import time
from pathlib import Path

import psutil
import pytest
from serve_client import ServeRun, StreamReader, get, write_video
from test_device_run import CLI, jsonl

pytestmark = pytest.mark.slow

FPS = 30
BASELINE_S = 6  # before and after the load
LOAD_S = 30
VIEWERS = 8
MAX_VIEWERS = VIEWERS + 1  # the stalled one holds a slot until the server drops it
MB = 1024 * 1024
Window = tuple[float, float]


def _in(records: list[dict], windows: list[Window]) -> list[dict]:
    return [r for r in records if any(t0 <= r["timestamp"] < t1 for t0, t1 in windows)]


def _rate(records: list[dict], windows: list[Window]) -> float:
    """Frames classified per second among those captured in the windows."""
    return len(_in(records, windows)) / sum(t1 - t0 for t0, t1 in windows)


def _end_to_end_p50(records: list[dict], windows: list[Window]) -> float:
    return statistics.median(r["latency_ms"]["end_to_end"] for r in _in(records, windows))


def _window(seconds: float) -> Window:
    t0 = time.time()
    time.sleep(seconds)
    return t0, time.time()


def _stream_viewers(port: int) -> int:
    return int(json.loads(get(port, "/status")[2])["viewers"]["stream"])


def _until_viewers(port: int, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _stream_viewers(port) != n:
        assert time.monotonic() < deadline, f"the server did not reach {n} viewers"
        time.sleep(0.05)


def _stalled_viewer(port: int) -> socket.socket:
    """Asks for the stream, then never reads a byte (a tiny receive buffer, so the server's writes block)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def _dropped_by_server(sock: socket.socket, within: float) -> bool:
    """Drain what the server had sent before it gave up: True if the connection then ends."""
    sock.settimeout(within)
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def _past_the_bound(port: int, n: int) -> list[int]:
    return [get(port, "/stream.mjpg")[0] for _ in range(n)]


def _loaded(proc: psutil.Process, seconds: float) -> tuple[Window, int]:
    """The load window and the peak RSS seen in it (sampled every second)."""
    t0, peak = time.time(), 0
    while time.time() < t0 + seconds:
        time.sleep(1)
        peak = max(peak, proc.memory_info().rss)
    return (t0, time.time()), peak


def test_viewers_do_not_slow_the_pipeline_or_grow_memory(int8_model: Path, photos_dir: Path, tmp_path: Path) -> None:
    video = write_video(tmp_path / "camera.mp4", [photos_dir / "coffee.png", photos_dir / "chelsea.png"],
                        frames=FPS * (2 * BASELINE_S + LOAD_S + 25), per_photo=150)
    run = ServeRun(CLI, "--model", int8_model, "--source", video, "--fps", FPS, "--threads", 1,
                   "--serve", "127.0.0.1:0", "--max-viewers", MAX_VIEWERS, output=tmp_path / "run.jsonl")
    readers: list[StreamReader] = []
    stalled = None
    try:
        run.wait_serving()
        proc = psutil.Process(run.proc.pid)
        while get(run.port, "/frame.jpg")[0] != 200:
            time.sleep(0.1)
        time.sleep(3)  # warm-up
        before = _window(BASELINE_S)
        rss_before = proc.memory_info().rss

        stalled = _stalled_viewer(run.port)
        readers = [StreamReader(run.port, "/stream.mjpg") for _ in range(VIEWERS)]
        for reader in readers:
            reader.start()
        _until_viewers(run.port, MAX_VIEWERS)
        refused = _past_the_bound(run.port, 5)
        load, rss_peak = _loaded(proc, LOAD_S)
        received = [r.frames for r in readers]

        stalled_dropped = _dropped_by_server(stalled, within=5)
        remaining = _stream_viewers(run.port)
        readers.append(StreamReader(run.port, "/stream.mjpg"))  # the stalled viewer's slot is free again
        readers[-1].start()
        _until_viewers(run.port, MAX_VIEWERS)
        refused += _past_the_bound(run.port, 3)
        errors = [(r.error, r.bad) for r in readers if r.error is not None or r.bad]
        for reader in readers:
            reader.close()
        _until_viewers(run.port, 0)
        after = _window(BASELINE_S)
    finally:
        for reader in readers:
            reader.close()
        if stalled is not None:
            with contextlib.suppress(OSError):
                stalled.close()
        code = run.stop()
    assert code == 0, run.stderr

    records = [r for r in jsonl(run.output.read_text()) if r["kind"] == "classification"]
    base, loaded = _rate(records, [before, after]), _rate(records, [load])
    base_e2e, loaded_e2e = _end_to_end_p50(records, [before, after]), _end_to_end_p50(records, [load])
    print(f"\npipeline FPS {base:.1f} without viewers, {loaded:.1f} with {VIEWERS} + 1 stalled; end-to-end p50 "
          f"{base_e2e:.1f} -> {loaded_e2e:.1f} ms; RSS {rss_before / MB:.1f} -> peak {rss_peak / MB:.1f} MB; "
          f"frames per viewer {received}")
    assert base > FPS * 0.6, f"the pipeline did not keep up with the camera even without viewers ({base:.1f} FPS)"
    assert loaded >= 0.9 * base, f"viewers slowed the pipeline: {loaded:.1f} vs {base:.1f} FPS"
    assert loaded_e2e <= 1.25 * base_e2e + 2, f"frames waited longer with viewers: {loaded_e2e} vs {base_e2e} ms"
    assert rss_peak - rss_before < 20 * MB, f"memory grew by {(rss_peak - rss_before) / MB:.1f} MB"
    assert refused == [503] * 8
    assert errors == []
    assert min(received) >= 0.5 * loaded * LOAD_S, received  # every viewer saw a live stream
    assert stalled_dropped and remaining == VIEWERS, "the stalled viewer was not dropped after the timeout"
