"""Standard TFLite metadata (TFLITE_METADATA + zip of associated files) on a real converted model."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgesqz.errors import EdgesqzError
from edgesqz.tflite_metadata import (
    INFO_FILE,
    LABELS_FILE,
    METADATA_NAME,
    ModelMetadata,
    embed_metadata,
    read_metadata,
)

LABELS = ["cat", "dog", "goldfish", "tabby, tabby cat", "ünïcode"]
INFO = {"arch": "squeezenet1_1", "input_size": 8, "quantization": "float32", "top1": 0.5}
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


@pytest.fixture(scope="module")
def plain_model() -> bytes:
    """A tiny real TFLite classifier converted by TensorFlow."""
    tf = pytest.importorskip("tensorflow")
    inp = tf.keras.Input((8, 8, 3), batch_size=1)
    x = tf.keras.layers.Conv2D(4, 3, activation="relu")(inp)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    out = tf.keras.layers.Dense(len(LABELS), activation="softmax")(x)
    model = tf.keras.Model(inp, out)
    return bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def _embed(model: bytes, **overrides: object) -> bytes:
    kwargs: dict = dict(
        labels=LABELS,
        info=INFO,
        name="SqueezeNet 1.1",
        description="ImageNet classifier",
        version="0.1.0",
        mean=MEAN,
        std=STD,
        input_min=0.0,
        input_max=255.0,
    )
    kwargs.update(overrides)
    return embed_metadata(model, **kwargs)


@pytest.fixture(scope="module")
def embedded(plain_model: bytes) -> bytes:
    return _embed(plain_model)


def _schema_model(buf: bytes):  # host-side checks with LiteRT's generated schema
    from ai_edge_litert import schema_py_generated as fb

    return fb.ModelT.InitFromPackedBuf(buf, 0)


def _metadata_names(buf: bytes) -> list[str]:
    return [m.name.decode() for m in _schema_model(buf).metadata or []]


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"]).copy()


def test_round_trip(embedded: bytes) -> None:
    meta = read_metadata(embedded)
    assert meta.has_tflite_metadata
    assert (meta.name, meta.description, meta.version) == ("SqueezeNet 1.1", "ImageNet classifier", "0.1.0")
    assert meta.labels == LABELS
    assert meta.info == INFO
    assert meta.mean == pytest.approx(MEAN, rel=1e-6)
    assert meta.std == pytest.approx(STD, rel=1e-6)
    assert meta.associated_files == [LABELS_FILE, INFO_FILE]


def test_read_from_path(embedded: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.tflite"
    path.write_bytes(embedded)
    assert read_metadata(path) == read_metadata(str(path)) == read_metadata(embedded)


def test_model_still_runs_identically(plain_model: bytes, embedded: bytes) -> None:
    x = np.random.default_rng(0).uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)
    assert np.array_equal(_run(plain_model, x), _run(embedded, x))


def test_existing_metadata_kept_and_tensor_data_aligned(plain_model: bytes, embedded: bytes) -> None:
    before = _metadata_names(plain_model)
    after = _metadata_names(embedded)
    assert after == [*before, METADATA_NAME]
    # Weights stay 16-byte aligned in the rebuilt flatbuffer, as the converter wrote them.
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAs(embedded, 0)
    for i in range(model.BuffersLength()):
        buf = model.Buffers(i)
        if buf.DataLength():
            start = buf._tab.Vector(buf._tab.Offset(4))
            assert start % 16 == 0, f"buffer {i} starts at {start}"


def test_reembed_replaces(plain_model: bytes, embedded: bytes) -> None:
    again = _embed(embedded, labels=["a", "b", "c", "d", "e"], info={"v": 2}, version="0.2.0", mean=None, std=None)
    assert _metadata_names(again).count(METADATA_NAME) == 1
    assert len(_schema_model(again).buffers) == len(_schema_model(embedded).buffers)
    meta = read_metadata(again)
    assert meta.labels == ["a", "b", "c", "d", "e"]
    assert meta.info == {"v": 2}
    assert meta.version == "0.2.0"
    assert meta.mean is None and meta.std is None
    assert meta.associated_files == [LABELS_FILE, INFO_FILE]  # old zip tail stripped, no duplicates
    # Embedding the same thing twice gives the same bytes.
    assert _embed(embedded) == embedded
    x = np.ones((1, 8, 8, 3), np.float32)
    assert np.array_equal(_run(plain_model, x), _run(again, x))


def test_zipfile_reads_labels_from_model_file(embedded: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.tflite"
    path.write_bytes(embedded)
    with zipfile.ZipFile(path) as zf:
        assert zf.read(LABELS_FILE).decode("utf-8").splitlines() == LABELS
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())


def test_without_labels(plain_model: bytes) -> None:
    meta = read_metadata(_embed(plain_model, labels=None, mean=None, std=None, input_min=None, input_max=None))
    assert meta.labels is None
    assert meta.info == INFO
    assert meta.associated_files == [INFO_FILE]
    assert meta.has_tflite_metadata


def test_model_without_metadata_reads_empty(plain_model: bytes) -> None:
    assert read_metadata(plain_model) == ModelMetadata(
        name=None,
        description=None,
        version=None,
        labels=None,
        info={},
        mean=None,
        std=None,
        has_tflite_metadata=False,
        associated_files=[],
    )


def _corruptions(embedded: bytes) -> list[bytes]:
    n = len(embedded)
    flipped = bytearray(embedded)
    flipped[0:4] = b"\xff\xff\xff\x7f"  # root offset far outside the file
    return [
        b"",
        b"TFL3",
        b"not a model at all, just text",
        embedded[:3] + b"X" + embedded[4:],  # still starts fine but no TFL3 (offset 4 checked)
        embedded[:8],
        embedded[:64],
        embedded[: n // 2],
        embedded[: n - 10],  # zip tail cut: metadata lists files that are gone
        bytes(flipped),
        b"\x10\x00\x00\x00TFL3" + bytes(range(256)) * 4,
    ]


def test_corrupt_input_raises_edgesqz_error(embedded: bytes) -> None:
    for i, bad in enumerate(_corruptions(embedded)):
        with pytest.raises(EdgesqzError, match=r"not a valid \.tflite model") as err:
            read_metadata(bad)
        assert "\n" not in str(err.value), i


def test_fuzzed_bytes_never_leak_raw_exceptions(embedded: bytes) -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        buf = bytearray(embedded)
        for pos in rng.integers(8, len(buf), 8):
            buf[pos] = int(rng.integers(0, 256))
        with contextlib.suppress(EdgesqzError):
            read_metadata(bytes(buf))


def test_missing_file_and_bad_embed_input(tmp_path: Path, plain_model: bytes) -> None:
    with pytest.raises(EdgesqzError, match="cannot read model file"):
        read_metadata(tmp_path / "nope.tflite")
    with pytest.raises(EdgesqzError, match=r"not a valid \.tflite model"):
        _embed(b"garbage bytes here")
    with pytest.raises(EdgesqzError, match="mean and std"):
        _embed(plain_model, std=None)
    with pytest.raises(EdgesqzError, match="line break"):
        _embed(plain_model, labels=["ok", "two\nlines"])


def test_reader_needs_no_tensorflow_or_litert(embedded: bytes, tmp_path: Path) -> None:
    """The Raspberry Pi reader: stdlib + flatbuffers + numpy only."""
    path = tmp_path / "model.tflite"
    path.write_bytes(embedded)
    code = (
        "import sys\n"
        "for m in ('tensorflow', 'ai_edge_litert', 'tflite_runtime', 'torch', 'keras'):\n"
        "    sys.modules[m] = None\n"
        "from edgesqz.tflite_metadata import read_metadata\n"
        f"meta = read_metadata({str(path)!r})\n"
        "print(meta.labels[0], meta.info['arch'])\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env={"PYTHONPATH": str(root)}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cat", "squeezenet1_1"]
