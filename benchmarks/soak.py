"""Soak test of ``edgesqz run``: a looping video at camera pace for 10 minutes, JSON lines and ``--serve`` on.

    python benchmarks/soak.py [--model M.tflite] [--minutes 10] [--fps 30] [--threads 1] [--interval 60]
                              [--json benchmarks/results/soak.json] [--force]

Writes a 10 s 640x480 video (pans over the shared photos, as ``serve_viewers.py`` does), then runs

    edgesqz run --model M --source VIDEO --loop --fps 30 --threads 1 --json --serve 127.0.0.1:0 --no-display

for ``--minutes``, reading its JSON lines from stdout as a consumer would, with one viewer reading
``/stream.mjpg`` all the time and ``/status`` polled every interval. Every ``--interval`` seconds it
prints the run's resident memory (VmRSS, from /proc), the classification rate and the end-to-end
latency (p50/p90 of that interval's frames), the frames the viewer received and the frames dropped.
At the end it stops the run with SIGINT and checks the exit status and the ``run_summary``.

Pass/fail: RSS may grow by less than 5 % from the end of the first interval (after warm-up) to the
end, and the FPS must stay within 10 % of ``--fps``. Never imports TensorFlow or PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_viewers import Viewer, _serving_port, proc_memory, write_video

MAX_RSS_GROWTH = 0.05


class Lines(threading.Thread):
    """Reads the run's JSON lines from its stdout; keeps only this interval's latencies (bounded)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lock = threading.Lock()
        self.frames = 0
        self.last_frame_index = -1
        self.e2e: list[float] = []
        self.inference: list[float] = []
        self.summary: dict[str, Any] | None = None
        self.bad = 0

    def run(self) -> None:
        for line in self.stream:
            try:
                obj = json.loads(line)
            except ValueError:
                self.bad += 1
                continue
            with self.lock:
                if obj.get("kind") == "classification":
                    self.frames += 1
                    self.last_frame_index = obj["frame"]
                    self.e2e.append(obj["latency_ms"]["end_to_end"])
                    self.inference.append(obj["latency_ms"]["inference"])
                elif obj.get("kind") == "run_summary":
                    self.summary = obj

    def take(self) -> tuple[int, list[float], list[float]]:
        with self.lock:
            frames, e2e, inference = self.frames, self.e2e, self.inference
            self.frames, self.e2e, self.inference = 0, [], []
        return frames, e2e, inference


def _status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as r:
        return json.loads(r.read())


def _p(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def main() -> None:
    from edgesqz.paths import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_model_path())
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=30.0, help="camera pace of the looping video")
    ap.add_argument("--threads", type=int, default=1, help="interpreter threads of the run")
    ap.add_argument("--interval", type=float, default=60.0, help="seconds between reports")
    ap.add_argument("--json", type=Path, help="write the results here (e.g. benchmarks/results/soak.json)")
    ap.add_argument("--force", action="store_true", help="replace an existing --json file")
    args = ap.parse_args()
    if not args.model.exists():
        raise SystemExit(f"no model at {args.model}; pass --model FILE.tflite")
    if args.json is not None:
        from edgesqz.errors import EdgesqzError
        from edgesqz.fileio import check_output

        try:
            check_output(args.json, force=args.force, what="--json", option="--json")
        except EdgesqzError as exc:
            raise SystemExit(f"error: {exc}") from None

    with tempfile.TemporaryDirectory() as tmp:
        video = write_video(Path(tmp) / "loop.mp4", frames=300)
        cmd = [sys.executable, "-m", "edgesqz", "run", "--model", str(args.model), "--source", str(video), "--loop",
               "--fps", f"{args.fps:g}", "--threads", str(args.threads), "--json", "--serve", "127.0.0.1:0",
               "--no-display"]
        print(f"$ {' '.join(cmd[2:])}", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        err_lines: list[str] = []
        port = _serving_port(proc, err_lines)
        threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True).start()
        lines = Lines(proc.stdout)
        lines.start()
        viewer = Viewer(port)
        viewer.start()
        t0 = time.monotonic()
        rows = []
        seen_parts = 0
        print(f"{'minute':>6} {'RSS MB':>8} {'FPS':>6} {'e2e p50':>8} {'e2e p90':>8} {'inf p50':>8} "
              f"{'viewer FPS':>10} {'dropped':>8}", flush=True)
        for k in range(1, round(args.minutes * 60 / args.interval) + 1):
            due = t0 + k * args.interval
            while time.monotonic() < due:
                if proc.poll() is not None:
                    raise SystemExit(f"edgesqz run ended early ({proc.returncode}):\n" + "".join(err_lines[-20:]))
                time.sleep(min(1.0, max(0.0, due - time.monotonic())))
            frames, e2e, inference = lines.take()
            status = _status(port)
            parts = viewer.parts
            rss_mb = round(proc_memory(proc.pid, "VmRSS") / 2**20, 1)
            row = {"minute": round(k * args.interval / 60, 2), "rss_mb": rss_mb,
                   "fps": round(frames / args.interval, 2), "end_to_end_p50_ms": _p(e2e, 50),
                   "end_to_end_p90_ms": _p(e2e, 90), "inference_p50_ms": _p(inference, 50),
                   "viewer_fps": round((parts - seen_parts) / args.interval, 2), "dropped_total": status["dropped"],
                   "captured_total": status["captured"]}
            seen_parts = parts
            rows.append(row)
            print(f"{row['minute']:>6g} {row['rss_mb']:>8.1f} {row['fps']:>6.1f} {row['end_to_end_p50_ms']:>8} "
                  f"{row['end_to_end_p90_ms']:>8} {row['inference_p50_ms']:>8} {row['viewer_fps']:>10.1f} "
                  f"{row['dropped_total']:>8}", flush=True)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        lines.join(10)
        viewer.join(10)
    summary = lines.summary or {}
    base, end = rows[0]["rss_mb"], rows[-1]["rss_mb"]
    growth = (end - base) / base if base else 0.0
    fps_ok = all(abs(r["fps"] - args.fps) <= 0.1 * args.fps for r in rows)
    passed = proc.returncode == 0 and growth < MAX_RSS_GROWTH and fps_ok and summary.get("stopped_by") == "SIGINT"
    result = {
        "command": " ".join(cmd[2:]).replace(str(video), "LOOP.mp4").replace(str(args.model), args.model.name),
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.uname().machine}, {os.cpu_count()} CPUs",
        "minutes": args.minutes, "interval_s": args.interval, "fps_requested": args.fps, "threads": args.threads,
        "rows": rows, "rss_growth_after_first_interval": round(growth, 4), "max_rss_growth": MAX_RSS_GROWTH,
        "exit_status": proc.returncode, "viewer_status": viewer.status.decode(errors="replace").strip(),
        "summary": {k: summary.get(k) for k in ("frames", "captured", "dropped", "duration_s", "fps_mean",
                                                "latency_ms", "stopped_by")},
        "passed": passed,
    }
    print(f"RSS {base:.1f} MB after the first interval -> {end:.1f} MB at the end ({growth * 100:+.2f} %, limit "
          f"{MAX_RSS_GROWTH * 100:.0f} %); FPS within 10 % of {args.fps:g}: {fps_ok}; exit {proc.returncode}, stopped "
          f"by {summary.get('stopped_by')}: {'PASS' if passed else 'FAIL'}")
    if args.json is not None:
        from edgesqz.fileio import atomic_write

        atomic_write(args.json, json.dumps(result, indent=2) + "\n", force=args.force)
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
