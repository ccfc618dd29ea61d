from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/torch_squeezenet.py

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SHARED = Path(os.environ.get("EDGESQZ_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
os.environ["EDGESQZ_SHARED"] = str(SHARED)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data folder; set EDGESQZ_SHARED to where it is)")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def real_weights() -> Path:
    return _need(SHARED / "weights" / "squeezenet1_1-torchvision-fp16r.pth")


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    folder = _need(SHARED / "data" / "photos")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".png"})


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    return _need(SHARED / "data" / "imagenet-sample-1000")


@pytest.fixture(scope="session")
def imagenet_labels() -> Path:
    return _need(SHARED / "data" / "labels" / "imagenet_class_index.json")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read or write the user's real model and weights folders from tests."""
    home = tmp_path_factory.getbasetemp() / "edgesqz-home"
    monkeypatch.setenv("EDGESQZ_HOME", str(home))
    monkeypatch.setenv("EDGESQZ_CACHE", str(home / "cache"))
