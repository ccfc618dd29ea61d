"""edgesqz: SqueezeNet from Keras or PyTorch weights to a real-time int8 classifier on a Raspberry Pi.

The device side (``edgesqz.device``) needs numpy, OpenCV and a TFLite runtime only. The Keras
model (:func:`SqueezeNet`) and the converters need ``pip install "edgesqz[convert]"``; they are
imported on first use, so ``import edgesqz`` never pulls in TensorFlow or PyTorch.
"""

from __future__ import annotations

from typing import Any

from edgesqz._version import __version__
from edgesqz.errors import EdgesqzError

__all__ = ["EdgesqzError", "SqueezeNet", "SqueezeNet1_0", "SqueezeNet1_1", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("SqueezeNet", "SqueezeNet1_0", "SqueezeNet1_1"):
        from edgesqz import squeezenet

        return getattr(squeezenet, name)
    raise AttributeError(f"module 'edgesqz' has no attribute {name!r}")
