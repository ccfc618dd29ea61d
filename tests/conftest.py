from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/torch_squeezenet.py

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SHARED = Path(os.environ.get("EDGESQZ_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
os.environ["EDGESQZ_SHARED"] = str(SHARED)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data folder; set EDGESQZ_SHARED to where it is)")
    return path


def video_frames(path: Path) -> list:
    """Every frame of a video file, decoded with OpenCV (BGR arrays)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        frames.append(image)
    cap.release()
    return frames


@pytest.fixture(scope="session")
def shared() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def real_weights() -> Path:
    return _need(SHARED / "weights" / "squeezenet1_1-torchvision-fp16r.pth")


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    folder = _need(SHARED / "data" / "photos")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".png"})


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    return _need(SHARED / "data" / "photos")


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    return _need(SHARED / "data" / "imagenet-sample-1000")


@pytest.fixture(scope="session")
def imagenet_labels() -> Path:
    return _need(SHARED / "data" / "labels" / "imagenet_class_index.json")


# Coarse groups of ImageNet classes (torchvision's class order), for training on real photos.
COARSE_GROUPS = {
    "dog": set(range(151, 269)),
    "bird": set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147)),
    "reptile": set(range(33, 69)),
}


@pytest.fixture(scope="session")
def coarse(tmp_path_factory: pytest.TempPathFactory, imagenet_sample: Path, imagenet_labels: Path) -> Path:
    """train/ and test/ folders (70/30 per group, disjoint), one sub-folder per coarse group, and labels.txt."""
    import json
    import random

    index = {v[0]: int(k) for k, v in json.loads(imagenet_labels.read_text()).items()}
    root = tmp_path_factory.mktemp("coarse")
    rng = random.Random(0)
    for group, classes in COARSE_GROUPS.items():
        files = sorted(f for f in imagenet_sample.iterdir() if index[f.name[:9]] in classes)
        rng.shuffle(files)
        cut = round(len(files) * 0.7)
        for split, chunk in (("train", files[:cut]), ("test", files[cut:])):
            (root / split / group).mkdir(parents=True, exist_ok=True)
            for f in chunk:
                (root / split / group / f.name).symlink_to(f)
    (root / "labels.txt").write_text("\n".join(sorted(COARSE_GROUPS)) + "\n")
    return root


@pytest.fixture(scope="session")
def crops32(tmp_path_factory: pytest.TempPathFactory, imagenet_sample: Path) -> Path:
    """A small CIFAR-like set of real images: 8 shared photos are the classes, 32x32 crops of them the samples.

    Each class gets 40 train/ and 16 test/ crops (random squares of 35-90 % of the shorter side at
    random places, random flips, resized with INTER_AREA), saved as PNG; labels.txt lists the classes.
    """
    import cv2
    import numpy as np

    from edgesqz.imaging import list_images, read_image

    root = tmp_path_factory.mktemp("crops32")
    rng = np.random.default_rng(0)
    photos = list_images(imagenet_sample)[::125]
    names = [p.stem.split("_", 1)[1] for p in photos]
    for photo, name in zip(photos, names, strict=True):
        image = read_image(photo)
        h, w = image.shape[:2]
        for split, count in (("train", 40), ("test", 16)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                side = int(min(h, w) * rng.uniform(0.35, 0.9))
                top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
                crop = image[top:top + side, left:left + side]
                if rng.random() < 0.5:
                    crop = crop[:, ::-1]
                crop = cv2.resize(crop, (32, 32), interpolation=cv2.INTER_AREA)
                cv2.imwrite(str(root / split / name / f"{i:03d}.png"), crop)
    (root / "labels.txt").write_text("\n".join(sorted(names)) + "\n")
    return root


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read or write the user's real model and weights folders from tests."""
    home = tmp_path_factory.getbasetemp() / "edgesqz-home"
    monkeypatch.setenv("EDGESQZ_HOME", str(home))
    monkeypatch.setenv("EDGESQZ_CACHE", str(home / "cache"))


# --- real converted models, shared by the convert and device tests -------------------------------
# Built once per run with the real converter (small calibration set). A venv without TensorFlow
# (the device-only install) reuses models an earlier run left in EDGESQZ_TEST_MODELS.

CALIB_FOR_TESTS = 48


def _test_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("EDGESQZ_TEST_MODELS")
    path = Path(env) if env else tmp_path_factory.getbasetemp() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_model(tmp_path_factory: pytest.TempPathFactory, fmt: str, ptq: str = "best",
                 head: str = "probabilities", edgetpu: bool = False) -> Path:
    suffix = ("-plain" if ptq == "plain" else "") + ("" if head == "probabilities" else f"-{head}") \
        + ("-edgetpu" if edgetpu else "")
    target = _test_models_dir(tmp_path_factory) / f"squeezenet1_1-{fmt}{suffix}.tflite"
    if target.exists():
        return target
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pytest.skip(f"no prebuilt {target.name} in EDGESQZ_TEST_MODELS and no TensorFlow to build it")
    weights = _need(SHARED / "weights" / "squeezenet1_1-torchvision-fp16r.pth")
    from edgesqz.converters.convert import ConvertOptions, convert

    convert(ConvertOptions(
        weights=str(weights), fmt=fmt, output=str(target), ptq=ptq, head=head, edgetpu=edgetpu,
        calib=str(_need(SHARED / "data" / "imagenet-sample-1000")) if fmt == "int8" else None,
        calib_count=CALIB_FOR_TESTS, labels=str(_need(SHARED / "data" / "labels" / "imagenet_class_index.json")),
    ))
    return target


@pytest.fixture(scope="session")
def int8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SqueezeNet 1.1, real weights, full int8, calibrated on 48 shared ImageNet photos; the default
    (standard) contract: uint8 pixels in, one [1, 1000] float32 vector of probabilities out."""
    return _build_model(tmp_path_factory, "int8")


@pytest.fixture(scope="session")
def int8_plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same, quantised with the converter's min/max alone, with int8 logits out (MEAN inside the model)."""
    return _build_model(tmp_path_factory, "int8", ptq="plain", head="logits")


@pytest.fixture(scope="session")
def int8_class_map_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with edgesqz 0.x's contract: int8 input (pixel - 128), int8 class map [1, 13, 13, 1000] out."""
    return _build_model(tmp_path_factory, "int8", head="class_map")


@pytest.fixture(scope="session")
def int8_edgetpu_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The standard int8 model in the Edge TPU's form (``convert --edgetpu``: one QUANTIZE at the input)."""
    return _build_model(tmp_path_factory, "int8", edgetpu=True)


@pytest.fixture(scope="session")
def float_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SqueezeNet 1.1, real weights, float32."""
    return _build_model(tmp_path_factory, "float32")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests in test_device_*.py are device tests: scripts/test.sh runs them again without TF/torch."""
    for item in items:
        if item.path.name.startswith("test_device_"):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def int4_model(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A CIFAR SqueezeNet (10 classes, Keras random init) at ``convert --int8 --weight-bits 4``: packed INT4
    filters in every convolution but the first, calibrated on 48 real 32x32 crops. Small and quick to build;
    the device tests reuse it from EDGESQZ_TEST_MODELS."""
    target = _test_models_dir(tmp_path_factory) / "squeezenet_cifar10-int8-w4.tflite"
    if target.exists():
        return target
    try:
        import keras
    except ImportError:
        pytest.skip(f"no prebuilt {target.name} in EDGESQZ_TEST_MODELS and no TensorFlow to build it")
    crops32 = request.getfixturevalue("crops32")
    from edgesqz.converters.convert import ConvertOptions, convert
    from edgesqz.squeezenet import SqueezeNet

    keras.utils.set_random_seed(0)
    weights = tmp_path_factory.mktemp("int4") / "cifar10.keras"
    SqueezeNet("cifar", classes=10, classifier_activation=None).save(weights)
    convert(ConvertOptions(weights=str(weights), fmt="int8", weight_bits=4, output=str(target),
                           calib=str(crops32 / "train"), calib_count=CALIB_FOR_TESTS))
    return target
