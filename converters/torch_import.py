"""PyTorch SqueezeNet ``state_dict`` -> Keras SqueezeNet, exactly, for every layout in :mod:`edgesqz.architecture`.

The Keras layers carry the PyTorch module names of their layout, so the mapping is by name:
``features.3.squeeze.weight`` -> layer ``features.3.squeeze``; ``fire2.squeeze.1.running_var``
-> batch-norm layer ``fire2.squeeze.1``. Conv kernels go from PyTorch's OIHW to Keras' HWIO;
batch norm keeps its running statistics (and the architecture's eps), to be folded into the
convolutions on export.

:func:`detect` recognises the layout from the keys (torchvision's ``features.N`` or
pytorch-cifar100's ``stem`` / ``fireN`` / ``conv10``) and the class count from the head.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgesqz.architecture import SQUEEZENET1_0, SQUEEZENET1_1, SQUEEZENET_CIFAR, Architecture
from edgesqz.errors import EdgesqzError

if TYPE_CHECKING:
    import keras

_BN_KEYS = ("weight", "bias", "running_mean", "running_var")  # Keras: gamma, beta, moving_mean, moving_variance
_IGNORED_SUFFIXES = (".num_batches_tracked",)  # a training counter: no effect on the network
_MAX_LISTED = 6


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a ``.pth`` state_dict with ``torch.load(weights_only=True)`` into float32 numpy arrays.

    Accepts a plain ``state_dict``, one saved from ``DataParallel`` (``module.`` prefix) and a
    checkpoint dict holding one under ``state_dict``. Refuses weights with NaN or infinite values.
    """
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise EdgesqzError('reading .pth weights needs PyTorch: pip install "edgesqz[convert]"') from exc
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file makes the (weights-only) unpickler raise almost anything
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgesqzError(f"cannot read weights {path}: not a PyTorch state_dict or corrupt ({first[:120]})") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(hasattr(v, "numpy") for v in obj.values()):
        raise EdgesqzError(f"{path} does not hold a state_dict (a mapping of tensor names to tensors)")
    state = {}
    for key, tensor in obj.items():
        key = str(key).removeprefix("module.")  # saved from DataParallel
        state[key] = tensor.detach().cpu().float().numpy()
    bad = [k for k, v in state.items() if not np.all(np.isfinite(v))]
    if bad:
        raise EdgesqzError(f"the weights in {path} contain NaN or infinite values ({_listed(bad)}): the "
                           "checkpoint is broken (a training run that diverged?); use an earlier checkpoint")
    return state


# --------------------------------------------------------------------------- recognising a state_dict


@dataclass(frozen=True)
class Detected:
    """What a state_dict holds: its architecture and class count."""

    arch: Architecture
    classes: int

    def describe(self) -> str:
        norm = ", batch norm" if self.arch.batch_norm else ""
        return f"{self.arch.label} ({self.arch.naming.description}{norm}), {self.classes} classes"


_LAYOUT_HINT = ("expected torchvision's keys (features.0.weight, features.3.squeeze.weight, ..., classifier.1.weight) "
                "or pytorch-cifar100's (stem.0.weight, stem.1.running_mean, fire2.squeeze.0.weight, ..., "
                "conv10.weight)")


def detect(state: Mapping[str, np.ndarray]) -> Detected | None:
    """The architecture and class count of a SqueezeNet ``state_dict``, or None for anything else."""
    if "features.0.weight" in state:
        shape = tuple(state["features.0.weight"].shape)
        arch = {(96, 3, 7, 7): SQUEEZENET1_0, (64, 3, 3, 3): SQUEEZENET1_1}.get(shape)  # type: ignore[arg-type]
        head = state.get("classifier.1.weight")
        if arch is None or head is None or head.ndim != 4:
            return None
        return Detected(arch, int(head.shape[0]))
    if "stem.0.weight" in state and any(k.startswith("fire2.") for k in state):
        head = state.get("conv10.weight")
        if head is None or head.ndim != 4:
            return None
        arch = SQUEEZENET_CIFAR if "stem.1.running_mean" in state else SQUEEZENET_CIFAR.variant(batch_norm=False)
        return Detected(arch, int(head.shape[0]))
    return None


def detect_or_explain(state: Mapping[str, np.ndarray], source: str) -> Detected:
    found = detect(state)
    if found is None:
        keys = list(state)
        raise EdgesqzError(f"{source} is not a SqueezeNet state_dict of a known layout: {_LAYOUT_HINT}; it has "
                           f"{len(keys)} keys, e.g. {', '.join(keys[:3])}")
    return found


def detect_version(state: Mapping[str, np.ndarray]) -> str | None:
    """"1_0" / "1_1" for torchvision SqueezeNet weights (None otherwise)."""
    found = detect(state)
    if found is None or found.arch.layout != "torchvision":
        return None
    return "1_0" if found.arch.stem.kernel == 7 else "1_1"


def num_classes(state: Mapping[str, np.ndarray]) -> int | None:
    found = detect(state)
    return found.classes if found else None


# --------------------------------------------------------------------------- copying


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def _expected(model: keras.Model) -> dict[str, tuple[str, int, tuple[int, ...]]]:
    """PyTorch key -> (Keras layer, weight index, PyTorch shape) for every weight of ``model``."""
    expected: dict[str, tuple[str, int, tuple[int, ...]]] = {}
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            kh, kw = layer.kernel_size
            cin = int(layer.kernel.shape[2])
            expected[f"{layer.name}.weight"] = (layer.name, 0, (layer.filters, cin, kh, kw))
            if layer.use_bias:
                expected[f"{layer.name}.bias"] = (layer.name, 1, (layer.filters,))
        elif kind == "BatchNormalization":
            channels = int(layer.gamma.shape[0])
            for i, key in enumerate(_BN_KEYS):
                expected[f"{layer.name}.{key}"] = (layer.name, i, (channels,))
    return expected


def state_dict_to_keras(state: Mapping[str, np.ndarray], model: keras.Model, *,
                        arch: Architecture | None = None, version: str | None = None) -> None:
    """Copy ``state`` into ``model``; one error lists every missing, unexpected or mis-shaped key.

    ``arch`` (or ``version``, "1_0"/"1_1") only sharpens the error when the weights are of
    another architecture; the copy itself goes by layer name.
    """
    from edgesqz.architecture import architecture
    from edgesqz.squeezenet import architecture_of

    wanted = arch or (architecture(version) if version else None)
    if wanted is None:
        try:
            wanted = architecture_of(model)
        except EdgesqzError:
            wanted = None
    found = detect(state)
    if found is not None and wanted is not None and (found.arch.layout, found.arch.stem) != (
            wanted.layout, wanted.stem):
        raise EdgesqzError(f"these weights are {found.describe()}, not {wanted.label}: "
                           f"pass --arch {found.arch.short_name}")
    expected = _expected(model)
    head = _head_conv(model, wanted)
    if head is not None and found is not None and found.classes != head.filters:
        raise EdgesqzError(
            f"the weights have {found.classes} classes but the model has {head.filters}; build the model "
            f"with classes={found.classes} (CLI: pass a labels file with {found.classes} entries)")
    keys = [k for k in state if not k.endswith(_IGNORED_SUFFIXES)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in keys if k not in expected]
    if head is None:  # include_top=False: the head's weights are simply not used
        unexpected = [k for k in unexpected if not k.startswith(_HEAD_NAMES)]
    shape_errors = [f"{k}: {'x'.join(map(str, state[k].shape))} (expected {'x'.join(map(str, shape))})"
                    for k, (_, _, shape) in expected.items() if k in state and tuple(state[k].shape) != shape]
    if missing or unexpected or shape_errors:
        parts = []
        if missing:
            parts.append("missing " + _listed(missing))
        if unexpected:
            parts.append("unexpected " + _listed(unexpected))
        if shape_errors:
            parts.append("wrong shape " + "; ".join(shape_errors[:_MAX_LISTED]))
        what = wanted.label if wanted else model.name
        raise EdgesqzError(f"weights do not fit {what}: " + " | ".join(parts))

    per_layer: dict[str, dict[int, np.ndarray]] = {}
    for key, (name, index, _) in expected.items():
        value = state[key]
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        per_layer.setdefault(name, {})[index] = value
    for name, values in per_layer.items():
        model.get_layer(name).set_weights([values[i] for i in range(len(values))])


_HEAD_NAMES = ("classifier.1.", "conv10.")


def _head_conv(model: keras.Model, arch: Architecture | None) -> keras.layers.Layer | None:
    """The classifier's 1x1 convolution, if the model has one."""
    names = [arch.naming.head("conv")] if arch is not None else [n.rstrip(".") for n in _HEAD_NAMES]
    for layer in model.layers:
        if layer.name in names and type(layer).__name__ == "Conv2D":
            return layer
    return None


def keras_to_state_dict(model: keras.Model) -> dict[str, np.ndarray]:
    """The inverse mapping: a Keras SqueezeNet's weights as a PyTorch ``state_dict`` of its layout."""
    state: dict[str, np.ndarray] = {}
    for key, (name, index, _) in _expected(model).items():
        value = model.get_layer(name).get_weights()[index]
        state[key] = np.ascontiguousarray(value.transpose(3, 2, 0, 1)) if value.ndim == 4 else value  # HWIO -> OIHW
    return state
