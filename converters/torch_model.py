"""PyTorch SqueezeNet 1.0/1.1 with torchvision's module names, and its pixel-input form.

torchvision does not install beside the project's torch, so the network is defined here,
module for module as ``torchvision/models/squeezenet.py`` builds it (ceil-mode max pooling,
final ReLU + average pool, logits out): a torchvision ``state_dict`` loads into it as is.

:class:`PixelSqueezeNet` is what the onnx2tf route exports: it takes NCHW float RGB pixels 0..255
and has the ImageNet mean/std folded into ``features.0`` with the same maths as
:func:`edgesqz.converters.export.pixel_model` (exact: the first conv has no padding).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from edgesqz.errors import EdgesqzError
from edgesqz.imaging import IMAGENET_MEAN, IMAGENET_STD

# (squeeze, expand1x1, expand3x3) per Fire module; "pool" is MaxPool2d(3, 2, ceil_mode=True).
_LAYOUT: dict[str, tuple[tuple[int, int], list[tuple[int, int, int] | str]]] = {
    "1_0": ((96, 7), ["pool", (16, 64, 64), (16, 64, 64), (32, 128, 128), "pool", (32, 128, 128),
                      (48, 192, 192), (48, 192, 192), (64, 256, 256), "pool", (64, 256, 256)]),
    "1_1": ((64, 3), ["pool", (16, 64, 64), (16, 64, 64), "pool", (32, 128, 128), (32, 128, 128), "pool",
                      (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256)]),
}


class Fire(nn.Module):
    """torchvision's Fire module: 1x1 squeeze, then 1x1 and 3x3 expands concatenated on channels."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1
        )


class SqueezeNet(nn.Module):
    """torchvision's SqueezeNet: ``features`` and ``classifier`` with the same indices and names."""

    def __init__(self, version: str = "1_1", num_classes: int = 1000) -> None:
        super().__init__()
        version = str(version).replace(".", "_")
        if version not in _LAYOUT:
            raise EdgesqzError(f"unknown SqueezeNet version {version!r}; use 1_0 or 1_1")
        if num_classes < 1:
            raise EdgesqzError(f"num_classes must be >= 1, got {num_classes}")
        self.version = version
        (first, kernel), plan = _LAYOUT[version]
        layers: list[nn.Module] = [nn.Conv2d(3, first, kernel_size=kernel, stride=2), nn.ReLU(inplace=True)]
        channels = first
        for item in plan:
            if item == "pool":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
            else:
                squeeze, e1, e3 = item  # type: ignore[misc]
                layers.append(Fire(channels, squeeze, e1, e3))
                channels = e1 + e3
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.5), nn.Conv2d(channels, num_classes, kernel_size=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d((1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet(version: str = "1_1", num_classes: int = 1000) -> SqueezeNet:
    """An untrained SqueezeNet ``version`` ("1_0" or "1_1") with torchvision's module names."""
    return SqueezeNet(version, num_classes)


def from_state_dict(state: Mapping[str, np.ndarray], *, version: str) -> SqueezeNet:
    """A SqueezeNet in eval mode holding ``state`` (numpy arrays by torchvision key); strict."""
    head = state.get("classifier.1.weight")
    if head is None:
        raise EdgesqzError("the weights have no classifier.1.weight: not a torchvision SqueezeNet state_dict")
    model = squeezenet(version, int(head.shape[0]))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {'x'.join(map(str, state[k].shape))} (expected {'x'.join(map(str, v.shape))})"
             for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) \
            + ([f"unexpected {', '.join(unexpected)}"] if unexpected else []) \
            + ([f"wrong shape {'; '.join(wrong)}"] if wrong else [])
        raise EdgesqzError(f"weights do not fit SqueezeNet {version.replace('_', '.')}: " + " | ".join(parts))
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()})
    return model.eval()


class PixelSqueezeNet(nn.Module):
    """A copy of a SqueezeNet that takes NCHW float RGB pixels 0..255 and returns logits [N, C].

    The normalisation ``(x / 255 - mean) / std`` is folded into ``features.0`` in float64:
    ``w' = w / (255 std_c)``, ``b' = b - sum(w * mean_c / std_c)``; ``fold=False`` when the
    weights already take pixels (a Keras pixel model's weights). ``class_map=True`` drops the final
    average pool: the output is the ReLU'd class map [N, C, H, W] whose spatial mean is the logits
    (the int8 head of :mod:`edgesqz.converters.quantize`). The source model is untouched.
    """

    def __init__(self, model: SqueezeNet, *, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, fold: bool = True, class_map: bool = False) -> None:
        super().__init__()
        net = copy.deepcopy(model).eval()
        first = net.features[0]
        assert isinstance(first, nn.Conv2d) and first.bias is not None
        if fold:
            mean_a = np.asarray(mean, np.float64)
            std_a = np.asarray(std, np.float64)
            w = first.weight.detach().double().numpy()  # OIHW
            b = first.bias.detach().double().numpy()
            new_w = w / (255.0 * std_a)[None, :, None, None]
            new_b = b - np.einsum("oihw,i->o", w, mean_a / std_a)
            with torch.no_grad():
                first.weight.copy_(torch.from_numpy(new_w.astype(np.float32)))
                first.bias.copy_(torch.from_numpy(new_b.astype(np.float32)))
        if class_map:
            net.classifier = net.classifier[:3]  # dropout, conv, ReLU: no average pool
        self.net = net
        self.class_map = class_map
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.class_map:
            return self.net.classifier(self.net.features(x))
        return self.net(x)


def pixel_squeezenet(state: Mapping[str, np.ndarray], *, version: str, fold: bool = True,
                     class_map: bool = False) -> PixelSqueezeNet:
    """Weights -> the pixel-input, inference-only model the onnx2tf route exports.

    ``fold=False``: ``state`` already takes pixels (normalisation folded); ``class_map=True``: the
    output is the class map, not the logits (see :class:`PixelSqueezeNet`).
    """
    return PixelSqueezeNet(from_state_dict(state, version=version), fold=fold, class_map=class_map).eval()
