"""`convert --weight-bits 4 / --max-size` and `train --weight-bits 4` on the CIFAR network (small and quick).

Accuracy is measured by benchmarks/weight_bits.py (ImageNet SqueezeNet 1.1) and the figures in README;
these tests check the mechanics: the budget is kept, the stem stays 8-bit, a trained 4-bit grid is
taken as it is, and bad input is one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")


def edgesqz(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesqz", *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy())


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cifar_keras(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    from edgesqz.squeezenet import SqueezeNet

    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("wbits") / "cifar10.keras"
    SqueezeNet("cifar", classes=10, classifier_activation=None).save(path)
    return path


def test_bad_input_is_one_line_and_writes_nothing(cifar_keras: Path, crops32: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.tflite"
    calib = ("--calib", str(crops32 / "train"), "--calib-count", "16")
    line = one_error_line(edgesqz("convert", "--weights", str(cifar_keras), "--weight-bits", "3", *calib,
                                  "-o", str(out)))
    assert "--weight-bits must be 4 or 8, not 3" in line
    line = one_error_line(edgesqz("convert", "--weights", str(cifar_keras), "--float32", "--weight-bits", "4",
                                  "-o", str(out)))
    assert "--int8" in line
    line = one_error_line(edgesqz("convert", "--weights", str(cifar_keras), "--max-size", "lots", *calib,
                                  "-o", str(out)))
    assert "500KB" in line
    line = one_error_line(edgesqz("convert", "--weights", str(cifar_keras), "--max-size", "100KB", *calib,
                                  "-o", str(out)))
    assert "cannot be reached" in line and "smallest 4/8-bit mix" in line and "bytes" in line
    line = one_error_line(edgesqz("train", "--data", str(crops32 / "train"), "--arch", "cifar", "--weight-bits", "2",
                                  "-o", str(tmp_path / "m.keras")))
    assert "--weight-bits must be 4 or 8" in line
    assert not list(tmp_path.iterdir())


def test_max_size_keeps_the_budget_and_the_stem_8bit(cifar_keras: Path, crops32: Path, tmp_path: Path) -> None:
    out = tmp_path / "mixed.tflite"
    result = edgesqz("convert", "--weights", str(cifar_keras), "--max-size", "560KB", "--calib", str(crops32 / "train"),
                     "--calib-count", "16", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    rep = json.loads(result.stdout)
    w = rep["weights"]
    assert out.stat().st_size == rep["size_bytes"] <= 560_000
    layers = w["layers"]
    assert layers[0]["bits"] == 8 and "sensitivity" not in layers[0]
    assert w["layers_4bit"] >= 1 and w["layers_8bit"] >= 2, w  # a real mix: neither extreme fits 560 kB
    assert all("sensitivity" in r for r in layers[1:])
    from edgesqz.tflite_int4 import conv_bits

    assert [r.bits for r in conv_bits(out.read_bytes())] == [r["bits"] for r in layers]


def test_trained_4bit_grid_is_stored_as_it_is(crops32: Path, tmp_path: Path) -> None:
    model = tmp_path / "qat.keras"
    result = edgesqz("train", "--arch", "cifar", "--data", str(crops32 / "train"), "--val", str(crops32 / "test"),
                     "--epochs", "2", "--weight-bits", "4", "--qat-epochs", "1", "-o", str(model), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    import keras

    from edgesqz.converters.quantize import grids_from_weights
    from edgesqz.train import qat_layers, read_training_info

    info = read_training_info(model)
    assert info is not None and info["weight_bits"] == 4 and info["epoch"] == 2  # saved from the 4-bit epoch
    base = keras.saving.load_model(model, compile=False)
    layers = [layer.name for layer in qat_layers(base)]
    grids = grids_from_weights(base, layers, tolerance=1e-4)
    assert grids is not None and all(np.abs(g.values).max() == 7 for g in grids.values())

    out = tmp_path / "qat.tflite"
    result = edgesqz("convert", "--weights", str(model), "--calib", str(crops32 / "train"), "--calib-count", "16",
                     "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    rep = json.loads(result.stdout)
    assert rep["weights"]["requested"] == "trained 4-bit grid" and rep["weights"]["layers_4bit"] == len(layers)
    assert "trained on 4-bit weights" in rep["weights_found"]
    # the stored 4-bit values are the trained grid's, value for value (BN folding scales whole channels)
    from ai_edge_litert import schema_py_generated as schema

    from edgesqz.tflite_int4 import _LAYER, INT4, unpack_int4

    m = schema.Model.GetRootAs(out.read_bytes(), 0)
    sub = m.Subgraphs(0)
    found = 0
    for i in range(sub.TensorsLength()):
        t = sub.Tensors(i)
        if t.Type() != INT4:
            continue
        name = _LAYER.search(t.Name().decode()).group(1)  # type: ignore[union-attr]
        shape = tuple(t.ShapeAsNumpy())
        stored = unpack_int4(m.Buffers(t.Buffer()).DataAsNumpy(), int(np.prod(shape))).reshape(shape)
        trained = grids[name].values.transpose(3, 0, 1, 2)
        signs = np.sign(np.asarray([t.Quantization().Scale(j) for j in range(shape[0])]))  # scales > 0
        assert (signs > 0).all()
        assert np.array_equal(np.abs(stored), np.abs(trained)), name  # negative BN gammas may flip a channel
        found += 1
    assert found == len(layers)


def test_4bit_gptq_with_clipping_beats_rounding_to_nearest() -> None:
    """On correlated inputs the error-compensating 4-bit rounding has a far smaller output error than
    plain per-channel rounding, and its values lie on the -7..7 grid of each channel's step."""
    from edgesqz.converters import quantize as q

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 96)) @ rng.normal(size=(96, 96)) * 0.3 + rng.normal(size=(2000, 96))
    gram = x.T @ x / len(x)
    w = rng.standard_t(4, size=(96, 32)) * 0.05  # heavy tails: clipping pays
    rounded, step = q._gptq_search(w, gram, 0.01, q.INT4_CLIP_RATIOS, q.INT4_LEVELS, keep_end=False)
    levels = rounded / step
    assert np.allclose(levels, np.round(levels), atol=1e-9) and np.abs(np.round(levels)).max() <= 7

    def output_error(qw: np.ndarray) -> float:
        e = w - qw
        return float(np.sum(e * (gram @ e)))

    top = np.abs(w).max(axis=0) / 7
    nearest = np.clip(np.round(w / top), -7, 7) * top
    assert output_error(rounded) < 0.6 * output_error(nearest)  # measured: 0.52


def test_budget_keeps_the_most_sensitive_set_that_fits() -> None:
    """A large layer that hurts most is kept at 8 bits when the room allows it, rather than the many
    small ones a choice by sensitivity per byte would keep; the stem is always 8-bit; nothing exceeds the budget."""
    from edgesqz.converters.quantize import _Choices

    shapes = {"stem": (3, 3, 3, 64), "a": (1, 1, 64, 16), "b": (3, 3, 16, 64), "c": (1, 1, 512, 64),
              "head": (1, 1, 512, 1000)}
    names = list(shapes)
    choices = _Choices(None, {}, {}, shapes, names, False)  # type: ignore[arg-type]
    sensitivity = {"a": 0.014, "b": 0.007, "c": 0.01, "head": 0.034}
    n = {k: int(np.prod(s)) for k, s in shapes.items()}
    all4 = n["stem"] + sum((n[k] + 1) // 2 for k in names[1:])
    assert choices.choose(sensitivity, all4) == {"stem": 8, "a": 4, "b": 4, "c": 4, "head": 4}
    assert choices.choose(sensitivity, all4 + 256_000) == {"stem": 8, "a": 4, "b": 4, "c": 4, "head": 8}
    assert choices.choose(sensitivity, all4 + 30_000) == {"stem": 8, "a": 8, "b": 8, "c": 8, "head": 4}
    for room in (0, 500, 5000, 40_000, 255_999, 300_000):
        bits = choices.choose(sensitivity, all4 + room)
        assert sum((n[k] * b + 7) // 8 for k, b in bits.items()) <= all4 + room
