"""What events cost the camera loop: ``edgesqz run`` on a camera-paced video with events + MQTT + webhook off and on.

    python benchmarks/events_overhead.py [--model M.tflite] [--seconds 30] [--rounds 2] [--threads 1]
                                         [--json benchmarks/results/events_overhead.json]

Writes a 640x480 video of the shared photos in turn (espresso, background, cat, background, 2 s each;
``$EDGESQZ_SHARED/data/photos``), starts a Mosquitto broker on a free loopback port (Debian's
``mosquitto``) with a paho subscriber, and a local HTTP server for the webhook, then runs
``edgesqz run --source VIDEO --fps 30`` (played as a 30 fps camera) in a subprocess in three modes,
interleaved over ``--rounds`` rounds (off, events, events+clips, off, ...):

- ``off``: classification only, JSON lines to a file;
- ``events``: the same plus two ``--event`` rules, ``--mqtt`` (with Home Assistant discovery) and ``--webhook``;
- ``events+clips``: the same plus ``--snapshot-dir`` and ``--clip-dir`` (3 s pre-roll ring of JPEGs).

Reported per mode (medians over the rounds): the camera loop's FPS and end-to-end latency p50/p90
(the run's own ``run_summary``), the event latency from the frame that confirmed an event (its
capture time, the record's ``timestamp``) to the MQTT subscriber receiving it and to the webhook
server receiving it, and the run's peak RSS (VmHWM). Prints the CPU's vector flags beside the latencies.
Never imports TensorFlow or PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mqtt_broker import Broker, Subscriber
from serve_viewers import proc_memory

MODES = ("off", "events", "events+clips")
SCENES = ("coffee.png", "rocket.jpg", "chelsea.png", "rocket.jpg")


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = sorted({f for f in ("avx512_vnni", "avx_vnni", "avx2") if re.search(rf"\b{f}\b", text)})
    return " ".join(flags) or "none of avx512_vnni/avx_vnni/avx2"


def write_video(path: Path, seconds: float) -> Path:
    from edgesqz.paths import shared_dir

    folder = shared_dir() / "data" / "photos"
    if not folder.is_dir():
        raise SystemExit(f"needs the shared photos in {folder} (set EDGESQZ_SHARED)")
    scenes = [cv2.resize(cv2.imread(str(folder / name)), (800, 620)) for name in SCENES]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 480))
    for i in range(int(seconds * 30)):
        scene = scenes[(i // 60) % len(scenes)]
        x, y = (i * 2) % 160, i % 140
        writer.write(np.ascontiguousarray(scene[y: y + 480, x: x + 640]))
    writer.release()
    return path


class Hooks(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.received: list[tuple[float, dict]] = []
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(BaseHTTPRequestHandler):
    server: Hooks

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((time.time(), json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def one_run(model: Path, video: Path, mode: str, threads: int, broker: Broker, sub: Subscriber, hooks: Hooks,
            tmp: Path) -> dict[str, Any]:
    out = tmp / f"{mode}-{time.monotonic_ns()}.jsonl"
    cmd = [sys.executable, "-m", "edgesqz", "run", "--model", str(model), "--source", str(video), "--fps", "30",
           "--threads", str(threads), "--output", str(out), "--no-display"]
    if mode != "off":
        cmd += ["--event", "espresso", "--event", "cat=tabby,tiger cat,Egyptian cat", "--event-end", "1",
                "--mqtt", f"mqtt://127.0.0.1:{broker.port}/bench", "--device-id", "bench",
                "--webhook", f"http://127.0.0.1:{hooks.server_address[1]}/hook"]
    if mode == "events+clips":
        media = tmp / f"media-{time.monotonic_ns()}"
        cmd += ["--snapshot-dir", str(media), "--clip-dir", str(media), "--preroll", "3"]
    sub.clear()
    hooks.received.clear()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    drain.start()
    peak = 0
    while proc.poll() is None:
        peak = max(peak, proc_memory(proc.pid))
        time.sleep(0.1)
    drain.join(5)
    if proc.returncode != 0:
        raise SystemExit(f"edgesqz run failed ({proc.returncode}):\n" + "".join(lines))
    objs = [json.loads(line) for line in out.read_text().splitlines()]
    summary = objs[-1]
    events = [o for o in objs if o["kind"] == "event"]
    time.sleep(0.5)  # the last messages
    mqtt_ms = [(m.received - m.json()["timestamp"]) * 1e3 for m in sub.messages]
    hook_ms = [(t - r["timestamp"]) * 1e3 for t, r in hooks.received]
    ring = next((line for line in lines if "pre-roll ring held at most" in line), "")
    ring_mb = float(ring.split(" frames, ")[1].split(" MB")[0]) if ring else None
    if mode != "off" and len(sub.messages) != len(events):
        raise SystemExit(f"{mode}: {len(events)} events but {len(sub.messages)} MQTT messages")
    return {"mode": mode, "fps": summary["fps_mean"], "frames": summary["frames"], "dropped": summary["dropped"],
            "end_to_end_p50_ms": summary["latency_ms"]["end_to_end"]["p50"],
            "end_to_end_p90_ms": summary["latency_ms"]["end_to_end"]["p90"],
            "inference_p50_ms": summary["latency_ms"]["inference"]["p50"],
            "events": len(events), "mqtt_event_latency_ms": [round(v, 2) for v in mqtt_ms],
            "webhook_event_latency_ms": [round(v, 2) for v in hook_ms],
            "webhook_received": len(hooks.received), "peak_rss_mb": round(peak / 2**20, 1),
            "preroll_ring_peak_mb": ring_mb, "load_average_1min": round(os.getloadavg()[0], 2)}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _p90(values: list[float]) -> float | None:
    return round(float(np.percentile(values, 90)), 2) if values else None


def main() -> None:
    from edgesqz.paths import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_model_path())
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the video (each run plays all of it)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="interpreter threads of the run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not args.model.exists():
        raise SystemExit(f"no model at {args.model}; pass --model FILE.tflite")
    flags = cpu_flags()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        video = write_video(tmp / "events.mp4", args.seconds)
        try:
            broker = Broker(tmp).start()
        except pytest.skip.Exception as exc:  # mosquitto is not installed
            raise SystemExit(str(exc)) from None
        sub = Subscriber(broker.port, topics=("bench/+/event",))
        hooks = Hooks()
        threading.Thread(target=hooks.serve_forever, daemon=True).start()
        print(f"model {args.model.name}; 640x480 video played at 30 fps for {args.seconds:g} s; {os.cpu_count()} CPUs "
              f"({platform.processor() or platform.machine()}; flags: {flags}); {args.threads} interpreter thread(s); "
              f"modes interleaved over {args.rounds} rounds", flush=True)
        try:
            runs = []
            for r in range(args.rounds):
                for mode in MODES:
                    runs.append(one_run(args.model, video, mode, args.threads, broker, sub, hooks, tmp))
                    print(f"  round {r + 1} {mode}: {runs[-1]['fps']} FPS, {runs[-1]['events']} events", flush=True)
        finally:
            sub.close()
            hooks.shutdown()
            broker.stop()
    table = []
    for mode in MODES:
        rows = [x for x in runs if x["mode"] == mode]
        mqtt_ms = [v for x in rows for v in x["mqtt_event_latency_ms"]]
        hook_ms = [v for x in rows for v in x["webhook_event_latency_ms"]]
        table.append({"mode": mode, "fps": _median([x["fps"] for x in rows]),
                      "end_to_end_p50_ms": _median([x["end_to_end_p50_ms"] for x in rows]),
                      "end_to_end_p90_ms": _median([x["end_to_end_p90_ms"] for x in rows]),
                      "inference_p50_ms": _median([x["inference_p50_ms"] for x in rows]),
                      "dropped": _median([x["dropped"] for x in rows]), "events": _median([x["events"] for x in rows]),
                      "mqtt_event_latency_p50_ms": _median(mqtt_ms), "mqtt_event_latency_p90_ms": _p90(mqtt_ms),
                      "webhook_event_latency_p50_ms": _median(hook_ms), "webhook_event_latency_p90_ms": _p90(hook_ms),
                      "peak_rss_mb": max(x["peak_rss_mb"] for x in rows),
                      "preroll_ring_peak_mb": max((x["preroll_ring_peak_mb"] or 0) for x in rows) or None})
    print(f"\nCPU flags: {flags}")
    print(f"{'mode':<13} {'FPS':>6} {'e2e p50/p90 ms':>15} {'inference p50':>13} {'dropped':>7} {'events':>6} "
          f"{'MQTT latency p50/p90 ms':>24} {'webhook p50/p90 ms':>19} {'peak RSS':>9} {'pre-roll ring':>13}")
    for row in table:
        ring = "-" if row["preroll_ring_peak_mb"] is None else f"{row['preroll_ring_peak_mb']:.1f} MB"

        def pair(a: float | None, b: float | None) -> str:
            return "-" if a is None else f"{a:.1f}/{b:.1f}"
        print(f"{row['mode']:<13} {row['fps']:>6.1f} {pair(row['end_to_end_p50_ms'], row['end_to_end_p90_ms']):>15} "
              f"{row['inference_p50_ms']:>10.1f} ms {row['dropped']:>7.0f} {row['events']:>6.0f} "
              f"{pair(row['mqtt_event_latency_p50_ms'], row['mqtt_event_latency_p90_ms']):>24} "
              f"{pair(row['webhook_event_latency_p50_ms'], row['webhook_event_latency_p90_ms']):>19} "
              f"{row['peak_rss_mb']:>6.1f} MB {ring:>13}")
    loads = [x["load_average_1min"] for x in runs]
    print(f"1-minute load average after the runs: {min(loads)} to {max(loads)} on {os.cpu_count()} CPUs")
    if args.json:
        result = {"command": "python benchmarks/events_overhead.py " + " ".join(sys.argv[1:]),
                  "measured": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count(), "cpu_flags": flags,
                                                                     "python": platform.python_version()},
                  "model": args.model.name, "seconds": args.seconds, "rounds": args.rounds, "threads": args.threads,
                  "summary": table, "runs": runs}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
