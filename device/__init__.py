"""The on-device runtime (installed as ``edgesqz.device``): numpy, OpenCV and a TFLite runtime only.

Nothing in this package imports TensorFlow or PyTorch.

    from edgesqz.device import Classifier, Pipeline, open_source, JsonLinesSink

    clf = Classifier("model.tflite")                  # metadata gives size, crop, labels, I/O types
    clf.classify(frame_bgr)                           # -> [("espresso", 0.84), ...]
    Pipeline(open_source(camera=0), clf, [JsonLinesSink(sys.stdout)], max_frames=100).run()

Modules, bottom up: ``runtime`` (interpreter backends, delegates), ``classifier`` (frame ->
scores), ``sources`` (cameras, files, streams in reader threads), ``results`` / ``sinks``
(JSON lines, window, video), ``serve`` (live web preview), ``pipeline`` (the loop), ``events``
(the ``--event`` grammar and detector: pure logic), ``eventsink`` / ``clips`` / ``mqtt`` / ``webhook``
(where events go), ``cli`` (``edgesqz run`` / ``classify``).
The names below are imported on first use, so ``import edgesqz.device.runtime`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Classifier": "classifier",
    "Scores": "classifier",
    "InputSpec": "classifier",
    "load_labels": "classifier",
    "Pipeline": "pipeline",
    "Result": "results",
    "Summary": "results",
    "Frame": "sources",
    "FrameSource": "sources",
    "Retry": "sources",
    "open_source": "sources",
    "Sink": "sinks",
    "JsonLinesSink": "sinks",
    "ConsoleSink": "sinks",
    "WindowSink": "sinks",
    "VideoRecordSink": "sinks",
    "annotate": "sinks",
    "display_status": "sinks",
    "ServeSink": "serve",
    "Event": "events",
    "EventRule": "events",
    "EventDetector": "events",
    "EventSink": "eventsink",
    "EventOutput": "eventsink",
    "MediaWriter": "clips",
    "MqttOutput": "mqtt",
    "WebhookOutput": "webhook",
    "make_interpreter": "runtime",
    "delegate_coverage": "runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgesqz.device' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edgesqz.device.{module}"), name)
