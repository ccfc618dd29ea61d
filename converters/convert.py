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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgesqz.architecture import Architecture, architecture
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

HEADS = ("probabilities", "logits", "class_map")
# Measured on SqueezeNet 1.1 (benchmarks/calibration_count.py): accuracy stops improving
# well before 200 images, and 200 images take a few seconds to calibrate.
DEFAULT_CALIB_COUNT = 200

ProgressFactory = Callable[[str, int], Callable[[int], None]]


def _no_progress(_: str, __: int) -> Callable[[int], None]:
    return lambda _n: None


@dataclass
class ConvertOptions:
    arch: str | None = None  # "1_0", "1_1", "cifar" or a variant's name; None: detect from the weights
    weights: str = "torchvision"
    fmt: str = "int8"
    calib: str | None = None
    calib_count: int = DEFAULT_CALIB_COUNT
    io: str | None = None  # int8 models' input: uint8 (default, standard) or int8 (pixel - 128)
    head: str = "probabilities"  # "probabilities" (standard [1, C]), "logits" or "class_map" (edgesqz 0.x)
    input_size: int | None = None  # None: the size the architecture was trained at (224, 32 for CIFAR)
    crop_fraction: float | None = None  # None: the architecture's (0.875 ImageNet, 1.0 CIFAR)
    mean: tuple[float, ...] | None = None  # the training normalisation; None: the architecture's
    std: tuple[float, ...] | None = None
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
    weight_bits: int | None = None  # int8 only: 4 (every convolution but the first 4-bit) or 8; None: 8, or the
    # trained grid of a model from `edgesqz train --weight-bits 4`
    max_size: int | None = None  # int8 only: a file size budget in bytes; 4 or 8 bits per layer by sensitivity


@dataclass
class ConvertResult:
    path: Path
    report_path: Path
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    found: str = ""  # what the weights turned out to be, for the user


def output_path(opts: ConvertOptions, arch: Architecture) -> Path:
    if opts.output:
        return Path(opts.output).expanduser()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return default_model_path().parent / f"{arch.name}-{opts.fmt}-{stamp}.tflite"


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


@dataclass
class LoadedModel:
    """The float Keras model (logits out) and what is known about it."""

    model: Any
    arch: Architecture
    found: str  # what the weights are, in words
    preprocessing: Preprocessing | None = None  # what it was trained with, when the file says (edgesqz train)
    labels: Labels | None = None  # class names stored with it (edgesqz train)
    weight_bits: int = 32  # 4: trained on a 4-bit weight grid (edgesqz train --weight-bits 4)


def _check_arch(found: Architecture, wanted: Architecture | None, what: str) -> None:
    if wanted is not None and (found.layout, found.stem) != (wanted.layout, wanted.stem):
        raise EdgesqzError(f"{what} is {found.label}, not {wanted.label}: pass --arch {found.short_name} "
                           "(or leave --arch out)")


def _load_keras_model(resolved: ResolvedWeights, arch_spec: str | None, classes: int | None) -> LoadedModel:
    """Load the weights into a float Keras SqueezeNet of the architecture they belong to."""
    from edgesqz.squeezenet import SqueezeNet, architecture_of

    wanted = architecture(arch_spec) if arch_spec else None
    if resolved.kind == "keras_model":
        import keras

        from edgesqz.train import read_training_info

        try:
            model = keras.saving.load_model(resolved.path, compile=False)
        except Exception as exc:  # Keras raises many types for a bad archive
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgesqzError(f"cannot load Keras model {resolved.path}: {first[:160]}") from exc
        saved = read_training_info(resolved.path) or {}
        try:
            arch = (Architecture.from_dict(saved["architecture"]) if "architecture" in saved
                    else architecture_of(model))
            head = model.get_layer(arch.naming.head("conv"))
        except (EdgesqzError, ValueError) as exc:
            raise EdgesqzError(f"{resolved.path} is not an edgesqz SqueezeNet (no architecture description and "
                               "no layer names of a known layout)") from exc
        _check_arch(arch, wanted, str(resolved.path))
        broken = [w.path for w in model.weights if not np.all(np.isfinite(np.asarray(w)))]
        if broken:
            raise EdgesqzError(f"{resolved.path} has NaN or infinite weights (e.g. in {broken[0]}): the training run "
                               "diverged; use an earlier checkpoint")
        pre = Preprocessing.from_dict(saved["preprocessing"]) if "preprocessing" in saved else None
        if pre is None and "input_size" in saved:  # trained by an earlier edgesqz: ImageNet normalisation
            pre = replace(arch.preprocessing, size=int(saved["input_size"]))
        names = saved.get("labels")
        bits = int(saved.get("weight_bits", 32)) if str(saved.get("weight_bits", "")).isdigit() else 32
        return LoadedModel(model, arch, f"{arch.label} from edgesqz train, {head.filters} classes"
                           + (", trained on 4-bit weights" if bits == 4 else ""),
                           pre, Labels(tuple(names)) if names else None, bits)
    if resolved.kind != "torch":
        raise EdgesqzError(f"{resolved.path}: convert takes a PyTorch .pth state_dict or a .keras model from "
                           "edgesqz train; load .weights.h5 into SqueezeNet(...) and save it as .keras first")

    from edgesqz.converters.torch_import import detect_or_explain, load_state_dict, state_dict_to_keras

    state = load_state_dict(resolved.path)
    detected = detect_or_explain(state, str(resolved.path))
    _check_arch(detected.arch, wanted, "these weights")
    # a variant the user named (e.g. the paper's simple bypass) has the same keys as its family
    arch = wanted if wanted is not None and wanted.batch_norm == detected.arch.batch_norm else detected.arch
    if classes is not None and classes != detected.classes:
        raise EdgesqzError(f"the labels have {classes} entries but the weights have {detected.classes} classes; "
                           "pass the labels file that belongs to these weights")
    model = SqueezeNet(arch, classes=detected.classes, classifier_activation=None)
    state_dict_to_keras(state, model, arch=arch)
    return LoadedModel(model, arch, detected.describe())


def _floats(values: tuple[float, ...] | None, what: str) -> tuple[float, float, float] | None:
    if values is None:
        return None
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(np.isfinite(vals)):
        raise EdgesqzError(f"--{what} takes one number or three (R,G,B), got {values}")
    if what == "std" and min(vals) <= 0:
        raise EdgesqzError(f"--std values must be > 0, got {values}")
    return vals  # type: ignore[return-value]


def preprocessing_for(opts: ConvertOptions, loaded: LoadedModel) -> Preprocessing:
    """The model's preprocessing: what it was trained with (file, else layout defaults), then the options.

    A model whose training size is known (a .keras from edgesqz train, or the CIFAR layout with its
    CIFAR-100 normalisation) refuses an ``--input-size`` off by more than 2x: it would see every object
    at a scale it never learned.
    """
    arch = loaded.arch
    base = loaded.preprocessing or arch.preprocessing
    mean, std = _floats(opts.mean, "mean"), _floats(opts.std, "std")
    crop = base.crop_fraction if opts.crop_fraction is None else float(opts.crop_fraction)
    if not 0.0 < crop <= 1.0:
        raise EdgesqzError(f"--crop-fraction must be in (0, 1], got {opts.crop_fraction}")
    size = base.size if opts.input_size is None else int(opts.input_size)
    smallest = arch.min_input_size()
    if size < smallest:
        raise EdgesqzError(f"--input-size {size} is below {arch.label}'s minimum {smallest}")
    known = loaded.preprocessing is not None or (arch.layout == "cifar" and mean is None and std is None)
    if opts.input_size is not None and known and not base.size / 2 <= size <= base.size * 2:
        how = ("retrain it at that size (edgesqz train --input-size)" if loaded.preprocessing is not None else
               "if you trained it on other images, pass their size with --input-size and their normalisation "
               "with --mean/--std")
        raise EdgesqzError(f"--input-size {size} does not fit this {arch.label}: it was trained on "
                           f"{base.size}x{base.size} images and would see everything {size / base.size:.3g}x larger; "
                           f"leave --input-size out ({base.size}), or {how}")
    return replace(base, size=size, crop_fraction=crop, mean=mean or base.mean, std=std or base.std)


def convert(opts: ConvertOptions, progress: ProgressFactory = _no_progress) -> ConvertResult:
    """Run the whole conversion; see the module docstring for the guarantees."""
    if opts.fmt not in FORMATS:
        raise EdgesqzError(f"unknown format {opts.fmt!r}; use one of {', '.join(FORMATS)}")
    if opts.io not in (None, "int8", "uint8"):
        raise EdgesqzError(f"--io must be int8 or uint8, not {opts.io!r}")
    if opts.io is not None and opts.fmt != "int8":
        raise EdgesqzError("--io is for --int8 models; float models take float32 pixels")
    if opts.head not in HEADS:
        raise EdgesqzError(f"--head must be one of {', '.join(HEADS)}, not {opts.head!r}")
    if opts.edgetpu and opts.head == "probabilities" and opts.io == "int8":
        raise EdgesqzError("--edgetpu with the standard head takes uint8 input; leave --io out")
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
    if opts.weight_bits is not None and opts.weight_bits not in (4, 8):
        raise EdgesqzError(f"--weight-bits must be 4 or 8, not {opts.weight_bits}")
    if opts.max_size is not None and opts.max_size <= 0:
        raise EdgesqzError(f"--max-size must be a positive size (e.g. 500KB), got {opts.max_size}")
    low_bit = opts.weight_bits == 4 or opts.max_size is not None
    if low_bit and opts.fmt != "int8":
        raise EdgesqzError("--weight-bits 4 and --max-size are for --int8 models (int8 activations)")
    if low_bit and opts.ptq != "best":
        raise EdgesqzError("--weight-bits 4 and --max-size round with GPTQ: leave out --ptq plain")
    if low_bit and opts.via != "keras":
        raise EdgesqzError("--weight-bits 4 and --max-size take the keras route: leave out --via onnx2tf")
    if low_bit and opts.edgetpu:
        raise EdgesqzError("the Edge TPU runs int8 weights only: leave out --weight-bits 4 / --max-size")
    if opts.max_drop is not None and not opts.check:
        raise EdgesqzError("--max-drop needs --check DIR (a labelled folder to measure the drop on)")
    wanted = architecture(opts.arch) if opts.arch is not None else None
    _floats(opts.mean, "mean"), _floats(opts.std, "std")
    labels = load_labels(opts.labels) if opts.labels else None
    if opts.check and not Path(opts.check).is_dir():
        raise EdgesqzError(f"--check {opts.check} is not a folder")
    if opts.output:
        _check_writable(Path(opts.output).expanduser(), opts.force)
    resolved = resolve(opts.weights, wanted or "1_1")

    quiet_tensorflow_env()
    log: list[str] = []
    with captured_output(log):  # TensorFlow's import banner (CUDA probing, CPU features)
        import keras  # noqa: F401
    from edgesqz.converters.export import pixel_model, representative_dataset, to_tflite
    from edgesqz.modelinfo import graph_summary
    loaded = _load_keras_model(resolved, opts.arch, len(labels) if labels else None)
    model, arch = loaded.model, loaded.arch
    pre = preprocessing_for(opts, loaded)
    classes = model.get_layer(arch.naming.head("conv")).filters
    warnings: list[str] = []
    if labels is None:
        labels = loaded.labels
    if labels is None and arch.layout == "torchvision" and classes == 1000:
        from edgesqz.imagenet import imagenet_labels

        labels = imagenet_labels()  # torchvision's ImageNet-1k classes, in its output order
    if labels is None:
        labels = Labels.numbered(classes)
        warnings.append(f"no --labels given: the model's {classes} classes are named class_0.. ; pass --labels FILE")
    elif len(labels) != classes:
        raise EdgesqzError(f"the labels have {len(labels)} entries but the model has {classes} classes")
    out_path = output_path(opts, arch)
    _check_writable(out_path, opts.force)
    check_files = labelled_files(opts.check, labels) if opts.check else None

    float_model = pixel_model(model, size=pre.size, normalization=opts.normalization,  # type: ignore[arg-type]
                              mean=pre.mean, std=pre.std, arch=arch)

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
    from edgesqz.converters.quantize import class_map_model, prepare_int8

    trained_bits = loaded.weight_bits == 4 and opts.weight_bits != 8 and opts.fmt == "int8" and opts.ptq == "best"
    low_bit = opts.weight_bits == 4 or opts.max_size is not None or trained_bits
    budget = _size_budget(opts, float_model, labels) if opts.max_size is not None else None
    plan = None
    to_convert = float_model
    if improved and low_bit:
        assert calibration is not None
        from edgesqz.converters.quantize import prepare_weight_bits

        what = "measure layer sensitivity, round weights" if budget is not None else "round weights to 4 bits"
        advance = progress(f"preparing for int8 activations ({what})", 1)
        with captured_output(log):
            plan = prepare_weight_bits(float_model, calibration.images, weight_bits=4, class_map=False,
                                       max_weight_bytes=budget.weights if budget is not None else None,
                                       trained_grid=trained_bits and opts.max_size is None)
        to_convert = plan.model
        advance(1)
    elif improved:
        assert calibration is not None
        advance = progress("preparing for int8 (equalise, round weights)", 1)
        with captured_output(log):
            to_convert = prepare_int8(float_model, calibration.images, class_map=False)
        advance(1)
    class_map = opts.head != "logits"  # the standard head averages the class map in float, after the int8 body
    io = opts.io or ("uint8" if opts.head == "probabilities" else "int8")

    def build(to_convert: Any, plan: Any) -> bytes:
        try:
            if opts.via == "onnx2tf":
                # --ptq best hands the prepared weights (pixels in, rounded) to PyTorch -> ONNX -> onnx2tf
                tflite = _via_onnx2tf(to_convert if improved else model, arch, pre, opts, calibration, out_path,
                                      prepared=improved, class_map=class_map,
                                      io="int8" if opts.head == "probabilities" else io)
            else:
                with captured_output(log):
                    tflite = to_tflite(class_map_model(to_convert) if class_map else to_convert, opts.fmt,
                                       representative=representative,  # type: ignore[arg-type]
                                       io="int8" if opts.head == "probabilities" else io)  # type: ignore[arg-type]
            if opts.head == "probabilities":
                from edgesqz.converters.standard_head import EDGETPU_OPTIONS, add_probability_head

                tflite = add_probability_head(tflite, uint8_input=opts.fmt == "int8" and io == "uint8",
                                              **(EDGETPU_OPTIONS if opts.edgetpu else {}))
            if plan is not None and plan.grids:
                from edgesqz.tflite_int4 import compact_names, write_int4

                tflite = compact_names(write_int4(tflite, plan.grids))
        except EdgesqzError:
            raise
        except Exception as exc:  # the converter raises many types; keep its log for the user
            log_path = out_path.with_suffix(".convert.log")
            atomic_write(log_path, "".join(log).encode())
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgesqzError(f"the TFLite converter failed: {first[:160]} (its log: {log_path})") from exc
        return tflite

    tflite = build(to_convert, plan)
    if budget is not None and plan is not None:
        # The file's size besides the kernels is now known exactly (metadata estimated with the accuracy block's
        # room); choose the bits again for it when the estimate missed, and convert once more.
        draft = _model_info(opts, arch, pre, labels, resolved, calibration, None, classes, improved, io)
        room = 600 + 60 * len(plan.bits) + (3000 if opts.check else 0)  # the weights block, the accuracy block
        besides = len(_embed(tflite, draft, labels, arch, opts, pre)) - plan.weight_bytes() + room
        budget, again = _measured_budget(budget, besides, plan)
        if again:
            advance = progress("choosing bits again for the measured file overhead", 1)
            with captured_output(log):
                plan = plan.rebudget(budget.weights)
            tflite = build(plan.model, plan)
            advance(1)

    accuracy_block = None
    if opts.check:
        assert check_files is not None
        accuracy_block = _check(float_model, tflite, opts.check, check_files, labels, pre, calibration, progress)

    info = _model_info(opts, arch, pre, labels, resolved, calibration, accuracy_block, classes, improved, io)
    weights_block = None
    if plan is not None:
        weights_block = {"requested": ("trained 4-bit grid" if trained_bits and opts.max_size is None
                                       else f"max size {opts.max_size} bytes" if opts.max_size is not None
                                       else "4-bit (first convolution 8-bit)"),
                         "method": plan.method, "weight_bytes": plan.weight_bytes(),
                         "layers_4bit": sum(b == 4 for b in plan.bits.values()),
                         "layers_8bit": sum(b == 8 for b in plan.bits.values()), "layers": plan.layers(),
                         "max_size": opts.max_size}
        info["quantization"]["weights"] = {k: v for k, v in weights_block.items() if k != "layers"}
        info["quantization"]["weights"]["bits_per_layer"] = plan.bits
    final = _embed(tflite, info, labels, arch, opts, pre)
    graph = graph_summary(tflite)
    rep = report(
        "convert_report",
        model=str(out_path), route=opts.via, format=opts.fmt, head=opts.head,
        io=io if opts.fmt == "int8" else "float32",
        architecture=arch.name, input_size=pre.size, weights_found=loaded.found,
        size_bytes=len(final), size_bytes_without_metadata=len(tflite), graph=graph, weights=weights_block,
        source_weights=resolved.meta(), calibration=info.get("calibration"), accuracy=accuracy_block,
        warnings=warnings,
    )
    report_path = out_path.with_suffix(".report.json")
    if budget is not None and len(final) > budget.total:
        raise EdgesqzError(f"the model takes {len(final):,} bytes, more than --max-size {budget.total:,} (the layer "
                           f"choice assumed {budget.overhead:,} bytes besides the kernels, the file has "
                           f"{len(final) - plan.weight_bytes():,}); model not written"  # type: ignore[union-attr]
                           )
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
        rep["edgetpu"] = _edgetpu(out_path, warnings, force=opts.force)
    atomic_write(report_path, (json.dumps(rep, indent=2) + "\n").encode())
    if not opts.output:
        _point_latest(out_path)
    return ConvertResult(out_path, report_path, rep, warnings, loaded.found)


# Bytes of a converted model besides its convolution kernels, estimated before converting: per output
# channel an int32 bias and the scales and zero points of the kernel and the bias; per op and tensor the
# flatbuffer tables; then the metadata (labels twice: labels.txt and nothing else large) and the edgesqz.json
# info. Measured on SqueezeNet 1.1 (1000, 3 classes) and the CIFAR network (100, 8 classes), this errs
# high by 2-6 kB; `convert` checks the real size afterwards.
_PER_CHANNEL = 32
_PER_CHANNEL_MIN = 28
_FIXED_OVERHEAD = 24_000


@dataclass(frozen=True)
class SizeBudget:
    total: int
    overhead: int

    @property
    def weights(self) -> int:
        return self.total - self.overhead


def _size_budget(opts: ConvertOptions, float_model: Any, labels: Labels) -> SizeBudget:
    """The kernels' share of ``--max-size``, or an error naming the smallest size any 4/8-bit mix reaches."""
    from edgesqz.converters.quantize import conv_layers, conv_sizes

    assert opts.max_size is not None
    names = conv_layers(float_model)
    channels = sum(int(float_model.get_layer(n).get_weights()[0].shape[-1]) for n in names)
    overhead = _PER_CHANNEL * channels + _FIXED_OVERHEAD + sum(len(n.encode()) + 1 for n in labels.names)
    if labels.ids:
        overhead += sum(len(str(i)) + 8 for i in labels.ids)
    sizes = conv_sizes(float_model)
    kernels = sizes[names[0]] + sum((n + 1) // 2 for name, n in sizes.items() if name != names[0])
    # certain before converting: the kernels plus, per output channel, the int32 bias and the float32 scales and
    # int64 zero points of kernel and bias; the exact smallest size is known after converting (_measured_budget)
    at_least = kernels + _PER_CHANNEL_MIN * channels
    if opts.max_size < at_least:
        raise EdgesqzError(f"--max-size {opts.max_size:,} bytes cannot be reached: the smallest 4/8-bit mix of this "
                           f"model (every convolution but the first 4-bit) takes more than {at_least:,} bytes "
                           f"(about {kernels + overhead:,}; all 8-bit about {sum(sizes.values()) + overhead:,})")
    return SizeBudget(opts.max_size, overhead)


def _embed(tflite: bytes, info: dict[str, Any], labels: Labels, arch: Architecture, opts: ConvertOptions,
           pre: Preprocessing) -> bytes:
    from edgesqz.tflite_metadata import embed_metadata

    return embed_metadata(
        tflite, labels=list(labels.names), info=info, name=f"{arch.label} ({opts.fmt})",
        description=f"{arch.label} image classifier, {opts.fmt}, {pre.size}x{pre.size} RGB pixels in "
                    "(normalisation inside the model); made by edgesqz",
        version=str(info["edgesqz_version"]), mean=[0.0], std=[1.0], input_min=0.0, input_max=255.0,
    )


def _measured_budget(budget: SizeBudget, besides: int, plan: Any) -> tuple[SizeBudget, bool]:
    """The budget for the measured bytes besides the kernels, and whether the bits must be chosen again
    (over budget, or a 4-bit layer would fit at 8 bits in what is left); an error when no mix fits."""
    measured = SizeBudget(budget.total, besides)
    sizes = plan._choices.shapes if plan._choices is not None else {}
    n = {name: int(np.prod(shape)) for name, shape in sizes.items()}
    first = next(iter(n)) if n else None
    smallest = besides + sum(k if name == first else (k + 1) // 2 for name, k in n.items())
    if budget.total < smallest:
        raise EdgesqzError(f"--max-size {budget.total:,} bytes cannot be reached: the smallest 4/8-bit mix of this "
                           f"model (every convolution but the first 4-bit) takes {smallest:,} bytes; model not written")
    used = plan.weight_bytes()
    upgrades = [n[name] - (n[name] + 1) // 2 for name, bits in plan.bits.items() if bits == 4]
    again = used > measured.weights or any(used + extra <= measured.weights for extra in upgrades)
    return measured, again


def _edgetpu(path: Path, warnings: list[str], *, force: bool = False) -> dict[str, Any]:
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
        compiled = compile_model(path, force=force)
        result["compiled"] = {"model": str(compiled.output), "fully_mapped": compiled.fully_mapped,
                              "cpu_ops": compiled.cpu_rows, "ops": compiled.rows}
    else:
        warnings.append("edgetpu_compiler is not installed here: the model passes the Edge TPU check; compile it "
                        "on an x86_64 Linux host with `edgesqz edgetpu compile MODEL`")
    return result


def _via_onnx2tf(model: Any, arch: Architecture, pre: Preprocessing, opts: ConvertOptions,
                 calibration: ImageSet | None, out_path: Path, *, prepared: bool = False, class_map: bool = True,
                 io: str = "int8") -> bytes:
    """The second route: the same weights through PyTorch -> ONNX -> onnx2tf; its log stays beside the model.

    ``model`` is the float Keras model as loaded (PyTorch folds the normalisation itself), or with
    ``prepared`` :func:`~edgesqz.converters.quantize.prepare_int8`'s output (pixel input, batch norms
    folded), exported as it is; ``class_map`` leaves out the final average pool.
    """
    from edgesqz.converters.onnx_route import convert_via_onnx2tf
    from edgesqz.converters.torch_import import keras_to_state_dict

    log_path = out_path.with_suffix(".onnx2tf.log")
    with tempfile.TemporaryDirectory(prefix="edgesqz-onnx2tf-") as workdir:
        return convert_via_onnx2tf(keras_to_state_dict(model), version=arch.variant(batch_norm=False) if prepared
                                   else arch, size=pre.size, fmt=opts.fmt,
                                   calib_images=calibration.images if calibration is not None else None,
                                   io=io, workdir=Path(workdir), log_path=log_path,
                                   fold=not prepared, class_map=class_map, mean=pre.mean, std=pre.std)


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


def _model_info(opts: ConvertOptions, arch: Architecture, pre: Preprocessing, labels: Labels, resolved: ResolvedWeights,
                calibration: ImageSet | None, accuracy_block: dict[str, Any] | None, classes: int,
                improved: bool, io: str) -> dict[str, Any]:
    from edgesqz import __version__

    in_dtype = (io if opts.fmt == "int8" else "float32")
    info: dict[str, Any] = {
        "schema": "edgesqz.model/1",
        "task": "image_classification",
        "architecture": arch.name,
        "network": arch.to_dict(),  # the whole description (edgesqz.architecture), so the file says what it is
        "format": opts.fmt,
        "input": {"size": pre.size, "layout": "NHWC", "color_order": "RGB", "range": [0, 255],
                  "dtype": in_dtype, "normalization": "inside"},
        "preprocessing": pre.to_dict(),
        # probabilities: the int8 body's class map averaged and softmaxed in float inside the model
        "output": {"kind": {"probabilities": "probabilities", "logits": "logits", "class_map": "class_map"}[opts.head],
                   "classes": classes, "dtype": "float32" if opts.head == "probabilities" or opts.fmt != "int8"
                   else io},
        "labels": {"count": len(labels), "ids": list(labels.ids) if labels.ids else None},
        "source_weights": resolved.meta(),
        "quantization": {"normalization": opts.normalization, "route": opts.via,
                         "ptq": ("activation equalisation + GPTQ weight rounding (clipped grids)"
                                 if improved else "min/max" if calibration is not None else None),
                         "head": {"probabilities": "int8 class map -> DEQUANTIZE -> MEAN -> SOFTMAX (float32)",
                                  "logits": "MEAN in the model", "class_map": "averaged by the reader"}[opts.head]},
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
