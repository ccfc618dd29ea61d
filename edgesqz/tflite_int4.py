"""4-bit convolution weights in a .tflite file: pack them (host) and widen them back to int8 (device).

The format is the TFLite schema's own: a ``CONV_2D`` filter tensor of type ``INT4`` (TensorType
17) whose buffer holds two signed 4-bit values per byte, low nibble first (element ``2i`` in bits
0-3, ``2i+1`` in bits 4-7), ``ceil(n / 2)`` bytes in all, with per-output-channel scales along
dimension 0 and zero points 0. Such an operator needs ``CONV_2D`` version 7 (int8 activations,
int4 filter) in its operator code; LiteRT's builtin kernel runs it as it is.

XNNPACK does not take INT4 convolution filters, so the device widens them in memory before it
builds the interpreter (:func:`widen_int4`): every INT4 tensor becomes the INT8 tensor with the same
values and scales (an exact copy of the arithmetic), and the operator codes go back to version 3.
The model then runs fully on XNNPACK at int8 speed, and the file on disk keeps half the bytes.

The host side (:func:`write_int4`) replaces chosen int8 filters of a converted model with their
4-bit grid (integer values and per-channel scales from :mod:`edgesqz.converters.quantize`) and
rescales each bias to the new filter scale. Reading and writing use the flatbuffer object API of
``ai_edge_litert.schema_py_generated`` (shipped with the runtime, so present on the device) and numpy;
no TensorFlow.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgesqz.errors import EdgesqzError

INT4, INT8, INT32 = 17, 9, 2
CONV_2D = 3
CONV_2D_INT8_VERSION = 3  # int8 activations, int8 filters
CONV_2D_INT4_VERSION = 7  # int8 activations, int4 filters (tensorflow/lite/tools/versioning/op_version.cc)
INT4_MIN, INT4_MAX = -8, 7

_LAYER = re.compile(r"(?:^|/)([^/;]+?)(?:_\d+)?/convolution$")


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Signed values in -8..7 (any shape, C order) -> uint8 bytes, two per byte, low nibble first."""
    flat = np.asarray(values).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < INT4_MIN or flat.max() > INT4_MAX):
        raise EdgesqzError(f"4-bit values must lie in {INT4_MIN}..{INT4_MAX}, got {flat.min()}..{flat.max()}")
    nibbles = (flat & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray | bytes, count: int) -> np.ndarray:
    """The inverse of :func:`pack_int4`: ``count`` signed int8 values from packed bytes."""
    data = np.frombuffer(packed, np.uint8) if isinstance(packed, bytes | bytearray) else np.asarray(packed, np.uint8)
    if len(data) != (count + 1) // 2:
        raise EdgesqzError(f"{count} 4-bit values take {(count + 1) // 2} bytes, got {len(data)}")
    out = np.empty(2 * len(data), np.int8)
    out[0::2] = (data & 0x0F).astype(np.int8)
    out[1::2] = (data >> 4).astype(np.int8)
    out[out > INT4_MAX] -= 16  # sign-extend the nibbles
    return out[:count]


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError as exc:  # pragma: no cover - ai-edge-litert is a dependency
        raise EdgesqzError("4-bit models need ai-edge-litert (pip install ai-edge-litert)") from exc
    return schema


def _code(oc: Any) -> int:
    return max(int(oc.builtinCode or 0), int(oc.deprecatedBuiltinCode or 0))


def _pack_model(m: Any, size_hint: int) -> bytes:
    from edgesqz.tflite_metadata import _AlignedBuilder

    b = _AlignedBuilder(size_hint + 4096)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def has_int4(model: bytes) -> bool:
    """Whether any tensor of the (validated) model is INT4; reads only the tensor tables."""
    schema = _schema()
    m = schema.Model.GetRootAs(model, 0)
    for s in range(m.SubgraphsLength()):
        sub = m.Subgraphs(s)
        for i in range(sub.TensorsLength()):
            if sub.Tensors(i).Type() == INT4:
                return True
    return False


@dataclass(frozen=True)
class ConvBits:
    """One convolution of a model file: its layer name, filter shape and weight bits."""

    layer: str
    shape: tuple[int, ...]
    bits: int
    weight_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "shape": list(self.shape), "bits": self.bits, "weight_bytes": self.weight_bytes}


def conv_bits(model: bytes) -> list[ConvBits]:
    """Every CONV_2D of the first subgraph with its filter's bits (8, 4, or 32 for float models)."""
    schema = _schema()
    m = schema.Model.GetRootAs(model, 0)
    sub = m.Subgraphs(0)
    bits_of = {INT4: 4, INT8: 8, 0: 32, 1: 16}
    rows = []
    for i in range(sub.OperatorsLength()):
        op = sub.Operators(i)
        oc = m.OperatorCodes(op.OpcodeIndex())
        if max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()) != CONV_2D:
            continue
        t = sub.Tensors(int(op.InputsAsNumpy()[1]))
        name = (t.Name() or b"").decode("utf-8", "replace")
        found = _LAYER.search(name)
        shape = tuple(int(d) for d in t.ShapeAsNumpy())
        bits = bits_of.get(t.Type(), 0)
        rows.append(ConvBits(found.group(1) if found else name, shape, bits, (int(np.prod(shape)) * bits + 7) // 8))
    return rows


def widen_int4(model: bytes) -> bytes:
    """The same model with every INT4 tensor stored as INT8 (same values and scales) and CONV_2D back at
    version 3, for runtimes (XNNPACK) that take int8 filters only. Drops anything after the flatbuffer
    (the metadata zip); the interpreter does not read it."""
    schema = _schema()
    m = schema.ModelT.InitFromPackedBuf(model, 0)
    widened = False
    for sub in m.subgraphs or []:
        for t in sub.tensors or []:
            if t.type != INT4:
                continue
            count = int(np.prod(t.shape)) if t.shape is not None else 0
            buf = m.buffers[t.buffer]
            data = np.asarray(buf.data if buf.data is not None else [], np.uint8)
            buf.data = unpack_int4(data, count).view(np.uint8)
            t.type = INT8
            widened = True
    if not widened:
        return model
    for oc in m.operatorCodes or []:
        if _code(oc) == CONV_2D and (oc.version or 1) == CONV_2D_INT4_VERSION:
            oc.version = CONV_2D_INT8_VERSION
    return _pack_model(m, 2 * len(model))


def compact_names(model: bytes) -> bytes:
    """The same model with short tensor names: ``<layer>/convolution`` and ``<layer>/bias`` for the
    convolutions' weights, the first op's name for the other tensors (the converter's fused names repeat
    the model's name and every op fused into the tensor: 17 kB of a 0.5 MB CIFAR network). The input and
    output tensors keep their names; nothing reads tensors by name but people."""
    schema = _schema()
    m = schema.ModelT.InitFromPackedBuf(model, 0)
    sub = m.subgraphs[0]
    keep = {int(i) for i in list(sub.inputs) + list(sub.outputs)}
    named: dict[int, str] = {}
    for op in sub.operators or []:
        if _code(m.operatorCodes[op.opcodeIndex]) != CONV_2D:
            continue
        ins = [int(v) for v in list(op.inputs)]
        found = _LAYER.search(_text(sub.tensors[ins[1]].name))
        if found:
            named[ins[1]] = f"{found.group(1)}/convolution"
            if len(ins) > 2 and ins[2] >= 0:
                named[ins[2]] = f"{found.group(1)}/bias"
    used: set[str] = set()
    for i, t in enumerate(sub.tensors or []):
        if i in keep:
            continue
        name = named.get(i) or _text(t.name).split(";")[0].split("/", 1)[-1] or f"t{i}"
        if name in used:
            name = f"{name}#{i}"
        used.add(name)
        t.name = name
    return _pack_model(m, len(model))


def _text(name: Any) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name or "")


@dataclass(frozen=True)
class Grid:
    """A layer's 4-bit weights: integer values (HWIO, -8..7) and one scale per output channel."""

    values: np.ndarray
    scales: np.ndarray


def write_int4(model: bytes, grids: Mapping[str, Grid]) -> bytes:
    """Store the CONV_2D filters of the layers in ``grids`` as packed INT4 with their 4-bit grid.

    Each chosen filter must already be (within int8 rounding) the grid's values times its scales,
    which is what the converter makes of weights prepared on that grid; anything else is refused,
    so a layer is never silently swapped for other weights. The int32 bias is rescaled to the new
    filter scale (bias scale = input scale x filter scale, per channel).
    """
    schema = _schema()
    m = schema.ModelT.InitFromPackedBuf(model, 0)
    sub = m.subgraphs[0]
    codes = m.operatorCodes
    int4_code: int | None = None
    done: set[str] = set()
    for op in sub.operators or []:
        if _code(codes[op.opcodeIndex]) != CONV_2D:
            continue
        x, w, b = (int(v) for v in list(op.inputs)[:3])
        filt = sub.tensors[w]
        found = _LAYER.search(filt.name.decode() if isinstance(filt.name, bytes) else str(filt.name))
        if found is None or found.group(1) not in grids:
            continue
        layer = found.group(1)
        grid = grids[layer]
        if filt.type != INT8:
            raise EdgesqzError(f"layer {layer}'s filter is not int8; cannot store it as 4-bit")
        values = np.asarray(grid.values).transpose(3, 0, 1, 2)  # HWIO -> OHWI
        if tuple(values.shape) != tuple(filt.shape):
            raise EdgesqzError(f"layer {layer}: 4-bit grid of shape {values.shape} for a filter of shape "
                               f"{tuple(filt.shape)}")
        scales = np.asarray(grid.scales, np.float64)
        q = filt.quantization
        old_scales = np.asarray(q.scale, np.float64)
        old = np.asarray(m.buffers[filt.buffer].data, np.uint8).view(np.int8).reshape(values.shape)
        wanted = values.astype(np.float64) * scales[:, None, None, None]
        had = old.astype(np.float64) * old_scales[:, None, None, None]
        if np.any(np.abs(wanted - had) > 0.51 * old_scales[:, None, None, None] + 1e-7):
            raise EdgesqzError(f"layer {layer}'s converted weights are not on its 4-bit grid")
        m.buffers[filt.buffer].data = pack_int4(values)
        filt.type = INT4
        q.scale = scales.astype(np.float32).tolist()
        q.zeroPoint = [0] * len(scales)
        q.quantizedDimension = 0
        if b >= 0:
            bias = sub.tensors[b]
            in_scale = float(np.asarray(sub.tensors[x].quantization.scale, np.float64)[0])
            raw = np.asarray(m.buffers[bias.buffer].data, np.uint8).view(np.int32).astype(np.float64)
            bias_scale_old = np.asarray(bias.quantization.scale, np.float64)
            new_scale = (np.float32(in_scale) * scales.astype(np.float32)).astype(np.float64)
            new = np.round(raw * bias_scale_old / new_scale)
            if np.any(np.abs(new) > 2**31 - 1):
                raise EdgesqzError(f"layer {layer}'s bias does not fit int32 at the 4-bit scale")
            m.buffers[bias.buffer].data = new.astype(np.int32).view(np.uint8)
            bias.quantization.scale = new_scale.astype(np.float32).tolist()
            bias.quantization.zeroPoint = [0] * len(scales)
        if int4_code is None:
            int4_code = len(codes)
            codes.append(schema.OperatorCodeT())
            codes[-1].builtinCode = CONV_2D
            codes[-1].deprecatedBuiltinCode = CONV_2D
            codes[-1].version = CONV_2D_INT4_VERSION
        op.opcodeIndex = int4_code
        done.add(layer)
    missing = sorted(set(grids) - done)
    if missing:
        raise EdgesqzError(f"no CONV_2D filter for layer(s) {', '.join(missing[:4])} in the converted model")
    return _pack_model(m, len(model))
