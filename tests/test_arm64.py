"""The arm64 proof: the device install in an emulated Raspberry Pi OS-like userland computes what x86_64 does.

Runs ``scripts/arm64.sh check`` (qemu user-mode, Debian bookworm arm64, Python 3.11, ``pip install .``)
on a real int8 SqueezeNet 1.1 (the default standard form: int8 body, float32 softmax tail) and the same
network with int8 logits out, on ~8 shared photos preprocessed here, and checks the int8 outputs are
bit-identical given identical input pixels, the standard model's probabilities agree within 1e-5 with
the same top-1 (float kernels differ in the last bits between NEON and AVX), ``info`` matches, and
``classify``/``run`` top-1 labels match when those commands exist. Also checks that the device
dependencies resolve to aarch64 wheels for Python 3.13 (Raspberry Pi OS trixie).

Runs when ``EDGESQZ_ARM64=1`` (CI) or the harness's rootfs already exists; needs root (chroot, mounts).
The first run builds the rootfs (a few minutes); later runs reuse it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "scripts" / "arm64.sh"
ROOTFS = Path(os.environ.get("EDGESQZ_ARM64_ROOT", "/var/cache/edgesqz/arm64-bookworm"))
ENABLED = os.environ.get("EDGESQZ_ARM64") == "1" or (ROOTFS / "opt" / "edgesqz" / "rootfs.ok").exists()
PHOTOS = 4  # from data/photos
SAMPLES = 4  # from data/imagenet-sample-1000
PY313_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
                   "manylinux2014_aarch64")
FORBIDDEN = ("tensorflow", "tensorflow-cpu", "tf-keras", "keras", "torch", "torchvision")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ENABLED, reason="arm64 emulation harness: set EDGESQZ_ARM64=1 (or run "
                                           "scripts/arm64.sh setup once) to run it"),
]

needs_emulation = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64" or os.geteuid() != 0,
    reason="the qemu harness needs root on an x86_64 Linux host (chroot, mounts, binfmt)",
)


def _shared() -> Path:
    shared = Path(os.environ["EDGESQZ_SHARED"])  # set by conftest.py
    if not (shared / "data" / "photos").is_dir():
        pytest.skip(f"needs the shared photos in {shared}/data/photos")
    return shared


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~8 real photos: a few of data/photos and a few of the ImageNet sample, copied to one folder."""
    shared = _shared()
    photos = sorted(p for p in (shared / "data" / "photos").iterdir() if p.suffix.lower() in {".jpg", ".png"})
    sample = sorted((shared / "data" / "imagenet-sample-1000").glob("*.JPEG"))
    chosen = photos[:PHOTOS] + sample[:: max(1, len(sample) // SAMPLES)][:SAMPLES]
    if len(chosen) < 4:
        pytest.skip("too few shared photos")
    folder = tmp_path_factory.mktemp("arm64-images")
    for p in chosen:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture(scope="module")
def host_pixels(images: Path) -> tuple[list[str], np.ndarray]:
    """The host's preprocessing, in this process: what both machines are fed."""
    from edgesqz.imaging import list_images, preprocess, read_image

    paths = list_images(images)
    return [p.name for p in paths], np.stack([preprocess(read_image(p)) for p in paths])


@pytest.fixture(scope="module")
def check(int8_model: Path, int8_plain_model: Path, images: Path,
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run ``scripts/arm64.sh check`` once (the standard model through the CLI, the int8-logits model's raw
    outputs too); the results on both machines and the summary."""
    if sys.platform != "linux" or platform.machine() != "x86_64" or os.geteuid() != 0:
        pytest.skip("the qemu harness needs root on an x86_64 Linux host (chroot, mounts, binfmt)")
    out = tmp_path_factory.mktemp("arm64-check")
    env = {**os.environ, "EDGESQZ_HOST_PYTHON": sys.executable, "CI": os.environ.get("CI", "true")}
    proc = subprocess.run(["bash", str(HARNESS), "check", str(int8_model), str(images), str(out),
                           str(int8_plain_model)],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=3600)
    print(proc.stdout[-6000:])
    print(proc.stderr[-4000:], file=sys.stderr)
    if not (out / "summary.json").exists():
        pytest.fail(f"scripts/arm64.sh check failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return {
        "returncode": proc.returncode, "out": out, "stdout": proc.stdout,
        "summary": json.loads((out / "summary.json").read_text()),
        "host": json.loads((out / "host" / "report.json").read_text()),
        "arm64": json.loads((out / "arm64" / "report.json").read_text()),
    }


@needs_emulation
def test_guest_is_a_pi_like_aarch64(check: dict[str, Any]) -> None:
    env = check["arm64"]["environment"]
    assert env["machine"] == "aarch64"
    assert env["python"].startswith("3.11.")  # Debian bookworm = Raspberry Pi OS bookworm
    assert env["qemu_cpu"] in ("cortex-a72", "cortex-a76")
    assert env["sve"] is False and env["sme"] is False  # the trap that silently breaks int8 results
    assert env["cpuinfo"].get("CPU implementer") == "0x41"  # the fake aarch64 cpuinfo is in place
    assert env["backend"] == "ai_edge_litert"


@needs_emulation
def test_int8_outputs_bit_identical(check: dict[str, Any], host_pixels: tuple[list[str], np.ndarray]) -> None:
    names, pixels = host_pixels
    inputs = np.load(check["out"] / "work" / "inputs.npz")
    # both machines were fed exactly the pixels this process computes
    assert [Path(n).name for n in inputs["names"]] == names
    assert np.array_equal(inputs["pixels"], pixels)
    host = np.load(check["out"] / "host" / "outputs.npz")["extra_0"]
    arm = np.load(check["out"] / "arm64" / "outputs.npz")["extra_0"]
    # raw int8 logits per image (the int8 body's output, MEAN inside the model)
    assert host.shape == arm.shape == (len(names), 1000)
    assert host.dtype == arm.dtype == np.int8
    diff = np.abs(host.astype(np.int16) - arm.astype(np.int16))
    assert int(diff.max()) == 0, f"int8 outputs differ: max abs diff {diff.max()} on {(diff.max(1) > 0).sum()} images"
    summary = check["summary"]["outputs"][1]
    assert summary["dtype"] == "int8" and summary["bit_identical"] and summary["ok"]
    # XNNPACK runs the whole graph on both
    assert summary["xnnpack_arm64"] == summary["xnnpack_host"]
    assert summary["xnnpack_arm64"]["full"]


@needs_emulation
def test_standard_model_probabilities_agree(check: dict[str, Any]) -> None:
    """The default model: float32 probabilities, equal within 1e-5 and the same top-1 on every image."""
    host = np.load(check["out"] / "host" / "outputs.npz")["raw"]
    arm = np.load(check["out"] / "arm64" / "outputs.npz")["raw"]
    assert host.dtype == arm.dtype == np.float32 and host.shape == arm.shape and host.shape[1] == 1000
    np.testing.assert_allclose(host.sum(1), 1.0, atol=1e-4)  # probabilities
    assert float(np.abs(host - arm).max()) <= 1e-5
    assert np.array_equal(host.argmax(1), arm.argmax(1))
    summary = check["summary"]["outputs"][0]
    assert summary["ok"] and summary["top1_equal"] == summary["images"] == host.shape[0]
    assert summary["xnnpack_arm64"]["full"] and summary["xnnpack_host"]["full"]


@needs_emulation
def test_preprocessing_across_arches(check: dict[str, Any]) -> None:
    """End-to-end pixels (decode + crop + INTER_AREA) are reported; at most +-1 apart when they differ."""
    pre = check["summary"]["preprocessing"]
    assert pre["images"] == check["summary"]["outputs"][0]["images"]
    print(f"end-to-end preprocessing across arches: {pre}")
    assert pre["max_abs_diff"] <= 1, pre


@needs_emulation
def test_info_matches(check: dict[str, Any]) -> None:
    assert check["summary"]["info"]["status"] == "equal", check["summary"]["info"]
    arm = check["arm64"]["cli"]["info"]["json"]
    assert arm["runtime"]["xnnpack"]["full"]
    assert arm["inputs"][0]["dtype"] == "uint8"  # the standard contract: uint8 pixels in
    assert arm["outputs"][0]["dtype"] == "float32" and arm["outputs"][0]["shape"] == [1, 1000]


@needs_emulation
def test_classify_top1_matches(check: dict[str, Any]) -> None:
    r = check["summary"]["classify"]
    if r["status"] == "not available":
        pytest.skip(f"edgesqz classify: not available ({r.get('why')})")
    assert r["status"] == "equal", r
    assert r["items"] == len(list(np.load(check["out"] / "work" / "inputs.npz")["names"]))


@needs_emulation
def test_run_on_a_video_matches(check: dict[str, Any]) -> None:
    r = check["summary"]["run"]
    if r["status"] == "not available":
        pytest.skip(f"edgesqz run: not available ({r.get('why')})")
    assert r["status"] == "equal", r
    assert r["items"] > 0


@needs_emulation
def test_bench_runs(check: dict[str, Any]) -> None:
    r = check["summary"]["bench"]
    if r["status"] == "not available":
        pytest.skip(f"edgesqz bench: not available ({r.get('why')})")
    assert r["status"] == "ok", r  # emulated timings say nothing about a Pi's speed


@needs_emulation
def test_doctor_and_edgetpu_check_on_arm64(check: dict[str, Any]) -> None:
    doctor, edgetpu = check["summary"]["doctor"], check["summary"]["edgetpu_check"]
    if doctor["status"] != "not available":
        assert doctor["status"] == "ok", doctor  # `edgesqz doctor` says the emulated Pi can run models
    if edgetpu["status"] != "not available":
        assert edgetpu["status"] == "equal", edgetpu  # same verdict on the same model
    if "not available" in (doctor["status"], edgetpu["status"]):
        pytest.skip(f"doctor: {doctor['status']}, edgetpu check: {edgetpu['status']}")


@needs_emulation
def test_harness_reports_equal(check: dict[str, Any]) -> None:
    assert check["returncode"] == 0, check["stdout"][-3000:]
    assert check["summary"]["result"] == "equal"
    assert "int8 outputs [1000] of extra0.tflite on 8 identical inputs: BIT-IDENTICAL" in check["stdout"]


def test_device_dependencies_resolve_for_python313_aarch64(tmp_path: Path) -> None:
    """Raspberry Pi OS trixie (Python 3.13, aarch64): every device dependency has a wheel; no TF/torch."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert deps
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
           "--python-version", "3.13", "--implementation", "cp", "--abi", "cp313",
           "--target", str(tmp_path / "site"), "--report", str(tmp_path / "report.json"), "--quiet"]
    for plat in PY313_PLATFORMS:
        cmd += ["--platform", plat]
    proc = subprocess.run([*cmd, *deps], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)
    assert proc.returncode == 0, f"the device dependencies do not resolve for cp313 aarch64:\n{proc.stderr[-3000:]}"
    installed = json.loads((tmp_path / "report.json").read_text())["install"]
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in installed}
    for dep in deps:
        name = dep.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower().replace("_", "-")
        assert name in names, f"{name} missing from the resolution"
    assert not names & set(FORBIDDEN)
    for item in installed:
        wheel = item["download_info"]["url"].rsplit("/", 1)[-1].split("#")[0]
        assert wheel.endswith(".whl"), wheel
        _py, abi, plat = wheel[:-4].split("-")[-3:]
        assert plat == "any" or ("aarch64" in plat and ({"cp313", "abi3"} & set(abi.split(".")))), wheel
