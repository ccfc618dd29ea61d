"""The int8 preparation transforms (``edgesqz.converters.quantize``) on the real SqueezeNet 1.1 weights.

Each transform must keep its promise: equalisation leaves the float function alone, the rounded
weights sit exactly on the grid the converter then uses (so it re-rounds nothing), and clipping a
channel's grid is chosen only where it lowers that channel's output error.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from edgesqz.converters import quantize as q
from edgesqz.datasets import calibration_set
from edgesqz.imaging import Preprocessing

CALIB = 16


@pytest.fixture(scope="module")
def images(imagenet_sample: Path) -> np.ndarray:
    return calibration_set(imagenet_sample, CALIB, Preprocessing(size=224), seed=3).images


@pytest.fixture(scope="module")
def pixel(real_weights: Path):
    from edgesqz.converters.export import pixel_model
    from edgesqz.squeezenet import SqueezeNet

    return pixel_model(SqueezeNet("1_1", weights=str(real_weights), classifier_activation=None), size=224)


def test_equalisation_keeps_the_float_function(pixel, images: np.ndarray) -> None:
    equalised = q.equalize(pixel, method="activations", calib_images=images)
    logits = pixel.predict(images.astype(np.float32), verbose=0)
    assert q.max_abs_difference(pixel, equalised, images) <= 1e-4 * np.ptp(logits)
    # ... while the activation ranges it balanced really changed: every channel of a tensor now peaks alike
    pairs = q.scale_pairs(equalised)
    before = q.activation_ranges(pixel, images, pairs[:3])
    after = q.activation_ranges(equalised, images, pairs[:3])
    for b, a in zip(before, after, strict=True):
        live = b > 0
        assert np.ptp(a[live]) / a[live].max() < 1e-3 < np.ptp(b[live]) / b[live].max()


def test_rounded_weights_are_exactly_the_converters_int8_weights(pixel, images: np.ndarray) -> None:
    from ai_edge_litert.interpreter import Interpreter

    from edgesqz.converters.export import representative_dataset, to_tflite

    rounded = q.round_weights(pixel, images)
    with contextlib.redirect_stdout(io.StringIO()):
        model_bytes = to_tflite(rounded, "int8", representative=representative_dataset(images))
    interpreter = Interpreter(model_content=model_bytes, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    convs = q._quantized_convs(model_bytes, interpreter)
    assert len(convs) == 26
    moved = 0
    for conv in convs:
        kernel = rounded.get_layer(conv.name).get_weights()[0]
        top = np.abs(kernel).max()
        assert np.abs(conv.kernel - kernel).max() <= 1e-5 * top, conv.name
        moved += int(np.any(pixel.get_layer(conv.name).get_weights()[0] != kernel))
    assert moved == len(convs)  # every kernel was really re-rounded


def test_clipping_is_chosen_per_channel_only_where_it_lowers_the_output_error() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 32)) * rng.uniform(0.2, 2.0, 32)
    w = rng.standard_normal((32, 24))
    x[:, 0] *= 0.02  # an input that barely moves ...
    w[0, :12] *= 12.0  # ... with outlying weights in half of the channels: clipping them buys a finer grid
    gram = x.T @ x / len(x)
    plain = q._gptq_rows(w, gram, 0.01, (1.0,))
    clipped = q._gptq_rows(w, gram, 0.01)

    def output_error(quantised: np.ndarray) -> np.ndarray:
        e = w - quantised
        return np.einsum("ij,ik,kj->j", e, gram, e)

    assert np.all(output_error(clipped) <= output_error(plain) * (1 + 1e-9))
    assert output_error(clipped)[:12].sum() < 0.9 * output_error(plain)[:12].sum()
    for result in (plain, clipped):  # every column on its own symmetric int8 grid, ending at its max
        scale = np.abs(result).max(axis=0) / 127
        steps = result / scale
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-6)
    assert np.any(np.abs(clipped).max(axis=0) < np.abs(w).max(axis=0) * 0.999)
