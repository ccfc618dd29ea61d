"""ImageNet-1k class names shipped as package data (edgesqz.imagenet): no network, no TensorFlow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgesqz import imagenet
from edgesqz.labels import load_labels


def test_thousand_distinct_classes_with_wnids() -> None:
    labels = imagenet.imagenet_labels()
    assert len(labels) == 1000 and labels.ids is not None and len(labels.ids) == 1000
    assert len(set(labels.names)) == 1000 and len(set(labels.ids)) == 1000
    assert list(labels.ids) == sorted(labels.ids) and all(i.startswith("n") and len(i) == 9 for i in labels.ids)
    assert labels.names[0] == "tench" and labels.names[967] == "espresso" and labels.ids[967] == "n07920052"
    assert labels.index()["n07920052"] == 967 and labels.index()["espresso"] == 967


def test_same_file_reads_with_load_labels() -> None:
    path = Path(__file__).resolve().parents[1] / "edgesqz" / "data" / imagenet.LABELS_FILE
    assert load_labels(path) == imagenet.imagenet_labels()


def test_order_and_wnids_match_the_shared_class_index(imagenet_labels: Path) -> None:
    index = json.loads(imagenet_labels.read_text())
    ours = imagenet.imagenet_labels()
    assert [index[str(i)][0] for i in range(1000)] == list(ours.ids)
    differ = [i for i in range(1000) if index[str(i)][1].replace("_", " ") != ours.names[i]]
    assert differ == [134, 639]  # torchvision's "crane bird" / "maillot tank suit" (Keras repeats the names)


@pytest.mark.parametrize("name", ["README.md", "LICENSE.torchvision.txt"])
def test_provenance_ships_beside_the_data(name: str) -> None:
    from importlib import resources

    assert resources.files("edgesqz").joinpath("data", name).is_file()
