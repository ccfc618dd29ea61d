"""Will a .tflite map fully onto a Coral Edge TPU? Checked without the compiler, and compiled with it.

The rules are Coral's published requirements for the Edge TPU compiler:

- every tensor is 8-bit quantised (int8/uint8; int32 only for biases and shape operands);
- tensor sizes are constant (no dynamic dimension) and at most 3 dimensions exceed 1
  (so batch must be 1);
- one subgraph only;
- only supported operators, each within its limits;
- parameters should fit the ~8 MB on-chip memory (larger models still run, with parameters
  streamed from the host, which is slow).

The compiler maps ops up to the first one it cannot run and leaves that op and everything after it
to the CPU. A model whose int8 graph is followed by a small float tail (DEQUANTIZE or CAST of the
int8 output to float32, then MEAN / AVERAGE_POOL_2D / RESHAPE / SQUEEZE / MUL / SOFTMAX / QUANTIZE:
the standard classifier head of :mod:`edgesqz.converters.standard_head`) therefore still maps its whole int8 part
onto the Edge TPU: :func:`check_model` counts it as compatible and reports the tail in ``cpu_ops``.

``edgetpu_compiler`` exists for x86_64 Linux only; :func:`compile_model` runs it and turns its
log into rows of (op, count, status).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesqz.errors import EdgesqzError

ON_CHIP_BYTES = 8 * 1024 * 1024

# Coral's "supported operations" table; value: the limitation we can check from the flatbuffer.
SUPPORTED_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS", "FULLY_CONNECTED",
    "L2_NORMALIZATION", "LOGISTIC", "LSTM", "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD",
    "PRELU", "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUARED_DIFFERENCE",
    "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
})
SOFTMAX_MAX_ELEMENTS = 16000
# Cheap ops that may follow the int8 graph on the CPU (after a DEQUANTIZE of its output).
CPU_TAIL_OPS = frozenset({"DEQUANTIZE", "CAST", "MEAN", "AVERAGE_POOL_2D", "RESHAPE", "SQUEEZE", "MUL", "SOFTMAX",
                          "QUANTIZE"})

INSTALL_COMPILER = (
    "edgetpu_compiler is not installed: install Coral's edgetpu-compiler package from Coral's apt repository on an "
    "x86_64 Linux host (it does not exist for ARM), compile there, and copy the *_edgetpu.tflite to the Pi"
)


@dataclass
class Check:
    model: str
    reasons: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    parameter_bytes: int = 0
    cpu_ops: dict[str, int] = field(default_factory=dict)  # the float tail after the int8 graph, left to the CPU

    @property
    def compatible(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "compatible": self.compatible, "reasons": self.reasons, "ops": self.ops,
                "cpu_ops": self.cpu_ops, "parameter_bytes": self.parameter_bytes, "on_chip_bytes": ON_CHIP_BYTES}

    def summary(self) -> str:
        """One line: how much maps, and what stays on the CPU."""
        on_tpu = sum(self.ops.values()) - sum(self.cpu_ops.values())
        line = f"{on_tpu} ops on the Edge TPU, {self.parameter_bytes / 1e6:.2f} MB of parameters"
        if self.cpu_ops:
            line += "; after it on the CPU: " + ", ".join(f"{k} x{v}" for k, v in self.cpu_ops.items())
        return line


def check_model(path: str | os.PathLike[str]) -> Check:
    """Every reason the model cannot map fully onto the Edge TPU (none: it can)."""
    from ai_edge_litert import schema_py_generated as schema

    from edgesqz.device.runtime import check_model_file

    data = check_model_file(path)  # the structure every command checks: indices, shapes, sizes
    if not _has_custom_ops(data):
        # What the runtime cannot load (its flatbuffer verifier reads every table), the Edge TPU compiler
        # cannot compile: the same error as run/classify. Compiled models (edgetpu-custom-op) are not loaded.
        from edgesqz.device.runtime import make_interpreter
        from edgesqz.quiet import captured_output

        with captured_output([]):  # the runtime's XNNPACK banner
            make_interpreter(data, threads=1, src=f"model {path}")
    try:
        model = schema.ModelT.InitFromPackedBuf(data, 0)
    except (struct.error, IndexError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise EdgesqzError(f"model {path} is not a valid .tflite model (corrupt flatbuffer: {exc}); re-export it "
                           "or copy it again") from exc
    result = Check(str(path))
    reasons = result.reasons
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    if len(model.subgraphs) != 1:
        reasons.append(f"{len(model.subgraphs)} subgraphs: the Edge TPU compiler supports exactly one "
                       "(remove control flow such as tf.cond / while loops)")
    sub = model.subgraphs[0]
    sub.operators, sub.tensors = sub.operators or [], sub.tensors or []
    sub.inputs = [] if sub.inputs is None else sub.inputs
    sub.outputs = [] if sub.outputs is None else sub.outputs
    codes = [op_names.get(max(c.builtinCode, c.deprecatedBuiltinCode), "CUSTOM")
             for c in model.operatorCodes or []]
    codes = [f"CUSTOM:{_text(c.customCode)}" if name == "CUSTOM" else name
             for name, c in zip(codes, model.operatorCodes or [], strict=True)]
    param_tensors = set()
    for op in sub.operators:
        name = codes[op.opcodeIndex]
        result.ops[name] = result.ops.get(name, 0) + 1
        for i in op.inputs if op.inputs is not None else []:
            if i >= 0 and model.buffers[sub.tensors[i].buffer].data is not None:
                param_tensors.add(i)
    result.parameter_bytes = sum(len(model.buffers[sub.tensors[i].buffer].data) for i in param_tensors)

    tail_start = _cpu_tail_start(sub, codes, model.buffers, type_names)
    tail_tensors: set[int] = set()
    for op in sub.operators[tail_start:]:
        name = codes[op.opcodeIndex]
        result.cpu_ops[name] = result.cpu_ops.get(name, 0) + 1
        tail_tensors.update(int(t) for t in (op.outputs if op.outputs is not None else []))
    mapped: dict[str, int] = {}
    for op in sub.operators[:tail_start]:
        mapped[codes[op.opcodeIndex]] = mapped.get(codes[op.opcodeIndex], 0) + 1
    first = sub.operators[0] if len(sub.operators) else None
    float_input = (first is not None and codes[first.opcodeIndex] == "DEQUANTIZE" and first.inputs is not None
                   and len(first.inputs) > 0 and int(first.inputs[0]) in [int(i) for i in sub.inputs])
    for name, count in sorted(mapped.items()):
        if name not in SUPPORTED_OPS:
            hint = (": the uint8 input goes through float (DEQUANTIZE + QUANTIZE, the fast form for XNNPACK); "
                    "convert with --edgetpu for the Edge TPU's form (one QUANTIZE)"
                    if name == "DEQUANTIZE" and float_input else "")
            reasons.append(f"op {name} (x{count}) is not supported by the Edge TPU; it and everything after it "
                           f"would run on the CPU{hint}")
    for op in sub.operators[:tail_start]:
        _check_op_limits(codes[op.opcodeIndex], op, sub, model.buffers, reasons)

    float_tensors, dynamic, too_many_dims = [], [], []
    mapped_inputs = {int(i) for op in sub.operators[:tail_start] for i in (op.inputs if op.inputs is not None else [])}
    for index, t in enumerate(sub.tensors):
        if index in tail_tensors or (t.buffer and model.buffers[t.buffer].data is not None
                                     and index not in mapped_inputs):
            continue  # made on the CPU after the Edge TPU, or a constant only the tail reads
        tname = _text(t.name)
        ttype = type_names.get(t.type, "?")
        if ttype not in ("INT8", "UINT8", "INT32"):
            float_tensors.append(f"{tname} ({ttype})")
        signature = list(t.shapeSignature) if t.shapeSignature is not None else []
        if any(d < 0 for d in signature):
            dynamic.append(tname)
        shape = [int(d) for d in t.shape] if t.shape is not None else []
        is_constant = model.buffers[t.buffer].data is not None
        if not is_constant and sum(1 for d in shape if d > 1) > 3:
            too_many_dims.append(f"{tname} {shape}")
    if float_tensors:
        reasons.append(f"{len(float_tensors)} tensors are not 8-bit quantised (e.g. {float_tensors[0]}): convert "
                       "with --int8 (full integer), not --dynamic/--float16/--float32")
    io_types = {type_names.get(sub.tensors[i].type, "?") for i in [*sub.inputs, *sub.outputs] if i not in tail_tensors}
    if io_types - {"INT8", "UINT8"}:
        reasons.append(f"model inputs/outputs are {', '.join(sorted(io_types))}; the Edge TPU needs int8 or uint8")
    if dynamic:
        reasons.append(f"{len(dynamic)} tensors have a dynamic dimension (e.g. {dynamic[0]}); export with a static "
                       "batch of 1")
    if too_many_dims:
        reasons.append(f"{len(too_many_dims)} tensors have more than 3 dimensions larger than 1 (e.g. "
                       f"{too_many_dims[0]}); use batch 1")
    if result.parameter_bytes > ON_CHIP_BYTES:
        reasons.append(f"parameters take {result.parameter_bytes / 1e6:.1f} MB, more than the ~8 MB on-chip memory: "
                       "they would stream from the host on every inference")
    return result


def _has_custom_ops(data: bytes) -> bool:
    """Does the (validated) model use custom ops, e.g. an already compiled edgetpu-custom-op?"""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.Model.GetRootAs(data, 0)
    custom = schema.BuiltinOperator.CUSTOM
    return any(max(m.OperatorCodes(i).BuiltinCode(), m.OperatorCodes(i).DeprecatedBuiltinCode()) == custom
               for i in range(m.OperatorCodesLength()))


def _text(value: str | bytes | None) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _cpu_tail_start(sub: Any, codes: list[str], buffers: Any, type_names: dict[int, str]) -> int:
    """Index of the first op of a float tail the CPU runs after the int8 graph (``len(ops)``: none).

    The tail starts at a DEQUANTIZE or CAST of a computed (not constant) 8-bit tensor to float32, after at
    least one other op, and holds only :data:`CPU_TAIL_OPS` up to the end of the op list.
    """
    ops = list(sub.operators)
    for start, op in enumerate(ops):
        if start == 0 or codes[op.opcodeIndex] not in ("DEQUANTIZE", "CAST"):
            continue
        if op.inputs is None or op.outputs is None or len(op.inputs) < 1 or len(op.outputs) < 1 \
                or min(int(op.inputs[0]), int(op.outputs[0])) < 0:
            continue
        source, target = sub.tensors[int(op.inputs[0])], sub.tensors[int(op.outputs[0])]
        if (type_names.get(source.type) not in ("INT8", "UINT8") or type_names.get(target.type) != "FLOAT32"
                or buffers[source.buffer].data is not None):
            continue
        if all(codes[o.opcodeIndex] in CPU_TAIL_OPS for o in ops[start:]):
            return start
    return len(ops)


def _check_op_limits(name: str, op: Any, sub: Any, model_buffers: Any, reasons: list[str]) -> None:
    opts = op.builtinOptions
    if (name in ("CONV_2D", "DEPTHWISE_CONV_2D") and opts is not None
            and getattr(opts, "dilationHFactor", 1) != getattr(opts, "dilationWFactor", 1)):
        reasons.append(f"{name} with different x/y dilation is not supported")
    if (name in ("MAX_POOL_2D", "AVERAGE_POOL_2D", "CONCATENATION") and opts is not None
            and getattr(opts, "fusedActivationFunction", 0) != 0):
        reasons.append(f"{name} with a fused activation is not supported")
    inputs = [int(i) for i in op.inputs] if op.inputs is not None else []
    if name == "SOFTMAX" and inputs and inputs[0] >= 0:
        shape = [int(d) for d in sub.tensors[inputs[0]].shape] if sub.tensors[inputs[0]].shape is not None else []
        elements = 1
        for d in shape:
            elements *= d
        if sum(1 for d in shape if d > 1) > 1 or elements > SOFTMAX_MAX_ELEMENTS:
            reasons.append(f"SOFTMAX on {shape}: only 1-D inputs of at most {SOFTMAX_MAX_ELEMENTS} elements")
    if name == "MEAN" and len(inputs) >= 2 and min(inputs[:2]) >= 0:
        shape = [int(d) for d in sub.tensors[inputs[0]].shape] if sub.tensors[inputs[0]].shape is not None else []
        axes_data = model_buffers[sub.tensors[inputs[1]].buffer].data
        axes = [int(a) % max(len(shape), 1) for a in np.frombuffer(bytes(axes_data), np.int32)] \
            if axes_data is not None else []
        if 0 in axes and shape and shape[0] > 1:
            reasons.append("MEAN over the batch dimension is not supported")
        if shape and len(shape) - 1 in axes and shape[-1] % 4:
            reasons.append(f"MEAN over channels needs a multiple of 4 channels, not {shape[-1]}")


_COMPILER_ROW = re.compile(r"^(?P<op>[A-Z][A-Z0-9_]+)\s+(?P<count>\d+)\s+(?P<status>.+?)\s*$")


@dataclass
class Compiled:
    output: Path
    log: str
    rows: list[dict[str, Any]]

    @property
    def fully_mapped(self) -> bool:
        return bool(self.rows) and all(r["status"] == "Mapped to Edge TPU" for r in self.rows)

    @property
    def cpu_rows(self) -> list[dict[str, Any]]:
        """The compiler's rows for ops it left to the CPU (e.g. a float tail after the int8 graph)."""
        return [r for r in self.rows if r["status"] != "Mapped to Edge TPU"]


def parse_compiler_log(log: str) -> list[dict[str, Any]]:
    """The compiler's op table: ``[{"op", "count", "status"}]``."""
    rows = []
    in_table = False
    for line in log.splitlines():
        if line.strip().startswith("Operator") and "Status" in line:
            in_table = True
            continue
        if in_table:
            m = _COMPILER_ROW.match(line.strip())
            if m:
                rows.append({"op": m["op"], "count": int(m["count"]), "status": m["status"]})
            elif line.strip() and not line.startswith("-"):
                in_table = False
    return rows


def compile_model(path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None,
                  compiler: str = "edgetpu_compiler", *, force: bool = False) -> Compiled:
    """Run ``edgetpu_compiler`` on the model; a clear error when it is missing or fails.

    ``MODEL_edgetpu.tflite`` and its ``.log`` go to ``out_dir`` (default: beside the model), checked
    before the compiler runs (an existing file is replaced only with ``force``) and moved there whole:
    the compiler works in a temporary folder.
    """
    import tempfile

    from edgesqz.fileio import atomic_write, check_distinct, check_output, os_error

    exe = shutil.which(compiler)
    if exe is None:
        where = "" if platform.machine() in ("x86_64", "AMD64") else f" (this is {platform.machine()})"
        raise EdgesqzError(INSTALL_COMPILER + where)
    path = Path(path)
    out = Path(out_dir) if out_dir else path.parent
    inputs = [("the model", path)]
    target = check_output(out / f"{path.stem}_edgetpu.tflite", force=force, what="compiled model",
                          option="--out-dir", inputs=inputs)
    log_path = check_output(out / f"{path.stem}_edgetpu.log", force=force, what="compiler log", option="--out-dir",
                            inputs=inputs)
    check_distinct([("compiled model", target), ("compiler log", log_path)])
    with tempfile.TemporaryDirectory(prefix=".edgetpu-", dir=out) as work:
        proc = subprocess.run([exe, "--show_operations", "--out_dir", work, str(path)], capture_output=True,
                              text=True, timeout=600)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            atomic_write(log_path, log, force=force)
            first = next((line for line in log.splitlines() if line.strip()), "no output")
            raise EdgesqzError(f"edgetpu_compiler failed: {first} (log: {log_path})")
        produced = Path(work) / target.name
        if not produced.exists():
            raise EdgesqzError(f"edgetpu_compiler wrote no {target.name}; its output: {log.strip()[:200]}")
        try:
            atomic_write(target, produced.read_bytes(), force=force)
        except OSError as exc:
            raise os_error(target, exc, "read") from exc
        atomic_write(log_path, log, force=force)
    return Compiled(target, log, parse_compiler_log(log))
