"""Cameras and zones of a site: what ``edgesqz run`` classifies in each frame.

A :class:`CameraRun` is one camera (a :class:`~edgesqz.device.sources.FrameSource` with a name)
and its zones. A :class:`ZoneView` is one rectangle of that camera's frame: cropped from each
frame and classified on its own, with the model's own preprocessing (centre crop fraction,
resize, colour order) applied to the crop. A camera without zones classifies its whole frame,
as a single-camera run always did.

Motion gating (optional, per zone): the zone's crop is shrunk to a 32x32 grey image; when too
few of its pixels changed since the previous frame (``motion_threshold``), the zone is not
classified and its last result is reused, unless ``max_interval`` seconds went by since it was
last classified. A static scene then costs almost nothing but the capture. All of it runs in
the camera's reader thread, so the interpreter only ever waits for ``invoke``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edgesqz.device.config import CameraConfig, Rect, ZoneConfig
from edgesqz.device.sources import Frame, FrameSource

MOTION_SIZE = 32  # the grey thumbnail motion gating compares
MOTION_DELTA = 25  # a pixel "changed" when its grey value moved by more than this (0..255)


@dataclass
class ZoneInput:
    """What the reader thread prepared for one zone of one frame."""

    rect: tuple[int, int, int, int]  # pixels x, y, w, h in the frame
    tensor: np.ndarray | None  # the model input; None: not classified (no motion), reuse the last result
    motion: float | None = None  # fraction of the zone's pixels that changed (None: no gating)


class ZoneView:
    """One zone of a camera: its rectangle in pixels for the current frame size, and its motion gate."""

    def __init__(self, config: ZoneConfig) -> None:
        self.config = config
        self.name = config.name
        self._size: tuple[int, int] | None = None
        self._rect = (0, 0, 1, 1)
        self._previous: np.ndarray | None = None
        self._last_classified: float | None = None

    @property
    def rect_config(self) -> Rect:
        return self.config.rect

    def rect(self, width: int, height: int) -> tuple[int, int, int, int]:
        if self._size != (width, height):
            self._size = (width, height)
            self._rect = self.config.rect.to_pixels(width, height)
        return self._rect

    def crop(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        h, w = image.shape[:2]
        x, y, cw, ch = self.rect(w, h)
        return image[y:y + ch, x:x + cw], (x, y, cw, ch)

    def wants(self, crop: np.ndarray, now: float) -> tuple[bool, float | None]:
        """(classify this crop?, the fraction of pixels that moved); always True without gating."""
        if not self.config.motion:
            return True, None
        grey = crop if crop.ndim == 2 else cv2.cvtColor(crop, cv2.COLOR_BGRA2GRAY if crop.shape[2] == 4
                                                        else cv2.COLOR_BGR2GRAY)
        small = cv2.resize(grey, (MOTION_SIZE, MOTION_SIZE), interpolation=cv2.INTER_AREA)
        previous, self._previous = self._previous, small
        moved = 1.0 if previous is None else float(
            np.count_nonzero(cv2.absdiff(small, previous) > MOTION_DELTA)) / small.size
        due = self._last_classified is None or now - self._last_classified >= self.config.max_interval
        if due or moved >= self.config.motion_threshold:
            self._last_classified = now
            return True, moved
        return False, moved


class CameraRun:
    """One camera of the run: its source, its zones, its own frame rate and state."""

    def __init__(self, config: CameraConfig, source: FrameSource) -> None:
        self.config = config
        self.name = config.name
        self.source = source
        self.zones = [ZoneView(z) for z in config.zones]
        self.last_scores: list[np.ndarray | None] = [None] * len(self.zones)
        self.frames = 0  # classified
        self.failed: str | None = None  # why it was given up (the others go on)
        self.finished = False
        self._recent: deque[float] = deque(maxlen=30)
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        """``online``, ``connecting``, ``reconnecting``, ``unavailable`` (given up) or ``ended``."""
        if self.failed is not None:
            return "unavailable"
        if self.finished:
            return "ended"
        return getattr(self.source, "state", "online")

    def preparer(self, prepare: Callable[[np.ndarray], np.ndarray]) -> Callable[[Frame], None]:
        """What the reader thread runs on each frame: the whole-frame input, or each zone's (gated)."""
        if not self.zones:
            def whole(frame: Frame) -> None:
                frame.input = prepare(frame.image)

            return whole

        def zoned(frame: Frame) -> None:
            now = frame.timestamp  # the source's clock: a video file's own time when it is read at full speed
            inputs = []
            for zone in self.zones:
                crop, rect = zone.crop(frame.image)
                want, moved = zone.wants(crop, now)
                inputs.append(ZoneInput(rect=rect, tensor=prepare(crop) if want else None, motion=moved))
            frame.zones = inputs

        return zoned

    def tick(self, at: float) -> float:
        """Note a classified frame at ``at`` (perf_counter); the camera's recent FPS."""
        self.frames += 1
        self._recent.append(at)
        span = self._recent[-1] - self._recent[0]
        return (len(self._recent) - 1) / span if span > 0 else 0.0

    def status(self) -> dict[str, Any]:
        size = self.source.frame_size
        return {"name": self.name, "state": self.state, "source": self.source.description,
                "frames": self.frames, "captured": self.source.captured, "dropped": self.source.dropped,
                "reconnects": self.source.reconnects, "size": list(size) if size else None,
                "zones": [z.name for z in self.zones], **({"error": self.failed} if self.failed else {})}
