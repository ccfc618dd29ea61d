"""Damaged and hand-built .tflite models for the fault tests (the runtime's own schema module; no TensorFlow)."""

from __future__ import annotations

import io
import random
import struct
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated as schema

    return schema


def split_zip(data: bytes) -> tuple[bytes, dict[str, bytes]]:
    """(flatbuffer, {associated file: bytes}) of an edgesqz model."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    start = min(info.header_offset for info in zf.infolist())
    return data[:start], {info.filename: zf.read(info.filename) for info in zf.infolist()}


def join_zip(flatbuffer: bytes, members: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    out.write(flatbuffer)
    with zipfile.ZipFile(out, "a", compression=compress) as zf:
        for name, payload in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), payload, compress_type=compress)
    return out.getvalue()


def rebuild(data: bytes, change: Callable[[Any, Any], None]) -> bytes:
    """The model with ``change(model, schema)`` applied to its flatbuffer (object API); metadata kept."""
    import flatbuffers

    schema = _schema()
    flatbuffer, members = split_zip(data)
    model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    for sub in model.subgraphs:  # numpy views of the file are read-only
        sub.inputs, sub.outputs = list(sub.inputs), list(sub.outputs)
        for op in sub.operators:
            op.inputs, op.outputs = list(op.inputs), list(op.outputs)
    change(model, schema)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return join_zip(bytes(builder.Output()), members)


def first_op(model: Any, schema: Any, name: str) -> Any:
    code = getattr(schema.BuiltinOperator, name)
    for op in model.subgraphs[0].operators:
        oc = model.operatorCodes[op.opcodeIndex]
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == code:
            return op
    raise LookupError(name)


def structure_positions(data: bytes) -> np.ndarray:
    """Byte positions outside the weights: where a mutation changes the graph, not a weight's value."""
    schema = _schema()
    m = schema.Model.GetRootAs(data, 0)
    mask = np.ones(len(split_zip(data)[0]), bool)
    for i in range(m.BuffersLength()):
        b = m.Buffers(i)
        if b.DataLength():
            start = b._tab.Vector(4)
            mask[start:start + b.DataLength()] = False
    return np.flatnonzero(mask)


def mutant(data: bytes, positions: np.ndarray, seed: int) -> bytes:
    """Seeded damage: random bytes, int32 values that are typical bad indices, or a truncation."""
    rng = random.Random(seed)
    out = bytearray(data)
    kind = rng.choice(["bytes", "bytes", "int32", "int32", "truncate"])
    if kind == "truncate":
        return bytes(out[: rng.randrange(8, len(out))])
    for _ in range(rng.randint(1, 6)):
        pos = int(positions[rng.randrange(len(positions))])
        if kind == "int32" and pos + 4 <= len(out):
            out[pos:pos + 4] = struct.pack("<i", rng.choice([-1, -2, 0, 1, 255, 65535, 2**31 - 1, -2**31,
                                                             rng.randrange(-1000, 100000)]))
        else:
            out[pos] = rng.randrange(256)
    return bytes(out)


def crafted_models(model_bytes: bytes) -> dict[str, tuple[bytes, str]]:
    """Damage that crashed the runtime (SIGSEGV, double free), raised a traceback or gave wrong results (NaN
    quantisation scales) before validation."""

    def concat_input(m: Any, s: Any) -> None:
        first_op(m, s, "CONCATENATION").inputs[0] = -1

    def conv_weight(m: Any, s: Any) -> None:
        first_op(m, s, "CONV_2D").inputs[1] = -1

    def graph_output(m: Any, s: Any) -> None:
        m.subgraphs[0].outputs[0] = -1

    def weight_without_data(m: Any, s: Any) -> None:
        t = m.subgraphs[0].tensors[first_op(m, s, "CONV_2D").inputs[1]]
        m.buffers[t.buffer].data = None

    def short_weight(m: Any, s: Any) -> None:
        t = m.subgraphs[0].tensors[first_op(m, s, "CONV_2D").inputs[1]]
        m.buffers[t.buffer].data = m.buffers[t.buffer].data[:10]

    def huge_tensor(m: Any, s: Any) -> None:
        m.subgraphs[0].tensors[first_op(m, s, "CONV_2D").outputs[0]].shape = [1, 100000, 100000, 64]

    def nan_weight_scales(m: Any, s: Any) -> None:  # ran, and classified coffee as "nematode"
        q = m.subgraphs[0].tensors[first_op(m, s, "CONV_2D").inputs[1]].quantization
        q.scale = [float("nan")] * len(q.scale)

    return {
        "nan-weight-scales": (rebuild(model_bytes, nan_weight_scales), "quantisation scale of nan"),
        "concat-input-minus-1": (rebuild(model_bytes, concat_input), "CONCATENATION) input 0 is tensor -1"),
        "conv-weight-minus-1": (rebuild(model_bytes, conv_weight), "CONV_2D) input 1 is tensor -1"),
        "graph-output-minus-1": (rebuild(model_bytes, graph_output), "output tensor index -1"),
        "weight-without-data": (rebuild(model_bytes, weight_without_data), "no data"),
        "short-weight": (rebuild(model_bytes, short_weight), "needs 1728 bytes"),
        "huge-tensor": (rebuild(model_bytes, huge_tensor), "MiB per tensor"),
    }


def tiny_classifier(size: int) -> bytes:
    """A float [1, size, size, 3] -> MEAN over H, W -> [1, 3] 'classifier' built with the runtime's schema."""
    import flatbuffers

    s = _schema()
    model = s.ModelT()
    model.version = 3
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.MEAN
    model.operatorCodes = [code]
    axes = s.BufferT()
    axes.data = np.frombuffer(np.array([1, 2], np.int32).tobytes(), np.uint8)
    model.buffers = [s.BufferT(), s.BufferT(), axes, s.BufferT()]
    tensors = []
    for i, (name, shape, ttype) in enumerate((("image", [1, size, size, 3], s.TensorType.FLOAT32),
                                              ("axes", [2], s.TensorType.INT32),
                                              ("scores", [1, 3], s.TensorType.FLOAT32))):
        t = s.TensorT()
        t.shape, t.type, t.buffer, t.name = shape, ttype, i + 1, name
        tensors.append(t)
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    op.builtinOptionsType = s.BuiltinOptions.ReducerOptions
    op.builtinOptions = s.ReducerOptionsT()
    sub = s.SubGraphT()
    sub.tensors, sub.inputs, sub.outputs, sub.operators = tensors, [0], [2], [op]
    model.subgraphs = [sub]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


