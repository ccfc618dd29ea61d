"""Which model ``run``, ``classify``, ``bench``, ``info`` and ``doctor`` use when none is named.

In order: ``--model``; the ``EDGESQZ_MODEL`` environment variable; the model ``edgesqz convert``
wrote last (``latest.tflite`` in ``EDGESQZ_HOME``'s models folder); the default model installed with
the package (SqueezeNet 1.1, ImageNet, full int8, made by edgesqz's own ``convert``; see
``edgesqz/models/README.md``), so a fresh ``pip install`` classifies from the first minute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgesqz.errors import EdgesqzError
from edgesqz.fileio import file_kind

PACKAGED_MODEL = "squeezenet1_1-int8.tflite"
CONVERT_HINT = "edgesqz convert --int8 --weights squeezenet1_1.pth --calib DIR"

ORIGINS = {
    "option": "--model",
    "env": "EDGESQZ_MODEL",
    "latest": "the model edgesqz convert wrote last",
    "packaged": "the default model installed with edgesqz",
    "deployed": "the model last deployed to this device (edgesqz deploy; run --trust)",
}


class NoModelError(EdgesqzError):
    """No ``--model`` and no default model at all (as opposed to a default model that is broken)."""


@dataclass(frozen=True)
class ModelChoice:
    path: Path
    origin: str  # a key of ORIGINS

    def describe(self) -> str:
        return f"{self.path} ({ORIGINS[self.origin]})"


def packaged_model() -> Path | None:
    """The default model shipped in the package, if this install has it."""
    path = Path(str(resources.files("edgesqz") / "models" / PACKAGED_MODEL))
    return path if path.is_file() else None


def choose_model(model: str | os.PathLike[str] | None = None) -> ModelChoice:
    """The model to use and where the choice came from (see the module docstring)."""
    if model is not None:
        return ModelChoice(Path(model), "option")
    env = os.environ.get("EDGESQZ_MODEL")
    if env:
        path = Path(env).expanduser()
        if not path.exists():
            raise EdgesqzError(f"EDGESQZ_MODEL={env} does not exist; point it at a .tflite model or unset it "
                               "(unset EDGESQZ_MODEL)")
        if not path.is_file():
            raise EdgesqzError(f"EDGESQZ_MODEL={env} is {file_kind(path.stat().st_mode)}, not a .tflite model file; "
                               "point it at one or unset it (unset EDGESQZ_MODEL)")
        return ModelChoice(path, "env")
    from edgesqz.paths import default_model_path

    latest = default_model_path()
    if latest.exists():
        if not latest.is_file():
            raise EdgesqzError(f"the default model {latest} is {file_kind(latest.stat().st_mode)}, not a .tflite "
                               f"file; remove it (rm {latest}) to use the installed default model, or pass "
                               "--model FILE.tflite")
        return ModelChoice(latest, "latest")
    if latest.is_symlink():
        raise EdgesqzError(f"the default model {latest} links to {os.readlink(latest)}, which does not exist; make a "
                           f"new one with `{CONVERT_HINT}`, delete the link to use the installed default model, or "
                           "pass --model FILE.tflite")
    packaged = packaged_model()
    if packaged is not None:
        return ModelChoice(packaged, "packaged")
    raise NoModelError(f"no --model given and no converted model at {latest}; make one with `{CONVERT_HINT}` "
                       "(it is written there), or pass --model FILE.tflite")
