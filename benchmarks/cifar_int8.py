"""int8 on the CIFAR SqueezeNet (batch-norm Fire modules, bypasses, 32x32): what each ``--ptq best`` step does.

There is no CIFAR-100 on this machine, so the network is trained here on real photos at 32x32,
in one of two tasks (``--task``):

- ``coarse``: the 1000 shared ImageNet photos in five coarse groups (torchvision's class ranges:
  dogs, birds, other animals, artefacts, food and nature; the largest group is 53 %). Photos, not
  crops, are split: 80 % train (4 random 32x32 crops each), 20 % held back (4 crops each: 800
  correlated crops of 200 photos). Generalising from 800 photos at 32x32 is hard: expect float
  top-1 near the majority share.
- ``instances`` (CIFAR-100-like: 100 classes): 100 of the photos are the classes; 32 random 32x32
  crops of each train, 8 other crops of each are held back (800).

The network is trained with ``edgesqz train --arch cifar`` (pytorch-cifar100's recipe), its weights
written out as a PyTorch ``state_dict`` and imported back the way a user's checkpoint is, then
quantised with each step of ``--ptq best`` on its own and all together. Calibration:
``--calib-count`` random train crops per seed.

Usage (from the repository root)::

    python benchmarks/cifar_int8.py [--shared ../shared] [--epochs 30] [--seeds 0 1 2] [--out DIR]

Also prints the 32x32 models' sizes and latency (int8 vs float32, interleaved, 1 and 2 threads).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from quant_ablation import HEADER, metrics, row, run_tflite

GROUPS = {  # torchvision's ImageNet class order
    "dog": range(151, 269),
    "bird": [*range(7, 25), *range(80, 101), *range(127, 147)],
    "artefact": range(398, 924),
    "food_nature": range(924, 1000),
}
SIZE = 32


def group_of(index: int) -> str:
    for name, members in GROUPS.items():
        if index in members:
            return name
    return "other_animal"


def crops(image: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    import cv2

    h, w = image.shape[:2]
    out = []
    for _ in range(count):
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = image[top:top + side, left:left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(cv2.resize(np.ascontiguousarray(crop), (SIZE, SIZE), interpolation=cv2.INTER_AREA))
    return out


def build_instances(shared: Path, root: Path, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """100 photos as classes: write train/<photo>/*.png (32 crops each); 8 other crops each are held back."""
    import cv2

    from edgesqz.imaging import list_images, read_image

    photos = list_images(shared / "data/imagenet-sample-1000")[::10]
    names = sorted(p.stem for p in photos)
    rng = np.random.default_rng(seed)
    train, held, held_t = [], [], []
    for path in photos:
        all_crops = crops(read_image(path), 40, rng)
        (root / "train" / path.stem).mkdir(parents=True, exist_ok=True)
        for j, crop in enumerate(all_crops[:32]):
            cv2.imwrite(str(root / "train" / path.stem / f"{j}.png"), crop)
            train.append(crop[..., ::-1])
        for crop in all_crops[32:]:
            held.append(crop[..., ::-1])
            held_t.append(names.index(path.stem))
    (root / "labels.txt").write_text("\n".join(names) + "\n")
    return names, np.stack(train), np.stack(held), np.array(held_t)


def build_data(shared: Path, root: Path, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Write train/<group>/*.png; return (groups, train crops RGB, held-back crops RGB, held-back targets)."""
    import cv2

    from edgesqz.datasets import labelled_files
    from edgesqz.imaging import read_image
    from edgesqz.labels import load_labels

    labels = load_labels(shared / "data/labels/imagenet_class_index.json")
    lf = labelled_files(shared / "data/imagenet-sample-1000", labels)
    pairs = sorted(zip(lf.files, lf.targets, strict=True))
    random.Random(seed).shuffle(pairs)
    cut = int(len(pairs) * 0.8)
    names = sorted({*GROUPS, "other_animal"})
    rng = np.random.default_rng(seed)
    train, held, held_t = [], [], []
    for i, (path, target) in enumerate(pairs):
        group = group_of(target)
        image = read_image(path)
        if i < cut:
            (root / "train" / group).mkdir(parents=True, exist_ok=True)
            for j, crop in enumerate(crops(image, 4, rng)):
                cv2.imwrite(str(root / "train" / group / f"{path.stem}_{j}.png"), crop)
                train.append(crop[..., ::-1])
        else:
            for crop in crops(image, 4, rng):
                held.append(crop[..., ::-1])
                held_t.append(names.index(group))
    (root / "labels.txt").write_text("\n".join(names) + "\n")
    return names, np.stack(train), np.stack(held), np.array(held_t)


def latency(models: dict[str, bytes], threads: int, runs: int = 300) -> dict[str, float]:
    """Median invoke time (ms) of each model, interleaved A B A B ... in one run."""
    from ai_edge_litert.interpreter import Interpreter

    interps = {}
    for name, data in models.items():
        it = Interpreter(model_content=data, num_threads=threads)
        it.allocate_tensors()
        inp = it.get_input_details()[0]
        it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
        for _ in range(20):
            it.invoke()
        interps[name] = it
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs):
        for name, it in interps.items():
            t0 = time.perf_counter()
            it.invoke()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: float(np.median(v)) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--task", choices=("coarse", "instances"), default="coarse")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration samples")
    parser.add_argument("--calib-count", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgesqz-cifar-int8"))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    names, train, held, targets = (build_instances if args.task == "instances" else build_data)(args.shared, args.out)
    print(f"{args.task}: {len(train)} train crops, {len(held)} held-back crops, {len(names)} classes", flush=True)
    keras_path = args.out / "cifar.keras"
    if not keras_path.exists():
        subprocess.run([sys.executable, "-m", "edgesqz", "train", "--arch", "cifar", "--data", str(args.out / "train"),
                        "--epochs", str(args.epochs), "-o", str(keras_path), "--json"], check=True,
                       stdout=subprocess.DEVNULL)
    print(f"trained in {time.time() - t0:.0f} s", flush=True)

    import keras
    import torch

    from edgesqz.converters import quantize as q
    from edgesqz.converters.export import pixel_model, representative_dataset, to_tflite
    from edgesqz.converters.standard_head import add_probability_head
    from edgesqz.converters.torch_import import keras_to_state_dict, load_state_dict, state_dict_to_keras
    from edgesqz.squeezenet import SqueezeNet

    trained = keras.saving.load_model(keras_path, compile=False)
    pth = args.out / "cifar.pth"  # the user's path: a PyTorch state_dict, imported back
    torch.save({k: torch.from_numpy(v) for k, v in keras_to_state_dict(trained).items()}, pth)
    model = SqueezeNet("cifar", classes=len(names), classifier_activation=None)
    state_dict_to_keras(load_state_dict(pth), model)
    pm = pixel_model(model, size=SIZE)
    reference = np.concatenate([pm(held[i:i + 1].astype(np.float32)).numpy() for i in range(len(held))])
    results: dict[str, list[dict[str, float]]] = {}
    models: dict[str, bytes] = {}

    def evaluate(name: str, m: keras.Model, calib: np.ndarray, fmt: str = "int8") -> bytes:
        rep = representative_dataset(calib) if fmt == "int8" else None
        with contextlib.redirect_stdout(io.StringIO()):
            data = to_tflite(m, fmt, representative=rep)  # type: ignore[arg-type]
        got = metrics(reference, run_tflite(data, held), targets)
        got["bytes"] = len(data)
        results.setdefault(name, []).append(got)
        models.setdefault(name, data)
        print(row(name, got, len(data)), flush=True)
        return data

    def evaluate_bytes(name: str, data: bytes) -> None:
        got = metrics(reference, run_tflite(data, held), targets)
        got["bytes"] = len(data)
        results.setdefault(name, []).append(got)
        models.setdefault(name, data)
        print(row(name, got, len(data)), flush=True)

    for seed in args.seeds:
        calib = train[np.random.default_rng(seed).permutation(len(train))[:args.calib_count]]
        print(f"\nseed {seed}\n{HEADER}", flush=True)
        if seed == args.seeds[0]:
            evaluate("float32", pm, calib, "float32")
        eq = q.equalize(pm, method="activations", calib_images=calib)
        evaluate("int8 plain (min/max, logits)", pm, calib)
        evaluate("int8 + class map", q.class_map_model(pm), calib)
        evaluate("int8 + equalize(act.)", eq, calib)
        evaluate("int8 + GPTQ", q.round_weights(pm, calib), calib)
        best = evaluate("int8 --ptq best (eq + GPTQ + class map)", q.prepare_int8(pm, calib), calib)
        # what `edgesqz convert --int8 --ptq best` writes: uint8 pixels in, float32 probabilities out
        evaluate_bytes("convert's default model (--ptq best, standard head)",
                       add_probability_head(best))

    print(f"\nmean over seeds {args.seeds}:\n{HEADER}")
    for name, rows in results.items():
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        print(row(name, mean, int(mean["bytes"])))
    flags = sorted(set(Path("/proc/cpuinfo").read_text().split()) & {"avx512_vnni", "avx_vnni", "avx2"})
    timing = {f"{n} thread{'s' if n > 1 else ''}": latency(
        {"float32": models["float32"], "int8 best": models["convert's default model (--ptq best, standard head)"]},
        n)
        for n in (1, 2)}
    print(f"\nlatency (median ms, interleaved; {platform.processor() or platform.machine()}, CPU flags {flags}):")
    for k, v in timing.items():
        print(f"  {k}: " + ", ".join(f"{m} {ms:.3f}" for m, ms in v.items())
              + f"; int8/float32 {v['int8 best'] / v['float32']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "latency_ms": timing, "cpu_flags": flags,
                                         "task": args.task, "classes": len(names), "train_crops": len(train),
                                         "held_back_crops": len(held),
                                         "epochs": args.epochs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
