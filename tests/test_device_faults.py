"""Fault injection: the real ``edgesqz`` command line, in subprocesses, on hostile and broken input.

Every run must end with exit status 0, or with exit status 1..127 and exactly one ``error:`` line on
stderr, never a traceback, a crash (signal) or an "internal error"; and nothing the user had may
change (the files in the run's folder are compared byte for byte, and no temporary file is left).

- models: seeded mutations (``EDGESQZ_FAULT_SEEDS=first:count`` runs other seeds; a failure names its
  seed, ``-k "seed=17"`` replays it), truncations, and crafted damage that crashed the runtime before
  it was validated (an op input or a graph output of -1, a weight without data), zip bombs and wrong
  value types in the embedded metadata, NaN weights, 100000 threads;
- images: forged headers claiming 30000x30000 pixels (PNG, JPEG, BMP, WebP, TIFF), in a folder with
  good images (which must still be classified), also under a 3 GB address-space limit (a Pi);
- outputs: existing files (kept without --force), outputs that are inputs (refused even with --force),
  /dev/full, a folder that cannot be written, a missing folder; stdout on /dev/full or closed early;
- signals: SIGINT, SIGTERM and SIGHUP mid-run (exit 0, summary, a playable recording); nohup; other
  commands unwind on SIGTERM (exit 128 + 15, the one exception to "below 128", nothing written);
- streams: a real MJPEG server that stops and comes back (the run carries on), or sends garbage.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fault_models import (
    crafted_models,
    first_op,
    join_zip,
    mutant,
    rebuild,
    split_zip,
    structure_positions,
    tiny_classifier,
)
from mjpeg_server import MjpegServer

EDGESQZ = [sys.executable, "-m", "edgesqz"]
PI_MEMORY = 3 * 2**30  # RLIMIT_AS of the memory tests: a 4 GB Raspberry Pi with room for the OS


# --------------------------------------------------------------------------- running and checking


def run(*args: object, cwd: Path | None = None, stdout: Any = subprocess.PIPE, timeout: float = 120,
        preexec: Callable[[], None] | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGESQZ, *map(str, args)], cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, preexec_fn=preexec, env={**os.environ, **(env or {})})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_clean(p: subprocess.CompletedProcess, *needles: str, ok: bool | None = None) -> str:
    """Exit 0, or 1..127 with one ``error:`` line (containing ``needles``); never a traceback or a crash."""
    err = p.stderr or ""
    assert p.returncode >= 0, f"killed by signal {-p.returncode}:\n{err[-2000:]}"
    for bad in ("Traceback", "internal error", "Fatal Python error", "Segmentation fault", "Aborted"):
        assert bad not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if ok is True or (ok is None and p.returncode == 0):
        assert p.returncode == 0, err[-2000:]
        return ""
    assert 0 < p.returncode < 128, f"exit {p.returncode}:\n{err[-2000:]}"
    assert errors, err[-2000:]
    for needle in needles:
        assert any(needle in e for e in errors), f"{needle!r} not in {errors}"
    return errors[0]


def one_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    line = assert_clean(p, *needles, ok=False)
    assert len([x for x in p.stderr.splitlines() if x.startswith("error:")]) == 1, p.stderr
    return line


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def limit_memory(limit: int = PI_MEMORY) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


# --------------------------------------------------------------------------- models


REGRESSION_SEEDS = [113]  # found by a longer sweep: edgetpu check unpacked a table the runtime's verifier rejects


def _seeds() -> list[int]:
    spec = os.environ.get("EDGESQZ_FAULT_SEEDS")
    first, _, count = (spec or "0:12").partition(":")
    return list(range(int(first), int(first) + int(count or 1))) + ([] if spec else REGRESSION_SEEDS)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def model_bytes(int8_model: Path) -> bytes:
    return int8_model.read_bytes()


@pytest.fixture(scope="module")
def positions(model_bytes: bytes) -> np.ndarray:
    return structure_positions(model_bytes)


@pytest.mark.parametrize("seed", _seeds(), ids=lambda s: f"seed={s}")
def test_mutated_model(seed: int, model_bytes: bytes, positions: np.ndarray, photos_dir: Path,
                       tmp_path: Path) -> None:
    path = tmp_path / f"mutant-{seed}.tflite"
    path.write_bytes(mutant(model_bytes, positions, seed))
    before = snapshot(tmp_path)
    info = run("info", "--json", path)
    assert_clean(info)
    assert_clean(run("classify", "--model", path, photos_dir / "coffee.png", "--threads", 1))
    check = run("edgetpu", "check", path)  # rejects what the runtime cannot load, never calls it compatible
    if info.returncode:
        one_error(check)
    elif check.returncode == 1 and "NOT fully compatible" in check.stdout:  # a verdict, not an error
        assert "Traceback" not in check.stderr
    else:
        assert_clean(check)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fraction", [0.0001, 0.02, 0.5, 0.97, 0.9999])
def test_truncated_model(fraction: float, model_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "truncated.tflite"
    path.write_bytes(model_bytes[: max(1, int(len(model_bytes) * fraction))])
    one_error(run("info", path), "truncated.tflite")


def test_crafted_models_that_crashed_the_runtime(model_bytes: bytes, photos_dir: Path, tmp_path: Path) -> None:
    for name, (data, needle) in crafted_models(model_bytes).items():
        path = tmp_path / f"{name}.tflite"
        path.write_bytes(data)
        for command in (["info", path], ["info", "--json", path], ["edgetpu", "check", path],
                        ["classify", "--model", path, photos_dir / "coffee.png"],
                        ["bench", path, "--runs", 2, "--warmup", 0]):
            one_error(run(*command), needle, "not a valid .tflite model")


def _metadata_model(model_bytes: bytes, **members: bytes) -> bytes:
    flatbuffer, original = split_zip(model_bytes)
    return join_zip(flatbuffer, {**original, **members})


def test_damaged_metadata(model_bytes: bytes, photos_dir: Path, tmp_path: Path) -> None:
    info = json.loads(split_zip(model_bytes)[1]["edgesqz.json"])
    cases = {
        "wrong-type": (json.dumps({**info, "preprocessing": {**info["preprocessing"], "crop_fraction": "abc"}}),
                       "preprocessing.crop_fraction"),
        "not-an-object": (json.dumps({**info, "output": [1, 2]}), "output = [1, 2], expected a JSON object"),
        "bad-kind": (json.dumps({**info, "output": {"kind": "boxes", "classes": 1000}}), "output.kind"),
        "deep-json": ("[" * 100000 + "]" * 100000, "edgesqz.json is not valid JSON"),
    }
    for name, (text, needle) in cases.items():
        path = tmp_path / f"{name}.tflite"
        path.write_bytes(_metadata_model(model_bytes, **{"edgesqz.json": text.encode()}))
        for command in (["info", path], ["classify", "--model", path, photos_dir / "coffee.png"],
                        ["run", "--model", path, "--source", photos_dir / "coffee.png"]):
            one_error(run(*command), needle, str(path))
    path = tmp_path / "latin1-labels.tflite"
    labels = split_zip(model_bytes)[1]["labels.txt"].replace(b"goldfish", b"poisson rouge \xe9")
    path.write_bytes(_metadata_model(model_bytes, **{"labels.txt": labels}))
    one_error(run("classify", "--model", path, photos_dir / "coffee.png"), "labels.txt is not UTF-8 text")


def test_zip_bomb_labels_are_not_inflated(model_bytes: bytes, photos_dir: Path, tmp_path: Path) -> None:
    flatbuffer, members = split_zip(model_bytes)
    bomb = b"x\n" * (64 << 20)  # 128 MB of labels, about 130 kB compressed
    path = tmp_path / "bomb.tflite"
    path.write_bytes(join_zip(flatbuffer, {**members, "labels.txt": bomb}, compress=zipfile.ZIP_DEFLATED))
    assert path.stat().st_size < 2 * len(model_bytes)
    for command in (["info", path], ["classify", "--model", path, photos_dir / "coffee.png"]):
        one_error(run(*command, preexec=limit_memory()), "labels.txt claims 128 MiB")
    # a zip that understates the size: reading stops at the stated size and the CRC check fails
    lying = bytearray(path.read_bytes())
    for signature, name_at, size_at in ((b"PK\x03\x04", 30, 22), (b"PK\x01\x02", 46, 24)):  # local, central
        pos = lying.find(signature, len(flatbuffer))
        while pos != -1:
            if lying[pos + name_at:pos + name_at + 10] == b"labels.txt":
                struct.pack_into("<I", lying, pos + size_at, 4000)
            pos = lying.find(signature, pos + 4)
    path.write_bytes(bytes(lying))
    one_error(run("classify", "--model", path, photos_dir / "coffee.png", preexec=limit_memory()),
              "corrupt associated files")


def test_nan_weights_and_impossible_threads(float_model: Path, int8_model: Path, photos_dir: Path,
                                            tmp_path: Path) -> None:
    def nan_conv(m: Any, s: Any) -> None:
        t = m.subgraphs[0].tensors[first_op(m, s, "CONV_2D").inputs[1]]
        data = np.full(len(m.buffers[t.buffer].data) // 4, np.nan, np.float32)
        m.buffers[t.buffer].data = np.frombuffer(data.tobytes(), np.uint8)

    path = tmp_path / "nan.tflite"
    path.write_bytes(rebuild(float_model.read_bytes(), nan_conv))
    one_error(run("classify", "--model", path, photos_dir / "coffee.png"), "NaN or infinite scores")
    one_error(run("run", "--model", path, "--source", photos_dir), "NaN or infinite scores")
    for command in (["classify", "--model", int8_model, photos_dir / "coffee.png"], ["bench", int8_model]):
        one_error(run(*command, "--threads", 100000), "--threads must be between 1 and 64")


def test_compare_refuses_models_that_do_not_match(int8_model: Path, photos_dir: Path, tmp_path: Path) -> None:
    from edgesqz.doctor import tiny_model

    data = tmp_path / "data"
    data.mkdir()
    (data / "n07920052_coffee.png").write_bytes((photos_dir / "coffee.png").read_bytes())
    tiny = tmp_path / "tiny.tflite"
    tiny.write_bytes(tiny_classifier(8))
    relu = tmp_path / "relu.tflite"
    relu.write_bytes(tiny_model())
    one_error(run("compare", int8_model, tiny, "--data", data), "different input sizes")
    one_error(run("compare", int8_model, relu, "--data", data), "is not an image classifier")
    one_error(run("compare", int8_model, int8_model, "--data", tmp_path / "nope"), "--data needs a labelled folder")


# --------------------------------------------------------------------------- images


def forged_images(folder: Path, good: Path) -> list[Path]:
    """Small files whose headers claim 30000 x 30000 pixels (900 megapixels)."""
    image = cv2.imread(str(good))
    big = 30000
    out = []
    png = bytearray(cv2.imencode(".png", image)[1].tobytes())
    struct.pack_into(">II", png, 16, big, big)
    struct.pack_into(">I", png, 29, zlib.crc32(bytes(png[12:29])))
    jpg = bytearray(cv2.imencode(".jpg", image)[1].tobytes())
    sof = jpg.find(b"\xff\xc0")
    struct.pack_into(">HH", jpg, sof + 5, big, big)
    bmp = bytearray(cv2.imencode(".bmp", image)[1].tobytes())
    struct.pack_into("<ii", bmp, 18, big, big)
    webp = bytearray(b"RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00")
    webp += (big - 1).to_bytes(3, "little") + (big - 1).to_bytes(3, "little")
    tiff = bytearray(cv2.imencode(".tif", image)[1].tobytes())
    ifd = struct.unpack_from("<I", tiff, 4)[0]
    for i in range(struct.unpack_from("<H", tiff, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", tiff, entry)
        if tag in (256, 257):
            struct.pack_into("<H" if kind == 3 else "<I", tiff, entry + 8, big if kind != 3 else 65000)
    for name, data in (("forged.png", png), ("forged.jpg", jpg), ("forged.bmp", bmp), ("forged.webp", webp),
                       ("forged.tif", tiff)):
        path = folder / name
        path.write_bytes(bytes(data))
        out.append(path)
    return out


def test_forged_image_headers(int8_model: Path, photos_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    forged = forged_images(folder, photos_dir / "coffee.png")
    (folder / "coffee.png").write_bytes((photos_dir / "coffee.png").read_bytes())
    before = snapshot(tmp_path)
    t0 = time.perf_counter()
    p = run("classify", "--model", int8_model, folder, "--json", "--threads", 1, preexec=limit_memory())
    assert time.perf_counter() - t0 < 60
    assert_clean(p, ok=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(forged), p.stderr  # one line per bad image
    for path in forged:
        assert sum(path.name in e for e in errors) == 1, errors
    assert all("megapixels" in e or "cannot decode" in e for e in errors), errors
    results = jsonl(p.stdout)
    assert [Path(r["image"]).name for r in results] == ["coffee.png"]  # the good image is still classified
    assert results[0]["top_k"][0]["label"] == "espresso"
    p = run("run", "--model", int8_model, "--source", folder, "--json", preexec=limit_memory())
    assert_clean(p, ok=True)
    summary = jsonl(p.stdout)[-1]
    assert summary["frames"] == 1 and summary["skipped"] == len(forged)
    assert snapshot(tmp_path) == before


def test_compare_and_calibration_skip_and_count_forged_images(int8_model: Path, photos_dir: Path,
                                                              tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i, path in enumerate(forged_images(tmp_path, photos_dir / "coffee.png")):
        path.rename(data / f"n07920052_{i}{path.suffix}")
    (data / "n07920052_coffee.png").write_bytes((photos_dir / "coffee.png").read_bytes())
    p = run("compare", int8_model, int8_model, "--data", data, "--json", "--threads", 1, preexec=limit_memory())
    assert_clean(p, ok=True)
    report = json.loads(p.stdout)
    assert report["images"] == 1 and report["skipped_unreadable"] == 5
    # what convert --calib does with the folder (TensorFlow is not needed for this part)
    from edgesqz.datasets import calibration_set
    from edgesqz.imaging import Preprocessing

    calib = calibration_set(data, 10, Preprocessing())
    assert len(calib.sources) == 1 and len(calib.skipped) == 5


# --------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def video(work: Path, photos_dir: Path) -> Path:
    scene = cv2.resize(cv2.imread(str(photos_dir / "coffee.png")), (900, 700))
    path = work / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (640, 480))
    for i in range(150):
        writer.write(np.ascontiguousarray(scene[(i * 2) % 220:(i * 2) % 220 + 480, (i * 3) % 260:(i * 3) % 260 + 640]))
    writer.release()
    return path


def test_existing_outputs_are_kept(int8_model: Path, video: Path, tmp_path: Path) -> None:
    src = tmp_path / "clip.avi"
    src.write_bytes(video.read_bytes())
    model = tmp_path / "m.tflite"
    model.write_bytes(int8_model.read_bytes())
    for name in ("out.jsonl", "out.mp4", "bench.json", "bench.csv", "plot.png"):
        (tmp_path / name).write_bytes(b"the user's own " + name.encode())
    before = snapshot(tmp_path)
    base = ["--model", model, "--source", src, "--max-frames", 3]
    cases = [
        (["run", *base, "-o", "out.jsonl"], "--output out.jsonl already exists; pass --force"),
        (["run", *base, "--record", "out.mp4"], "--record out.mp4 already exists; pass --force"),
        (["run", *base, "--record", "clip.avi"], "same file as --source"),
        (["run", *base, "--record", "clip.avi", "--force"], "same file as --source"),
        (["run", *base, "-o", "m.tflite", "--force"], "same file as --model"),
        (["run", *base, "-o", "x.mp4", "--record", "x.mp4"], "the same file"),
        (["bench", model, "--json", "bench.json"], "--json bench.json already exists"),
        (["bench", model, "--csv", "bench.csv"], "--csv bench.csv already exists"),
        (["bench", model, "--json", "m.tflite", "--force"], "same file as model"),
    ]
    for args, needle in cases:
        one_error(run(*args, cwd=tmp_path), needle)
        assert snapshot(tmp_path) == before, args
    # a hard link to the source is the same file too
    os.link(src, tmp_path / "link.avi")
    one_error(run("run", *base, "--record", "link.avi", "--force", cwd=tmp_path), "same file as --source")
    (tmp_path / "link.avi").unlink()
    # with --force they are replaced, whole
    p = run("run", *base, "-o", "out.jsonl", "--record", "out.mp4", "--force", cwd=tmp_path)
    assert_clean(p, ok=True)
    assert jsonl((tmp_path / "out.jsonl").read_text())[-1]["frames"] == 3
    assert cv2.VideoCapture(str(tmp_path / "out.mp4")).read()[0]
    assert sorted(os.listdir(tmp_path)) == sorted(before)  # no temporary files left


def test_unwritable_and_full_outputs(int8_model: Path, video: Path, photos_dir: Path, tmp_path: Path) -> None:
    base = ["--model", int8_model, "--source", video, "--max-frames", 3]
    one_error(run("run", *base, "-o", "/dev/full"), "cannot write /dev/full: the disk is full")
    one_error(run("run", *base, "--record", "/dev/full"), "use a .mp4")
    with open("/dev/full", "w") as full:
        for args in (["run", *base, "--json"], ["classify", "--model", int8_model, photos_dir, "--json"],
                     ["info", "--json", int8_model], ["info", int8_model], ["bench", int8_model, "--json", "-"]):
            one_error(run(*args, stdout=full), "cannot write standard output: the disk is full")
    t0 = time.perf_counter()
    # checked before measuring: nothing is benchmarked for an output that cannot be written
    for target, needle in ((Path("/sys/fs/edgesqz-bench.json"), "cannot write to /sys/fs"),
                           (tmp_path / "missing" / "bench.json", "does not exist")):
        p = run("bench", int8_model, "--runs", 2000, "--json", target)
        one_error(p, needle)
        assert "peak RSS" not in p.stderr
    assert time.perf_counter() - t0 < 30
    one_error(run("run", *base, "-o", tmp_path / "missing" / "x.jsonl"), "does not exist")
    p = run("bench", int8_model, "--runs", 20, "--json", "/dev/full")  # the table is printed before failing
    one_error(p, "cannot write /dev/full")
    assert "ai_edge_litert" in p.stdout
    assert os.listdir(tmp_path) == []


def test_stdout_closed_early(int8_model: Path, photos_dir: Path, video: Path) -> None:
    for args in (["classify", "--model", int8_model, photos_dir, "--json"],
                 ["run", "--model", int8_model, "--source", video, "--json"]):
        proc = subprocess.Popen([*EDGESQZ, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().startswith("{")
        proc.stdout.close()  # `| head -1`
        err = proc.stderr.read()
        proc.wait(timeout=60)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "error" not in err, err


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_mid_run_keeps_summary_and_recording(sig: signal.Signals, int8_model: Path, video: Path,
                                                    tmp_path: Path) -> None:
    out, rec = tmp_path / "run.jsonl", tmp_path / "run.mp4"
    proc = subprocess.Popen([*EDGESQZ, "run", "--model", str(int8_model), "--source", str(video), "--fps", "30",
                             "--json", "-o", str(out), "--record", str(rec), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(5)]
        assert all(lines), proc.stderr.read()
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    summary = jsonl("".join(lines) + rest)[-1]
    assert summary["kind"] == "run_summary" and summary["stopped_by"] == sig.name
    assert jsonl(out.read_text())[-1] == summary
    cap = cv2.VideoCapture(str(rec))
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert frames == summary["frames"] >= 5
    assert sorted(os.listdir(tmp_path)) == ["run.jsonl", "run.mp4"]


def test_other_commands_unwind_on_sigterm(int8_model: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([*EDGESQZ, "bench", str(int8_model), "--runs", "1000000", "--json", "b.json"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "interrupted by SIGTERM" in err, err
    assert "Traceback" not in err and os.listdir(tmp_path) == []


def test_nohup_keeps_running(int8_model: Path, video: Path, tmp_path: Path) -> None:
    def ignore_hup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    proc = subprocess.Popen([*EDGESQZ, "run", "--model", str(int8_model), "--source", str(video), "--fps", "30",
                             "--json", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ignore_hup)
    try:
        assert proc.stdout.readline()
        proc.send_signal(signal.SIGHUP)
        for _ in range(10):  # still classifying after the hang-up
            assert proc.stdout.readline().startswith('{"schema"')
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert jsonl(rest)[-1]["stopped_by"] == "SIGINT"


# --------------------------------------------------------------------------- streams


def test_stream_that_goes_away_and_comes_back(int8_model: Path) -> None:
    server = MjpegServer(fps=20).start()
    proc = subprocess.Popen([*EDGESQZ, "run", "--model", str(int8_model), "--source", server.url, "--json",
                             "--threads", "1", "--reconnect", "60s"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        before = [proc.stdout.readline() for _ in range(10)]
        assert all(before), proc.stderr.read()
        server.stop()  # the camera's server goes down...
        time.sleep(2.5)
        assert proc.poll() is None
        server.start()  # ...and comes back on the same port
        after = [proc.stdout.readline() for _ in range(10)]
        assert all(after)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        server.stop()
    assert proc.returncode == 0, err
    summary = jsonl(rest)[-1]
    assert summary["reconnects"] >= 1 and summary["stopped_by"] == "SIGINT", summary
    assert "is back" in err and "reconnected" in err


def test_stream_limits_and_garbage(int8_model: Path) -> None:
    server = MjpegServer(fps=20).start()
    try:  # --reconnect 0: a lost stream is an error at once, and it does not talk about cables
        proc = subprocess.Popen([*EDGESQZ, "run", "--model", str(int8_model), "--source", server.url, "--json",
                                 "--reconnect", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline()
        server.stop()
        out, err = proc.communicate(timeout=60)
        line = one_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), "--reconnect 0")
        assert "cable" not in line and "server" in line
    finally:
        server.stop()
    garbage = MjpegServer(garbage=True).start()
    try:
        line = one_error(run("run", "--model", int8_model, "--source", garbage.url), "sends nothing OpenCV can decode")
        assert "cable" not in line
    finally:
        garbage.stop()
    one_error(run("run", "--model", int8_model, "--source", "http://127.0.0.1:9/none.mjpg"), "cannot connect")
    for bad in ("-1", "soon", "0s", "nan"):
        one_error(run("run", "--model", int8_model, "--camera", 0, "--reconnect", bad), "--reconnect takes")


def test_bad_numbers(int8_model: Path, video: Path) -> None:
    base = ["run", "--model", int8_model, "--source", video]
    for args, needle in ((["--fps", "nan"], "--fps must be > 0"), (["--fps", "inf"], "--fps must be > 0"),
                         (["--duration", "nan"], "--duration"), (["--mean", "nan"], "--mean")):
        one_error(run(*base, *args), needle)
    for value in ("nan", "inf"):
        one_error(run("bench", int8_model, "--duration", value), "--duration a number of seconds > 0")
    one_error(run("run", "--model", int8_model, "--source", video.parent, "--loop"), "--loop plays a video file")


# --------------------------------------------------------------------------- permissions


def as_nobody() -> None:
    """Drop root, so that permissions apply as they would to a user (root reads and writes anything)."""
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)


def without_root_overrides() -> None:
    """Stay root but lose CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH for the command about to run (dropped from
    the bounding set before exec), so file permissions apply to it as to a user."""
    if os.geteuid() == 0:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _as_a_user() -> Callable[[], None]:
    """A preexec that makes permissions apply: user nobody when it can run this Python, else root without its
    file-permission overrides."""
    for preexec in (as_nobody, without_root_overrides):
        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp) / "locked"
            probe.write_text("x")
            probe.chmod(0o000)
            Path(tmp).chmod(0o755)
            try:
                ok = subprocess.run([sys.executable, "-c", "import edgesqz"], preexec_fn=preexec,
                                    capture_output=True, timeout=60).returncode == 0
                denied = subprocess.run([sys.executable, "-c", f"open({str(probe)!r}).read()"], preexec_fn=preexec,
                                        capture_output=True, timeout=60).returncode != 0
            except OSError:
                continue
            if ok and denied:
                return preexec
    pytest.skip("cannot make file permissions apply here (neither user nobody nor dropping root's overrides works)")


def test_unreadable_and_read_only_folders(int8_model: Path, photos_dir: Path) -> None:
    user = _as_a_user()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        model = root / "m.tflite"
        model.write_bytes(int8_model.read_bytes())
        model.chmod(0o644)
        locked = root / "locked"
        locked.mkdir()
        (locked / "a.png").write_bytes((photos_dir / "coffee.png").read_bytes())
        locked.chmod(0o000)
        read_only = root / "ro"
        read_only.mkdir()
        read_only.chmod(0o555)
        locked_model = root / "locked.tflite"
        locked_model.write_bytes(int8_model.read_bytes())
        locked_model.chmod(0o000)
        locked_labels = root / "locked.txt"
        locked_labels.write_text("tench\n")
        locked_labels.chmod(0o000)
        locked_image = root / "locked.png"
        locked_image.write_bytes((photos_dir / "coffee.png").read_bytes())
        locked_image.chmod(0o000)
        photo = photos_dir / "coffee.png"
        env = {"HOME": tmp, "EDGESQZ_HOME": tmp}
        try:
            one_error(run("classify", "--model", model, locked, preexec=user, env=env),
                      "cannot read folder", "ermission")
            one_error(run("classify", "--model", model, locked_image, preexec=user, env=env),
                      "cannot read image", "ermission")
            for command in (["classify", "--model", locked_model, photo], ["run", "--model", locked_model,
                                                                             "--source", photo]):
                one_error(run(*command, preexec=user, env=env), "cannot read model", "ermission")
            one_error(run("classify", "--model", model, "--labels", locked_labels, photo, preexec=user, env=env),
                      "cannot read labels file", "ermission")
            p = run("bench", model, "--runs", 2, "--json", read_only / "b.json", preexec=user, env=env)
            one_error(p, "cannot write to", "permission denied")
            one_error(run("run", "--model", model, "--source", photo, "-o", read_only / "x.jsonl",
                          preexec=user, env=env), "permission denied")
        finally:
            locked.chmod(0o755)
            read_only.chmod(0o755)
        assert os.listdir(read_only) == []


def test_usage_errors_are_one_line(int8_model: Path, photos_dir: Path) -> None:
    """A missing argument or option, an unknown option, a value of the wrong type: one line naming the help."""
    for args, needle in ((["classify"], "Missing argument"),
                         (["compare", int8_model, int8_model], "Missing option '--data'"),
                         (["classify", "--bogus", photos_dir], "No such option: --bogus"),
                         (["run", "--threads", "abc"], "'--threads'"),
                         (["nosuch"], "No such command 'nosuch'")):
        p = run(*args)
        line = one_error(p, needle)
        assert p.returncode == 2 and "--help" in line, line
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
