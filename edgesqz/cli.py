"""The ``edgesqz`` command: a thin layer over the library.

Every command imports what it needs when it runs, so ``run``, ``classify`` and ``bench`` never
import TensorFlow or PyTorch. Errors the user can fix print one line and exit non-zero.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from edgesqz import __version__
from edgesqz.errors import EdgesqzError

app = typer.Typer(
    name="edgesqz",
    help="SqueezeNet on the edge: convert to full-integer TFLite, then classify camera frames on a Raspberry Pi.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register_device_commands() -> None:
    """``run`` and ``classify`` live with the device runtime (no TensorFlow, no PyTorch)."""
    from edgesqz.device.cli import register

    register(app)


_register_device_commands()


def _register_deploy_commands() -> None:
    """``keys new`` and ``deploy`` (signed models over MQTT; edgesqz/deploy.py)."""
    from edgesqz.deploy import register

    register(app)


_register_deploy_commands()


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"edgesqz {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """SqueezeNet on the edge."""


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "k": 1000, "mb": 1000**2, "m": 1000**2, "kib": 1024, "mib": 1024**2}


def _byte_size(text: str, option: str) -> int:
    """``500KB`` (1000s), ``0.5MB``, ``480KiB`` (1024s) or a plain byte count."""
    import re

    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = found.group(2).lower() if found else ""
    if found is None or unit not in _SIZE_UNITS:
        raise EdgesqzError(f"{option} takes a size such as 500KB, 1.2MB, 480KiB or 480000, not {text!r}")
    return round(float(found.group(1)) * _SIZE_UNITS[unit])


@app.command()
def convert(
    weights: Annotated[str, typer.Option("--weights", "-w", help="'torchvision' (download once), a .pth state_dict "
                                         "(torchvision or pytorch-cifar100 layout), or a .keras model from "
                                         "'edgesqz train'.")] = "torchvision",
    arch: Annotated[str | None, typer.Option("--arch", "--version", help="1_0, 1_1 or cifar (default: recognised "
                                             "from the weights).")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Full-integer int8 (default).")] = False,
    float16: Annotated[bool, typer.Option("--float16", help="float16 weights.")] = False,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic range: int8 weights, float activations.")] = False,
    float32: Annotated[bool, typer.Option("--float32", help="Plain float32.")] = False,
    calib: Annotated[str | None, typer.Option("--calib", help="Calibration images: a folder (recursive) or a "
                                              "video file. Required for --int8.")] = None,
    calib_count: Annotated[int, typer.Option("--calib-count", help="How many calibration images.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Which reproducible sample of --calib-count images.")] = 0,
    io: Annotated[str | None, typer.Option("--io", help="int8 models' input: uint8 (raw pixels; default, what "
                                           "standard clients take) or int8 (pixel - 128).")] = None,
    head: Annotated[str, typer.Option("--head", help="Output: 'probabilities' (one [1, C] float32 vector; the "
                                      "standard classifier MediaPipe and the TFLite Task Library take), 'logits', "
                                      "or 'class_map' ([1, H, W, C] for the reader to average).")]
    = "probabilities",
    input_size: Annotated[int | None, typer.Option("--input-size", help="Square input size in pixels (default: "
                                                   "what the network was trained at, 224 or 32 for cifar).")] = None,
    crop_fraction: Annotated[float | None, typer.Option("--crop-fraction", help="Centre crop as a fraction of the "
                                                        "shorter side (default 0.875; 1.0 for cifar).")] = None,
    mean: Annotated[str | None, typer.Option("--mean", help="Training normalisation mean, R,G,B on 0..1 (default: "
                                             "ImageNet's; CIFAR-100's for cifar).")] = None,
    std: Annotated[str | None, typer.Option("--std", help="Training normalisation std, R,G,B (see --mean).")] = None,
    labels: Annotated[str | None, typer.Option("--labels", help="Class names: .txt (one per line), .json list, "
                                               "or imagenet_class_index.json.")] = None,
    check: Annotated[str | None, typer.Option("--check", help="Labelled folder (<wnid>_*.JPEG or one sub-folder "
                                              "per class) to measure float vs exported accuracy on.")] = None,
    max_drop: Annotated[float | None, typer.Option("--max-drop", help="With --check: fail (exit 3, no model "
                                                   "written) if top-1 drops more than this many points.")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Output .tflite (default: the models "
                                               "folder; run/classify then use it).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    normalization: Annotated[str, typer.Option("--normalization", help="Where the ImageNet mean/std go: 'fold' "
                                               "(into conv 1, exact) or 'layer'.")] = "fold",
    edgetpu: Annotated[bool, typer.Option("--edgetpu", help="Check the int8 model maps fully onto a Coral Edge "
                                          "TPU (and compile it when edgetpu_compiler is installed).")] = False,
    ptq: Annotated[str, typer.Option("--ptq", help="int8 quantisation: 'best' (activation equalisation, "
                                     "error-compensating weight rounding) or 'plain' "
                                     "(the converter's min/max).")] = "best",
    via: Annotated[str, typer.Option("--via", help="Conversion route: 'keras' (Keras -> TFLiteConverter) or "
                                     "'onnx2tf' (PyTorch -> ONNX -> onnx2tf).")] = "keras",
    weight_bits: Annotated[int | None, typer.Option("--weight-bits", help="int8 models: 4 stores every convolution "
                                                    "but the first as packed 4-bit weights (GPTQ rounding, clipping "
                                                    "search), int8 activations; 8 (default) all int8.")] = None,
    max_size: Annotated[str | None, typer.Option("--max-size", help="int8 models: a file size budget (e.g. 500KB, "
                                                 "1.2MB, 480000); 4 or 8 bits per layer by measured "
                                                 "sensitivity.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Convert SqueezeNet weights to a self-describing TFLite model (full int8 by default)."""
    import json

    from edgesqz.console import err, human_size, progress_bars
    from edgesqz.converters.convert import ConvertOptions
    from edgesqz.converters.convert import convert as run_convert

    chosen = [name for name, flag in (("int8", int8), ("float16", float16), ("dynamic", dynamic),
                                      ("float32", float32)) if flag]
    if len(chosen) > 1:
        raise EdgesqzError(f"choose one format, not {' and '.join('--' + c for c in chosen)}")
    opts = ConvertOptions(arch=arch, weights=weights, fmt=chosen[0] if chosen else "int8", calib=calib,
                          calib_count=calib_count, io=io, input_size=input_size, crop_fraction=crop_fraction,
                          mean=_numbers(mean, "--mean"), std=_numbers(std, "--std"), labels=labels, check=check,
                          max_drop=max_drop, output=output, force=force, normalization=normalization, via=via,
                          head=head, ptq=ptq, edgetpu=edgetpu, seed=seed, weight_bits=weight_bits,
                          max_size=_byte_size(max_size, "--max-size") if max_size is not None else None)
    with progress_bars(enabled=not json_out) as bars:
        result = run_convert(opts, bars)
    err.print(f"weights: {result.found}")
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {warning}")
    rep = result.report
    if json_out:
        typer.echo(json.dumps(rep, indent=2))
        return
    from rich.table import Table

    acc = rep["accuracy"]
    table = Table(title=f"edgesqz convert: {rep['architecture']} {rep['format']}", title_justify="left")
    for col in ("model", "size", "top-1", "top-5", "agreement", "top-1 drop"):
        table.add_column(col, justify="left" if col == "model" else "right")
    if acc:
        table.add_row("float (Keras)", "", f"{acc['reference']['top1']:.2f}", f"{acc['reference']['top5']:.2f}", "", "")
    table.add_row(rep["format"], human_size(rep["size_bytes"]),
                  f"{acc['model']['top1']:.2f}" if acc else "-", f"{acc['model']['top5']:.2f}" if acc else "-",
                  f"{acc['top1_agreement']:.2f} %" if acc else "-", f"{acc['top1_drop']:+.2f}" if acc else "-")
    err.print(table)
    err.print("ops: " + ", ".join(f"{k} {v}" for k, v in sorted(rep["graph"]["ops"].items()))
              + "; tensor types: " + ", ".join(sorted(rep["graph"]["tensor_types"])))
    if rep.get("weights"):
        w = rep["weights"]
        err.print(f"weights: {w['layers_4bit']} convolutions 4-bit, {w['layers_8bit']} 8-bit, "
                  f"{human_size(w['weight_bytes'])} of kernels ({w['requested']})")
    if acc:
        err.print(f"checked on {acc['images']} images ({acc['excluded_calibration_images']} calibration images left "
                  f"out); {len(acc['classes_changed'])} classes changed; {acc['tied_top_outputs']:.1f} % tied top "
                  "outputs")
        err.print(f"95 % intervals from {acc['images']} images: agreement {_span(acc['top1_agreement_ci95'], ' %')}, "
                  f"top-1 drop {_span(acc['top1_drop_ci95'], ' points', signed=True)}")
    if rep.get("edgetpu"):
        compiled = rep["edgetpu"]["compiled"]
        cpu = rep["edgetpu"]["check"]["cpu_ops"]
        err.print("Edge TPU: compatible" + (f" (on the CPU after it: {', '.join(cpu)})" if cpu else "")
                  + (f"; compiled to {compiled['model']}" if compiled else ""))
    err.print(f"wrote {result.path}\nreport {result.report_path}")


@app.command()
def info(
    model: Annotated[str | None, typer.Argument(help="A .tflite model (default: the one run and classify use).")]
    = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a model's embedded metadata, tensors, ops and sizes (and, without MODEL, which model is in use)."""
    import json

    from edgesqz.console import human_size, out
    from edgesqz.device.models import ORIGINS, choose_model
    from edgesqz.modelinfo import describe

    choice = choose_model(model)
    d = describe(str(choice.path))
    d["origin"] = choice.origin
    if json_out:
        typer.echo(json.dumps(d, indent=2))
        return
    if choice.origin != "option":
        out.print(f"model in use: {choice.path} ({ORIGINS[choice.origin]})")
    meta = d["info"]
    out.print(f"[bold]{d['model']}[/]  {human_size(d['size_bytes'])}  {d['name'] or '(no name)'}")
    if meta:
        def get(key: str) -> object:  # "a.b.c" of the metadata, None where absent (any model may lack any key)
            value: object = meta
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            return value

        def num(key: str, fmt: str = ".2f") -> str:
            value = get(key)
            return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"

        out.print(f"  architecture {get('architecture')}, format {get('format')}, "
                  f"input {get('input.size')} px {get('input.color_order')}, output {get('output.kind')}")
        out.print(f"  preprocessing: {get('preprocessing.resize')}, crop {num('preprocessing.crop_fraction', '.3f')}, "
                  f"{get('preprocessing.interpolation')}, mean/std inside the model")
        out.print(f"  weights: {get('source_weights.source')} sha256 {str(get('source_weights.sha256'))[:16]}...")
        if get("calibration"):
            out.print(f"  calibration: {get('calibration.count')} {get('calibration.kind')} images from "
                      f"{get('calibration.source')} ({get('calibration.skipped')} skipped)")
        if get("accuracy"):
            ci = get("accuracy.top1_agreement_ci95")
            out.print(f"  accuracy on {get('accuracy.images')} images: float top-1 {num('accuracy.reference.top1')}, "
                      f"model top-1 {num('accuracy.model.top1')} / top-5 {num('accuracy.model.top5')}, "
                      f"agreement {num('accuracy.top1_agreement')} %"
                      + (f" (95 % interval {_span(ci, ' %')})" if isinstance(ci, list) and len(ci) == 2 else ""))
    else:
        out.print("  no edgesqz metadata")
    if d["labels"]:
        out.print(f"  labels: {d['labels']['count']} ({', '.join(d['labels']['first'])}, ...)")
    for kind in ("inputs", "outputs"):
        for t in d[kind]:
            q = t["quantization"]
            qs = f" scale {q['scale']:.6g} zero {q['zero_point']}" if q else ""
            out.print(f"  {kind[:-1]} {t['name']}: {t['dtype']} {t['shape']}{qs}")
    g = d["graph"]
    out.print(f"  ops: {', '.join(f'{k} {v}' for k, v in sorted(g['ops'].items()))}")
    out.print(f"  tensor types: {', '.join(f'{k} {v}' for k, v in sorted(g['tensor_types'].items()))}")
    w = d.get("weights") or {}
    if w.get("layers"):
        bits = ", ".join(f"{r['layer']} {r['bits']}" for r in w["layers"])
        out.print(f"  convolution weights ({human_size(w['kernel_bytes'])}): "
                  + ", ".join(f"{n} x {b}-bit" for b, n in sorted(w["convolutions"].items(), key=lambda kv: int(kv[0])))
                  + f"; bits per layer: {bits}")
    x = d["runtime"]["xnnpack"]
    out.print(f"  runtime: {d['runtime']['backend']} {d['runtime']['version']}; XNNPACK "
              f"{x['delegated_ops']}/{x['total_ops']} ops"
              + (" (4-bit weights widened to int8 in memory)" if w.get("int4_widened_for_runtime") else ""))


@app.command()
def train(
    data: Annotated[str, typer.Option("--data", help="Image folder with one sub-folder per class.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Best model (.keras).")] = "model.keras",
    val: Annotated[str | None, typer.Option("--val", help="Validation folder (default: split --data).")] = None,
    val_split: Annotated[float, typer.Option("--val-split", help="Share of each class held out.")] = 0.2,
    arch: Annotated[str, typer.Option("--arch", "--version", help="1_0 or 1_1 (torchvision's SqueezeNet) or cifar "
                                      "(pytorch-cifar100's network for small images, trained from scratch with "
                                      "its recipe).")] = "1_1",
    init: Annotated[str | None, typer.Option("--from", help="'imagenet' (fine-tune torchvision's weights; default "
                                             "for 1_0/1_1) or 'none' (from scratch, batch-norm Fire modules).")]
    = None,
    weights: Annotated[str, typer.Option("--weights", help="The ImageNet weights for --from imagenet: "
                                         "'torchvision' or a .pth file.")] = "torchvision",
    epochs: Annotated[int, typer.Option("--epochs", help="At most this many epochs (early stopping).")] = 10,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Default 32; 128 for cifar.")] = None,
    input_size: Annotated[int | None, typer.Option("--input-size", help="Square training size in pixels "
                                                   "(default 224; 32 for cifar).")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (cosine decay).")] = None,
    patience: Annotated[int | None, typer.Option("--patience", help="Stop after this many epochs without a better "
                                                 "validation accuracy (default 3; off for cifar's step "
                                                 "schedule).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run that wrote OUTPUT.")] = False,
    weight_bits: Annotated[int | None, typer.Option("--weight-bits", help="4: quantisation-aware fine-tuning of the "
                                                    "last epochs on 4-bit weights (every convolution but the first), "
                                                    "for 'convert' to store as they are.")] = None,
    qat_epochs: Annotated[int | None, typer.Option("--qat-epochs", help="With --weight-bits 4: how many of the last "
                                                   "epochs train on 4-bit weights (default a quarter).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON at the end.")] = False,
) -> None:
    """Fine-tune SqueezeNet on your own images; then convert it with --weights OUTPUT.keras."""
    import json

    from edgesqz.console import err
    from edgesqz.train import TrainOptions
    from edgesqz.train import train as run_train

    opts = TrainOptions(data=data, output=output, val=val, val_split=val_split, arch=arch, init=init,
                        weights=weights, epochs=epochs, batch_size=batch_size, input_size=input_size,
                        learning_rate=learning_rate, patience=patience, force=force, resume=resume,
                        weight_bits=weight_bits, qat_epochs=qat_epochs)
    result = run_train(opts, verbose=0 if json_out else 1)
    if result.skipped:
        err.print(f"[yellow]warning:[/] skipped {result.skipped} unreadable images")
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    err.print(f"best validation accuracy {100 * result.best_val_accuracy:.2f} % after {result.epochs_run} epochs; "
              f"{result.images_per_second:.1f} training images/s; classes: {', '.join(result.classes)}")
    err.print(f"wrote {result.output}; next: edgesqz convert --weights {result.output} --int8 --calib {data}")


@app.command()
def doctor(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Check this device: runtime and XNNPACK, numpy, Coral, cameras, display, governor, temperature."""
    import json

    from edgesqz.doctor import as_dicts, run_checks
    from edgesqz.quiet import captured_output
    from edgesqz.schema import report

    with captured_output([]):  # the runtime's XNNPACK banner
        findings, can_run = run_checks()
    if json_out:
        typer.echo(json.dumps(report("doctor_report", can_run_models=can_run, checks=as_dicts(findings)), indent=2))
    else:
        marks = {"ok": "[green]ok  [/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]", "info": "[dim]info[/]"}
        from edgesqz.console import out

        for f in findings:
            out.print(f"{marks[f.status]} {f.check:<12} {f.detail}")
            if f.fix:
                out.print(f"     {'':<12} [dim]fix:[/] {f.fix}")
        out.print("this device can run edgesqz models" if can_run else "[red]this device cannot run models yet[/]")
    if not can_run:
        raise typer.Exit(1)


@app.command()
def compare(
    model_a: Annotated[str, typer.Argument(help="Reference .tflite model.")],
    model_b: Annotated[str, typer.Argument(help="Model to compare with it.")],
    data: Annotated[str, typer.Option("--data", help="Labelled folder (<wnid>_*.JPEG or sub-folder per class).")],
    labels: Annotated[str | None, typer.Option("--labels", help="Labels file (default: model A's).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Interpreter threads.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Compare two models on a labelled folder: accuracy, agreement, output difference, size, latency."""
    import json

    from edgesqz.console import human_size, out, progress_bars
    from edgesqz.evaluate import compare_models
    from edgesqz.quiet import captured_output

    with progress_bars(enabled=not json_out) as bars, captured_output([]):
        rep = compare_models(model_a, model_b, data, threads=threads, labels_path=labels, progress=bars)
    if json_out:
        typer.echo(json.dumps(rep, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"compare on {rep['images']} images of {rep['folder']}", title_justify="left")
    for col in ("", "model", "format", "size", "top-1", "top-5", "p50 ms", "p90 ms"):
        table.add_column(col)
    for key in ("a", "b"):
        m = rep[key]
        table.add_row(key.upper(), m["model"], str(m["format"]), human_size(m["size_bytes"]), f"{m['top1']:.2f}",
                      f"{m['top5']:.2f}", f"{m['latency']['p50_ms']:.2f}", f"{m['latency']['p90_ms']:.2f}")
    out.print(table)
    d = rep["output_difference"]
    out.print(f"top-1 agreement {rep['top1_agreement']:.2f} % "
              f"(95 % interval {_span(rep['top1_agreement_ci95'], ' %')}); "
              f"top-1 A - B {rep['top1_difference']:+.2f} points "
              f"({_span(rep['top1_difference_ci95'], ' points', signed=True)}); output difference max "
              f"{d['max_abs']:.4g} (mean {d['mean_abs']:.4g}); {len(rep['classes_changed'])} classes changed")


def _numbers(value: str | None, option: str) -> tuple[float, ...] | None:
    """``"0.5,0.4,0.3"`` -> a tuple of floats (None stays None); a clear error otherwise."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise EdgesqzError(f"{option} takes one number or three separated by commas (R,G,B), not {value!r}") from None


def _span(interval: list[float], unit: str, *, signed: bool = False) -> str:
    """``[lo, hi]`` as ``lo to hi unit`` (signed numbers for differences)."""
    fmt = "+.2f" if signed else ".2f"
    return f"{interval[0]:{fmt}} to {interval[1]:{fmt}}{unit}"


@app.command()
def bench(
    models: Annotated[list[str] | None, typer.Argument(help="Models to measure (default: the latest converted).")]
    = None,
    threads: Annotated[str, typer.Option("--threads", help="Thread counts to sweep, e.g. 1,2,4.")] = "1",
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed invokes per model first.")] = 10,
    runs: Annotated[int, typer.Option("--runs", help="Timed invokes per model.")] = 100,
    duration: Annotated[float | None, typer.Option("--duration", help="Run for S seconds instead of --runs.")] = None,
    delegate: Annotated[str | None, typer.Option("--delegate", help="edgetpu[:usb|:pci|:usb:N].")] = None,
    source: Annotated[str | None, typer.Option("--source", help="Also time the pipeline per stage on this video, "
                                               "image folder or stream.")] = None,
    camera: Annotated[str | None, typer.Option("--camera", help="Also time the pipeline on camera N.")] = None,
    frames: Annotated[int, typer.Option("--frames", help="Frames for the pipeline measurement.")] = 100,
    json_file: Annotated[str | None, typer.Option("--json", help="Write the report as JSON to FILE ('-': stdout).")]
    = None,
    csv_file: Annotated[str | None, typer.Option("--csv", help="Write one CSV row per model and thread count.")]
    = None,
    plot_file: Annotated[str | None, typer.Option("--plot", help="Draw the latency distributions to FILE.png "
                                                  "(needs matplotlib).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing --json/--csv/--plot files.")] = False,
) -> None:
    """Measure latency on this device: cold start, steady state, per-stage pipeline, with device facts."""
    import json

    from edgesqz.console import err, progress_bars
    from edgesqz.device import bench as b
    from edgesqz.device.cli import resolve_model
    from edgesqz.fileio import atomic_write, check_distinct, check_output

    thread_list = b.parse_threads(threads)
    if plot_file:
        b.require_matplotlib()
    paths = [str(m) for m in models] if models else [str(resolve_model(None))]
    to_stdout = json_file == "-"
    # Every output is checked before measuring anything: a bad folder must not cost the whole benchmark.
    inputs = [("model", m) for m in paths] + [("--source", source)]
    outputs = {name: check_output(value, force=force, what=name, option=name, inputs=inputs, create_parents=False)
               for name, value in (("--json", None if to_stdout else json_file), ("--csv", csv_file),
                                   ("--plot", plot_file)) if value is not None}
    check_distinct(outputs.items())
    settings = {"threads": thread_list, "warmup": warmup, "runs": None if duration else runs, "duration_s": duration,
                "delegate": delegate, "source": source or (f"camera {camera}" if camera is not None else None)}
    pipeline = []
    sources = []
    if source is not None or camera is not None:  # fail on a bad source before measuring anything
        from edgesqz.device.sources import open_source

        sources = [open_source(camera=camera, source=source) for _ in thread_list]
        sources[0].open()
    with progress_bars(enabled=not to_stdout) as bars:
        rows = b.bench_models(paths, threads=thread_list, warmup=warmup, runs=None if duration else runs,
                              duration=duration, delegate=delegate, progress=bars)
        if sources:
            for n, src in zip(thread_list, sources, strict=True):
                pipeline.append(b.bench_pipeline(paths[0], src, threads=n, frames=frames, delegate=delegate,
                                                 advance=bars(f"pipeline, {n} thread{'s' if n > 1 else ''}", frames)))
    rep = b.bench_report(rows, pipeline, settings, keep_samples=plot_file is None and json_file is not None)
    if to_stdout:
        typer.echo(json.dumps(rep, indent=2))
    else:
        _bench_table(rep, rows, pipeline)
    # The results are on screen first: a file that cannot be written (disk full) does not lose them.
    if "--plot" in outputs:
        b.plot(rows, outputs["--plot"], force=force)
        rep = b.bench_report(rows, pipeline, settings, keep_samples=False)
    if "--json" in outputs:
        atomic_write(outputs["--json"], json.dumps(rep, indent=2) + "\n", force=force)
    if "--csv" in outputs:
        b.write_csv(rows, outputs["--csv"], force=force)
    for name, path in outputs.items():
        err.print(f"wrote {path} ({name})")


def _bench_table(rep: dict, rows: list[dict], pipeline: list[dict]) -> None:
    from pathlib import Path

    from rich.table import Table

    from edgesqz.console import err, out

    dev = rep["device"]
    table = Table(title=f"edgesqz bench on {dev['board'] or dev['cpu']} ({dev['cores']} cores, governor "
                        f"{dev['governor'] or '?'}, {dev['temperature_c'] or '?'} C)", title_justify="left")
    for col in ("model", "MB", "thr", "delegate", "cold", "p50", "p90", "p99", "mean", "std", "FPS"):
        table.add_column(col, justify="left" if col in ("model", "delegate") else "right")
    for r in rows:
        lat, cov = r["latency"], r["coverage"]
        table.add_row(Path(r["model"]).name, f"{r['size_bytes'] / 1e6:.2f}", str(r["threads"]),
                      f"{r['delegate'] or 'XNNPACK'} {cov['delegated_ops']}/{cov['total_ops']}",
                      f"{r['cold']['create_ms'] + r['cold']['first_invoke_ms']:.0f}", f"{lat['p50_ms']:.2f}",
                      f"{lat['p90_ms']:.2f}", f"{lat['p99_ms']:.2f}", f"{lat['mean_ms']:.2f}", f"{lat['std_ms']:.2f}",
                      f"{lat['fps']:.1f}")
    out.print(table)
    out.print(f"ms; cold = interpreter creation + first invoke; {rows[0]['backend']} {rows[0]['backend_version']}, "
              f"Python {dev['python']}, numpy {dev['numpy']}")
    for p in pipeline:
        st = p["stages"]
        out.print(f"pipeline {p['source']}, {p['threads']} thread(s), p50 ms: " + ", ".join(
            f"{k} {v['p50_ms']:.2f}" for k, v in st.items()) + f"  ({st['end_to_end']['fps']:.1f} FPS sequential)")
    err.print(f"peak RSS {rep['peak_rss_mb']} MB")


config_app = typer.Typer(help="Site files (TOML) for `edgesqz run --config`: check one before deploying it.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="The site file (TOML).", readable=False)],
) -> None:
    """Check a site file without running it: keys, types, rectangles, cameras, the model and its labels."""
    from edgesqz.device.config import load_config
    from edgesqz.device.runner import check_site

    try:
        cfg = load_config(file)
        lines = check_site(cfg)
    except EdgesqzError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    for line in lines:
        typer.echo(line)
    typer.echo(f"{file}: ok")


edgetpu_app = typer.Typer(help="Coral Edge TPU: check a model's compatibility, compile it.", no_args_is_help=True)
app.add_typer(edgetpu_app, name="edgetpu")


@edgetpu_app.command("check")
def edgetpu_check(
    model: Annotated[str, typer.Argument(help="A .tflite model.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Say whether MODEL maps fully onto the Edge TPU (no compiler needed) and list every reason it cannot."""
    import json

    from edgesqz.edgetpu import check_model

    result = check_model(model)
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    elif result.compatible:
        typer.echo(f"{model}: compatible with the Edge TPU ({result.summary()})")
    else:
        typer.echo(f"{model}: NOT fully compatible with the Edge TPU:")
        for reason in result.reasons:
            typer.echo(f"  - {reason}")
    if not result.compatible:
        raise typer.Exit(1)


@edgetpu_app.command("compile")
def edgetpu_compile(
    model: Annotated[str, typer.Argument(help="A full-integer .tflite model.")],
    out_dir: Annotated[str | None, typer.Option("--out-dir", help="Where to write MODEL_edgetpu.tflite.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing MODEL_edgetpu.tflite / .log.")] = False,
) -> None:
    """Compile MODEL with edgetpu_compiler (x86_64 Linux) and show which ops mapped."""
    from edgesqz.edgetpu import compile_model

    compiled = compile_model(model, out_dir, force=force)
    for row in compiled.rows:
        typer.echo(f"{row['op']:<24} {row['count']:>4}  {row['status']}")
    cpu = ", ".join(f"{r['op']} x{r['count']}" for r in compiled.cpu_rows)
    typer.echo(f"wrote {compiled.output} ({'fully mapped' if compiled.fully_mapped else 'on the CPU: ' + cpu})")


def _say(message: str, colour: str | None = typer.colors.RED) -> None:
    """One line on stderr; nothing if stderr is gone too (a closed terminal)."""
    with contextlib.suppress(OSError):
        typer.secho(message, err=True, fg=colour)


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP (an SSH session dropping) unwind like Ctrl-C, so nothing is left half-written.

    ``run`` installs its own handlers while it runs (stop after the frame, summary, recording finalised).
    A SIGHUP that is ignored (``nohup``) stays ignored.
    """
    import signal

    from edgesqz.errors import Interrupted

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, handler)


def _usage_line(exc: Exception) -> str:
    """Typer's (click's) usage error as one line that says where to look: "<message>; see: edgesqz CMD --help"."""
    message = " ".join(exc.format_message().split()).rstrip(".")  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    return f"{message}; see: {ctx.command_path} --help" if ctx is not None else message


def _run_app() -> int:
    """Run the command; every way it can end becomes an exit code and at most one line on stderr."""
    import os
    import signal

    from edgesqz.errors import Interrupted
    from edgesqz.fileio import OutputError

    try:
        rv = app(standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except OutputError as exc:  # `| head` went away: nothing to say; a full disk under a redirection: say so
        if not exc.reader_gone:
            _say(f"error: {exc}")
        return exc.exit_code
    except EdgesqzError as exc:
        _say(f"error: {exc}")
        return exc.exit_code
    except Interrupted as exc:
        _say(f"interrupted by {signal.Signals(exc.signum).name}", None)
        return 128 + exc.signum
    except KeyboardInterrupt:
        _say("interrupted", None)
        return 130
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        _say(f"error: {exc.strerror or exc}{where}")
        return 2
    except MemoryError:
        _say("error: not enough memory for this; close other programs, or use fewer --threads, a smaller model or "
             "smaller images")
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        _say("Aborted!", None)
        return 1
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in ("typer", "click") and hasattr(exc, "format_message"):
            if exc.format_message().strip():  # type: ignore[attr-defined]  # empty: the help was shown
                _say(f"error: {_usage_line(exc)}")  # a missing argument, an unknown option, an unreadable path
            return int(getattr(exc, "exit_code", 2))
        if os.environ.get("EDGESQZ_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _say(f"error: internal error ({type(exc).__name__}: {first}); please report it, with the traceback that "
             "EDGESQZ_DEBUG=1 shows")
        return 70


def main() -> None:
    from edgesqz.fileio import GuardedStream

    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = GuardedStream(sys.stdout), GuardedStream(sys.stderr, drop_errors=True)  # type: ignore
    try:
        _stop_on_signals()
        code = _run_app()
        try:  # what is still buffered for stdout is written now, not in Python's exit handler
            sys.stdout.flush()
        except EdgesqzError as exc:
            if exc.exit_code:
                _say(f"error: {exc}")
                code = code or exc.exit_code
    finally:
        sys.stdout, sys.stderr = streams
    sys.exit(code)
