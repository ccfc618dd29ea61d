"""Keras SqueezeNet -> TFLite that takes RGB pixels (0..255) and does the normalisation inside.

Formats:

- ``float32``: the reference.
- ``float16``: weights stored as float16 (dequantised at load; float maths).
- ``dynamic``: int8 weights, float activations (dynamic-range). Never called "int8".
- ``int8``: full integer. int8 (or uint8) input and output, only int8/int32 tensors inside,
  static batch 1, calibrated on real images: what the Edge TPU compiler accepts.

The ImageNet mean/std go into the model in one of two places (``normalization``):

- ``"fold"`` (default): into the first convolution's weights and bias. SqueezeNet's first conv
  has no padding, so every output sees only real pixels and the fold is exact:
  ``w' = w / (255 std_c)``, ``b' = b - sum(w * mean_c / std_c)``. No extra op on the device.
- ``"layer"``: a separate ``(x / 255 - mean) / std`` layer in front of the network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import keras
import numpy as np

from edgesqz.converters import FORMATS
from edgesqz.errors import EdgesqzError
from edgesqz.imaging import IMAGENET_MEAN, IMAGENET_STD

Format = Literal["float32", "float16", "dynamic", "int8"]
Normalization = Literal["fold", "layer"]


def pixel_model(
    model: keras.Model,
    *,
    size: int,
    normalization: Normalization = "fold",
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    head: Literal["logits", "softmax"] = "logits",
) -> keras.Model:
    """Rebuild ``model`` (a SqueezeNet with a top) for batch-1 ``size`` x ``size`` RGB pixel input.

    The result is inference-only (dropout removed, batch norms folded into their convolutions)
    and shares no variables with ``model``. Bypass variants keep their shortcuts.
    """
    from edgesqz.squeezenet import SqueezeNet

    version = _version_of(model)
    classes = model.get_layer("classifier.1").filters
    inputs = keras.Input(shape=(size, size, 3), batch_size=1, name="image", dtype="float32")
    x = inputs
    if normalization == "layer":
        mean_a = np.asarray(mean, np.float32)
        std_a = np.asarray(std, np.float32)
        x = keras.layers.Rescaling(1.0 / (255.0 * std_a), offset=-mean_a / std_a, name="normalize")(x)
    elif normalization != "fold":
        raise EdgesqzError(f"normalization must be 'fold' or 'layer', not {normalization!r}")
    names = {layer.name for layer in model.layers}
    bypass = ("complex" if any(n.endswith(".bypass") for n in names)
              else "simple" if any(n.endswith(".bypass_add") for n in names) else None)
    body = SqueezeNet(version, input_tensor=x, classes=classes, classifier_activation=None, dropout=0.0,
                      bypass=bypass)
    for layer in body.layers:
        if layer.weights:
            layer.set_weights(_folded_weights(model, layer.name, names))
    if normalization == "fold":
        first = body.get_layer("features.0")
        kernel, bias = first.get_weights()  # HWIO
        mean_a = np.asarray(mean, np.float64)
        std_a = np.asarray(std, np.float64)
        k64 = kernel.astype(np.float64)
        new_kernel = k64 / (255.0 * std_a)[None, None, :, None]
        new_bias = bias.astype(np.float64) - np.einsum("hwio,i->o", k64, mean_a / std_a)
        first.set_weights([new_kernel.astype(np.float32), new_bias.astype(np.float32)])
    y = body.output
    if head == "softmax":
        y = keras.layers.Softmax(name="probabilities")(y)
    return keras.Model(inputs, y, name=f"{model.name}_pixels")


def _folded_weights(model: keras.Model, name: str, names: set[str]) -> list[np.ndarray]:
    """Weights of layer ``name``; a conv followed by BatchNormalization (``name_bn``) gets the BN folded in."""
    layer = model.get_layer(name)
    if f"{name}_bn" not in names:
        return layer.get_weights()
    kernel = layer.get_weights()[0].astype(np.float64)
    bn = model.get_layer(f"{name}_bn")
    gamma, beta, mean, var = (w.astype(np.float64) for w in bn.get_weights())
    scale = gamma / np.sqrt(var + bn.epsilon)
    bias = layer.get_weights()[1].astype(np.float64) if layer.use_bias else np.zeros_like(beta)
    return [(kernel * scale).astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)]


def _version_of(model: keras.Model) -> str:
    kernel = model.get_layer("features.0").kernel
    return "1_0" if kernel.shape[0] == 7 else "1_1"


def to_tflite(
    model: keras.Model,
    fmt: Format,
    *,
    representative: Callable[[], Iterable[list[np.ndarray]]] | None = None,
    io: Literal["int8", "uint8"] = "int8",
) -> bytes:
    """Convert a pixel-input Keras model to TFLite bytes in ``fmt``."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if fmt == "float32":
        pass
    elif fmt == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif fmt == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif fmt == "int8":
        if representative is None:
            raise EdgesqzError("int8 needs calibration images: pass --calib DIR_OR_VIDEO")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8 if io == "uint8" else tf.int8
        converter.inference_output_type = tf.uint8 if io == "uint8" else tf.int8
    else:
        raise EdgesqzError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    return bytes(converter.convert())


def representative_dataset(images: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    """Calibration generator over uint8 RGB images (N, S, S, 3), as float32 pixels.

    The first image gets one pixel at 0 and one at 255 so that the input's calibrated range is
    exactly 0..255 whatever the photos hold: the int8 input is then exactly ``pixel - 128``
    (scale 1, zero point -128) and uint8 input takes raw pixels.
    """
    if len(images) == 0:
        raise EdgesqzError("no calibration images")

    def gen() -> Iterator[list[np.ndarray]]:
        for i, image in enumerate(images):
            x = image[None].astype(np.float32)
            if i == 0:
                x[0, 0, 0, :] = 0.0
                x[0, -1, -1, :] = 255.0
            yield [x]

    return gen
