"""The standard classifier head (convert's default since issue 18) vs the class-map int8 model (SqueezeNet 1.1).

For each calibration/evaluation split (``--seeds``; the split is ``benchmarks/quant_ablation.py``'s:
the sorted labelled files of ``<shared>/data/imagenet-sample-1000``, ``random.Random(seed).sample``
of ``--calib-count`` for calibration, the rest to evaluate), the float pixel model is prepared
with ``--ptq best`` (``quantize.prepare_int8``) and converted once to the int8 class-map model
(int8 in, ``[1, 13, 13, 1000]`` int8 out: edgesqz 0.x's default, ``--head class_map --io int8``
now). Every variant is derived from that same
conversion, so they share the int8 body and differ only at the ends:

- ``class_map``: the 0.x model; the device averages the map in float (``pool_class_map``);
- ``standard``: ``add_probability_head``'s default (the recommended CPU model): uint8 input via
  DEQUANTIZE + QUANTIZE, then ``pool="mean"``: int8 map -> DEQUANTIZE -> MEAN -> SOFTMAX in float32,
  one float32 ``[1, C]`` output; XNNPACK runs every op;
- ``standard_exact``: the same input, ``pool="exact_mean"``: CAST of the int8 map to float32 (its raw
  integers) -> MEAN -> MUL by the map's scale -> SOFTMAX: the mean is exact, so the class map's exact
  ties stay ties (XNNPACK leaves the CAST to TFLite's kernel);
- ``standard_edgetpu``: ``EDGETPU_OPTIONS``: one QUANTIZE (uint8 -> int8) at the input (what the Edge
  TPU runs; XNNPACK leaves it to TFLite's kernel) and the ``"mean"`` tail;
- ``standard_avgpool``: AVERAGE_POOL_2D + RESHAPE instead of MEAN (DEQUANTIZE tail, input as ``standard``);
- ``standard_uint8_out``: the ``"mean"`` tail's probabilities quantised to uint8 (scale 1/256);
- ``converter_int8_softmax``: the converter's own head: Keras GlobalAveragePooling2D + Softmax on
  the same prepared model, converted full-integer (int8 MEAN and SOFTMAX) with uint8 in/out
  (a second conversion of the same prepared weights with the same calibration images).

Accuracy on the held-out images of each split: top-1, drop vs float, top-1 agreement with float
(argmax, first index on ties; ``agree~`` breaks ties at random), tied outputs, and how many images
have the same top-1 as ``class_map``. Latency: the models of the first split, interleaved
(A B C ... B C A ..., the order rotating) in one process for each thread count, steady-state ``invoke`` and the device
path ``set_tensor + invoke + get_tensor + scores`` (``edgesqz.device.classifier``'s
``dequantize``/``scores_from_output``; the int8 model's ``pixel ^ 0x80`` included). XNNPACK
coverage from ``_get_ops_details()``. Sizes without metadata.

Usage (from the repository root)::

    python benchmarks/standard_head.py --shared ../shared --seeds 0 1 2 3 4 5 6 7 \\
        [--runs 300] [--repeats 3] [--threads 1 2] [--json benchmarks/results/standard_head.json] [--models-dir DIR]
    python benchmarks/standard_head.py --latency-only --models-dir DIR --runs 1000 --repeats 5 --json OUT.json

About 2.5 minutes per split on 2 cores plus ~40 s of latency runs per repeat (300 rounds, 1 and 2 threads).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from quant_ablation import WEIGHTS, load_split, metrics, run_tflite

REFERENCE = "class_map"
VARIANTS = ("class_map", "standard", "standard_exact", "standard_edgetpu", "standard_avgpool",
            "standard_uint8_out", "converter_int8_softmax")


def cpu_facts() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", text)
    flags = sorted(set(re.findall(r"\b(avx512_vnni|avx_vnni|avx2)\b", text)))
    return {"model": model.group(1).strip() if model else platform.processor(), "cores": os.cpu_count(),
            "flags": flags, "machine": platform.machine(), "python": platform.python_version()}


def build_models(prepared: Any, calib: np.ndarray) -> dict[str, bytes]:
    """Every variant from one int8 class-map conversion (plus the converter's own int8 head)."""
    import keras
    import tensorflow as tf

    from edgesqz.converters.export import representative_dataset, to_tflite
    from edgesqz.converters.standard_head import EDGETPU_OPTIONS, add_probability_head

    with contextlib.redirect_stdout(io.StringIO()):
        class_map = to_tflite(prepared, "int8", representative=representative_dataset(calib), io="int8")
    pooled = keras.layers.GlobalAveragePooling2D(name="head_pool")(prepared.output)
    probs = keras.layers.Softmax(name="head_softmax")(pooled)
    converter_head = keras.Model(prepared.inputs, probs)
    conv = tf.lite.TFLiteConverter.from_keras_model(converter_head)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative_dataset(calib)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.uint8
    with contextlib.redirect_stdout(io.StringIO()):
        converter_int8 = bytes(conv.convert())
    return {
        "class_map": class_map,
        "standard": add_probability_head(class_map, pool="mean", input_conversion="dequantize_quantize"),
        "standard_exact": add_probability_head(class_map, pool="exact_mean", input_conversion="dequantize_quantize"),
        "standard_edgetpu": add_probability_head(class_map, **EDGETPU_OPTIONS),
        "standard_avgpool": add_probability_head(class_map, pool="average_pool",
                                                 input_conversion="dequantize_quantize"),
        "standard_uint8_out": add_probability_head(class_map, output="uint8", pool="mean",
                                                   input_conversion="dequantize_quantize"),
        "converter_int8_softmax": converter_int8,
    }


def coverage(model: bytes) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    from edgesqz.device.runtime import delegate_coverage

    it = Interpreter(model_content=model, num_threads=1)
    it.allocate_tensors()
    cov = delegate_coverage(it)
    ops = [op["op_name"] for op in it._get_ops_details() if op["op_name"] != "DELEGATE"]
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    return {**cov.to_dict(), "first_ops": ops[:2], "last_ops": ops[-4:],
            "input": f"{np.dtype(inp['dtype']).name}{[int(d) for d in inp['shape']]}",
            "output": f"{np.dtype(out['dtype']).name}{[int(d) for d in out['shape']]}"}


def evaluate(models: dict[str, bytes], reference: np.ndarray, images: np.ndarray,
             targets: np.ndarray) -> dict[str, dict[str, Any]]:
    from edgesqz.evaluate import agreement_interval, drop_interval

    outputs = {name: run_tflite(blob, images) for name, blob in models.items()}
    ref_top = reference.argmax(1)
    base_top = outputs[REFERENCE].argmax(1)
    rows = {}
    for name, out in outputs.items():
        m = metrics(reference, out, targets)
        top = out.argmax(1)
        agree = int((top == ref_top).sum())
        rows[name] = {
            **{k: round(v, 3) for k, v in m.items()},
            "drop": round(m["float"] - m["top1"], 3),
            "agree_ci95": [round(v, 2) for v in agreement_interval(agree, len(targets))],
            "drop_ci95": [round(v, 2) for v in drop_interval(ref_top == targets, top == targets)],
            "same_top1_as_class_map": int((top == base_top).sum()),
            "size_bytes": len(models[name]),
        }
    return rows


def latency(models: dict[str, bytes], image: np.ndarray, threads: int, runs: int, warmup: int
            ) -> dict[str, dict[str, float]]:
    """Interleaved steady-state latency; ``invoke`` and the device path up to probabilities."""
    from ai_edge_litert.interpreter import Interpreter

    from edgesqz.device.classifier import dequantize, scores_from_output

    state = {}
    for name, blob in models.items():
        it = Interpreter(model_content=blob, num_threads=threads)
        it.allocate_tensors()
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        kind = "class_map" if len(out["shape"]) == 4 else "probabilities"
        state[name] = (it, inp, out, kind)
        x = (image ^ 0x80).view(np.int8) if inp["dtype"] == np.int8 else image
        it.set_tensor(inp["index"], x[None])
        for _ in range(warmup):
            it.invoke()
    invoke: dict[str, list[float]] = {n: [] for n in models}
    device: dict[str, list[float]] = {n: [] for n in models}
    names = list(state)
    for r in range(runs):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate: no model always runs first
            it, inp, out, kind = state[name]
            t0 = time.perf_counter()
            x = (image ^ 0x80).view(np.int8) if inp["dtype"] == np.int8 else image
            it.set_tensor(inp["index"], x[None])
            t1 = time.perf_counter()
            it.invoke()
            t2 = time.perf_counter()
            scores_from_output(dequantize(it.get_tensor(out["index"]), out), kind)
            t3 = time.perf_counter()
            invoke[name].append((t2 - t1) * 1e3)
            device[name].append((t3 - t0) * 1e3)
    result = {}
    base_i, base_d = np.median(invoke[REFERENCE]), np.median(device[REFERENCE])
    for name in models:
        i, d = np.asarray(invoke[name]), np.asarray(device[name])
        result[name] = {"invoke_p50_ms": round(float(np.median(i)), 4),
                        "invoke_p90_ms": round(float(np.percentile(i, 90)), 4),
                        "device_p50_ms": round(float(np.median(d)), 4),
                        "device_p90_ms": round(float(np.percentile(d, 90)), 4),
                        "invoke_ratio": round(float(np.median(i) / base_i), 4),
                        "device_ratio": round(float(np.median(d) / base_d), 4),
                        # per round, against the class-map model's time in the same round (robust to load drift)
                        "invoke_ratio_paired": round(float(np.median(i / np.asarray(invoke[REFERENCE]))), 4),
                        "device_ratio_paired": round(float(np.median(d / np.asarray(device[REFERENCE]))), 4)}
    return result


def latency_block(models: dict[str, bytes], image: np.ndarray, cov: dict[str, Any],
                  args: argparse.Namespace) -> dict[str, Any]:
    """``--repeats`` rounds of :func:`latency` per thread count; per variant the median and range of the
    paired ratios over the repeats (a 2-core machine shared with other work drifts between repeats)."""
    per: dict[str, list[dict[str, Any]]] = {str(t): [] for t in args.threads}
    for rep in range(args.repeats):
        for threads in args.threads:
            r = latency(models, image, threads, args.runs, args.warmup)
            per[str(threads)].append(r)
            print(f"latency, {threads} thread(s), repeat {rep + 1}/{args.repeats}, {args.runs} interleaved rounds, "
                  f"load {os.getloadavg()[0]:.1f}:", flush=True)
            for name, v in r.items():
                print(f"  {name:24s} invoke p50 {v['invoke_p50_ms']:.3f} ms (paired {v['invoke_ratio_paired']:.3f}x)"
                      f"   device path p50 {v['device_p50_ms']:.3f} ms (paired {v['device_ratio_paired']:.3f}x)"
                      f"   XNNPACK {cov[name]['delegated_ops']}/{cov[name]['total_ops']}", flush=True)
    out: dict[str, Any] = {"runs": args.runs, "warmup": args.warmup, "repeats": args.repeats, "threads": {}}
    for threads, reps in per.items():
        summ = {}
        for name in models:
            row: dict[str, Any] = {}
            for key in ("invoke_p50_ms", "device_p50_ms", "invoke_ratio_paired", "device_ratio_paired"):
                vals = [r[name][key] for r in reps]
                row[key] = {"median": round(float(np.median(vals)), 4), "min": min(vals), "max": max(vals)}
            summ[name] = row
        out["threads"][threads] = {"summary": summ, "repeats": reps}
        print(f"latency over {len(reps)} repeats, {threads} thread(s): median (min..max) of the paired ratios")
        for name, row in summ.items():
            i, d = row["invoke_ratio_paired"], row["device_ratio_paired"]
            print(f"  {name:24s} invoke {i['median']:.3f}x ({i['min']:.3f}..{i['max']:.3f})   "
                  f"device path {d['median']:.3f}x ({d['min']:.3f}..{d['max']:.3f})", flush=True)
    return out


def summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in VARIANTS:
        agree = np.array([s["accuracy"][name]["agree"] for s in per_seed])
        drop = np.array([s["accuracy"][name]["drop"] for s in per_seed])
        diff = np.array([s["accuracy"][name]["agree"] - s["accuracy"][REFERENCE]["agree"] for s in per_seed])
        same = [s["accuracy"][name]["same_top1_as_class_map"] for s in per_seed]
        out[name] = {"agree_mean": round(float(agree.mean()), 3),
                     "agree_sd": round(float(agree.std(ddof=1)) if len(agree) > 1 else 0.0, 3),
                     "drop_mean": round(float(drop.mean()), 3),
                     "drop_sd": round(float(drop.std(ddof=1)) if len(drop) > 1 else 0.0, 3),
                     "agree_minus_class_map_mean": round(float(diff.mean()), 3),
                     "agree_minus_class_map_range": [round(float(diff.min()), 3), round(float(diff.max()), 3)],
                     "same_top1_as_class_map_min": int(min(same))}
    return out


def latency_only(args: argparse.Namespace) -> None:
    """Interleaved latency of models a full run saved (``--models-dir``); results to ``--json``."""
    if not args.models_dir or not (args.models_dir / "class_map.tflite").exists():
        raise SystemExit("--latency-only needs --models-dir with the models a full run saved there")
    cpu = cpu_facts()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags']) or 'none'}", flush=True)
    models = {name: (args.models_dir / f"{name}.tflite").read_bytes() for name in VARIANTS}
    image = np.load(args.models_dir / "image.npy")
    cov = {name: coverage(blob) for name, blob in models.items()}
    lat = latency_block(models, image, cov, args)
    import ai_edge_litert

    result = {"benchmark": "standard_head latency", "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": "python benchmarks/standard_head.py " + " ".join(sys.argv[1:]), "cpu": cpu,
              "load_average_1_5_15": list(os.getloadavg()),
              "versions": {"ai_edge_litert": ai_edge_litert.__version__}, "xnnpack": cov,
              "sizes": {name: len(blob) for name, blob in models.items()},
              "latency": lat}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--calib-count", type=int, default=200)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=300, help="interleaved latency rounds per thread count")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="latency measurements per thread count (alternating)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/standard_head.json"))
    parser.add_argument("--models-dir", type=Path,
                        help="save the first split's models here (VARIANT.tflite, and image.npy for latency)")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the interleaved latency runs, on the models saved in --models-dir")
    args = parser.parse_args()
    if args.latency_only:
        latency_only(args)
        return

    from edgesqz.converters.export import pixel_model
    from edgesqz.converters.quantize import prepare_int8
    from edgesqz.quiet import captured_output
    from edgesqz.squeezenet import SqueezeNet

    cpu = cpu_facts()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags']) or 'none'}", flush=True)
    base = SqueezeNet("1_1", weights=str(args.shared / WEIGHTS), classifier_activation=None)
    pm = pixel_model(base, size=224, normalization="fold")
    per_seed: list[dict[str, Any]] = []
    first_models: dict[str, bytes] | None = None
    first_image: np.ndarray | None = None
    for seed in args.seeds:
        start = time.time()
        split = load_split(args.shared, args.calib_count, seed)
        reference = pm.predict(split.images.astype(np.float32), batch_size=32, verbose=0)
        with captured_output([]):
            prepared = prepare_int8(pm, split.calib)
            models = build_models(prepared, split.calib)
        rows = evaluate(models, reference, split.images, split.targets)
        per_seed.append({"seed": seed, "calibration": len(split.calib), "evaluation": len(split.images),
                         "accuracy": rows})
        print(f"seed {seed}: {len(split.calib)} calibration, {len(split.images)} held out "
              f"({time.time() - start:.0f} s)")
        print(f"  {'variant':24s} {'top-1':>6s} {'drop':>6s} {'agree':>6s} {'agree~':>6s} {'ties%':>6s} "
              f"{'=cmap':>5s} {'bytes':>8s}")
        for name, r in rows.items():
            print(f"  {name:24s} {r['top1']:6.2f} {r['drop']:+6.2f} {r['agree']:6.2f} {r['agree_random']:6.2f} "
                  f"{r['ties']:6.2f} {r['same_top1_as_class_map']:5d} {r['size_bytes']:8d}", flush=True)
        if first_models is None:
            first_models, first_image = models, split.images[0]
            if args.models_dir:
                args.models_dir.mkdir(parents=True, exist_ok=True)
                for name, blob in models.items():
                    (args.models_dir / f"{name}.tflite").write_bytes(blob)
                np.save(args.models_dir / "image.npy", first_image)
    assert first_models is not None and first_image is not None
    cov = {name: coverage(blob) for name, blob in first_models.items()}
    print(f"latency on seed {args.seeds[0]}'s models:")
    lat = latency_block(first_models, first_image, cov, args)
    summ = summary(per_seed)
    print("over splits " + " ".join(str(s) for s in args.seeds) + ":")
    for name, s in summ.items():
        print(f"  {name:24s} agree {s['agree_mean']:.2f} (sd {s['agree_sd']:.2f}), drop {s['drop_mean']:+.2f} "
              f"(sd {s['drop_sd']:.2f}), agree - class_map {s['agree_minus_class_map_mean']:+.3f} "
              f"{s['agree_minus_class_map_range']}, same top-1 as class_map >= {s['same_top1_as_class_map_min']}")
    import ai_edge_litert
    import tensorflow as tf

    result = {
        "benchmark": "standard_head",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/standard_head.py " + " ".join(sys.argv[1:]),
        "cpu": cpu,
        "versions": {"tensorflow": tf.__version__, "ai_edge_litert": ai_edge_litert.__version__},
        "calib_count": args.calib_count,
        "seeds": args.seeds,
        "per_seed": per_seed,
        "summary": summ,
        "xnnpack": cov,
        "latency": {**lat, "models_of_seed": args.seeds[0]},
        "load_average_1_5_15_at_end": list(os.getloadavg()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
