"""SqueezeNet in Keras 3: one builder for every architecture in :mod:`edgesqz.architecture`.

Iandola et al., "SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and <0.5MB model
size" (2016). :func:`SqueezeNet` has Keras Applications' signature (``include_top``, ``weights``,
``input_tensor``, ``input_shape``, ``pooling``, ``classes``, ``classifier_activation``) and builds
torchvision's 1.0 and 1.1, pytorch-cifar100's CIFAR network and the paper's variants from their
descriptions. Layer names are the PyTorch module names of the architecture's layout
(``features.3.squeeze``, ``classifier.1``; ``fire2.squeeze.0``, ``conv10``), so PyTorch
``state_dict`` keys map onto layers one to one.

PyTorch's ``MaxPool2d(ceil_mode=True)`` has no Keras equivalent: :func:`_max_pool` emulates it
exactly for every input size, and a padded stem convolution pads exactly as ``nn.Conv2d`` does.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from edgesqz.architecture import ALIASES, ARCH_CHOICES, Architecture, Fire, MaxPool, architecture
from edgesqz.errors import EdgesqzError

VERSIONS: tuple[str, ...] = ARCH_CHOICES  # what SqueezeNet(version=...) takes by short name
_ATTR = "_edgesqz_architecture"


def _check_version(version: str | Architecture) -> Architecture:
    if not isinstance(version, Architecture):
        key = str(version).strip()
        if key not in ALIASES and not key.startswith("squeezenet"):
            raise EdgesqzError(f"unknown SqueezeNet version {version!r}; use one of {', '.join(VERSIONS)}")
    return architecture(version)


def min_input_size(version: str | Architecture) -> int:
    """Smallest square input for which every layer has a non-empty output."""
    return _check_version(version).min_input_size()


def feature_map_size(version: str | Architecture, size: int) -> int:
    """Spatial size of the last Fire module's output for a ``size`` x ``size`` input (<= 0: too small)."""
    return _check_version(version).feature_map_size(size)


def architecture_of(model: keras.Model) -> Architecture:
    """The architecture a model was built from (kept on the model, else read from its name)."""
    arch = getattr(model, _ATTR, None)
    if isinstance(arch, Architecture):
        return arch
    name = model.name
    for suffix in ("_pixels", "_class_map"):
        while name.endswith(suffix):
            name = name[: -len(suffix)]
    try:
        return architecture(name)
    except EdgesqzError:
        raise EdgesqzError(f"model {model.name!r} was not built by edgesqz.squeezenet.SqueezeNet (or was renamed); "
                           "pass its architecture explicitly") from None


def _max_pool(x: Any, pool: MaxPool, name: str) -> Any:
    """``nn.MaxPool2d(kernel, stride, ceil_mode)`` on a non-negative input (pools always follow a ReLU).

    Floor mode is Keras' "valid". Ceil mode adds one more window where ``(n - kernel) / stride`` is
    not whole; that window hangs over the bottom/right edge. For torchvision's 3x3/2 pool on an even
    size, TF's "same" padding puts exactly that one pixel at the end (no extra op); otherwise pad
    ``stride - 1`` zeros at the bottom/right and pool "valid", which equals ceil mode for every size
    (zeros never win a max over ReLU outputs).
    """
    h, w = x.shape[1], x.shape[2]
    if not pool.ceil_mode or (h is not None and w is not None
                              and pool.out(h) == MaxPool(pool.kernel, pool.stride).out(h)
                              and pool.out(w) == MaxPool(pool.kernel, pool.stride).out(w)):
        return layers.MaxPooling2D(pool.kernel, pool.stride, padding="valid", name=name)(x)
    if (pool.kernel, pool.stride) == (3, 2) and h is not None and w is not None and h % 2 == 0 and w % 2 == 0:
        return layers.MaxPooling2D(3, 2, padding="same", name=name)(x)
    pad = pool.stride - 1
    x = layers.ZeroPadding2D(((0, pad), (0, pad)), name=f"{name}.pad")(x)
    return layers.MaxPooling2D(pool.kernel, pool.stride, padding="valid", name=name)(x)


def _conv_block(x: Any, arch: Architecture, filters: int, kernel: int, names: tuple[str, str, str], *,
                stride: int = 1, padding: int = 0, kernel_initializer: Any = "he_uniform") -> Any:
    """Conv (with nn.Conv2d's symmetric zero padding) -> [BatchNorm] -> ReLU; ``names``: conv, bn, relu."""
    conv, bn, relu = names
    mode = "valid"
    if padding:
        if stride == 1 and kernel % 2 == 1 and padding == kernel // 2:
            mode = "same"  # the same zeros, one op
        else:
            x = layers.ZeroPadding2D(padding, name=f"{conv}.pad")(x)
    x = layers.Conv2D(filters, kernel, strides=stride, padding=mode, use_bias=arch.conv_bias,
                      kernel_initializer=kernel_initializer, name=conv)(x)
    if arch.batch_norm:
        x = layers.BatchNormalization(epsilon=arch.bn_eps, momentum=0.9, name=bn)(x)
    return layers.ReLU(name=relu)(x)


def fire(x: Any, arch: Architecture, spec: Fire, name: str) -> Any:
    """A Fire module (squeeze, then both expands concatenated, 1x1 first) with its bypass, if any."""
    n = arch.naming
    s = _conv_block(x, arch, spec.squeeze, 1, tuple(n.fire(name, "squeeze", p) for p in ("conv", "bn", "relu")))
    e1 = _conv_block(s, arch, spec.expand1x1, 1,
                     tuple(n.fire(name, "expand1x1", p) for p in ("conv", "bn", "relu")))
    e3 = _conv_block(s, arch, spec.expand3x3, 3,
                     tuple(n.fire(name, "expand3x3", p) for p in ("conv", "bn", "relu")), padding=1)
    out = layers.Concatenate(axis=-1, name=name)([e1, e3])
    if spec.bypass == "identity":
        if x.shape[-1] != spec.out_channels:
            raise EdgesqzError(f"{arch.name}: {name} has an identity bypass but {x.shape[-1]} input and "
                               f"{spec.out_channels} output channels")
        out = layers.Add(name=n.bypass(name, "add"))([out, x])
    elif spec.bypass == "conv":
        shortcut = layers.Conv2D(spec.out_channels, 1, name=n.bypass(name, "conv"))(x)
        out = layers.Add(name=n.bypass(name, "add"))([out, shortcut])
    return out


def SqueezeNet(
    version: str | Architecture = "1_1",
    include_top: bool = True,
    weights: str | None = None,
    input_tensor: Any = None,
    input_shape: tuple[int | None, int | None, int] | None = None,
    pooling: str | None = None,
    classes: int | None = None,
    classifier_activation: str | None = "softmax",
    *,
    batch_norm: bool | None = None,
    bypass: str | None = None,
    dropout: float | None = None,
    name: str | None = None,
) -> keras.Model:
    """Build a SqueezeNet as a Keras functional model.

    Args:
        version: "1_0", "1_1" (torchvision), "cifar" (pytorch-cifar100's network), a variant's full
            name ("squeezenet1_0_simple_bypass") or an :class:`~edgesqz.architecture.Architecture`.
        include_top: keep the classifier (dropout, 1x1 conv to ``classes``, ReLU, global average pool).
        weights: None (random init), "imagenet" (torchvision's ImageNet weights, downloaded once),
            a path to a PyTorch ``state_dict`` (``.pth``) of this layout, or Keras weights (``.weights.h5``).
        input_tensor / input_shape: as in ``keras.applications``; default: the architecture's
            training size (224x224x3, 32x32x3 for CIFAR). Inputs are normalised float RGB, as in
            PyTorch (see :mod:`edgesqz.converters.export` for models that take raw pixels).
        pooling: with ``include_top=False``: None (feature map), "avg" or "max".
        classes: outputs of the classifier (default: the architecture's, 1000 or 100).
        classifier_activation: applied to the logits; None returns PyTorch's logits.
        batch_norm: None keeps the architecture's choice; True/False adds or removes batch norm.
        bypass: None keeps the architecture's shortcuts; "none", "simple" or "complex" (paper, section 6).
        dropout: the classifier's dropout rate (default: the architecture's).
    """
    arch = _check_version(version)
    if batch_norm is not None or bypass is not None:
        arch = arch.variant(batch_norm=batch_norm, bypass=bypass)
    if pooling not in (None, "avg", "max"):
        raise EdgesqzError(f"pooling must be None, 'avg' or 'max', not {pooling!r}")
    classes = arch.default_classes if classes is None else int(classes)
    if include_top and classes < 1:
        raise EdgesqzError(f"classes must be >= 1, got {classes}")
    if weights == "imagenet":
        if arch.layout != "torchvision" or arch.batch_norm:
            raise EdgesqzError(f"weights='imagenet' exist for torchvision's SqueezeNet 1.0 and 1.1, not {arch.name}")
        if include_top and classes != 1000:
            raise EdgesqzError("weights='imagenet' with include_top=True needs classes=1000")

    if input_tensor is not None:
        img_input = input_tensor if keras.backend.is_keras_tensor(input_tensor) else layers.Input(tensor=input_tensor)
        input_shape = tuple(img_input.shape[1:])
    else:
        if input_shape is None:
            input_shape = (arch.preprocessing.size, arch.preprocessing.size, 3)
        img_input = layers.Input(shape=input_shape, name="image")
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise EdgesqzError(f"input_shape must be (height, width, 3), got {input_shape}")
    smallest = arch.min_input_size()
    for dim in input_shape[:2]:
        if dim is not None and dim < smallest:
            raise EdgesqzError(f"input size {dim} is too small for {arch.label}: it needs at least "
                               f"{smallest}x{smallest} pixels")

    n = arch.naming
    s = arch.stem
    x = _conv_block(img_input, arch, s.filters, s.kernel, (n.stem("conv"), n.stem("bn"), n.stem("relu")),
                    stride=s.stride, padding=s.padding)
    for item, item_name in zip(arch.body, n.body(arch), strict=True):
        x = _max_pool(x, item, item_name) if isinstance(item, MaxPool) else fire(x, arch, item, item_name)

    if include_top:
        rate = arch.head.dropout if dropout is None else dropout
        if rate > 0 or arch.layout == "torchvision":  # torchvision's classifier.0 always exists
            x = layers.Dropout(rate, name=n.head("dropout"))(x)
        init = (keras.initializers.RandomNormal(0.0, 0.01) if arch.head.relu  # torchvision's final_conv
                else keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"))  # nn.Conv2d's default
        x = layers.Conv2D(classes, 1, kernel_initializer=init, name=n.head("conv"))(x)
        if arch.head.relu:
            x = layers.ReLU(name=n.head("relu"))(x)
        x = layers.GlobalAveragePooling2D(name=n.head("pool"))(x)
        if classifier_activation is not None:
            x = layers.Activation(classifier_activation, name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="pool")(x)

    inputs = keras.utils.get_source_inputs(input_tensor) if input_tensor is not None else img_input
    model = keras.Model(inputs, x, name=name or arch.name)
    setattr(model, _ATTR, arch)

    if weights is not None:
        from edgesqz.weights import load_weights_into

        load_weights_into(model, weights, arch=arch)
    return model


def SqueezeNet1_0(**kwargs: Any) -> keras.Model:
    return SqueezeNet("1_0", **kwargs)


def SqueezeNet1_1(**kwargs: Any) -> keras.Model:
    return SqueezeNet("1_1", **kwargs)


def SqueezeNetCIFAR(**kwargs: Any) -> keras.Model:
    """pytorch-cifar100's SqueezeNet: batch-norm Fire modules, bypasses, 32x32 inputs, 100 classes."""
    return SqueezeNet("cifar", **kwargs)
