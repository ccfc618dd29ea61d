"""What zones and cameras cost: ``edgesqz run`` end to end with 1, 2, 4 and 8 zones (N invocations of batch 1
vs one batched invocation), two cameras at 30 FPS, and CPU use with motion gating on a still scene vs off.

    python benchmarks/zones.py [--model M] [--seconds 8] [--json benchmarks/results/zones.json]

Every configuration runs the real command line (a 640x480 video played live at 30 FPS, or as fast as it
decodes for the throughput rows) with the installed default model unless ``--model``; the batched/unbatched
rows alternate (A B A B) so a busy machine affects both alike. CPU flags are printed beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return " ".join(sorted({f for f in ("avx2", "avx512_vnni", "avx_vnni") if f" {f}" in text}))


def make_video(path: Path, frames: int, still: bool) -> Path:
    rng = np.random.default_rng(0)
    photos = sorted((ROOT.parent / "shared" / "data" / "photos").glob("*"))
    base = cv2.resize(cv2.imread(str(photos[0])), (800, 600)) if photos else \
        rng.integers(0, 255, (600, 800, 3), np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 480))
    for i in range(frames):
        x = 0 if still else (i * 3) % 160
        writer.write(np.ascontiguousarray(base[60:540, x:x + 640]))
    writer.release()
    return path


def zones(n: int) -> list[str]:
    cols = 4 if n > 4 else n
    rows = (n + cols - 1) // cols
    out = []
    for i in range(n):
        r, c = divmod(i, cols)
        out += ["--zone", f"z{i}={c / cols:.4f},{r / rows:.4f},{1 / cols:.4f},{1 / rows:.4f}"]
    return out


def run(args: list[str], env: dict[str, str] | None = None) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "edgesqz", "run", "--json", "--no-display", *args], capture_output=True,
                       text=True, env={**os.environ, **(env or {})}, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"run failed: {p.stderr[-2000:]}")
    objs = [json.loads(line) for line in p.stdout.splitlines()]
    summary = objs[-1]
    rows = [o for o in objs if o["kind"] == "classification"]
    classified = sum(sum(z["classified"] for z in r["zones"].values()) if "zones" in r else 1 for r in rows)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"fps": summary["fps_mean"], "frames": summary["frames"], "dropped": summary["dropped"],
            "e2e_p50_ms": summary["latency_ms"]["end_to_end"]["p50"],
            "inference_p50_ms": summary["latency_ms"]["inference"]["p50"], "cpu_s": round(cpu, 2),
            "wall_s": round(wall, 2), "cpu_percent_of_one_core": round(100 * cpu / wall, 1),
            "classifications": classified, "cameras": summary.get("cameras")}


def interpreter_sharing(model: str | None, seconds: float = 4.0) -> dict:
    """Two cameras' frames through one interpreter with 2 threads (sequential invokes, what ``run`` does) vs two
    interpreters with 1 thread each, one per camera thread in parallel: frames per second in all, interleaved."""
    import threading

    from edgesqz.device.classifier import Classifier
    from edgesqz.device.models import packaged_model

    path = model or str(packaged_model())
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (480, 640, 3), np.uint8)
    shared = Classifier(path, threads=2)
    pair = [Classifier(path, threads=1) for _ in range(2)]
    tensor = shared.prepare(frame)
    results: dict[str, list[float]] = {"one_interpreter_2_threads": [], "two_interpreters_1_thread": []}
    for _ in range(3):
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            shared.infer(tensor)
            n += 1
        results["one_interpreter_2_threads"].append(n / (time.perf_counter() - t0))
        counts = [0, 0]
        stop = threading.Event()

        def loop(i: int, stop: threading.Event = stop, counts: list[int] = counts) -> None:
            while not stop.is_set():
                pair[i].infer(tensor)
                counts[i] += 1

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        results["two_interpreters_1_thread"].append(sum(counts) / (time.perf_counter() - t0))
    return {k: round(float(np.median(v)), 1) for k, v in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", default="zones,cameras,sharing,motion", help="sections to run (comma-separated)")
    a = ap.parse_args()
    only = set(a.only.split(","))
    model = ["--model", a.model] if a.model else []
    common = [*model, "--threads", str(a.threads)]
    out: dict = {"cpu_flags": cpu_flags(), "cores": os.cpu_count(), "threads": a.threads,
                 "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"),
                 "zones": [], "cameras": {}, "motion": {}}
    print(f"CPU flags: {out['cpu_flags']}; {out['cores']} cores; {a.threads} interpreter threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        moving = make_video(Path(tmp) / "moving.mp4", 300, still=False)
        moving2 = make_video(Path(tmp) / "moving2.mp4", 300, still=False)  # a second camera: another file
        still = make_video(Path(tmp) / "still.mp4", 300, still=True)
        # 1. throughput with N zones: the video as fast as it decodes, batched vs N invocations, interleaved
        for n in (1, 2, 4, 8) if "zones" in only else ():
            res: dict[str, list[dict]] = {"batched": [], "invocations": []}
            for _ in range(a.rounds):
                for mode in ("batched", "invocations"):
                    env = {"EDGESQZ_ZONE_BATCH": "0" if mode == "invocations" else "1"}
                    res[mode].append(run([*common, "--source", str(moving), *zones(n)], env))
            def med(rows: list[dict], key: str) -> float:
                return round(float(np.median([r[key] for r in rows])), 2)

            row = {"zones": n, **{m: {k: med(v, k) for k in ("fps", "e2e_p50_ms", "inference_p50_ms")}
                                  for m, v in res.items()}}
            row["batched_speedup"] = round(row["batched"]["fps"] / row["invocations"]["fps"], 3)
            out["zones"].append(row)
            print(f"{n} zones: batched {row['batched']['fps']} FPS (e2e p50 {row['batched']['e2e_p50_ms']} ms), "
                  f"{n} invocations {row['invocations']['fps']} FPS (e2e p50 {row['invocations']['e2e_p50_ms']} ms): "
                  f"x{row['batched_speedup']}", flush=True)
        if "cameras" in only:
            # 2. two cameras at 30 FPS in one process (one interpreter), 2 zones each
            two = run([*common, "--source", f"a={moving}", "--source", f"b={moving2}", "--fps", "30", "--loop",
                       "--duration", str(a.seconds), "--zone", "a/l=0,0,0.5,1", "--zone", "a/r=0.5,0,0.5,1",
                       "--zone", "b/l=0,0,0.5,1", "--zone", "b/r=0.5,0,0.5,1"])
            out["cameras"] = two
            per = {k: (v["frames"] / a.seconds, v["dropped"]) for k, v in (two["cameras"] or {}).items()}
            print("two cameras at 30 FPS, 2 zones each: " + ", ".join(f"{k} {f:.1f} FPS dropped {d}"
                                                                         for k, (f, d) in per.items())
                  + f"; e2e p50 {two['e2e_p50_ms']} ms; CPU {two['cpu_percent_of_one_core']} % of a core", flush=True)
        if "sharing" in only:
            # 3. one shared interpreter vs one per camera (inferences per second in all)
            out["sharing"] = interpreter_sharing(a.model)
            print(f"interpreter sharing, inferences/s in all: {out['sharing']}", flush=True)
        if "motion" in only:
            # 4. motion gating on a still scene vs off (4 zones, 30 FPS)
            for label, extra in (("off", []), ("gated", ["--motion-gate", "30"])):
                r = run([*common, "--source", str(still), "--fps", "30", "--loop", "--duration", str(a.seconds),
                         *zones(4), *extra])
                out["motion"][label] = r
                print(f"still scene, 4 zones, motion gating {label}: {r['fps']} FPS, {r['classifications']} zone "
                      f"classifications, CPU {r['cpu_percent_of_one_core']} % of a core", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
