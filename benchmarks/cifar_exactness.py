"""How exactly a pytorch-cifar100 SqueezeNet checkpoint survives: PyTorch vs Keras vs float TFLite logits.

The PyTorch side is the independent reference in ``tests/torch_squeezenet.py`` (written from the
network's description, as pytorch-cifar100 defines it); the Keras model is edgesqz's import of the
``state_dict``; the float TFLite models are what ``edgesqz convert --float32`` writes (pixels in,
normalisation inside; the padded stem centred first), run by LiteRT: with ``--head logits`` (compared
with PyTorch's logits) and by default (one ``[1, C]`` vector of probabilities, compared with the
softmax of PyTorch's logits). All three see the same real
photos, preprocessed as the device does (whole centre square, 32x32), plus an all-black and an
all-white image (the padded borders at their worst).

Usage (from the repository root)::

    python benchmarks/cifar_exactness.py [--weights CHECKPOINT.pth ...] [--images DIR] [--shared ../shared]

Without ``--weights`` it measures randomly initialised networks (100 and 7 classes) whose batch
norms hold the statistics of real images.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, nargs="*", default=[], help="CIFAR SqueezeNet state_dicts (.pth)")
    parser.add_argument("--images", type=Path, default=None, help="photos (default: 1 in 10 of the shared sample)")
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    args = parser.parse_args()

    import torch
    from torch_squeezenet import CifarSqueezeNet, randomize_batch_norm

    from edgesqz.architecture import CIFAR100_MEAN, CIFAR100_STD
    from edgesqz.converters.torch_import import detect, load_state_dict, state_dict_to_keras
    from edgesqz.evaluate import tflite_outputs
    from edgesqz.imaging import list_images, preprocess, read_image
    from edgesqz.squeezenet import SqueezeNet

    files = list_images(args.images) if args.images else list_images(args.shared / "data/imagenet-sample-1000")[::10]
    pixels = np.stack([preprocess(read_image(f), 32, 1.0) for f in files]
                      + [np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)])
    normalised = (pixels / 255.0 - np.array(CIFAR100_MEAN)) / np.array(CIFAR100_STD)
    nchw = torch.from_numpy(normalised.astype(np.float32).transpose(0, 3, 1, 2).copy())

    checkpoints: list[tuple[str, Path]] = []
    tmp = Path(tempfile.mkdtemp(prefix="edgesqz-exact-"))
    if args.weights:
        checkpoints = [(str(p), p) for p in args.weights]
    else:
        for classes in (100, 7):
            torch.manual_seed(classes)
            net = randomize_batch_norm(CifarSqueezeNet(classes), seed=classes, inputs=nchw[:64])
            path = tmp / f"random-{classes}.pth"
            torch.save(net.state_dict(), path)
            checkpoints.append((f"random weights, {classes} classes", path))

    print(f"{len(pixels)} images; max |logit difference| (and the logits' range)")
    for name, path in checkpoints:
        state = load_state_dict(path)
        found = detect(state)
        assert found is not None and found.arch.layout == "cifar", f"{path} is not a CIFAR SqueezeNet"
        reference = CifarSqueezeNet(found.classes)
        reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        with torch.no_grad():
            expected = reference.eval()(nchw).numpy()
        model = SqueezeNet("cifar", classes=found.classes, classifier_activation=None)
        state_dict_to_keras(state, model)
        keras_out = model(normalised.astype(np.float32), training=False).numpy()
        outputs = {}
        for head in ("logits", "probabilities"):
            out = tmp / f"{path.stem}-{head}.tflite"
            subprocess.run([sys.executable, "-m", "edgesqz", "convert", "--weights", str(path), "--float32", "--head",
                            head, "-o", str(out), "--force"], check=True, capture_output=True)
            outputs[head] = tflite_outputs(out.read_bytes(), pixels)
        e = np.exp(expected.astype(np.float64) - expected.max(axis=1, keepdims=True))
        softmax = e / e.sum(axis=1, keepdims=True)
        print(f"{name}: Keras vs PyTorch {np.abs(keras_out - expected).max():.2e}, float TFLite logits vs PyTorch "
              f"{np.abs(outputs['logits'] - expected).max():.2e} (range {np.ptp(expected):.3g}), float TFLite "
              f"probabilities vs PyTorch's softmax {np.abs(outputs['probabilities'] - softmax).max():.2e}; top-1 "
              f"equal on {np.mean(outputs['probabilities'].argmax(1) == expected.argmax(1)) * 100:.1f} % of images")


if __name__ == "__main__":
    main()
