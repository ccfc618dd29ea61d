"""4-bit weights on the device: packing, the file as LiteRT runs it, widening for XNNPACK, the validator's rules.

Device tests (no TensorFlow): the model comes from the ``int4_model`` fixture, built by the host run
and reused from EDGESQZ_TEST_MODELS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgesqz.errors import EdgesqzError
from edgesqz.tflite_int4 import CONV_2D, CONV_2D_INT4_VERSION, INT4, conv_bits, pack_int4, unpack_int4, widen_int4


def edgesqz(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesqz", *args], capture_output=True, text=True, timeout=300,
                          env=os.environ.copy())


def test_packing_is_two_values_per_byte_low_nibble_first() -> None:
    values = np.array([1, -2, 7, -8, 0, -7], np.int8)
    packed = pack_int4(values)
    assert packed.tolist() == [0xE1, 0x87, 0x90]  # (-2 << 4 | 1), (-8 << 4 | 7), (-7 << 4 | 0)
    np.testing.assert_array_equal(unpack_int4(packed, 6), values)
    odd = pack_int4(values[:5])
    assert len(odd) == 3 and odd[-1] == 0x00
    np.testing.assert_array_equal(unpack_int4(odd, 5), values[:5])
    rng = np.random.default_rng(0)
    many = rng.integers(-8, 8, 1001).astype(np.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(many), 1001), many)
    with pytest.raises(EdgesqzError, match=r"-8\.\.7"):
        pack_int4(np.array([8]))
    with pytest.raises(EdgesqzError, match="take 2 bytes"):
        unpack_int4(np.zeros(3, np.uint8), 4)


def _schema() -> object:
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _outputs(data: bytes, images: np.ndarray, *, xnnpack: bool) -> tuple[np.ndarray, object]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edgesqz.device.runtime import delegate_coverage

    kwargs = {} if xnnpack else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    it = Interpreter(model_content=data, num_threads=1, **kwargs)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    out = []
    for image in images:
        it.set_tensor(i["index"], image[None])
        it.invoke()
        out.append(it.get_tensor(o["index"])[0].copy())
    return np.stack(out), delegate_coverage(it)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    rng = np.random.default_rng(1)
    smooth = rng.integers(0, 256, (6, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2)
    return np.concatenate([smooth, rng.integers(0, 256, (2, 32, 32, 3))]).astype(np.uint8)


def test_int4_file_runs_as_it_is_and_widened_for_xnnpack(int4_model: Path, pixels: np.ndarray) -> None:
    from edgesqz.device.runtime import delegate_coverage, make_interpreter, widen_for_runtime
    from edgesqz.tflite_validate import validate_model

    data = int4_model.read_bytes()
    validate_model(data)
    m = _schema().Model.GetRootAs(data, 0)
    sub = m.Subgraphs(0)
    convs = [sub.Operators(i) for i in range(sub.OperatorsLength())
             if m.OperatorCodes(sub.Operators(i).OpcodeIndex()).BuiltinCode() == CONV_2D]
    filters = [sub.Tensors(int(op.InputsAsNumpy()[1])) for op in convs]
    assert [f.Type() for f in filters].count(INT4) == len(convs) - 1 and filters[0].Type() != INT4
    for op, f in zip(convs, filters, strict=True):
        if f.Type() == INT4:  # packed: half a byte per weight, per-channel scales, CONV_2D version 7
            assert m.Buffers(f.Buffer()).DataLength() == int(np.prod(f.ShapeAsNumpy())) // 2
            assert f.Quantization().ScaleLength() == f.ShapeAsNumpy()[0]
            assert m.OperatorCodes(op.OpcodeIndex()).Version() == CONV_2D_INT4_VERSION
    assert [r.bits for r in conv_bits(data)] == [8] + [4] * (len(convs) - 1)

    as_is, plain_cov = _outputs(data, pixels, xnnpack=False)  # LiteRT's builtin kernels take INT4 filters
    widened = widen_int4(data)
    assert widen_for_runtime(widened) is widened and len(widened) > len(data)
    same, _ = _outputs(widened, pixels, xnnpack=False)
    np.testing.assert_array_equal(same, as_is)  # widening changes the storage, not one output bit
    _, partial = _outputs(data, pixels, xnnpack=True)
    assert not partial.full  # XNNPACK leaves the INT4 convolutions to the reference kernels...
    interpreter, _ = make_interpreter(data, threads=1)  # ...so the device widens them first
    assert delegate_coverage(interpreter).full
    fast = []
    for image in pixels:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
        interpreter.invoke()
        fast.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0].copy())
    assert np.abs(np.stack(fast) - as_is).max() < 0.05  # XNNPACK's int8 rounding vs the reference kernels'
    assert plain_cov.partitions == 0


def test_info_shows_bits_per_layer_and_full_xnnpack_coverage(int4_model: Path) -> None:
    result = edgesqz("info", str(int4_model), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    w = info["weights"]
    assert w["convolutions"]["8"] == 1 and w["convolutions"]["4"] >= 20 and w["int4_widened_for_runtime"]
    assert w["layers"][0]["bits"] == 8 and {r["bits"] for r in w["layers"][1:]} == {4}
    assert info["runtime"]["xnnpack"]["full"]
    assert info["info"]["quantization"]["weights"]["layers_4bit"] == w["convolutions"]["4"]
    text = edgesqz("info", str(int4_model))
    assert "4-bit" in text.stdout and "widened to int8" in text.stdout


def _corrupt(data: bytes, how: str) -> bytes:
    from edgesqz.tflite_metadata import _AlignedBuilder

    schema = _schema()
    m = schema.ModelT.InitFromPackedBuf(data, 0)
    sub = m.subgraphs[0]
    t = next(t for t in sub.tensors if t.type == INT4)
    buf = m.buffers[t.buffer]
    if how == "odd":  # an odd count, in the bytes that count would take
        t.shape = np.array([1, 1, 1, 5], np.int32)
        buf.data = np.asarray(buf.data)[:3]
        t.quantization.scale, t.quantization.zeroPoint = [0.1], [0]
    elif how == "size":
        buf.data = np.asarray(buf.data)[:-1]
    elif how == "zero_point":
        t.quantization.zeroPoint = [1] * len(t.quantization.zeroPoint)
    b = _AlignedBuilder(len(data) + 4096)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


@pytest.mark.parametrize(("how", "message"), [("odd", "odd number of elements"),
                                              ("size", "corrupt 4-bit packing"),
                                              ("zero_point", "non-zero zero point")])
def test_corrupt_int4_is_one_line_and_exit_2(int4_model: Path, tmp_path: Path, how: str, message: str) -> None:
    from edgesqz.device.runtime import check_model_file

    bad = tmp_path / f"{how}.tflite"
    bad.write_bytes(_corrupt(int4_model.read_bytes(), how))
    with pytest.raises(EdgesqzError, match=message):
        check_model_file(bad)
    result = edgesqz("info", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "INT4" in lines[0], result.stderr
