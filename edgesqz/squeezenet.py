"""SqueezeNet 1.0 and 1.1 in Keras 3, layer for layer as torchvision builds them.

Iandola et al., "SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and <0.5MB model
size" (2016). Layer names equal torchvision's module names (``features.3.squeeze``,
``classifier.1``, ...), so PyTorch weights map one-to-one.

Options beyond torchvision, from the paper:

- ``batch_norm=True``: conv -> BatchNorm -> ReLU in the squeeze and both expand layers (the Fire
  variant used to train on small images from scratch).
- ``bypass="simple"``: identity shortcut around every Fire module whose input and output widths
  match; ``bypass="complex"`` adds a 1x1 convolution shortcut around the others too.

torchvision pools with ``MaxPool2d(3, 2, ceil_mode=True)``; :class:`keras.layers.MaxPooling2D`
rounds down. :func:`_ceil_max_pool` emulates ceil mode exactly for every input size.
"""

from __future__ import annotations

from typing import Any, Literal

import keras
from keras import layers

from edgesqz.errors import EdgesqzError

Version = Literal["1_0", "1_1"]
VERSIONS: tuple[str, ...] = ("1_0", "1_1")

# (index in torchvision's `features`, kind, args). "fire" args: squeeze, expand1x1, expand3x3.
_FEATURES: dict[str, list[tuple[int, str, tuple[int, ...]]]] = {
    "1_0": [
        (0, "conv", (96, 7, 2)),
        (2, "pool", ()),
        (3, "fire", (16, 64, 64)),
        (4, "fire", (16, 64, 64)),
        (5, "fire", (32, 128, 128)),
        (6, "pool", ()),
        (7, "fire", (32, 128, 128)),
        (8, "fire", (48, 192, 192)),
        (9, "fire", (48, 192, 192)),
        (10, "fire", (64, 256, 256)),
        (11, "pool", ()),
        (12, "fire", (64, 256, 256)),
    ],
    "1_1": [
        (0, "conv", (64, 3, 2)),
        (2, "pool", ()),
        (3, "fire", (16, 64, 64)),
        (4, "fire", (16, 64, 64)),
        (5, "pool", ()),
        (6, "fire", (32, 128, 128)),
        (7, "fire", (32, 128, 128)),
        (8, "pool", ()),
        (9, "fire", (48, 192, 192)),
        (10, "fire", (48, 192, 192)),
        (11, "fire", (64, 256, 256)),
        (12, "fire", (64, 256, 256)),
    ],
}


def _check_version(version: str) -> str:
    version = str(version).replace(".", "_")
    if version not in VERSIONS:
        raise EdgesqzError(f"unknown SqueezeNet version {version!r}; use one of {', '.join(VERSIONS)}")
    return version


def _pool_out(size: int) -> int:
    """Output size of torchvision's MaxPool2d(3, 2, ceil_mode=True)."""
    return -(-(size - 3) // 2) + 1


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def min_input_size(version: str) -> int:
    """Smallest square input for which every layer has a non-empty output."""
    version = _check_version(version)
    for size in range(1, 1000):
        if feature_map_size(version, size) >= 1:
            return size
    raise AssertionError("unreachable")


def feature_map_size(version: str, size: int) -> int:
    """Spatial size of the last Fire module's output for a ``size`` x ``size`` input (<= 0: too small)."""
    version = _check_version(version)
    for _, kind, args in _FEATURES[version]:
        if size < 1:
            return size
        if kind == "conv":
            size = _conv_out(size, args[1], args[2])
        elif kind == "pool":
            size = _pool_out(size) if size >= 3 else 0
    return size


def _ceil_max_pool(x: Any, name: str) -> Any:
    """MaxPool2d(3, 2, ceil_mode=True) on a non-negative input (it always follows a ReLU).

    Ceil mode differs from floor mode when (n - 3) is odd (n even): one more window, which hangs
    one pixel over the bottom/right edge. For even n, TF's "same" padding with a 3x3 window and
    stride 2 puts exactly that one pixel at the end, so it equals ceil mode with no extra op; for
    odd n "valid" is already ceil mode. When the size is not known when the model is built, pad
    one zero row/column at the bottom/right and pool "valid": that equals ceil mode for every n,
    and zeros never win a max over ReLU outputs.
    """
    h, w = x.shape[1], x.shape[2]
    if h is not None and w is not None and h % 2 == w % 2:
        padding = "same" if h % 2 == 0 else "valid"
        return layers.MaxPooling2D(3, 2, padding=padding, name=name)(x)
    x = layers.ZeroPadding2D(((0, 1), (0, 1)), name=f"{name}.pad")(x)
    return layers.MaxPooling2D(3, 2, padding="valid", name=name)(x)


def _conv_relu(x: Any, filters: int, kernel: int, name: str, act_name: str, *, batch_norm: bool,
               padding: str = "valid", strides: int = 1, kernel_initializer: Any = "he_uniform") -> Any:
    x = layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=not batch_norm,
                      kernel_initializer=kernel_initializer, name=name)(x)
    if batch_norm:
        x = layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=act_name)(x)


def fire(x: Any, squeeze: int, expand1x1: int, expand3x3: int, name: str, *, batch_norm: bool = False) -> Any:
    """A Fire module: 1x1 squeeze, then 1x1 and 3x3 expand, concatenated on channels."""
    s = _conv_relu(x, squeeze, 1, f"{name}.squeeze", f"{name}.squeeze_activation", batch_norm=batch_norm)
    e1 = _conv_relu(s, expand1x1, 1, f"{name}.expand1x1", f"{name}.expand1x1_activation", batch_norm=batch_norm)
    e3 = _conv_relu(s, expand3x3, 3, f"{name}.expand3x3", f"{name}.expand3x3_activation",
                    batch_norm=batch_norm, padding="same")
    return layers.Concatenate(axis=-1, name=name)([e1, e3])


def SqueezeNet(
    version: Version = "1_1",
    include_top: bool = True,
    weights: str | None = None,
    input_tensor: Any = None,
    input_shape: tuple[int | None, int | None, int] | None = None,
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    *,
    batch_norm: bool = False,
    bypass: Literal["simple", "complex"] | None = None,
    dropout: float = 0.5,
    name: str | None = None,
) -> keras.Model:
    """Build SqueezeNet ``version`` ("1_0" or "1_1") as a Keras functional model.

    Args:
        include_top: keep the classifier (dropout, 1x1 conv to ``classes``, ReLU, global average pool).
        weights: None (random init), "imagenet" (torchvision's ImageNet weights, downloaded once),
            a path to a torchvision-style ``state_dict`` (``.pth``) or Keras weights (``.weights.h5``).
        input_tensor / input_shape: as in ``keras.applications``; default (224, 224, 3). Inputs are
            ImageNet-normalised float RGB, like torchvision's (see ``edgesqz.converters.export``
            for models that take raw pixels).
        pooling: with ``include_top=False``: None (feature map), "avg" or "max".
        classifier_activation: applied to the logits; None returns torchvision's logits.
        batch_norm: Fire modules with batch normalisation.
        bypass: None, "simple" or "complex" shortcuts around Fire modules (paper, section 6).
    """
    version = _check_version(version)
    if bypass not in (None, "simple", "complex"):
        raise EdgesqzError(f"bypass must be None, 'simple' or 'complex', not {bypass!r}")
    if pooling not in (None, "avg", "max"):
        raise EdgesqzError(f"pooling must be None, 'avg' or 'max', not {pooling!r}")
    if weights == "imagenet" and include_top and classes != 1000:
        raise EdgesqzError("weights='imagenet' with include_top=True needs classes=1000")
    if weights is not None and (batch_norm or bypass) and not str(weights).endswith(".h5"):
        raise EdgesqzError("ImageNet/PyTorch weights exist only for the plain model (no batch_norm, no bypass)")

    if input_tensor is not None:
        img_input = input_tensor if keras.backend.is_keras_tensor(input_tensor) else layers.Input(tensor=input_tensor)
        input_shape = tuple(img_input.shape[1:])
    else:
        if input_shape is None:
            input_shape = (224, 224, 3)
        img_input = layers.Input(shape=input_shape, name="image")
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise EdgesqzError(f"input_shape must be (height, width, 3), got {input_shape}")
    smallest = min_input_size(version)
    for dim in input_shape[:2]:
        if dim is not None and dim < smallest:
            raise EdgesqzError(
                f"input size {dim} is too small for SqueezeNet {version}: it needs at least "
                f"{smallest}x{smallest} pixels"
            )
    if include_top and classes < 1:
        raise EdgesqzError(f"classes must be >= 1, got {classes}")

    x = img_input
    for index, kind, args in _FEATURES[version]:
        name_ = f"features.{index}"
        if kind == "conv":
            filters, kernel, stride = args
            x = _conv_relu(x, filters, kernel, name_, f"features.{index + 1}", batch_norm=batch_norm, strides=stride)
        elif kind == "pool":
            x = _ceil_max_pool(x, name_)
        else:
            squeeze, e1, e3 = args
            out = fire(x, squeeze, e1, e3, name_, batch_norm=batch_norm)
            if bypass is not None:
                if x.shape[-1] == e1 + e3:
                    out = layers.Add(name=f"{name_}.bypass_add")([out, x])
                elif bypass == "complex":
                    shortcut = layers.Conv2D(e1 + e3, 1, name=f"{name_}.bypass")(x)
                    out = layers.Add(name=f"{name_}.bypass_add")([out, shortcut])
            x = out

    if include_top:
        x = layers.Dropout(dropout, name="classifier.0")(x)
        x = layers.Conv2D(classes, 1, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
                          name="classifier.1")(x)
        x = layers.ReLU(name="classifier.2")(x)
        x = layers.GlobalAveragePooling2D(name="classifier.3")(x)
        if classifier_activation is not None:
            x = layers.Activation(classifier_activation, name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="pool")(x)

    inputs = keras.utils.get_source_inputs(input_tensor) if input_tensor is not None else img_input
    variant = "_bn" if batch_norm else ""
    variant += f"_{bypass}_bypass" if bypass else ""
    model = keras.Model(inputs, x, name=name or f"squeezenet{version}{variant}")

    if weights is not None:
        from edgesqz.weights import load_weights_into

        load_weights_into(model, weights, version=version)
    return model


def SqueezeNet1_0(**kwargs: Any) -> keras.Model:
    return SqueezeNet("1_0", **kwargs)


def SqueezeNet1_1(**kwargs: Any) -> keras.Model:
    return SqueezeNet("1_1", **kwargs)
