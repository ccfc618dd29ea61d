"""Host-side converters (installed as ``edgesqz.converters``; needs ``pip install "edgesqz[convert]"``).

- :mod:`edgesqz.converters.torch_import`: torchvision ``state_dict`` -> Keras SqueezeNet.
- :mod:`edgesqz.converters.export`: Keras SqueezeNet -> TFLite (float32, float16, dynamic, full int8).
"""
