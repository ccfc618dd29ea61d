"""Where edgesqz reads and writes by default.

- ``EDGESQZ_HOME`` (default ``~/.local/share/edgesqz``): models that ``convert`` writes when no
  ``-o`` is given; ``run`` and ``classify`` pick the last one up from there.
- ``EDGESQZ_CACHE`` (default ``~/.cache/edgesqz``): downloaded weights.
- ``EDGESQZ_SHARED``: the development data folder (tests and benchmarks only), default
  ``../shared`` next to the checkout.
"""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    default = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "edgesqz"
    return Path(os.environ.get("EDGESQZ_HOME", default)).expanduser()


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgesqz"
    return Path(os.environ.get("EDGESQZ_CACHE", default)).expanduser()


def default_model_path() -> Path:
    """The model ``convert`` writes when no ``-o`` is given, and ``run`` uses with no ``--model``."""
    return home_dir() / "models" / "latest.tflite"


def shared_dir() -> Path:
    """The development data folder (weights, photos, labels) that the project never contains."""
    env = os.environ.get("EDGESQZ_SHARED")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").exists():
        return checkout.parent / "shared"
    return Path.cwd().parent / "shared"
