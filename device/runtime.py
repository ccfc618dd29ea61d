"""TFLite interpreter backends, delegates and graph facts — the bottom of the device stack.

Backends, in order: ``ai_edge_litert`` (the maintained LiteRT runtime, a dependency),
``tflite_runtime`` (legacy), ``tensorflow.lite`` (last resort; imports TensorFlow). The module
itself imports none of them until an interpreter is made.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import importlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgesqz.errors import EdgesqzError

BACKENDS: tuple[tuple[str, str], ...] = (
    ("ai_edge_litert", "ai_edge_litert.interpreter"),
    ("tflite_runtime", "tflite_runtime.interpreter"),
    ("tensorflow", "tensorflow.lite"),
)

EDGETPU_LIBRARY = "libedgetpu.so.1"
EDGETPU_HELP = (
    "install the Edge TPU runtime (Coral's libedgetpu1-std package from Coral's apt repository) and plug in the "
    "Coral; see README 'Coral Edge TPU'"
)


@dataclass(frozen=True)
class Backend:
    name: str
    module: Any  # module exposing Interpreter and load_delegate

    @property
    def version(self) -> str:
        root = importlib.import_module(self.name)
        return str(getattr(root, "__version__", "unknown"))


def load_backend(preferred: str | None = None) -> Backend:
    """The first importable backend (or ``preferred``); a clear error when none is installed."""
    candidates = [b for b in BACKENDS if preferred in (None, b[0])]
    if not candidates:
        raise EdgesqzError(f"unknown backend {preferred!r}; use one of {', '.join(b[0] for b in BACKENDS)}")
    errors = []
    for name, module_name in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        return Backend(name, module)
    raise EdgesqzError("no TFLite runtime is importable (" + "; ".join(errors) + "); pip install ai-edge-litert")


def load_edgetpu_delegate(backend: Backend, device: str | None = None) -> Any:
    """Load the Coral delegate; ``device`` is e.g. ``usb``, ``usb:0``, ``pci``, ``pci:0`` or None (any)."""
    if device and not any(device == k or device.startswith(f"{k}:") for k in ("usb", "pci")):
        raise EdgesqzError(f"unknown Edge TPU device {device!r}; use usb, usb:N, pci or pci:N")
    if ctypes.util.find_library("edgetpu") is None and not _library_loadable(EDGETPU_LIBRARY):
        raise EdgesqzError(f"the Edge TPU library {EDGETPU_LIBRARY} is not installed: {EDGETPU_HELP}")
    options = {"device": device} if device else {}
    try:
        return backend.module.load_delegate(EDGETPU_LIBRARY, options)
    except (ValueError, RuntimeError, OSError) as exc:
        raise EdgesqzError(
            f"no Edge TPU found{f' at {device}' if device else ''} ({str(exc).splitlines()[0] if str(exc) else exc}); "
            "check the Coral is plugged in (lsusb shows 'Global Unichip' or 'Google'), then retry"
        ) from exc


def _library_loadable(name: str) -> bool:
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def check_model_file(path: str | os.PathLike[str]) -> bytes:
    """Read a .tflite file and check its whole structure before any native code sees it.

    :func:`edgesqz.tflite_validate.validate_model` checks every index, shape and size the runtime
    will trust; :func:`edgesqz.tflite_metadata.read_metadata` the embedded metadata.
    """
    from edgesqz.fileio import read_regular
    from edgesqz.tflite_metadata import read_metadata
    from edgesqz.tflite_validate import MAX_MODEL_BYTES, validate_model

    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise EdgesqzError(f"model {path} is a link to {os.readlink(path)}, which does not exist; "
                           "convert the model again or pass --model FILE.tflite")
    if not path.exists():
        raise EdgesqzError(f"model {path} does not exist")
    if path.is_dir():
        raise EdgesqzError(f"model {path} is a folder; pass the .tflite file")
    data = read_regular(path, MAX_MODEL_BYTES, "model")  # a FIFO or /dev/zero is refused before any read
    src = f"model {path}"
    if data is None:
        raise EdgesqzError(f"{src} is larger than {MAX_MODEL_BYTES >> 20} MiB, the most edgesqz accepts; is it a "
                           ".tflite model?")
    validate_model(data, src)
    read_metadata(data, src=src)
    return data


@contextlib.contextmanager
def native_stderr() -> Iterator[list[str]]:
    """Capture what native code (LiteRT, FFmpeg, V4L2) writes to file descriptor 2 meanwhile.

    Yields a list that receives the captured lines once the block ends, so they can be filtered or
    folded into a one-line error instead of reaching the terminal. Only in the main thread (it
    redirects the process's stderr for the duration); elsewhere it captures nothing.
    """
    lines: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield lines
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield lines
        return
    cv2_logging = _cv2_logging()
    level = cv2_logging.getLogLevel() if cv2_logging else None
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        if cv2_logging:
            cv2_logging.setLogLevel(cv2_logging.LOG_LEVEL_SILENT)
        try:
            yield lines
        finally:
            if cv2_logging:
                cv2_logging.setLogLevel(level)
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(line.strip() for line in tmp.read().decode("utf-8", "replace").splitlines() if line.strip())


def _cv2_logging() -> Any:
    """OpenCV's logging module when OpenCV is already imported (its own warnings bypass fd 2 buffering)."""
    cv2 = sys.modules.get("cv2")
    return getattr(getattr(cv2, "utils", None), "logging", None)


MAX_THREADS = 64  # more interpreter threads than this only waste memory; 100000 crashed the runtime


def check_threads(threads: int | None) -> None:
    """``--threads``: None (one per core) or 1 .. :data:`MAX_THREADS`."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise EdgesqzError(f"--threads must be between 1 and {MAX_THREADS}, got {threads} (this machine has "
                           f"{os.cpu_count()} cores; one thread per core is the default)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Interpreter:
    """The backend's interpreter, with runtime failures of ``invoke`` turned into one-line errors.

    Everything else is the backend's own object (``set_tensor``, ``get_tensor``, details...).
    """

    def __init__(self, inner: Any, src: str, backend: Backend) -> None:
        self._inner = inner
        self._src = src
        self._backend = backend
        self.set_tensor = inner.set_tensor  # the per-frame calls skip __getattr__
        self.get_tensor = inner.get_tensor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def invoke(self) -> None:
        try:
            self._inner.invoke()
        except (RuntimeError, ValueError) as exc:
            raise EdgesqzError(f"the runtime ({self._backend.name} {self._backend.version}) failed to run "
                               f"{self._src}: {_first_line(exc)}; the model is damaged or was made for another "
                               "runtime: convert it again") from exc


def make_interpreter(
    model: str | os.PathLike[str] | bytes,
    *,
    threads: int | None = None,
    delegate: str | None = None,
    backend: str | None = None,
    xnnpack: bool = True,
    src: str | None = None,
    widen: bool = True,
) -> tuple[Interpreter, Backend]:
    """Create and allocate an interpreter. ``delegate``: None (CPU, XNNPACK) or ``edgetpu[:usb|:pci...]``.

    A path is read and validated with :func:`check_model_file`; bytes must have been validated by the
    caller (they come from :func:`check_model_file` or are built in memory). ``src`` names the model in
    errors (default: the path, or "this model"). ``widen``: 4-bit weights are widened to int8 in memory
    first (:func:`widen_for_runtime`), so XNNPACK runs the whole graph; False hands the file to the
    runtime as it is.
    """
    check_threads(threads)
    if isinstance(model, bytes):
        data, src = model, src or "this model"
    else:
        data, src = check_model_file(model), src or f"model {model}"
    be = load_backend(backend)
    if widen:
        data = widen_for_runtime(data, src)
    delegates = []
    if delegate:
        kind, _, device = delegate.partition(":")
        if kind != "edgetpu":
            raise EdgesqzError(
                f"unknown delegate {delegate!r}; the only delegate is edgetpu (edgetpu:usb, edgetpu:pci)"
            )
        delegates.append(load_edgetpu_delegate(be, device or None))
    kwargs: dict[str, Any] = {"model_content": data, "num_threads": threads}
    if delegates:
        kwargs["experimental_delegates"] = delegates
    if not xnnpack:
        resolver = be.module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        kwargs["experimental_op_resolver_type"] = resolver
    try:
        interpreter = be.module.Interpreter(**kwargs)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise EdgesqzError(f"the runtime ({be.name} {be.version}) cannot load {src}: {_first_line(exc)}; the file "
                           "is damaged, or uses ops this runtime lacks: convert it again, or pip install -U "
                           "ai-edge-litert") from exc
    return Interpreter(interpreter, src, be), be


def widen_for_runtime(data: bytes, src: str = "this model") -> bytes:
    """``data`` with its INT4 weights stored as INT8 (same values, same scales; see
    :mod:`edgesqz.tflite_int4`): XNNPACK takes int8 convolution filters only, so a 4-bit model would
    otherwise run most of its convolutions on the reference kernels. Models without INT4 tensors
    come back unchanged (the same object)."""
    from edgesqz.tflite_int4 import has_int4, widen_int4

    try:
        import ai_edge_litert.schema_py_generated  # noqa: F401  (the flatbuffer reader; ships with the runtime)
    except ImportError:  # a legacy backend alone: hand the file over as it is (its kernels read INT4 or refuse)
        return data
    try:
        if not has_int4(data):
            return data
        return widen_int4(data)
    except EdgesqzError as exc:
        raise EdgesqzError(f"{src}: cannot widen its 4-bit weights: {exc}") from exc


@dataclass(frozen=True)
class Coverage:
    """How much of the graph delegates (XNNPACK, Edge TPU) run."""

    total_ops: int
    delegated_ops: int
    partitions: int

    @property
    def full(self) -> bool:
        return self.total_ops > 0 and self.delegated_ops == self.total_ops

    def describe(self, name: str = "XNNPACK") -> str:
        if self.partitions == 0:
            return f"{name}: not used"
        if self.full:
            return f"{name}: covers the whole graph ({self.total_ops} ops, {self.partitions} partition)"
        return (f"{name}: {self.delegated_ops}/{self.total_ops} ops in {self.partitions} partition(s); "
                f"{self.total_ops - self.delegated_ops} run on reference kernels")

    def to_dict(self) -> dict[str, Any]:
        return {"total_ops": self.total_ops, "delegated_ops": self.delegated_ops, "partitions": self.partitions,
                "full": self.full}


def delegate_coverage(interpreter: Any) -> Coverage:
    """Count the original ops that run inside DELEGATE nodes.

    ``_get_ops_details()`` lists the original nodes and, after them, one DELEGATE node per
    partition whose inputs/outputs are the partition's boundary tensors. An original op is
    delegated when it lies on a path from a delegate's inputs to its outputs without producing
    one of that delegate's inputs.
    """
    ops = interpreter._get_ops_details()
    delegates = [op for op in ops if op["op_name"] == "DELEGATE"]
    original = [op for op in ops if op["op_name"] != "DELEGATE"]
    consumers: dict[int, list[int]] = {}
    for i, op in enumerate(original):
        for t in op["inputs"]:
            consumers.setdefault(int(t), []).append(i)
    covered: set[int] = set()
    for d in delegates:
        d_in = {int(t) for t in d["inputs"]}
        d_out = {int(t) for t in d["outputs"]}
        # forward from the delegate's inputs, stopping at its outputs
        forward: set[int] = set()
        stack = [i for t in d_in for i in consumers.get(t, [])]
        while stack:
            i = stack.pop()
            if i in forward:
                continue
            outs = {int(t) for t in original[i]["outputs"]}
            if outs & d_in:
                continue
            forward.add(i)
            for t in outs - d_out:
                stack.extend(consumers.get(t, []))
        covered |= forward
    return Coverage(len(original), len(covered), len(delegates))
