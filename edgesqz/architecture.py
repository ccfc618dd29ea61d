"""Every SqueezeNet as data: one description per network, read by one Keras builder and one PyTorch builder.

An :class:`Architecture` is the paper's table in code: a stem convolution (with or without
padding), a body of max pools and Fire modules (each with or without a bypass), a head (dropout,
1x1 convolution to the classes, an optional ReLU, global average pool), whether convolutions are
followed by batch norm, and the preprocessing the network was trained with. Its :class:`Layout`
gives every layer the module name PyTorch uses for it, so a ``state_dict`` maps onto the Keras
layers by name, key for key:

=====================  ======================================  ==========================================
network                layout (keys)                           source
=====================  ======================================  ==========================================
``squeezenet1_0``      torchvision (``features.3.squeeze``)    torchvision ``squeezenet1_0``
``squeezenet1_1``      torchvision                             torchvision ``squeezenet1_1``
``squeezenet_cifar``   cifar (``fire2.squeeze.0``, ``conv10``)  ``pytorch-cifar100`` ``models/squeezenet.py``
=====================  ======================================  ==========================================

Variants (:meth:`Architecture.variant`): batch norm after every convolution but the head's, the
paper's simple bypass (identity shortcut around every Fire module whose input and output widths
match) and complex bypass (a 1x1 convolution shortcut around the others too). A variant's
name says what it is (``squeezenet1_0_bn_simple_bypass``) and :func:`architecture` reads it back.

This module imports neither Keras nor PyTorch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Literal

from edgesqz.errors import EdgesqzError
from edgesqz.imaging import Preprocessing

Bypass = Literal["identity", "conv"]
# pytorch-cifar100's conf/global_settings.py, to full precision (CIFAR100_TRAIN_MEAN / _STD): the rounded
# 4-digit values seen in many copies move the logits by ~1e-3, far outside the 1e-4 the port keeps.
CIFAR100_MEAN = (0.5070751592371323, 0.48654887331495095, 0.4409178433670343)
CIFAR100_STD = (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)


# --------------------------------------------------------------------------- the parts


@dataclass(frozen=True)
class Conv:
    """A convolution followed by (batch norm and) ReLU."""

    filters: int
    kernel: int
    stride: int = 1
    padding: int = 0  # zeros on every side, as nn.Conv2d(padding=...)


@dataclass(frozen=True)
class MaxPool:
    kernel: int
    stride: int
    ceil_mode: bool = False

    def out(self, size: int) -> int:
        """Output size for an input of ``size`` (nn.MaxPool2d's rule, no padding)."""
        if size < self.kernel:
            return 0
        steps = (size - self.kernel) / self.stride
        return (math.ceil(steps) if self.ceil_mode else math.floor(steps)) + 1


@dataclass(frozen=True)
class Fire:
    """1x1 squeeze, then 1x1 and 3x3 expands concatenated (1x1 first); ``bypass`` adds a shortcut."""

    squeeze: int
    expand1x1: int
    expand3x3: int
    bypass: Bypass | None = None

    @property
    def out_channels(self) -> int:
        return self.expand1x1 + self.expand3x3


@dataclass(frozen=True)
class Head:
    """Dropout, 1x1 convolution to the classes, optional ReLU, global average pool (logits)."""

    dropout: float = 0.5
    relu: bool = True


# --------------------------------------------------------------------------- layouts: PyTorch's module names


class Layout:
    """How one family of PyTorch code names its modules; Keras layers take the same names."""

    name = ""
    description = ""

    def stem(self, part: str) -> str:  # part: conv, bn, relu
        raise NotImplementedError

    def body(self, arch: Architecture) -> list[str]:
        """Names of the body's pools and Fire modules, in order."""
        raise NotImplementedError

    def fire(self, prefix: str, branch: str, part: str) -> str:  # branch: squeeze, expand1x1, expand3x3
        raise NotImplementedError

    def head(self, part: str) -> str:  # part: dropout, conv, relu, pool
        raise NotImplementedError

    @staticmethod
    def bypass(prefix: str, part: str) -> str:  # part: conv, add
        return f"{prefix}.bypass" if part == "conv" else f"{prefix}.bypass_add"


class TorchvisionLayout(Layout):
    """``torchvision.models.squeezenet``: ``features.N`` (a Sequential) and ``classifier.N``.

    torchvision has no batch-norm SqueezeNet; edgesqz's batch-norm variant names each norm
    ``<conv>_bn``.
    """

    name = "torchvision"
    description = "torchvision layout (features.N, classifier.1)"
    _FIRE: ClassVar[dict[str, str]] = {"squeeze": "squeeze", "expand1x1": "expand1x1", "expand3x3": "expand3x3"}

    def stem(self, part: str) -> str:
        return {"conv": "features.0", "bn": "features.0_bn", "relu": "features.1"}[part]

    def body(self, arch: Architecture) -> list[str]:
        return [f"features.{i + 2}" for i in range(len(arch.body))]

    def fire(self, prefix: str, branch: str, part: str) -> str:
        conv = f"{prefix}.{self._FIRE[branch]}"
        return {"conv": conv, "bn": f"{conv}_bn", "relu": f"{conv}_activation"}[part]

    def head(self, part: str) -> str:
        return {"dropout": "classifier.0", "conv": "classifier.1", "relu": "classifier.2", "pool": "classifier.3"}[part]


class CifarLayout(Layout):
    """``pytorch-cifar100``'s ``models/squeezenet.py``: ``stem``, ``fire2`` .. ``fire9``, ``conv10``.

    Each conv block is a Sequential (``.0`` conv, ``.1`` BatchNorm2d, ``.2`` ReLU); the pools after
    fire4 and fire8 are one shared ``maxpool`` module, named ``maxpool.1``, ``maxpool.2`` here.
    """

    name = "cifar"
    description = "pytorch-cifar100 layout (stem.0, fire2.squeeze.0, conv10)"
    _FIRE: ClassVar[dict[str, str]] = {"squeeze": "squeeze", "expand1x1": "expand_1x1", "expand3x3": "expand_3x3"}
    _PART: ClassVar[dict[str, str]] = {"conv": "0", "bn": "1", "relu": "2"}

    def stem(self, part: str) -> str:
        return f"stem.{self._PART[part]}"

    def body(self, arch: Architecture) -> list[str]:
        names: list[str] = []
        fires = pools = 0
        for i, item in enumerate(arch.body):
            if isinstance(item, Fire):
                fires += 1
                names.append(f"fire{fires + 1}")
            elif i == 0:
                names.append("stem.3")
            else:
                pools += 1
                names.append(f"maxpool.{pools}")
        return names

    def fire(self, prefix: str, branch: str, part: str) -> str:
        return f"{prefix}.{self._FIRE[branch]}.{self._PART[part]}"

    def head(self, part: str) -> str:
        return {"dropout": "dropout", "conv": "conv10", "relu": "conv10_relu", "pool": "avg"}[part]


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (TorchvisionLayout(), CifarLayout())}


# --------------------------------------------------------------------------- the architecture


@dataclass(frozen=True)
class Architecture:
    """One SqueezeNet, described completely (see the module docstring)."""

    name: str
    layout: str
    stem: Conv
    body: tuple[MaxPool | Fire, ...]
    head: Head = field(default_factory=Head)
    batch_norm: bool = False
    bn_conv_bias: bool = False  # with batch norm, do the convolutions keep a bias (PyTorch's default) or not
    bn_eps: float = 1e-5
    default_classes: int = 1000
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    title: str = ""  # for people: "SqueezeNet 1.1"
    family: str = ""  # the registered architecture a variant derives from ("" for the registered ones)

    # -- derived facts

    @property
    def naming(self) -> Layout:
        return LAYOUTS[self.layout]

    @property
    def conv_bias(self) -> bool:
        return not self.batch_norm or self.bn_conv_bias

    @property
    def out_channels(self) -> int:
        return self.channels()[-1]

    def channels(self) -> list[int]:
        """Channels after the stem and after each body item."""
        out = [self.stem.filters]
        for item in self.body:
            out.append(item.out_channels if isinstance(item, Fire) else out[-1])
        return out

    def fires(self) -> Iterator[tuple[str, Fire, int]]:
        """(name, Fire, input channels) for every Fire module, in order."""
        channels = self.channels()
        for name, item, cin in zip(self.naming.body(self), self.body, channels, strict=False):
            if isinstance(item, Fire):
                yield name, item, cin

    def feature_map_size(self, size: int) -> int:
        """Spatial size of the body's output for a ``size`` x ``size`` input (<= 0: too small)."""
        s = self.stem
        size = (size + 2 * s.padding - s.kernel) // s.stride + 1
        for item in self.body:
            if size < 1:
                return size
            if isinstance(item, MaxPool):
                size = item.out(size)
        return size

    def min_input_size(self) -> int:
        """Smallest square input for which every layer has a non-empty output."""
        for size in range(1, 4096):
            if self.feature_map_size(size) >= 1:
                return size
        raise AssertionError("unreachable")

    @property
    def short_name(self) -> str:
        """What ``--arch`` takes for this architecture's family ("1_0", "1_1", "cifar")."""
        family = self.family or self.name
        return next((k for k in ARCH_CHOICES if ALIASES[k] == family), family)

    @property
    def label(self) -> str:
        """For people: the title, else the name."""
        return self.title or self.name

    def is_exact_fold(self) -> bool:
        """Whether the input normalisation folds into the stem exactly (it does when the stem has no padding)."""
        return self.stem.padding == 0

    # -- variants

    def variant(self, *, batch_norm: bool | None = None, bypass: str | None = None) -> Architecture:
        """This architecture with or without batch norm, and with a bypass scheme.

        ``bypass``: None keeps the architecture's own shortcuts; ``"none"`` removes them;
        ``"simple"`` puts an identity shortcut around every Fire module whose input and output
        widths match (the paper's simple bypass); ``"complex"`` adds 1x1 convolution shortcuts
        around the others too.
        """
        arch = self
        if bypass is not None:
            if bypass not in BYPASS_SCHEMES:
                raise EdgesqzError(f"bypass must be one of {', '.join(BYPASS_SCHEMES)}, not {bypass!r}")
            body: list[MaxPool | Fire] = []
            for item, cin in zip(self.body, self.channels(), strict=False):
                if isinstance(item, Fire):
                    kind: Bypass | None = None
                    if bypass != "none" and cin == item.out_channels:
                        kind = "identity"
                    elif bypass == "complex":
                        kind = "conv"
                    item = replace(item, bypass=kind)
                body.append(item)
            arch = replace(arch, body=tuple(body))
        if batch_norm is not None:
            arch = replace(arch, batch_norm=batch_norm)
        family = self.family or self.name
        return replace(arch, name=_variant_name(family, arch), family=family)

    # -- as data

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["body"] = [{"fire" if isinstance(item, Fire) else "maxpool": asdict(item)} for item in self.body]
        d["preprocessing"] = self.preprocessing.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Architecture:
        try:
            body: list[MaxPool | Fire] = []
            for item in d["body"]:
                ((kind, args),) = item.items()
                body.append(Fire(**args) if kind == "fire" else MaxPool(**args))
            arch = cls(
                name=str(d["name"]), layout=str(d["layout"]), stem=Conv(**d["stem"]), body=tuple(body),
                head=Head(**d.get("head", {})), batch_norm=bool(d.get("batch_norm", False)),
                bn_conv_bias=bool(d.get("bn_conv_bias", False)), bn_eps=float(d.get("bn_eps", 1e-5)),
                default_classes=int(d.get("default_classes", 1000)),
                preprocessing=Preprocessing.from_dict(d.get("preprocessing", {})), title=str(d.get("title", "")),
                family=str(d.get("family", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EdgesqzError(f"not an edgesqz architecture description ({type(exc).__name__}: {exc})") from exc
        if arch.layout not in LAYOUTS:
            raise EdgesqzError(f"unknown layout {arch.layout!r} in an architecture description")
        return arch

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


BYPASS_SCHEMES = ("none", "simple", "complex")


def _variant_name(family: str, arch: Architecture) -> str:
    """``family`` plus what differs from it: ``_bn`` / ``_plain``, then ``_simple_bypass``,
    ``_complex_bypass`` or ``_no_bypass``."""
    reference = ARCHITECTURES.get(family)
    if reference is None:
        return arch.name
    name = family
    if arch.batch_norm != reference.batch_norm:
        name += "_bn" if arch.batch_norm else "_plain"
    kinds = tuple(f.bypass for f in arch.body if isinstance(f, Fire))
    if kinds != tuple(f.bypass for f in reference.body if isinstance(f, Fire)):
        name += "_complex_bypass" if "conv" in kinds else "_simple_bypass" if any(kinds) else "_no_bypass"
    return name


# --------------------------------------------------------------------------- the family

_P3 = MaxPool(3, 2, ceil_mode=True)  # torchvision: MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
_P2 = MaxPool(2, 2)  # pytorch-cifar100: MaxPool2d(2, 2)

SQUEEZENET1_0 = Architecture(
    name="squeezenet1_0", layout="torchvision", title="SqueezeNet 1.0",
    stem=Conv(96, 7, stride=2),
    body=(_P3, Fire(16, 64, 64), Fire(16, 64, 64), Fire(32, 128, 128), _P3, Fire(32, 128, 128),
          Fire(48, 192, 192), Fire(48, 192, 192), Fire(64, 256, 256), _P3, Fire(64, 256, 256)),
)

SQUEEZENET1_1 = Architecture(
    name="squeezenet1_1", layout="torchvision", title="SqueezeNet 1.1",
    stem=Conv(64, 3, stride=2),
    body=(_P3, Fire(16, 64, 64), Fire(16, 64, 64), _P3, Fire(32, 128, 128), Fire(32, 128, 128), _P3,
          Fire(48, 192, 192), Fire(48, 192, 192), Fire(64, 256, 256), Fire(64, 256, 256)),
)

# pytorch-cifar100: Fire(in, out, squeeze) with out/2 per expand; bypasses around fire3, fire5, fire7
# (not fire9); conv10 has no ReLU and there is no dropout.
SQUEEZENET_CIFAR = Architecture(
    name="squeezenet_cifar", layout="cifar", title="CIFAR SqueezeNet",
    stem=Conv(96, 3, padding=1),
    body=(_P2, Fire(16, 64, 64), Fire(16, 64, 64, "identity"), Fire(32, 128, 128), _P2,
          Fire(32, 128, 128, "identity"), Fire(48, 192, 192), Fire(48, 192, 192, "identity"), Fire(64, 256, 256),
          _P2, Fire(64, 256, 256)),
    head=Head(dropout=0.0, relu=False), batch_norm=True, bn_conv_bias=True, default_classes=100,
    preprocessing=Preprocessing(size=32, crop_fraction=1.0, mean=CIFAR100_MEAN, std=CIFAR100_STD),
)

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (SQUEEZENET1_0, SQUEEZENET1_1, SQUEEZENET_CIFAR)}
# what users type (--arch): short names
ALIASES = {"1_0": "squeezenet1_0", "1.0": "squeezenet1_0", "1_1": "squeezenet1_1", "1.1": "squeezenet1_1",
           "cifar": "squeezenet_cifar", "cifar100": "squeezenet_cifar"}
ARCH_CHOICES = ("1_0", "1_1", "cifar")

def architecture(spec: str | Architecture) -> Architecture:
    """An architecture by short name (``1_1``, ``cifar``), full name (``squeezenet1_0_bn_simple_bypass``) or as is."""
    if isinstance(spec, Architecture):
        return spec
    key = str(spec).strip()
    key = ALIASES.get(key, key)
    if key in ARCHITECTURES:
        return ARCHITECTURES[key]
    for root, base in sorted(ARCHITECTURES.items(), key=lambda kv: -len(kv[0])):
        if not key.startswith(root + "_"):
            continue
        rest = key[len(root) + 1:]
        batch_norm: bool | None = None
        if rest.startswith("bn"):
            batch_norm, rest = True, rest[2:].lstrip("_")
        elif rest.startswith("plain"):
            batch_norm, rest = False, rest[5:].lstrip("_")
        bypass = {"": None, "simple_bypass": "simple", "complex_bypass": "complex", "no_bypass": "none"}.get(rest, "?")
        if bypass != "?":
            return base.variant(batch_norm=batch_norm, bypass=bypass)
    raise EdgesqzError(f"unknown SqueezeNet architecture {spec!r}; use one of {', '.join(ARCH_CHOICES)}")
