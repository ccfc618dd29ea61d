"""Pipeline FPS of ``edgesqz run --serve`` with 0, 1 and 8 MJPEG viewers on loopback.

    python benchmarks/serve_viewers.py [--model M.tflite] [--viewers 0 1 8] [--seconds 15] [--rounds 2]
                                       [--threads 1] [--json FILE]

Writes a 640x480 synthetic video (pans over the shared photos, ``$EDGESQZ_SHARED/data/photos``;
coloured shapes when they are absent), then runs ``edgesqz run --source VIDEO --serve 127.0.0.1:0``
in a subprocess for each viewer count, alternating over ``--rounds`` rounds, in two modes:

- *camera*: the video played live at 30 fps (``--fps 30``), as a camera delivers it;
- *free-running*: the video file as fast as the pipeline goes (every frame, no pacing), which shows
  what serving costs in CPU on this machine.

The viewers connect as soon as the server listens (before the first frame) and read the stream
with plain sockets in this process, counting parts without decoding them. Reported: the run's
own ``fps_mean`` and latency p50s (its ``run_summary``), frames each viewer received per second,
and the peak RSS of the ``edgesqz run`` process (VmHWM, Linux). Never imports TensorFlow or PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

WIDTH, HEIGHT, VIDEO_FPS = 640, 480, 30
MARKER = b"Content-Type: image/jpeg"
MODES = {"camera": ["--fps", "30"], "free-running": []}


def _photos() -> list[np.ndarray]:
    from edgesqz.paths import shared_dir

    folder = shared_dir() / "data" / "photos"
    images = [img for p in sorted(folder.glob("*")) if (img := cv2.imread(str(p))) is not None] \
        if folder.is_dir() else []
    if images:
        return images
    rng = np.random.default_rng(0)
    shapes = []
    for _ in range(3):
        img = np.full((720, 960, 3), rng.integers(0, 255, 3), np.uint8)
        for _ in range(40):
            centre = (int(rng.integers(0, 960)), int(rng.integers(0, 720)))
            cv2.circle(img, centre, int(rng.integers(10, 120)), tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
        shapes.append(img)
    return shapes


def write_video(path: Path, frames: int) -> Path:
    """640x480 mp4v, panning over each photo in turn (150 frames each)."""
    scenes = [cv2.resize(img, (800, 620)) for img in _photos()]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise SystemExit(f"cannot write {path} with OpenCV's mp4v encoder")
    for i in range(frames):
        scene = scenes[(i // 150) % len(scenes)]
        x, y = (i * 2) % 160, i % 140
        writer.write(np.ascontiguousarray(scene[y: y + HEIGHT, x: x + WIDTH]))
    writer.release()
    return path


class Viewer(threading.Thread):
    """Reads /stream.mjpg and counts its parts (no parsing beyond that, so it costs little CPU)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.parts = 0
        self.status = b""

    def run(self) -> None:
        buf = bytearray(1 << 18)
        tail = b""
        try:
            while n := self.sock.recv_into(buf):
                data = tail + bytes(buf[:n])
                self.status = self.status or data[:12]
                self.parts += data.count(MARKER)
                tail = data[-(len(MARKER) - 1):]
        except OSError:
            pass
        finally:
            self.sock.close()


def proc_memory(pid: int, field: str = "VmHWM") -> int:
    """A process' memory from /proc/PID/status in bytes (VmHWM: peak resident so far, VmRSS: now); 0 once it
    is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((x for x in text.splitlines() if x.startswith(f"{field}:")), f"{field}: 0 kB")
    return int(line.split()[1]) * 1024


def _serving_port(proc: subprocess.Popen, lines: list[str]) -> int:
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("serving: "):
            return int(line.split("/", 3)[2].rsplit(":", 1)[1])
    raise SystemExit("edgesqz run ended before serving:\n" + "".join(lines))


def one_run(model: Path, video: Path, mode: str, viewers: int, seconds: float, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.jsonl"
        cmd = [sys.executable, "-m", "edgesqz", "run", "--model", str(model), "--source", str(video), *MODES[mode],
               "--threads", str(threads), "--duration", str(seconds), "--serve", "127.0.0.1:0",
               "--max-viewers", str(max(1, viewers)), "--output", str(out)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        port = _serving_port(proc, lines)
        clients = [Viewer(port) for _ in range(viewers)]
        for client in clients:
            client.start()
        drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        drain.start()
        peak = 0
        while proc.poll() is None:
            peak = max(peak, proc_memory(proc.pid))
            time.sleep(0.25)
        proc.wait()
        drain.join(5)
        for client in clients:
            client.join(10)
        if proc.returncode != 0:
            raise SystemExit(f"edgesqz run failed ({proc.returncode}):\n" + "".join(lines))
        summary = json.loads(out.read_text().splitlines()[-1])
    duration = summary["duration_s"]
    return {"mode": mode, "viewers": viewers, "fps": summary["fps_mean"], "frames": summary["frames"],
            "dropped": summary["dropped"], "inference_p50_ms": summary["latency_ms"]["inference"]["p50"],
            "end_to_end_p50_ms": summary["latency_ms"]["end_to_end"]["p50"],
            "viewer_fps": [round(c.parts / duration, 1) for c in clients],
            "viewer_status_ok": all(c.status.startswith(b"HTTP/1.0 200") for c in clients),
            "peak_rss_mb": round(peak / 2**20, 1)}


def _table(results: list[dict[str, Any]], counts: list[int]) -> None:
    print(f"{'mode':<13} {'viewers':>7} {'pipeline FPS':>13} {'vs 0':>7} {'inference p50':>14} "
          f"{'end-to-end p50':>15} {'dropped':>8} {'FPS per viewer':>15} {'peak RSS':>9}")
    for mode in MODES:
        rows = {n: [r for r in results if r["mode"] == mode and r["viewers"] == n] for n in counts}
        base = statistics.median(r["fps"] for r in rows[counts[0]])
        for n, runs in rows.items():
            fps = statistics.median(r["fps"] for r in runs)
            per_viewer = [v for r in runs for v in r["viewer_fps"]]
            print(f"{mode:<13} {n:>7} {fps:>13.1f} {(fps / base - 1) * 100:>+6.1f}% "
                  f"{statistics.median(r['inference_p50_ms'] for r in runs):>11.1f} ms "
                  f"{statistics.median(r['end_to_end_p50_ms'] for r in runs):>12.1f} ms "
                  f"{statistics.median(r['dropped'] for r in runs):>8.0f} "
                  f"{statistics.median(per_viewer) if per_viewer else 0:>15.1f} "
                  f"{max(r['peak_rss_mb'] for r in runs):>6.1f} MB")


def main() -> None:
    from edgesqz.paths import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_model_path())
    ap.add_argument("--viewers", type=int, nargs="+", default=[0, 1, 8])
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="interpreter threads of the run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not args.model.exists():
        raise SystemExit(f"no model at {args.model}; pass --model FILE.tflite")
    with tempfile.TemporaryDirectory() as tmp:
        video = write_video(Path(tmp) / "serve.mp4", frames=int(args.seconds * 160))
        print(f"model {args.model.name}; {WIDTH}x{HEIGHT} video; {os.cpu_count()} CPUs; {args.threads} interpreter "
              f"thread(s); {args.seconds:g} s per run; medians of {args.rounds} alternating rounds", flush=True)
        results = [one_run(args.model, video, mode, n, args.seconds, args.threads)
                   for _ in range(args.rounds) for mode in MODES for n in args.viewers]
    if not all(r["viewer_status_ok"] for r in results):
        raise SystemExit("a viewer was refused: " + json.dumps(results))
    _table(results, args.viewers)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
