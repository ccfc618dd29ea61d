"""The Keras architecture: shapes, names, sizes and the paper's variants."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from edgesqz.errors import EdgesqzError  # noqa: E402
from edgesqz.squeezenet import SqueezeNet, feature_map_size, min_input_size  # noqa: E402


@pytest.mark.parametrize(("version", "params"), [("1_0", 1248424), ("1_1", 1235496)])
def test_parameter_count_matches_torchvision(version: str, params: int) -> None:
    assert SqueezeNet(version).count_params() == params


@pytest.mark.parametrize(("version", "size", "final"), [("1_0", 224, 13), ("1_1", 224, 13), ("1_0", 227, 13),
                                                        ("1_1", 227, 14), ("1_1", 299, 18)])
def test_ceil_mode_feature_map(version: str, size: int, final: int) -> None:
    # torchvision: 1.0 at 224 goes 109 -> 54 -> 27 -> 13 (floor mode would end at 12)
    model = SqueezeNet(version, include_top=False, input_shape=(size, size, 3))
    assert model.output.shape[1:] == (final, final, 512)
    assert feature_map_size(version, size) == final


def test_dynamic_input_size_matches_static() -> None:
    dynamic = SqueezeNet("1_0", include_top=False, input_shape=(None, None, 3))
    for size in (224, 227, 120):
        static = SqueezeNet("1_0", include_top=False, input_shape=(size, size, 3))
        static.set_weights(dynamic.get_weights())
        x = np.random.default_rng(size).normal(size=(1, size, size, 3)).astype("float32")
        np.testing.assert_allclose(dynamic(x).numpy(), static(x).numpy(), atol=1e-5)


def test_layer_names_follow_torchvision() -> None:
    names = {layer.name for layer in SqueezeNet("1_1").layers}
    for name in ("features.0", "features.1", "features.2", "features.3.squeeze", "features.3.squeeze_activation",
                 "features.3.expand1x1", "features.3.expand3x3_activation", "features.3", "features.12",
                 "classifier.0", "classifier.1", "classifier.2", "classifier.3", "predictions"):
        assert name in names


@pytest.mark.parametrize("version", ["1_0", "1_1"])
def test_rejects_too_small_input(version: str) -> None:
    smallest = min_input_size(version)
    SqueezeNet(version, input_shape=(smallest, smallest, 3))
    with pytest.raises(EdgesqzError, match="too small"):
        SqueezeNet(version, input_shape=(smallest - 1, smallest - 1, 3))


def test_builder_options() -> None:
    model = SqueezeNet("1_1", include_top=False, pooling="avg", input_shape=(96, 96, 3))
    assert model.output.shape == (None, 512)
    model = SqueezeNet("1_1", classes=7, classifier_activation=None, input_shape=(64, 64, 3))
    assert model.output.shape == (None, 7)
    with pytest.raises(EdgesqzError, match="classes=1000"):
        SqueezeNet("1_1", weights="imagenet", classes=10)
    with pytest.raises(EdgesqzError, match="unknown SqueezeNet version"):
        SqueezeNet("2_0")


def test_batch_norm_fire() -> None:
    model = SqueezeNet("1_1", batch_norm=True, classes=10, input_shape=(64, 64, 3))
    bn = [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    # stem + 3 per Fire module x 8
    assert len(bn) == 1 + 3 * 8
    assert "features.3.squeeze_bn" in bn and "features.3.expand3x3_bn" in bn
    assert model.get_layer("features.3.squeeze").use_bias is False
    out = model(np.random.default_rng(0).random((2, 64, 64, 3), dtype="float32"), training=True)
    assert out.shape == (2, 10)


def test_bypass_variants() -> None:
    plain = SqueezeNet("1_0")
    simple = SqueezeNet("1_0", bypass="simple")
    complex_ = SqueezeNet("1_0", bypass="complex")
    adds = lambda m: sorted(layer.name for layer in m.layers if isinstance(layer, keras.layers.Add))  # noqa: E731
    # the paper: simple bypass around fire3, fire5, fire7, fire9 = features.4, .7, .9, .12 in 1.0
    assert adds(simple) == sorted(f"features.{i}.bypass_add" for i in (4, 7, 9, 12))
    assert len(adds(complex_)) == 8
    assert simple.count_params() == plain.count_params()
    # 1x1 bypass convolutions around fire2, fire4, fire6, fire8 (with bias)
    extra = (96 * 128 + 128) + (128 * 256 + 256) + (256 * 384 + 384) + (384 * 512 + 512)
    assert complex_.count_params() == plain.count_params() + extra
