"""Accuracy of a float reference and an exported model on a labelled folder.

Reports top-1/top-5 of both, their top-1 agreement and the top-1 drop in points, each with a 95 %
interval (on a few hundred images a single image is worth several tenths of a point, so the
interval shows which differences the folder can resolve), and the classes whose number of
correct images changed. Ties in an output (several classes with the same
quantised score) are broken towards the lower class index, as ``numpy.argmax`` does, and the
number of tied outputs is reported so the effect is visible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgesqz.device.runtime import make_interpreter

Progress = Callable[[int], None]


def tflite_outputs(model: bytes, images: np.ndarray, *, threads: int | None = None,
                   progress: Progress | None = None, src: str | None = None) -> np.ndarray:
    """Float outputs (logits, or class maps averaged to logits) of a TFLite model on uint8 RGB images."""
    interpreter, _ = make_interpreter(model, threads=threads, src=src)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    results = []
    for image in images:
        x = image[None]
        if inp["dtype"] == np.float32:
            x = x.astype(np.float32)
        elif in_scale:
            x = np.clip(np.round(x / in_scale + in_zero), *_limits(inp["dtype"])).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])[0]
        y = (y.astype(np.float32) - out_zero) * out_scale if out_scale else y.astype(np.float32)
        if y.ndim == 3:  # class map H x W x C
            y = y.mean(axis=(0, 1))
        results.append(y)
        if progress:
            progress(1)
    return np.stack(results)


def _limits(dtype: Any) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


@dataclass
class Accuracy:
    top1: float
    top5: float

    def to_dict(self) -> dict[str, float]:
        return {"top1": round(self.top1, 3), "top5": round(self.top5, 3)}


def accuracy(outputs: np.ndarray, targets: np.ndarray) -> Accuracy:
    top1 = outputs.argmax(1) == targets
    top5_idx = np.argsort(-outputs, axis=1, kind="stable")[:, :5]
    top5 = (top5_idx == targets[:, None]).any(1)
    return Accuracy(100.0 * top1.mean(), 100.0 * top5.mean())


def tied_top(outputs: np.ndarray) -> float:
    """Percent of outputs whose highest value is shared by more than one class."""
    top = outputs.max(1, keepdims=True)
    return 100.0 * float(((outputs == top).sum(1) > 1).mean())


Z95 = 1.959964  # two-sided 95 % normal quantile


def agreement_interval(agree: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of an agreement rate of ``agree`` out of ``n`` images, in percent."""
    if n <= 0:
        return 0.0, 100.0
    p = agree / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * max(0.0, float(centre - half)), 100.0 * min(1.0, float(centre + half))


def drop_interval(reference_ok: np.ndarray, model_ok: np.ndarray, z: float = Z95) -> tuple[float, float]:
    """95 % interval of the top-1 drop in points, for two models scored on the same images.

    Paired: only the discordant images count (``b``: only the reference right, ``c``: only the
    model right; drop = (b - c) / n). Agresti & Min (2005): add 1/2 to each of the four cells, then
    a Wald interval, which stays sensible when b and c are small.
    """
    n = len(reference_ok)
    b = float(np.sum(reference_ok & ~model_ok)) + 0.5
    c = float(np.sum(~reference_ok & model_ok)) + 0.5
    m = n + 2.0
    diff = (b - c) / m
    half = z * float(np.sqrt(max(0.0, (b + c) - (b - c) ** 2 / m))) / m
    return 100.0 * (diff - half), 100.0 * (diff + half)


def compare(reference: np.ndarray, model: np.ndarray, targets: np.ndarray,
            label_names: Sequence[str]) -> dict[str, Any]:
    """The accuracy block of a report: both models, agreement, drop (each with its 95 % interval)
    and per-class changes."""
    ref_acc = accuracy(reference, targets)
    mod_acc = accuracy(model, targets)
    ref_ok = reference.argmax(1) == targets
    mod_ok = model.argmax(1) == targets
    changes = []
    for cls in np.unique(targets):
        sel = targets == cls
        a, b = int(ref_ok[sel].sum()), int(mod_ok[sel].sum())
        if a != b:
            changes.append({"index": int(cls), "label": label_names[int(cls)], "images": int(sel.sum()),
                            "reference_correct": a, "model_correct": b})
    same = int((reference.argmax(1) == model.argmax(1)).sum())
    return {
        "images": len(targets),
        "reference": ref_acc.to_dict(),
        "model": mod_acc.to_dict(),
        "top1_drop": round(ref_acc.top1 - mod_acc.top1, 3),
        "top1_drop_ci95": [round(v, 3) for v in drop_interval(ref_ok, mod_ok)],
        "top1_agreement": round(100.0 * same / max(1, len(targets)), 3),
        "top1_agreement_ci95": [round(v, 3) for v in agreement_interval(same, len(targets))],
        "tied_top_outputs": round(tied_top(model), 3),
        "classes_changed": changes,
    }


def latency_ms(model: bytes, *, threads: int | None = None, runs: int = 50, warmup: int = 5,
               src: str | None = None) -> dict[str, float]:
    """Steady-state invoke latency (p50/p90, ms) on a zero input."""
    import time

    interpreter, _ = make_interpreter(model, threads=threads, src=src)
    inp = interpreter.get_input_details()[0]
    interpreter.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p90_ms": round(float(np.percentile(times, 90)), 3)}


def compare_models(model_a: str, model_b: str, folder: str, *, threads: int | None = None,
                   labels_path: str | None = None, progress: Callable[[str, int], Progress] | None = None
                   ) -> dict[str, Any]:
    """The ``compare_report`` of two TFLite models on a labelled folder (model A is the reference)."""
    from pathlib import Path

    from edgesqz.datasets import labelled_files, load_images
    from edgesqz.device.classifier import check_classifier_io
    from edgesqz.device.runtime import check_model_file
    from edgesqz.errors import EdgesqzError
    from edgesqz.imaging import Preprocessing
    from edgesqz.labels import Labels, load_labels
    from edgesqz.schema import report
    from edgesqz.tflite_metadata import read_metadata

    paths = {"a": model_a, "b": model_b}
    data = {name: check_model_file(path) for name, path in paths.items()}
    metas = {name: read_metadata(blob, src=f"model {paths[name]}") for name, blob in data.items()}
    sizes, classes = {}, {}
    for name, blob in data.items():  # both must be image classifiers of the same input size and classes
        interpreter, _ = make_interpreter(blob, threads=1, src=f"model {paths[name]}")
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
        classes[name] = check_classifier_io(f"model {paths[name]}", inputs, outputs)
        sizes[name] = int(inputs[0]["shape"][1])
    if sizes["a"] != sizes["b"]:
        raise EdgesqzError(f"the models take different input sizes ({model_a}: {sizes['a']}x{sizes['a']}, {model_b}: "
                           f"{sizes['b']}x{sizes['b']}); compare models converted for the same --input-size")
    if classes["a"] != classes["b"]:
        raise EdgesqzError(f"the models have different numbers of classes ({model_a}: {classes['a']}, {model_b}: "
                           f"{classes['b']}); compare models of the same task")
    if labels_path:
        labels = load_labels(labels_path)
    else:
        meta = metas["a"]
        if not meta.labels:
            raise EdgesqzError(f"{model_a} has no embedded labels; pass --labels FILE")
        ids = (meta.info.get("labels") or {}).get("ids")
        labels = Labels(tuple(meta.labels), tuple(ids) if ids and len(ids) == len(meta.labels) else None)
    if len(labels) != classes["a"]:
        origin = f"labels file {labels_path}" if labels_path else f"{model_a}'s embedded labels.txt"
        raise EdgesqzError(f"{origin} has {len(labels)} labels but the models output {classes['a']} classes; pass the "
                           "labels the models were converted with")
    crop = (metas["a"].info.get("preprocessing") or {}).get("crop_fraction")  # 1.0 for CIFAR models
    pre = Preprocessing(size=sizes["a"], crop_fraction=Preprocessing().crop_fraction if crop is None else float(crop))
    lf = labelled_files(folder, labels, option="--data")
    make = progress or (lambda _d, _t: (lambda _n: None))
    images = load_images(lf.files, pre, make("decode", len(lf.files)))
    ok = set(images.sources)
    targets = np.array([t for f, t in zip(lf.files, lf.targets, strict=True) if str(f) in ok])
    outs = {name: tflite_outputs(blob, images.images, threads=threads, src=f"model {paths[name]}",
                                 progress=make(f"model {name.upper()}", len(targets)))
            for name, blob in data.items()}
    if outs["a"].shape != outs["b"].shape:
        raise EdgesqzError(f"the models' outputs differ in shape: {outs['a'].shape[1:]} vs {outs['b'].shape[1:]}")
    block = compare(outs["a"], outs["b"], targets, labels.names)
    diff = np.abs(outs["a"] - outs["b"])
    models = {}
    for name, path in (("a", model_a), ("b", model_b)):
        models[name] = {"model": str(Path(path)), "size_bytes": len(data[name]),
                        "format": metas[name].info.get("format"), **accuracy(outs[name], targets).to_dict(),
                        "latency": latency_ms(data[name], threads=threads, src=f"model {path}")}
    return report("compare_report", folder=str(folder), images=len(targets), a=models["a"], b=models["b"],
                  top1_agreement=block["top1_agreement"], top1_agreement_ci95=block["top1_agreement_ci95"],
                  top1_difference=round(models["a"]["top1"] - models["b"]["top1"], 3),
                  top1_difference_ci95=block["top1_drop_ci95"],
                  output_difference={"max_abs": round(float(diff.max()), 6), "mean_abs": round(float(diff.mean()), 6),
                                     "relative_to_range": round(float(diff.max() / max(np.ptp(outs["a"]), 1e-9)), 6)},
                  classes_changed=block["classes_changed"], skipped_unreadable=len(images.skipped))
