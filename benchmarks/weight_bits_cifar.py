"""4-bit weights on the CIFAR SqueezeNet through ``edgesqz convert`` alone (a PyTorch checkpoint in, .tflite out).

There is no CIFAR data or checkpoint on this machine, so, as ``benchmarks/cifar_int8.py`` does, the
network is trained here on real photos at 32x32 (``--task instances``: 100 photos are the classes,
CIFAR-100-like; ``--task coarse``: five coarse ImageNet groups, a few-class model) with
``edgesqz train --arch cifar``, its weights are written out as a PyTorch ``state_dict`` (the user's
path) and each variant is a real ``convert`` of that file: int8, ``--max-size`` budgets and
``--weight-bits 4``. Held-back crops (800) evaluate: top-1 agreement with the float32 conversion
(95 % normal interval), top-1 and the drop; file sizes in bytes. ``--seeds``: calibration samples
(200 training crops each, chosen by ``convert --seed``).

Usage (from the repository root)::

    python benchmarks/weight_bits_cifar.py [--task instances|coarse] [--epochs 30] [--seeds 0 1 2]
        [--budgets 500KB] [--json benchmarks/results/weight_bits_cifar_instances.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from cifar_int8 import build_data, build_instances
from weight_bits import compare, size_arg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--task", choices=("coarse", "instances"), default="instances")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", nargs="+", default=["500KB"])
    parser.add_argument("--out", type=Path, default=None, help="work folder (default /tmp/edgesqz-wbits-<task>)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(f"/tmp/edgesqz-wbits-{args.task}")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    names, _, held, targets = (build_instances if args.task == "instances" else build_data)(args.shared, out)
    keras_path = out / "cifar.keras"
    if not keras_path.exists():
        subprocess.run([sys.executable, "-m", "edgesqz", "train", "--arch", "cifar", "--data", str(out / "train"),
                        "--epochs", str(args.epochs), "-o", str(keras_path), "--json"], check=True,
                       stdout=subprocess.DEVNULL)
    print(f"{args.task}: {len(names)} classes, {len(held)} held-back crops; trained in {time.time() - t0:.0f} s",
          flush=True)

    import keras
    import torch

    from edgesqz.converters.convert import ConvertOptions, convert
    from edgesqz.converters.torch_import import keras_to_state_dict
    from edgesqz.evaluate import tflite_outputs
    from edgesqz.quiet import captured_output

    pth = out / "cifar.pth"
    trained = keras.saving.load_model(keras_path, compile=False)
    torch.save({k: torch.from_numpy(v) for k, v in keras_to_state_dict(trained).items()}, pth)
    labels = out / "labels.txt"
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="edgesqz-wbits-cifar-") as tmp:
        ref = Path(tmp) / "float.tflite"
        convert(ConvertOptions(weights=str(pth), fmt="float32", head="logits", labels=str(labels), output=str(ref)))
        with captured_output([]):
            reference = tflite_outputs(ref.read_bytes(), held)
        variants: list[tuple[str, dict[str, object]]] = [("int8 (all 8-bit)", {})]
        variants += [(f"--max-size {b}", {"max_size": size_arg(b)}) for b in args.budgets]
        variants += [("--weight-bits 4", {"weight_bits": 4})]
        for seed in args.seeds:
            for name, extra in variants:
                path = Path(tmp) / "m.tflite"
                try:
                    result = convert(ConvertOptions(weights=str(pth), fmt="int8", calib=str(out / "train"), seed=seed,
                                                    labels=str(labels), output=str(path), force=True,
                                                    **extra))  # type: ignore[arg-type]
                except Exception as exc:
                    print(f"seed {seed} {name}: {exc}", flush=True)
                    rows.append({"seed": seed, "variant": name, "error": str(exc)})
                    continue
                with captured_output([]):
                    outputs = tflite_outputs(path.read_bytes(), held)
                w = result.report.get("weights") or {}
                row = {"seed": seed, "variant": name, "size_bytes": result.report["size_bytes"],
                       "kernel_bytes": w.get("weight_bytes"), "layers_4bit": w.get("layers_4bit", 0),
                       "layers_8bit": w.get("layers_8bit"), **compare(reference, outputs, targets)}
                rows.append(row)
                if args.json:  # after every row: a stopped run keeps what it measured
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps({"task": args.task, "epochs": args.epochs, "classes": len(names),
                                                     "held_back": len(held), "rows": rows, "partial": True}, indent=2)
                                         + "\n")
                print(f"seed {seed} {name:22s} {row['size_bytes']:>9,} B  4-bit layers {row['layers_4bit']:2d}  "
                      f"top-1 {row['top1']:6.2f} (float {row['float_top1']:.2f}, drop {row['top1_drop']:+.2f} "
                      f"{row['top1_drop_ci95']})  agreement {row['agreement']:6.2f} {row['agreement_ci95']}",
                      flush=True)
    summary = {}
    for name, _ in variants:
        got = [float(r["agreement"]) for r in rows if r["variant"] == name and "error" not in r]  # type: ignore[arg-type]
        if got:
            summary[name] = {"agreement_mean": round(float(np.mean(got)), 2), "min": min(got), "max": max(got)}
            print(f"{name:22s} agreement mean {np.mean(got):.2f} (min {min(got):.2f}, max {max(got):.2f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"task": args.task, "epochs": args.epochs, "classes": len(names),
                                         "held_back": len(held), "rows": rows, "summary": summary,
                                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")


if __name__ == "__main__":
    main()
