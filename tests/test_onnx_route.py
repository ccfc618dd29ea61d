"""The onnx2tf route end to end: PyTorch -> ONNX -> onnx2tf -> TFLite, cross-checked against the Keras route.

Real weights, real calibration photos (32), real onnx2tf runs (one int8, one float32, one on a
broken file). onnx2tf is looked up with ``find_spec``, never imported: importing it switches this
whole process to Keras 2.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2tf") is None:
    pytest.skip("onnx2tf is not installed", allow_module_level=True)

from torch_squeezenet import SqueezeNet as TorchSqueezeNet  # noqa: E402

from edgesqz.converters import onnx_route  # noqa: E402
from edgesqz.converters.torch_import import load_state_dict  # noqa: E402
from edgesqz.converters.torch_model import PixelSqueezeNet, from_state_dict, pixel_squeezenet, squeezenet  # noqa: E402
from edgesqz.datasets import calibration_set, load_images  # noqa: E402
from edgesqz.errors import EdgesqzError  # noqa: E402
from edgesqz.evaluate import tflite_outputs  # noqa: E402
from edgesqz.imaging import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, list_images  # noqa: E402
from edgesqz.modelinfo import graph_summary  # noqa: E402

pytestmark = pytest.mark.slow

CALIB = 32
HELD_OUT = 100
SIZE = 224


@pytest.fixture(scope="module")
def state(real_weights: Path) -> dict[str, np.ndarray]:
    return load_state_dict(real_weights)


@pytest.fixture(scope="module")
def calib(imagenet_sample: Path) -> Any:
    return calibration_set(imagenet_sample, CALIB, Preprocessing(size=SIZE), seed=0)


@pytest.fixture(scope="module")
def held_out(imagenet_sample: Path, calib: Any) -> np.ndarray:
    used = set(calib.sources)
    files = [f for f in list_images(imagenet_sample) if str(f) not in used][::8][:HELD_OUT]
    return load_images(files, Preprocessing(size=SIZE)).images


def _convert(state: dict[str, np.ndarray], tmp: Path, fmt: str, images: np.ndarray | None) -> tuple[bytes, Path]:
    log = tmp / f"{fmt}.onnx2tf.log"
    data = onnx_route.convert_via_onnx2tf(state, version="1_1", size=SIZE, fmt=fmt, calib_images=images,
                                          workdir=tmp / f"work-{fmt}", log_path=log)
    return data, log


@pytest.fixture(scope="module")
def onnx_int8(state: dict[str, np.ndarray], calib: Any, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[bytes, Path]:
    return _convert(state, tmp_path_factory.mktemp("onnx2tf-int8"), "int8", calib.images)


@pytest.fixture(scope="module")
def onnx_float32(state: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    return _convert(state, tmp_path_factory.mktemp("onnx2tf-float32"), "float32", None)


@pytest.fixture(scope="module")
def keras_int8(state: dict[str, np.ndarray], calib: Any) -> bytes:
    pytest.importorskip("keras")
    from edgesqz.converters.export import pixel_model, representative_dataset, to_tflite
    from edgesqz.converters.torch_import import state_dict_to_keras
    from edgesqz.squeezenet import SqueezeNet

    model = SqueezeNet("1_1", classifier_activation=None)
    state_dict_to_keras(state, model, version="1_1")
    return to_tflite(pixel_model(model, size=SIZE), "int8", representative=representative_dataset(calib.images))


def _details(model: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    from edgesqz.device.runtime import make_interpreter

    interpreter, _ = make_interpreter(model, threads=1)
    return interpreter.get_input_details()[0], interpreter.get_output_details()[0]


# --- the PyTorch side -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1_0", "1_1"])
def test_torch_model_has_torchvision_names_and_the_fold_is_exact(version: str) -> None:
    torch.manual_seed(1)
    reference = TorchSqueezeNet(version).eval()
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert list(squeezenet(version).state_dict()) == list(state)
    pixels = torch.rand(2, 3, 227, 227) * 255
    normalised = (pixels / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1)
    with torch.no_grad():
        expected = reference(normalised).numpy()
        got = pixel_squeezenet(state, version=version)(pixels).numpy()
        unfolded = from_state_dict(state, version=version)(normalised).numpy()
    assert np.abs(got - expected).max() <= 1e-5 * np.ptp(expected)
    np.testing.assert_array_equal(unfolded, expected)


def test_pixel_model_leaves_the_source_model_alone() -> None:
    model = squeezenet("1_1").eval()
    before = model.features[0].weight.detach().clone()
    PixelSqueezeNet(model)
    assert torch.equal(model.features[0].weight, before)


def test_wrong_weights_are_one_line_errors() -> None:
    state = {k: v.numpy() for k, v in TorchSqueezeNet("1_1").state_dict().items()}
    with pytest.raises(EdgesqzError, match="pass --arch 1_1"):
        onnx_route.convert_via_onnx2tf(state, version="1_0", size=SIZE, fmt="float32", calib_images=None,
                                       workdir=Path("unused"), log_path=Path("unused.log"))
    del state["features.3.squeeze.bias"]
    with pytest.raises(EdgesqzError, match=r"missing features\.3\.squeeze\.bias"):
        from_state_dict(state, version="1_1")


def test_bad_arguments_fail_before_any_work(tmp_path: Path) -> None:
    state = {k: v.numpy() for k, v in TorchSqueezeNet("1_1").state_dict().items()}
    common: dict[str, Any] = {"version": "1_1", "size": SIZE, "workdir": tmp_path / "w", "log_path": tmp_path / "l"}
    with pytest.raises(EdgesqzError, match="unknown format"):
        onnx_route.convert_via_onnx2tf(state, fmt="int4", calib_images=None, **common)
    with pytest.raises(EdgesqzError, match="int8 needs calibration images"):
        onnx_route.convert_via_onnx2tf(state, fmt="int8", calib_images=None, **common)
    with pytest.raises(EdgesqzError, match=r"must be \(N, 224, 224, 3\)"):
        onnx_route.convert_via_onnx2tf(state, fmt="int8", calib_images=np.zeros((2, 100, 100, 3), np.uint8),
                                       **common)
    assert not (tmp_path / "w").exists()


def test_flags_per_format(tmp_path: Path) -> None:
    assert onnx_route.onnx2tf_args("float32") == onnx_route.onnx2tf_args("float16") == []
    assert onnx_route.onnx2tf_args("dynamic") == ["-odrqt"]
    args = onnx_route.onnx2tf_args("int8", calib_path=tmp_path / "c.npy", io="uint8")
    assert args[:2] == ["-oiqt", "-cind"] and args[-4:] == ["-iqd", "uint8", "-oqd", "uint8"]
    assert args[4:6] == ["[[[[0,0,0]]]]", "[[[[1,1,1]]]]"]  # the normalisation is inside the graph


def test_calibration_array_anchors_the_pixel_range() -> None:
    images = np.full((3, 8, 8, 3), 100, np.uint8)
    data = onnx_route.calibration_array(images, 8)
    assert data.dtype == np.float32 and data.min() == 0.0 and data.max() == 255.0
    assert (data[1:] == 100).all()


# --- real conversions -------------------------------------------------------------------------------


def test_int8_model_meets_the_contract(onnx_int8: tuple[bytes, Path]) -> None:
    model, log = onnx_int8
    graph = graph_summary(model)
    assert graph["subgraphs"] == 1
    assert set(graph["tensor_types"]) <= {"INT8", "INT32"}, graph
    assert "TRANSPOSE" not in graph["ops"] and "CUSTOM" not in graph["ops"], graph
    inp, out = _details(model)
    assert list(inp["shape"]) == list(inp["shape_signature"]) == [1, SIZE, SIZE, 3]
    assert inp["dtype"] == np.int8 and inp["quantization"] == (1.0, -128)  # int8 input == pixel - 128
    assert list(out["shape"]) == list(out["shape_signature"]) == [1, 1000]
    assert out["dtype"] == np.int8
    assert log.is_file() and "-oiqt" in log.read_text()


def test_int8_agrees_with_the_keras_route(onnx_int8: tuple[bytes, Path], keras_int8: bytes, state: dict,
                                          held_out: np.ndarray) -> None:
    onnx_top = tflite_outputs(onnx_int8[0], held_out).argmax(1)
    keras_top = tflite_outputs(keras_int8, held_out).argmax(1)
    with torch.no_grad():
        float_top = pixel_squeezenet(state, version="1_1")(
            torch.from_numpy(held_out.transpose(0, 3, 1, 2).astype(np.float32))).numpy().argmax(1)
    assert len(held_out) >= 90
    assert (onnx_top == keras_top).mean() >= 0.90
    assert (onnx_top == float_top).mean() >= 0.90


def test_float32_model_matches_pytorch(onnx_float32: tuple[bytes, Path], state: dict, held_out: np.ndarray) -> None:
    model, _ = onnx_float32
    inp, out = _details(model)
    assert inp["dtype"] == np.float32 and list(inp["shape_signature"]) == [1, SIZE, SIZE, 3]
    assert out["dtype"] == np.float32 and list(out["shape_signature"]) == [1, 1000]
    images = held_out[:16]
    got = tflite_outputs(model, images)
    with torch.no_grad():
        expected = pixel_squeezenet(state, version="1_1")(
            torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.ptp(expected)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


def test_a_model_that_breaks_the_contract_is_refused(onnx_float32: tuple[bytes, Path]) -> None:
    model, log = onnx_float32
    with pytest.raises(EdgesqzError) as info:
        onnx_route.check_contract(model, fmt="int8", size=SIZE, classes=1000, log_path=log)
    message = str(info.value)
    assert "\n" not in message and str(log) in message
    assert "input dtype float32 (expected int8)" in message and "non-integer tensors" in message
    with pytest.raises(EdgesqzError, match=r"input shape \[1, 224, 224, 3\] \(expected \[1, 227, 227, 3\], NHWC\)"):
        onnx_route.check_contract(model, fmt="float32", size=227, classes=1000)


# --- failures -----------------------------------------------------------------------------------------


def test_broken_onnx_is_one_line_with_the_log_kept(tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"this is not an ONNX model")
    log = tmp_path / "onnx2tf.log"
    with pytest.raises(EdgesqzError) as info:
        onnx_route.onnx_to_tflite(broken, fmt="float32", calib=None, workdir=tmp_path, log_path=log)
    message = str(info.value)
    assert "\n" not in message and message.startswith("onnx2tf failed (exit") and str(log) in message
    assert "Traceback" in log.read_text()


def test_missing_onnx2tf_is_one_line_with_the_log_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_route, "onnx2tf_command", lambda: [str(tmp_path / "no-such-onnx2tf")])
    state = {k: v.numpy() for k, v in TorchSqueezeNet("1_1").state_dict().items()}
    log = tmp_path / "onnx2tf.log"
    with pytest.raises(EdgesqzError) as info:
        onnx_route.convert_via_onnx2tf(state, version="1_1", size=SIZE, fmt="float32", calib_images=None,
                                       workdir=tmp_path / "work", log_path=log)
    message = str(info.value)
    assert "\n" not in message and 'pip install "edgesqz[convert]"' in message and str(log) in message
    assert "no-such-onnx2tf" in log.read_text()


# --- the CLI: `convert --via onnx2tf` with the improved int8 (--ptq best, the default) ------------------


def test_cli_best_int8_via_onnx2tf_matches_the_keras_route(tmp_path: Path, real_weights: Path, imagenet_sample: Path,
                                                           imagenet_labels: Path, int8_model: Path,
                                                           held_out: np.ndarray) -> None:
    """The same prepared weights (equalised, GPTQ-rounded, class map out) through PyTorch -> ONNX -> onnx2tf,
    then the same standard head.

    ``int8_model`` is the Keras route's model with the same calibration images (conftest: 48, seed 0).
    """
    import json
    import subprocess
    import sys

    from conftest import CALIB_FOR_TESTS

    from edgesqz.tflite_metadata import read_metadata

    out = tmp_path / "onnx-int8.tflite"
    result = subprocess.run(
        [sys.executable, "-m", "edgesqz", "convert", "--int8", "--via", "onnx2tf", "--weights", str(real_weights),
         "--calib", str(imagenet_sample), "--calib-count", str(CALIB_FOR_TESTS), "--labels", str(imagenet_labels),
         "-o", str(out), "--json"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["route"] == "onnx2tf" and report["format"] == "int8"
    model = out.read_bytes()
    from edgesqz.converters.standard_head import standard_classifier_problems

    assert standard_classifier_problems(model) == []
    assert graph_summary(model)["ops"]["CONV_2D"] == 26
    inp, out_detail = _details(model)
    assert inp["dtype"] == np.uint8 and inp["quantization"] == (1.0, 0)
    assert list(out_detail["shape_signature"]) == [1, 1000] and out_detail["dtype"] == np.float32
    assert read_metadata(out).info["output"]["kind"] == "probabilities"
    onnx_top = tflite_outputs(model, held_out).argmax(1)
    keras_top = tflite_outputs(int8_model.read_bytes(), held_out).argmax(1)
    assert (onnx_top == keras_top).mean() >= 0.97
