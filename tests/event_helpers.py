"""Shared by the event tests: videos made of real photos in turn, and ``edgesqz run`` with events in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from serve_client import ServeRun

# With the int8 SqueezeNet 1.1: coffee.png is "espresso", chelsea.png one of the three cats,
# rocket.jpg neither (mostly "pole"): the background between appearances.
CAT = "cat=tabby,tiger cat,Egyptian cat"


def write_scenes(path: Path, scenes: list[tuple[Path, int]], fps: float = 30) -> Path:
    """640x480 mp4v video: each (photo, frames) in turn, panning slowly over the photo."""
    cache: dict[Path, np.ndarray] = {}
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (640, 480))
    assert writer.isOpened()
    i = 0
    for photo, frames in scenes:
        if photo not in cache:
            cache[photo] = cv2.resize(cv2.imread(str(photo)), (800, 620))
        for _ in range(frames):
            x, y = (i * 2) % 160, i % 140
            writer.write(np.ascontiguousarray(cache[photo][y: y + 480, x: x + 640]))
            i += 1
    writer.release()
    return path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def events_of(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] == "event"]


class Run(ServeRun):
    """``edgesqz run ...`` in a subprocess, stderr collected in a thread (``lines``); no ``--serve`` needed."""

    def wait(self, timeout: float = 120) -> int:
        """The exit status once it ends by itself (killed if it has not after ``timeout``)."""
        return self.stop(None, timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
