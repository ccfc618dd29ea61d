"""Turn an int8 class-map model into a standard TFLite image classifier.

edgesqz's best int8 model (``--ptq best``) ends in the int8 class map ``[1, H, W, C]`` (the ReLU of
SqueezeNet's last 1x1 convolution) and leaves the global average to whoever reads it, because an
int8 *logit* is too coarse (ties). The standard classifier clients (MediaPipe Tasks, the TFLite Task
Library) instead want uint8 (or float32) image input and ONE ``[1, C]`` output of scores. This
module edits the flatbuffer so the model is both:

- input: when it is int8 (``pixel - 128``), a new uint8 input (raw pixels 0..255) in front of the
  unchanged int8 body, converted by DEQUANTIZE (uint8 -> float32) + QUANTIZE (float32 -> int8)
  (``input_conversion="dequantize_quantize"``, the default: XNNPACK runs both, so it covers the
  whole graph) or by one QUANTIZE uint8 -> int8 (``"quantize"``: what the Edge TPU runs, but
  XNNPACK leaves it to TFLite's single-threaded kernel: +4 % of invoke time at 1 thread, +8 % at
  2). Both are exact (the int8 input is ``pixel - 128``: scale 1, integers);
- output: one float32 ``[1, C]`` output of probabilities, computed from the int8 class map at full
  precision, as the device did outside the model:

  - ``pool="mean"`` (the default): DEQUANTIZE -> MEAN over H, W -> SOFTMAX, all float32. XNNPACK
    runs all three in the body's partition (with the default input: +1 % of invoke time at 1 and 2
    threads, and 9-16 % less than invoke + the device's numpy pooling of the class map), and any
    TFLite runtime since 1.14 runs them (Coral's tflite_runtime 2.5 too). The top-1 is the
    class-map model's except where the int8 map ties exactly (equal integer sums, ~0.15 % of
    photos): the device's numpy argmax took the lower class index there, the float sum's rounding
    picks either (5 of 6,400 held-out images over 8 splits; agreement with float 96.92 vs 96.91 %).
  - ``pool="exact_mean"``: CAST int8 -> float32 (the raw integers), MEAN, MUL by the map's scale,
    SOFTMAX. The mean of the integers is exact (their sum is below 2**24), so the top-1 is the
    class-map model's on every image, exact ties included. But XNNPACK leaves the CAST to
    TFLite's single-threaded kernel (two partitions: +3 % of invoke time at 1 thread, +5 % at 2),
    and CAST from int8 is op version 3: TFLite runtime >= 2.8 (the model's ``min_runtime_version``
    is raised to match).
  - ``pool="average_pool"``: AVERAGE_POOL_2D + RESHAPE instead of MEAN (the same as ``"mean"``).

  ``output="uint8"`` adds a QUANTIZE to uint8 (scale 1/256): no smaller, and probabilities closer
  than 1/256 tie (-0.13 points of agreement). All figures: ``benchmarks/standard_head.py``, results
  in ``benchmarks/results/standard_head.md``.

Everything else is kept: operator order, the TFLITE_METADATA and other metadata buffers, the
signature def (re-pointed to the new input/output tensors) and the zip of associated files after
the flatbuffer (labels.txt, edgesqz.json); in ``edgesqz.json`` the ``input.dtype`` and ``output``
entries are updated to say what the model now is.

Needs ``ai_edge_litert`` (its ``schema_py_generated`` object API) and numpy; no TensorFlow.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from edgesqz.errors import EdgesqzError

OutputType = Literal["float32", "uint8"]
Pool = Literal["mean", "average_pool", "exact_mean"]
InputConversion = Literal["quantize", "dequantize_quantize"]
# For models compiled for the Edge TPU: its compiler maps the QUANTIZE input and the int8 body, and
# the DEQUANTIZE -> MEAN -> SOFTMAX tail runs on the CPU in any TFLite runtime since 1.14.
EDGETPU_OPTIONS: dict[str, Any] = {"input_conversion": "quantize", "pool": "mean"}

HEAD_PREFIX = "edgesqz_head/"
# The oldest TFLite runtime with each op version the head adds (tensorflow/lite/tools/versioning/
# runtime_version.cc); the model's min_runtime_version metadata is raised to the largest.
MIN_RUNTIME = {
    ("DEQUANTIZE", 1): "1.13.1", ("DEQUANTIZE", 2): "1.14.0", ("QUANTIZE", 1): "1.14.0", ("MEAN", 1): "1.6.0",
    ("SOFTMAX", 1): "1.5.0", ("MUL", 1): "1.5.0", ("AVERAGE_POOL_2D", 1): "1.5.0", ("RESHAPE", 1): "1.5.0",
    ("CAST", 1): "1.5.0", ("CAST", 3): "2.8.0",
}
UINT8_OUTPUT_SCALE = 1.0 / 256.0  # what the converter uses for a uint8 SOFTMAX output (zero point 0)
INFO_FILE = "edgesqz.json"


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError as exc:  # pragma: no cover - ai-edge-litert is a dependency
        raise EdgesqzError("editing a .tflite needs ai-edge-litert: pip install ai-edge-litert") from exc
    return schema


@dataclass(frozen=True)
class HeadInfo:
    """What :func:`add_probability_head` built (for reports and ``edgesqz.json``)."""

    input_dtype: str  # "uint8" (or "int8"/"float32" when kept)
    output_dtype: str  # "float32" or "uint8"
    classes: int
    class_map: tuple[int, int]  # H, W of the averaged map
    ops: tuple[str, ...]  # the ops added, in order

    def describe(self) -> str:
        h, w = self.class_map
        return f"int8 class map {h}x{w}x{self.classes} -> " + " -> ".join(self.ops) + f" ({self.output_dtype} out)"


# --------------------------------------------------------------------------- helpers


def _name(s: str | bytes | None) -> str:
    return s.decode("utf-8") if isinstance(s, bytes) else (s or "")


def _opcode(m: Any, builtin: int, version: int) -> int:
    """Index of the (builtin, version) operator code, added when missing."""
    schema = _schema()
    for i, oc in enumerate(m.operatorCodes or []):
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == builtin and oc.version == version and not oc.customCode:
            return i
    oc = schema.OperatorCodeT()
    oc.builtinCode = builtin
    # codes above 126 live in builtinCode only; the deprecated byte then holds PLACEHOLDER_FOR_GREATER_OP_CODES
    oc.deprecatedBuiltinCode = min(builtin, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
    oc.version = version
    m.operatorCodes = [*(m.operatorCodes or []), oc]
    return len(m.operatorCodes) - 1


def _quant(scale: float, zero_point: int) -> Any:
    q = _schema().QuantizationParametersT()
    q.scale = [float(scale)]
    q.zeroPoint = [int(zero_point)]
    q.quantizedDimension = 0
    return q


def _empty_buffer(m: Any) -> int:
    """Buffer 0 is the schema's empty sentinel; fall back to a new empty buffer if a model breaks that."""
    schema = _schema()
    if m.buffers and m.buffers[0].data is None and not getattr(m.buffers[0], "offset", 0):
        return 0
    m.buffers = [*(m.buffers or []), schema.BufferT()]
    return len(m.buffers) - 1


def _add_tensor(m: Any, sub: Any, name: str, shape: list[int], ttype: int, *, quant: Any = None,
                data: np.ndarray | None = None) -> int:
    schema = _schema()
    t = schema.TensorT()
    t.name = name
    t.shape = np.asarray(shape, np.int32)
    t.shapeSignature = None
    t.hasRank = True
    t.type = ttype
    t.quantization = quant
    if data is None:
        t.buffer = _empty_buffer(m)
    else:
        buf = schema.BufferT()
        buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
        m.buffers = [*(m.buffers or []), buf]
        t.buffer = len(m.buffers) - 1
    sub.tensors = [*(sub.tensors or []), t]
    return len(sub.tensors) - 1


def _op(m: Any, builtin: int, version: int, inputs: list[int], outputs: list[int],
        options_type: int = 0, options: Any = None) -> Any:
    op = _schema().OperatorT()
    op.opcodeIndex = _opcode(m, builtin, version)
    op.inputs = np.asarray(inputs, np.int32)
    op.outputs = np.asarray(outputs, np.int32)
    op.builtinOptionsType = options_type
    op.builtinOptions = options
    return op


def _producer(sub: Any, tensor: int) -> int | None:
    for i, op in enumerate(sub.operators or []):
        if tensor in [int(t) for t in (op.outputs if op.outputs is not None else [])]:
            return i
    return None


def _consumers(sub: Any, tensor: int) -> list[int]:
    return [i for i, op in enumerate(sub.operators or [])
            if tensor in [int(t) for t in (op.inputs if op.inputs is not None else [])]]


def _op_name(m: Any, op: Any) -> str:
    schema = _schema()
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    oc = m.operatorCodes[op.opcodeIndex]
    return names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "?")


def _scale_zp(t: Any) -> tuple[float, int]:
    q = t.quantization
    if q is None or q.scale is None or len(q.scale) != 1:
        raise EdgesqzError(f"tensor {_name(t.name)!r} has no per-tensor quantisation")
    return float(q.scale[0]), int(q.zeroPoint[0]) if q.zeroPoint is not None else 0


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def _raise_min_runtime(m: Any, ops: list[Any]) -> str | None:
    """Raise the ``min_runtime_version`` metadata to what ``ops`` need; returns the version written."""
    needed = max((MIN_RUNTIME.get((_op_name(m, op), m.operatorCodes[op.opcodeIndex].version), "1.5.0") for op in ops),
                 key=_version_tuple, default=None)
    for entry in m.metadata or []:
        if _name(entry.name) != "min_runtime_version" or needed is None:
            continue
        buf = m.buffers[entry.buffer]
        current = bytes(buf.data if buf.data is not None else b"").rstrip(b"\0").decode("ascii", "replace")
        if _version_tuple(needed) > _version_tuple(current):
            # the converter writes the version as text padded with NULs to 16 bytes
            buf.data = np.frombuffer(needed.encode().ljust(16, b"\0"), np.uint8)
            return needed
        return current
    return None


def _retarget_signatures(m: Any, old: int, new: int, *, inputs: bool) -> None:
    for sig in m.signatureDefs or []:
        for tm in (sig.inputs if inputs else sig.outputs) or []:
            if tm.tensorIndex == old:
                tm.tensorIndex = new


# --------------------------------------------------------------------------- the zip tail


def _split_zip_tail(model: bytes) -> dict[str, bytes]:
    """The associated files appended to the model as a zip (empty when there is none)."""
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as zf:
            return {name: zf.read(name) for name in zf.namelist()}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return {}


def _append_zip(flatbuffer: bytes, files: dict[str, bytes]) -> bytes:
    """``flatbuffer`` followed by ``files`` as a stored zip with absolute offsets (as embed_metadata writes)."""
    if not files:
        return flatbuffer
    out = io.BytesIO()
    out.write(flatbuffer)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for fname, payload in files.items():
            zf.writestr(zipfile.ZipInfo(fname, date_time=(1980, 1, 1, 0, 0, 0)), payload)
    return out.getvalue()


def _update_info(files: dict[str, bytes], head: HeadInfo) -> None:
    if INFO_FILE not in files:
        return
    info = json.loads(files[INFO_FILE])
    if not isinstance(info, dict):
        return
    if isinstance(info.get("input"), dict):
        info["input"]["dtype"] = head.input_dtype
    info["output"] = {**(info.get("output") or {}), "kind": "probabilities", "classes": head.classes,
                      "dtype": head.output_dtype, "head": head.describe()}
    files[INFO_FILE] = json.dumps(info, sort_keys=True, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------- the head


def add_probability_head(model: bytes, *, uint8_input: bool = True, output: OutputType = "float32",
                         pool: Pool = "mean", input_conversion: InputConversion = "dequantize_quantize"
                         ) -> bytes:
    """A standard classifier from an int8 class-map model (see the module docstring).

    ``model``: TFLite bytes with one image input (int8, uint8 or float32) and one output, the class
    map ``[1, H, W, C]`` as int8/uint8 (or float32 right after the converter's DEQUANTIZE).
    ``uint8_input``: replace an int8 input by uint8 raw pixels; ``input_conversion`` says how (see
    the module docstring; use ``"quantize"`` for models meant for the Edge TPU). ``output``:
    ``"float32"`` probabilities (recommended) or ``"uint8"`` (scale 1/256). ``pool``: ``"mean"`` (the
    default), ``"exact_mean"`` or ``"average_pool"`` (see the module docstring); for the Edge TPU pass
    ``**EDGETPU_OPTIONS``.
    Returns the new model bytes (with the original zip tail, ``edgesqz.json`` updated).
    """
    return add_probability_head_info(model, uint8_input=uint8_input, output=output, pool=pool,
                                     input_conversion=input_conversion)[0]


def add_probability_head_info(model: bytes, *, uint8_input: bool = True, output: OutputType = "float32",
                              pool: Pool = "mean", input_conversion: InputConversion = "dequantize_quantize"
                              ) -> tuple[bytes, HeadInfo]:
    """:func:`add_probability_head`, plus what was built."""
    from edgesqz.tflite_metadata import _AlignedBuilder

    if output not in ("float32", "uint8"):
        raise EdgesqzError(f"output must be float32 or uint8, not {output!r}")
    if pool not in ("mean", "average_pool", "exact_mean"):
        raise EdgesqzError(f"pool must be mean, average_pool or exact_mean, not {pool!r}")
    schema = _schema()
    model = bytes(model)
    if len(model) < 8 or model[4:8] != b"TFL3":
        raise EdgesqzError("not a .tflite model (no TFL3 file identifier)")
    files = _split_zip_tail(model)
    try:
        m = schema.ModelT.InitFromPackedBuf(model, 0)
    except Exception as exc:  # the generated reader raises many types on a corrupt buffer
        raise EdgesqzError("not a valid .tflite model (corrupt flatbuffer)") from exc
    if len(m.subgraphs) != 1:
        raise EdgesqzError(f"expected one subgraph, found {len(m.subgraphs)}")
    sub = m.subgraphs[0]
    if len(sub.inputs) != 1 or len(sub.outputs) != 1:
        raise EdgesqzError("expected one input and one output tensor")
    T, B = schema.TensorType, schema.BuiltinOperator

    # -- output: find the class map as the int8/uint8 tensor the model computes
    out_index = int(sub.outputs[0])
    out_t = sub.tensors[out_index]
    shape = [int(d) for d in out_t.shape]
    if len(shape) != 4 or shape[0] != 1:
        raise EdgesqzError(f"the output has shape {shape}; expected a class map [1, H, W, C]")
    _, h, w, classes = shape
    cmap = out_index
    producer = _producer(sub, out_index)
    if (producer is not None and _op_name(m, sub.operators[producer]) in ("QUANTIZE", "DEQUANTIZE")
            and len(_consumers(sub, out_index)) == 0):
        # the converter's output conversion (int8 -> uint8, or int8 -> float32): read the int8 map itself
        src = int(sub.operators[producer].inputs[0])
        if sub.tensors[src].type == T.INT8:
            sub.operators = [op for i, op in enumerate(sub.operators) if i != producer]
            cmap = src
    cmap_t = sub.tensors[cmap]
    if cmap_t.type not in (T.INT8, T.UINT8, T.FLOAT32):
        raise EdgesqzError("the class map must be int8, uint8 or float32")

    added: list[str] = []
    tail = []
    if pool == "exact_mean":
        if cmap_t.type not in (T.INT8, T.UINT8):
            raise EdgesqzError("pool='exact_mean' needs an int8 or uint8 class map")
        scale, _ = _scale_zp(cmap_t)
        cmap_f = _add_tensor(m, sub, f"{HEAD_PREFIX}class_map_integers", shape, T.FLOAT32)
        copts = schema.CastOptionsT()
        copts.inDataType, copts.outDataType = cmap_t.type, T.FLOAT32
        tail.append(_op(m, B.CAST, 3 if cmap_t.type == T.INT8 else 1, [cmap], [cmap_f],
                        schema.BuiltinOptions.CastOptions, copts))
        added.append("CAST")
    elif cmap_t.type == T.FLOAT32:
        cmap_f = cmap
    else:
        cmap_f = _add_tensor(m, sub, f"{HEAD_PREFIX}class_map_float", shape, T.FLOAT32)
        version = 2 if cmap_t.type == T.INT8 else 1
        tail.append(_op(m, B.DEQUANTIZE, version, [cmap], [cmap_f]))
        added.append("DEQUANTIZE")
    logits = _add_tensor(m, sub, f"{HEAD_PREFIX}logits", [1, classes], T.FLOAT32)
    if pool == "exact_mean":
        # the mean of the raw integers is exact up to one rounding (|sum| < 2**24), so equal sums stay equal
        # and the class map's exact ties stay ties; times the map's scale it is the logits plus a constant
        # (zero point x scale), which SOFTMAX ignores
        means = _add_tensor(m, sub, f"{HEAD_PREFIX}mean_integers", [1, classes], T.FLOAT32)
        axes = _add_tensor(m, sub, f"{HEAD_PREFIX}mean_axes", [2], T.INT32, data=np.array([1, 2], np.int32))
        opts = schema.ReducerOptionsT()
        opts.keepDims = False
        tail.append(_op(m, B.MEAN, 1, [cmap_f, axes], [means], schema.BuiltinOptions.ReducerOptions, opts))
        factor = _add_tensor(m, sub, f"{HEAD_PREFIX}class_map_scale", [], T.FLOAT32,
                             data=np.array(scale, np.float32))
        tail.append(_op(m, B.MUL, 1, [means, factor], [logits], schema.BuiltinOptions.MulOptions,
                        schema.MulOptionsT()))
        added += ["MEAN", "MUL"]
    elif pool == "mean":
        axes = _add_tensor(m, sub, f"{HEAD_PREFIX}mean_axes", [2], T.INT32, data=np.array([1, 2], np.int32))
        opts = schema.ReducerOptionsT()
        opts.keepDims = False
        tail.append(_op(m, B.MEAN, 1, [cmap_f, axes], [logits], schema.BuiltinOptions.ReducerOptions, opts))
        added.append("MEAN")
    else:
        pooled = _add_tensor(m, sub, f"{HEAD_PREFIX}pooled", [1, 1, 1, classes], T.FLOAT32)
        opts = schema.Pool2DOptionsT()
        opts.padding = schema.Padding.VALID
        opts.strideW = opts.strideH = 1
        opts.filterWidth, opts.filterHeight = w, h
        opts.fusedActivationFunction = schema.ActivationFunctionType.NONE
        tail.append(_op(m, B.AVERAGE_POOL_2D, 1, [cmap_f], [pooled], schema.BuiltinOptions.Pool2DOptions, opts))
        new_shape = _add_tensor(m, sub, f"{HEAD_PREFIX}logits_shape", [2], T.INT32,
                                data=np.array([1, classes], np.int32))
        ropts = schema.ReshapeOptionsT()
        ropts.newShape = [1, classes]
        tail.append(_op(m, B.RESHAPE, 1, [pooled, new_shape], [logits], schema.BuiltinOptions.ReshapeOptions, ropts))
        added += ["AVERAGE_POOL_2D", "RESHAPE"]
    probs = _add_tensor(m, sub, f"{HEAD_PREFIX}probabilities", [1, classes], T.FLOAT32)
    sopts = schema.SoftmaxOptionsT()
    sopts.beta = 1.0
    tail.append(_op(m, B.SOFTMAX, 1, [logits], [probs], schema.BuiltinOptions.SoftmaxOptions, sopts))
    added.append("SOFTMAX")
    final = probs
    if output == "uint8":
        final = _add_tensor(m, sub, f"{HEAD_PREFIX}probabilities_uint8", [1, classes], T.UINT8,
                            quant=_quant(UINT8_OUTPUT_SCALE, 0))
        tail.append(_op(m, B.QUANTIZE, 1, [probs], [final]))
        added.append("QUANTIZE")
    sub.operators = [*sub.operators, *tail]
    sub.outputs = np.asarray([final], np.int32)
    _retarget_signatures(m, out_index, final, inputs=False)

    # -- input: uint8 raw pixels in front of an int8 body
    in_index = int(sub.inputs[0])
    in_t = sub.tensors[in_index]
    in_dtype = {T.INT8: "int8", T.UINT8: "uint8", T.FLOAT32: "float32"}.get(in_t.type, "?")
    front: list[Any] = []
    if uint8_input and in_t.type == T.INT8:
        scale, zp = _scale_zp(in_t)
        if not -128 <= zp + 128 <= 255:
            raise EdgesqzError(f"the int8 input's zero point {zp} has no uint8 equivalent")
        new_in = _add_tensor(m, sub, _name(in_t.name), [int(d) for d in in_t.shape], T.UINT8,
                             quant=_quant(scale, zp + 128))
        in_t.name = f"{_name(in_t.name)}_int8"
        if input_conversion == "quantize":
            front = [_op(m, B.QUANTIZE, 1, [new_in], [in_index])]
        else:  # uint8 -> float32 -> int8: two ops XNNPACK runs, where it leaves QUANTIZE(uint8 -> int8) to TFLite
            pixels = _add_tensor(m, sub, f"{HEAD_PREFIX}pixels_float", [int(d) for d in in_t.shape], T.FLOAT32)
            front = [_op(m, B.DEQUANTIZE, 1, [new_in], [pixels]), _op(m, B.QUANTIZE, 1, [pixels], [in_index])]
        sub.operators = [*front, *sub.operators]
        sub.inputs = np.asarray([new_in], np.int32)
        _retarget_signatures(m, in_index, new_in, inputs=True)
        in_dtype = "uint8"
        added.insert(0, "QUANTIZE(input)")

    _raise_min_runtime(m, [*front, *tail])
    head = HeadInfo(input_dtype=in_dtype, output_dtype=output, classes=classes, class_map=(h, w),
                    ops=tuple(a for a in added if a != "QUANTIZE(input)"))
    b = _AlignedBuilder(len(model) + 65536)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    _update_info(files, head)
    return _append_zip(bytes(b.Output()), files), head


# --------------------------------------------------------------------------- the contract


def standard_classifier_problems(model: bytes) -> list[str]:
    """Why ``model`` is not a standard image classifier for MediaPipe / the Task Library (empty: it is).

    One NHWC ``[1, S, S, 3]`` input of uint8 (or float32) and one ``[1, C]`` output of float32 or
    uint8 scores produced by SOFTMAX (possibly through one QUANTIZE), so the scores are probabilities.
    Checks the flatbuffer only; it does not run the model.
    """
    schema = _schema()
    T = schema.TensorType
    try:
        m = schema.ModelT.InitFromPackedBuf(bytes(model), 0)
    except Exception:  # the generated reader raises many types on a corrupt buffer
        return ["not a valid .tflite flatbuffer"]
    problems = []
    sub = m.subgraphs[0]
    if len(sub.inputs) != 1 or len(sub.outputs) != 1:
        return [f"{len(sub.inputs)} inputs and {len(sub.outputs)} outputs (expected one each)"]
    t_in, t_out = sub.tensors[int(sub.inputs[0])], sub.tensors[int(sub.outputs[0])]
    in_shape, out_shape = [int(d) for d in t_in.shape], [int(d) for d in t_out.shape]
    if len(in_shape) != 4 or in_shape[0] != 1 or in_shape[3] != 3:
        problems.append(f"input shape {in_shape} (expected [1, S, S, 3])")
    if t_in.type not in (T.UINT8, T.FLOAT32):
        problems.append("input is not uint8 or float32 (the clients refuse int8)")
    if len(out_shape) != 2 or out_shape[0] != 1:
        problems.append(f"output shape {out_shape} (expected [1, C])")
    if t_out.type not in (T.FLOAT32, T.UINT8):
        problems.append("output is not float32 or uint8")
    producer = _producer(sub, int(sub.outputs[0]))
    name = _op_name(m, sub.operators[producer]) if producer is not None else None
    if name == "QUANTIZE":
        before = _producer(sub, int(sub.operators[producer].inputs[0]))
        name = _op_name(m, sub.operators[before]) if before is not None else None
    if name != "SOFTMAX":
        problems.append(f"the output comes from {name} (expected SOFTMAX: scores must be probabilities)")
    return problems
