"""``edgesqz convert`` as a library call: weights -> Keras -> .tflite with metadata and a report.

Order matters for the user: every argument is checked (output path, calibration source,
labels, weights) before TensorFlow is even imported, and the model file appears, atomically,
only once everything succeeded (including the ``--max-drop`` gate).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesqz.converters import FORMATS
from edgesqz.datasets import ImageSet, LabelledFiles, calibration_files, calibration_set, labelled_files, load_images
from edgesqz.errors import AccuracyGateError, EdgesqzError
from edgesqz.fileio import atomic_write, check_output
from edgesqz.imaging import Preprocessing, is_video
from edgesqz.labels import Labels, load_labels
from edgesqz.paths import default_model_path
from edgesqz.quiet import captured_output, quiet_tensorflow_env
from edgesqz.schema import report
from edgesqz.weights import ResolvedWeights, resolve

# Measured on SqueezeNet 1.1 (benchmarks/calibration_count.py): accuracy stops improving
# well before 200 images, and 200 images take a few seconds to calibrate.
DEFAULT_CALIB_COUNT = 200

ProgressFactory = Callable[[str, int], Callable[[int], None]]


def _no_progress(_: str, __: int) -> Callable[[int], None]:
    return lambda _n: None


@dataclass
class ConvertOptions:
    version: str | None = None  # None: detect from the weights
    weights: str = "torchvision"
    fmt: str = "int8"
    calib: str | None = None
    calib_count: int = DEFAULT_CALIB_COUNT
    io: str = "int8"
    input_size: int = 224
    labels: str | None = None
    check: str | None = None
    max_drop: float | None = None
    output: str | None = None
    force: bool = False
    normalization: str = "fold"
    seed: int = 0
    via: str = "keras"  # or "onnx2tf": PyTorch -> ONNX -> onnx2tf, the independent second route
    edgetpu: bool = False  # check Edge TPU compatibility (and compile when edgetpu_compiler exists)
    ptq: str = "best"  # int8, both routes: "best" (equalise + GPTQ rounding + class-map head) or "plain" (min/max)


@dataclass
class ConvertResult:
    path: Path
    report_path: Path
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def output_path(opts: ConvertOptions, version: str) -> Path:
    if opts.output:
        return Path(opts.output).expanduser()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return default_model_path().parent / f"squeezenet{version}-{opts.fmt}-{stamp}.tflite"


def _check_writable(path: Path, force: bool) -> None:
    check_output(path, force=force, suffixes=(".tflite",))


def _point_latest(path: Path) -> None:
    """Make ``latest.tflite`` in the default folder point at ``path`` (atomically)."""
    latest = default_model_path()
    tmp = latest.with_name(f".latest.{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(path.name if path.parent == latest.parent else path)
    os.replace(tmp, latest)


def _load_keras_model(resolved: ResolvedWeights, version: str | None, classes: int | None) -> tuple[Any, str]:
    """The float Keras model (logits out) and its version."""
    from edgesqz.squeezenet import SqueezeNet

    if resolved.kind == "keras_model":
        import keras

        try:
            model = keras.saving.load_model(resolved.path, compile=False)
        except Exception as exc:  # Keras raises many types for a bad archive
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgesqzError(f"cannot load Keras model {resolved.path}: {first[:160]}") from exc
        try:
            kernel = model.get_layer("features.0").kernel
        except ValueError as exc:
            raise EdgesqzError(f"{resolved.path} is not an edgesqz SqueezeNet (no layer features.0)") from exc
        found = "1_0" if kernel.shape[0] == 7 else "1_1"
        if version and version != found:
            raise EdgesqzError(f"{resolved.path} is SqueezeNet {found}, not {version}: pass --version {found}")
        return model, found

    from edgesqz.converters.torch_import import detect_version, load_state_dict, num_classes, state_dict_to_keras

    state = load_state_dict(resolved.path)
    found = detect_version(state)
    if found is None:
        raise EdgesqzError(f"{resolved.path} is not a SqueezeNet state_dict (no features.0.weight of a known shape)")
    if version and version != found:
        # state_dict_to_keras words this error; call it with a model of the requested version
        state_dict_to_keras(state, SqueezeNet(version, classifier_activation=None), version=version)
    weight_classes = num_classes(state) or 1000
    if classes is not None and classes != weight_classes:
        raise EdgesqzError(
            f"the labels have {classes} entries but the weights have {weight_classes} classes; pass the labels "
            "file that belongs to these weights"
        )
    model = SqueezeNet(found, classes=weight_classes, classifier_activation=None)
    state_dict_to_keras(state, model, version=found)
    return model, found


def _keras_labels(resolved: ResolvedWeights) -> Labels | None:
    """Class names that ``edgesqz train`` stored inside a .keras model."""
    if resolved.kind != "keras_model":
        return None
    from edgesqz.train import read_labels

    names = read_labels(resolved.path)
    return Labels(tuple(names)) if names else None


def convert(opts: ConvertOptions, progress: ProgressFactory = _no_progress) -> ConvertResult:
    """Run the whole conversion; see the module docstring for the guarantees."""
    if opts.fmt not in FORMATS:
        raise EdgesqzError(f"unknown format {opts.fmt!r}; use one of {', '.join(FORMATS)}")
    if opts.io not in ("int8", "uint8"):
        raise EdgesqzError(f"--io must be int8 or uint8, not {opts.io!r}")
    if opts.calib_count < 1:
        raise EdgesqzError(f"--calib-count must be >= 1, got {opts.calib_count}")
    if opts.fmt == "int8" and not opts.calib:
        raise EdgesqzError(
            "--int8 needs real calibration images: pass --calib DIR (a folder of photos like the ones the camera "
            "will see, ~200 are enough) or --calib VIDEO.mp4"
        )
    if opts.calib:
        calib = Path(opts.calib)
        if calib.is_file() and not is_video(calib):
            raise EdgesqzError(f"--calib {calib}: give a folder of images or a video file (.mp4, .avi, ...)")
        if not calib.is_file():
            calibration_files(calib)  # fails now, not after loading TensorFlow, when there are no images
    if opts.edgetpu and opts.fmt != "int8":
        raise EdgesqzError("--edgetpu needs --int8: the Edge TPU runs only full-integer models")
    if opts.ptq not in ("best", "plain"):
        raise EdgesqzError(f"--ptq must be best or plain, not {opts.ptq!r}")
    if opts.via not in ("keras", "onnx2tf"):
        raise EdgesqzError(f"--via must be keras or onnx2tf, not {opts.via!r}")
    if opts.via == "onnx2tf" and opts.normalization != "fold":
        raise EdgesqzError("--via onnx2tf always folds the normalisation into the first convolution")
    if opts.max_drop is not None and not opts.check:
        raise EdgesqzError("--max-drop needs --check DIR (a labelled folder to measure the drop on)")
    if opts.version is not None and opts.version not in ("1_0", "1_1"):
        raise EdgesqzError(f"--version must be 1_0 or 1_1, not {opts.version!r}")
    labels = load_labels(opts.labels) if opts.labels else None
    if opts.check and not Path(opts.check).is_dir():
        raise EdgesqzError(f"--check {opts.check} is not a folder")
    if opts.output:
        _check_writable(Path(opts.output).expanduser(), opts.force)
    resolved = resolve(opts.weights, opts.version or "1_1")

    quiet_tensorflow_env()
    log: list[str] = []
    with captured_output(log):  # TensorFlow's import banner (CUDA probing, CPU features)
        import keras  # noqa: F401
    from edgesqz.converters.export import pixel_model, representative_dataset, to_tflite
    from edgesqz.modelinfo import graph_summary
    from edgesqz.squeezenet import min_input_size

    model, version = _load_keras_model(resolved, opts.version, len(labels) if labels else None)
    if opts.input_size < min_input_size(version):
        raise EdgesqzError(f"--input-size {opts.input_size} is below SqueezeNet {version}'s minimum "
                           f"{min_input_size(version)}")
    classes = model.get_layer("classifier.1").filters
    warnings: list[str] = []
    if labels is None:
        labels = _keras_labels(resolved)
    if labels is None:
        labels = Labels.numbered(classes)
        warnings.append(f"no --labels given: the model's {classes} classes are named class_0.. ; pass --labels FILE")
    elif len(labels) != classes:
        raise EdgesqzError(f"the labels have {len(labels)} entries but the model has {classes} classes")
    out_path = output_path(opts, version)
    _check_writable(out_path, opts.force)
    check_files = labelled_files(opts.check, labels) if opts.check else None

    pre = Preprocessing(size=opts.input_size)
    float_model = pixel_model(model, size=opts.input_size, normalization=opts.normalization)  # type: ignore[arg-type]

    calibration: ImageSet | None = None
    if opts.fmt == "int8":
        assert opts.calib
        count = opts.calib_count
        calibration = calibration_set(opts.calib, count, pre, seed=opts.seed, progress=progress("calibration images",
                                                                                                 count))
        if calibration.skipped:
            warnings.append(f"skipped {len(calibration.skipped)} unreadable calibration images "
                            f"(e.g. {calibration.skipped[0]})")
    representative = representative_dataset(calibration.images) if calibration is not None else None
    improved = calibration is not None and opts.ptq == "best"
    to_convert = float_model
    if improved:
        from edgesqz.converters.quantize import prepare_int8

        assert calibration is not None
        advance = progress("preparing for int8 (equalise, round weights)", 1)
        with captured_output(log):
            to_convert = prepare_int8(float_model, calibration.images)
        advance(1)
    try:
        if opts.via == "onnx2tf":
            # --ptq best hands the prepared weights (pixels in, rounded) to PyTorch -> ONNX -> onnx2tf
            tflite = _via_onnx2tf(to_convert if improved else model, version, opts, calibration, out_path,
                                  prepared=improved)
        else:
            with captured_output(log):
                tflite = to_tflite(to_convert, opts.fmt, representative=representative,  # type: ignore[arg-type]
                                   io=opts.io)  # type: ignore[arg-type]
    except EdgesqzError:
        raise
    except Exception as exc:  # the converter raises many types; keep its log for the user
        log_path = out_path.with_suffix(".convert.log")
        atomic_write(log_path, "".join(log).encode())
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgesqzError(f"the TFLite converter failed: {first[:160]} (its log: {log_path})") from exc

    accuracy_block = None
    if opts.check:
        assert check_files is not None
        accuracy_block = _check(float_model, tflite, opts.check, check_files, labels, pre, calibration, progress)

    info = _model_info(opts, version, pre, labels, resolved, calibration, accuracy_block, classes, improved)
    from edgesqz.tflite_metadata import embed_metadata

    final = embed_metadata(
        tflite, labels=list(labels.names), info=info, name=f"SqueezeNet {version.replace('_', '.')} ({opts.fmt})",
        description=f"SqueezeNet {version.replace('_', '.')} image classifier, {opts.fmt}, RGB pixels in "
                    "(normalisation inside the model); made by edgesqz",
        version=str(info["edgesqz_version"]), mean=[0.0], std=[1.0], input_min=0.0, input_max=255.0,
    )
    graph = graph_summary(tflite)
    rep = report(
        "convert_report",
        model=str(out_path), route=opts.via, format=opts.fmt, io=opts.io if opts.fmt == "int8" else "float32",
        architecture=f"squeezenet{version}", input_size=opts.input_size,
        size_bytes=len(final), size_bytes_without_metadata=len(tflite), graph=graph,
        source_weights=resolved.meta(), calibration=info.get("calibration"), accuracy=accuracy_block,
        warnings=warnings,
    )
    report_path = out_path.with_suffix(".report.json")
    if accuracy_block and opts.max_drop is not None and accuracy_block["top1_drop"] > opts.max_drop:
        rejected = out_path.with_suffix(".rejected.report.json")
        lo, hi = accuracy_block["top1_drop_ci95"]
        atomic_write(rejected, (json.dumps(rep, indent=2) + "\n").encode())
        raise AccuracyGateError(
            f"{opts.fmt} loses {accuracy_block['top1_drop']:.2f} top-1 points (95 % interval "
            f"{lo:+.2f} to {hi:+.2f}; > --max-drop {opts.max_drop}); "
            f"model not written, report in {rejected}"
        )
    atomic_write(out_path, final, force=opts.force)
    if opts.edgetpu:
        rep["edgetpu"] = _edgetpu(out_path, warnings)
    atomic_write(report_path, (json.dumps(rep, indent=2) + "\n").encode())
    if not opts.output:
        _point_latest(out_path)
    return ConvertResult(out_path, report_path, rep, warnings)


def _edgetpu(path: Path, warnings: list[str]) -> dict[str, Any]:
    """Check the written model against the Edge TPU's rules; compile it when the compiler is installed."""
    import shutil

    from edgesqz.edgetpu import check_model, compile_model

    check = check_model(path)
    if not check.compatible:
        path.unlink()
        raise EdgesqzError("the model would not map fully onto the Edge TPU (" + "; ".join(check.reasons)
                           + "); model not written")
    result: dict[str, Any] = {"check": check.to_dict(), "compiled": None}
    if shutil.which("edgetpu_compiler"):
        compiled = compile_model(path)
        result["compiled"] = {"model": str(compiled.output), "fully_mapped": compiled.fully_mapped,
                              "ops": compiled.rows}
    else:
        warnings.append("edgetpu_compiler is not installed here: the model passes the Edge TPU check; compile it "
                        "on an x86_64 Linux host with `edgesqz edgetpu compile MODEL`")
    return result


def _via_onnx2tf(model: Any, version: str, opts: ConvertOptions, calibration: ImageSet | None,
                 out_path: Path, *, prepared: bool = False) -> bytes:
    """The second route: the same weights through PyTorch -> ONNX -> onnx2tf; its log stays beside the model.

    ``prepared``: ``model`` is :func:`~edgesqz.converters.quantize.prepare_int8`'s output (pixel input,
    class-map head), exported as it is.
    """
    from edgesqz.converters.onnx_route import convert_via_onnx2tf
    from edgesqz.converters.torch_import import keras_to_state_dict

    log_path = out_path.with_suffix(".onnx2tf.log")
    with tempfile.TemporaryDirectory(prefix="edgesqz-onnx2tf-") as workdir:
        return convert_via_onnx2tf(keras_to_state_dict(model), version=version, size=opts.input_size, fmt=opts.fmt,
                                   calib_images=calibration.images if calibration is not None else None,
                                   io=opts.io, workdir=Path(workdir), log_path=log_path,
                                   fold=not prepared, class_map=prepared)


def _check(float_model: Any, tflite: bytes, folder: str, lf: LabelledFiles, labels: Labels, pre: Preprocessing,
           calibration: ImageSet | None, progress: ProgressFactory) -> dict[str, Any]:
    from edgesqz.evaluate import compare, tflite_outputs

    used = {str(Path(s).resolve()) for s in calibration.sources} if calibration is not None else set()
    pairs = [(f, t) for f, t in zip(lf.files, lf.targets, strict=True) if str(f.resolve()) not in used]
    excluded = len(lf.files) - len(pairs)
    if not pairs:
        raise EdgesqzError(f"every image in {folder} was used for calibration; check on other images")
    data = load_images([f for f, _ in pairs], pre, progress("check images (decode)", len(pairs)))
    ok = set(data.sources)
    targets = np.array([t for f, t in pairs if str(f) in ok])
    reference = float_model.predict(data.images.astype(np.float32), batch_size=32, verbose=0)
    with captured_output([]):  # the runtime prints its XNNPACK banner to fd 2
        outputs = tflite_outputs(tflite, data.images,
                                 progress=progress("check images (exported model)", len(targets)))
    block = compare(reference, outputs, targets, labels.names)
    block.update({"folder": str(folder), "labelled_by": lf.scheme, "excluded_calibration_images": excluded,
                  "skipped_unreadable": len(data.skipped)})
    return block


def _model_info(opts: ConvertOptions, version: str, pre: Preprocessing, labels: Labels, resolved: ResolvedWeights,
                calibration: ImageSet | None, accuracy_block: dict[str, Any] | None, classes: int,
                improved: bool) -> dict[str, Any]:
    from edgesqz import __version__

    in_dtype = (opts.io if opts.fmt == "int8" else "float32")
    info: dict[str, Any] = {
        "schema": "edgesqz.model/1",
        "task": "image_classification",
        "architecture": f"squeezenet{version}",
        "format": opts.fmt,
        "input": {"size": opts.input_size, "layout": "NHWC", "color_order": "RGB", "range": [0, 255],
                  "dtype": in_dtype, "normalization": "inside"},
        "preprocessing": pre.to_dict(),
        # the improved int8 model leaves the final average pool to the device (finer than int8 logits)
        "output": {"kind": "class_map" if improved else "logits", "classes": classes},
        "labels": {"count": len(labels), "ids": list(labels.ids) if labels.ids else None},
        "source_weights": resolved.meta(),
        "quantization": {"normalization": opts.normalization, "route": opts.via,
                         "ptq": ("activation equalisation + GPTQ weight rounding (clipped grids) + class-map head"
                                 if improved else "min/max" if calibration is not None else None)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "edgesqz_version": __version__,
    }
    if calibration is not None:
        info["calibration"] = {"source": str(opts.calib), "seed": opts.seed,
                               "method": "min/max ranges over the calibration images (TFLiteConverter)",
                               **calibration.summary()}
    if accuracy_block is not None:
        info["accuracy"] = {k: v for k, v in accuracy_block.items() if k != "classes_changed"}
    return info
