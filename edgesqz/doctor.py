"""``edgesqz doctor``: can this device run edgesqz models, and what would make it better?

Each check gives a status (ok / warn / fail / info), what was found, and a fix for anything not
ok. The device can run models when a TFLite runtime imports and runs a model and the default model
(the one ``run``/``classify`` use without ``--model``), if there is one, loads; everything else
(no default model yet, Coral, camera, display, governor) only adds warnings.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass
from typing import Any

from edgesqz import sysinfo


@dataclass
class Finding:
    check: str
    status: str  # "ok" | "warn" | "fail" | "info"
    detail: str
    fix: str = ""


def tiny_model() -> bytes:
    """A float32 [1, 8] -> RELU -> [1, 8] TFLite model, built with the runtime's own schema module."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT()
    model.version = 3
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.RELU
    model.operatorCodes = [code]
    model.buffers = [s.BufferT(), s.BufferT(), s.BufferT()]
    tensors = []
    for i, name in enumerate(("x", "y")):
        t = s.TensorT()
        t.shape = [1, 8]
        t.type = s.TensorType.FLOAT32
        t.buffer = i + 1
        t.name = name
        tensors.append(t)
    op = s.OperatorT()
    op.opcodeIndex = 0
    op.inputs = [0]
    op.outputs = [1]
    sub = s.SubGraphT()
    sub.tensors = tensors
    sub.inputs = [0]
    sub.outputs = [1]
    sub.operators = [op]
    model.subgraphs = [sub]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _runtime(findings: list[Finding]) -> bool:
    from edgesqz.device.runtime import delegate_coverage, load_backend, make_interpreter
    from edgesqz.errors import EdgesqzError

    tfl = sysinfo.package_version("tflite-runtime")
    numpy = sysinfo.package_version("numpy") or "missing"
    findings.append(Finding("numpy", "ok" if numpy != "missing" else "fail", numpy,
                            "" if numpy != "missing" else "pip install numpy"))
    if tfl and numpy.split(".")[0].isdigit() and int(numpy.split(".")[0]) >= 2:
        findings.append(Finding(
            "tflite-runtime", "warn", f"tflite-runtime {tfl} is installed with numpy {numpy}: it was built for "
            "numpy 1 and fails at Interpreter()", "pip uninstall tflite-runtime (ai-edge-litert replaces it), or "
            "pip install 'numpy<2' if you must keep it"))
    try:
        backend = load_backend()
    except EdgesqzError as exc:
        findings.append(Finding("runtime", "fail", str(exc), "pip install ai-edge-litert"))
        return False
    detail = f"{backend.name} {backend.version}"
    if backend.name != "ai_edge_litert":
        findings.append(Finding("runtime", "warn", detail + " (ai-edge-litert is not installed)",
                                "pip install ai-edge-litert: it is maintained and uses XNNPACK for int8 models"))
    else:
        findings.append(Finding("runtime", "ok", detail + (f"; tflite-runtime {tfl} also present" if tfl else "")))
    try:
        interpreter, _ = make_interpreter(tiny_model(), threads=1)
        interpreter.invoke()
    except EdgesqzError as exc:
        findings.append(Finding("interpreter", "fail", str(exc), "pip install -U ai-edge-litert"))
        return False
    coverage = delegate_coverage(interpreter)
    findings.append(Finding("xnnpack", "ok" if coverage.partitions else "warn",
                            "active (XNNPACK delegate applied)" if coverage.partitions else "not applied",
                            "" if coverage.partitions else "use ai-edge-litert; tflite-runtime does not use XNNPACK "
                            "for int8 models"))
    return True


def _model_fix(origin: str | None, path: object) -> str:
    """A fix that works on this machine: never ``edgesqz convert`` where TensorFlow is missing (a device)."""
    from edgesqz.device.models import CONVERT_HINT

    convert = f"; or make a new one with `{CONVERT_HINT}`" if sysinfo.importable("tensorflow") else ""
    if origin == "env":
        return f"unset EDGESQZ_MODEL (the default model is then used), or point it at a working .tflite file{convert}"
    if origin == "latest":
        return (f"rm {shlex.quote(str(path))} (the model installed with edgesqz is then used), or pass --model "
                f"FILE.tflite to run/classify{convert}")
    return f"pass --model FILE.tflite to run/classify{convert}"


def _model(findings: list[Finding]) -> bool:
    """The model ``run``/``classify`` would use without --model (resolved the same way), loaded for real.

    The finding names what was judged (``EDGESQZ_MODEL=...``, the ``latest.tflite`` that convert wrote,
    the installed default) and gives a fix that works here: on a device without TensorFlow never
    ``edgesqz convert``.
    """
    import os

    from edgesqz.device.classifier import Classifier
    from edgesqz.device.models import ORIGINS, NoModelError, choose_model
    from edgesqz.errors import EdgesqzError
    from edgesqz.paths import default_model_path

    try:
        choice = choose_model(None)
        path = choice.path
    except NoModelError as exc:
        findings.append(Finding("model", "warn", str(exc).split(";")[0], _model_fix(None, None)))
        return True
    except EdgesqzError as exc:
        origin = "env" if os.environ.get("EDGESQZ_MODEL") else "latest"
        detail = str(exc).split("; make")[0].split("; point it")[0].split("; remove it")[0]
        findings.append(Finding("model", "fail", detail, _model_fix(origin, default_model_path())))
        return False
    try:
        clf = Classifier(path, threads=1)
    except EdgesqzError as exc:
        judged = {"env": f"EDGESQZ_MODEL={os.environ.get('EDGESQZ_MODEL')}",
                  "latest": f"{path} (the model edgesqz convert wrote last)",
                  "packaged": f"{path} (the model installed with edgesqz)"}.get(choice.origin, str(path))
        findings.append(Finding("model", "fail", f"{judged} cannot be used: {exc}", _model_fix(choice.origin, path)))
        return False
    findings.append(Finding("model", "ok", f"{path}: {ORIGINS[choice.origin]} ({clf.name}; {clf.input_size}x"
                                           f"{clf.input_size} input, {clf.num_classes} classes)"))
    return True


def run_checks() -> tuple[list[Finding], bool]:
    """All checks; the bool says whether this device can run edgesqz models."""
    findings: list[Finding] = []
    version = sys.version_info
    findings.append(Finding("python", "ok" if version >= (3, 11) else "fail", sys.version.split()[0],
                            "" if version >= (3, 11) else "use Python 3.11 or newer (Pi OS bookworm has 3.11)"))
    board = sysinfo.board_model()
    findings.append(Finding("machine", "info", f"{board or sysinfo.cpu_model()} ({platform.machine()}, "
                                               f"{os.cpu_count()} cores)"))
    can_run = _runtime(findings)
    if can_run:
        can_run = _model(findings)

    edgetpu_lib = _edgetpu_library()
    corals = sysinfo.coral_devices()
    if corals:
        findings.append(Finding("coral", "ok" if edgetpu_lib else "warn", ", ".join(corals),
                                "" if edgetpu_lib else "install libedgetpu1-std from Coral's apt repository"))
    else:
        findings.append(Finding("coral", "info", "no Coral attached" + (" (libedgetpu installed)" if edgetpu_lib
                                                                        else "")))

    from edgesqz.device.sources import camera_inventory

    cams = camera_inventory()
    picamera2 = sysinfo.importable("picamera2")
    if cams:
        for cam in cams:
            findings.append(Finding("camera", "ok", f"{cam['stack']}: {cam['device']}: {cam['open_with']}"))
    else:
        findings.append(Finding("camera", "warn", "no camera: libcamera lists none" if picamera2 else
                                "no /dev/video* and Picamera2 is not importable",
                                "plug in a USB camera, or for a camera module: sudo apt install python3-picamera2 and "
                                "create the venv with --system-site-packages"))
    has_display, what = sysinfo.display_check()
    findings.append(Finding("display", "ok" if has_display else "info",
                            what if has_display else f"none: {what}; run is headless (use --json, --record or "
                            "--serve)"))
    gov = sysinfo.governor()
    if gov is not None:
        findings.append(Finding("governor", "ok" if gov in ("performance", "ondemand", "schedutil") else "warn", gov,
                                "" if gov in ("performance", "ondemand", "schedutil") else
                                "echo performance | sudo tee /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor"))
    temp = sysinfo.temperature_c()
    if temp is not None:
        findings.append(Finding("temperature", "ok" if temp < 75 else "warn", f"{temp:.1f} C",
                                "" if temp < 75 else "add a heatsink or fan: the SoC throttles at 80-85 C"))
    thr = sysinfo.throttled()
    if thr is not None:
        bad = [k for k, v in thr.items() if v is True]
        findings.append(Finding("throttling", "ok" if not bad else "warn", ", ".join(bad) or "none",
                                "" if not bad else "use the official power supply and cooling"))
    return findings, can_run


def _edgetpu_library() -> bool:
    import ctypes
    import ctypes.util

    if ctypes.util.find_library("edgetpu"):
        return True
    try:
        ctypes.CDLL("libedgetpu.so.1")
    except OSError:
        return False
    return True


def as_dicts(findings: list[Finding]) -> list[dict[str, Any]]:
    return [asdict(f) for f in findings]
