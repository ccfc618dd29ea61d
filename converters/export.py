"""Keras SqueezeNet -> TFLite that takes RGB pixels (0..255) and does the normalisation inside.

Formats:

- ``float32``: the reference.
- ``float16``: weights stored as float16 (dequantised at load; float maths).
- ``dynamic``: int8 weights, float activations (dynamic-range). Never called "int8".
- ``int8``: full integer. int8 (or uint8) input and output, only int8/int32 tensors inside,
  static batch 1, calibrated on real images: what the Edge TPU compiler accepts.

The training normalisation ``(pixel / 255 - mean) / std`` goes into the model in one of two places
(``normalization``):

- ``"fold"`` (default): into the stem convolution's weights. Without padding (torchvision's
  stems) every output sees only real pixels and the whole fold is exact:
  ``w' = w / (255 std_c)``, ``b' = b - sum(w * mean_c / std_c)``, no extra op on the device.
  A padded stem (the CIFAR network's) pads the *normalised* image with zeros, i.e. with the
  pixel value ``255 mean_c``; there the model first subtracts ``255 mean_c`` per channel (one ADD
  of a 3-value constant, the ``center`` layer) and the stem takes ``w' = w / (255 std_c)`` with its
  bias unchanged, which is exact at the borders too.
- ``"layer"``: a separate ``(x / 255 - mean) / std`` layer in front of the network.

Batch norm is folded into the convolution before it (exact up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

import keras
import numpy as np

from edgesqz.architecture import Architecture
from edgesqz.converters import FORMATS
from edgesqz.errors import EdgesqzError

Format = Literal["float32", "float16", "dynamic", "int8"]
Normalization = Literal["fold", "layer"]


def pixel_model(
    model: keras.Model,
    *,
    size: int,
    normalization: Normalization = "fold",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    head: Literal["logits", "softmax"] = "logits",
    arch: Architecture | None = None,
) -> keras.Model:
    """Rebuild ``model`` (a SqueezeNet with a top) for batch-1 ``size`` x ``size`` RGB pixel input.

    The result is inference-only (dropout removed, batch norms folded into their convolutions)
    and shares no variables with ``model``; bypasses stay. ``mean``/``std`` default to the
    architecture's training preprocessing (``arch``: default, the one ``model`` was built from).
    """
    from edgesqz.squeezenet import SqueezeNet, architecture_of

    arch = arch or architecture_of(model)
    mean_a = np.asarray(arch.preprocessing.mean if mean is None else mean, np.float64)
    std_a = np.asarray(arch.preprocessing.std if std is None else std, np.float64)
    if mean_a.shape != (3,) or std_a.shape != (3,) or np.any(std_a <= 0):
        raise EdgesqzError(f"mean and std need 3 values each, std > 0 (got {mean_a.tolist()} and {std_a.tolist()})")
    head_name = arch.naming.head("conv")
    classes = model.get_layer(head_name).filters
    inputs = keras.Input(shape=(size, size, 3), batch_size=1, name="image", dtype="float32")
    x = inputs
    fold = normalization == "fold"
    if normalization == "layer":
        x = keras.layers.Rescaling((1.0 / (255.0 * std_a)).astype(np.float32),
                                   offset=(-mean_a / std_a).astype(np.float32), name="normalize")(x)
    elif not fold:
        raise EdgesqzError(f"normalization must be 'fold' or 'layer', not {normalization!r}")
    elif not arch.is_exact_fold():
        x = keras.layers.Rescaling(1.0, offset=(-255.0 * mean_a).astype(np.float32), name="center")(x)
    body = SqueezeNet(arch.variant(batch_norm=False), input_tensor=x, classes=classes, classifier_activation=None,
                      dropout=0.0)
    bn_after = _batch_norm_after(model)
    for layer in body.layers:
        if layer.weights:
            layer.set_weights(_folded_weights(model.get_layer(layer.name), bn_after.get(layer.name)))
    if fold:
        first = body.get_layer(arch.naming.stem("conv"))
        kernel, bias = first.get_weights()  # HWIO
        k64 = kernel.astype(np.float64)
        new_kernel = k64 / (255.0 * std_a)[None, None, :, None]
        new_bias = bias.astype(np.float64)
        if arch.is_exact_fold():
            new_bias = new_bias - np.einsum("hwio,i->o", k64, mean_a / std_a)
        first.set_weights([new_kernel.astype(np.float32), new_bias.astype(np.float32)])
    y = body.output
    if head == "softmax":
        y = keras.layers.Softmax(name="probabilities")(y)
    out = keras.Model(inputs, y, name=f"{arch.variant(batch_norm=False).name}_pixels")
    out._edgesqz_architecture = arch.variant(batch_norm=False)
    return out


def _batch_norm_after(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """Conv layer name -> the BatchNormalization that reads its output."""
    found = {}
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            producer = layer.input._keras_history.operation
            if type(producer).__name__ == "Conv2D":
                found[producer.name] = layer
    return found


def _folded_weights(layer: keras.layers.Layer, bn: keras.layers.Layer | None) -> list[np.ndarray]:
    """A layer's weights; a conv followed by batch norm gets the norm folded in (float64 maths)."""
    if bn is None:
        return layer.get_weights()
    weights = layer.get_weights()
    kernel = weights[0].astype(np.float64)
    gamma, beta, mean, var = (w.astype(np.float64) for w in bn.get_weights())
    scale = gamma / np.sqrt(var + bn.epsilon)
    bias = weights[1].astype(np.float64) if layer.use_bias else np.zeros_like(beta)
    return [(kernel * scale).astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)]


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
