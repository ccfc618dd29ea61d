"""pytorch-cifar100's SqueezeNet end to end: exact Keras port, exact float TFLite, int8 with the gate, the device.

The PyTorch reference (tests/torch_squeezenet.py) is written from the network's description with
the module names its checkpoints carry; its batch norms get non-trivial statistics. A short real
training run in PyTorch on real photos (three coarse ImageNet groups at 32x32) gives a trained
checkpoint for the int8 checks, saved the way pytorch-cifar100 saves them (``module.`` prefixed
when trained under DataParallel).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tensorflow")

from torch_squeezenet import CifarSqueezeNet, randomize_batch_norm  # noqa: E402

from edgesqz.architecture import CIFAR100_MEAN, CIFAR100_STD  # noqa: E402
from edgesqz.imaging import list_images, preprocess, read_image  # noqa: E402

SIZE = 32
# pytorch-cifar100's conf/global_settings.py, written out here so the PyTorch side does not borrow edgesqz's copy
TRAIN_MEAN = (0.5070751592371323, 0.48654887331495095, 0.4409178433670343)
TRAIN_STD = (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)


def edgesqz(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesqz", *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy())


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode not in (0, None) and result.returncode < 128, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _pixels(files: list[Path]) -> np.ndarray:
    """Real photos as the device sees them for a 32x32 CIFAR model (whole centre square, resized)."""
    return np.stack([preprocess(read_image(f), SIZE, 1.0) for f in files])


def _normalise(pixels: np.ndarray) -> np.ndarray:
    """transforms.ToTensor() then transforms.Normalize(CIFAR100_TRAIN_MEAN, CIFAR100_TRAIN_STD), in float32."""
    return ((pixels.astype(np.float32) / 255.0 - np.array(TRAIN_MEAN, np.float32))
            / np.array(TRAIN_STD, np.float32))


def _torch_logits(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(_normalise(pixels).transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return model.eval()(x).numpy()


@pytest.fixture(scope="module")
def real_pixels(photos: list[Path], imagenet_sample: Path) -> np.ndarray:
    files = photos + list_images(imagenet_sample)[::40]
    extremes = np.stack([np.zeros((SIZE, SIZE, 3), np.uint8), np.full((SIZE, SIZE, 3), 255, np.uint8)])
    return np.concatenate([_pixels(files), extremes])  # black and white images: the borders at their worst


def _save(model: torch.nn.Module, path: Path, *, data_parallel: bool) -> Path:
    state = model.state_dict()
    if data_parallel:  # torch.save(nn.DataParallel(net).state_dict(), ...)
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save(state, path)
    return path


def test_default_normalisation_is_pytorch_cifar100s_to_full_precision() -> None:
    from edgesqz.architecture import SQUEEZENET_CIFAR

    assert CIFAR100_MEAN == TRAIN_MEAN and CIFAR100_STD == TRAIN_STD
    pre = SQUEEZENET_CIFAR.preprocessing
    assert pre.mean == TRAIN_MEAN and pre.std == TRAIN_STD


def _random_reference(classes: int, seed: int, pixels: np.ndarray) -> torch.nn.Module:
    """A randomly initialised CIFAR SqueezeNet whose batch norms hold the statistics of real images."""
    torch.manual_seed(seed)
    inputs = torch.from_numpy(np.ascontiguousarray(_normalise(pixels).transpose(0, 3, 1, 2)))
    return randomize_batch_norm(CifarSqueezeNet(classes), seed=seed, inputs=inputs)


def _check_exact(path: Path, reference: torch.nn.Module, classes: int, pixels: np.ndarray, tmp_path: Path) -> None:
    """Keras from the file == PyTorch, and the float TFLite model `convert` writes == PyTorch (< 1e-4)."""
    from edgesqz.converters.torch_import import detect, load_state_dict, state_dict_to_keras
    from edgesqz.evaluate import tflite_outputs
    from edgesqz.squeezenet import SqueezeNet

    expected = _torch_logits(reference, pixels)
    assert np.ptp(expected.argmax(1)) > 0 or classes == 1, "a reference whose top-1 ignores its input tests nothing"

    state = load_state_dict(path)
    found = detect(state)
    assert found is not None and found.arch.name == "squeezenet_cifar" and found.classes == classes
    model = SqueezeNet("cifar", classes=classes, classifier_activation=None)
    state_dict_to_keras(state, model)
    keras_out = model(_normalise(pixels), training=False).numpy()
    assert np.abs(keras_out - expected).max() < 1e-4

    out = tmp_path / "cifar-float32-logits.tflite"
    result = edgesqz("convert", "--weights", str(path), "--float32", "--head", "logits", "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CIFAR SqueezeNet" in result.stderr and f"{classes} classes" in result.stderr
    tflite = tflite_outputs(out.read_bytes(), pixels)
    assert np.abs(tflite - expected).max() < 1e-4
    np.testing.assert_array_equal(tflite.argmax(1), expected.argmax(1))


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(("classes", "data_parallel"), [(100, False), (100, True), (7, False)])
def test_random_checkpoint_is_exact_in_keras_and_float_tflite(tmp_path: Path, real_pixels: np.ndarray, classes: int,
                                                              data_parallel: bool) -> None:
    reference = _random_reference(classes, classes, real_pixels)
    path = _save(reference, tmp_path / "cifar.pth", data_parallel=data_parallel)
    _check_exact(path, reference, classes, real_pixels, tmp_path)


def test_trained_checkpoint_is_exact_too(trained_pth: Path, real_pixels: np.ndarray, tmp_path: Path) -> None:
    from edgesqz.converters.torch_import import load_state_dict
    from edgesqz.evaluate import tflite_outputs

    reference = CifarSqueezeNet(8)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in load_state_dict(trained_pth).items()})
    _check_exact(trained_pth, reference.eval(), 8, real_pixels, tmp_path)
    # and the default (standard) float model: its probabilities are PyTorch's softmax
    out = tmp_path / "cifar-float32.tflite"
    result = edgesqz("convert", "--weights", str(trained_pth), "--float32", "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = _softmax(_torch_logits(reference, real_pixels).astype(np.float64))
    assert np.abs(tflite_outputs(out.read_bytes(), real_pixels) - expected).max() < 1e-5


def test_padded_stem_is_why_the_fold_needs_centring(real_pixels: np.ndarray) -> None:
    """Folding the mean into the bias (exact for torchvision's unpadded stems) is wrong at this stem's borders."""
    import copy

    from edgesqz.converters.export import pixel_model
    from edgesqz.converters.torch_import import state_dict_to_keras
    from edgesqz.squeezenet import SqueezeNet

    reference = _random_reference(10, 1, real_pixels)
    expected = _torch_logits(reference, real_pixels)
    model = SqueezeNet("cifar", classes=10, classifier_activation=None)
    state_dict_to_keras({k: v.numpy() for k, v in reference.state_dict().items()}, model)
    exact = pixel_model(model, size=SIZE)
    assert "center" in [layer.name for layer in exact.layers]
    got = np.concatenate([exact(real_pixels[i:i + 1].astype(np.float32)).numpy() for i in range(len(real_pixels))])
    assert np.abs(got - expected).max() < 1e-4
    # the naive fold on the PyTorch reference: w / (255 std) and b - sum(w mean / std), raw pixels zero-padded
    naive = copy.deepcopy(reference)
    stem = naive.stem[0]
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        stem.bias -= (stem.weight * mean / std).sum(dim=(1, 2, 3))
        stem.weight /= 255.0 * std
        raw = naive(torch.from_numpy(real_pixels.astype(np.float32).transpose(0, 3, 1, 2).copy())).numpy()
    assert np.abs(raw - expected).max() > 1e-2


def test_onnx2tf_route_takes_the_cifar_network_too(real_pixels: np.ndarray, tmp_path: Path) -> None:
    """The second, independent route: PyTorch (built from the same description) -> ONNX -> onnx2tf, exact."""
    import importlib.util

    if importlib.util.find_spec("onnx2tf") is None:
        pytest.skip("onnx2tf is not installed")
    from edgesqz.converters import onnx_route
    from edgesqz.evaluate import tflite_outputs

    reference = _random_reference(10, 3, real_pixels)
    state = {k: v.numpy().astype(np.float32) for k, v in reference.state_dict().items()}
    data = onnx_route.convert_via_onnx2tf(state, version="cifar", size=SIZE, fmt="float32", calib_images=None,
                                          workdir=tmp_path / "work", log_path=tmp_path / "onnx2tf.log")
    expected = _torch_logits(reference, real_pixels)
    got = tflite_outputs(data, real_pixels)
    assert np.abs(got - expected).max() < 1e-4


# --------------------------------------------------------------------------- a trained checkpoint


def _train_torch(train_dir: Path, classes: list[str], *, epochs: int = 12, seed: int = 0) -> torch.nn.Module:
    """A short pytorch-cifar100-style run: SGD with momentum, weight decay, random crops of the padded image, flips."""
    files, targets = [], []
    for i, name in enumerate(classes):
        found = list_images(train_dir / name)
        files += found
        targets += [i] * len(found)
    x = torch.from_numpy(_normalise(_pixels(files)).transpose(0, 3, 1, 2).copy())
    y = torch.tensor(targets)
    torch.manual_seed(seed)
    net = CifarSqueezeNet(len(classes))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 32):
            idx = order[start:start + 32]
            batch = torch.nn.functional.pad(x[idx], (4, 4, 4, 4))
            dy, dx = torch.randint(0, 9, (2,), generator=gen).tolist()
            batch = batch[:, :, dy:dy + SIZE, dx:dx + SIZE]
            if torch.rand((), generator=gen) < 0.5:
                batch = batch.flip(3)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(batch), y[idx]).backward()
            opt.step()
        sched.step()
    return net.eval()


@pytest.fixture(scope="module")
def trained_pth(crops32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    classes = (crops32 / "labels.txt").read_text().split()
    net = _train_torch(crops32 / "train", classes)
    return _save(net, tmp_path_factory.mktemp("cifar") / "squeezenet-cifar-crops.pth", data_parallel=True)


def test_trained_checkpoint_int8_with_gate_then_device(crops32: Path, trained_pth: Path, tmp_path: Path) -> None:
    out = tmp_path / "cifar-int8.tflite"
    result = edgesqz("convert", "--weights", str(trained_pth), "--int8", "--calib", str(crops32 / "train"),
                     "--labels", str(crops32 / "labels.txt"), "--check", str(crops32 / "test"), "--max-drop", "5",
                     "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    rep = json.loads(result.stdout)
    acc = rep["accuracy"]
    from edgesqz.converters.standard_head import standard_classifier_problems

    assert rep["architecture"] == "squeezenet_cifar" and rep["input_size"] == SIZE
    assert standard_classifier_problems(out.read_bytes()) == []  # uint8 in, int8 body, [1, 8] probabilities out
    assert acc["labelled_by"] == "folders" and acc["images"] == 128
    # the float model learned (8 classes, 12.5 % by chance); int8 must follow it closely
    assert acc["reference"]["top1"] > 60, acc
    assert acc["top1_agreement"] >= 90, acc

    from edgesqz.tflite_metadata import read_metadata

    pre = read_metadata(out.read_bytes()).info["preprocessing"]
    assert pre["size"] == SIZE and pre["crop_fraction"] == 1.0
    assert pre["mean"] == list(CIFAR100_MEAN) and pre["std"] == list(CIFAR100_STD)

    names = set((crops32 / "labels.txt").read_text().split())
    images = [sorted((crops32 / "test" / name).iterdir())[0] for name in sorted(names)]
    result = edgesqz("classify", "--model", str(out), *map(str, images), "--json", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(names) and all({p["label"] for p in r["top_k"]} <= names for r in rows)
    right = sum(r["top_k"][0]["label"] == Path(r["source"]).parent.name for r in rows)
    assert right >= len(rows) // 2, rows  # the user's class names, on the right images


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, crops32: Path) -> None:
    out = tmp_path / "m.tflite"
    torch.manual_seed(0)
    state = randomize_batch_norm(CifarSqueezeNet(100)).state_dict()

    unknown = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, unknown)
    line = one_error_line(edgesqz("convert", "--weights", str(unknown), "--float32", "-o", str(out)))
    assert "not a SqueezeNet state_dict" in line and "stem.0.weight" in line and "features.0.weight" in line

    missing = tmp_path / "missing-bn.pth"
    torch.save({k: v for k, v in state.items() if k != "fire3.expand_3x3.1.running_var"}, missing)
    line = one_error_line(edgesqz("convert", "--weights", str(missing), "--float32", "-o", str(out)))
    assert "missing fire3.expand_3x3.1.running_var" in line

    full = tmp_path / "cifar100.pth"
    torch.save(state, full)
    line = one_error_line(edgesqz("convert", "--weights", str(full), "--float32", "--labels",
                                  str(crops32 / "labels.txt"), "-o", str(out)))
    assert "8 entries" in line and "100 classes" in line

    line = one_error_line(edgesqz("convert", "--weights", str(full), "--float32", "--input-size", "224", "-o",
                                  str(out)))
    assert "--input-size 224" in line and "32x32" in line

    line = one_error_line(edgesqz("convert", "--weights", str(full), "--float32", "--arch", "1_1", "-o", str(out)))
    assert "CIFAR SqueezeNet" in line and "--arch cifar" in line

    diverged = tmp_path / "diverged.pth"
    torch.save({**state, "fire5.expand_3x3.0.weight": state["fire5.expand_3x3.0.weight"] * float("nan")}, diverged)
    line = one_error_line(edgesqz("convert", "--weights", str(diverged), "--float32", "-o", str(out)))
    assert "NaN or infinite" in line and "fire5.expand_3x3.0.weight" in line
    assert not out.exists() and not list(tmp_path.glob("*.tflite"))
