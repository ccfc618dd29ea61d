"""Image classification with a TFLite model: frame in, ``[(label, score), ...]`` out.

Small functions between the interpreter and the application, in the spirit of pycoral's
``adapters.classify``:

- :func:`input_spec` reads how frames become model input — from the model's embedded metadata
  (``edgesqz.json`` / standard TFLite metadata) or, for a model without metadata, from its tensor
  details plus caller overrides;
- :meth:`Classifier.prepare` turns a frame into the input tensor (thread-safe: it never touches
  the interpreter, so a reader thread can run it while the interpreter works on the last frame);
- :meth:`Classifier.infer` runs the interpreter and returns class scores plus timings;
- :meth:`Classifier.top` / :meth:`Classifier.classify` give the top-k predictions.

The frame preprocessing is :func:`edgesqz.imaging.preprocess`, the same function the int8
calibration used.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesqz.device.runtime import (
    Backend,
    Coverage,
    check_model_file,
    delegate_coverage,
    make_interpreter,
    native_stderr,
)
from edgesqz.errors import EdgesqzError
from edgesqz.imaging import preprocess
from edgesqz.labels import load_labels as _load_labels
from edgesqz.schema import top_k as schema_top_k
from edgesqz.tflite_metadata import ModelMetadata, read_metadata

log = logging.getLogger("edgesqz.device")

OUTPUT_KINDS = ("logits", "probabilities", "class_map")
COLOR_ORDERS = ("RGB", "BGR")
DEFAULT_CROP_FRACTION = 224 / 256
_INPUT_DTYPES = (np.uint8, np.int8, np.float32)
_OUTPUT_DTYPES = (np.uint8, np.int8, np.float32)


def default_threads() -> int:
    """One interpreter thread per CPU core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- input


@dataclass(frozen=True)
class InputSpec:
    """How a frame becomes the model's input tensor."""

    size: int  # square input side, pixels
    dtype: np.dtype
    scale: float  # input quantisation (0.0 for float inputs)
    zero_point: int
    crop_fraction: float = DEFAULT_CROP_FRACTION
    color_order: str = "RGB"
    mean: tuple[float, ...] = (0.0,)  # real input = (pixel - mean) / std, per channel or one value
    std: tuple[float, ...] = (1.0,)

    @property
    def mode(self) -> str:
        """The fastest exact conversion: ``xor`` (int8 = pixel - 128), ``raw`` (uint8 pixels),
        ``float_raw`` (float pixels), ``float`` (normalised floats) or ``affine`` (general quantisation)."""
        a, b = self._affine()
        if self.dtype == np.float32:
            return "float_raw" if np.all(a == 1.0) and np.all(b == 0.0) else "float"
        if np.all(a == 1.0) and np.all(b == (-128 if self.dtype == np.int8 else 0)):
            return "xor" if self.dtype == np.int8 else "raw"
        return "affine"

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``tensor = pixel * a + b`` (before rounding), per channel."""
        mean = np.asarray(self.mean, dtype=np.float64)
        std = np.asarray(self.std, dtype=np.float64)
        scale = 1.0 if self.dtype == np.float32 else float(self.scale)
        zp = 0.0 if self.dtype == np.float32 else float(self.zero_point)
        a = 1.0 / (std * scale)
        return a, zp - mean * a

    def to_tensor(self, rgb: np.ndarray) -> np.ndarray:
        """``[1, size, size, 3]`` model input from ``size`` x ``size`` RGB uint8 pixels."""
        pixels = rgb[..., ::-1] if self.color_order == "BGR" else rgb
        mode = self.mode
        if mode == "xor":
            x = (pixels ^ 0x80).view(np.int8)  # exactly pixel - 128
        elif mode == "raw":
            x = pixels
        elif mode == "float_raw":
            x = pixels.astype(np.float32)
        else:
            a, b = self._affine()
            real = pixels.astype(np.float32) * a.astype(np.float32) + b.astype(np.float32)
            if mode == "float":
                x = real
            else:
                info = np.iinfo(self.dtype)
                x = np.clip(np.rint(real), info.min, info.max).astype(self.dtype)
        return np.ascontiguousarray(x[np.newaxis])

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "dtype": np.dtype(self.dtype).name, "scale": self.scale,
                "zero_point": self.zero_point, "crop_fraction": self.crop_fraction,
                "color_order": self.color_order, "mean": list(self.mean), "std": list(self.std), "mode": self.mode}


def _not_classifier(src: str, why: str) -> EdgesqzError:
    return EdgesqzError(f"{src} is not an image classifier: {why}")


def _shape(detail: dict[str, Any]) -> list[int]:
    return [int(d) for d in detail["shape"]]


def check_classifier_io(src: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> int:
    """Validate one NHWC RGB image input and one ``[1, C]`` / ``[1, H, W, C]`` output; return C."""
    if len(inputs) != 1:
        raise _not_classifier(src, f"it has {len(inputs)} inputs (expected one [1, H, W, 3] image)")
    shape = _shape(inputs[0])
    if len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
        raise _not_classifier(src, f"its input has shape {shape} (expected [1, H, W, 3], NHWC RGB)")
    if shape[1] != shape[2]:
        raise EdgesqzError(f"{src} has a {shape[1]}x{shape[2]} input; only square inputs are supported")
    if inputs[0]["dtype"] not in _INPUT_DTYPES:
        raise _not_classifier(src, f"its input type is {np.dtype(inputs[0]['dtype']).name} "
                                   "(expected uint8, int8 or float32)")
    if len(outputs) != 1:
        raise _not_classifier(src, f"it has {len(outputs)} outputs (expected one [1, C] score vector)")
    oshape = _shape(outputs[0])
    if not ((len(oshape) == 2 or len(oshape) == 4) and oshape[0] == 1 and oshape[-1] >= 2):
        raise _not_classifier(src, f"its output has shape {oshape} "
                                   "(expected [1, C] scores or a [1, H, W, C] class map)")
    if outputs[0]["dtype"] not in _OUTPUT_DTYPES:
        raise _not_classifier(src, f"its output type is {np.dtype(outputs[0]['dtype']).name} "
                                   "(expected float32, int8 or uint8)")
    return oshape[-1]


def _channels(values: Any, what: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    if len(vals) not in (1, 3):
        raise EdgesqzError(f"{what} needs 1 or 3 values, got {len(vals)}")
    if what == "std" and any(v == 0 for v in vals):
        raise EdgesqzError("std must not be 0")
    return vals


def input_spec(
    detail: dict[str, Any],
    meta: ModelMetadata | None = None,
    *,
    crop_fraction: float | None = None,
    color_order: str | None = None,
    mean: Any = None,
    std: Any = None,
    src: str = "the model",
) -> InputSpec:
    """The input spec from the input tensor's details, the model's metadata and overrides (which win)."""
    info = meta.info if meta is not None else {}
    pre = info.get("preprocessing") or {}
    size = _shape(detail)[1]
    if "size" in pre and int(pre["size"]) != size:
        raise EdgesqzError(f"{src}: its metadata says input size {pre['size']} but the input tensor is {size}x{size}")
    q_scale, q_zp = detail.get("quantization", (0.0, 0))
    if crop_fraction is None:
        crop_fraction = float(pre.get("crop_fraction", DEFAULT_CROP_FRACTION))
    if not 0.0 < crop_fraction <= 1.0:
        raise EdgesqzError(f"crop fraction must be in (0, 1], got {crop_fraction}")
    order = (color_order or pre.get("color_order") or (info.get("input") or {}).get("color_order") or "RGB").upper()
    if order not in COLOR_ORDERS:
        raise EdgesqzError(f"unknown colour order {order!r}; use RGB or BGR")
    # Normalisation: standard TFLite metadata's NormalizationOptions ((x - mean) / std); edgesqz
    # models keep it inside the graph and store mean 0 / std 1.
    if mean is None:
        mean = meta.mean if meta is not None and meta.mean else [0.0]
    if std is None:
        std = meta.std if meta is not None and meta.std else [1.0]
    dtype = np.dtype(detail["dtype"])
    if dtype != np.float32 and not q_scale:
        raise EdgesqzError(f"{src}: its {dtype.name} input has no quantisation parameters")
    return InputSpec(size=size, dtype=dtype, scale=float(q_scale), zero_point=int(q_zp),
                     crop_fraction=float(crop_fraction), color_order=order,
                     mean=_channels(mean, "mean"), std=_channels(std, "std"))


# --------------------------------------------------------------------------- output


def dequantize(raw: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Real values of an output tensor (float32)."""
    if raw.dtype == np.float32:
        return raw
    scale, zp = detail.get("quantization", (0.0, 0))
    if not scale:
        return raw.astype(np.float32)
    return (raw.astype(np.float32) - np.float32(zp)) * np.float32(scale)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32) - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


def scores_from_output(real: np.ndarray, kind: str) -> np.ndarray:
    """Class probabilities ``[C]`` from the dequantised output of the given kind."""
    if kind == "class_map":
        real = real.reshape(real.shape[0], -1, real.shape[-1]).mean(axis=1)  # [1, H, W, C] -> logits [1, C]
        return softmax(real.reshape(-1))
    if kind == "logits":
        return softmax(real.reshape(-1))
    return real.reshape(-1).astype(np.float32, copy=False)


def detect_output_kind(interpreter: Any, detail: dict[str, Any]) -> str:
    """For a model without metadata: class_map for 4-D outputs, probabilities after SOFTMAX (also through
    a final QUANTIZE/DEQUANTIZE, e.g. uint8 probabilities), else logits."""
    if len(detail["shape"]) == 4:
        return "class_map"
    tensor = int(detail["index"])
    try:
        ops = interpreter._get_ops_details()
    except (AttributeError, RuntimeError, ValueError):
        return "logits"
    for _ in range(3):
        producer = next((op for op in ops if op["op_name"] != "DELEGATE"
                         and tensor in [int(t) for t in op["outputs"]]), None)
        if producer is None:
            break
        if producer["op_name"] == "SOFTMAX":
            return "probabilities"
        if producer["op_name"] not in ("QUANTIZE", "DEQUANTIZE"):
            break
        tensor = int(producer["inputs"][0])
    return "logits"


# --------------------------------------------------------------------------- labels


def load_labels(path: str | os.PathLike[str]) -> list[str]:
    """Label names from a labels file, in any form :func:`edgesqz.labels.load_labels` reads."""
    return list(_load_labels(path).names)


# --------------------------------------------------------------------------- classifier


@dataclass
class Scores:
    """Class probabilities for one frame and where the time went (milliseconds)."""

    scores: np.ndarray  # float32 [C], probabilities
    timings: dict[str, float] = field(default_factory=dict)  # preprocess, inference, postprocess


class Classifier:
    """An image classifier around one TFLite interpreter.

    ``Classifier("model.tflite").classify(frame)`` returns ``[(label, score), ...]`` (best first).
    ``frame`` is an OpenCV BGR image (``bgr=True``, the default) or RGB (``bgr=False``), any size:
    it is centre-cropped and resized as the model's metadata says.

    Models without metadata work from their tensor details; pass ``labels`` (a list or a labels
    file), and ``crop_fraction`` / ``color_order`` / ``mean`` / ``std`` / ``output_kind`` when the
    defaults (0.875, RGB, raw pixels, logits or class map) do not fit. Explicit arguments override
    the metadata.

    Not thread-safe, except :meth:`prepare`, which never touches the interpreter.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        delegate: str | None = None,
        top_k: int = 5,
        threshold: float = 0.0,
        labels: list[str] | str | os.PathLike[str] | None = None,
        crop_fraction: float | None = None,
        color_order: str | None = None,
        mean: Any = None,
        std: Any = None,
        output_kind: str | None = None,
        backend: str | None = None,
        xnnpack: bool = True,
        warmup: bool = True,
    ) -> None:
        self.model_path = Path(model_path)
        src = str(model_path)
        if top_k < 1:
            raise EdgesqzError(f"top-k must be >= 1, got {top_k}")
        if not 0.0 <= threshold <= 1.0:
            raise EdgesqzError(f"threshold must be between 0 and 1, got {threshold}")
        if output_kind is not None and output_kind not in OUTPUT_KINDS:
            raise EdgesqzError(f"unknown output kind {output_kind!r}; use one of {', '.join(OUTPUT_KINDS)}")
        self.top_k_default = top_k
        self.threshold = threshold
        data = check_model_file(model_path)  # also validates the flatbuffer before native code sees it
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.metadata = read_metadata(data, src=f"model {src}")
        info = self.metadata.info
        task = info.get("task")
        if task not in (None, "image_classification"):
            raise _not_classifier(src, f"its metadata says task {task!r}")
        self.threads = default_threads() if threads is None else threads
        self.delegate = delegate
        self._make = functools.partial(make_interpreter, data, threads=self.threads, delegate=delegate, backend=backend,
                                       xnnpack=xnnpack, src=f"model {src}")
        self._batched: collections.OrderedDict[int, Any] = collections.OrderedDict()
        # 1: the zones of a frame in one batched invocation; measured no faster end to end than N invocations under
        # XNNPACK on 2 cores (benchmarks/zones.py), so N invocations is the default
        self.batching = os.environ.get("EDGESQZ_ZONE_BATCH", "0") == "1"
        with native_stderr() as native:  # LiteRT's "INFO: Created ... XNNPACK delegate" and error echoes
            self.interpreter, self.backend = self._make()
        for line in native:
            if not line.startswith("INFO:"):
                log.warning("%s", line)
        self._input = self.interpreter.get_input_details()
        self._output = self.interpreter.get_output_details()
        self.num_classes = check_classifier_io(src, self._input, self._output)
        self._input, self._output = self._input[0], self._output[0]
        self.spec = input_spec(self._input, self.metadata, crop_fraction=crop_fraction, color_order=color_order,
                               mean=mean, std=std, src=src)
        meta_kind = (info.get("output") or {}).get("kind")
        if meta_kind is not None and meta_kind not in OUTPUT_KINDS:
            raise EdgesqzError(f"{src}: unknown output kind {meta_kind!r} in its metadata")
        self.output_kind = output_kind or meta_kind or detect_output_kind(self.interpreter, self._output)
        if (self.output_kind == "class_map") != (len(self._output["shape"]) == 4):
            raise EdgesqzError(f"{src}: output kind {self.output_kind} does not fit its output of shape "
                               f"{_shape(self._output)} (class_map is [1, H, W, C], logits and probabilities [1, C])")
        meta_classes = (info.get("output") or {}).get("classes")
        if meta_classes is not None and int(meta_classes) != self.num_classes:
            raise EdgesqzError(f"{src}: its metadata says {meta_classes} classes but the output has "
                               f"{self.num_classes}")
        self.labels = self._resolve_labels(labels, src)
        self.coverage: Coverage = delegate_coverage(self.interpreter)
        if warmup:  # the first invoke prepares XNNPACK's packed weights: keep it out of frame latencies
            self.infer(np.zeros(_shape(self._input), dtype=self.spec.dtype))

    def _resolve_labels(self, labels: Any, src: str) -> list[str] | None:
        if labels is None:
            found, origin = self.metadata.labels, f"{src}'s embedded labels.txt"
        elif isinstance(labels, (str, os.PathLike)):
            found, origin = load_labels(labels), f"labels file {labels}"
        else:
            found, origin = [str(x) for x in labels], "the labels given"
        if found is not None and len(found) != self.num_classes:
            raise EdgesqzError(f"{origin} has {len(found)} labels but the model outputs {self.num_classes} classes; "
                               "use the labels the model was converted with")
        return found

    # -- facts

    @property
    def input_size(self) -> int:
        return self.spec.size

    @property
    def name(self) -> str:
        info = self.metadata.info
        parts = [p for p in (info.get("architecture"), info.get("format")) if p]
        return " ".join(parts) if parts else (self.metadata.name or self.model_path.stem)

    @property
    def identity(self) -> dict[str, Any]:
        """Which model this is, in every result: ``{"name", "sha256" (12 hex digits), "version"}``."""
        info = self.metadata.info or {}
        version = self.version or info.get("model_version") or info.get("created")
        return {"name": self.model_path.name, "sha256": self.sha256[:12], "version": version}

    version: str | None = None  # set by whoever knows better (a fleet deployment's version)

    def describe_runtime(self) -> str:
        """One line: backend, threads, delegate coverage."""
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        cov = self.coverage.describe("Edge TPU" if self.delegate else "XNNPACK")
        return f"{self.backend.name} {self.backend.version}, {threads}; {cov}"

    def describe_model(self) -> str:
        labels = f"{len(self.labels)} labels" if self.labels else "no labels (class indices)"
        meta = "metadata" if self.metadata.info or self.metadata.has_tflite_metadata else "no metadata"
        return (f"{self.model_path} ({self.name}; {self.spec.size}x{self.spec.size} "
                f"{np.dtype(self.spec.dtype).name} input, {self.output_kind} output, {labels}, {meta})")

    def runtime_info(self) -> dict[str, Any]:
        """Machine-readable facts for summaries."""
        backend: Backend = self.backend
        return {"model": str(self.model_path), "backend": backend.name, "backend_version": backend.version,
                "threads": self.threads, "delegate": self.delegate, "coverage": self.coverage.to_dict(),
                "output_kind": self.output_kind, "classes": self.num_classes, "model_sha256": self.sha256}

    # -- the steps

    def prepare(self, frame: np.ndarray, *, bgr: bool = True) -> np.ndarray:
        """The model input for one frame (crop, resize, colour order, quantisation). Thread-safe."""
        rgb = preprocess(frame, self.spec.size, self.spec.crop_fraction, bgr=bgr)
        return self.spec.to_tensor(rgb)

    def infer(self, tensor: np.ndarray) -> Scores:
        """Run the model on a prepared input; probabilities plus inference/postprocess times in ms."""
        t0 = time.perf_counter()
        self.interpreter.set_tensor(self._input["index"], tensor)
        self.interpreter.invoke()
        raw = self.interpreter.get_tensor(self._output["index"])
        t1 = time.perf_counter()
        scores = scores_from_output(dequantize(raw, self._output), self.output_kind)
        if not np.isfinite(scores).all():
            raise EdgesqzError(f"model {self.model_path} computes NaN or infinite scores (its weights are NaN or "
                               "infinite, or overflow): convert it again from good weights")
        t2 = time.perf_counter()
        return Scores(scores, {"inference": (t1 - t0) * 1e3, "postprocess": (t2 - t1) * 1e3})

    def infer_many(self, tensors: list[np.ndarray]) -> list[Scores]:
        """Run the model on several prepared inputs (the zones of a frame).

        N invocations of batch 1 by default: end to end, they were as fast or faster than one batched
        invocation under XNNPACK (benchmarks/zones.py: batched/N = 0.94-0.99 for 2-8 zones on 2 cores).
        ``EDGESQZ_ZONE_BATCH=1`` batches them instead (an interpreter whose input is resized to N, made
        on first use and kept for the few most recent N) — measure it on your device. Never with a
        delegate (the Edge TPU compiles batch 1).
        """
        if len(tensors) <= 1 or self.delegate or not self.batching:
            return [self.infer(t) for t in tensors]
        n = len(tensors)
        interp = self._batch_interpreter(n)
        if interp is None:
            return [self.infer(t) for t in tensors]
        detail_in, detail_out = interp.get_input_details()[0], interp.get_output_details()[0]
        t0 = time.perf_counter()
        interp.set_tensor(detail_in["index"], np.concatenate(tensors, axis=0))
        interp.invoke()
        raw = interp.get_tensor(detail_out["index"])
        t1 = time.perf_counter()
        out = []
        for row in raw:
            scores = scores_from_output(dequantize(row[None], detail_out), self.output_kind)
            if not np.isfinite(scores).all():
                raise EdgesqzError(f"model {self.model_path} computes NaN or infinite scores: convert it again "
                                   "from good weights")
            out.append(scores)
        t2 = time.perf_counter()
        share = {"inference": (t1 - t0) * 1e3 / n, "postprocess": (t2 - t1) * 1e3 / n}
        return [Scores(scores, dict(share)) for scores in out]

    BATCH_CACHE = 3

    def _batch_interpreter(self, n: int) -> Any:
        if n in self._batched:
            self._batched.move_to_end(n)
            return self._batched[n]
        try:
            with native_stderr():
                interp, _ = self._make()
                detail = interp.get_input_details()[0]
                interp.resize_tensor_input(detail["index"], [n, *list(detail["shape"][1:])])
                interp.allocate_tensors()
                if int(interp.get_output_details()[0]["shape"][0]) != n:
                    raise ValueError("the output's batch did not follow the input's")
                interp.set_tensor(detail["index"], np.zeros([n, *list(detail["shape"][1:])], dtype=detail["dtype"]))
                interp.invoke()  # XNNPACK packs the weights on the first invoke: not in a frame's latency
        except (EdgesqzError, ValueError, RuntimeError) as exc:
            log.warning("warning: this model does not take a batch of %d (%s); classifying zones one by one", n, exc)
            self.batching = False
            return None
        self._batched[n] = interp
        while len(self._batched) > self.BATCH_CACHE:
            self._batched.popitem(last=False)
        return interp

    def scores(self, frame: np.ndarray, *, bgr: bool = True) -> Scores:
        """Probabilities for one frame, with preprocess/inference/postprocess times in ms."""
        t0 = time.perf_counter()
        tensor = self.prepare(frame, bgr=bgr)
        prep_ms = (time.perf_counter() - t0) * 1e3
        out = self.infer(tensor)
        out.timings = {"preprocess": prep_ms, **out.timings}
        return out

    def top(self, scores: np.ndarray, k: int | None = None, threshold: float | None = None) -> list[dict[str, Any]]:
        """``[{"index", "label", "score"}]`` (the schema's top_k), dropping scores below ``threshold``."""
        k = self.top_k_default if k is None else k
        threshold = self.threshold if threshold is None else threshold
        return [p for p in schema_top_k(scores, self.labels, k) if p["score"] >= threshold]

    def classify(self, frame: np.ndarray, *, bgr: bool = True, top_k: int | None = None,
                 threshold: float | None = None) -> list[tuple[str, float]]:
        """``[(label, score), ...]``, best first."""
        return [(p["label"], p["score"]) for p in self.top(self.scores(frame, bgr=bgr).scores, top_k, threshold)]
