"""The second conversion route: PyTorch SqueezeNet -> ONNX -> onnx2tf -> TFLite.

Independent of the Keras route (own network definition, own exporter, onnx2tf's own
TensorFlow graph), and producing the same model contract (``docs/model-format.md``): NHWC
[1, S, S, 3] RGB pixels 0..255 in, ImageNet normalisation folded into the first convolution,
logits [1, C] out (for ``--ptq best`` int8: the class map [1, N, N, C]), static batch 1, one
subgraph; ``int8`` is full integer with int8 (or uint8) I/O, input scale 1 / zero point -128
(``pixel - 128``) or 0 for uint8.

onnx2tf runs in its own process (``import onnx2tf`` switches ``tf.keras`` to Keras 2 for the
whole process) with the working directory ``workdir``, where a dummy
``calibration_image_sample_data_20x128x128x3_float32.npy`` stops its start-up download, so it
works offline. Flags, per format:

- every format: ``-i model.onnx -o onnx2tf -v info`` (the float32 and float16 files are always
  written; onnx2tf's own onnxsim pass runs, with the venv's ``bin`` on PATH so it is found);
- ``dynamic``: ``-odrqt``;
- ``int8``: ``-oiqt -cind image calib.npy "[[[[0,0,0]]]]" "[[[[1,1,1]]]]" -iqd int8 -oqd int8``.
  ``calib.npy`` holds the real calibration images as float32 NHWC pixels 0..255; mean 0 / std 1
  because the normalisation is inside the graph (onnx2tf feeds ``(data - mean) / std``). The first
  image gets one pixel at 0 and one at 255, as :func:`edgesqz.converters.export.representative_dataset`
  does, so the input range is exactly 0..255 and the int8 input is exactly ``pixel - 128``.
  ``--io uint8`` passes ``-iqd uint8 -oqd uint8``.

Every conversion is checked before its bytes are returned: onnx2tf's float32 model must match
the PyTorch logits on probe images (this catches layout or pooling mistakes whatever the format),
and the chosen model must meet the contract. Every failure is one :class:`EdgesqzError` line that
names ``log_path``, which holds onnx2tf's whole output.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgesqz.architecture import Architecture, architecture
from edgesqz.converters import FORMATS
from edgesqz.errors import EdgesqzError

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
OPSET = 17  # the legacy TorchScript exporter's newest opset; onnx2tf 1.28 handles every op SqueezeNet uses
TIMEOUT_S = 900.0
# Relative to the PyTorch logits' range: onnx2tf's float32 model must agree this closely.
FLOAT32_TOLERANCE = 1e-3
SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
INSTALL_HINT = 'pip install "edgesqz[convert]"'

# onnx2tf names its outputs after the ONNX file's stem ("model").
_OUTPUT_FILES = {
    "float32": "model_float32.tflite",
    "float16": "model_float16.tflite",
    "dynamic": "model_dynamic_range_quant.tflite",
    "int8": "model_full_integer_quant.tflite",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def onnx2tf_command() -> list[str]:
    """How onnx2tf is started: this interpreter's ``-m onnx2tf`` (a separate process)."""
    return [sys.executable, "-m", "onnx2tf"]


def export_onnx(model: Any, path: Path, *, size: int, opset: int = OPSET) -> Path:
    """Export a pixel-input PyTorch model to ONNX: input ``image`` [1, 3, S, S] float32, output ``logits``."""
    import torch

    model = model.eval()
    dummy = torch.zeros(1, 3, size, size, dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        # dynamo=False is deliberate (the dynamo exporter needs onnxscript and emits opset >= 18)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (dummy,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], do_constant_folding=True,
        )
    return path


def calibration_array(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB images (N, S, S, 3) -> float32 pixels, with the 0..255 range anchored in the first image."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or len(images) == 0:
        raise EdgesqzError(f"calibration images must be (N, {size}, {size}, 3) RGB, got an array of shape "
                           f"{images.shape}")
    if images.dtype != np.uint8:
        raise EdgesqzError(f"calibration images must be uint8 pixels, got {images.dtype}")
    data = images.astype(np.float32)
    data[0, 0, 0, :] = 0.0
    data[0, -1, -1, :] = 255.0
    return data


def onnx2tf_args(fmt: str, *, calib_path: Path | None = None, io: str = "int8") -> list[str]:
    """onnx2tf's flags for ``fmt`` (after ``-i model.onnx -o onnx2tf``)."""
    if fmt in ("float32", "float16"):
        return []
    if fmt == "dynamic":
        return ["-odrqt"]
    if fmt == "int8":
        if calib_path is None:
            raise EdgesqzError("int8 needs calibration images: pass --calib DIR_OR_VIDEO")
        return ["-oiqt", "-cind", INPUT_NAME, str(calib_path), "[[[[0,0,0]]]]", "[[[[1,1,1]]]]",
                "-iqd", io, "-oqd", io]
    raise EdgesqzError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _log_hint(log_path: Path) -> str:
    """The most telling line of onnx2tf's log (its last error line, else its last line), shortened."""
    try:
        lines = [_ANSI.sub("", line).strip() for line in log_path.read_text("utf-8", "replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line and not set(line) <= set("=-^~ ")]
    errors = [line for line in lines if re.search(r"error|exception|failed", line, re.IGNORECASE)]
    hint = (errors or lines or [""])[-1]
    return hint if len(hint) <= 160 else hint[:157] + "..."


def run_onnx2tf(onnx_path: Path, out_dir: Path, args: list[str], *, workdir: Path, log_path: Path,
                timeout: float = TIMEOUT_S) -> None:
    """Run onnx2tf on ``onnx_path`` into ``out_dir`` in its own process; its output goes to ``log_path``."""
    command = [*onnx2tf_command(), "-i", str(onnx_path), "-o", str(out_dir), "-v", "info", *args]
    if command[1:3] == ["-m", "onnx2tf"] and importlib.util.find_spec("onnx2tf") is None:
        raise EdgesqzError(f"the onnx2tf route needs onnx2tf, which is not installed: {INSTALL_HINT}")
    sample = workdir / SAMPLE_FILE
    if not sample.exists():  # onnx2tf downloads this at start for image inputs unless it is here
        np.save(sample, np.full((20, 128, 128, 3), 0.5, np.float32))
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # its onnxsim step
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ cd {workdir} && {' '.join(command)}\n".encode())
        log.flush()
        try:
            result = subprocess.run(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    timeout=timeout, check=False)
        except FileNotFoundError as exc:
            raise EdgesqzError(f"cannot start onnx2tf ({command[0]} not found): {INSTALL_HINT} "
                               f"(log: {log_path})") from exc
        except subprocess.TimeoutExpired as exc:
            raise EdgesqzError(f"onnx2tf did not finish within {timeout:.0f} s; its log: {log_path}") from exc
    if result.returncode != 0:
        hint = _log_hint(log_path)
        if "No module named onnx2tf" in hint:
            raise EdgesqzError(f"the onnx2tf route needs onnx2tf, which is not installed: {INSTALL_HINT}")
        raise EdgesqzError(f"onnx2tf failed (exit {result.returncode}): {hint} (its log: {log_path})")


def onnx_to_tflite(onnx_path: Path, *, fmt: str, calib: np.ndarray | None, io: str = "int8", workdir: Path,
                   log_path: Path, timeout: float = TIMEOUT_S) -> dict[str, bytes]:
    """Run onnx2tf once for ``fmt``; the float32 model and the ``fmt`` model, as bytes, by format name."""
    if io not in ("int8", "uint8"):
        raise EdgesqzError(f"--io must be int8 or uint8, not {io!r}")
    workdir.mkdir(parents=True, exist_ok=True)
    calib_path = None
    if fmt == "int8" and calib is not None:
        calib_path = workdir / "calib.npy"
        np.save(calib_path, calib)
    args = onnx2tf_args(fmt, calib_path=calib_path, io=io)
    out_dir = workdir / "onnx2tf"
    shutil.rmtree(out_dir, ignore_errors=True)  # never pick up an earlier run's file
    run_onnx2tf(onnx_path, out_dir, args, workdir=workdir, log_path=log_path, timeout=timeout)
    models = {}
    for name in dict.fromkeys(("float32", fmt)):
        path = out_dir / _OUTPUT_FILES[name]
        if not path.is_file():
            raise EdgesqzError(f"onnx2tf wrote no {name} model ({path.name}): {_log_hint(log_path)} "
                               f"(its log: {log_path})")
        models[name] = path.read_bytes()
    return models


def check_contract(model: bytes, *, fmt: str, size: int, classes: int, io: str = "int8",
                   log_path: Path | None = None, class_map: int | None = None) -> dict[str, Any]:
    """Raise :class:`EdgesqzError` unless ``model`` meets edgesqz's model contract; return its graph summary.

    The output is logits [1, classes], or with ``class_map=N`` the class map [1, N, N, classes].
    """
    from edgesqz.device.runtime import make_interpreter
    from edgesqz.modelinfo import graph_summary
    from edgesqz.quiet import captured_output

    graph = graph_summary(model)
    problems = []
    if graph["subgraphs"] != 1:
        problems.append(f"{graph['subgraphs']} subgraphs (expected 1)")
    if "CUSTOM" in graph["ops"] or any(op.startswith("Flex") for op in graph["ops"]):
        problems.append("custom/Flex ops " + ", ".join(op for op in graph["ops"] if op == "CUSTOM"
                                                      or op.startswith("Flex")))
    with captured_output([]):  # the runtime's XNNPACK banner
        interpreter, _ = make_interpreter(model, threads=1)
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    int8 = fmt == "int8"
    want = np.dtype(io if int8 else "float32")
    if len(inputs) != 1 or len(outputs) != 1:
        problems.append(f"{len(inputs)} inputs and {len(outputs)} outputs (expected 1 and 1)")
    else:
        inp, out = inputs[0], outputs[0]
        out_shape = [1, classes] if class_map is None else [1, class_map, class_map, classes]
        for what, detail, shape in (("input", inp, [1, size, size, 3]), ("output", out, out_shape)):
            got = [int(d) for d in detail["shape"]]
            signature = [int(d) for d in detail.get("shape_signature", detail["shape"])]
            if got != shape or signature != shape:
                problems.append(f"{what} shape {signature} (expected {shape}"
                                f"{', NHWC' if what == 'input' else ''})")
            if np.dtype(detail["dtype"]) != want:
                problems.append(f"{what} dtype {np.dtype(detail['dtype']).name} (expected {want.name})")
        if int8:
            scale, zero = inp["quantization"]
            expected_zero = -128 if io == "int8" else 0
            if abs(scale - 1.0) > 1e-6 or zero != expected_zero:
                problems.append(f"input quantisation scale {scale:g} / zero point {zero} "
                                f"(expected 1 / {expected_zero}: pixel values)")
    if int8:
        allowed = {"INT8", "INT32"} | ({"UINT8"} if io == "uint8" else set())
        extra = sorted(set(graph["tensor_types"]) - allowed)
        if extra:
            problems.append(f"non-integer tensors {', '.join(extra)} in a full-integer model")
    if problems:
        where = f" (onnx2tf's log: {log_path})" if log_path else ""
        raise EdgesqzError(f"the onnx2tf {fmt} model breaks the edgesqz model contract: "
                           + "; ".join(problems) + where)
    return graph


def _probe_images(calib_images: np.ndarray | None, size: int) -> np.ndarray:
    if calib_images is not None and len(calib_images):
        return np.asarray(calib_images[:2], np.uint8)
    return np.random.default_rng(0).integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)


def _check_float32(model: bytes, torch_model: Any, probes: np.ndarray, log_path: Path) -> float:
    """Max |onnx2tf float32 - PyTorch| over the logits' range on ``probes``; raise when above tolerance."""
    import torch

    from edgesqz.evaluate import tflite_outputs
    from edgesqz.quiet import captured_output

    with torch.no_grad():
        ref = torch_model(torch.from_numpy(probes.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
    if ref.ndim == 4:  # class map [N, C, H, W]: compare its mean, the logits (tflite_outputs pools likewise)
        ref = ref.mean(axis=(2, 3))
    with captured_output([]):
        got = tflite_outputs(model, probes, threads=1)
    relative = float(np.abs(got - ref).max()) / max(float(np.ptp(ref)), 1e-12)
    if not relative <= FLOAT32_TOLERANCE:
        raise EdgesqzError(f"onnx2tf's float32 model does not match PyTorch (max difference {relative:.2%} of the "
                           f"logits' range; onnx2tf mistranslated the graph); its log: {log_path}")
    return relative


def convert_via_onnx2tf(state: Mapping[str, np.ndarray], *, version: str | Architecture, size: int, fmt: str,
                        calib_images: np.ndarray | None, io: str = "int8",
                        workdir: Path, log_path: Path, timeout: float = TIMEOUT_S,
                        fold: bool = True, class_map: bool = False, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None) -> bytes:
    """fmt in {"float32","float16","dynamic","int8"}; returns the .tflite bytes (no metadata; the lead embeds it).

    ``state`` is a SqueezeNet state_dict of ``version``'s layout as numpy arrays
    (``torch_import.load_state_dict``), ``mean``/``std`` the training normalisation (default: the
    architecture's),
    ``calib_images`` uint8 RGB (N, size, size, 3) preprocessed like inference (needed for int8 only).
    ``fold=False`` when ``state`` already takes pixels (the normalisation folded in, as in the weights
    :func:`edgesqz.converters.quantize.prepare_int8` returns); ``class_map=True`` exports the class
    map [1, N, N, C] instead of the logits.
    Intermediate files (``model.onnx``, ``calib.npy``, onnx2tf's output folder) stay in ``workdir``.
    """
    if fmt not in FORMATS:
        raise EdgesqzError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if io not in ("int8", "uint8"):
        raise EdgesqzError(f"--io must be int8 or uint8, not {io!r}")
    if fmt == "int8" and calib_images is None:
        raise EdgesqzError("int8 needs calibration images: pass --calib DIR_OR_VIDEO")
    calib = calibration_array(calib_images, size) if fmt == "int8" and calib_images is not None else None
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise EdgesqzError(f"the onnx2tf route needs PyTorch: {INSTALL_HINT}") from exc
    from edgesqz.converters.torch_model import pixel_squeezenet

    arch = architecture(version)
    model = pixel_squeezenet(state, version=arch, fold=fold, class_map=class_map, mean=mean, std=std)
    classes = model.net.num_classes
    try:
        with torch.no_grad():
            probe = model(torch.zeros(1, 3, size, size))
    except RuntimeError as exc:
        raise EdgesqzError(f"input size {size} is too small for {arch.label}") from exc

    workdir = Path(workdir)
    log_path = Path(log_path)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"edgesqz onnx2tf route: {arch.name}, {fmt}, {size}x{size}, "
                        f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    onnx_path = workdir / "model.onnx"
    try:
        export_onnx(model, onnx_path, size=size)
    except Exception as exc:  # the exporter raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        with open(log_path, "a") as log:
            log.write(f"torch.onnx.export failed: {exc!r}\n")
        raise EdgesqzError(f"PyTorch -> ONNX export failed: {first[:160]} (log: {log_path})") from exc

    models = onnx_to_tflite(onnx_path, fmt=fmt, calib=calib, io=io, workdir=workdir, log_path=log_path,
                            timeout=timeout)
    _check_float32(models["float32"], model, _probe_images(calib_images, size), log_path)
    check_contract(models[fmt], fmt=fmt, size=size, classes=classes, io=io, log_path=log_path,
                   class_map=int(probe.shape[-1]) if class_map else None)
    return models[fmt]
