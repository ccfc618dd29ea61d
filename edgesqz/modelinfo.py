"""What is inside a .tflite: metadata, tensors, ops, sizes (``edgesqz info``). No TensorFlow."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgesqz.quiet import captured_output
from edgesqz.schema import record
from edgesqz.tflite_metadata import read_metadata


def graph_summary(model: bytes) -> dict[str, Any]:
    """Op counts and tensor types of a TFLite model, read from the flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.Model.GetRootAs(model, 0)
    builtin_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    codes = []
    for i in range(m.OperatorCodesLength()):
        oc = m.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        codes.append(builtin_names.get(code, str(code)))
    ops: dict[str, int] = {}
    dtypes: dict[str, int] = {}
    sub = m.Subgraphs(0)
    for i in range(sub.OperatorsLength()):
        name = codes[sub.Operators(i).OpcodeIndex()]
        ops[name] = ops.get(name, 0) + 1
    for i in range(sub.TensorsLength()):
        t = type_names.get(sub.Tensors(i).Type(), "?")
        dtypes[t] = dtypes.get(t, 0) + 1
    return {"subgraphs": m.SubgraphsLength(), "ops": ops, "tensor_types": dtypes}


def _tensor(detail: dict[str, Any]) -> dict[str, Any]:
    scale, zero = detail["quantization"]
    return {"name": detail["name"], "shape": [int(d) for d in detail["shape"]],
            "shape_signature": [int(d) for d in detail.get("shape_signature", detail["shape"])],
            "dtype": np.dtype(detail["dtype"]).name,
            "quantization": {"scale": float(scale), "zero_point": int(zero)} if scale else None}


def _weight_bits(data: bytes) -> dict[str, Any]:
    """Bits per convolution (4 for packed INT4 filters) and the kernels' bytes in the file."""
    from edgesqz.tflite_int4 import conv_bits

    rows = conv_bits(data)
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r.bits)] = counts.get(str(r.bits), 0) + 1
    return {"convolutions": counts, "kernel_bytes": sum(r.weight_bytes for r in rows),
            "int4_widened_for_runtime": counts.get("4", 0) > 0, "layers": [r.to_dict() for r in rows]}


def describe(path: str | os.PathLike[str], threads: int | None = None) -> dict[str, Any]:
    """A ``model_info`` record: file sizes, metadata, input/output tensors, ops, bits per convolution and
    XNNPACK coverage (of the graph the device runs: 4-bit weights widened to int8 in memory)."""
    from edgesqz.device.runtime import check_model_file, delegate_coverage, make_interpreter

    data = check_model_file(path)
    meta = read_metadata(data, src=f"model {path}")
    with captured_output([]):  # the runtime's one-off XNNPACK banner
        interpreter, backend = make_interpreter(data, threads=threads, src=f"model {path}")
    return record(
        "model_info",
        model=str(Path(path)),
        size_bytes=len(data),
        name=meta.name, description=meta.description, version=meta.version,
        has_tflite_metadata=meta.has_tflite_metadata, associated_files=meta.associated_files,
        labels={"count": len(meta.labels), "first": meta.labels[:5]} if meta.labels else None,
        info=meta.info,
        inputs=[_tensor(d) for d in interpreter.get_input_details()],
        outputs=[_tensor(d) for d in interpreter.get_output_details()],
        graph=graph_summary(data),
        weights=_weight_bits(data),
        runtime={"backend": backend.name, "version": backend.version,
                 "xnnpack": delegate_coverage(interpreter).to_dict()},
    )
