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


# --- the architecture as data -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["1_0", "1_1", "cifar", "squeezenet1_0_simple_bypass", "squeezenet1_1_bn",
                                  "squeezenet_cifar_plain", "squeezenet1_0_bn_complex_bypass"])
def test_description_round_trips_and_names_itself(name: str) -> None:
    from edgesqz.architecture import Architecture, architecture

    arch = architecture(name)
    assert Architecture.from_dict(arch.to_dict()) == arch
    assert architecture(arch.name) == arch  # the name alone says which variant it is
    assert SqueezeNet(arch).name == arch.name


def test_keras_layers_are_the_pytorch_keys_of_each_layout() -> None:
    torch = pytest.importorskip("torch")
    from torch_squeezenet import CifarSqueezeNet
    from torch_squeezenet import SqueezeNet as TorchSqueezeNet

    from edgesqz.converters.torch_import import keras_to_state_dict

    def keys(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape[::-1]) if v.ndim == 4 else tuple(v.shape)
                for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}

    for keras_model, reference in ((SqueezeNet("1_0"), TorchSqueezeNet("1_0")),
                                   (SqueezeNet("1_1"), TorchSqueezeNet("1_1")),
                                   (SqueezeNet("cifar"), CifarSqueezeNet(100)),
                                   (SqueezeNet("cifar", classes=7), CifarSqueezeNet(7))):
        mine = {k: tuple(v.shape[::-1]) if v.ndim == 4 else tuple(v.shape)
                for k, v in keras_to_state_dict(keras_model).items()}
        assert mine.keys() == keys(reference).keys(), keras_model.name
        assert {k: sorted(v) for k, v in mine.items()} == {k: sorted(v) for k, v in keys(reference).items()}
        assert keras_model.count_params() - sum(
            int(np.prod(w.shape)) for layer in keras_model.layers
            if isinstance(layer, keras.layers.BatchNormalization) for w in layer.weights[2:]
        ) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("name", ["1_1", "cifar", "squeezenet1_0_complex_bypass", "squeezenet1_1_bn"])
def test_one_description_two_frameworks(name: str) -> None:
    """The PyTorch builder reads the same description: the same keys, and the same function."""
    torch = pytest.importorskip("torch")
    from edgesqz.architecture import architecture
    from edgesqz.converters.torch_import import keras_to_state_dict, state_dict_to_keras
    from edgesqz.converters.torch_model import squeezenet

    arch = architecture(name)
    net = squeezenet(arch, 10).eval()
    model = SqueezeNet(arch, classes=10, classifier_activation=None, input_shape=(64, 64, 3))
    assert set(keras_to_state_dict(model)) == {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    state_dict_to_keras({k: v.numpy() for k, v in net.state_dict().items()}, model)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(model(x, training=False).numpy(), expected, atol=1e-4)


def test_cifar_network_shapes() -> None:
    model = SqueezeNet("cifar", classifier_activation=None)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 100)
    assert model.get_layer("fire9").output.shape[1:] == (4, 4, 512)
    assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.Add)] == [
        "fire3.bypass_add", "fire5.bypass_add", "fire7.bypass_add"]
    assert model.get_layer("stem.0").use_bias and isinstance(model.get_layer("stem.1"), keras.layers.BatchNormalization)
    assert "conv10_relu" not in {layer.name for layer in model.layers}  # no ReLU after conv10
    assert min_input_size("cifar") == 8
