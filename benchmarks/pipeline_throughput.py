"""Pipeline throughput vs pure inference rate, and the peak memory of ``edgesqz run``.

    python benchmarks/pipeline_throughput.py [--model M.tflite] [--frames 600] [--threads 1 2] [--rounds 3]

1. Writes a 640x480 synthetic video with ``cv2.VideoWriter`` (mp4v): slow pans and zooms over the
   shared photos (``$EDGESQZ_SHARED/data/photos``; random shapes when they are absent).
2. For each thread count, alternating over ``--rounds`` rounds (so background load hits both alike):
   - *pure inference*: ``interpreter.invoke()`` in a loop on an already prepared input;
   - *pipeline*: ``Pipeline(video source, Classifier, [JSON lines to /dev/null])`` — decoding,
     preprocessing, inference, post-processing and JSON, as ``edgesqz run --json`` does.
   - *sequential*: the naive loop (read, prepare, infer in one thread), for comparison.
   The medians are compared; the target is pipeline >= 90 % of pure inference. The reader's CPU
   time per frame (decode + prepare) is measured too: when the interpreter already has every core,
   that time can only come out of inference, which caps the ratio (printed as ``ceiling``).
3. Runs ``edgesqz run --source VIDEO --json`` in a subprocess per thread count and reports its
   throughput and peak RSS (``getrusage`` of the finished child: exact, no polling).

Prints a table; ``--json FILE`` also writes the numbers. Never imports TensorFlow or PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from edgesqz.device.classifier import Classifier

WIDTH, HEIGHT, VIDEO_FPS = 640, 480, 30
DEFAULT_DEV_MODEL = "/tmp/edgesqz-dev/squeezenet1_1-int8.tflite"


def _photos() -> list[np.ndarray]:
    from edgesqz.paths import shared_dir

    folder = shared_dir() / "data" / "photos"
    images = []
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if img is not None:
                images.append(img)
    if not images:  # no shared data: random coloured shapes, still compressible like video
        rng = np.random.default_rng(0)
        for _ in range(3):
            img = np.full((720, 960, 3), rng.integers(0, 255, 3), np.uint8)
            for _ in range(40):
                centre = (int(rng.integers(0, 960)), int(rng.integers(0, 720)))
                colour = tuple(int(c) for c in rng.integers(0, 255, 3))
                cv2.circle(img, centre, int(rng.integers(10, 120)), colour, -1)
            images.append(img)
    return images


def write_video(path: Path, frames: int) -> Path:
    """A 640x480 mp4v video panning and zooming over the photos (each photo gets an equal share)."""
    photos = _photos()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise SystemExit(f"cannot write {path} with OpenCV's mp4v encoder")
    per = max(1, frames // len(photos))
    for i in range(frames):
        img = photos[min(i // per, len(photos) - 1)]
        t = (i % per) / max(1, per - 1)  # 0 -> 1 over this photo's frames
        h, w = img.shape[:2]
        zoom = 1.0 + 0.5 * t  # zoom in by half while panning left to right
        cw, ch = min(w, h * WIDTH / HEIGHT) / zoom, min(h, w * HEIGHT / WIDTH) / zoom
        x0 = (w - cw) * t
        y0 = (h - ch) * (0.5 + 0.3 * np.sin(2 * np.pi * t))
        m = np.array([[WIDTH / cw, 0, -x0 * WIDTH / cw], [0, HEIGHT / ch, -y0 * HEIGHT / ch]], dtype=np.float64)
        writer.write(cv2.warpAffine(img, m, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    writer.release()
    return path


def pure_inference_fps(classifier: Classifier, tensor: np.ndarray, n: int) -> float:
    it = classifier.interpreter
    it.set_tensor(classifier._input["index"], tensor)
    for _ in range(10):
        it.invoke()
    t0 = time.perf_counter()
    for _ in range(n):
        it.invoke()
    return n / (time.perf_counter() - t0)


def pipeline_fps(classifier: Classifier, video: Path, frames: int) -> tuple[float, int]:
    from edgesqz.device.pipeline import Pipeline
    from edgesqz.device.sinks import JsonLinesSink
    from edgesqz.device.sources import open_source

    with open(os.devnull, "w") as devnull:
        summary = Pipeline(open_source(source=str(video)), classifier, [JsonLinesSink(devnull)],
                           max_frames=frames, handle_signals=False).run()
    return summary.fps, summary.frames


def sequential_fps(classifier: Classifier, video: Path, frames: int) -> float:
    """The naive loop for comparison: read, prepare, infer, one after the other in one thread."""
    cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    n, t0 = 0, time.perf_counter()
    while n < frames:
        ok, image = cap.read()
        if not ok:
            break
        out = classifier.infer(classifier.prepare(image))
        classifier.top(out.scores)
        n += 1
    return n / (time.perf_counter() - t0)


def reader_cpu_ms(classifier: Classifier, video: Path, frames: int) -> float:
    """CPU time per frame of what the reader thread does: decode + prepare (OpenCV single-threaded)."""
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
        n, c0 = 0, time.thread_time()
        while n < frames:
            ok, image = cap.read()
            if not ok:
                break
            classifier.prepare(image)
            n += 1
        return (time.thread_time() - c0) / n * 1e3
    finally:
        cv2.setNumThreads(previous)


def _run_command() -> list[str]:
    """``python -m edgesqz`` when the main CLI has ``run``; else the device commands on their own."""
    probe = subprocess.run([sys.executable, "-m", "edgesqz", "run", "--help"], capture_output=True, text=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "edgesqz"]
    boot = ("import typer; from edgesqz.device.cli import register; "
            "app = typer.Typer(pretty_exceptions_enable=False); register(app); app()")
    return [sys.executable, "-c", boot]


_RSS_WRAPPER = """
import resource, subprocess, sys, json
p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
print(json.dumps({"rc": p.returncode, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "last": (p.stdout.strip().splitlines() or [""])[-1], "stderr": p.stderr[-2000:]}))
"""


def run_subprocess(model: Path, video: Path, threads: int) -> dict:
    cmd = [*_run_command(), "run", "--model", str(model), "--source", str(video), "--threads", str(threads),
           "--json", "--no-display"]
    out = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *cmd], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    if info["rc"] != 0:
        raise SystemExit(f"edgesqz run failed ({info['rc']}):\n{info['stderr']}")
    summary = json.loads(info["last"])
    return {"fps": summary["fps_mean"], "frames": summary["frames"], "peak_rss_mb": info["maxrss_kb"] / 1024}


def main() -> None:
    from edgesqz.device.classifier import Classifier

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path(os.environ.get("EDGESQZ_TEST_INT8_MODEL", DEFAULT_DEV_MODEL)))
    ap.add_argument("--frames", type=int, default=600, help="frames in the synthetic video")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not args.model.exists():
        raise SystemExit(f"model {args.model} not found; pass --model (an edgesqz convert --int8 output)")

    with tempfile.TemporaryDirectory(prefix="edgesqz-bench-") as tmp:
        video = write_video(Path(tmp) / "pan640x480.mp4", args.frames)
        first = cv2.VideoCapture(str(video)).read()[1]
        print(f"model {args.model}; video {args.frames} frames 640x480 mp4v; {os.cpu_count()} CPUs; "
              f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
        rows = []
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        for threads in args.threads:
            classifier = Classifier(args.model, threads=threads)
            tensor = classifier.prepare(first)
            pure, piped, seq = [], [], []
            for _ in range(args.rounds):
                pure.append(pure_inference_fps(classifier, tensor, args.frames))
                piped.append(pipeline_fps(classifier, video, args.frames)[0])
                seq.append(sequential_fps(classifier, video, args.frames))
            reader_ms = reader_cpu_ms(classifier, video, args.frames)
            sub = run_subprocess(args.model, video, threads)
            row = {"threads": threads, "pure_fps": statistics.median(pure), "pipeline_fps": statistics.median(piped),
                   "sequential_fps": statistics.median(seq), "reader_cpu_ms": round(reader_ms, 3),
                   "pure_rounds": [round(x, 1) for x in pure], "pipeline_rounds": [round(x, 1) for x in piped],
                   "run_fps": sub["fps"], "run_peak_rss_mb": round(sub["peak_rss_mb"], 1)}
            row["ratio"] = row["pipeline_fps"] / row["pure_fps"]
            row["sequential_ratio"] = row["sequential_fps"] / row["pure_fps"]
            # With every core busy with inference, the reader's CPU time must come out of it:
            # at best pure core-ms / (pure core-ms + reader ms). With a core to spare, no such limit.
            inference_core_ms = threads * 1e3 / row["pure_fps"]
            row["ceiling"] = (inference_core_ms / (inference_core_ms + reader_ms) if threads >= cpus
                              else min(1.0, (1e3 / row["pure_fps"]) / reader_ms))
            rows.append(row)
            del classifier

    print(f"{'threads':>7} {'pure inf FPS':>13} {'pipeline FPS':>13} {'ratio':>6} {'sequential':>11} "
          f"{'ceiling':>8} {'reader ms':>10} {'run FPS':>8} {'run peak RSS':>13}")
    for r in rows:
        print(f"{r['threads']:>7} {r['pure_fps']:>13.1f} {r['pipeline_fps']:>13.1f} {r['ratio'] * 100:>5.1f}% "
              f"{r['sequential_ratio'] * 100:>10.1f}% {r['ceiling'] * 100:>7.1f}% {r['reader_cpu_ms']:>10.2f} "
              f"{r['run_fps']:>8.1f} {r['run_peak_rss_mb']:>10.1f} MB")
    print(f"(medians of {args.rounds} alternating rounds; ratio = pipeline / pure; sequential = the naive one-thread "
          "loop / pure; ceiling = the best any overlap can do when every core already runs inference; "
          "reader ms = decode + prepare CPU time per frame)")
    print("rounds: " + "; ".join(f"{r['threads']}T pure {r['pure_rounds']} pipeline {r['pipeline_rounds']}"
                                 for r in rows))
    ok = all(r["ratio"] >= 0.9 for r in rows)
    print("target pipeline >= 90 % of pure inference:", "met" if ok else "NOT met")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "frames": args.frames, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
