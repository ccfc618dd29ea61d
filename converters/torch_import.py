"""torchvision-style SqueezeNet ``state_dict`` -> Keras SqueezeNet, exactly.

Conv kernels go from PyTorch's OIHW to Keras' HWIO. The Keras layers carry torchvision's module
names, so the mapping is by name: ``features.3.squeeze.weight`` -> layer ``features.3.squeeze``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from edgesqz.errors import EdgesqzError

if TYPE_CHECKING:
    import keras

# features.0.weight fixes the version: 1.0 opens with 96 7x7 filters, 1.1 with 64 3x3 filters.
_FIRST_CONV = {"1_0": (96, 3, 7, 7), "1_1": (64, 3, 3, 3)}


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a ``.pth`` state_dict with ``torch.load(weights_only=True)`` into numpy arrays."""
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
    if not isinstance(obj, Mapping) or not all(hasattr(v, "numpy") for v in obj.values()):
        raise EdgesqzError(f"{path} does not hold a state_dict (a mapping of tensor names to tensors)")
    state = {}
    for key, tensor in obj.items():
        key = key.removeprefix("module.")  # saved from DataParallel
        state[key] = tensor.detach().cpu().float().numpy()
    return state


def detect_version(state: Mapping[str, np.ndarray]) -> str | None:
    shape = tuple(state["features.0.weight"].shape) if "features.0.weight" in state else None
    for version, expected in _FIRST_CONV.items():
        if shape == expected:
            return version
    return None


def num_classes(state: Mapping[str, np.ndarray]) -> int | None:
    w = state.get("classifier.1.weight")
    return int(w.shape[0]) if w is not None else None


def state_dict_to_keras(state: Mapping[str, np.ndarray], model: keras.Model, *, version: str) -> None:
    """Copy ``state`` into ``model``; one error lists every missing, unexpected or mis-shaped key."""
    found = detect_version(state)
    if found is not None and found != version:
        raise EdgesqzError(
            f"these weights are for SqueezeNet {found.replace('_', '.')} (features.0.weight is "
            f"{'x'.join(map(str, state['features.0.weight'].shape))}), not {version.replace('_', '.')}: "
            f"pass --version {found}"
        )
    convs = {layer.name: layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"}
    if any(name.endswith(".bypass") for name in convs) or any(
        layer.__class__.__name__ == "BatchNormalization" for layer in model.layers
    ):
        raise EdgesqzError("PyTorch SqueezeNet weights fit only the plain model (no batch_norm, no bypass)")

    classes = num_classes(state)
    head = convs.get("classifier.1")
    if head is not None and classes is not None and classes != head.filters:
        raise EdgesqzError(
            f"the weights have {classes} classes but the model has {head.filters}; build the model with "
            f"classes={classes} (CLI: pass a labels file with {classes} entries)"
        )

    expected: dict[str, tuple[int, ...]] = {}
    for name, layer in convs.items():
        kh, kw = layer.kernel_size
        cin = layer.kernel.shape[2]
        expected[f"{name}.weight"] = (layer.filters, cin, kh, kw)
        expected[f"{name}.bias"] = (layer.filters,)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if head is None:  # include_top=False: the classifier's weights are simply not used
        unexpected = [k for k in unexpected if not k.startswith("classifier.")]
    shape_errors = [
        f"{k}: {'x'.join(map(str, state[k].shape))} (expected {'x'.join(map(str, shape))})"
        for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape
    ]
    if missing or unexpected or shape_errors:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected " + ", ".join(unexpected))
        if shape_errors:
            parts.append("wrong shape " + "; ".join(shape_errors))
        raise EdgesqzError(f"weights do not fit SqueezeNet {version.replace('_', '.')}: " + " | ".join(parts))

    for name, layer in convs.items():
        kernel = state[f"{name}.weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
        layer.set_weights([kernel, state[f"{name}.bias"]])


def keras_to_state_dict(model: keras.Model) -> dict[str, np.ndarray]:
    """The inverse mapping: a plain Keras SqueezeNet's weights as a torchvision-style state_dict."""
    state: dict[str, np.ndarray] = {}
    for layer in model.layers:
        if layer.__class__.__name__ == "BatchNormalization" or layer.name.endswith(".bypass"):
            raise EdgesqzError("only the plain SqueezeNet (no batch norm, no bypass) maps to torchvision's layout")
        if layer.__class__.__name__ == "Conv2D":
            kernel, bias = layer.get_weights()
            state[f"{layer.name}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))  # HWIO -> OIHW
            state[f"{layer.name}.bias"] = bias
    return state
