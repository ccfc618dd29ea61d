"""`edgesqz edgetpu check` on a compatible model and on models that fail for each reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from edgesqz.edgetpu import check_model, compile_model, parse_compiler_log  # noqa: E402
from edgesqz.errors import EdgesqzError  # noqa: E402


def _int8(fn: tf.Module, shape: list[int]) -> bytes:
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    conv.representative_dataset = lambda: ([rng.random([1 if d is None else d for d in shape], np.float32)]
                                           for _ in range(8))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    return conv.convert()


class _Model(tf.Module):
    def __init__(self, shape: list[int | None], body: Callable[[tf.Tensor], tf.Tensor]) -> None:
        super().__init__()
        self.body = body
        self.w = tf.Variable(np.random.default_rng(1).normal(size=(3, 3, 3, 8)).astype(np.float32))
        self.__call__ = tf.function(self._call, input_signature=[tf.TensorSpec(shape, tf.float32)])

    def _call(self, x: tf.Tensor) -> tf.Tensor:
        return self.body(tf.nn.relu(tf.nn.conv2d(x, self.w, 1, "SAME")))


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(data)
    return path


def _model(tmp_path: Path, name: str, shape: list[int | None], body: Callable[[tf.Tensor], tf.Tensor]) -> Path:
    m = _Model(shape, body)
    return _write(tmp_path, name, _int8(m.__call__, shape))


def test_edgesqz_int8_model_is_compatible(int8_edgetpu_model: Path) -> None:
    result = check_model(int8_edgetpu_model)
    assert result.compatible, result.reasons
    assert result.ops["CONV_2D"] == 26 and 1e6 < result.parameter_bytes < 1.4e6
    # the standard head's float tail after the class map is what the compiler leaves to the CPU
    assert result.cpu_ops == {"DEQUANTIZE": 1, "MEAN": 1, "SOFTMAX": 1}
    assert "on the CPU: DEQUANTIZE x1, MEAN x1, SOFTMAX x1" in result.summary()


def test_float_model_fails_on_types(float_model: Path) -> None:
    reasons = check_model(float_model).reasons
    assert any("not 8-bit quantised" in r for r in reasons)
    assert any("FLOAT32; the Edge TPU needs int8" in r for r in reasons)


def test_unsupported_op(tmp_path: Path) -> None:
    path = _model(tmp_path, "hardswish", [1, 16, 16, 3], lambda x: x * tf.nn.relu6(x + 3.0) / 6.0 + tf.exp(x))
    reasons = check_model(path).reasons
    assert any(r.startswith("op EXP") for r in reasons), reasons


def test_dynamic_batch(tmp_path: Path) -> None:
    path = _model(tmp_path, "dynamic", [None, 16, 16, 3], lambda x: tf.reduce_mean(x, axis=[1, 2]))
    assert any("dynamic dimension" in r for r in check_model(path).reasons)


def test_batch_larger_than_one(tmp_path: Path) -> None:
    path = _model(tmp_path, "batch4", [4, 16, 16, 3], lambda x: tf.reduce_mean(x, axis=[1, 2]))
    assert any("more than 3 dimensions larger than 1" in r for r in check_model(path).reasons)


def test_more_than_one_subgraph(tmp_path: Path) -> None:
    def body(x: tf.Tensor) -> tf.Tensor:
        return tf.cond(tf.reduce_sum(x) > 0, lambda: x * 2.0, lambda: x - 1.0)

    m = _Model([1, 8, 8, 3], body)
    conv = tf.lite.TFLiteConverter.from_concrete_functions([m.__call__.get_concrete_function()], m)
    path = _write(tmp_path, "cond", conv.convert())
    assert any("subgraphs" in r for r in check_model(path).reasons)


def test_parameters_larger_than_on_chip_memory(tmp_path: Path) -> None:
    class Big(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(np.random.default_rng(2).normal(size=(3000, 3000)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([1, 3000], tf.float32)])
        def __call__(self, x: tf.Tensor) -> tf.Tensor:
            return tf.matmul(x, self.w)

    m = Big()
    path = _write(tmp_path, "big", _int8(m.__call__, [1, 3000]))
    assert any("on-chip memory" in r for r in check_model(path).reasons)


def test_cli_exit_codes(int8_edgetpu_model: Path, int8_model: Path, float_model: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "edgesqz", "edgetpu", "check", str(int8_edgetpu_model)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "compatible with the Edge TPU" in ok.stdout and "on the CPU" in ok.stdout
    cpu = subprocess.run([sys.executable, "-m", "edgesqz", "edgetpu", "check", str(int8_model)], capture_output=True,
                         text=True)  # the XNNPACK form of the input conversion: the Edge TPU stops at once
    assert cpu.returncode == 1 and "--edgetpu" in cpu.stdout
    bad = subprocess.run([sys.executable, "-m", "edgesqz", "edgetpu", "check", str(float_model)], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "NOT fully compatible" in bad.stdout


def test_compile_without_compiler_says_how_to_get_it(int8_model: Path) -> None:
    env = {**os.environ, "PATH": "/nonexistent"}
    result = subprocess.run([sys.executable, "-m", "edgesqz", "edgetpu", "compile", str(int8_model)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: edgetpu_compiler is not installed") and "x86_64" in result.stderr
    with pytest.raises(EdgesqzError, match="not installed"):
        compile_model(int8_model, compiler="edgetpu_compiler_that_does_not_exist")


def test_compiler_log_table() -> None:
    # the table edgetpu_compiler --show_operations prints (format of Edge TPU Compiler 16)
    log = """Edge TPU Compiler version 16.0.384591198
Input: model.tflite
Output: model_edgetpu.tflite

Operator                       Count      Status

CONV_2D                        26         Mapped to Edge TPU
MAX_POOL_2D                    3          Mapped to Edge TPU
MEAN                           1          Operation is otherwise supported, but not mapped due to some unspecified""" \
        """ limitation
"""
    rows = parse_compiler_log(log)
    assert [r["op"] for r in rows] == ["CONV_2D", "MAX_POOL_2D", "MEAN"]
    assert rows[0] == {"op": "CONV_2D", "count": 26, "status": "Mapped to Edge TPU"}
    assert rows[2]["status"].startswith("Operation is otherwise supported")


def test_convert_for_the_edgetpu(tmp_path: Path, real_weights: Path, photos: list[Path]) -> None:
    out = tmp_path / "m.tflite"
    result = subprocess.run([sys.executable, "-m", "edgesqz", "convert", "--weights", str(real_weights), "--int8",
                             "--edgetpu", "--ptq", "plain", "--calib", str(photos[0].parent), "-o", str(out),
                             "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["edgetpu"]["check"]["compatible"] and check_model(out).compatible
    assert "edgetpu_compiler is not installed" in result.stderr
    wrong = subprocess.run([sys.executable, "-m", "edgesqz", "convert", "--weights", str(real_weights), "--float16",
                            "--edgetpu", "-o", str(tmp_path / "f.tflite")], capture_output=True, text=True)
    assert wrong.returncode == 2 and "--edgetpu needs --int8" in wrong.stderr


# --- an int8 graph followed by a float tail (the standard classifier head) ------------------------


def test_float_tail_after_the_int8_graph_stays_on_the_cpu(tmp_path: Path) -> None:
    from edgesqz.converters.standard_head import EDGETPU_OPTIONS, add_probability_head

    class_map = _model(tmp_path, "class_map", [1, 16, 16, 3], lambda x: x).read_bytes()  # int8 [1, 16, 16, 8]
    path = _write(tmp_path, "standard", add_probability_head(class_map, **EDGETPU_OPTIONS))
    result = check_model(path)
    assert result.compatible, result.reasons
    assert result.cpu_ops == {"DEQUANTIZE": 1, "MEAN": 1, "SOFTMAX": 1}
    assert result.ops["QUANTIZE"] == 1 and result.ops["CONV_2D"] == 1  # the uint8 -> int8 input runs on the TPU
    assert "after it on the CPU: DEQUANTIZE x1, MEAN x1, SOFTMAX x1" in result.summary()
    assert result.to_dict()["cpu_ops"] == result.cpu_ops
    exact = check_model(_write(tmp_path, "exact", add_probability_head(class_map, input_conversion="quantize",
                                                                        pool="exact_mean")))
    assert exact.compatible and exact.cpu_ops == {"CAST": 1, "MEAN": 1, "MUL": 1, "SOFTMAX": 1}


def test_float_ops_before_the_int8_graph_are_not_a_tail(tmp_path: Path) -> None:
    from edgesqz.converters.standard_head import add_probability_head

    class_map = _model(tmp_path, "class_map", [1, 16, 16, 3], lambda x: x).read_bytes()
    # uint8 -> float32 -> int8 at the input (what XNNPACK prefers): the compiler would stop at op 0
    path = _write(tmp_path, "xnnpack_input", add_probability_head(class_map, input_conversion="dequantize_quantize",
                                                                  pool="mean"))
    result = check_model(path)
    assert not result.compatible
    assert any(r.startswith("op DEQUANTIZE (x1)") and "--edgetpu" in r
               for r in result.reasons), result.reasons
    assert any("not 8-bit quantised" in r for r in result.reasons)  # the float pixels
    assert result.cpu_ops == {"DEQUANTIZE": 1, "MEAN": 1, "SOFTMAX": 1}  # the tail is still recognised


def test_int8_only_model_has_no_cpu_ops(int8_class_map_model: Path) -> None:
    result = check_model(int8_class_map_model)
    assert result.compatible and result.cpu_ops == {}
    assert "on the CPU" not in result.summary()


def test_compiler_rows_left_to_the_cpu(tmp_path: Path) -> None:
    from edgesqz.edgetpu import Compiled

    rows = [{"op": "CONV_2D", "count": 26, "status": "Mapped to Edge TPU"},
            {"op": "DEQUANTIZE", "count": 1, "status": "Operation is working on an unsupported data type"}]
    compiled = Compiled(tmp_path / "m_edgetpu.tflite", "", rows)
    assert not compiled.fully_mapped and [r["op"] for r in compiled.cpu_rows] == ["DEQUANTIZE"]
