"""Pretrained weights: one object per file, carrying its metadata (as torchvision's ``Weights``).

``TORCHVISION["1_1"]`` describes torchvision's ``squeezenet1_1-b8a52dc0.pth``: where it lives,
the sha256 prefix in its name, the preprocessing it was trained with and its published accuracy.
:func:`download` fetches it once into the cache (``EDGESQZ_CACHE``), checks the hash, and
writes atomically. ``EDGESQZ_TORCHVISION_BASE_URL`` points the download at a mirror or a local
server (air-gapped installs, tests).

"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgesqz.architecture import Architecture, architecture
from edgesqz.errors import EdgesqzError
from edgesqz.imaging import Preprocessing
from edgesqz.paths import cache_dir

if TYPE_CHECKING:
    import keras

TORCHVISION_BASE_URL = "https://download.pytorch.org/models/"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.pth$")


@dataclass(frozen=True)
class Weights:
    """A pretrained weights file and everything known about it."""

    version: str
    filename: str
    base_url: str = TORCHVISION_BASE_URL
    num_classes: int = 1000
    num_params: int = 0
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    metrics: dict[str, float] = field(default_factory=dict)
    recipe: str = "https://github.com/pytorch/vision/pull/49#issuecomment-277560717"

    @property
    def url(self) -> str:
        base = os.environ.get("EDGESQZ_TORCHVISION_BASE_URL", self.base_url)
        return base.rstrip("/") + "/" + self.filename

    @property
    def sha256_prefix(self) -> str:
        match = _HASH_IN_NAME.search(self.filename)
        assert match, self.filename
        return match.group(1)

    def meta(self) -> dict[str, Any]:
        return {
            "version": self.version, "url": self.url, "sha256_prefix": self.sha256_prefix,
            "num_classes": self.num_classes, "num_params": self.num_params,
            "preprocessing": self.preprocessing.to_dict(), "metrics": dict(self.metrics),
        }


# Published ImageNet-1k validation accuracy (torchvision documentation, 224 px, resize 256).
TORCHVISION: dict[str, Weights] = {
    "1_0": Weights("1_0", "squeezenet1_0-b66bff10.pth", num_params=1248424,
                   metrics={"acc@1": 58.092, "acc@5": 80.420}),
    "1_1": Weights("1_1", "squeezenet1_1-b8a52dc0.pth", num_params=1235496,
                   metrics={"acc@1": 58.178, "acc@5": 80.624}),
}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(weights: Weights, directory: str | Path | None = None, *, timeout: float = 60.0) -> Path:
    """Return the cached file for ``weights``, downloading and hash-checking it the first time."""
    directory = Path(directory) if directory is not None else cache_dir() / "weights"
    target = directory / weights.filename
    if target.exists():
        if sha256_file(target).startswith(weights.sha256_prefix):
            return target
        raise EdgesqzError(
            f"cached weights {target} do not match the sha256 prefix {weights.sha256_prefix}; delete the file "
            "and run again to download it anew"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgesqzError(f"cannot create the weights cache {directory}: {exc.strerror}; set EDGESQZ_CACHE") from exc
    fd, tmp_name = tempfile.mkstemp(prefix=f".{weights.filename}.", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(weights.url, timeout=timeout) as response:
                    shutil.copyfileobj(response, out, 1 << 20)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                raise EdgesqzError(
                    f"cannot download {weights.url} ({reason}); on a machine without internet download "
                    f"{weights.filename} elsewhere and pass its path to --weights, or set "
                    "EDGESQZ_TORCHVISION_BASE_URL to a mirror"
                ) from exc
        digest = sha256_file(tmp_name)
        if not digest.startswith(weights.sha256_prefix):
            raise EdgesqzError(
                f"downloaded {weights.filename} has sha256 {digest[:16]}..., expected {weights.sha256_prefix}...; "
                "the download is corrupt or the mirror serves another file"
            )
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights argument (``torchvision``, a ``.pth``, a ``.keras`` model) made concrete."""

    kind: str  # "torch" | "keras_model" | "keras_weights"
    path: Path
    sha256: str
    source: str  # what the user asked for

    def meta(self) -> dict[str, Any]:
        return {"source": self.source, "file": self.path.name, "sha256": self.sha256, "kind": self.kind}


def resolve(spec: str | os.PathLike[str], version: str | Architecture = "1_1") -> ResolvedWeights:
    """Turn ``torchvision`` / ``imagenet`` / a file path into a local, hashed file.

    ``version``: which torchvision file ``torchvision`` means ("1_0" or "1_1", or their architecture).
    """
    spec_str = os.fspath(spec)
    if spec_str in ("torchvision", "imagenet"):
        arch = architecture(version)
        key = arch.short_name
        if key not in TORCHVISION or arch.batch_norm:
            raise EdgesqzError(f"--weights {spec_str}: torchvision publishes weights for SqueezeNet 1.0 and 1.1 "
                               f"only, not {arch.label}; pass your own .pth or .keras file")
        path = download(TORCHVISION[key])
        return ResolvedWeights("torch", path, sha256_file(path), spec_str)
    path = Path(spec_str).expanduser()
    if not path.exists():
        raise EdgesqzError(
            f"weights file {path} does not exist; pass a .pth state_dict, a .keras model or 'torchvision'"
        )
    if not path.is_file():
        raise EdgesqzError(f"weights path {path} is not a file")
    name = path.name.lower()
    if name.endswith(".keras"):
        kind = "keras_model"
    elif name.endswith(".weights.h5") or name.endswith(".h5"):
        kind = "keras_weights"
    else:
        kind = "torch"
    match = _HASH_IN_NAME.search(path.name)
    digest = sha256_file(path)
    if match and kind == "torch" and not digest.startswith(match.group(1)):
        raise EdgesqzError(
            f"{path} is named for sha256 {match.group(1)}... but its sha256 is {digest[:16]}...; the file is "
            "corrupt or truncated: download it again"
        )
    return ResolvedWeights(kind, path, digest, spec_str)


def load_weights_into(model: keras.Model, weights: str | os.PathLike[str], *,
                      arch: Architecture | str = "1_1") -> ResolvedWeights:
    """Load ``weights`` (see :func:`resolve`) into a SqueezeNet built by :func:`edgesqz.squeezenet.SqueezeNet`."""
    arch = architecture(arch)
    resolved = resolve(weights, arch)
    if resolved.kind == "torch":
        from edgesqz.converters.torch_import import load_state_dict, state_dict_to_keras

        state = load_state_dict(resolved.path)
        state_dict_to_keras(state, model, arch=arch)
    elif resolved.kind == "keras_weights":
        try:
            model.load_weights(resolved.path)
        except (ValueError, OSError) as exc:
            raise EdgesqzError(f"cannot load Keras weights {resolved.path}: {str(exc).splitlines()[0]}") from exc
    else:
        raise EdgesqzError(f"{resolved.path} is a whole Keras model; load it with keras.saving.load_model instead")
    return resolved
