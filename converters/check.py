"""Accuracy of a float reference and an exported model on a labelled folder.

Reports top-1/top-5 of both, their top-1 agreement, the top-1 drop in points, and the classes
whose number of correct images changed. Ties in an output (several classes with the same
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
                   progress: Progress | None = None) -> np.ndarray:
    """Float outputs (logits, or class maps averaged to logits) of a TFLite model on uint8 RGB images."""
    interpreter, _ = make_interpreter(model, threads=threads)
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


def compare(reference: np.ndarray, model: np.ndarray, targets: np.ndarray,
            label_names: Sequence[str]) -> dict[str, Any]:
    """The accuracy block of a report: both models, agreement, drop and per-class changes."""
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
    return {
        "images": len(targets),
        "reference": ref_acc.to_dict(),
        "model": mod_acc.to_dict(),
        "top1_drop": round(ref_acc.top1 - mod_acc.top1, 3),
        "top1_agreement": round(100.0 * float((reference.argmax(1) == model.argmax(1)).mean()), 3),
        "tied_top_outputs": round(tied_top(model), 3),
        "classes_changed": changes,
    }
