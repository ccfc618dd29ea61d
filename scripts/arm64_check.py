"""The arm64 proof harness's Python half: record what edgesqz's device side computes on one machine.

``scripts/arm64.sh check`` runs ``prepare`` and ``run`` on the x86_64 host, ``run`` again inside the
emulated aarch64 userland on the same files, then ``compare``. Subcommands:

  prepare         --images DIR --out inputs.npz [--video clip.avi]
                  preprocess every image with edgesqz.imaging.preprocess (the host's pixels) and write a
                  short lossless-as-possible video of the same images for ``edgesqz run --source``
  run             --model M [--extra-model M2 ...] --inputs inputs.npz [--images DIR] [--video FILE] --out DIR
                  raw outputs of make_interpreter on the given pixels, for M and each extra model
                  (outputs.npz: raw, extra_0, ...), this machine's
                  own preprocessing of the images (pixels.npz), and the CLI: ``info --json``,
                  ``classify --json``, ``run --json``, ``bench`` when the installed edgesqz has them
                  ("not available" otherwise); writes report.json
  compare         HOST_DIR ARM64_DIR [--out summary.json]   exit 1 when results differ
  verify-install  [--cpu cortex-a72]   in the guest: aarch64 wheels only, no TensorFlow/PyTorch, the CPU
                  model qemu emulates has no SVE/SME and /proc/cpuinfo is the aarch64 one
  resolve         [--python-version 3.13] [--pyproject FILE]   does the device dependency set resolve to
                  aarch64 wheels for that Python (pip --dry-run with platform tags; nothing is installed)

Needs only what ``pip install .`` installs (numpy, OpenCV, LiteRT), plus the standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLI_TIMEOUT = 900  # seconds; emulation is 100x slower than the hardware
RUN_FRAMES = 8
CLI_STEPS = ("info", "classify", "run", "bench", "doctor", "edgetpu_check")
# Float outputs (the default model's float32 softmax tail after the int8 body) may differ in the last
# bits between NEON and AVX kernels; integer outputs must be bit-identical.
FLOAT_TOLERANCE = 1e-5
FORBIDDEN = ("tensorflow", "tensorflow-cpu", "tf-keras", "tf-nightly", "torch", "torchvision", "jax", "jaxlib")
DEVICE_DISTS = ("numpy", "opencv-python-headless", "ai-edge-litert", "flatbuffers", "typer", "rich", "edgesqz")
HWCAP_SVE = 1 << 22  # AT_HWCAP (16) bit on aarch64
HWCAP2_SME = 1 << 23  # AT_HWCAP2 (26) bit on aarch64


def say(message: str) -> None:
    print(f"arm64_check [{platform.machine()}]: {message}", flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- prepare (host)


def cmd_prepare(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np

    from edgesqz.imaging import list_images, preprocess, read_image

    paths = list_images(args.images)
    if not paths:
        raise SystemExit(f"no images in {args.images}")
    names = [str(p.relative_to(args.images)) for p in paths]
    pixels = np.stack([preprocess(read_image(p)) for p in paths])
    np.savez(args.out, pixels=pixels, names=np.array(names))
    say(f"preprocessed {len(paths)} images -> {args.out} {pixels.shape} {pixels.dtype}")
    if args.video:
        # Same frames for `edgesqz run --source`: one image per frame, 320x240, lossless when the codec exists.
        frames = [cv2.resize(read_image(p), (320, 240), interpolation=cv2.INTER_AREA) for p in paths]
        for fourcc in ("FFV1", "MJPG"):
            writer = cv2.VideoWriter(str(args.video), cv2.VideoWriter_fourcc(*fourcc), 5.0, (320, 240))
            if writer.isOpened():
                for f in frames:
                    writer.write(f)
                writer.release()
                say(f"wrote {args.video} ({len(frames)} frames, {fourcc})")
                break
            writer.release()
    return 0


# --------------------------------------------------------------------------- run (both machines)


def environment() -> dict[str, Any]:
    import cv2
    import numpy as np

    env: dict[str, Any] = {
        "machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
        "opencv": cv2.__version__, "qemu_cpu": os.environ.get("QEMU_CPU"),
    }
    from edgesqz.device.runtime import load_backend

    backend = load_backend()
    env["backend"] = backend.name
    env["backend_version"] = backend.version
    env.update(cpu_features())
    return env


def cpu_features() -> dict[str, Any]:
    """What the (emulated) CPU advertises: aarch64 HWCAP bits and the first /proc/cpuinfo entry."""
    out: dict[str, Any] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        first = text.split("\n\n", 1)[0]
        out["cpuinfo"] = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())
                          if k.strip() in ("Features", "CPU implementer", "CPU part", "model name", "vendor_id")}
    except OSError as exc:
        out["cpuinfo"] = {"error": str(exc)}
    if platform.machine() == "aarch64":
        import ctypes

        libc = ctypes.CDLL(None)
        libc.getauxval.restype = ctypes.c_ulong
        libc.getauxval.argtypes = [ctypes.c_ulong]
        hwcap, hwcap2 = int(libc.getauxval(16)), int(libc.getauxval(26))
        out.update(hwcap=hex(hwcap), hwcap2=hex(hwcap2), sve=bool(hwcap & HWCAP_SVE), sme=bool(hwcap2 & HWCAP2_SME))
    return out


def to_tensor(pixels: Any, detail: dict[str, Any]) -> Any:
    """``[1, H, W, 3]`` input from uint8 RGB pixels for the model's input quantisation (pixels 0..255 in)."""
    import numpy as np

    dtype = np.dtype(detail["dtype"])
    scale, zero = detail["quantization"]
    if dtype == np.float32:
        x = pixels.astype(np.float32)
    elif dtype == np.int8 and scale == 1.0 and zero == -128:
        x = (pixels ^ 0x80).view(np.int8)  # exactly pixel - 128
    elif dtype == np.uint8 and scale == 1.0 and zero == 0:
        x = pixels
    else:
        info = np.iinfo(dtype)
        x = np.clip(np.rint(pixels.astype(np.float64) / scale + zero), info.min, info.max).astype(dtype)
    return np.ascontiguousarray(x[np.newaxis])


def raw_outputs(model: Path, pixels: Any, threads: int | None) -> Any:
    import numpy as np

    from edgesqz.device.runtime import delegate_coverage, make_interpreter

    interpreter, _ = make_interpreter(str(model), threads=threads)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    results = []
    for image in pixels:
        interpreter.set_tensor(inp["index"], to_tensor(image, inp))
        interpreter.invoke()
        results.append(np.array(interpreter.get_tensor(out["index"])).reshape(-1))
    return np.stack(results), delegate_coverage(interpreter).to_dict()


def cli_commands() -> dict[str, Any]:
    """The click commands of the installed ``edgesqz`` CLI (by introspection, without running it)."""
    import typer.main

    from edgesqz.cli import app

    group = typer.main.get_command(app)
    return dict(getattr(group, "commands", {}))


def options_of(command: Any) -> set[str]:
    return {opt for p in getattr(command, "params", []) for opt in (*p.opts, *p.secondary_opts)}


def is_flag(command: Any, option: str) -> bool:
    return any(option in p.opts and getattr(p, "is_flag", False) for p in getattr(command, "params", []))


def run_cli(argv: list[str], *, json_lines: bool, ok_codes: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Run ``python -m edgesqz ARGV``; parse stdout as JSON (or JSON lines)."""
    cmd = [sys.executable, "-m", "edgesqz", *argv]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "argv": argv, "error": f"timed out after {CLI_TIMEOUT} s"}
    result: dict[str, Any] = {
        "status": "ok" if proc.returncode in ok_codes else "failed", "argv": argv, "returncode": proc.returncode,
        "seconds": round(time.monotonic() - t0, 2), "stderr_tail": proc.stderr.strip().splitlines()[-8:],
    }
    text = proc.stdout.strip()
    try:
        if json_lines:
            result["records"] = [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
        else:
            try:
                result["json"] = json.loads(text) if text else None
            except json.JSONDecodeError:  # JSON lines after all
                result["records"] = [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
    except json.JSONDecodeError as exc:
        result["status"] = "failed"
        result["error"] = f"stdout is not JSON: {exc}"
        result["stdout_head"] = text[:2000]
    return result


def cli_steps(model: str, images: str | None, video: str | None) -> dict[str, Any]:
    commands = cli_commands()
    steps: dict[str, Any] = {}

    def model_args(command: Any) -> list[str]:
        return ["--model", model] if "--model" in options_of(command) else [model]

    steps["info"] = run_cli(["info", model, "--json"], json_lines=False) if "info" in commands else None
    if "classify" in commands and images:
        c = commands["classify"]
        argv = ["classify", *model_args(c), images, "--json"]
        steps["classify"] = run_cli(argv, json_lines=True)
    if "run" in commands and video:
        c = commands["run"]
        argv = ["run", *model_args(c), "--source", video, "--json"]
        opts = options_of(c)
        argv += ["--max-frames", str(RUN_FRAMES)] if "--max-frames" in opts else []
        argv += ["--no-display"] if "--no-display" in opts else []
        steps["run"] = run_cli(argv, json_lines=True)
    if "bench" in commands:
        c = commands["bench"]
        opts = options_of(c)
        argv = ["bench", *model_args(c)]
        # keep it short under emulation: whichever count options the command has
        for names, value in ((("--runs", "--iterations", "--count", "-n"), "5"), (("--warmup",), "1")):
            name = next((n for n in names if n in opts), None)
            if name:
                argv += [name, value]
        if "--json" in opts:
            argv += ["--json"] if is_flag(c, "--json") else ["--json", "-"]  # `--json FILE`: '-' is stdout
        steps["bench"] = run_cli(argv, json_lines=False)
    if "doctor" in commands:
        steps["doctor"] = run_cli(["doctor", "--json"], json_lines=False)
    edgetpu = getattr(commands.get("edgetpu"), "commands", {})
    if "check" in edgetpu:  # exit 1 = "not compatible", still a result
        steps["edgetpu_check"] = run_cli(["edgetpu", "check", model, "--json"], json_lines=False, ok_codes=(0, 1))
    for name in CLI_STEPS:
        if steps.get(name) is None:
            why = "no such command in this edgesqz" if name not in commands else "no input for it"
            steps[name] = {"status": "not available", "why": why}
    return {name: steps[name] for name in CLI_STEPS}


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from edgesqz.imaging import list_images, preprocess, read_image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    report: dict[str, Any] = {"environment": environment()}
    env = report["environment"]
    say(f"Python {env['python']}, numpy {env['numpy']}, OpenCV {env['opencv']}, "
        f"{env['backend']} {env['backend_version']}, QEMU_CPU={env['qemu_cpu']}")
    if env["machine"] == "aarch64" and (env.get("sve") or env.get("sme")):
        raise SystemExit("the emulated CPU advertises SVE/SME: LiteRT's int8 kernels return wrong results under "
                         "qemu 7.2; set QEMU_CPU=cortex-a72 (scripts/arm64.sh does)")

    data = np.load(args.inputs)
    pixels, names = data["pixels"], [str(n) for n in data["names"]]
    report["inputs"] = {"file": str(args.inputs), "sha256": sha256(Path(args.inputs)), "images": len(names)}
    t = time.monotonic()
    raw, coverage = raw_outputs(Path(args.model), pixels, args.threads)
    report["model"] = {"file": str(args.model), "sha256": sha256(Path(args.model))}
    report["raw"] = {"shape": list(raw.shape), "dtype": raw.dtype.name, "xnnpack": coverage,
                     "seconds": round(time.monotonic() - t, 2)}
    arrays = {"raw": raw}
    report["extra"] = []
    for i, extra in enumerate(args.extra_model):
        t = time.monotonic()
        arrays[f"extra_{i}"], cov = raw_outputs(Path(extra), pixels, args.threads)
        report["extra"].append({"file": str(extra), "sha256": sha256(Path(extra)),
                                "shape": list(arrays[f"extra_{i}"].shape), "dtype": arrays[f"extra_{i}"].dtype.name,
                                "xnnpack": cov, "seconds": round(time.monotonic() - t, 2)})
    np.savez(out / "outputs.npz", names=np.array(names), **arrays)
    say(f"raw outputs of {len(arrays)} model(s) on {len(names)} images -> {out / 'outputs.npz'} "
        f"({report['raw']['seconds']} s for the first)")

    if args.images:
        paths = list_images(args.images)
        own = np.stack([preprocess(read_image(p)) for p in paths])
        np.savez(out / "pixels.npz", pixels=own, names=np.array([str(p.relative_to(args.images)) for p in paths]))
        report["pixels"] = {"images": len(paths)}
        say(f"this machine's preprocessing of {len(paths)} images -> {out / 'pixels.npz'}")

    report["cli"] = cli_steps(str(args.model), args.images, args.video)
    for name, step in report["cli"].items():
        extra = f" ({step['seconds']} s)" if "seconds" in step else f" ({step.get('why', '')})"
        if step["status"] == "failed":
            extra += ": " + (step.get("error") or " | ".join(step.get("stderr_tail", [])[-3:]))
        say(f"edgesqz {name}: {step['status']}{extra}")
    report["seconds"] = round(time.monotonic() - t0, 2)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return 0


# --------------------------------------------------------------------------- compare (host)


def top1(step: dict[str, Any], key: str) -> dict[str, tuple[str, float]]:
    """``{image or frame: (top-1 label, score)}`` from classify/run JSON lines (summaries have no top_k)."""
    found = {}
    for rec in step.get("records", []):
        top = rec.get("top_k") or []
        if not top:
            continue
        where = str(rec.get(key) if rec.get(key) is not None else rec.get("frame"))
        found[where] = (str(top[0].get("label")), float(top[0].get("score", 0.0)))
    return found


def compare_cli(host: dict[str, Any], arm: dict[str, Any], name: str, key: str) -> dict[str, Any]:
    h, a = host["cli"][name], arm["cli"][name]
    res: dict[str, Any] = {"host": h["status"], "arm64": a["status"]}
    if h["status"] == a["status"] == "not available":
        res.update(status="not available", why=h.get("why"))
        return res
    if h["status"] != "ok" or a["status"] != "ok":
        res["status"] = "failed"
        return res
    if name == "bench":
        res["status"] = "ok"  # it runs; emulated timings say nothing about a Pi's speed
        return res
    if name == "doctor":  # different machines: only "can run models" must agree
        can = [bool((x.get("json") or {}).get("can_run_models")) for x in (h, a)]
        res["can_run_models"] = {"host": can[0], "arm64": can[1]}
        res["status"] = "ok" if all(can) else "failed"
        return res
    if name == "edgetpu_check":
        hj, aj = ({k: v for k, v in (x.get("json") or {}).items() if k != "model"} for x in (h, a))
        res["compatible"] = aj.get("compatible")
        res["status"] = "equal" if hj == aj and hj else "different"
        return res
    ht, at = top1(h, key), top1(a, key)
    hl, al = {k: v[0] for k, v in ht.items()}, {k: v[0] for k, v in at.items()}
    res["items"] = len(hl)
    res["max_score_diff"] = max((abs(ht[k][1] - at[k][1]) for k in ht if k in at), default=None)
    res["top1_equal"] = sum(hl.get(k) == al.get(k) for k in hl)
    res["differences"] = {k: [hl.get(k), al.get(k)] for k in sorted(set(hl) | set(al)) if hl.get(k) != al.get(k)}
    res["status"] = "equal" if hl and hl == al else "different"
    return res


def normalised_info(info: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(info))
    d.pop("model", None)  # the path it was given
    d.get("runtime", {}).pop("version", None)  # LiteRT versions may differ; reported separately
    return d


def compare_outputs(host: Any, arm: Any) -> dict[str, Any]:
    """One model's raw outputs on both machines: integer outputs must be bit-identical, float outputs
    within FLOAT_TOLERANCE (absolute) with the same top-1 on every image."""
    import numpy as np

    r: dict[str, Any] = {"images": int(host.shape[0]), "dtype": host.dtype.name, "shape": list(host.shape[1:])}
    if host.shape != arm.shape or host.dtype != arm.dtype:
        return {**r, "ok": False, "bit_identical": False, "max_abs_diff": None, "top1_equal": 0,
                "images_identical": 0, "error": f"{host.dtype}{list(host.shape)} vs {arm.dtype}{list(arm.shape)}"}
    diff = np.abs(host.astype(np.float64) - arm.astype(np.float64))
    r["bit_identical"] = bool(np.array_equal(host, arm))
    r["images_identical"] = int(sum(np.array_equal(x, y) for x, y in zip(host, arm, strict=True)))
    r["max_abs_diff"] = float(diff.max()) if diff.size else 0.0
    r["top1_equal"] = int((host.argmax(1) == arm.argmax(1)).sum())
    if np.issubdtype(host.dtype, np.integer):
        r["ok"] = r["bit_identical"]
    else:
        r["tolerance"] = FLOAT_TOLERANCE
        r["ok"] = r["max_abs_diff"] <= FLOAT_TOLERANCE and r["top1_equal"] == r["images"]
    return r


def cmd_compare(args: argparse.Namespace) -> int:
    import numpy as np

    hdir, adir = Path(args.host), Path(args.arm64)
    host = json.loads((hdir / "report.json").read_text())
    arm = json.loads((adir / "report.json").read_text())
    s: dict[str, Any] = {"host": host["environment"], "arm64": arm["environment"]}
    ok = True

    same_inputs = host["inputs"]["sha256"] == arm["inputs"]["sha256"]
    hz, az = np.load(hdir / "outputs.npz"), np.load(adir / "outputs.npz")
    models = [("raw", host["model"], arm["model"], host["raw"], arm["raw"])]
    models += [(f"extra_{i}", {k: h[k] for k in ("file", "sha256")}, {k: a[k] for k in ("file", "sha256")}, h, a)
               for i, (h, a) in enumerate(zip(host.get("extra", []), arm.get("extra", []), strict=True))]
    s["outputs"] = []
    for key, hm, am, hraw, araw in models:
        r = compare_outputs(hz[key], az[key])
        r.update(model=Path(hm["file"]).name, identical_inputs=same_inputs and hm == am,
                 xnnpack_host=hraw["xnnpack"], xnnpack_arm64=araw["xnnpack"])
        r["ok"] = r["ok"] and r["identical_inputs"]
        s["outputs"].append(r)
        ok &= r["ok"]

    if (hdir / "pixels.npz").exists() and (adir / "pixels.npz").exists():
        hp, ap = np.load(hdir / "pixels.npz")["pixels"], np.load(adir / "pixels.npz")["pixels"]
        if hp.shape == ap.shape:
            d = np.abs(hp.astype(np.int16) - ap.astype(np.int16))
            s["preprocessing"] = {"images": int(hp.shape[0]), "equal": bool((d == 0).all()),
                                  "images_equal": int(sum((x == 0).all() for x in d)),
                                  "bytes_differing_pct": round(float((d != 0).mean() * 100), 4),
                                  "max_abs_diff": int(d.max())}
        else:
            s["preprocessing"] = {"equal": False, "error": f"shapes differ {hp.shape} vs {ap.shape}"}

    hi, ai = host["cli"]["info"], arm["cli"]["info"]
    if hi["status"] == ai["status"] == "ok":
        equal = normalised_info(hi["json"]) == normalised_info(ai["json"])
        s["info"] = {"status": "equal" if equal else "different"}
        if not equal:
            hn, an = normalised_info(hi["json"]), normalised_info(ai["json"])
            s["info"]["keys_differing"] = sorted(k for k in set(hn) | set(an) if hn.get(k) != an.get(k))
    else:
        s["info"] = {"status": "failed", "host": hi["status"], "arm64": ai["status"]}
    ok &= s["info"]["status"] == "equal"

    for name, key in (("classify", "image"), ("run", "frame"), ("bench", ""), ("doctor", ""), ("edgetpu_check", "")):
        s[name] = compare_cli(host, arm, name, key)
        ok &= s[name]["status"] in ("equal", "ok", "not available")
    s["arm64_seconds"] = arm.get("seconds")
    s["result"] = "equal" if ok else "DIFFERENT"
    if args.out:
        Path(args.out).write_text(json.dumps(s, indent=2))

    for o in s["outputs"]:
        if o["bit_identical"]:
            verdict = "BIT-IDENTICAL"
        elif o["ok"]:
            verdict = f"equal within {FLOAT_TOLERANCE:g}, not bit-identical"
        else:
            verdict = "DIFFERENT"
        print(f"arm64 vs x86_64: {o['dtype']} outputs {o['shape']} of {o['model']} on {o['images']} identical "
              f"inputs: {verdict} (max abs diff {o['max_abs_diff']}, top-1 equal {o['top1_equal']}/{o['images']}; "
              f"XNNPACK {o['xnnpack_arm64']['delegated_ops']}/{o['xnnpack_arm64']['total_ops']} ops on arm64)")
    p = s.get("preprocessing")
    if p:
        print(f"arm64 vs x86_64: end-to-end preprocessing (decode + crop + INTER_AREA): "
              f"{'equal' if p.get('equal') else 'NOT equal'} ({p.get('images_equal')}/{p.get('images')} images equal, "
              f"{p.get('bytes_differing_pct')} % bytes differ, max abs diff {p.get('max_abs_diff')})")
    print(f"arm64 vs x86_64: edgesqz info --json: {s['info']['status']}")
    for name in ("classify", "run", "bench", "doctor", "edgetpu_check"):
        r = s[name]
        if "items" in r:
            detail = f"top-1 equal on {r['top1_equal']}/{r['items']}, max top-1 score diff {r['max_score_diff']}"
        elif "can_run_models" in r:
            detail = f"can run models: host {r['can_run_models']['host']}, arm64 {r['can_run_models']['arm64']}"
        elif "compatible" in r:
            detail = f"Edge TPU compatible: {r['compatible']}"
        else:
            detail = r.get("why") or f"host {r['host']}, arm64 {r['arm64']}"
        print(f"arm64 vs x86_64: edgesqz {name.replace('_', ' ')}: {r['status']} ({detail})")
    print(f"arm64 vs x86_64: {s['result']} (guest: {s['arm64']['backend']} {s['arm64']['backend_version']}, "
          f"Python {s['arm64']['python']}, numpy {s['arm64']['numpy']}, OpenCV {s['arm64']['opencv']}, "
          f"QEMU_CPU={s['arm64']['qemu_cpu']})")
    return 0 if ok else 1


# --------------------------------------------------------------------------- verify-install (guest)


def wheel_tags(dist: Any) -> list[str]:
    text = dist.read_text("WHEEL") or ""
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]


def cmd_verify_install(args: argparse.Namespace) -> int:
    import importlib.metadata as md
    import importlib.util

    problems = []
    if platform.machine() != "aarch64":
        problems.append(f"this is {platform.machine()}, not aarch64")
    dists = {d.metadata["Name"].lower().replace("_", "-"): d for d in md.distributions()}
    for name in sorted(dists):
        d = dists[name]
        tags = wheel_tags(d)
        native = [t for t in tags if not t.endswith("-none-any")]
        mark = ""
        if native and not all("aarch64" in t for t in native):
            problems.append(f"{name} {d.version} is not an aarch64 wheel: {', '.join(tags)}")
            mark = "  <-- not aarch64"
        if name in DEVICE_DISTS or native:
            print(f"  {name:<24} {d.version:<12} {', '.join(tags) or '(no wheel tag)'}{mark}")
    for name in DEVICE_DISTS:
        if name not in dists:
            problems.append(f"{name} is not installed")
    for name in FORBIDDEN:
        if name in dists:
            problems.append(f"{name} is installed: the device install must not pull it in")
    for module in ("tensorflow", "torch"):
        if importlib.util.find_spec(module) is not None:
            problems.append(f"`import {module}` would work: the device install must not have it")
    cpu = cpu_features()
    if os.environ.get("QEMU_CPU") != args.cpu:
        problems.append(f"QEMU_CPU is {os.environ.get('QEMU_CPU')!r}, expected {args.cpu!r}")
    if cpu.get("sve") or cpu.get("sme"):
        problems.append(f"the emulated CPU advertises SVE/SME (hwcap {cpu.get('hwcap')}): int8 results would be wrong")
    if "CPU implementer" not in cpu.get("cpuinfo", {}):
        problems.append("/proc/cpuinfo is not the aarch64 one (LiteRT segfaults on the host's x86 cpuinfo)")
    for p in problems:
        print(f"  PROBLEM: {p}")
    if problems:
        return 1
    print(f"  ok: {platform.machine()} Python {platform.python_version()}, aarch64 wheels only, no TensorFlow/PyTorch; "
          f"CPU {args.cpu} (hwcap {cpu.get('hwcap')}, no SVE/SME), cpuinfo part {cpu['cpuinfo'].get('CPU part')}")
    return 0


# --------------------------------------------------------------------------- resolve (host)


def device_dependencies(pyproject: Path) -> list[str]:
    import tomllib

    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def aarch64_platforms(glibc_minor: int) -> list[str]:
    """pip --platform tags a glibc 2.<minor> aarch64 system accepts (manylinux2014 = manylinux_2_17)."""
    return [f"manylinux_2_{m}_aarch64" for m in range(glibc_minor, 16, -1)] + ["manylinux2014_aarch64"]


def resolve(deps: list[str], python_version: str, glibc_minor: int, target: Path) -> dict[str, Any]:
    """Resolve ``deps`` for CPython ``python_version`` on aarch64 with pip (binary wheels only, no install)."""
    abi = "cp" + python_version.replace(".", "")
    report = target / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "--abi", abi,
           "--target", str(target / "site"), "--report", str(report), "--quiet"]
    for p in aarch64_platforms(glibc_minor):
        cmd += ["--platform", p]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    proc = subprocess.run([*cmd, *deps], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    result: dict[str, Any] = {"python": python_version, "abi": abi, "returncode": proc.returncode,
                              "stderr": proc.stderr.strip()[-3000:], "packages": []}
    if proc.returncode == 0 and report.exists():
        for item in json.loads(report.read_text())["install"]:
            url = item.get("download_info", {}).get("url", "")
            result["packages"].append({"name": item["metadata"]["name"], "version": item["metadata"]["version"],
                                       "file": url.rsplit("/", 1)[-1].split("#", 1)[0]})
    return result


def wheel_ok(filename: str, abi: str) -> bool:
    """Pure, or an aarch64 wheel for this CPython ABI (or the stable ABI)."""
    if not filename.endswith(".whl"):
        return False
    _pyver, wabi, plat = filename[:-4].split("-")[-3:]
    if plat == "any":
        return True
    return "aarch64" in plat and (abi in wabi.split(".") or "abi3" in wabi.split("."))


def cmd_resolve(args: argparse.Namespace) -> int:
    deps = device_dependencies(Path(args.pyproject))
    print(f"resolving {len(deps)} device dependencies for CPython {args.python_version} aarch64 "
          f"(glibc 2.{args.glibc}): {' '.join(deps)}")
    with tempfile.TemporaryDirectory() as tmp:
        result = resolve(deps, args.python_version, args.glibc, Path(tmp))
    if result["returncode"] != 0:
        print(result["stderr"])
        print(f"FAILED: the device dependencies do not resolve for CPython {args.python_version} aarch64")
        return 1
    bad = []
    for p in result["packages"]:
        good = wheel_ok(p["file"], result["abi"]) and p["name"].lower() not in FORBIDDEN
        bad += [] if good else [p["name"]]
        print(f"  {p['name']:<24} {p['version']:<12} {p['file']}{'' if good else '  <-- unexpected'}")
    if bad:
        print(f"FAILED: unexpected wheels: {', '.join(bad)}")
        return 1
    print(f"ok: {len(result['packages'])} wheels, all aarch64 or pure Python, no TensorFlow/PyTorch")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--video", type=Path)
    p = sub.add_parser("run")
    p.add_argument("--model", required=True)
    p.add_argument("--extra-model", action="append", default=[], help="another model whose raw outputs to record")
    p.add_argument("--inputs", required=True)
    p.add_argument("--images")
    p.add_argument("--video")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", required=True)
    p = sub.add_parser("compare")
    p.add_argument("host")
    p.add_argument("arm64")
    p.add_argument("--out")
    p = sub.add_parser("verify-install")
    p.add_argument("--cpu", default="cortex-a72")
    p = sub.add_parser("resolve")
    p.add_argument("--python-version", default="3.13")
    p.add_argument("--glibc", type=int, default=41, help="glibc 2.N of the target OS (trixie: 41, bookworm: 36)")
    p.add_argument("--pyproject", default=str(Path(__file__).resolve().parents[1] / "pyproject.toml"))
    args = parser.parse_args(argv)
    handler = {"prepare": cmd_prepare, "run": cmd_run, "compare": cmd_compare, "verify-install": cmd_verify_install,
               "resolve": cmd_resolve}[args.cmd]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
