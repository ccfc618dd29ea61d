"""`edgesqz train` -> `convert --int8` -> `classify` with the trained labels, on real photos.

The data set (the ``coarse`` fixture in conftest.py) is built on the fly from the shared ImageNet
photos by grouping ImageNet classes into coarse groups: dogs, birds, reptiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

def edgesqz(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesqz", *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy())


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(coarse: Path, real_weights: Path) -> tuple[Path, dict]:
    out = coarse / "coarse.keras"
    result = edgesqz("train", "--data", str(coarse / "train"), "--weights", str(real_weights), "--epochs", "5",
                     "--batch-size", "16",
                     "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    return out, json.loads(result.stdout)


def test_fine_tuning_beats_the_bar_and_int8_keeps_it(coarse: Path, trained: tuple[Path, dict]) -> None:
    out, summary = trained
    assert summary["classes"] == ["bird", "dog", "reptile"]
    assert summary["images_per_second"] > 0 and 3 <= summary["epochs_run"] <= 5
    model = coarse / "coarse-int8.tflite"
    result = edgesqz("convert", "--weights", str(out), "--int8", "--calib", str(coarse / "train"),
                     "--check", str(coarse / "test"), "-o", str(model), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    acc = json.loads(result.stdout)["accuracy"]
    assert acc["labelled_by"] == "folders" and acc["images"] >= 60
    # the majority class (dogs) is 55 % of the 64 held-out images. Training order is not deterministic
    # and the set is small: runs of this exact test gave 76.6 % and 87.5 %. 70 % is 15 points above
    # always answering "dog", which a broken fine-tune cannot reach.
    assert acc["reference"]["top1"] >= 70, acc
    assert acc["model"]["top1"] >= acc["reference"]["top1"] - 5, acc

    dog = sorted((coarse / "test" / "dog").iterdir())[0]
    result = edgesqz("classify", "--model", str(model), str(dog), "--json", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    labels = {p["label"] for p in json.loads(result.stdout.splitlines()[0])["top_k"]}
    assert labels == {"bird", "dog", "reptile"}


def test_existing_output_and_resume(coarse: Path, trained: tuple[Path, dict], real_weights: Path) -> None:
    out, _ = trained
    before = out.read_bytes()
    line = one_error_line(edgesqz("train", "--data", str(coarse / "train"), "--weights", str(real_weights),
                                  "-o", str(out)))
    assert "already exists" in line and "--force" in line
    assert out.read_bytes() == before


def _folder(root: Path, layout: dict[str, list[bytes]]) -> Path:
    for cls, images in layout.items():
        (root / cls).mkdir(parents=True)
        for i, data in enumerate(images):
            (root / cls / f"{i}.jpg").write_bytes(data)
    return root


def test_bad_data_folders(tmp_path: Path, photos: list[Path]) -> None:
    jpg = photos[0].read_bytes()
    one = _folder(tmp_path / "one", {"cat": [jpg, jpg]})
    assert "at least 2" in one_error_line(edgesqz("train", "--data", str(one), "-o", str(tmp_path / "a.keras")))
    empty = _folder(tmp_path / "empty", {"cat": [jpg, jpg], "dog": []})
    assert "has no images" in one_error_line(edgesqz("train", "--data", str(empty), "-o", str(tmp_path / "b.keras")))
    broken = _folder(tmp_path / "broken", {"cat": [jpg, jpg], "dog": [b"not a jpeg"]})
    assert "no readable images" in one_error_line(edgesqz("train", "--data", str(broken), "-o",
                                                          str(tmp_path / "c.keras")))
    line = one_error_line(edgesqz("train", "--data", str(one), "--version", "2_0", "-o", str(tmp_path / "d.keras")))
    assert "2_0" in line


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path, photos: list[Path], real_weights: Path) -> None:
    data = _folder(tmp_path / "data", {"a": [photos[0].read_bytes()] * 3 + [b"garbage"],
                                       "b": [photos[1].read_bytes()] * 3})
    result = edgesqz("train", "--data", str(data), "--weights", str(real_weights), "--epochs", "1",
                     "--input-size", "64", "--batch-size", "4", "-o", str(tmp_path / "m.keras"), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["skipped"] == 1
    assert "skipped 1 unreadable images" in result.stderr


def test_cifar_network_from_scratch_with_its_recipe(crops32: Path, tmp_path: Path) -> None:
    """`train --arch cifar`: pytorch-cifar100's network and recipe on 32x32 real crops, then convert and classify."""
    out = tmp_path / "cifar.keras"
    result = edgesqz("train", "--arch", "cifar", "--data", str(crops32 / "train"), "--val", str(crops32 / "test"),
                     "--epochs", "10", "--batch-size", "32", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert len(summary["classes"]) == 8 and summary["epochs_run"] == 10  # no early stopping with a step schedule
    assert summary["best_val_accuracy"] > 0.4, summary  # 8 classes: 12.5 % by chance

    model = tmp_path / "cifar-int8.tflite"
    result = edgesqz("convert", "--weights", str(out), "--int8", "--calib", str(crops32 / "train"),
                     "--check", str(crops32 / "test"), "-o", str(model), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    rep = json.loads(result.stdout)
    assert rep["architecture"] == "squeezenet_cifar" and rep["input_size"] == 32
    assert abs(rep["accuracy"]["reference"]["top1"] - 100 * summary["best_val_accuracy"]) < 8, rep["accuracy"]
    assert rep["accuracy"]["top1_agreement"] >= 90, rep["accuracy"]
    image = sorted((crops32 / "test" / summary["classes"][0]).iterdir())[0]
    result = edgesqz("classify", "--model", str(model), str(image), "--json")
    assert result.returncode == 0, result.stderr
    assert {p["label"] for p in json.loads(result.stdout)["top_k"]} <= set(summary["classes"])
