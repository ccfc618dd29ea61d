"""`edgesqz convert` with the real converter on real images, and every bad input it must refuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from edgesqz.datasets import labelled_files, sample_files
from edgesqz.device.runtime import make_interpreter
from edgesqz.evaluate import tflite_outputs
from edgesqz.imaging import list_images, preprocess, read_image
from edgesqz.labels import load_labels
from edgesqz.modelinfo import graph_summary
from edgesqz.tflite_metadata import read_metadata


def edgesqz(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it (without the TF log level conftest sets for this process)."""
    base = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "edgesqz", *args], capture_output=True, text=True, timeout=timeout,
                          env={**base, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- the int8 model: contract, metadata and behaviour ----------------------------------------------

def test_int8_model_is_full_integer_and_a_standard_classifier(int8_model: Path) -> None:
    from edgesqz.converters.standard_head import standard_classifier_problems

    data = int8_model.read_bytes()
    assert len(data) <= 1_420_000
    graph = graph_summary(data)
    assert graph["subgraphs"] == 1 and standard_classifier_problems(data) == []
    assert graph["ops"] == {"DEQUANTIZE": 2, "QUANTIZE": 1, "CONV_2D": 26, "MAX_POOL_2D": 3, "CONCATENATION": 8,
                            "MEAN": 1, "SOFTMAX": 1}
    # every tensor between the input conversion and the class map is int8; only the uint8 pixels, their
    # float copy and the three head tensors (the dequantised map, its mean, the probabilities) are not
    assert graph["tensor_types"]["UINT8"] == 1 and graph["tensor_types"]["FLOAT32"] == 4
    interpreter, _ = make_interpreter(data)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert inp["dtype"] == np.uint8 and list(inp["shape_signature"]) == [1, 224, 224, 3]
    assert inp["quantization"] == (1.0, 0)  # raw pixels
    assert out["dtype"] == np.float32 and list(out["shape"]) == [1, 1000]
    assert read_metadata(data).info["output"] == {"kind": "probabilities", "classes": 1000, "dtype": "float32"}
    convs = [op for op in interpreter._get_ops_details() if op["op_name"] == "CONV_2D"]
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    assert all(details[int(t)]["dtype"] == np.int8 for op in convs for t in (*op["inputs"][:2], *op["outputs"]))


def test_int8_model_is_self_describing(int8_model: Path) -> None:
    meta = read_metadata(int8_model)
    assert meta.has_tflite_metadata
    assert len(meta.labels) == 1000 and meta.labels[967] == "espresso"
    info = meta.info
    assert info["architecture"] == "squeezenet1_1" and info["format"] == "int8"
    assert info["input"] == {"size": 224, "layout": "NHWC", "color_order": "RGB", "range": [0, 255],
                             "dtype": "uint8", "normalization": "inside"}
    assert info["preprocessing"]["crop_fraction"] == pytest.approx(0.875)
    assert info["calibration"]["count"] == 48 and info["calibration"]["skipped"] == 0
    assert len(info["source_weights"]["sha256"]) == 64
    assert info["labels"]["ids"][0] == "n01440764"
    # the standard convention: labels are a zip member of the model file
    assert zipfile.ZipFile(int8_model).read("labels.txt").decode().splitlines()[0] == "tench"


def test_int8_model_classifies_real_photos(int8_model: Path, photos: list[Path]) -> None:
    labels = read_metadata(int8_model).labels
    images = np.stack([preprocess(read_image(p)) for p in photos])
    logits = tflite_outputs(int8_model.read_bytes(), images)  # probabilities
    top1 = {p.name: labels[int(row.argmax())] for p, row in zip(photos, logits, strict=True)}
    assert top1["coffee.png"] == "espresso"
    assert top1["chelsea.png"] in {"tabby", "tiger cat", "Egyptian cat"}


def test_check_reports_accuracy_on_held_out_images(tmp_path: Path, real_weights: Path, imagenet_sample: Path,
                                                   imagenet_labels: Path) -> None:
    out = tmp_path / "m.tflite"
    result = edgesqz("convert", "--weights", str(real_weights), "--int8", "--calib", str(imagenet_sample),
                     "--calib-count", "30", "--labels", str(imagenet_labels), "--check", str(imagenet_sample),
                     "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["schema"] == "edgesqz/1" and report["kind"] == "convert_report"
    acc = report["accuracy"]
    assert acc["images"] == 970 and acc["excluded_calibration_images"] == 30
    assert acc["labelled_by"] == "wnid"
    # the real SqueezeNet 1.1 scores about 65 % top-1 on these photos; int8 must stay close to float
    assert 55 < acc["reference"]["top1"] < 75
    assert abs(acc["top1_drop"]) < 5 and acc["top1_agreement"] > 85
    lo, hi = acc["top1_agreement_ci95"]
    assert lo < acc["top1_agreement"] <= hi and hi - lo < 5  # 970 images resolve agreement to a few points
    lo, hi = acc["top1_drop_ci95"]
    assert lo < acc["top1_drop"] < hi and hi - lo < 3
    assert json.loads(out.with_suffix(".report.json").read_text()) == report
    assert read_metadata(out).info["accuracy"]["images"] == 970
    # no TensorFlow chatter on the terminal (with 30 images, batches of 16 + 14 and 8 + 6, the quantiser's probe
    # models once made TensorFlow print tf.function retracing warnings)
    assert "WARNING:tensorflow" not in result.stderr and "retracing" not in result.stderr, result.stderr


def test_gate_rejects_a_badly_calibrated_model(tmp_path: Path, real_weights: Path, imagenet_sample: Path,
                                               imagenet_labels: Path) -> None:
    """Calibrating on a flat grey video wrecks int8 accuracy; --max-drop must catch it."""
    video = tmp_path / "grey.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    for _ in range(12):
        writer.write(np.full((240, 320, 3), 128, np.uint8))
    writer.release()
    check = tmp_path / "check"
    check.mkdir()
    for f in list_images(imagenet_sample)[::20]:
        (check / f.name).symlink_to(f)
    out = tmp_path / "m.tflite"
    result = edgesqz("convert", "--weights", str(real_weights), "--int8", "--calib", str(video), "--labels",
                     str(imagenet_labels), "--check", str(check), "--max-drop", "5", "-o", str(out))
    assert result.returncode == 3
    assert_one_line_error(result, "top-1 points", "95 % interval", "model not written")
    assert not out.exists()
    rejected = json.loads(out.with_suffix(".rejected.report.json").read_text())
    assert rejected["calibration"]["kind"] == "video" and rejected["accuracy"]["top1_drop"] > 5


def test_calibration_skips_and_counts_corrupt_images(tmp_path: Path, real_weights: Path, photos: list[Path]) -> None:
    calib = tmp_path / "calib" / "nested"
    calib.mkdir(parents=True)
    for p in photos:
        (calib / p.name).symlink_to(p)
    (calib / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    out = tmp_path / "m.tflite"
    result = edgesqz("convert", "--weights", str(real_weights), "--int8", "--calib", str(tmp_path / "calib"),
                     "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["calibration"]["count"] == len(photos) and report["calibration"]["skipped"] == 1
    assert "skipped 1 unreadable calibration images" in result.stderr


def test_existing_output_is_kept_unless_forced(tmp_path: Path, real_weights: Path) -> None:
    out = tmp_path / "m.tflite"
    out.write_bytes(b"precious")
    result = edgesqz("convert", "--weights", str(real_weights), "--dynamic", "-o", str(out))
    assert_one_line_error(result, "already exists", "--force")
    assert out.read_bytes() == b"precious"
    result = edgesqz("convert", "--weights", str(real_weights), "--dynamic", "-o", str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert read_metadata(out).info["format"] == "dynamic"
    # TensorFlow's start-up chatter (absl, CUDA probing) stays in the log, off the user's terminal
    assert "absl" not in result.stderr and "cuda" not in result.stderr.lower(), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.report.json", "m.tflite"]


def test_default_output_becomes_latest(tmp_path: Path, real_weights: Path) -> None:
    home = tmp_path / "home"
    result = edgesqz("convert", "--weights", str(real_weights), "--float32", env={"EDGESQZ_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    latest = home / "models" / "latest.tflite"
    assert latest.is_symlink() and read_metadata(latest).info["format"] == "float32"
    # no --labels: 1000-class torchvision weights get the ImageNet class names (with their wnids)
    assert "class_0" not in result.stderr
    meta = read_metadata(latest)
    assert meta.labels is not None and meta.labels[967] == "espresso" and meta.info["labels"]["ids"][967] == "n07920052"


@pytest.mark.parametrize("fmt", ["float16", "dynamic"])
def test_every_format_is_a_standard_classifier(tmp_path: Path, real_weights: Path, photos: list[Path],
                                               fmt: str) -> None:
    from edgesqz.converters.standard_head import standard_classifier_problems

    out = tmp_path / f"m-{fmt}.tflite"
    result = edgesqz("convert", "--weights", str(real_weights), f"--{fmt}", "-o", str(out))
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert standard_classifier_problems(data) == []
    probabilities = tflite_outputs(data, np.stack([preprocess(read_image(p)) for p in photos]))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert read_metadata(data).labels[int(probabilities[[p.name for p in photos].index("coffee.png")].argmax())] \
        == "espresso"


# --- bad input: one line, non-zero exit, nothing written ----------------------------------------------

@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out" / "m.tflite"


def test_int8_without_calibration_data(real_weights: Path, out: Path) -> None:
    assert_one_line_error(edgesqz("convert", "--weights", str(real_weights), "--int8", "-o", str(out)), "--calib")
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_missing_and_corrupt_weights(tmp_path: Path, out: Path) -> None:
    assert_one_line_error(edgesqz("convert", "--weights", str(tmp_path / "nope.pth"), "--float32", "-o", str(out)),
                          "does not exist")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(os.urandom(4096))
    assert_one_line_error(edgesqz("convert", "--weights", str(bad), "--float32", "-o", str(out)), "cannot read weights")
    assert not out.exists()


def test_weights_for_the_wrong_version(real_weights: Path, out: Path) -> None:
    result = edgesqz("convert", "--weights", str(real_weights), "--version", "1_0", "--float32", "-o", str(out))
    assert_one_line_error(result, "SqueezeNet 1.1", "--arch 1_1")
    assert not out.exists()


def test_labels_that_do_not_match_the_weights(tmp_path: Path, real_weights: Path, out: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    result = edgesqz("convert", "--weights", str(real_weights), "--float32", "--labels", str(labels), "-o", str(out))
    assert_one_line_error(result, "2 entries", "1000 classes")


def test_calibration_folder_without_images(tmp_path: Path, real_weights: Path, out: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    assert_one_line_error(edgesqz("convert", "--weights", str(real_weights), "--int8", "--calib", str(empty),
                                  "-o", str(out)), "no images")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"{i}.jpg").write_bytes(b"garbage")
    assert_one_line_error(edgesqz("convert", "--weights", str(real_weights), "--int8", "--calib", str(corrupt),
                                  "-o", str(out)), "could be decoded")
    assert not out.exists()


def test_video_that_cannot_be_opened(tmp_path: Path, real_weights: Path, out: Path) -> None:
    video = tmp_path / "broken.mp4"
    video.write_bytes(b"\x00" * 1000)
    assert_one_line_error(edgesqz("convert", "--weights", str(real_weights), "--int8", "--calib", str(video),
                                  "-o", str(out)), "cannot open video")


def test_output_that_cannot_be_written(tmp_path: Path, real_weights: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert_one_line_error(edgesqz("convert", "--weights", str(real_weights), "--float32", "-o",
                                  str(blocker / "m.tflite")), "cannot create folder")
    assert_one_line_error(edgesqz("convert", "--weights", str(real_weights), "--float32", "-o",
                                  str(tmp_path / "m.onnx")), "must end in .tflite")


def test_check_on_an_unlabelled_folder(tmp_path: Path, real_weights: Path, photos: list[Path], out: Path) -> None:
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for p in photos:
        (folder / p.name).symlink_to(p)
    result = edgesqz("convert", "--weights", str(real_weights), "--dynamic", "--check", str(folder), "-o", str(out))
    assert_one_line_error(result, "not labelled")
    assert not out.exists() and not list(out.parent.glob("*.part"))


def test_no_network_for_torchvision_weights(out: Path, tmp_path: Path) -> None:
    result = edgesqz("convert", "--weights", "torchvision", "--float32", "-o", str(out),
                     env={"EDGESQZ_TORCHVISION_BASE_URL": "http://127.0.0.1:9/", "EDGESQZ_CACHE": str(tmp_path)})
    assert_one_line_error(result, "cannot download", "--weights")


def test_labelled_folder_schemes(tmp_path: Path, imagenet_sample: Path, imagenet_labels: Path) -> None:
    labels = load_labels(imagenet_labels)
    files = sample_files(list_images(imagenet_sample), 5)
    for f in files:
        (tmp_path / labels.names[labelled_files(imagenet_sample, labels).files.index(f)]).mkdir()
    for f in files:
        idx = labelled_files(imagenet_sample, labels).files.index(f)
        (tmp_path / labels.names[idx] / "x.jpg").symlink_to(f)
    lf = labelled_files(tmp_path, labels)
    assert lf.scheme == "folders" and len(lf.files) == 5
    assert all(labels.names[t] == f.parent.name for f, t in zip(lf.files, lf.targets, strict=True))
