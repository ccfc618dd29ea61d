"""Size vs accuracy of 4-bit weights (int8 activations) on SqueezeNet 1.1 with the shared ImageNet weights.

Every row is a real ``edgesqz convert`` (the library call) of ``<shared>/weights``: int8 (all
weights 8-bit, ``--ptq best``), 4/8-bit mixes chosen by ``--max-size`` at several budgets, and
``--weight-bits 4`` (every convolution but the first 4-bit). Splits as in
``benchmarks/quant_ablation.py``: ``random.Random(seed).sample`` of the sorted shared photos gives
the calibration images (200), the other 800 evaluate. Each converted file runs in LiteRT the way the
device runs it (:func:`edgesqz.evaluate.tflite_outputs`: 4-bit weights widened to int8 in memory,
XNNPACK) and is compared with the float32 conversion of the same weights:

- top-1 of float and of the model, the drop (with a 95 % interval, paired over the images) and
  top-1 agreement with float (95 % normal interval);
- the file size in bytes (metadata included) and the convolution kernels' bytes.

Usage (from the repository root)::

    python benchmarks/weight_bits.py [--shared ../shared] [--seeds 0 1 2] [--budgets 1.2MB 1.0MB 0.9MB 0.8MB]

Writes ``benchmarks/results/weight_bits.json``. ~4 minutes per split on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

WEIGHTS = "weights/squeezenet1_1-torchvision-fp16r.pth"
LABELS = "data/labels/imagenet_class_index.json"
PHOTOS = "data/imagenet-sample-1000"


def size_arg(text: str) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edgesqz.cli import _byte_size

    return _byte_size(text, "--budgets")


def interval(p: float, n: int) -> list[float]:
    half = 1.96 * math.sqrt(max(p * (100 - p), 1e-9) / n)
    return [round(max(p - half, 0.0), 2), round(min(p + half, 100.0), 2)]


def compare(reference: np.ndarray, outputs: np.ndarray, targets: np.ndarray) -> dict[str, object]:
    ref, got = reference.argmax(1), outputs.argmax(1)
    n = len(targets)
    agree = 100 * float(np.mean(ref == got))
    diff = (got == targets).astype(float) - (ref == targets).astype(float)
    drop = -100 * float(diff.mean())
    half = 196 * float(diff.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return {"images": n, "float_top1": round(100 * float(np.mean(ref == targets)), 2),
            "top1": round(100 * float(np.mean(got == targets)), 2), "top1_drop": round(drop, 2),
            "top1_drop_ci95": [round(drop - half, 2), round(drop + half, 2)],
            "agreement": round(agree, 2), "agreement_ci95": interval(agree, n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--calib-count", type=int, default=200)
    parser.add_argument("--budgets", nargs="+", default=["1.2MB", "1.0MB", "0.9MB", "0.8MB"])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/weight_bits.json"))
    args = parser.parse_args()

    from edgesqz.converters.convert import ConvertOptions, convert
    from edgesqz.datasets import labelled_files
    from edgesqz.evaluate import tflite_outputs
    from edgesqz.imaging import preprocess, read_image
    from edgesqz.labels import load_labels
    from edgesqz.quiet import captured_output

    labels = load_labels(args.shared / LABELS)
    labelled = labelled_files(args.shared / PHOTOS, labels)
    pairs = sorted(zip(labelled.files, labelled.targets, strict=True))
    files = [f for f, _ in pairs]
    variants: list[tuple[str, dict[str, object]]] = [("int8 (all 8-bit)", {})]
    variants += [(f"--max-size {b}", {"max_size": size_arg(b)}) for b in args.budgets]
    variants += [("--weight-bits 4", {"weight_bits": 4})]
    rows: list[dict[str, object]] = []
    for seed in args.seeds:
        chosen = set(random.Random(seed).sample(files, args.calib_count))
        rest = [(f, t) for f, t in pairs if f not in chosen]
        images = np.stack([preprocess(read_image(f)) for f, _ in rest])
        targets = np.array([t for _, t in rest])
        with tempfile.TemporaryDirectory(prefix="edgesqz-wbits-") as tmp:
            calib = Path(tmp) / "calib"
            calib.mkdir()
            for f in chosen:
                (calib / f.name).symlink_to(f.resolve())
            common = {"weights": str(args.shared / WEIGHTS), "labels": str(args.shared / LABELS), "force": True}
            ref_path = Path(tmp) / "float.tflite"
            convert(ConvertOptions(fmt="float32", head="logits", output=str(ref_path), **common))  # type: ignore[arg-type]
            with captured_output([]):
                reference = tflite_outputs(ref_path.read_bytes(), images)
            for name, extra in variants:
                out = Path(tmp) / "m.tflite"
                t0 = time.perf_counter()
                try:
                    result = convert(ConvertOptions(fmt="int8", calib=str(calib), calib_count=args.calib_count,
                                                    output=str(out), **common, **extra))  # type: ignore[arg-type]
                except Exception as exc:  # an unreachable budget is a result too
                    print(f"seed {seed} {name}: {exc}", flush=True)
                    rows.append({"seed": seed, "variant": name, "error": str(exc)})
                    continue
                seconds = time.perf_counter() - t0
                with captured_output([]):
                    outputs = tflite_outputs(out.read_bytes(), images)
                w = result.report.get("weights") or {}
                row = {"seed": seed, "variant": name, "size_bytes": result.report["size_bytes"],
                       "kernel_bytes": w.get("weight_bytes"), "layers_4bit": w.get("layers_4bit", 0),
                       "convert_seconds": round(seconds, 1), **compare(reference, outputs, targets)}
                rows.append(row)
                args.output.parent.mkdir(parents=True, exist_ok=True)  # after every row: a stopped run keeps them
                args.output.write_text(json.dumps({"calib_count": args.calib_count, "seeds": args.seeds, "rows": rows,
                                                   "partial": True}, indent=2) + "\n")
                print(f"seed {seed} {name:22s} {row['size_bytes']:>9,} B  4-bit layers {row['layers_4bit']:2d}  "
                      f"top-1 {row['top1']:6.2f} (float {row['float_top1']:.2f}, drop {row['top1_drop']:+.2f} "
                      f"{row['top1_drop_ci95']})  agreement {row['agreement']:6.2f} {row['agreement_ci95']}",
                      flush=True)
    summary = []
    for name, _ in variants:
        got = [r for r in rows if r["variant"] == name and "error" not in r]
        if not got:
            continue
        agree = [float(r["agreement"]) for r in got]  # type: ignore[arg-type]
        drop = [float(r["top1_drop"]) for r in got]  # type: ignore[arg-type]
        summary.append({"variant": name, "splits": len(got), "size_bytes": [r["size_bytes"] for r in got],
                        "agreement_mean": round(float(np.mean(agree)), 2),
                        "agreement_min_max": [min(agree), max(agree)],
                        "top1_drop_mean": round(float(np.mean(drop)), 2), "top1_drop_min_max": [min(drop), max(drop)]})
        print(f"{name:22s} splits {len(got)}  agreement mean {summary[-1]['agreement_mean']:.2f} "
              f"(min {min(agree):.2f}, max {max(agree):.2f})  drop mean {summary[-1]['top1_drop_mean']:+.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                       "calib_count": args.calib_count, "seeds": args.seeds,
                                       "rows": rows, "summary": summary}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
