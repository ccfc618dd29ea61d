"""SqueezeNet 1.1 across runtimes on this host: latency (batch 1, 224x224) and top-1, one run.

Runtimes, all with the same weights and (for the int8 ones) the same calibration images:
PyTorch eager fp32, ONNX Runtime fp32, ONNX Runtime int8 (static QDQ, per-channel), Keras/TF fp32,
TFLite fp32 and edgesqz's full-int8 TFLite (LiteRT + XNNPACK).

Every model takes the same RGB pixels, with the normalisation inside. Latency: for each thread
count a fresh worker process (TensorFlow fixes its thread pools at start-up) builds every runtime,
warms them up, then times them interleaved — one invoke of each in turn, A B C D E F A B ... — so
drift cannot favour one. Top-1 is measured on labelled images that were NOT used for calibration.

    python benchmarks/peer_comparison.py --shared ../shared --out benchmarks/results

writes ``peer_comparison.json`` and ``peer_comparison.md`` (the table the README quotes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RUNTIMES = ("pytorch_fp32", "onnxruntime_fp32", "onnxruntime_int8", "keras_tf_fp32", "tflite_fp32", "edgesqz_int8")
LABELS = {"pytorch_fp32": "PyTorch eager fp32", "onnxruntime_fp32": "ONNX Runtime fp32",
          "onnxruntime_int8": "ONNX Runtime int8 (static QDQ, per-channel)", "keras_tf_fp32": "Keras/TF fp32",
          "tflite_fp32": "TFLite fp32 (XNNPACK)", "edgesqz_int8": "edgesqz int8 (LiteRT + XNNPACK)"}


# --- building the models (parent process) -------------------------------------------------------

def build(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from edgesqz.converters.convert import ConvertOptions, convert
    from edgesqz.converters.torch_import import load_state_dict
    from edgesqz.datasets import labelled_files, load_images, sample_files
    from edgesqz.imaging import Preprocessing, list_images
    from edgesqz.labels import load_labels

    shared = Path(args.shared)
    folder = shared / "data" / "imagenet-sample-1000"
    weights = Path(args.weights or shared / "weights" / "squeezenet1_1-torchvision-fp16r.pth")
    labels = load_labels(shared / "data" / "labels" / "imagenet_class_index.json")
    files = list_images(folder)
    calib = sample_files(files, args.calib_count, args.seed)
    calib_dir = work / "calib"
    calib_dir.mkdir()
    for f in calib:
        (calib_dir / f.name).symlink_to(f.resolve())
    lf = labelled_files(folder, labels)
    chosen = set(calib)
    evaluation = [(str(f), t) for f, t in zip(lf.files, lf.targets, strict=True) if f not in chosen]
    pre = Preprocessing()
    np.save(work / "calib.npy", load_images(calib, pre).images)
    eval_set = load_images([Path(f) for f, _ in evaluation], pre)
    np.save(work / "eval.npy", eval_set.images)
    np.save(work / "eval_y.npy", np.array([t for f, t in evaluation if f in set(eval_set.sources)]))

    labels_file = str(shared / "data" / "labels" / "imagenet_class_index.json")
    for fmt in ("int8", "float32"):
        convert(ConvertOptions(weights=str(weights), fmt=fmt, calib=str(calib_dir) if fmt == "int8" else None,
                               calib_count=args.calib_count, labels=labels_file,
                               output=str(work / f"sq_{fmt}.tflite"), force=True))

    import torch

    from edgesqz.converters.torch_model import pixel_squeezenet

    model = pixel_squeezenet(load_state_dict(weights), version="1_1").eval()
    torch.save(model, work / "torch_model.pt")
    x = torch.zeros(1, 3, 224, 224)
    torch.onnx.export(model, x, str(work / "fp32.onnx"), input_names=["image"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    _quantize_onnx(work / "fp32.onnx", work / "int8.onnx", np.load(work / "calib.npy"))
    return {"weights": str(weights), "calibration_images": len(calib), "evaluation_images": len(eval_set.sources)}


def _quantize_onnx(src: Path, dst: Path, calib: np.ndarray) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self.items, None)
            return None if image is None else {"image": image.transpose(2, 0, 1)[None].astype(np.float32)}

    pre = dst.with_name("pre.onnx")
    quant_pre_process(str(src), str(pre))
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


# --- measuring (worker process, one per thread count) -------------------------------------------

def _runners(work: Path, threads: int) -> dict[str, Any]:
    """name -> callable(uint8 RGB HxWx3) -> logits [1000]."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import onnxruntime as ort
    import tensorflow as tf
    import torch

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    torch.set_num_threads(threads)

    from edgesqz.converters.export import pixel_model
    from edgesqz.device.runtime import make_interpreter
    from edgesqz.squeezenet import SqueezeNet

    run: dict[str, Any] = {}
    tmodel = torch.load(work / "torch_model.pt", weights_only=False).eval()

    def pytorch(img: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return tmodel(torch.from_numpy(img.transpose(2, 0, 1)[None].astype(np.float32))).numpy()[0]

    run["pytorch_fp32"] = pytorch
    for name, file in (("onnxruntime_fp32", "fp32.onnx"), ("onnxruntime_int8", "int8.onnx")):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(work / file), opts, providers=["CPUExecutionProvider"])
        run[name] = (lambda s: lambda img: s.run(None, {"image": img.transpose(2, 0, 1)[None].astype(
            np.float32)})[0][0])(session)

    weights = json.loads((work / "meta.json").read_text())["weights"]
    keras_model = pixel_model(SqueezeNet("1_1", weights=weights, classifier_activation=None), size=224)
    keras_fn = tf.function(lambda x: keras_model(x, training=False))

    def keras_tf(img: np.ndarray) -> np.ndarray:
        return keras_fn(tf.constant(img[None].astype(np.float32))).numpy()[0]

    run["keras_tf_fp32"] = keras_tf
    for name, file in (("tflite_fp32", "sq_float32.tflite"), ("edgesqz_int8", "sq_int8.tflite")):
        interp, _ = make_interpreter(work / file, threads=threads)
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]

        def tflite(img: np.ndarray, interp: Any = interp, inp: Any = inp, out: Any = out) -> np.ndarray:
            # edgesqz 0.x's int8 input is pixel - 128; the standard contract: uint8 (int8 models) or float32 pixels
            x = (img ^ 0x80).view(np.int8) if inp["dtype"] == np.int8 else img.astype(inp["dtype"])
            interp.set_tensor(inp["index"], x[None])
            interp.invoke()
            y = interp.get_tensor(out["index"])[0]
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale if scale else y
            return y.mean(axis=(0, 1)) if y.ndim == 3 else y  # edgesqz 0.x's int8 model: the class map

        run[name] = tflite
    return run


def worker(work: Path, threads: int, runs: int, warmup: int, accuracy: bool) -> dict[str, Any]:
    run = _runners(work, threads)
    images = np.load(work / "eval.npy")
    probe = images[0]
    for _ in range(warmup):
        for fn in run.values():
            fn(probe)
    times: dict[str, list[float]] = {k: [] for k in run}
    for i in range(runs):
        img = images[i % len(images)]
        for name, fn in run.items():
            t0 = time.perf_counter()
            fn(img)
            times[name].append((time.perf_counter() - t0) * 1e3)
    result: dict[str, Any] = {name: {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90))}
                              for name, t in times.items()}
    if accuracy:
        y = np.load(work / "eval_y.npy")
        for name, fn in run.items():
            preds = np.array([int(np.argmax(fn(img))) for img in images])
            result[name]["top1"] = float((preds == y).mean() * 100)
            result[name]["preds"] = preds.tolist()
    return result


# --- report -------------------------------------------------------------------------------------

def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = sorted(set(Path("/proc/cpuinfo").read_text().split()) & {"avx512_vnni", "avx_vnni", "avx2"})
    return (f"{cpu}, {os.cpu_count()} cores, {platform.machine()}, CPU flags {' '.join(flags) or 'none'} "
            f"(int8 speed depends on VNNI), Python {platform.python_version()}")


def markdown(results: dict[int, dict[str, Any]], meta: dict[str, Any]) -> str:
    ref = results[1]["edgesqz_int8"]
    float_top1 = results[1]["keras_tf_fp32"]["top1"]
    lines = [
        f"Measured {meta['date']} on {meta['machine']}; {meta['runs']} interleaved runs per runtime after "
        f"{meta['warmup']} warm-up; top-1 on {meta['evaluation_images']} ImageNet photos not used for the "
        f"{meta['calibration_images']} calibration images.",
        "",
        "| runtime | p50 ms, 1 thread | p90 ms, 1 thread | p50 ms, 2 threads | p90 ms, 2 threads "
        "| edgesqz int8 is faster by (1 thread) | top-1 % | top-1 loss vs float |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in RUNTIMES:
        one, two = results[1][name], results[2][name] if 2 in results else {}
        lines.append(f"| {LABELS[name]} | {one['p50_ms']:.2f} | {one['p90_ms']:.2f} | "
                     f"{two.get('p50_ms', float('nan')):.2f} | {two.get('p90_ms', float('nan')):.2f} | "
                     f"{one['p50_ms'] / ref['p50_ms']:.2f}x | {one['top1']:.2f} | {float_top1 - one['top1']:+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=os.environ.get("EDGESQZ_SHARED", "../shared"))
    parser.add_argument("--weights", help="state_dict (default: the shared SqueezeNet 1.1 weights)")
    parser.add_argument("--calib-count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--worker", nargs=2, metavar=("WORKDIR", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work, threads = Path(args.worker[0]), int(args.worker[1])
        result = worker(work, threads, args.runs, args.warmup, accuracy=threads == 1)
        (work / f"result_{threads}.json").write_text(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="edgesqz-peers-") as tmp:
        work = Path(tmp)
        print("building models ...", file=sys.stderr)
        meta = build(args, work)
        (work / "meta.json").write_text(json.dumps(meta))
        results: dict[int, dict[str, Any]] = {}
        for threads in [int(t) for t in args.threads.split(",")]:
            print(f"measuring with {threads} thread(s) ...", file=sys.stderr)
            subprocess.run([sys.executable, __file__, "--worker", str(work), str(threads), "--runs", str(args.runs),
                            "--warmup", str(args.warmup)], check=True)
            results[threads] = json.loads((work / f"result_{threads}.json").read_text())
    preds = {k: np.array(v.pop("preds")) for k, v in results[1].items()}
    agreement = {k: float((preds[k] == preds["keras_tf_fp32"]).mean() * 100) for k in preds}
    meta.update({"date": time.strftime("%Y-%m-%d"), "machine": machine(), "runs": args.runs, "warmup": args.warmup,
                 "agreement_with_keras_fp32": agreement})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer_comparison.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = markdown(results, meta)
    (out / "peer_comparison.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
