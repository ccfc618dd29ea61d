"""PyTorch SqueezeNet built from the same descriptions as the Keras one, and its pixel-input form.

torchvision does not install beside the project's torch, so the network is built here from
:mod:`edgesqz.architecture` with the module names of each layout: a torchvision ``state_dict``
(``features.3.squeeze.weight``) or a pytorch-cifar100 one (``fire2.squeeze.1.running_var``) loads
into it as is. It computes what torchvision's and pytorch-cifar100's code compute (ceil-mode or
floor-mode max pooling, padded convolutions, batch norm, bypass additions, the head's optional ReLU,
average pool).

:class:`PixelSqueezeNet` is what the onnx2tf route exports: it takes NCHW float RGB pixels 0..255
and carries the normalisation itself, with the same maths as
:func:`edgesqz.converters.export.pixel_model`: folded into the stem (``w' = w / (255 std_c)``,
``b' = b - sum(w * mean_c / std_c)``) when the stem has no padding, else a ``255 mean_c`` subtraction
first and ``w' = w / (255 std_c)``, which keeps the zero padding exact.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgesqz.architecture import Architecture, Fire, MaxPool, architecture
from edgesqz.errors import EdgesqzError


class _Node(nn.Module):
    """A plain container, so that modules can sit at any dotted path (``features.3.squeeze``).

    Indexing by position works as on torchvision's Sequential (``model.features[0]``).
    """

    def __getitem__(self, index: int | str) -> nn.Module:
        return self._modules[str(index)]  # type: ignore[return-value]


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    parent = root
    *folders, leaf = path.split(".")
    for name in folders:
        if not hasattr(parent, name):
            parent.add_module(name, _Node())
        parent = getattr(parent, name)
    parent.add_module(leaf, module)


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


class SqueezeNet(nn.Module):
    """A SqueezeNet of ``arch`` with its layout's module names (see the module docstring)."""

    def __init__(self, version: str | Architecture = "1_1", num_classes: int | None = None) -> None:
        super().__init__()
        arch = architecture(version)
        classes = arch.default_classes if num_classes is None else num_classes
        if classes < 1:
            raise EdgesqzError(f"num_classes must be >= 1, got {classes}")
        self.arch = arch
        self.version = arch.name
        n = arch.naming
        channels = arch.channels()

        def conv_block(name: tuple[str, str], cin: int, cout: int, kernel: int, stride: int = 1,
                       padding: int = 0) -> None:
            conv, bn = name
            _place(self, conv, nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=arch.conv_bias))
            if arch.batch_norm:
                _place(self, bn, nn.BatchNorm2d(cout, eps=arch.bn_eps))

        s = arch.stem
        conv_block((n.stem("conv"), n.stem("bn")), 3, s.filters, s.kernel, s.stride, s.padding)
        for name, fire, cin in arch.fires():
            conv_block((n.fire(name, "squeeze", "conv"), n.fire(name, "squeeze", "bn")), cin, fire.squeeze, 1)
            conv_block((n.fire(name, "expand1x1", "conv"), n.fire(name, "expand1x1", "bn")), fire.squeeze,
                       fire.expand1x1, 1)
            conv_block((n.fire(name, "expand3x3", "conv"), n.fire(name, "expand3x3", "bn")), fire.squeeze,
                       fire.expand3x3, 3, padding=1)
            if fire.bypass == "conv":
                _place(self, n.bypass(name, "conv"), nn.Conv2d(cin, fire.out_channels, 1))
        _place(self, n.head("conv"), nn.Conv2d(channels[-1], classes, 1))
        self.num_classes = classes

    def _block(self, x: torch.Tensor, conv: str, bn: str) -> torch.Tensor:
        x = _get(self, conv)(x)
        if self.arch.batch_norm:
            x = _get(self, bn)(x)
        return F.relu(x)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        arch, n = self.arch, self.arch.naming
        x = self._block(x, n.stem("conv"), n.stem("bn"))
        for item, name in zip(arch.body, n.body(arch), strict=True):
            if isinstance(item, MaxPool):
                x = F.max_pool2d(x, item.kernel, item.stride, ceil_mode=item.ceil_mode)
                continue
            assert isinstance(item, Fire)
            s = self._block(x, n.fire(name, "squeeze", "conv"), n.fire(name, "squeeze", "bn"))
            out = torch.cat([self._block(s, n.fire(name, "expand1x1", "conv"), n.fire(name, "expand1x1", "bn")),
                             self._block(s, n.fire(name, "expand3x3", "conv"), n.fire(name, "expand3x3", "bn"))], 1)
            if item.bypass == "identity":
                out = out + x
            elif item.bypass == "conv":
                out = out + _get(self, n.bypass(name, "conv"))(x)
            x = out
        return x

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The head's 1x1 convolution (and ReLU where the architecture has one) over the features."""
        y = _get(self, self.arch.naming.head("conv"))(self.trunk(x))  # dropout is the identity in eval
        return F.relu(y) if self.arch.head.relu else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_scores(x).mean(dim=(2, 3))


def squeezenet(version: str | Architecture = "1_1", num_classes: int | None = None) -> SqueezeNet:
    """An untrained SqueezeNet of ``version`` ("1_0", "1_1", "cifar" or an architecture)."""
    return SqueezeNet(version, num_classes)


def from_state_dict(state: Mapping[str, np.ndarray], *, version: str | Architecture) -> SqueezeNet:
    """A SqueezeNet in eval mode holding ``state`` (numpy arrays by PyTorch key); strict."""
    from edgesqz.converters.torch_import import detect

    arch = architecture(version)
    found = detect(state)
    if found is not None and (found.arch.layout, found.arch.stem) != (arch.layout, arch.stem):
        raise EdgesqzError(f"these weights are {found.arch.label}, not {arch.label}: pass --arch "
                           f"{found.arch.short_name}")
    head = state.get(f"{arch.naming.head('conv')}.weight")
    if head is None:
        raise EdgesqzError(f"the weights have no {arch.naming.head('conv')}.weight: not a {arch.label} "
                           "state_dict")
    model = squeezenet(arch, int(head.shape[0]))
    expected = model.state_dict()
    ignored = [k for k in expected if k.endswith("num_batches_tracked")]
    missing = sorted(set(expected) - set(state) - set(ignored))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {'x'.join(map(str, state[k].shape))} (expected {'x'.join(map(str, v.shape))})"
             for k, v in expected.items()
             if k in state and k not in ignored and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) \
            + ([f"unexpected {', '.join(unexpected)}"] if unexpected else []) \
            + ([f"wrong shape {'; '.join(wrong)}"] if wrong else [])
        raise EdgesqzError(f"weights do not fit {arch.label}: " + " | ".join(parts))
    tensors = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items() if k not in ignored}
    model.load_state_dict(tensors, strict=False)
    return model.eval()


class PixelSqueezeNet(nn.Module):
    """A copy of a SqueezeNet that takes NCHW float RGB pixels 0..255 and returns logits [N, C].

    ``fold=False`` when the weights already take pixels (a Keras pixel model's weights).
    ``class_map=True`` drops the final average pool: the output is the class map [N, C, H, W] whose
    spatial mean is the logits (the int8 head of :mod:`edgesqz.converters.quantize`). The source
    model is untouched.
    """

    def __init__(self, model: SqueezeNet, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 fold: bool = True, class_map: bool = False) -> None:
        super().__init__()
        net = copy.deepcopy(model).eval()
        arch = net.arch
        mean_a = np.asarray(arch.preprocessing.mean if mean is None else mean, np.float64)
        std_a = np.asarray(arch.preprocessing.std if std is None else std, np.float64)
        self.center: torch.Tensor | None = None
        if fold:
            first = _get(net, arch.naming.stem("conv"))
            assert isinstance(first, nn.Conv2d)
            w = first.weight.detach().double().numpy()  # OIHW
            new_w = w / (255.0 * std_a)[None, :, None, None]
            with torch.no_grad():
                first.weight.copy_(torch.from_numpy(new_w.astype(np.float32)))
                if arch.is_exact_fold():
                    if first.bias is None:
                        first.bias = nn.Parameter(torch.zeros(first.out_channels))
                    b = first.bias.detach().double().numpy()
                    first.bias.copy_(torch.from_numpy((b - np.einsum("oihw,i->o", w, mean_a / std_a))
                                                      .astype(np.float32)))
            if not arch.is_exact_fold():
                self.center = torch.from_numpy((255.0 * mean_a).astype(np.float32)).reshape(1, 3, 1, 1)
        self.net = net
        self.class_map = class_map
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.center is not None:
            x = x - self.center
        return self.net.class_scores(x) if self.class_map else self.net(x)


def pixel_squeezenet(state: Mapping[str, np.ndarray], *, version: str | Architecture, fold: bool = True,
                     class_map: bool = False, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> PixelSqueezeNet:
    """Weights -> the pixel-input, inference-only model the onnx2tf route exports.

    ``fold=False``: ``state`` already takes pixels (the normalisation folded in as
    :func:`edgesqz.converters.export.pixel_model` does, including the ``255 mean`` centring of a padded
    stem, which ``mean`` must then give); ``class_map=True``: the output is the class map, not the logits.
    """
    model = PixelSqueezeNet(from_state_dict(state, version=version), fold=fold, class_map=class_map, mean=mean,
                            std=std).eval()
    arch = architecture(version)
    if not fold and arch.stem.padding:
        mean_a = np.asarray(arch.preprocessing.mean if mean is None else mean, np.float64)
        model.center = torch.from_numpy((255.0 * mean_a).astype(np.float32)).reshape(1, 3, 1, 1)
    return model
