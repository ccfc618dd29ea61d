"""Host-side converters (installed as ``edgesqz.converters``; needs ``pip install "edgesqz[convert]"``).

- :mod:`edgesqz.converters.torch_import`: torchvision ``state_dict`` -> Keras SqueezeNet.
- :mod:`edgesqz.converters.export`: Keras SqueezeNet -> TFLite (float32, float16, dynamic, full int8).
"""

# The output formats of both routes (light: the CLI checks its arguments before TensorFlow loads).
FORMATS: tuple[str, ...] = ("int8", "float16", "dynamic", "float32")
