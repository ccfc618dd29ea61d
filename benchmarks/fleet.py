"""What the loop around the device costs: hot swap, deploy to a fleet, collection.

    python benchmarks/fleet.py [--model M] [--small S] [--swaps 5] [--json benchmarks/results/fleet.json]

Needs Debian's mosquitto (started here on a loopback port). Every figure comes from the real command line:

- **hot swap at 30 FPS**: ``run`` plays a video live at 30 FPS; the model file is replaced ``--swaps``
  times (alternating two variants of the model with the same input); reported: the time each swap took
  (check + load + swap, from run's own line), frames lost around each switch (gaps in frame numbers),
  frames dropped by the live source over the run, and peak RSS (VmHWM) against a run without swaps;
- **deploy -> every device classifying**: two ``run --trust`` devices on one broker; the time from the
  start of ``edgesqz deploy`` until each device's JSON lines show the new model, for ``--model`` (the
  shipped 1.4 MB model) and ``--small`` (a smaller model with the same input; skipped without it);
- **collection overhead**: the same video as fast as it decodes, with and without ``--collect`` saving a
  frame every 0.1 s, interleaved (A B A B), FPS and its ratio.

CPU flags are printed beside the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from zones import cpu_flags, make_video  # noqa: E402


def variant(model: Path, out: Path, tag: str) -> Path:
    """The model with other metadata: another sha256, the same input contract."""
    from edgesqz.tflite_metadata import embed_metadata, read_metadata

    data = model.read_bytes()
    meta = read_metadata(data)
    out.write_bytes(embed_metadata(data, labels=meta.labels, info=meta.info, name=f"{meta.name or model.stem} {tag}",
                                   description="benchmark variant", version=tag))
    return out


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def rows(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if obj.get("kind") == "classification":
            out.append(obj)
    return out


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_proc(args: list[object], home: Path, err: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgesqz", "run", "--no-display", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=err.open("w"),
                            env={**os.environ, "EDGESQZ_HOME": str(home)})


def stop(proc: subprocess.Popen) -> tuple[int, float | None]:
    rss = peak_rss_mb(proc.pid)
    proc.send_signal(signal.SIGINT)
    return proc.wait(60), rss


def hot_swap(model: Path, video: Path, tmp: Path, swaps: int) -> dict:
    variants = [variant(model, tmp / f"v{i}.tflite", f"swap{i}") for i in range(2)]
    live = tmp / "live.tflite"
    live.write_bytes(model.read_bytes())
    out, err = tmp / "swap.jsonl", tmp / "swap.err"
    proc = run_proc(["--model", live, "--source", video, "--loop", "--fps", 30, "--threads", 2, "-o", out],
                    tmp, err)
    time.sleep(3)
    for i in range(swaps):
        tmp_copy = tmp / "incoming.tflite"
        tmp_copy.write_bytes(variants[i % 2].read_bytes())
        tmp_copy.replace(live)
        time.sleep(3)
    code, rss = stop(proc)
    text = err.read_text()
    took = [float(m) for m in re.findall(r"swapped in (\d+) ms", text)]
    data = rows(out)
    shas = [r["model"]["sha256"] for r in data]
    frames = [r["frame"] for r in data]
    lost = [frames[i] - frames[i - 1] - 1 for i in range(1, len(data)) if shas[i] != shas[i - 1]]
    # the same run without swaps, for the peak memory
    out2, err2 = tmp / "noswap.jsonl", tmp / "noswap.err"
    proc = run_proc(["--model", model, "--source", video, "--loop", "--fps", 30, "--threads", 2, "-o", out2], tmp,
                    err2)
    time.sleep(3 + 3 * swaps)
    _, rss_base = stop(proc)
    summary = json.loads(out.read_text().splitlines()[-1])
    return {"exit": code, "swaps": len(took), "swap_ms": took, "swap_ms_median": float(np.median(took)) if took
            else None, "frames_lost_at_switch": lost, "frames": len(data), "fps": summary.get("fps_mean"),
            "dropped_by_live_source": summary.get("dropped"), "peak_rss_mb": rss, "peak_rss_mb_without_swaps": rss_base}


def deploy_time(model: Path, start_model: Path, video: Path, tmp: Path, broker: object) -> dict:
    keys = tmp / "keys"
    subprocess.run([sys.executable, "-m", "edgesqz", "keys", "new", str(keys)], check=True, capture_output=True)
    prefix = f"bench{int(time.time() * 1000) % 100000}"
    devices = []
    for name in ("pi_a", "pi_b"):
        home = tmp / name
        home.mkdir()
        out = tmp / f"{name}.jsonl"
        proc = run_proc(["--model", start_model, "--source", video, "--loop", "--fps", 30, "--threads", 1,
                         "--mqtt", f"{broker.url}/{prefix}", "--device-id", name, "--trust", keys / "edgesqz.pub",
                         "-o", out], home, tmp / f"{name}.err")
        devices.append((name, proc, out))
    deadline = time.monotonic() + 60
    while any(not rows(out) for _, _, out in devices) and time.monotonic() < deadline:
        time.sleep(0.2)
    target = sha12(model)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "edgesqz", "deploy", str(model), "--mqtt", f"{broker.url}/{prefix}",
                        "--key", str(keys / "edgesqz.key")], capture_output=True, text=True,
                       env={**os.environ, "EDGESQZ_HOME": str(tmp / "deployer")})
    published = time.time() - t0
    took = {}
    deadline = time.monotonic() + 60
    while len(took) < len(devices) and time.monotonic() < deadline:
        for name, _, out in devices:
            if name not in took:
                hit = [r for r in rows(out) if r["model"]["sha256"] == target]
                if hit:
                    took[name] = round(hit[0]["timestamp"] - t0, 3)
        time.sleep(0.05)
    for _, proc, _ in devices:
        stop(proc)
    return {"model": str(model), "size_bytes": model.stat().st_size, "deploy_exit": p.returncode,
            "deploy_command_s": round(published, 3), "seconds_until_classifying": took,
            "every_device_s": max(took.values()) if len(took) == len(devices) else None}


def collection(model: Path, video: Path, tmp: Path, rounds: int) -> dict:
    fps: dict[str, list[float]] = {"off": [], "collect": []}
    for i in range(rounds):
        for mode in ("off", "collect"):
            extra = ["--collect", tmp / f"c{i}", "--collect-every", 0.1] if mode == "collect" else []
            p = subprocess.run([sys.executable, "-m", "edgesqz", "run", "--model", str(model), "--source", str(video),
                                "--threads", "1", "--json", "--no-display", *map(str, extra)], capture_output=True,
                               text=True)
            fps[mode].append(json.loads(p.stdout.splitlines()[-1])["fps_mean"])
    off, on = float(np.median(fps["off"])), float(np.median(fps["collect"]))
    return {"fps_off": fps["off"], "fps_collect": fps["collect"], "ratio": round(on / off, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--small", type=Path, default=None, help="a smaller model with the same input")
    ap.add_argument("--swaps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    from mqtt_broker import Broker

    from edgesqz.device.models import packaged_model

    model = a.model or packaged_model()
    out: dict = {"cpu_flags": cpu_flags(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    print(f"CPU flags: {out['cpu_flags']}; {out['cores']} cores; model {model} ({model.stat().st_size} bytes)",
          flush=True)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        video = make_video(tmp / "v.mp4", 300, still=False)
        (tmp / "swap").mkdir()
        out["hot_swap"] = hot_swap(model, video, tmp / "swap", a.swaps)
        h = out["hot_swap"]
        print(f"hot swap at 30 FPS: {h['swaps']} swaps, {h['swap_ms_median']} ms median ({h['swap_ms']}), frames lost "
              f"at the switch {h['frames_lost_at_switch']}, {h['dropped_by_live_source']} dropped by the live source "
              f"in {h['frames']} frames; peak RSS {h['peak_rss_mb']:.1f} MB vs {h['peak_rss_mb_without_swaps']:.1f} "
              "MB without swaps", flush=True)
        broker = Broker(tmp).start()
        try:
            out["deploy"] = []
            for candidate, start in ((model, variant(model, tmp / "start.tflite", "start")),
                                     *(((a.small, variant(a.small, tmp / "small0.tflite", "start")),) if a.small
                                       else ())):
                d = tmp / f"deploy{len(out['deploy'])}"
                d.mkdir()
                r = deploy_time(candidate, start, video, d, broker)
                out["deploy"].append(r)
                print(f"deploy {r['size_bytes']} bytes -> both devices classifying with it after "
                      f"{r['every_device_s']} s "
                      f"({r['seconds_until_classifying']}; the deploy command took {r['deploy_command_s']} s)",
                      flush=True)
        finally:
            broker.stop()
        (tmp / "collect").mkdir()
        out["collection"] = collection(model, video, tmp / "collect", a.rounds)
        c = out["collection"]
        print(f"collection (a frame every 0.1 s) on the loop's FPS: x{c['ratio']} ({c['fps_collect']} vs "
              f"{c['fps_off']})", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
