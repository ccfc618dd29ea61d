"""Keras SqueezeNet == PyTorch SqueezeNet, on random weights and on the real torchvision weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("keras")

from torch_squeezenet import SqueezeNet as TorchSqueezeNet  # noqa: E402

from edgesqz.converters.torch_import import load_state_dict, state_dict_to_keras  # noqa: E402
from edgesqz.imaging import IMAGENET_MEAN, IMAGENET_STD, list_images, preprocess, read_image  # noqa: E402
from edgesqz.squeezenet import SqueezeNet  # noqa: E402


def _normalise(rgb: np.ndarray) -> np.ndarray:
    return ((rgb.astype(np.float32) / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32))


def _torch_logits(model: torch.nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def _assert_parity(keras_out: np.ndarray, torch_out: np.ndarray) -> float:
    scale = float(np.ptp(torch_out))
    diff = float(np.abs(keras_out - torch_out).max())
    assert diff <= 1e-4 * scale, (diff, scale)
    np.testing.assert_array_equal(keras_out.argmax(1), torch_out.argmax(1))
    return diff / scale


@pytest.mark.parametrize("version", ["1_0", "1_1"])
@pytest.mark.parametrize("size", [224, 227, 113, 301])
def test_random_weights_parity(version: str, size: int) -> None:
    torch.manual_seed(size)
    reference = TorchSqueezeNet(version).eval()
    model = SqueezeNet(version, input_shape=(size, size, 3), classifier_activation=None)
    state_dict_to_keras({k: v.numpy() for k, v in reference.state_dict().items()}, model, version=version)
    x = np.random.default_rng(size).normal(size=(3, size, size, 3)).astype(np.float32)
    _assert_parity(model(x, training=False).numpy(), _torch_logits(reference, x))


def test_real_weights_parity_on_real_photos(real_weights: Path, photos: list[Path], imagenet_sample: Path) -> None:
    state = load_state_dict(real_weights)
    reference = TorchSqueezeNet("1_1")
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    reference.eval()
    model = SqueezeNet("1_1", classifier_activation=None)
    state_dict_to_keras(state, model, version="1_1")
    files = photos + list_images(imagenet_sample)[::25]  # 4 photos + 40 ImageNet photos
    x = np.stack([_normalise(preprocess(read_image(f))) for f in files])
    keras_out = model.predict(x, batch_size=16, verbose=0)
    torch_out = _torch_logits(reference, x)
    _assert_parity(keras_out, torch_out)
    # and the model is the real one: chelsea is a cat, coffee is espresso (torchvision order)
    top1 = dict(zip([f.name for f in files], keras_out.argmax(1), strict=True))
    assert top1["coffee.png"] == 967  # espresso
    assert top1["chelsea.png"] in (281, 282, 285)  # tabby / tiger cat / Egyptian cat
