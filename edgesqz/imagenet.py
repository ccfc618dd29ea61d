"""The ImageNet-1k class names that ship with edgesqz (package data; no network, no TensorFlow).

``imagenet_labels()`` gives the 1000 classes in the output order of torchvision's ImageNet weights,
with their wnids as ids; provenance and licences in ``edgesqz/data/README.md``.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from edgesqz.errors import EdgesqzError
from edgesqz.labels import Labels

LABELS_FILE = "imagenet1k_labels.txt"
CLASSES = 1000


@cache
def imagenet_labels() -> Labels:
    """The 1000 ImageNet-1k classes: names (``"tench"``, ...) and wnids (``"n01440764"``, ...)."""
    try:
        text = resources.files("edgesqz").joinpath("data", LABELS_FILE).read_text(encoding="utf-8")
    except (FileNotFoundError, OSError) as exc:
        raise EdgesqzError(f"edgesqz's package data {LABELS_FILE} is missing; reinstall edgesqz") from exc
    pairs = [line.split("\t", 1) for line in text.splitlines() if line]
    if len(pairs) != CLASSES or any(len(p) != 2 for p in pairs):
        raise EdgesqzError(f"edgesqz's package data {LABELS_FILE} is damaged; reinstall edgesqz")
    return Labels(tuple(p[1] for p in pairs), tuple(p[0] for p in pairs))
