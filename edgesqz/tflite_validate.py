"""Check a ``.tflite`` file's structure before any native code sees it.

A model file is untrusted input. The TFLite runtime trusts the indices and sizes in the
flatbuffer more than it should: a tensor index of -1 where an op needs a tensor, a constant
tensor whose buffer is shorter than its shape, or a shape of 10^11 elements can crash the
process instead of raising an error. :func:`validate_model` reads every table the runtime will
read, with bounds-checked reads (never past the end of the file, never a vector longer than the
file could hold), and refuses the model with a one-line reason when:

- the file is too large, has no ``TFL3`` identifier, or an offset points outside it;
- an operator's opcode index, input/output tensor indices, a subgraph's inputs/outputs, a
  tensor's buffer index, a signature's tensor index or a control-flow op's subgraph index is out
  of range (-1, "no tensor", only for the op inputs the runtime treats as optional);
- a tensor has a negative dimension (only ``-1`` in ``shape_signature``), a rank above
  :data:`MAX_RANK`, more than :data:`MAX_TENSOR_BYTES` bytes, or an unknown type;
- a constant tensor's data does not have exactly ``elements * element size`` bytes, or its
  quantisation parameters do not fit its shape, or a quantisation scale is NaN, infinite or negative;
- a tensor an operator reads has no data and nothing computes it, or an operator writes into a
  constant tensor;
- a packed 4-bit (``INT4``) tensor breaks the rules edgesqz's 4-bit weights follow (docs/model-format.md):
  it must be a constant of an even number of elements held in exactly ``elements / 2`` bytes (two
  values per byte, low nibble first), quantised with zero points 0, and read only as the filter
  (input 1) of ``CONV_2D``, ``DEPTHWISE_CONV_2D`` or ``FULLY_CONNECTED``;
- the counts exceed the caps below (bounded work and memory whatever the file says).

It needs only the standard library and the bounds-checked reader of :mod:`edgesqz.tflite_metadata`.
"""

from __future__ import annotations

import math
import struct

from flatbuffers import number_types as fbn

from edgesqz.errors import EdgesqzError
from edgesqz.tflite_metadata import _PARSE_ERRORS, _Corrupt, _not_tflite, _Tbl

MAX_MODEL_BYTES = 1 << 30  # 1 GiB: far above any image classifier for a Raspberry Pi
MAX_SUBGRAPHS = 1_000
MAX_TENSORS = 200_000  # per subgraph
MAX_OPERATORS = 200_000  # per subgraph
MAX_RANK = 16
MAX_BUFFERS = 1_000_000
MAX_OPCODES = 10_000
MAX_TENSOR_BYTES = 1 << 30  # one tensor, also caps the element count below 2**31 (int32 in the kernels)
MAX_ACTIVATION_BYTES = 8 << 30  # all non-constant tensors of a subgraph together (an upper bound of the arena)

# tflite schema.fbs field slots (declaration order)
_M_OPCODES, _M_SUBGRAPHS, _M_BUFFERS, _M_METADATA_BUFFER, _M_SIGNATURES = 1, 2, 4, 5, 7
_M_EXTERNAL_BUFFERS = 9
_SG_TENSORS, _SG_INPUTS, _SG_OUTPUTS, _SG_OPERATORS = 0, 1, 2, 3
_T_SHAPE, _T_TYPE, _T_BUFFER, _T_NAME, _T_QUANT, _T_VARIABLE, _T_SPARSITY, _T_SIGNATURE = 0, 1, 2, 3, 4, 5, 6, 7
_T_EXTERNAL_BUFFER = 10
_OP_OPCODE, _OP_INPUTS, _OP_OUTPUTS, _OP_OPTIONS_TYPE, _OP_OPTIONS, _OP_INTERMEDIATES = 0, 1, 2, 3, 4, 8
_OC_DEPRECATED, _OC_CUSTOM, _OC_BUILTIN = 0, 1, 3
_B_DATA, _B_OFFSET, _B_SIZE = 0, 1, 2
_Q_SCALE, _Q_ZERO_POINT, _Q_DIMENSION = 2, 3, 6
_SD_INPUTS, _SD_OUTPUTS, _SD_KEY, _SD_SUBGRAPH = 0, 1, 2, 4
_TM_NAME, _TM_TENSOR = 0, 1
_SG_NAME = 4

# TensorType -> (name, bits per element); None: no fixed size (strings, resources, variants)
_TYPES: dict[int, tuple[str, int | None]] = {
    0: ("FLOAT32", 32), 1: ("FLOAT16", 16), 2: ("INT32", 32), 3: ("UINT8", 8), 4: ("INT64", 64),
    5: ("STRING", None), 6: ("BOOL", 8), 7: ("INT16", 16), 8: ("COMPLEX64", 64), 9: ("INT8", 8),
    10: ("FLOAT64", 64), 11: ("COMPLEX128", 128), 12: ("UINT64", 64), 13: ("RESOURCE", None),
    14: ("VARIANT", None), 15: ("UINT32", 32), 16: ("UINT16", 16), 17: ("INT4", 4), 18: ("BFLOAT16", 16),
    19: ("INT2", 2), 20: ("UINT4", 4), 21: ("FLOAT8_E4M3FN", 8), 22: ("FLOAT8_E5M2", 8),
}

# BuiltinOperator codes with inputs the runtime treats as optional (-1 allowed there).
_CONV_2D, _DEPTHWISE_CONV_2D, _FULLY_CONNECTED, _RESHAPE, _SVDF, _TRANSPOSE_CONV = 3, 4, 9, 22, 27, 67
_CONV_3D, _CONV_3D_TRANSPOSE, _CUSTOM = 132, 141, 32
_OPTIONAL_INPUTS: dict[int, frozenset[int]] = {
    _CONV_2D: frozenset({2}), _DEPTHWISE_CONV_2D: frozenset({2}), _FULLY_CONNECTED: frozenset({2}),
    _RESHAPE: frozenset({1}), _SVDF: frozenset({4}), _TRANSPOSE_CONV: frozenset({3}), _CONV_3D: frozenset({2}),
    _CONV_3D_TRANSPOSE: frozenset({3}),
}
# Recurrent ops whose many optional inputs (peepholes, projections, layer norm) the kernels check.
_ANY_OPTIONAL = frozenset({16, 44, 46, 52})  # LSTM, UNIDIRECTIONAL_SEQUENCE_LSTM, BIDIRECTIONAL_SEQUENCE_RNN/_LSTM
# Control flow: BuiltinOptions union type -> how many leading int32 fields are subgraph indices.
_SUBGRAPH_OPTIONS = {92: 2, 93: 2, 103: 1}  # IfOptions, WhileOptions, CallOnceOptions


class _Invalid(Exception):
    """Internal: the structure is readable but inconsistent."""


def validate_model(buf: bytes, src: str = "the model data") -> None:
    """Raise :class:`EdgesqzError` naming ``src`` unless ``buf`` is a structurally sound TFLite model."""
    if len(buf) > MAX_MODEL_BYTES:
        raise EdgesqzError(f"{src} is {len(buf) / 2**20:.0f} MiB; edgesqz accepts models up to "
                           f"{MAX_MODEL_BYTES >> 20} MiB")
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise _not_tflite(src, "no TFL3 file identifier")
    try:
        _check(buf)
    except _Invalid as exc:
        raise _not_tflite(src, str(exc)) from None
    except _PARSE_ERRORS as exc:  # _Corrupt is a ValueError: an offset outside the file
        why = str(exc) if isinstance(exc, _Corrupt) else "an offset or a length points outside the file"
        raise _not_tflite(src, f"corrupt or truncated flatbuffer: {why}") from None


def _ints(tbl: _Tbl, slot: int, flags: type = fbn.Int32Flags, cap: int = MAX_TENSORS, what: str = "a vector"
          ) -> list[int]:
    span = tbl.span(slot, flags.bytewidth)
    if span is None:
        return []
    start, n = span
    if n > cap:
        raise _Invalid(f"{what} has {n} entries (at most {cap})")
    return [tbl.t.Get(flags, start + flags.bytewidth * i) for i in range(n)]


def _text(tbl: _Tbl, slot: int, what: str) -> None:
    """Flatbuffer strings are UTF-8; the runtime decodes these ones."""
    try:
        tbl.string(slot)
    except UnicodeDecodeError:
        raise _Invalid(f"{what} is not UTF-8 text") from None


def _tables(tbl: _Tbl, slot: int, cap: int, what: str) -> list[_Tbl]:
    span = tbl.span(slot, 4)
    if span is not None and span[1] > cap:
        raise _Invalid(f"{span[1]} {what} (at most {cap})")
    return tbl.tables(slot)


def _check(buf: bytes) -> None:
    model = _Tbl.root(buf)
    codes = []
    for c in _tables(model, _M_OPCODES, MAX_OPCODES, "opcodes"):
        codes.append(max(c.scalar(_OC_DEPRECATED, fbn.Int8Flags), c.scalar(_OC_BUILTIN, fbn.Int32Flags)))
        _text(c, _OC_CUSTOM, "a custom op's name")
    buffer_tables = _tables(model, _M_BUFFERS, MAX_BUFFERS, "buffers")
    sizes = []  # bytes of data per buffer
    for i, b in enumerate(buffer_tables):
        offset, size = b.scalar(_B_OFFSET, fbn.Uint64Flags), b.scalar(_B_SIZE, fbn.Uint64Flags)
        if offset > 1:  # data after the flatbuffer (models > 2 GB)
            if offset + size > len(buf):
                raise _Invalid(f"buffer {i} points past the end of the file (truncated?)")
            sizes.append(size)
        else:
            span = b.span(_B_DATA, 1)
            sizes.append(span[1] if span else 0)
    if model.span(_M_EXTERNAL_BUFFERS, 4):
        raise _Invalid("its weights live in external files, which edgesqz does not load")
    for i in _ints(model, _M_METADATA_BUFFER, cap=MAX_BUFFERS, what="metadata_buffer"):
        if not 0 <= i < len(sizes):
            raise _Invalid(f"metadata buffer index {i} is out of range ({len(sizes)} buffers)")
    subgraphs = _tables(model, _M_SUBGRAPHS, MAX_SUBGRAPHS, "subgraphs")
    if not subgraphs:
        raise _Invalid("no subgraphs")
    for s, sub in enumerate(subgraphs):
        _check_subgraph(s, sub, codes, sizes, len(subgraphs))
    for sig in _tables(model, _M_SIGNATURES, MAX_SUBGRAPHS, "signatures"):
        s = sig.scalar(_SD_SUBGRAPH, fbn.Uint32Flags)
        if not 0 <= s < len(subgraphs):
            raise _Invalid(f"a signature names subgraph {s} of {len(subgraphs)}")
        n = len(_tables(subgraphs[s], _SG_TENSORS, MAX_TENSORS, "tensors"))
        _text(sig, _SD_KEY, "a signature's name")
        for tm in (*_tables(sig, _SD_INPUTS, MAX_TENSORS, "signature inputs"),
                   *_tables(sig, _SD_OUTPUTS, MAX_TENSORS, "signature outputs")):
            t = tm.scalar(_TM_TENSOR, fbn.Uint32Flags)
            _text(tm, _TM_NAME, "a signature's tensor name")
            if not 0 <= t < n:
                raise _Invalid(f"a signature names tensor {t} of subgraph {s}, which has {n} tensors")


def _check_subgraph(s: int, sub: _Tbl, codes: list[int], sizes: list[int], n_subgraphs: int) -> None:
    where = f"subgraph {s}" if s else "the graph"
    _text(sub, _SG_NAME, f"{where}'s name")
    tensors = _tables(sub, _SG_TENSORS, MAX_TENSORS, f"tensors in {where}")
    n = len(tensors)
    constant = [False] * n
    variable = [False] * n
    int4 = [False] * n
    names = []
    activations = 0
    for i, t in enumerate(tensors):
        try:
            name = t.string(_T_NAME) or ""
        except UnicodeDecodeError:
            raise _Invalid(f"tensor {i}'s name is not UTF-8 text") from None
        names.append(name[:40] + "..." if len(name) > 43 else name or "unnamed")
        what = f"tensor {i} ({names[-1]})"
        ttype = t.scalar(_T_TYPE, fbn.Int8Flags)
        if ttype not in _TYPES:
            raise _Invalid(f"{what} has an unknown type {ttype}")
        int4[i] = ttype == _INT4
        shape = _ints(t, _T_SHAPE, cap=MAX_RANK, what=f"{what}'s shape")
        if any(d < 0 for d in shape):
            raise _Invalid(f"{what} has a negative dimension in its shape {shape}")
        signature = _ints(t, _T_SIGNATURE, cap=MAX_RANK, what=f"{what}'s shape signature")
        if signature and (len(signature) != len(shape) or any(d < -1 for d in signature)):
            raise _Invalid(f"{what} has a shape signature {signature} that does not fit its shape {shape}")
        elements = math.prod(shape)
        bits = _TYPES[ttype][1]
        nbytes = (elements * bits + 7) // 8 if bits else 0
        if nbytes > MAX_TENSOR_BYTES:
            raise _Invalid(f"{what} of shape {shape} would take {nbytes / 2**20:.0f} MiB "
                           f"(at most {MAX_TENSOR_BYTES >> 20} MiB per tensor)")
        if t.scalar(_T_EXTERNAL_BUFFER, fbn.Uint32Flags):
            raise _Invalid(f"{what} keeps its data in an external file, which edgesqz does not load")
        b = t.scalar(_T_BUFFER, fbn.Uint32Flags)
        if not 0 <= b < max(len(sizes), 1):
            raise _Invalid(f"{what} refers to buffer {b}, but the model has {len(sizes)} buffers")
        size = sizes[b] if sizes else 0
        variable[i] = bool(t.scalar(_T_VARIABLE, fbn.BoolFlags))
        constant[i] = size > 0
        if ttype == _INT4:
            _check_int4(t, shape, elements, size, b, what)
        if size and bits and t.table(_T_SPARSITY) is None and size != nbytes:
            raise _Invalid(f"{what} of shape {shape} ({_TYPES[ttype][0]}) needs {nbytes} bytes of data but its "
                           f"buffer {b} holds {size}")
        if not constant[i]:
            activations += nbytes
        _check_quantization(t, shape, what)
    if activations > MAX_ACTIVATION_BYTES:
        raise _Invalid(f"{where}'s tensors would take {activations / 2**30:.1f} GiB "
                       f"(at most {MAX_ACTIVATION_BYTES >> 30} GiB)")

    inputs = _ints(sub, _SG_INPUTS, what=f"{where}'s inputs")
    outputs = _ints(sub, _SG_OUTPUTS, what=f"{where}'s outputs")
    for kind, indices in (("input", inputs), ("output", outputs)):
        for t in indices:
            if not 0 <= t < n:
                raise _Invalid(f"{where}'s {kind} tensor index {t} is out of range ({n} tensors)")
    for t in inputs:
        if constant[t]:
            raise _Invalid(f"{where}'s input tensor {t} ({names[t]}) is a constant")

    operators = _tables(sub, _SG_OPERATORS, MAX_OPERATORS, f"operators in {where}")
    produced = set(inputs)
    reads: list[tuple[str, int, int, int]] = []  # (operator, position, tensor, op code)
    for o, op in enumerate(operators):
        index = op.scalar(_OP_OPCODE, fbn.Uint32Flags)
        if not 0 <= index < len(codes):
            raise _Invalid(f"operator {o} uses opcode {index}, but the model has {len(codes)} opcodes")
        code = codes[index]
        what = f"operator {o} ({_op_name(code)})"
        optional = _OPTIONAL_INPUTS.get(code, frozenset())
        for pos, t in enumerate(_ints(op, _OP_INPUTS)):
            if t == -1 and (code in _ANY_OPTIONAL or code == _CUSTOM or pos in optional):
                continue
            if not 0 <= t < n:
                missing = " (missing), but that input is required" if t == -1 else f" ({n} tensors)"
                raise _Invalid(f"{what} input {pos} is tensor {t}{missing}")
            reads.append((what, pos, t, code))
        for pos, t in enumerate(_ints(op, _OP_OUTPUTS)):
            if not 0 <= t < n:
                raise _Invalid(f"{what} output {pos} is tensor {t} ({n} tensors)")
            if constant[t] and not variable[t]:
                raise _Invalid(f"{what} writes into the constant tensor {t} ({names[t]})")
            produced.add(t)
        for t in _ints(op, _OP_INTERMEDIATES):
            if not 0 <= t < n:
                raise _Invalid(f"{what} has an intermediate tensor {t} out of range ({n} tensors)")
        refs = _SUBGRAPH_OPTIONS.get(op.scalar(_OP_OPTIONS_TYPE, fbn.Uint8Flags))
        options = op.table(_OP_OPTIONS) if refs else None
        for slot in range(refs or 0):
            target = options.scalar(slot, fbn.Int32Flags) if options is not None else 0
            if not 0 <= target < n_subgraphs:
                raise _Invalid(f"{what} calls subgraph {target} of {n_subgraphs}")
    for what, pos, t, code in reads:
        if int4[t] and not (pos == 1 and code in _INT4_READERS):
            raise _Invalid(f"{what} input {pos} reads the 4-bit tensor {t} ({names[t]}); 4-bit tensors are only "
                           "the filters of CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED")
        if t not in produced and not constant[t] and not variable[t]:
            raise _Invalid(f"{what} input {pos} reads tensor {t} ({names[t]}), which has no data and "
                           "which no operator computes (a weight without its values?)")


_INT4 = 17
_INT4_READERS = frozenset({_CONV_2D, _DEPTHWISE_CONV_2D, _FULLY_CONNECTED})


def _check_int4(t: _Tbl, shape: list[int], elements: int, size: int, buffer: int, what: str) -> None:
    """Packed 4-bit weights: constant, an even count in exactly count / 2 bytes, zero points 0."""
    if not size:
        raise _Invalid(f"{what} is a 4-bit (INT4) tensor without data; edgesqz takes 4-bit weights only")
    if elements % 2:
        raise _Invalid(f"{what} of shape {shape} is a 4-bit (INT4) tensor with an odd number of elements "
                       f"({elements}); packed 4-bit weights hold two values in every byte")
    if size != elements // 2:
        raise _Invalid(f"{what} of shape {shape} (INT4, two values per byte) needs {elements // 2} bytes of data "
                       f"but its buffer {buffer} holds {size}: corrupt 4-bit packing")
    q = t.table(_T_QUANT)
    scales = q.span(_Q_SCALE, 4) if q is not None else None
    if not scales or not scales[1]:
        raise _Invalid(f"{what} is a 4-bit (INT4) tensor without quantisation scales")
    zeros = q.span(_Q_ZERO_POINT, 8) if q is not None else None
    if zeros and any(struct.unpack_from(f"<{zeros[1]}q", q.buf, zeros[0])):  # type: ignore[union-attr]
        raise _Invalid(f"{what} is a 4-bit (INT4) tensor with a non-zero zero point (4-bit weights are symmetric)")


def _op_name(code: int) -> str:
    """``CONCATENATION`` for a builtin code (from the runtime's schema module when it is there)."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        return f"opcode {code}"
    for name, value in vars(schema.BuiltinOperator).items():
        if value == code and not name.startswith("_"):
            return name
    return f"opcode {code}"


def _check_quantization(t: _Tbl, shape: list[int], what: str) -> None:
    q = t.table(_T_QUANT)
    if q is None:
        return
    scales = q.span(_Q_SCALE, 4)
    zeros = q.span(_Q_ZERO_POINT, 8)
    n_scale = scales[1] if scales else 0
    n_zero = zeros[1] if zeros else 0
    if n_zero and n_scale and n_zero != n_scale:
        raise _Invalid(f"{what} has {n_scale} quantisation scales but {n_zero} zero points")
    if n_scale > 1:
        dim = q.scalar(_Q_DIMENSION, fbn.Int32Flags)
        if not 0 <= dim < len(shape) or shape[dim] != n_scale:
            raise _Invalid(f"{what} of shape {shape} has {n_scale} quantisation scales along dimension {dim}")
    if n_scale:  # NaN or infinite scales make the reference kernels compute garbage without a word
        values = struct.unpack_from(f"<{n_scale}f", q.buf, scales[0])
        bad = next((v for v in values if not (math.isfinite(v) and v >= 0)), None)
        if bad is not None:
            raise _Invalid(f"{what} has a quantisation scale of {bad} (scales are finite and positive)")
