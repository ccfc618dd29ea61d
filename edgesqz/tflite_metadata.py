"""Standard TFLite metadata: make a ``.tflite`` file self-describing.

Writes what tflite-support / MediaPipe metadata readers expect: a ``TFLITE_METADATA`` entry in the
model's ``metadata`` list whose buffer holds a ``ModelMetadata`` flatbuffer (``metadata_schema.fbs``,
file identifier ``M001``), plus the associated files appended to the model as a zip archive. A
runtime that knows nothing about metadata still runs the model unchanged.

Reading needs only the standard library, ``flatbuffers`` and numpy (no TensorFlow, no LiteRT).
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np
from flatbuffers import number_types as fbn
from flatbuffers.table import Table

from edgesqz.errors import EdgesqzError

LABELS_FILE = "labels.txt"  # TENSOR_AXIS_LABELS associated file of output tensor 0
INFO_FILE = "edgesqz.json"  # model-level associated file (type DESCRIPTIONS), our JSON dict

METADATA_NAME = "TFLITE_METADATA"
MIN_PARSER_VERSION = "1.0.0"  # every field written here exists since metadata schema 1.0.0
_TFLITE_ID = b"TFL3"
_METADATA_ID = b"M001"

# Field slots (declaration order) in tflite schema.fbs and metadata_schema.fbs.
# A union field takes two slots: its type (ubyte) then its value.
_MODEL_SUBGRAPHS, _MODEL_BUFFERS, _MODEL_METADATA = 2, 4, 6  # tflite.Model
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2  # tflite.Buffer
_META_NAME, _META_BUFFER = 0, 1  # tflite.Metadata
# ModelMetadata: name, description, version, subgraph_metadata, author, license, associated_files,
# min_parser_version.  SubGraphMetadata: name, description, input_tensor_metadata,
# output_tensor_metadata, ...  TensorMetadata: name, description, dimension_names, content,
# process_units, stats, associated_files.  AssociatedFile: name, description, type, locale.
_MM_SUBGRAPHS, _MM_FILES = 3, 6
_SG_INPUTS, _SG_OUTPUTS = 2, 3
_TM_PROCESS_UNITS, _TM_FILES = 4, 6
_AF_NAME, _AF_TYPE = 0, 2
_FILE_DESCRIPTIONS, _FILE_TENSOR_AXIS_LABELS = 1, 2  # AssociatedFileType
_CONTENT_FEATURE, _CONTENT_IMAGE = 1, 2  # ContentProperties union
_UNIT_NORMALIZATION = 1  # ProcessUnitOptions union
_COLOR_RGB = 1  # ColorSpaceType


@dataclass
class ModelMetadata:
    """What :func:`read_metadata` found in a model; empty fields when there is no metadata."""

    name: str | None
    description: str | None
    version: str | None
    labels: list[str] | None  # from labels.txt in the zip
    info: dict  # parsed edgesqz.json ({} when absent)
    mean: list[float] | None  # input NormalizationOptions, if present
    std: list[float] | None
    has_tflite_metadata: bool  # a TFLITE_METADATA buffer was found in the flatbuffer
    associated_files: list[str]  # names in the zip tail


class _Corrupt(ValueError):
    """Internal: an offset or length points outside the buffer."""


# --------------------------------------------------------------------------- reading


class _Tbl:
    """Bounds-checked reads of one flatbuffer table through ``flatbuffers.table.Table``."""

    def __init__(self, buf: bytes, pos: int) -> None:
        _need(buf, pos, 4)
        self.buf = buf
        self.t = Table(buf, pos)

    @classmethod
    def root(cls, buf: bytes) -> _Tbl:
        _need(buf, 0, 8)
        return cls(buf, struct.unpack_from("<I", buf, 0)[0])

    def _off(self, slot: int) -> int:
        return self.t.Offset(4 + 2 * slot)

    def scalar(self, slot: int, flags: type, default: int = 0) -> int:
        o = self._off(slot)
        if not o:
            return default
        _need(self.buf, self.t.Pos + o, flags.bytewidth)
        return self.t.Get(flags, self.t.Pos + o)

    def table(self, slot: int) -> _Tbl | None:
        o = self._off(slot)
        return _Tbl(self.buf, self.t.Indirect(self.t.Pos + o)) if o else None

    def span(self, slot: int, elem_size: int) -> tuple[int, int] | None:
        """(start, length) of a vector field, checked to lie inside the buffer."""
        o = self._off(slot)
        if not o:
            return None
        start, n = self.t.Vector(o), self.t.VectorLen(o)
        _need(self.buf, start, n * elem_size)
        return start, n

    def string(self, slot: int) -> str | None:
        s = self.span(slot, 1)
        return None if s is None else self.buf[s[0] : s[0] + s[1]].decode("utf-8")

    def tables(self, slot: int) -> list[_Tbl]:
        s = self.span(slot, 4)
        return [] if s is None else [_Tbl(self.buf, self.t.Indirect(s[0] + 4 * i)) for i in range(s[1])]

    def floats(self, slot: int) -> list[float] | None:
        s = self.span(slot, 4)
        return None if s is None else np.frombuffer(self.buf, "<f4", s[1], s[0]).astype(float).tolist()


def _need(buf: bytes, pos: int, size: int) -> None:
    if pos < 0 or size < 0 or pos + size > len(buf):
        raise _Corrupt(f"offset {pos}+{size} is outside the {len(buf)}-byte buffer")


def _not_tflite(src: str, why: str) -> EdgesqzError:
    return EdgesqzError(f"{src} is not a valid .tflite model ({why}); re-export it or copy it again")


# Everything a hostile or truncated buffer can make flatbuffers/struct/zipfile/json raise.
_PARSE_ERRORS = (struct.error, TypeError, IndexError, ValueError, OverflowError, KeyError)
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, zlib.error, *_PARSE_ERRORS)


def _find_metadata_buffer(buf: bytes) -> bytes | None:
    """Validate the TFLite flatbuffer and return the TFLITE_METADATA buffer, if any."""
    model = _Tbl.root(buf)
    if not model.tables(_MODEL_SUBGRAPHS):
        raise _Corrupt("no subgraphs")
    buffers = model.tables(_MODEL_BUFFERS)
    spans = []
    for b in buffers:  # every buffer must lie inside the file: catches truncated models
        offset, size = b.scalar(_BUFFER_OFFSET, fbn.Uint64Flags), b.scalar(_BUFFER_SIZE, fbn.Uint64Flags)
        if offset > 1:  # data stored after the flatbuffer (models > 2 GB)
            _need(buf, offset, size)
            spans.append((offset, size))
        else:
            spans.append(b.span(_BUFFER_DATA, 1) or (0, 0))
    for entry in model.tables(_MODEL_METADATA):
        if entry.string(_META_NAME) == METADATA_NAME:
            start, size = spans[entry.scalar(_META_BUFFER, fbn.Uint32Flags)]
            return buf[start : start + size]
    return None


def _parse_model_metadata(mb: bytes) -> dict:
    """The few ModelMetadata fields we use; {} for a metadata flatbuffer of another schema version."""
    if len(mb) < 8 or mb[4:8] != _METADATA_ID:
        return {}
    root = _Tbl.root(mb)
    out: dict = {"name": root.string(0), "description": root.string(1), "version": root.string(2)}
    out["files"] = [f.string(_AF_NAME) for f in root.tables(_MM_FILES)]
    subgraphs = root.tables(_MM_SUBGRAPHS)
    inputs = subgraphs[0].tables(_SG_INPUTS) if subgraphs else []
    outputs = subgraphs[0].tables(_SG_OUTPUTS) if subgraphs else []
    for unit in inputs[0].tables(_TM_PROCESS_UNITS) if inputs else []:
        options = unit.table(1)
        if unit.scalar(0, fbn.Uint8Flags) == _UNIT_NORMALIZATION and options is not None:
            out["mean"], out["std"] = options.floats(0), options.floats(1)
            break
    for f in outputs[0].tables(_TM_FILES) if outputs else []:
        if f.scalar(_AF_TYPE, fbn.Int8Flags) == _FILE_TENSOR_AXIS_LABELS:
            out["labels_file"] = f.string(_AF_NAME)
            break
    return out


def _open_zip_tail(buf: bytes) -> zipfile.ZipFile | None:
    try:
        return zipfile.ZipFile(io.BytesIO(buf))
    except _ZIP_ERRORS:
        return None


# An associated file is inflated only up to this size: labels for 100,000 classes or a generous
# edgesqz.json fit, a zip bomb does not.
MAX_ASSOCIATED_BYTES = 8 << 20


def _read_member(zf: zipfile.ZipFile, name: str, src: str) -> bytes:
    """One associated file, never inflating more than :data:`MAX_ASSOCIATED_BYTES`."""
    info = zf.getinfo(name)
    if info.file_size > MAX_ASSOCIATED_BYTES:
        raise _not_tflite(src, f"its embedded {name} claims {info.file_size / 2**20:.0f} MiB (at most "
                               f"{MAX_ASSOCIATED_BYTES >> 20} MiB)")
    with zf.open(info) as f:  # reads stop at the declared size; a CRC mismatch raises BadZipFile
        data = f.read(MAX_ASSOCIATED_BYTES + 1)
    if len(data) > MAX_ASSOCIATED_BYTES:
        raise _not_tflite(src, f"its embedded {name} inflates past {MAX_ASSOCIATED_BYTES >> 20} MiB")
    return data


def _utf8(data: bytes, name: str, src: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_tflite(src, f"its embedded {name} is not UTF-8 text (byte 0x{data[e.start]:02x} at position "
                               f"{e.start})") from None


def _split_labels(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_metadata(model: bytes | str | os.PathLike, *, src: str | None = None) -> ModelMetadata:
    """Read what embed_metadata wrote; a model without metadata gives empty fields, never raises for that.

    Damaged metadata (a flatbuffer out of bounds, an associated file that is not UTF-8, larger than
    :data:`MAX_ASSOCIATED_BYTES` or not valid JSON, values of the wrong type in ``edgesqz.json``) raises
    :class:`EdgesqzError` naming ``src`` (default: the file name, or "the model data").
    """
    if isinstance(model, (str, os.PathLike)):
        src = src or os.fspath(model)
        try:
            with open(model, "rb") as f:
                buf = f.read()
        except OSError as e:
            raise EdgesqzError(f"cannot read model file {src}: {e.strerror or e}") from e
    else:
        src, buf = src or "the model data", bytes(model)
    if len(buf) < 8 or buf[4:8] != _TFLITE_ID:
        raise _not_tflite(src, "no TFL3 file identifier")
    try:
        meta_buf = _find_metadata_buffer(buf)
        fields = _parse_model_metadata(meta_buf) if meta_buf is not None else {}
    except _PARSE_ERRORS as e:
        raise _not_tflite(src, "corrupt or truncated flatbuffer") from e

    zf = _open_zip_tail(buf)
    names = zf.namelist() if zf is not None else []
    labels_file = fields.get("labels_file") or (LABELS_FILE if LABELS_FILE in names else None)
    for needed in (labels_file, *(f for f in fields.get("files", []) if f == INFO_FILE)):
        if needed is not None and needed not in names:
            raise _not_tflite(src, f"its metadata lists {needed} but the file is not packed in it; truncated?")
    try:
        labels_data = _read_member(zf, labels_file, src) if zf is not None and labels_file else None
        info_data = _read_member(zf, INFO_FILE, src) if zf is not None and INFO_FILE in names else None
    except _ZIP_ERRORS as e:
        raise _not_tflite(src, "corrupt associated files in its zip tail") from e
    labels = _split_labels(_utf8(labels_data, labels_file or LABELS_FILE, src)) if labels_data is not None else None
    info: Any = {}
    if info_data is not None:
        try:
            info = json.loads(_utf8(info_data, INFO_FILE, src))
        except (ValueError, RecursionError) as e:
            raise _not_tflite(src, f"its embedded {INFO_FILE} is not valid JSON") from e
    if not isinstance(info, dict):
        raise _not_tflite(src, f"{INFO_FILE} is not a JSON object")
    check_info(info, src)
    mean, std = fields.get("mean"), fields.get("std")
    for what, values in (("mean", mean), ("std", std)):
        if values is not None and (len(values) not in (1, 3) or not all(math.isfinite(v) for v in values)
                                   or (what == "std" and 0.0 in values)):
            raise _bad_value(src, f"TFLite metadata NormalizationOptions.{what}", values,
                             "1 or 3 finite numbers" + (", none 0" if what == "std" else ""))
    return ModelMetadata(
        name=fields.get("name"),
        description=fields.get("description"),
        version=fields.get("version"),
        labels=labels,
        info=info,
        mean=mean,
        std=std,
        has_tflite_metadata=meta_buf is not None,
        associated_files=names,
    )


# --------------------------------------------------------------------------- edgesqz.json values

_Spec = Any  # a type, a tuple of types, a dict of specs (a JSON object), or a list [spec] (a JSON list)
_NUMBER = (int, float)
# What edgesqz reads from edgesqz.json (docs/model-format.md); other keys are kept and not checked.
INFO_SPEC: dict[str, _Spec] = {
    "schema": str, "task": str, "architecture": str, "format": str, "created": str, "edgesqz_version": str,
    "input": {"size": int, "layout": str, "color_order": str, "range": [_NUMBER], "dtype": str,
              "normalization": str},
    "preprocessing": {"size": int, "crop_fraction": _NUMBER, "resize": str, "interpolation": str,
                      "color_order": str, "input_range": [_NUMBER], "mean": [_NUMBER], "std": [_NUMBER]},
    "output": {"kind": str, "classes": int},
    "labels": {"count": int, "ids": [str]},
    "source_weights": {"source": str, "file": str, "sha256": str, "kind": str},
    "calibration": {"source": str, "kind": str, "count": int, "skipped": int, "seed": int, "method": str},
    "accuracy": {"images": int, "reference": {"top1": _NUMBER, "top5": _NUMBER},
                 "model": {"top1": _NUMBER, "top5": _NUMBER}, "top1_drop": _NUMBER, "top1_agreement": _NUMBER,
                 "top1_agreement_ci95": [_NUMBER], "top1_drop_ci95": [_NUMBER], "tied_top_outputs": _NUMBER,
                 "excluded_calibration_images": int, "skipped_unreadable": int},
}
# Ranges of the values the device acts on.
_RANGES: dict[str, tuple[str, Any]] = {
    "input.size": ("a whole number from 1 to 16384", lambda v: 1 <= v <= 16384),
    "preprocessing.size": ("a whole number from 1 to 16384", lambda v: 1 <= v <= 16384),
    "preprocessing.crop_fraction": ("a number in (0, 1]", lambda v: 0 < v <= 1),
    "preprocessing.color_order": ("RGB or BGR", lambda v: v.upper() in ("RGB", "BGR")),
    "input.color_order": ("RGB or BGR", lambda v: v.upper() in ("RGB", "BGR")),
    "output.kind": ("logits, probabilities or class_map", lambda v: v in ("logits", "probabilities", "class_map")),
    "output.classes": ("a whole number >= 2", lambda v: v >= 2),
}
_TYPE_NAMES = {str: "a string", int: "a whole number", _NUMBER: "a number", bool: "true or false"}


def _bad_value(src: str, key: str, value: Any, expected: str) -> EdgesqzError:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return EdgesqzError(f"{src}: its embedded metadata has {key} = {shown}, expected {expected}; the metadata in "
                        "the model file is damaged or was not written by edgesqz: convert the model again")


def _matches(value: Any, kind: Any) -> bool:
    if isinstance(value, bool):  # JSON true/false is not a number
        return kind is bool
    if kind is _NUMBER:
        return isinstance(value, _NUMBER) and math.isfinite(value)
    return isinstance(value, kind)


def check_info(info: dict[str, Any], src: str, spec: dict[str, _Spec] | None = None, prefix: str = "") -> None:
    """Check the types (and, for what the device acts on, the ranges) of ``edgesqz.json``'s values.

    ``null`` stands for "absent" everywhere; keys the spec does not know are not checked.
    """
    for key, kind in (INFO_SPEC if spec is None else spec).items():
        value = info.get(key)
        path = f"{prefix}{key}"
        if value is None:
            continue
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise _bad_value(src, path, value, "a JSON object")
            check_info(value, src, kind, f"{path}.")
            continue
        if isinstance(kind, list):
            if not isinstance(value, list) or not all(_matches(v, kind[0]) for v in value):
                raise _bad_value(src, path, value, f"a list of {_TYPE_NAMES[kind[0]].split(' ', 1)[1]}s")
            continue
        if not _matches(value, kind):
            raise _bad_value(src, path, value, _TYPE_NAMES[kind])
        if path in _RANGES and not _RANGES[path][1](value):
            raise _bad_value(src, path, value, _RANGES[path][0])


# --------------------------------------------------------------------------- writing


def _build_model_metadata(
    *,
    name: str,
    description: str,
    version: str,
    author: str,
    license: str,
    with_labels: bool,
    mean: list[float] | None,
    std: list[float] | None,
    input_min: float | None,
    input_max: float | None,
) -> bytes:
    """Serialise a ModelMetadata flatbuffer (metadata_schema.fbs, identifier M001)."""
    b = flatbuffers.Builder(1024)
    add = {"o": b.PrependUOffsetTRelativeSlot, "b": b.PrependInt8Slot, "B": b.PrependUint8Slot}

    def table(*fields: tuple[int, str, int | None]) -> int:
        # Children are created (as call arguments) before StartObject: flatbuffers forbids nesting.
        b.StartObject(max((slot for slot, _, _ in fields), default=-1) + 1)
        for slot, kind, value in fields:
            if value is not None:
                add[kind](slot, value, 0)
        return b.EndObject()

    def vec(offsets: list[int]) -> int:
        b.StartVector(4, len(offsets), 4)
        for o in reversed(offsets):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    def string(s: str | None) -> int | None:
        return b.CreateString(s) if s else None

    def floats(values: list[float] | None) -> int | None:
        return None if values is None else b.CreateNumpyVector(np.asarray(values, dtype="<f4"))

    def assoc(fname: str, desc: str, ftype: int) -> int:
        return table((0, "o", string(fname)), (1, "o", string(desc)), (2, "b", ftype))

    units = None
    if mean is not None:
        norm = table((0, "o", floats(mean)), (1, "o", floats(std)))
        units = vec([table((0, "B", _UNIT_NORMALIZATION), (1, "o", norm))])
    stats = None
    if input_min is not None or input_max is not None:
        stats = table(
            (0, "o", floats(None if input_max is None else [input_max])),
            (1, "o", floats(None if input_min is None else [input_min])),
        )
    image = table((0, "b", _COLOR_RGB))
    input_meta = table(
        (0, "o", string("image")),
        (1, "o", string("RGB input image; normalise as (pixel - mean) / std when mean/std are given.")),
        (3, "o", table((0, "B", _CONTENT_IMAGE), (1, "o", image))),
        (4, "o", units),
        (5, "o", stats),
    )
    label_files = None
    if with_labels:
        label_files = vec([assoc(LABELS_FILE, "Class names, one per line.", _FILE_TENSOR_AXIS_LABELS)])
    output_meta = table(
        (0, "o", string("scores")),
        (1, "o", string("Class scores, one per label.")),
        (3, "o", table((0, "B", _CONTENT_FEATURE), (1, "o", table()))),
        (6, "o", label_files),
    )
    subgraph = table((_SG_INPUTS, "o", vec([input_meta])), (_SG_OUTPUTS, "o", vec([output_meta])))
    model_files = vec([assoc(INFO_FILE, "edgesqz model information (JSON).", _FILE_DESCRIPTIONS)])
    root = table(
        (0, "o", string(name)),
        (1, "o", string(description)),
        (2, "o", string(version)),
        (_MM_SUBGRAPHS, "o", vec([subgraph])),
        (4, "o", string(author)),
        (5, "o", string(license)),
        (_MM_FILES, "o", model_files),
        (7, "o", string(MIN_PARSER_VERSION)),
    )
    b.Finish(root, file_identifier=_METADATA_ID)
    return bytes(b.Output())


class _AlignedBuilder(flatbuffers.Builder):
    """Keeps uint8 vectors (tensor data) 16-byte aligned, as the TFLite converter does (force_align)."""

    def CreateNumpyVector(self, x: np.ndarray) -> int:
        if x.dtype == np.uint8:
            self.Prep(16, x.size)
        return super().CreateNumpyVector(x)


def _set_metadata_buffer(model: bytes, metadata: bytes) -> bytes:
    """Rebuild the model flatbuffer with one TFLITE_METADATA entry; drops any tail after it."""
    try:
        from ai_edge_litert import schema_py_generated as fb  # host-side only
    except ImportError as e:
        raise EdgesqzError("embedding metadata needs ai-edge-litert: pip install ai-edge-litert") from e

    try:
        m = fb.ModelT.InitFromPackedBuf(model, 0)
    except _PARSE_ERRORS as e:
        raise _not_tflite("the model data", "corrupt flatbuffer") from e
    if any(buf.offset > 1 for buf in m.buffers or []):
        raise EdgesqzError("this model keeps its weights outside the flatbuffer (> 2 GB); cannot embed metadata")
    sg = m.subgraphs[0]
    if len(sg.inputs if sg.inputs is not None else []) != 1 or len(sg.outputs if sg.outputs is not None else []) != 1:
        raise EdgesqzError("metadata needs a model with exactly one input and one output tensor")
    m.buffers = m.buffers or []
    data = np.frombuffer(metadata, dtype=np.uint8)
    entries = [e for e in m.metadata or [] if _as_str(e.name) == METADATA_NAME]
    if entries:  # replace in place, like the tflite-support populator; drop duplicates
        m.buffers[entries[0].buffer] = fb.BufferT(data=data)
        m.metadata = [e for e in m.metadata if e is entries[0] or _as_str(e.name) != METADATA_NAME]
    else:
        m.buffers.append(fb.BufferT(data=data))
        m.metadata = [*(m.metadata or []), fb.MetadataT(name=METADATA_NAME, buffer=len(m.buffers) - 1)]
    b = _AlignedBuilder(len(model) + len(metadata) + 4096)
    b.Finish(m.Pack(b), file_identifier=_TFLITE_ID)
    return bytes(b.Output())


def _as_str(s: str | bytes | None) -> str | None:
    return s.decode("utf-8") if isinstance(s, bytes) else s


def embed_metadata(
    model: bytes,
    *,
    labels: list[str] | None,
    info: dict,
    name: str,
    description: str,
    version: str,
    author: str = "edgesqz",
    license: str = "",
    mean: list[float] | None = None,
    std: list[float] | None = None,
    input_min: float | None = None,
    input_max: float | None = None,
) -> bytes:
    """Return new model bytes with TFLITE_METADATA + zip of labels.txt and edgesqz.json.

    Existing metadata entries are kept, an old TFLITE_METADATA entry and zip tail are replaced.
    """
    model = bytes(model)
    if len(model) < 8 or model[4:8] != _TFLITE_ID:
        raise _not_tflite("the model data", "no TFL3 file identifier")
    try:
        _find_metadata_buffer(model)
    except _PARSE_ERRORS as e:
        raise _not_tflite("the model data", "corrupt or truncated flatbuffer") from e
    if (mean is None) != (std is None):
        raise EdgesqzError("give both mean and std for input normalisation, or neither")
    if labels is not None:
        bad = [i for i, label in enumerate(labels) if "\n" in label or "\r" in label]
        if bad:
            raise EdgesqzError(f"label {bad[0]} contains a line break; labels.txt holds one label per line")
    metadata = _build_model_metadata(
        name=name,
        description=description,
        version=version,
        author=author,
        license=license,
        with_labels=labels is not None,
        mean=mean,
        std=std,
        input_min=input_min,
        input_max=input_max,
    )
    out = io.BytesIO()
    out.write(_set_metadata_buffer(model, metadata))
    # Zip written after the flatbuffer with absolute offsets, as the standard populator's
    # ZipFile(model, "a") does. Stored (uncompressed) with a fixed date: deterministic bytes.
    files = {INFO_FILE: json.dumps(info, sort_keys=True, separators=(",", ":")).encode("utf-8")}
    if labels is not None:
        files = {LABELS_FILE: "".join(f"{label}\n" for label in labels).encode("utf-8"), **files}
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for fname, payload in files.items():
            zf.writestr(zipfile.ZipInfo(fname, date_time=(1980, 1, 1, 0, 0, 0)), payload)
    return out.getvalue()
