"""Ablation of the int8 quantisation improvements in ``edgesqz.converters.quantize`` (SqueezeNet 1.1).

Splits ``<shared>/data/imagenet-sample-1000`` reproducibly: the sorted labelled files,
``random.Random(seed).sample(files, calib_count)`` for calibration (and for every data-driven
transform), the rest for evaluation only. Every variant is converted, run with the TFLite
interpreter on the evaluation images and compared with the float Keras model:

- top-1 of float and of the converted model, the drop, and top-1 agreement with float
  (argmax = first index on ties; ``agree~`` breaks ties at random, mean of 20 draws);
- ``ties``: images whose output has more than one maximal value;
- size of the .tflite file in bytes.

Usage (from the repository root)::

    python benchmarks/quant_ablation.py [--shared ../shared] [--calib-count 200] [--seed 0] [--only-best]

Takes ~15 minutes on 2 cores (the GPTQ rows take ~2 minutes each); ``--only-best`` (float32 and
``--ptq best`` only) about 2 minutes, for measuring many splits.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

WEIGHTS = "weights/squeezenet1_1-torchvision-fp16r.pth"


@dataclass
class Split:
    calib: np.ndarray  # (N, 224, 224, 3) uint8
    images: np.ndarray  # evaluation images
    targets: np.ndarray  # evaluation class indices


def load_split(shared: Path, calib_count: int, seed: int) -> Split:
    from edgesqz.datasets import labelled_files
    from edgesqz.imaging import preprocess, read_image
    from edgesqz.labels import load_labels

    labels = load_labels(shared / "data/labels/imagenet_class_index.json")
    labelled = labelled_files(shared / "data/imagenet-sample-1000", labels)
    pairs = sorted(zip(labelled.files, labelled.targets, strict=True))
    files = [f for f, _ in pairs]
    chosen = set(random.Random(seed).sample(files, calib_count))

    def load(paths: list[Path]) -> np.ndarray:
        return np.stack([preprocess(read_image(p)) for p in paths])

    rest = [(f, t) for f, t in pairs if f not in chosen]
    return Split(load([f for f in files if f in chosen]), load([f for f, _ in rest]), np.array([t for _, t in rest]))


def run_tflite(model_bytes: bytes, images: np.ndarray) -> np.ndarray:
    """Logits of a .tflite pixel model (float or int8 input; logits or class-map output)."""
    from ai_edge_litert.interpreter import Interpreter

    from edgesqz.converters.quantize import pool_class_map

    interpreter = Interpreter(model_content=model_bytes, num_threads=2)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    scale, zero = out["quantization"]
    logits = []
    for image in images:
        if inp["dtype"] == np.int8:
            x = (image.astype(np.int16) - 128).astype(np.int8)
        elif inp["dtype"] == np.uint8:
            x = image
        else:
            x = image.astype(np.float32)
        interpreter.set_tensor(inp["index"], x[None])
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])[0]
        if y.ndim == 3:
            logits.append(pool_class_map(y, scale or 1.0, zero))
        elif np.issubdtype(y.dtype, np.integer):
            logits.append((y.astype(np.float32) - zero) * scale)
        else:
            logits.append(y.astype(np.float32))
    return np.stack(logits)


def metrics(reference: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    rng = np.random.default_rng(0)
    ref = reference.argmax(1)
    is_max = logits == logits.max(1, keepdims=True)
    random_pick = [np.where(is_max, rng.random(logits.shape), -1.0).argmax(1) for _ in range(20)]
    return {
        "float": 100 * float(np.mean(ref == targets)),
        "top1": 100 * float(np.mean(logits.argmax(1) == targets)),
        "agree": 100 * float(np.mean(logits.argmax(1) == ref)),
        "agree_random": 100 * float(np.mean([np.mean(p == ref) for p in random_pick])),
        "ties": 100 * float(np.mean(is_max.sum(1) > 1)),
    }


HEADER = (f"{'variant':44s} {'float':>6s} {'top-1':>6s} {'drop':>6s} {'agree':>6s} {'agree~':>6s} "
          f"{'ties%':>6s} {'bytes':>9s}")


def row(name: str, m: dict[str, float], size: int) -> str:
    drop = m["float"] - m["top1"]
    return (f"{name:44s} {m['float']:6.2f} {m['top1']:6.2f} {drop:+6.2f} {m['agree']:6.2f} "
            f"{m['agree_random']:6.2f} {m['ties']:6.2f} {size:9d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"), help="shared data folder")
    parser.add_argument("--calib-count", type=int, default=200, help="calibration images (the rest evaluate)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    parser.add_argument("--only-best", action="store_true",
                        help="only the float32 and the --ptq best rows (quick; for measuring more splits)")
    parser.add_argument("--weights", type=Path, default=None,
                        help=f"torchvision state_dict (default <shared>/{WEIGHTS})")
    args = parser.parse_args()

    import keras

    from edgesqz.converters import quantize as q
    from edgesqz.converters.export import pixel_model, representative_dataset, to_tflite
    from edgesqz.squeezenet import SqueezeNet

    split = load_split(args.shared, args.calib_count, args.seed)
    calib = split.calib
    print(f"calibration {len(calib)} images, evaluation {len(split.images)} images (seed {args.seed})", flush=True)
    base = SqueezeNet("1_1", weights=str(args.weights or args.shared / WEIGHTS), classifier_activation=None)
    pm = pixel_model(base, size=224, normalization="fold")
    reference = pm.predict(split.images.astype(np.float32), batch_size=32, verbose=0)

    rows: list[str] = []

    def evaluate(name: str, model: keras.Model, fmt: str = "int8", images: np.ndarray = calib) -> None:
        start = time.time()
        rep = representative_dataset(images) if fmt == "int8" else None
        with contextlib.redirect_stdout(io.StringIO()):  # the converter's "Saved artifact ..." listing
            model_bytes = to_tflite(model, fmt, representative=rep)  # type: ignore[arg-type]
        line = row(name, metrics(reference, run_tflite(model_bytes, split.images), split.targets), len(model_bytes))
        rows.append(line)
        print(f"{line}   ({time.time() - start:.0f} s)", flush=True)

    @cache
    def eq_act() -> keras.Model:
        return q.equalize(pm, method="activations", calib_images=calib)

    @cache
    def eq_w() -> keras.Model:
        return q.equalize(pm, method="weights")

    @cache
    def eq_gptq() -> keras.Model:
        return q.round_weights(eq_act(), calib)

    if args.only_best:
        print(HEADER, flush=True)
        evaluate("float32", pm, "float32")
        evaluate("int8, --ptq best", q.prepare_int8(pm, calib))
        return
    for name, model in (("equalize(weights)", eq_w()), ("equalize(activations, alpha=1)", eq_act())):
        print(f"check: {name} changes the float logits by at most "
              f"{q.max_abs_difference(pm, model, split.images[:64]):.1e}", flush=True)
    print(HEADER, flush=True)
    evaluate("float32", pm, "float32")
    evaluate("float16", pm, "float16")
    evaluate("dynamic (int8 weights, float act.)", pm, "dynamic")
    evaluate("int8 baseline", pm)
    evaluate("int8 + class map", q.class_map_model(pm))
    evaluate("int8 + bias corr.", q.bias_correct(pm, calib))
    evaluate("int8 + class map + bias corr.", q.bias_correct(q.class_map_model(pm), calib))
    evaluate("int8 + class map + CLE(weights)", q.class_map_model(eq_w()))
    evaluate("int8 + class map + equalize(act.)", q.class_map_model(eq_act()))
    evaluate("int8 + class map + GPTQ", q.class_map_model(q.round_weights(pm, calib)))
    evaluate("int8 + equalize(act.) + GPTQ (logits)", eq_gptq())
    evaluate("int8 + class map + eq(act.) + GPTQ, no clipping",
             q.class_map_model(q.round_weights(eq_act(), calib, clip_ratios=(1.0,))))
    evaluate("int8 + class map + eq(act.) + GPTQ act order",
             q.class_map_model(q.round_weights(eq_act(), calib, act_order=True)))
    evaluate("int8 + class map + equalize(act.) + GPTQ", q.class_map_model(eq_gptq()))
    evaluate("int8 + class map + eq(act.) + GPTQ + bias c.", q.bias_correct(q.class_map_model(eq_gptq()), calib))
    for count in (50, 100):
        if count < len(calib):
            subset = calib[np.random.default_rng(args.seed).permutation(len(calib))[:count]]
            evaluate(f"int8 + class map + eq(act.) + GPTQ, {count} calib",
                     q.prepare_int8(pm, subset), images=subset)
    print("\n" + HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
