"""Better full-integer (int8) post-training quantisation for SqueezeNet pixel models.

Four sound transforms (measured in ``benchmarks/quant_ablation.py``):

- **Class-map head** (:func:`class_map_model`, :func:`pool_class_map`): the int8 graph stops at
  ``classifier.2`` (ReLU of the final 1x1 conv, N x N x classes) and the device averages that map
  in float. SqueezeNet's logits are a global average of the class map, so this is the same
  function, but the averaged int8 map has ~N*N times finer resolution than an int8 logit
  (whose scale is ~0.2 logit), so ties between close classes all but disappear.
- **Equalisation** (:func:`equalize`): positive per-channel rescaling between a convolution and its
  consumers (ReLU and max-pool commute with it), as in Nagel et al. 2019, "Data-free quantization
  through weight equalization and bias correction". ``method="weights"`` is their data-free
  cross-layer equalisation; ``method="activations"`` balances the calibrated per-channel
  activation range against the consumer's weight range (what matters with per-tensor activations
  and per-channel weights). The float function is unchanged.
- **Empirical bias correction** (:func:`bias_correct`): convert, run the int8 model on calibration
  images, measure each convolution's mean pre-activation error per output channel (int8 input and
  int8 weights vs float weights on the same int8 input) and subtract it from the float bias.
- **Error-compensating rounding** (:func:`round_weights`): GPTQ-style rounding of each kernel onto
  the converter's own int8 grid so that the layer *output* error, not the weight error, is small,
  with each output channel's grid clipped where that lowers the output error further.

:func:`prepare_int8` chains the recommended ones (equalisation with ``method="activations"``,
error-compensating rounding, class-map head). Everything returns a new Keras model and leaves
its argument untouched. :func:`pool_class_map` is numpy only, so the device can import this
module without TensorFlow (Keras is imported lazily).

Measured on the shared 200/800 split and not adopted (notes for whoever tries next): weights-only
int8 costs ~2.4 points of agreement and activations-only ~2.3 (both simulated), spread over all
layers. Learning the rounding end to end on the pooled logits (AdaRound with fake-quantised
activations, from the float or the GPTQ weights) did not converge to a better hard rounding in
600 steps; straight-through fine-tuning of the weights on the calibration images halved their
logit error but left held-out agreement unchanged (96.75 %: 200 images are too few to learn
from); per-class output scales clip the top class of unseen images; 400 calibration images gave
96.2-96.7 %. Block-wise learned rounding (BRECQ/QDrop: AdaRound per Fire module on cached block
inputs, fake-quantised activations, QDrop input mixing, 400-600 Adam steps per block, ~6 min) gave
95.6-96.4 % from float or GPTQ starts: in that many steps most rounding variables stay soft, and
the hard rounding loses the soft solution's gain; the papers' 20k steps per block would take hours
on a 2-core machine. Straight-through fine-tuning as a distillation on augmented data (random
resized crops, flips and brightness/contrast jitter of the 200 calibration photos, KL to the float
model's logits, Adam, 400-600 steps of 16, 10-15 min) did not lower the KL and gave 96.88 % (real
TFLite, seed-0 split); a longer run of the same (3,000 steps of 16, Adam at 2e-3 on the weights in
grid units and 1e-4 on the biases, crops down to 8 % of the area, mixup on 30 % of a batch, ~70
min) lowered the KL on the calibration photos by 29 % and the held-out margin error below by 8 %,
but gave 96.75 % (real TFLite). Where the error is (seed-0 split, torch simulation): every
held-out image on which int8 and float disagree has a float top-1/top-2 logit margin below 0.14
(0.23 for an earlier variant run in TFLite); int8 perturbs that margin with a standard deviation
of 0.155 (int8 weights alone 0.085, activations alone 0.128; the largest single activations are
``features.0`` at 0.048 and ``features.3.squeeze`` at 0.053, the rest 0.01-0.02 each), and agreement moves by
~0.2 points per 0.01 of it (2.4 % disagreement at 0.085, 3.0 % at 0.155), so passing 97 % on most 800-image
checks needs ~0.11: half the error variance, which splitting the noisiest tensors' channels cannot
buy within 1.40 MB. Over eight splits ``--ptq best`` averages 96.97 % agreement (standard
deviation 0.66) and a 0.22-point drop; re-rounding ~30 channels of the same weights alone moves
agreement by ~0.4 points, so differences smaller than that between variants are not evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from edgesqz.errors import EdgesqzError

if TYPE_CHECKING:
    import keras

    from edgesqz.tflite_int4 import Grid

EqualizeMethod = Literal["weights", "activations"]



# --------------------------------------------------------------------------------------------
# Class-map head


def class_map_model(model: keras.Model) -> keras.Model:
    """``model`` (a SqueezeNet pixel model) without its final global average pool.

    Output: the class map (1, N, N, classes) that the pool averages (after the head's ReLU where
    the architecture has one); its spatial mean is the original model's logits. Shares layers
    (and weights) with ``model``.
    """
    import keras

    pools = [layer for layer in model.layers if type(layer).__name__ == "GlobalAveragePooling2D"]
    if not pools:
        raise EdgesqzError("class_map_model needs a SqueezeNet with its classifier (a global average pool)")
    return keras.Model(model.inputs, pools[-1].input, name=f"{model.name}_class_map")


def pool_class_map(out: np.ndarray, scale: float = 1.0, zero_point: int = 0) -> np.ndarray:
    """Logits from a class-map model's output: dequantise, then average over the spatial axes.

    ``out`` is (N, H, W, C) or (H, W, C), int8/uint8 (pass the output tensor's ``scale`` and
    ``zero_point``) or float. Returns float32 (N, C) or (C,). The mean is taken of the integers
    first, so it costs one pass over the map.
    """
    if out.ndim not in (3, 4):
        raise EdgesqzError(f"expected a class map (H, W, C) or (N, H, W, C), got shape {out.shape}")
    axes = (-3, -2)
    mean = out.astype(np.float32).mean(axis=axes) if np.issubdtype(out.dtype, np.integer) else out.mean(axis=axes)
    return ((mean - zero_point) * scale).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Equalisation


@dataclass(frozen=True)
class ScalePair:
    """Channels that can be rescaled together.

    ``producers`` are convolutions whose output channels, concatenated in this order, form the
    tensor that every convolution in ``consumers`` reads (through ReLU, max-pool, zero padding and
    inference-time dropout only, all of which commute with a positive per-channel scale);
    ``activations`` are the ReLU layers right after the producers.
    """

    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    activations: tuple[str, ...] = ()


_PASS_THROUGH = ("MaxPooling2D", "ZeroPadding2D", "Dropout")


def _producers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    if type(layer).__name__ == "InputLayer":
        return []
    tensors = layer.input if isinstance(layer.input, list | tuple) else [layer.input]
    return [t._keras_history.operation for t in tensors]


def _consumers(model: keras.Model) -> dict[str, list[keras.layers.Layer]]:
    table: dict[str, list[keras.layers.Layer]] = {}
    for layer in model.layers:
        for producer in _producers(layer):
            table.setdefault(producer.name, []).append(layer)
    return table


def can_equalize(model: keras.Model) -> bool:
    """Whether :func:`equalize` applies: batch norms folded, and at least one producer/consumer pair."""
    return not any(type(layer).__name__ == "BatchNormalization" for layer in model.layers) and bool(scale_pairs(model))


def scale_pairs(model: keras.Model) -> list[ScalePair]:
    """Every producer/consumer pair of a SqueezeNet (batch norms folded), found from the graph.

    A tensor qualifies when it is a convolution's ReLU output (or a channel concatenation of such
    outputs, a Fire module's) and every path from it reaches only convolutions, through the layers
    that commute with per-channel scaling. A tensor that also feeds a bypass Add, the model's output
    or the final pool does not qualify, so bypass variants keep their shortcuts exact.
    """
    if any(type(layer).__name__ == "BatchNormalization" for layer in model.layers):
        raise EdgesqzError("equalisation needs batch norms folded into the convolutions (use export.pixel_model)")
    consumers = _consumers(model)
    outputs = {t._keras_history.operation.name for t in model.outputs}

    def reach(layer: keras.layers.Layer) -> list[keras.layers.Layer] | None:
        """The convolutions that read ``layer``'s output, or None if anything else does."""
        if layer.name in outputs or not consumers.get(layer.name):
            return None
        found: list[keras.layers.Layer] = []
        for c in consumers[layer.name]:
            kind = type(c).__name__
            if kind == "Conv2D":
                found.append(c)
            elif kind in _PASS_THROUGH:
                below = reach(c)
                if below is None:
                    return None
                found += below
            else:
                return None
        return found

    def conv_relu(layer: keras.layers.Layer) -> keras.layers.Layer | None:
        """The Conv2D right before a ReLU layer (None if there is none)."""
        if type(layer).__name__ != "ReLU" or layer.max_value is not None or layer.negative_slope:
            return None
        (producer,) = _producers(layer)
        return producer if type(producer).__name__ == "Conv2D" else None

    pairs: list[ScalePair] = []
    done: set[str] = set()
    for layer in model.layers:
        if conv_relu(layer) is None:
            continue
        group, tensor = [layer], layer
        after = consumers.get(layer.name, [])
        if len(after) == 1 and type(after[0]).__name__ == "Concatenate":
            concat = after[0]
            members = _producers(concat)
            if concat.name in done or concat.axis not in (-1, 3) or not all(
                    conv_relu(m) is not None and len(consumers.get(m.name, [])) == 1 for m in members):
                continue
            done.add(concat.name)
            group, tensor = members, concat
        targets = reach(tensor)
        if targets:
            names = list(dict.fromkeys(t.name for t in targets))
            pairs.append(ScalePair(tuple(conv_relu(m).name for m in group), tuple(names),  # type: ignore[union-attr]
                                   tuple(m.name for m in group)))
    return pairs


def _clone(model: keras.Model) -> keras.Model:
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def _consumer_range(model: keras.Model, pair: ScalePair) -> np.ndarray:
    """Per input channel: the largest |weight| over all consumers and their output channels."""
    ranges = [np.abs(model.get_layer(name).get_weights()[0]).max(axis=(0, 1, 3)) for name in pair.consumers]
    return np.max(ranges, axis=0)


def _producer_range(model: keras.Model, pair: ScalePair) -> np.ndarray:
    """Per output channel (concatenated): the largest |weight| of the producing filter."""
    return np.concatenate([np.abs(model.get_layer(n).get_weights()[0]).max(axis=(0, 1, 2)) for n in pair.producers])


def _apply_scale(model: keras.Model, pair: ScalePair, s: np.ndarray) -> None:
    """Divide the pair's activation channels by ``s`` (> 0): producers / s, consumer inputs * s."""
    start = 0
    for name in pair.producers:
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        part = s[start : start + kernel.shape[-1]]
        start += kernel.shape[-1]
        layer.set_weights([kernel / part, bias / part])
    for name in pair.consumers:
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel * s[None, None, :, None], bias])


def activation_ranges(model: keras.Model, images: np.ndarray, pairs: Sequence[ScalePair]) -> list[np.ndarray]:
    """Per pair, the per-channel maximum of its (post-ReLU) activation over ``images`` (uint8 pixels)."""
    import keras

    outputs = [model.get_layer(name).output for pair in pairs for name in pair.activations]
    probe = keras.Model(model.inputs, outputs)
    maxima = [np.zeros(t.shape[-1], np.float64) for t in outputs]
    for start in range(0, len(images), 16):
        batch = images[start : start + 16].astype(np.float32)
        for j, y in enumerate(_run(probe, batch)):
            maxima[j] = np.maximum(maxima[j], y.max(axis=(0, 1, 2)))
    result, k = [], 0
    for pair in pairs:
        result.append(np.concatenate(maxima[k : k + len(pair.producers)]))
        k += len(pair.producers)
    return result


def _run(probe: keras.Model, batch: np.ndarray) -> list[np.ndarray]:
    """Every output of ``probe`` on ``batch``, as numpy arrays.

    Called eagerly: ``predict_on_batch`` would trace a new tf.function for each of the many short-lived
    probe models, and TensorFlow then prints retracing warnings at the user.
    """
    out = probe([batch], training=False)
    return [np.asarray(y) for y in (out if isinstance(out, list | tuple) else [out])]


def equalize(
    model: keras.Model,
    *,
    method: EqualizeMethod = "weights",
    calib_images: np.ndarray | None = None,
    iterations: int = 20,
    alpha: float = 1.0,
) -> keras.Model:
    """Cross-layer equalisation of a plain SqueezeNet (pixel) model; returns a rescaled copy.

    For each channel ``c`` of a producer -> consumer pair the activation is divided by ``s_c > 0``
    (producer weights and bias / s_c, consumer input weights * s_c): the float function is
    unchanged up to rounding.

    - ``"weights"`` (data-free, Nagel et al.): ``s_c = sqrt(r1_c / r2_c)`` with r1 the producer
      filter's and r2 the consumer input channel's weight range, so both become sqrt(r1 r2).
    - ``"activations"``: ``s_c = a_c**alpha / r2_c**(1 - alpha)`` with ``a_c`` the channel's
      maximum activation on ``calib_images``. alpha=1 (default) gives every channel of a tensor
      the same calibrated range, so the per-tensor int8 grid fits each channel equally well, and
      moves the range differences into the consumer's weights (per-channel quantised; pair it
      with :func:`round_weights`); alpha=0.5 balances both at sqrt(a_c r2_c).

    Pairs share layers (a Fire's squeeze is a consumer of one pair and producer of the next), so
    the scales are re-solved ``iterations`` times until they settle.
    """
    if method not in ("weights", "activations"):
        raise EdgesqzError(f"method must be 'weights' or 'activations', not {method!r}")
    if method == "activations" and (calib_images is None or len(calib_images) == 0):
        raise EdgesqzError("equalize(method='activations') needs calibration images")
    out = _clone(model)
    pairs = scale_pairs(out)
    act = activation_ranges(out, calib_images, pairs) if method == "activations" else None
    for _ in range(iterations):
        for k, pair in enumerate(pairs):
            r2 = _consumer_range(out, pair)
            r1 = act[k] if act is not None else _producer_range(out, pair)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r2, dtype=np.float64)
            if act is None:
                s[ok] = np.sqrt(r1[ok] / r2[ok])
            else:
                s[ok] = r1[ok] ** alpha / r2[ok] ** (1.0 - alpha)
            _apply_scale(out, pair, s.astype(np.float32))
            if act is not None:
                act[k] = act[k] / s
    return out


# --------------------------------------------------------------------------------------------
# Bias correction


Converter = Callable[["keras.Model"], bytes]


def default_converter(calib_images: np.ndarray) -> Converter:
    """The standard full-integer conversion calibrated on ``calib_images``."""
    from edgesqz.converters.export import representative_dataset, to_tflite

    def convert(model: keras.Model) -> bytes:
        return to_tflite(model, "int8", representative=representative_dataset(calib_images))

    return convert


@dataclass(frozen=True)
class _QuantConv:
    name: str
    input_index: int
    kernel: np.ndarray  # dequantised, HWIO
    bias: np.ndarray  # dequantised


def _quantized_convs(model_bytes: bytes, interpreter: object) -> list[_QuantConv]:
    """Every CONV_2D of a TFLite model: Keras layer name, input tensor, dequantised weights."""
    import re

    from ai_edge_litert import schema_py_generated as schema

    m = schema.Model.GetRootAs(model_bytes, 0)
    sub = m.Subgraphs(0)
    conv_code = schema.BuiltinOperator.CONV_2D
    details = {d["index"]: d for d in interpreter.get_tensor_details()}  # type: ignore[attr-defined]

    def dequantize(index: int) -> np.ndarray:
        q = details[index]["quantization_parameters"]
        values = interpreter.get_tensor(index).astype(np.float64)  # type: ignore[attr-defined]
        scales, zeros = q["scales"], q["zero_points"]
        shape = [-1] + [1] * (values.ndim - 1)
        return (values - zeros.reshape(shape)) * scales.reshape(shape)

    convs = []
    for i in range(sub.OperatorsLength()):
        op = sub.Operators(i)
        oc = m.OperatorCodes(op.OpcodeIndex())
        if max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()) != conv_code:
            continue
        x, w, b = (int(v) for v in op.InputsAsNumpy()[:3])
        found = re.search(r"/([^/;]+?)(?:_\d+)?/convolution$", sub.Tensors(w).Name().decode())
        if found is None:
            raise EdgesqzError(f"cannot tell which layer TFLite weight tensor {sub.Tensors(w).Name()!r} belongs to")
        kernel = dequantize(w).transpose(1, 2, 3, 0)  # OHWI -> HWIO
        convs.append(_QuantConv(found.group(1), x, kernel.astype(np.float32), dequantize(b).astype(np.float32)))
    return convs


def conv_errors(
    model: keras.Model,
    model_bytes: bytes,
    calib_images: np.ndarray,
    layers: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Mean pre-activation error per output channel that each convolution's own int8 weights cause.

    Both sides read the convolution's real int8 input (from the TFLite interpreter of
    ``model_bytes``, dequantised): int8 weights plus int32 bias vs the float weights and bias of
    ``model``. Errors inherited from earlier layers are left out, so correcting every layer at
    once counts nothing twice. ``layers``: the convolutions to measure (default: all).
    """
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_content=model_bytes,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        experimental_preserve_all_tensors=True,
    )
    interpreter.allocate_tensors()
    convs = [c for c in _quantized_convs(model_bytes, interpreter) if layers is None or c.name in layers]
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    inp = interpreter.get_input_details()[0]
    sums = {c.name: np.zeros(c.kernel.shape[-1], np.float64) for c in convs}
    count = dict.fromkeys(sums, 0)
    batch_size = 8
    for start in range(0, len(calib_images), batch_size):
        batch = calib_images[start : start + batch_size]
        quant_inputs: list[list[np.ndarray]] = [[] for _ in convs]
        for image in batch:
            scale, zero = inp["quantization"]
            x = np.round(image.astype(np.float32) / scale + zero).clip(-128, 127) if scale else image
            interpreter.set_tensor(inp["index"], x.astype(inp["dtype"])[None])
            interpreter.invoke()
            for j, c in enumerate(convs):
                s, z = details[c.input_index]["quantization"]
                quant_inputs[j].append((interpreter.get_tensor(c.input_index)[0].astype(np.float32) - z) * s)
        for j, c in enumerate(convs):
            layer = model.get_layer(c.name)
            xq = tf.constant(np.stack(quant_inputs[j]))
            strides, padding = layer.strides, layer.padding.upper()
            yq = tf.nn.conv2d(xq, c.kernel, strides=strides, padding=padding) + c.bias
            kernel, bias = layer.get_weights()
            yf = tf.nn.conv2d(xq, kernel, strides=strides, padding=padding) + bias
            diff = yq.numpy().astype(np.float64) - yf.numpy().astype(np.float64)
            sums[c.name] += diff.sum(axis=(0, 1, 2))
            count[c.name] += diff.shape[0] * diff.shape[1] * diff.shape[2]
    return {name: sums[name] / count[name] for name in sums}


def bias_correct(model: keras.Model, calib_images: np.ndarray, *, convert: Converter | None = None) -> keras.Model:
    """Empirical bias correction; returns a copy whose conv biases cancel the int8 weights' mean error.

    Converts ``model`` once with ``convert`` (default: the standard int8 recipe calibrated on
    ``calib_images``), measures :func:`conv_errors` on ``calib_images`` and subtracts them from the
    float biases. (Correcting the *whole* pre-activation error against the float model, stage by
    stage, was measured too and is worse: most of that error sits in negative pre-activations
    that the ReLU discards.)
    """
    if len(calib_images) == 0:
        raise EdgesqzError("bias correction needs calibration images")
    convert = convert or default_converter(calib_images)
    out = _clone(model)
    for name, err in conv_errors(out, convert(out), calib_images).items():
        layer = out.get_layer(name)
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel, (bias - err).astype(bias.dtype)])
    return out


# --------------------------------------------------------------------------------------------
# Error-compensating weight rounding


def _input_gram(model: keras.Model, names: Sequence[str], calib_images: np.ndarray) -> dict[str, np.ndarray]:
    """Per convolution: mean X^T X of its im2col input patches (rows ordered like an HWIO kernel)."""
    import keras
    import tensorflow as tf

    probe = keras.Model(model.inputs, [model.get_layer(n).input for n in names])
    sums: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(names, 0)
    for start in range(0, len(calib_images), 8):
        inputs = _run(probe, calib_images[start : start + 8].astype(np.float32))
        for name, x in zip(names, inputs, strict=True):
            layer = model.get_layer(name)
            kh, kw = layer.kernel_size
            sh, sw = layer.strides
            if (kh, kw) != (1, 1) or (sh, sw) != (1, 1):
                x = tf.image.extract_patches(x, [1, kh, kw, 1], [1, sh, sw, 1], [1, 1, 1, 1], layer.padding.upper())
            rows = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + rows.T @ rows
            counts[name] += rows.shape[0]
    return {name: sums[name] / counts[name] for name in names}


def _patches(layer: keras.layers.Layer, x: np.ndarray) -> np.ndarray:
    """im2col rows of ``layer``'s input ``x`` (ordered like an HWIO kernel), float64."""
    import tensorflow as tf

    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    if (kh, kw) != (1, 1) or (sh, sw) != (1, 1):
        x = tf.image.extract_patches(x, [1, kh, kw, 1], [1, sh, sw, 1], [1, 1, 1, 1], layer.padding.upper())
    return np.asarray(x, np.float64).reshape(-1, x.shape[-1])


def _quantized_input_grams(reference: keras.Model, model: keras.Model, names: Sequence[str],
                           calib_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For convolutions sharing one input: (Xq^T Xq, Xq^T Xf) / n, Xq their im2col input in ``model`` (whose
    earlier layers are already rounded) and Xf the same in the float ``reference``."""
    import keras

    first = model.get_layer(names[0])
    probe_q = keras.Model(model.inputs, first.input)
    probe_f = keras.Model(reference.inputs, reference.get_layer(names[0]).input)
    hq: np.ndarray | float = 0.0
    cross: np.ndarray | float = 0.0
    count = 0
    for start in range(0, len(calib_images), 8):
        batch = calib_images[start : start + 8].astype(np.float32)
        xq = _patches(first, _run(probe_q, batch)[0])
        xf = _patches(first, _run(probe_f, batch)[0])
        hq = hq + xq.T @ xq
        cross = cross + xq.T @ xf
        count += len(xq)
    return np.asarray(hq) / count, np.asarray(cross) / count


def sequential_rounding(reference: keras.Model, plan: WeightPlan, calib_images: np.ndarray, *,
                        damp: float = 0.01) -> WeightPlan:
    """Round every convolution again, in graph order, on the inputs of the already rounded network.

    Plain GPTQ rounds each layer for the float network's inputs. Here layer l sees the inputs ``Xq`` that
    the layers before it, already rounded, produce, and aims at the float network's output ``Xf W``:
    ``|| Xq Q - Xf W ||`` is smallest for ``Q`` near ``W* = (Xq^T Xq)^-1 Xq^T Xf W``, which GPTQ then rounds
    with ``Xq^T Xq`` (as GPTQ and OBQ do for CNNs), so each layer also absorbs the error of the ones
    before it. Same bits and clipping search as ``plan``; returns the new plan (its model changed in place).
    """
    from edgesqz.tflite_int4 import Grid

    out = plan._choices.out if plan._choices is not None else plan.model
    names = conv_layers(out)
    groups: list[list[str]] = []
    seen: dict[int, int] = {}
    for name in names:  # convolutions that read the same tensor (a Fire module's two expands) share grams
        layer = out.get_layer(name)
        key = hash((id(layer.input), tuple(layer.kernel_size), tuple(layer.strides), layer.padding))
        if key in seen:
            groups[seen[key]].append(name)
        else:
            seen[key] = len(groups)
            groups.append([name])
    grids = dict(plan.grids)
    for group in groups:
        hq, cross = _quantized_input_grams(reference, out, group, calib_images)
        ridge = hq + damp * np.mean(np.diag(hq)) * np.eye(len(hq))
        for name in group:
            layer = out.get_layer(name)
            kernel, bias = layer.get_weights()
            w = reference.get_layer(name).get_weights()[0].reshape(-1, kernel.shape[-1]).astype(np.float64)
            target = np.linalg.solve(ridge, cross @ w)
            if plan.bits[name] == 4:
                rounded, step = _gptq_search(target, hq, damp, INT4_CLIP_RATIOS, INT4_LEVELS, keep_end=False)
                values = np.round(rounded / step).astype(np.int8).reshape(kernel.shape)
                grids[name] = Grid(values, step.astype(np.float32))
            else:
                rounded = _gptq_rows(target, hq, damp)
            layer.set_weights([rounded.reshape(kernel.shape).astype(kernel.dtype), bias])
    suffix = ", sequential (rounded inputs)"
    method = plan.method if plan.method.endswith(suffix) else plan.method + suffix
    return WeightPlan(plan.model, plan.bits, grids, plan.sensitivity, method, plan._choices)


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _gptq_pass(w: np.ndarray, hinv: np.ndarray, scale: np.ndarray, qmax: int = 127) -> np.ndarray:
    """One GPTQ pass: round row by row onto ``scale``'s symmetric grid (levels -qmax..qmax), pushing each
    row's rounding error onto the rows still to be rounded (``hinv``: upper Cholesky factor of H^-1)."""
    w = w.copy()
    q = np.zeros_like(w)
    block = 64  # GPTQ's lazy batch updates: row by row inside a block, one matrix product for the rows after it
    for b0 in range(0, len(w), block):
        b1 = min(b0 + block, len(w))
        errors = np.zeros((b1 - b0, w.shape[1]))
        for i in range(b0, b1):
            q[i] = np.clip(np.round(w[i] / scale), -qmax, qmax) * scale
            err = (w[i] - q[i]) / hinv[i, i]
            w[i + 1 : b1] -= np.outer(hinv[i, i + 1 : b1], err)
            errors[i - b0] = err
        w[b1:] -= hinv[b0:b1, b1:].T @ errors
    return q


def _gptq_search(kernel: np.ndarray, gram: np.ndarray, damp: float, ratios: Sequence[float], qmax: int,
                 keep_end: bool, act_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ with a per-column clipping search onto a symmetric grid of levels -qmax..qmax.

    Returns the rounded (d, out) kernel and each column's grid step. ``keep_end``: a column that
    compensation left short of its grid's end falls back to plain rounding on that grid (the int8
    converter would otherwise pick a finer grid and re-round it); 4-bit grids are written into the
    model file directly (:mod:`edgesqz.tflite_int4`), so they need not reach their end.
    """
    order = np.argsort(-np.diag(gram), kind="stable") if act_order else np.arange(len(gram))
    w = kernel.astype(np.float64)[order]
    gram = gram[order][:, order]
    h = gram.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper triangular
    top = np.abs(w).max(axis=0)
    top[top == 0] = 1.0
    best, best_err, best_scale = None, None, None
    for ratio in ratios:
        scale = top * ratio / qmax
        q = _gptq_pass(w, hinv, scale, qmax)
        if keep_end:
            nearest = np.clip(np.round(w / scale), -qmax, qmax) * scale
            off_grid = np.abs(q).max(axis=0) < qmax * scale * (1 - 1e-6)
            q[:, off_grid] = nearest[:, off_grid]
        e = w - q
        err = np.sum(e * (gram @ e), axis=0)  # (w - q)^T H (w - q) per column
        if best is None or best_err is None or best_scale is None:
            best, best_err, best_scale = q, err, scale.copy()
        else:
            better = err < best_err
            best[:, better] = q[:, better]
            best_scale[better] = scale[better]
            best_err = np.minimum(err, best_err)
    assert best is not None and best_scale is not None
    result = np.empty_like(best)
    result[order] = best
    return result, best_scale


def _gptq_rows(kernel: np.ndarray, gram: np.ndarray, damp: float,
               ratios: Sequence[float] = CLIP_RATIOS, act_order: bool = False) -> np.ndarray:
    """Round a (d, out) kernel to a symmetric per-column int8 grid, compensating each rounding
    error on the not-yet-rounded inputs so that ``|| X (W - Q) ||`` stays small (GPTQ).

    Each column's grid ends at ``ratio * max|w|`` for the ratio in ``ratios`` whose result has the
    smallest output error ``(w - q)^T H (w - q)``: clipping a few outlying weights often buys a
    finer grid for all the others. The chosen maximum always sits on the grid's end, so the
    converter (which sets each scale to max|w| / 127) reproduces the grid exactly.
    """
    # act_order: rows with the most input energy first (GPTQ's "act order"); measured on three
    # calibration splits it did not help here (benchmarks/quant_ablation.py), so it is off by default.
    return _gptq_search(kernel, gram, damp, ratios, 127, keep_end=True, act_order=act_order)[0]


def round_weights(model: keras.Model, calib_images: np.ndarray, *, damp: float = 0.01,
                  clip_ratios: Sequence[float] = CLIP_RATIOS, act_order: bool = False) -> keras.Model:
    """Error-compensating int8 rounding of every convolution's weights (GPTQ, Frantar et al. 2022).

    Each kernel is put on exactly the grid the converter will use (per output channel, symmetric,
    scale max|w| / 127), but instead of rounding every weight to the nearest level the rounding
    error of each input row is pushed onto the rows still to be rounded, weighted by the input
    correlations measured on ``calib_images``, which minimises the layer's output error rather than
    its weight error. The converter then rounds these weights without further change. Biases stay.
    ``clip_ratios``: where each output channel's grid may end, as fractions of its max|w| (the one
    with the least output error wins; ``(1.0,)`` is plain GPTQ without clipping). ``act_order``
    rounds the rows with the most input energy first.
    """
    if len(calib_images) == 0:
        raise EdgesqzError("round_weights needs calibration images")
    out = _clone(model)
    names = [layer.name for layer in out.layers if type(layer).__name__ == "Conv2D"]
    grams = _input_gram(out, names, calib_images)
    for name in names:
        layer = out.get_layer(name)
        kernel, bias = layer.get_weights()
        flat = kernel.reshape(-1, kernel.shape[-1])
        rounded = _gptq_rows(flat, grams[name], damp, clip_ratios, act_order)
        layer.set_weights([rounded.reshape(kernel.shape).astype(kernel.dtype), bias])
    return out


def prepare_int8(model: keras.Model, calib_images: np.ndarray, *, class_map: bool = True) -> keras.Model:
    """The recommended float model to give the int8 converter (calibrate it on ``calib_images``).

    Activation equalisation (of every pair :func:`scale_pairs` finds), then error-compensating
    weight rounding, then (``class_map``) the class-map output: the int8 graph stops before the
    final average pool, which ``edgesqz convert`` then appends in float
    (:mod:`edgesqz.converters.standard_head`), or a reader averages (:func:`pool_class_map`).
    """
    if can_equalize(model):
        model = equalize(model, method="activations", calib_images=calib_images)
    rounded = round_weights(model, calib_images)
    return class_map_model(rounded) if class_map else rounded


# --------------------------------------------------------------------------------------------
# 4-bit weights (int8 activations)

INT4_LEVELS = 7  # symmetric 4-bit grid: -7..7 (the file format also allows -8, unused here)
INT4_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
WEIGHT_BITS = (4, 8)


@dataclass
class WeightPlan:
    """What :func:`prepare_weight_bits` chose: the prepared float model, bits per convolution, and the
    4-bit layers' grids (integer values and per-channel scales) for :func:`edgesqz.tflite_int4.write_int4`."""

    model: keras.Model
    bits: dict[str, int]
    grids: dict[str, Grid]
    sensitivity: dict[str, float] | None = None  # added KL divergence from float when that layer alone is 4-bit
    method: str = "GPTQ"
    _choices: _Choices | None = None  # the rounded candidates, for :meth:`rebudget`

    def rebudget(self, max_weight_bytes: int) -> WeightPlan:
        """The same candidates and sensitivities under another kernel budget (no new measurement).
        Changes the weights of :attr:`model` in place."""
        if self._choices is None or self.sensitivity is None:
            raise EdgesqzError("only a plan made with a byte budget can be re-budgeted")
        return self._choices.plan(self.sensitivity, max_weight_bytes, self.method)

    def weight_bytes(self, model: keras.Model | None = None) -> int:
        return weight_bytes(model or self.model, self.bits)

    def layers(self) -> list[dict[str, object]]:
        rows = []
        for name, bits in self.bits.items():
            row: dict[str, object] = {"layer": name, "bits": bits}
            if self.sensitivity and name in self.sensitivity:
                row["sensitivity"] = float(self.sensitivity[name])
            rows.append(row)
        return rows


@dataclass
class _Choices:
    """Every convolution rounded both ways (int8 kernel; 4-bit kernel and grid step) and the model to fill."""

    out: keras.Model
    eight: dict[str, np.ndarray]
    four: dict[str, tuple[np.ndarray, np.ndarray]]
    shapes: dict[str, tuple[int, ...]]
    names: list[str]
    class_map: bool
    reference: keras.Model | None = None  # the (equalised) float model, for sequential rounding
    calib_images: np.ndarray | None = None

    def put(self, name: str, bits: int) -> None:
        layer = self.out.get_layer(name)
        bias = layer.get_weights()[1]
        kernel = self.eight[name] if bits == 8 else self.four[name][0].reshape(self.shapes[name])
        layer.set_weights([kernel.astype(np.float32), bias])

    def choose(self, sensitivity: dict[str, float], max_weight_bytes: int) -> dict[str, int]:
        """The layers to keep at 8 bits: the set with the most sensitivity that fits the budget (0/1 knapsack
        over the extra bytes each costs at 8 bits, exact to 1/4000 of the room; sensitivities taken as additive).

        Greedy by sensitivity per byte is not enough here: SqueezeNet 1.1's classifier holds 41 % of the
        weights and hurts most at 4 bits (agreement 90 % alone on ImageNet), so per byte it looks cheap."""
        sizes = {name: int(np.prod(self.shapes[name])) for name in self.names}
        first, rest = self.names[0], self.names[1:]
        bits = {first: 8, **dict.fromkeys(rest, 4)}
        room = max_weight_bytes - sum((sizes[n] * bits[n] + 7) // 8 for n in self.names)
        if room <= 0:
            return bits
        extra = {n: sizes[n] - (sizes[n] + 1) // 2 for n in rest}
        unit = max(1, -(-room // 4000))
        cost = {n: -(-extra[n] // unit) for n in rest}  # rounded up: the chosen set always fits
        cap = room // unit
        best = np.zeros(cap + 1)
        keep = np.zeros((len(rest), cap + 1), bool)
        for k, n in enumerate(rest):
            c, v = cost[n], sensitivity[n]
            if c > cap:
                continue
            candidate = np.concatenate([np.full(c, -1.0), best[: cap + 1 - c] + v])
            keep[k] = candidate > best
            best = np.maximum(best, candidate)
        j = cap
        for k in range(len(rest) - 1, -1, -1):
            if keep[k, j]:
                bits[rest[k]] = 8
                j -= cost[rest[k]]
        return bits

    def plan(self, sensitivity: dict[str, float] | None, budget: int | None, method: str,
             bits: dict[str, int] | None = None) -> WeightPlan:
        if bits is None:
            assert sensitivity is not None and budget is not None
            bits = self.choose(sensitivity, budget)
        for name in self.names:
            self.put(name, bits[name])
        grids = {name: _to_grid(*self.four[name], self.shapes[name]) for name in self.names if bits[name] == 4}
        plan = WeightPlan(class_map_model(self.out) if self.class_map else self.out, bits, grids, sensitivity,
                          method, self if sensitivity is not None else None)
        if grids and self.reference is not None and self.calib_images is not None:
            plan = sequential_rounding(self.reference, plan, self.calib_images)
        return plan


def conv_layers(model: keras.Model) -> list[str]:
    """Names of the Conv2D layers in graph order (the first is the stem)."""
    return [layer.name for layer in model.layers if type(layer).__name__ == "Conv2D"]


def conv_sizes(model: keras.Model) -> dict[str, int]:
    """Kernel element count per Conv2D layer."""
    return {name: int(np.prod(model.get_layer(name).get_weights()[0].shape)) for name in conv_layers(model)}


def weight_bytes(model: keras.Model, bits: dict[str, int]) -> int:
    """Bytes the convolution kernels take in the file at ``bits`` (4-bit packed two per byte)."""
    return sum((n * bits.get(name, 8) + 7) // 8 for name, n in conv_sizes(model).items())


def _to_grid(rounded: np.ndarray, scale: np.ndarray, shape: tuple[int, ...]) -> Grid:
    from edgesqz.tflite_int4 import Grid

    values = np.round(rounded / scale).astype(np.int8).reshape(shape)
    return Grid(values, scale.astype(np.float32))


def grids_from_weights(model: keras.Model, layers: Sequence[str], *, tolerance: float = 0.02) -> dict[str, Grid] | None:
    """The 4-bit grids of kernels that already lie on one (``edgesqz train --weight-bits 4``): per output
    channel, scale max|w| / 7 and values round(w / scale); None when a kernel is off its grid by more
    than ``tolerance`` of a step (the weights were not trained on that grid)."""
    from edgesqz.tflite_int4 import Grid

    grids = {}
    for name in layers:
        kernel = model.get_layer(name).get_weights()[0].astype(np.float64)
        top = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0)
        scale = np.where(top > 0, top / INT4_LEVELS, 1.0)
        values = np.round(kernel / scale)
        if np.max(np.abs(kernel / scale - values)) > tolerance:
            return None
        grids[name] = Grid(values.astype(np.int8), scale.astype(np.float32))
    return grids


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _logits(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return np.concatenate([_run(model, images[i:i + 16].astype(np.float32))[0] for i in range(0, len(images), 16)])


def prepare_weight_bits(
    model: keras.Model,
    calib_images: np.ndarray,
    *,
    weight_bits: int = 4,
    max_weight_bytes: int | None = None,
    class_map: bool = True,
    sensitivity_images: int = 64,
    trained_grid: bool = False,
    damp: float = 0.01,
    sequential: bool = True,
) -> WeightPlan:
    """The float model to give the int8 converter when some convolutions get 4-bit weights.

    Activation equalisation as :func:`prepare_int8`, then, for every convolution, GPTQ rounding onto
    an int8 grid and onto a 4-bit grid (per output channel, symmetric, levels -7..7, each channel's
    grid end chosen from :data:`INT4_CLIP_RATIOS` by output error; Hessians from ``calib_images``).
    The first convolution (the stem, fed by raw pixels) always stays 8-bit. Which others get 4 bits:

    - ``max_weight_bytes`` None: all of them (``weight_bits`` 4) or none (8);
    - a byte budget for the kernels: the sensitivity of each layer is measured on ``sensitivity_images``
      of the calibration images (the increase of the mean KL divergence of the class probabilities from
      float's when that layer alone is 4-bit, the others on their int8 grids; on ImageNet it ranks the
      layers as their top-1 agreement does, which the logit MSE does not); then the set of layers kept
      at 8 bits with the most sensitivity that fits the budget (:meth:`_Choices.choose`).

    ``sequential``: once the bits are chosen, every layer is rounded again on the inputs of the already
    rounded layers before it (:func:`sequential_rounding`; on a fine-tuned 3-class SqueezeNet 1.1 all
    4-bit, float activations, 300 held-out photos: agreement with float 96.3 % -> 97.7 %). It costs
    one more pass over the calibration images per layer group.

    ``trained_grid``: the kernels were trained on their 4-bit grid (``edgesqz train --weight-bits 4``):
    no equalisation (it would move them off the grid) and no rounding search; the grid is read
    from the weights (:func:`grids_from_weights`) and the other layers get GPTQ int8 rounding.
    """
    if weight_bits not in WEIGHT_BITS:
        raise EdgesqzError(f"--weight-bits must be 4 or 8, not {weight_bits}")
    if len(calib_images) == 0:
        raise EdgesqzError("4-bit weights need calibration images")
    names = conv_layers(model)
    if not names:
        raise EdgesqzError("the model has no convolutions")
    first, rest = names[0], names[1:]
    if trained_grid:
        out = _clone(model)
        grids = grids_from_weights(out, rest)
        if grids is None:
            raise EdgesqzError("the model's weights are not on the 4-bit grid it was trained with")
        grams = _input_gram(out, [first], calib_images)
        kernel, bias = out.get_layer(first).get_weights()
        rounded = _gptq_rows(kernel.reshape(-1, kernel.shape[-1]), grams[first], damp)
        out.get_layer(first).set_weights([rounded.reshape(kernel.shape).astype(kernel.dtype), bias])
        for name, grid in grids.items():
            layer = out.get_layer(name)
            k, b = layer.get_weights()
            layer.set_weights([(grid.values.astype(np.float32) * grid.scales).astype(k.dtype), b])
        bits = {first: 8, **dict.fromkeys(rest, 4)}
        return WeightPlan(class_map_model(out) if class_map else out, bits, grids, None, "trained 4-bit grid (QAT)")

    if can_equalize(model):
        model = equalize(model, method="activations", calib_images=calib_images)
    out = _clone(model)
    grams = _input_gram(out, names, calib_images)
    eight: dict[str, np.ndarray] = {}
    four: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        kernel = out.get_layer(name).get_weights()[0]
        shapes[name] = kernel.shape
        flat = kernel.reshape(-1, kernel.shape[-1])
        eight[name] = _gptq_rows(flat, grams[name], damp).reshape(kernel.shape)
        if name != first and (weight_bits == 4 or max_weight_bytes is not None):
            four[name] = _gptq_search(flat, grams[name], damp, INT4_CLIP_RATIOS, INT4_LEVELS, keep_end=False)

    choices = _Choices(out, eight, four, shapes, names, class_map, model if sequential else None,
                       calib_images if sequential else None)
    method = "activation equalisation + GPTQ rounding with clipping search (int8 and 4-bit grids)"
    if max_weight_bytes is None:
        return choices.plan(None, None, method, {first: 8, **dict.fromkeys(rest, weight_bits)})
    for name in names:
        choices.put(name, 8)
    subset = calib_images[:sensitivity_images]
    reference = _log_softmax(_logits(model, subset))
    probabilities = np.exp(reference)

    def divergence() -> float:  # mean KL(float || quantised) of the class probabilities
        return float(np.mean(np.sum(probabilities * (reference - _log_softmax(_logits(out, subset))), axis=1)))

    base = divergence()
    sensitivity = {}
    for name in rest:
        choices.put(name, 4)
        sensitivity[name] = max(divergence() - base, 0.0)
        choices.put(name, 8)
    return choices.plan(sensitivity, max_weight_bytes, method)


def max_abs_difference(a: keras.Model, b: keras.Model, images: np.ndarray) -> float:
    """Largest absolute output difference of two float models on uint8 pixel ``images``."""
    x = images.astype(np.float32)
    return float(np.max(np.abs(a.predict(x, batch_size=16, verbose=0) - b.predict(x, batch_size=16, verbose=0))))
