"""The on-device runtime (installed as ``edgesqz.device``): numpy, OpenCV and a TFLite runtime only.

Nothing in this package imports TensorFlow or PyTorch.
"""
