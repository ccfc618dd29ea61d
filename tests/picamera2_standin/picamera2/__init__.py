"""A stand-in for Picamera2 (the Raspberry Pi camera module's library), for tests on a machine without one.

It answers as Picamera2 does on a Pi with one camera module (``global_camera_info()`` lists an
imx708) and delivers frames from the image ``EDGESQZ_STANDIN_IMAGE`` (BGR as Picamera2's RGB888).
Only what edgesqz calls is here: the selection logic (``--camera 0`` is libcamera's camera 0) and
the capture calls. The real library needs a Pi (docs/raspberry-pi.md).
"""

from __future__ import annotations

import os
from typing import Any

import cv2
import numpy as np

_CAMERAS = [{"Model": "imx708_wide", "Location": 2, "Rotation": 0, "Id": "/base/soc/i2c0mux/i2c@1/imx708@1a",
             "Num": 0}]


class Picamera2:
    @staticmethod
    def global_camera_info() -> list[dict[str, Any]]:
        return [dict(c) for c in _CAMERAS]

    def __init__(self, camera_num: int = 0) -> None:
        if camera_num >= len(_CAMERAS):
            raise IndexError("list index out of range")
        self.camera_num = camera_num
        self.size = (640, 480)
        self.started = False

    def create_video_configuration(self, main: dict[str, Any], controls: dict[str, Any] | None = None,
                                   buffer_count: int = 2) -> dict[str, Any]:
        assert main["format"] == "RGB888"
        return {"main": main, "controls": controls or {}, "buffer_count": buffer_count}

    def configure(self, config: dict[str, Any]) -> None:
        self.size = tuple(config["main"]["size"])

    def start(self) -> None:
        self.started = True

    def capture_array(self, name: str = "main") -> np.ndarray:
        assert self.started and name == "main"
        image = cv2.imread(os.environ["EDGESQZ_STANDIN_IMAGE"]) if os.environ.get("EDGESQZ_STANDIN_IMAGE") else None
        if image is None:
            image = np.full((self.size[1], self.size[0], 3), 127, np.uint8)
        return cv2.resize(image, self.size)

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        pass
