"""Weight files: download + cache + hash check (against a local HTTP server), and import errors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("keras")

from torch_squeezenet import SqueezeNet as TorchSqueezeNet  # noqa: E402

from edgesqz.converters.torch_import import load_state_dict, state_dict_to_keras  # noqa: E402
from edgesqz.errors import EdgesqzError  # noqa: E402
from edgesqz.squeezenet import SqueezeNet  # noqa: E402
from edgesqz.weights import Weights, download, resolve  # noqa: E402


class _Server:
    def __init__(self, root: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.requests = 0
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.owner.requests += 1  # type: ignore[attr-defined]
        super().do_GET()


@pytest.fixture(scope="module")
def torch_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A real (randomly initialised) SqueezeNet 1.1 state_dict named like torchvision's files."""
    root = tmp_path_factory.mktemp("mirror")
    torch.manual_seed(0)
    tmp = root / "tmp.pth"
    torch.save(TorchSqueezeNet("1_1").state_dict(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    final = root / f"squeezenet1_1-{digest[:8]}.pth"
    tmp.rename(final)
    return final, digest


@pytest.fixture
def server(torch_state: tuple[Path, str]) -> Iterator[_Server]:
    srv = _Server(torch_state[0].parent)
    yield srv
    srv.close()


def test_download_checks_hash_and_caches(server: _Server, torch_state: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = torch_state
    weights = Weights("1_1", path.name, base_url=server.url)
    cached = download(weights, tmp_path)
    assert cached.read_bytes() == path.read_bytes()
    assert server.requests == 1
    server.close()  # second call must not touch the network
    assert download(weights, tmp_path) == cached
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no .part files left


def test_download_rejects_wrong_hash(server: _Server, torch_state: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = torch_state
    wrong = path.parent / "squeezenet1_1-00000000.pth"
    wrong.write_bytes(path.read_bytes())
    with pytest.raises(EdgesqzError, match="expected 00000000"):
        download(Weights("1_1", wrong.name, base_url=server.url), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_without_network_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESQZ_TORCHVISION_BASE_URL", "http://127.0.0.1:9/")  # discard port: refused
    with pytest.raises(EdgesqzError, match=r"cannot download .* pass its path to --weights"):
        download(Weights("1_1", "squeezenet1_1-b8a52dc0.pth"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_resolve_torchvision_uses_mirror(server: _Server, torch_state: tuple[Path, str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path, digest = torch_state
    monkeypatch.setenv("EDGESQZ_TORCHVISION_BASE_URL", server.url)
    monkeypatch.setattr("edgesqz.weights.TORCHVISION", {"1_1": Weights("1_1", path.name)})
    resolved = resolve("torchvision", "1_1")
    assert resolved.sha256 == digest and resolved.kind == "torch"
    model = SqueezeNet("1_1", weights="imagenet", classifier_activation=None)
    reference = TorchSqueezeNet("1_1")
    reference.load_state_dict(torch.load(path, weights_only=True))
    x = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(model(x).numpy(), expected, atol=1e-5)


def test_resolve_detects_truncated_hashed_file(torch_state: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = torch_state
    broken = tmp_path / path.name
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(EdgesqzError, match="corrupt or truncated"):
        resolve(broken, "1_1")


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a pickle at all" * 10)
    with pytest.raises(EdgesqzError, match="cannot read weights"):
        load_state_dict(bad)
    with pytest.raises(EdgesqzError, match="does not exist"):
        resolve(tmp_path / "nope.pth", "1_1")


def test_any_corrupt_file_is_an_edgesqz_error(tmp_path: Path) -> None:
    """Random bytes make torch's weights-only unpickler raise IndexError, KeyError, ... (seen: 5 in 100)."""
    import random

    rng = random.Random(0)
    bad = tmp_path / "random.pth"
    for _ in range(200):
        bad.write_bytes(rng.randbytes(rng.choice([16, 512, 4096])))
        with pytest.raises(EdgesqzError, match="cannot read weights"):
            load_state_dict(bad)


def _state(version: str = "1_1", classes: int = 1000) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in TorchSqueezeNet(version, classes).state_dict().items()}


def test_wrong_version_is_named() -> None:
    model = SqueezeNet("1_1")
    with pytest.raises(EdgesqzError, match=r"are SqueezeNet 1\.0 .*pass --arch 1_0"):
        state_dict_to_keras(_state("1_0"), model, version="1_1")


def test_wrong_class_count_is_named() -> None:
    with pytest.raises(EdgesqzError, match="10 classes but the model has 1000"):
        state_dict_to_keras(_state("1_1", 10), SqueezeNet("1_1"), version="1_1")


def test_missing_unexpected_and_misshaped_keys_in_one_error() -> None:
    state = _state()
    del state["features.3.squeeze.bias"]
    state["features.99.weight"] = np.zeros(3, np.float32)
    state["features.4.expand1x1.weight"] = np.zeros((64, 16, 3, 3), np.float32)
    with pytest.raises(EdgesqzError) as info:
        state_dict_to_keras(state, SqueezeNet("1_1"), version="1_1")
    message = str(info.value)
    assert "missing features.3.squeeze.bias" in message
    assert "unexpected features.99.weight" in message
    assert "features.4.expand1x1.weight: 64x16x3x3 (expected 64x16x1x1)" in message
    assert "\n" not in message
