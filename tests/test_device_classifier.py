"""edgesqz.device.classifier: preprocessing from metadata or tensor details, output kinds, labels, bad models.

Variants of the real converted model (no metadata, a class-map output, a softmax output, wrong
labels) are made by editing its flatbuffer with ai-edge-litert's schema module, and tiny models
that are not image classifiers are built the same way — no TensorFlow needed.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import cv2
import flatbuffers
import numpy as np
import pytest

from edgesqz.device.classifier import Classifier, InputSpec, load_labels
from edgesqz.errors import EdgesqzError
from edgesqz.imaging import preprocess
from edgesqz.tflite_metadata import embed_metadata

fb = pytest.importorskip("ai_edge_litert.schema_py_generated")

CLI_BOOT = ("import typer; from edgesqz.device.cli import register; "
            "app = typer.Typer(pretty_exceptions_enable=False); register(app); app()")


@pytest.fixture(scope="session")
def imagenet_labels_file() -> Path:
    shared = os.environ.get("EDGESQZ_SHARED")
    path = Path(shared) / "data" / "labels" / "imagenet_class_index.json" if shared else None
    if path is None or not path.exists():
        pytest.skip("needs $EDGESQZ_SHARED/data/labels/imagenet_class_index.json")
    return path


# --------------------------------------------------------------------------- flatbuffer editing


class _AlignedBuilder(flatbuffers.Builder):
    """Keep tensor data 16-byte aligned, as the TFLite converter does."""

    def CreateNumpyVector(self, x: np.ndarray) -> int:
        if x.dtype == np.uint8:
            self.Prep(16, x.size)
        return super().CreateNumpyVector(x)


def _load(path: Path) -> object:
    return fb.ModelT.InitFromPackedBuf(path.read_bytes(), 0)


def _pack(model: object) -> bytes:
    b = _AlignedBuilder(4 << 20)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _strip_metadata(model: object) -> object:
    model.metadata = [m for m in (model.metadata or []) if m.name not in (b"TFLITE_METADATA", "TFLITE_METADATA")]
    return model


def _write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def variants(int8_plain_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Edited copies of the real int8 model with a logits head (it has the MEAN to cut before)."""
    tmp = tmp_path_factory.mktemp("variants")
    out: dict[str, Path] = {}
    out["bare"] = _write(tmp, "bare.tflite", _pack(_strip_metadata(_load(int8_plain_model))))

    # class map: the output is the last convolution's [1, 13, 13, 1000] map (before the MEAN)
    m = _strip_metadata(_load(int8_plain_model))
    sg = m.subgraphs[0]
    mean_op = next(op for op in sg.operators if m.operatorCodes[op.opcodeIndex].builtinCode == fb.BuiltinOperator.MEAN)
    sg.outputs = [int(mean_op.inputs[0])]
    out["class_map"] = _write(tmp, "class_map.tflite", _pack(m))

    # probabilities: an int8 SOFTMAX after the MEAN (output scale 1/256, zero point -128)
    m = _strip_metadata(_load(int8_plain_model))
    sg = m.subgraphs[0]
    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.SOFTMAX
    m.operatorCodes.append(code)
    m.buffers.append(fb.BufferT())
    q = fb.QuantizationParametersT()
    q.scale, q.zeroPoint = [1 / 256], [-128]
    t = fb.TensorT()
    t.shape, t.type, t.buffer, t.name, t.quantization = [1, 1000], fb.TensorType.INT8, len(m.buffers) - 1, b"probs", q
    sg.tensors.append(t)
    op = fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = len(m.operatorCodes) - 1, [int(sg.outputs[0])], [len(sg.tensors) - 1]
    op.builtinOptionsType, op.builtinOptions = fb.BuiltinOptions.SoftmaxOptions, fb.SoftmaxOptionsT()
    op.builtinOptions.beta = 1.0
    sg.operators.append(op)
    sg.outputs = [len(sg.tensors) - 1]
    out["softmax"] = _write(tmp, "softmax.tflite", _pack(m))

    # labels that do not match the 1000 outputs
    bare = out["bare"].read_bytes()
    out["ten_labels"] = _write(tmp, "ten_labels.tflite", embed_metadata(
        bare, labels=[f"class{i}" for i in range(10)], info={}, name="x", description="x", version="1"))

    data = int8_plain_model.read_bytes()
    out["truncated"] = _write(tmp, "truncated.tflite", data[: len(data) // 2])
    out["garbage"] = _write(tmp, "garbage.tflite", np.random.default_rng(0).bytes(4096))
    out["not_classifier"] = _write(tmp, "vector_add.tflite", _add_model([[1, 10]], const_input=True))
    out["two_inputs"] = _write(tmp, "two_inputs.tflite", _add_model([[1, 8, 8, 3], [1, 8, 8, 3]]))
    return out


def _add_model(input_shapes: list[list[int]], *, const_input: bool = False) -> bytes:
    """A float ADD model: two inputs, or one input plus a constant."""
    m = fb.ModelT()
    m.version = 3
    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.ADD
    m.operatorCodes = [code]
    shape = input_shapes[0]
    const = fb.BufferT()
    const.data = np.zeros(int(np.prod(shape)), np.float32).view(np.uint8)
    m.buffers = [fb.BufferT(), fb.BufferT(), const if const_input else fb.BufferT(), fb.BufferT()]

    def tensor(i: int, s: list[int]) -> object:
        t = fb.TensorT()
        t.shape, t.type, t.buffer, t.name = s, fb.TensorType.FLOAT32, i + 1, f"t{i}".encode()
        return t

    sg = fb.SubGraphT()
    sg.tensors = [tensor(0, shape), tensor(1, input_shapes[-1]), tensor(2, shape)]
    sg.inputs = [0] if const_input else [0, 1]
    sg.outputs = [2]
    op = fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    op.builtinOptionsType, op.builtinOptions = fb.BuiltinOptions.AddOptions, fb.AddOptionsT()
    sg.operators = [op]
    m.subgraphs = [sg]
    return _pack(m)


# --------------------------------------------------------------------------- the real model


def test_classify_shared_photos_int8(int8_model: Path, photos_dir: Path) -> None:
    clf = Classifier(int8_model, threads=1)
    assert clf.backend.name == "ai_edge_litert"
    assert clf.coverage.full, clf.describe_runtime()
    assert clf.spec.mode == "raw" and clf.output_kind == "probabilities" and clf.num_classes == 1000
    coffee = clf.classify(cv2.imread(str(photos_dir / "coffee.png")))
    assert coffee[0][0] == "espresso"
    assert len(coffee) == 5 and all(a[1] >= b[1] for a, b in itertools.pairwise(coffee))
    cat = clf.classify(cv2.imread(str(photos_dir / "chelsea.png")), top_k=1)
    assert cat[0][0] in {"Egyptian cat", "tiger cat", "tabby"}
    hopper = clf.classify(cv2.imread(str(photos_dir / "grace_hopper.jpg")))
    assert "military uniform" in [label for label, _ in hopper]


def test_float_model_agrees_with_int8(int8_model: Path, float_model: Path, photos_dir: Path) -> None:
    q, f = Classifier(int8_model, threads=1), Classifier(float_model, threads=1)
    assert f.spec.mode == "float_raw"
    for name in ("coffee.png", "chelsea.png"):
        img = cv2.imread(str(photos_dir / name))
        sq, sf = q.scores(img).scores, f.scores(img).scores
        assert sq.shape == sf.shape == (1000,)
        assert abs(float(sq.sum()) - 1) < 1e-3 and abs(float(sf.sum()) - 1) < 1e-3
        assert int(np.argmax(sf)) in np.argsort(-sq)[:2]


def test_rgb_input_and_bgr_input_agree(int8_model: Path, photos_dir: Path) -> None:
    clf = Classifier(int8_model, threads=1)
    bgr = cv2.imread(str(photos_dir / "coffee.png"))
    a = clf.scores(bgr).scores
    b = clf.scores(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), bgr=False).scores
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("which", ["int8_model", "int8_class_map_model"])
def test_prepare_is_the_shared_preprocessing(which: str, photos_dir: Path, request: pytest.FixtureRequest) -> None:
    clf = Classifier(request.getfixturevalue(which), threads=1)
    img = cv2.imread(str(photos_dir / "grace_hopper.jpg"))
    tensor = clf.prepare(img)
    rgb = preprocess(img, 224, 224 / 256)
    assert tensor.shape == (1, 224, 224, 3)
    if which == "int8_model":  # the standard model takes the raw pixels
        assert tensor.dtype == np.uint8 and clf.spec.mode == "raw"
        np.testing.assert_array_equal(tensor[0], rgb)
    else:  # edgesqz 0.x's int8 input: exactly pixel - 128
        assert tensor.dtype == np.int8 and clf.spec.mode == "xor"
        np.testing.assert_array_equal(tensor[0].astype(np.int16), rgb.astype(np.int16) - 128)


def test_timings_threshold_and_top(int8_model: Path, photos_dir: Path) -> None:
    clf = Classifier(int8_model, threads=1, top_k=3, threshold=0.05)
    out = clf.scores(cv2.imread(str(photos_dir / "coffee.png")))
    assert set(out.timings) == {"preprocess", "inference", "postprocess"}
    assert all(v >= 0 for v in out.timings.values()) and out.timings["inference"] > 0
    top = clf.top(out.scores)
    assert [p["label"] for p in top] == ["espresso", "consomme"]  # the rest score below 0.05
    assert set(top[0]) == {"index", "label", "score"} and top[0]["index"] == 967
    assert len(clf.top(out.scores, k=10, threshold=0.0)) == 10


# --------------------------------------------------------------------------- without metadata


def test_model_without_metadata_works_from_tensor_details(variants: dict[str, Path], int8_plain_model: Path,
                                                          photos_dir: Path, imagenet_labels_file: Path) -> None:
    img = cv2.imread(str(photos_dir / "coffee.png"))
    bare = Classifier(variants["bare"], threads=1)
    assert bare.labels is None and bare.metadata.info == {}
    assert bare.spec.mode == "xor" and bare.spec.size == 224 and bare.output_kind == "logits"
    ref = Classifier(int8_plain_model, threads=1).scores(img).scores
    np.testing.assert_array_equal(bare.scores(img).scores, ref)
    assert bare.classify(img, top_k=1)[0][0] == "967"  # no labels: class indices
    named = Classifier(variants["bare"], threads=1, labels=imagenet_labels_file)
    assert named.classify(img, top_k=1)[0][0] == "espresso"


def test_class_map_output_is_averaged(variants: dict[str, Path], int8_plain_model: Path, photos_dir: Path) -> None:
    clf = Classifier(variants["class_map"], threads=1, labels=Classifier(int8_plain_model).labels)
    assert clf.output_kind == "class_map" and clf.num_classes == 1000
    assert clf.classify(cv2.imread(str(photos_dir / "coffee.png")), top_k=1)[0][0] == "espresso"
    with pytest.raises(EdgesqzError, match="does not fit its output"):
        Classifier(variants["class_map"], output_kind="logits")


def test_softmax_output_is_probabilities(variants: dict[str, Path], int8_plain_model: Path, photos_dir: Path) -> None:
    clf = Classifier(variants["softmax"], threads=1, labels=Classifier(int8_plain_model).labels)
    assert clf.output_kind == "probabilities"
    scores = clf.scores(cv2.imread(str(photos_dir / "coffee.png"))).scores
    assert abs(float(scores.sum()) - 1) < 0.05
    assert clf.labels[int(np.argmax(scores))] == "espresso"


@pytest.mark.parametrize(("dtype", "scale", "zp", "mean", "std"), [
    (np.uint8, 1.0, 0, (0.0,), (1.0,)),
    (np.uint8, 1 / 128, 128, (127.5,), (127.5,)),
    (np.int8, 0.0078125, -1, (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)),
    (np.float32, 0.0, 0, (127.5,), (127.5,)),
])
def test_input_quantisation_general(dtype: type, scale: float, zp: int, mean: tuple, std: tuple) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    spec = InputSpec(size=224, dtype=np.dtype(dtype), scale=scale, zero_point=zp, mean=mean, std=std)
    x = spec.to_tensor(rgb)
    assert x.shape == (1, 224, 224, 3) and x.dtype == dtype
    real = (rgb.astype(np.float64) - np.asarray(mean)) / np.asarray(std)
    if dtype == np.float32:
        np.testing.assert_allclose(x[0], real, rtol=1e-5, atol=1e-5)
    else:
        info = np.iinfo(dtype)
        expect = np.clip(np.rint(real / scale + zp), info.min, info.max)
        assert np.max(np.abs(x[0].astype(np.float64) - expect)) <= 1  # float32 rounding at .5 boundaries


def test_bgr_model_input_order() -> None:
    rgb = np.zeros((224, 224, 3), np.uint8)
    rgb[..., 0] = 200  # red
    spec = InputSpec(size=224, dtype=np.dtype(np.uint8), scale=1.0, zero_point=0, color_order="BGR")
    assert spec.mode == "raw"
    assert spec.to_tensor(rgb)[0, 0, 0].tolist() == [0, 0, 200]


def test_load_labels_formats(tmp_path: Path, imagenet_labels_file: Path) -> None:
    (tmp_path / "l.txt").write_text("a\nb c\r\nd\n")
    assert load_labels(tmp_path / "l.txt") == ["a", "b c", "d"]
    (tmp_path / "l.json").write_text('["x", "y"]')
    assert load_labels(tmp_path / "l.json") == ["x", "y"]
    labels = load_labels(imagenet_labels_file)
    assert len(labels) == 1000 and labels[967] == "espresso"
    with pytest.raises(EdgesqzError, match="does not exist"):
        load_labels(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- bad models


@pytest.mark.parametrize(("variant", "message"), [
    ("truncated", "is not a valid .tflite model"),
    ("garbage", "is not a valid .tflite model"),
    ("not_classifier", "is not an image classifier: its input has shape [1, 10]"),
    ("two_inputs", "is not an image classifier: it has 2 inputs"),
    ("ten_labels", "has 10 labels but the model outputs 1000 classes"),
])
def test_bad_models_raise_one_clear_error(variants: dict[str, Path], variant: str, message: str) -> None:
    with pytest.raises(EdgesqzError) as info:
        Classifier(variants[variant])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_wrong_label_file_and_options(variants: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(EdgesqzError, match="has 3 labels but the model outputs 1000"):
        Classifier(variants["bare"], labels=tmp_path / "three.txt")
    with pytest.raises(EdgesqzError, match="top-k"):
        Classifier(variants["bare"], top_k=0)
    with pytest.raises(EdgesqzError, match="output kind"):
        Classifier(variants["bare"], output_kind="boxes")
    with pytest.raises(EdgesqzError, match="does not exist"):
        Classifier(tmp_path / "missing.tflite")


def test_corrupted_weights_do_not_crash(int8_model: Path, tmp_path: Path, photos_dir: Path) -> None:
    """Bytes flipped all over the file: a clear error or (weights only) wrong scores, never a dead process."""
    data = bytearray(int8_model.read_bytes())
    rng = np.random.default_rng(7)
    for i in rng.integers(0, len(data), 200):
        data[int(i)] ^= 0xFF
    bad = _write(tmp_path, "flipped.tflite", bytes(data))
    code = ("import sys, cv2; from edgesqz.device.classifier import Classifier; from edgesqz.errors import "
            "EdgesqzError\ntry:\n    print(Classifier(sys.argv[1]).classify(cv2.imread(sys.argv[2]))[:1])\n"
            "except EdgesqzError as e:\n    print('error:', e)")
    p = subprocess.run([sys.executable, "-c", code, str(bad), str(photos_dir / "coffee.png")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.parametrize(("variant", "message"), [
    ("truncated", "not a valid .tflite model"),
    ("garbage", "not a valid .tflite model"),
    ("not_classifier", "is not an image classifier"),
    ("ten_labels", "has 10 labels but the model outputs 1000 classes"),
])
def test_cli_bad_models(variants: dict[str, Path], photos_dir: Path, variant: str, message: str) -> None:
    for command in (["classify", str(photos_dir / "coffee.png")], ["run", "--source", str(photos_dir)]):
        p = subprocess.run([sys.executable, "-c", CLI_BOOT, *command, "--model", str(variants[variant])],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], p.stderr
        assert p.stdout == ""


# --------------------------------------------------------------------------- the standard head (issue 18)


@pytest.mark.parametrize("output", ["float32", "uint8"])
def test_standard_head_models_read_as_probabilities(int8_class_map_model: Path, tmp_path: Path, photos_dir: Path,
                                                    output: str) -> None:
    """A standard model (uint8 in, [1, C] probabilities out) with and without metadata; older class maps too."""
    from edgesqz.converters.standard_head import add_probability_head

    int8_model = int8_class_map_model  # edgesqz 0.x's int8 contract: int8 in, class map out
    standard = add_probability_head(int8_model.read_bytes(), output=output)  # type: ignore[arg-type]
    with_meta = _write(tmp_path, "standard.tflite", standard)
    bare = _write(tmp_path, "standard_bare.tflite", _pack(_strip_metadata(fb.ModelT.InitFromPackedBuf(standard, 0))))
    img = cv2.imread(str(photos_dir / "coffee.png"))
    old = Classifier(int8_model, threads=1)  # the class-map model still reads
    assert old.output_kind == "class_map"
    expected = old.scores(img).scores
    for path in (with_meta, bare):
        clf = Classifier(path, threads=1, labels=old.labels)
        assert clf.output_kind == "probabilities" and clf.spec.dtype == np.uint8 and clf.spec.mode == "raw"
        scores = clf.scores(img).scores
        assert abs(float(scores.sum()) - 1) < (1e-4 if output == "float32" else 0.05)
        assert clf.classify(img, top_k=1)[0][0] == "espresso"
        np.testing.assert_allclose(scores, expected, atol=1e-5 if output == "float32" else 1 / 256)
