"""`edgesqz doctor` on this machine, and with the runtime missing or in the numpy-2 trap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgesqz import doctor, sysinfo

BLOCK_RUNTIMES = (
    "import sys\n"
    "for m in ('ai_edge_litert', 'ai_edge_litert.interpreter', 'tflite_runtime', 'tflite_runtime.interpreter',"
    " 'tensorflow', 'tensorflow.lite'):\n"
    "    sys.modules[m] = None\n"
    "sys.argv = ['edgesqz', 'doctor', '--json']\n"
    "from edgesqz.cli import main\n"
    "main()\n"
)


def test_doctor_on_this_machine() -> None:
    result = subprocess.run([sys.executable, "-m", "edgesqz", "doctor", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["schema"] == "edgesqz/1" and report["kind"] == "doctor_report"
    assert report["can_run_models"] is True
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["runtime"]["status"] == "ok" and checks["runtime"]["detail"].startswith("ai_edge_litert")
    assert checks["xnnpack"]["status"] == "ok"
    for c in report["checks"]:
        assert c["status"] in {"ok", "warn", "fail", "info"}
        assert c["status"] in {"ok", "info"} or c["fix"], c  # every problem comes with a fix


def test_doctor_without_any_runtime_fails_with_a_fix() -> None:
    result = subprocess.run([sys.executable, "-c", BLOCK_RUNTIMES], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["can_run_models"] is False
    runtime = next(c for c in report["checks"] if c["check"] == "runtime")
    assert runtime["status"] == "fail" and "pip install ai-edge-litert" in runtime["fix"]


def test_numpy2_trap_of_old_tflite_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    versions = {"tflite-runtime": "2.14.0", "numpy": "2.1.0"}
    real = sysinfo.package_version
    monkeypatch.setattr(sysinfo, "package_version", lambda name: versions.get(name) or real(name))
    findings, can_run = doctor.run_checks()
    trap = next(f for f in findings if f.check == "tflite-runtime")
    assert trap.status == "warn" and "numpy 1" in trap.detail and "ai-edge-litert" in trap.fix
    assert can_run


def test_tiny_model_runs_on_xnnpack() -> None:
    from edgesqz.device.runtime import delegate_coverage, make_interpreter

    interpreter, _ = make_interpreter(doctor.tiny_model(), threads=1)
    assert delegate_coverage(interpreter).full


def _model_check(home: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, bool]:
    monkeypatch.setenv("EDGESQZ_HOME", str(home))
    findings, can_run = doctor.run_checks()
    return next(f for f in doctor.as_dicts(findings) if f["check"] == "model"), can_run


def test_doctor_checks_the_default_model(int8_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    models.mkdir()
    check, can_run = _model_check(tmp_path, monkeypatch)  # none converted: the installed default, ready
    assert check["status"] == "ok" and "the default model installed with edgesqz" in check["detail"] and can_run
    from edgesqz.device import models as chooser

    with monkeypatch.context() as patch:
        patch.setattr(chooser, "packaged_model", lambda: None)
        check, can_run = _model_check(tmp_path, monkeypatch)  # none at all: a warning, the device can still run
        assert check["status"] == "warn" and "edgesqz convert" in check["fix"] and can_run
    latest = models / "latest.tflite"
    latest.symlink_to(tmp_path / "gone.tflite")  # dangling link
    check, can_run = _model_check(tmp_path, monkeypatch)
    assert check["status"] == "fail" and "gone.tflite" in check["detail"] and check["fix"] and not can_run
    latest.unlink()
    latest.write_bytes(int8_model.read_bytes()[:50000])  # truncated
    check, can_run = _model_check(tmp_path, monkeypatch)
    assert check["status"] == "fail" and "not a valid .tflite model" in check["detail"] and not can_run
    latest.unlink()
    latest.symlink_to(int8_model)
    check, can_run = _model_check(tmp_path, monkeypatch)
    assert check["status"] == "ok" and "1000 classes" in check["detail"] and can_run


def test_doctor_display_needs_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPLAY", ":99")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    findings, _ = doctor.run_checks()
    display = next(f for f in findings if f.check == "display")
    if Path("/tmp/.X11-unix/X99").exists():
        pytest.skip("this machine has an X server on :99")
    assert display.status == "info" and "no X server answers" in display.detail
