"""converters.standard_head: an int8 class-map model becomes a standard classifier (issue 18).

The contract the standard clients need: uint8 input, ONE float32 (or uint8) ``[1, C]`` output of
probabilities; and what edgesqz needs on top: the same top-1 as the class-map model averaged in
float, XNNPACK over the whole graph, the embedded metadata kept.
"""

from __future__ import annotations

import functools
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgesqz.converters.quantize import pool_class_map
from edgesqz.converters.standard_head import (
    add_probability_head,
    add_probability_head_info,
    standard_classifier_problems,
)
from edgesqz.errors import EdgesqzError


@functools.lru_cache(maxsize=16)
def _interpreter(model: bytes, threads: int = 1):  # the runtime's Interpreter, one per model (tests run serially)
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model, num_threads=threads)
    it.allocate_tensors()
    return it


def _run(model: bytes, rgb: np.ndarray) -> np.ndarray:
    """Raw output of ``model`` on one uint8 RGB image (int8 inputs get ``pixel - 128``)."""
    it = _interpreter(model)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    x = (rgb ^ 0x80).view(np.int8) if inp["dtype"] == np.int8 else rgb
    it.set_tensor(inp["index"], x[None])
    it.invoke()
    return it.get_tensor(out["index"])[0]


def _pooled(model: bytes, rgb: np.ndarray) -> np.ndarray:
    """Logits of a class-map model: its int8 map averaged in float (what the device does)."""
    it = _interpreter(model)
    scale, zero = it.get_output_details()[0]["quantization"]
    return pool_class_map(_run(model, rgb), scale, zero)


# --- a small int8 class-map model, built once (TensorFlow) ----------------------------------------


@pytest.fixture(scope="module")
def small_class_map() -> bytes:
    """Pixels in (int8, ``pixel - 128``), ReLU'd conv map ``[1, 6, 6, 10]`` out, like SqueezeNet's classifier."""
    pytest.importorskip("tensorflow")
    import keras

    from edgesqz.converters.export import representative_dataset, to_tflite
    from edgesqz.quiet import captured_output

    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 3), batch_size=1, name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(10, 2, activation="relu", name="classifier")(x)
    model = keras.Model(inputs, x)
    images = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    with captured_output([]):
        return to_tflite(model, "int8", representative=representative_dataset(images))


def _images(n: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(("conversion", "pool"), [("dequantize_quantize", "exact_mean"),
                                                  ("dequantize_quantize", "mean"), ("quantize", "mean")])
def test_contract_uint8_in_one_probability_vector_out(small_class_map: bytes, conversion: str, pool: str) -> None:
    model = add_probability_head(small_class_map, input_conversion=conversion, pool=pool)  # type: ignore[arg-type]
    assert standard_classifier_problems(model) == []
    assert standard_classifier_problems(small_class_map) != []
    it = _interpreter(model)
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    assert inp["dtype"] == np.uint8 and list(inp["shape"]) == [1, 16, 16, 3] and inp["quantization"] == (1.0, 0)
    assert out["dtype"] == np.float32 and list(out["shape"]) == [1, 10]
    for rgb in _images(6):
        probs = _run(model, rgb)
        assert probs.min() >= 0 and abs(float(probs.sum()) - 1) < 1e-5
        logits = _pooled(small_class_map, rgb)
        np.testing.assert_allclose(probs, np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum(),
                                   rtol=1e-4, atol=1e-6)


def test_xnnpack_coverage(small_class_map: bytes) -> None:
    from edgesqz.device.runtime import delegate_coverage

    def coverage(**options: str) -> tuple[int, int]:
        cov = delegate_coverage(_interpreter(add_probability_head(small_class_map, **options)))  # type: ignore[arg-type]
        return cov.total_ops - cov.delegated_ops, cov.partitions

    assert coverage() == (0, 1)  # DEQUANTIZE + QUANTIZE input, float tail: all in XNNPACK
    assert coverage(pool="exact_mean") == (1, 2)  # the CAST int8 -> float32 runs in TFLite's own kernel
    # one QUANTIZE uint8 -> int8 is left to TFLite's own kernel (that is why it is not the default)
    assert coverage(pool="mean", input_conversion="quantize") == (1, 1)


@pytest.mark.parametrize("pool", ["exact_mean", "mean"])
def test_signature_runner_points_at_the_new_tensors(small_class_map: bytes, pool: str) -> None:
    it = _interpreter(add_probability_head(small_class_map, pool=pool))  # type: ignore[arg-type]
    runner = it.get_signature_runner()
    (in_name,) = runner.get_input_details()
    (out_name,) = runner.get_output_details()
    rgb = _images(1)[0]
    probs = runner(**{in_name: rgb[None]})[out_name]
    assert probs.shape == (1, 10) and abs(float(probs.sum()) - 1) < 1e-5


def test_variants_agree(small_class_map: bytes) -> None:
    base = add_probability_head(small_class_map)
    mean = add_probability_head(small_class_map, pool="mean")
    pool = add_probability_head(small_class_map, pool="average_pool")
    keep = add_probability_head(small_class_map, uint8_input=False)
    u8 = add_probability_head(small_class_map, output="uint8")
    assert _interpreter(keep).get_input_details()[0]["dtype"] == np.int8
    out = _interpreter(u8).get_output_details()[0]
    assert out["dtype"] == np.uint8 and out["quantization"] == (1 / 256, 0)
    for rgb in _images(4):
        p = _run(base, rgb)
        np.testing.assert_allclose(_run(mean, rgb), p, atol=1e-6)
        np.testing.assert_allclose(_run(pool, rgb), p, atol=1e-6)
        np.testing.assert_allclose(_run(keep, rgb), p, atol=1e-6)
        assert np.max(np.abs(_run(u8, rgb) / 256 - p)) <= 1 / 256


def test_exact_mean_keeps_the_class_maps_ties(small_class_map: bytes) -> None:
    """pool="exact_mean" averages the raw integers: equal integer sums give exactly equal probabilities."""
    from edgesqz.device.runtime import delegate_coverage

    exact, info = add_probability_head_info(small_class_map, pool="exact_mean")
    assert info.ops == ("CAST", "MEAN", "MUL", "SOFTMAX") and standard_classifier_problems(exact) == []
    cov = delegate_coverage(_interpreter(exact))
    assert cov.delegated_ops == cov.total_ops - 1  # XNNPACK leaves the CAST int8 -> float32 to TFLite
    pairs = 0
    for rgb in _images(40):
        sums = _run(small_class_map, rgb).astype(np.int64).sum(axis=(0, 1))
        probs = _run(exact, rgb)
        logits = _pooled(small_class_map, rgb)
        assert int(np.argmax(probs)) == int(np.argmax(logits))  # ties too: both pick the first index
        ref = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(probs, ref, rtol=1e-4, atol=1e-6)
        for a in range(len(sums)):
            for b in range(a + 1, len(sums)):
                if sums[a] == sums[b]:
                    pairs += 1
                    assert probs[a] == probs[b]
    assert pairs > 0  # the small map ties often, so the check above ran


def test_head_info_and_op_versions(small_class_map: bytes) -> None:
    from ai_edge_litert import schema_py_generated as schema

    model, info = add_probability_head_info(small_class_map, pool="mean")
    assert (info.input_dtype, info.output_dtype, info.classes, info.class_map) == ("uint8", "float32", 10, (6, 6))
    assert info.ops == ("DEQUANTIZE", "MEAN", "SOFTMAX")
    m = schema.ModelT.InitFromPackedBuf(model, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    versions = {(names[oc.builtinCode], oc.version) for oc in m.operatorCodes}
    # what TFLite's op_version.cc assigns: DEQUANTIZE of int8 -> 2, of uint8 -> 1; float MEAN/SOFTMAX -> 1
    assert {("DEQUANTIZE", 2), ("DEQUANTIZE", 1), ("QUANTIZE", 1), ("MEAN", 1), ("SOFTMAX", 1)} <= versions
    m = schema.ModelT.InitFromPackedBuf(add_probability_head(small_class_map, pool="exact_mean"), 0)
    versions = {(names[oc.builtinCode], oc.version) for oc in m.operatorCodes}
    assert {("CAST", 3), ("MUL", 1)} <= versions  # CAST from int8 is version 3

    def min_runtime(blob: bytes) -> str:
        model = schema.ModelT.InitFromPackedBuf(blob, 0)
        (entry,) = [e for e in model.metadata if e.name == b"min_runtime_version"]
        return bytes(model.buffers[entry.buffer].data).rstrip(b"\0").decode()

    assert min_runtime(small_class_map) == "1.14.0"  # what the converter wrote for the int8 body
    assert min_runtime(model) == "1.14.0"  # DEQUANTIZE, MEAN, SOFTMAX, QUANTIZE need nothing newer
    assert min_runtime(add_probability_head(small_class_map, pool="exact_mean")) == "2.8.0"  # CAST v3


def test_refuses_what_is_not_a_class_map(small_class_map: bytes) -> None:
    standard = add_probability_head(small_class_map)
    with pytest.raises(EdgesqzError, match=r"expected a class map \[1, H, W, C\]"):
        add_probability_head(standard)
    with pytest.raises(EdgesqzError, match=r"not a \.tflite"):
        add_probability_head(b"not a model at all")
    with pytest.raises(EdgesqzError, match="output must be"):
        add_probability_head(small_class_map, output="int8")  # type: ignore[arg-type]


def test_metadata_survives_and_describes_the_new_output(small_class_map: bytes) -> None:
    from edgesqz.tflite_metadata import embed_metadata, read_metadata

    info = {"schema": "edgesqz.model/1", "format": "int8", "input": {"size": 16, "dtype": "int8"},
            "output": {"kind": "class_map", "classes": 10}, "preprocessing": {"size": 16, "crop_fraction": 0.875}}
    labels = [f"thing {i}" for i in range(10)]
    with_meta = embed_metadata(small_class_map, labels=labels, info=info, name="small", description="d",
                               version="1", mean=[0.0], std=[1.0], input_min=0.0, input_max=255.0)
    model = add_probability_head(with_meta)
    meta = read_metadata(model)
    assert meta.has_tflite_metadata and meta.labels == labels and meta.name == "small"
    assert (meta.mean, meta.std) == ([0.0], [1.0])
    assert meta.info["output"]["kind"] == "probabilities" and meta.info["output"]["classes"] == 10
    assert meta.info["output"]["dtype"] == "float32" and meta.info["input"]["dtype"] == "uint8"
    assert meta.info["preprocessing"] == info["preprocessing"]  # everything else as it was
    with zipfile.ZipFile(__import__("io").BytesIO(model)) as zf:
        assert sorted(zf.namelist()) == ["edgesqz.json", "labels.txt"]
    # and the converter's own metadata entries are still there
    from ai_edge_litert import schema_py_generated as schema

    entries = {e.name.decode() for e in schema.ModelT.InitFromPackedBuf(model, 0).metadata}
    assert {"TFLITE_METADATA", "min_runtime_version"} <= entries


# --- the real SqueezeNet 1.1 int8 models convert writes, on real photos ------------------------------


def test_real_model_same_top1_as_the_class_map_on_real_photos(int8_class_map_model: Path, int8_model: Path,
                                                             imagenet_sample: Path, tmp_path: Path) -> None:
    """The head on convert's class-map model == the class map averaged == convert's default (standard) model."""
    from edgesqz.device.classifier import Classifier
    from edgesqz.imaging import preprocess, read_image

    class_map = int8_class_map_model.read_bytes()
    standard_path = tmp_path / "standard.tflite"
    standard_path.write_bytes(add_probability_head(class_map))
    standard = standard_path.read_bytes()
    assert standard_classifier_problems(standard) == []
    files = sorted(imagenet_sample.iterdir())[::10]  # 100 real photos
    old, new = Classifier(int8_class_map_model, threads=1), Classifier(standard_path, threads=1)
    converted = Classifier(int8_model, threads=1)
    assert new.output_kind == "probabilities" and new.spec.dtype == np.uint8
    assert new.coverage.full
    assert new.labels == old.labels and len(new.labels) == 1000
    same = 0
    for f in files:
        rgb = preprocess(read_image(f))
        probs = _run(standard, rgb)
        assert abs(float(probs.sum()) - 1) < 1e-4 and probs.min() >= 0
        same += int(np.argmax(probs) == np.argmax(_pooled(class_map, rgb)))
        frame = read_image(f)
        a, b = old.scores(frame).scores, new.scores(frame).scores
        assert np.argmax(a) == np.argmax(b)
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(converted.scores(frame).scores, b, atol=1e-5)
    assert same == len(files)
    info = json.loads(zipfile.ZipFile(standard_path).read("edgesqz.json"))
    assert info["output"]["kind"] == "probabilities" and info["input"]["dtype"] == "uint8"
