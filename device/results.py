"""What the pipeline hands to its sinks: one :class:`Result` per classified frame, one :class:`Summary` per run.

Both turn into the project's JSON schema objects (``edgesqz.schema.record``): kind
``classification`` and kind ``run_summary``; docs/device.md lists the fields.
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgesqz.device.sources import Frame
from edgesqz.schema import record


def _ms(value: float) -> float:
    return round(float(value), 3)


@dataclass
class ZoneResult:
    """One zone of a classified frame."""

    name: str
    rect: tuple[int, int, int, int]  # pixels x, y, w, h in the frame
    scores: np.ndarray  # the zone's class probabilities
    top_k: list[dict[str, Any]]
    classified: bool = True  # False: motion gating reused the zone's last result
    motion: float | None = None  # fraction of the zone's pixels that changed (motion gating only)

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rect": list(self.rect), "top_k": self.top_k, "classified": self.classified}
        if self.motion is not None:
            out["motion"] = round(self.motion, 4)
        return out


@dataclass
class Result:
    """One classified frame (of one camera; with zones, one result per zone inside)."""

    source: str  # the source's description, e.g. "camera 0", "clip.mp4"
    frame: Frame
    seq: int  # 0-based number of this result in the run
    top_k: list[dict[str, Any]]  # edgesqz.schema.top_k entries at or above the threshold
    scores: np.ndarray  # all class probabilities
    latency_ms: dict[str, float]  # preprocess, inference, postprocess, end_to_end
    fps: float  # recent classification rate of this camera (frames per second)
    camera: str | None = None  # the camera's name (runs with several cameras, named cameras or zones)
    zones: list[ZoneResult] | None = None  # None: the whole frame was classified (top_k, scores)
    model: dict[str, Any] | None = None  # which model produced it: {"name", "sha256", "version"}

    def to_record(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"image": self.frame.name} if self.frame.name is not None else {}
        if self.camera is not None:
            extra = {"camera": self.camera, **extra}
        scope: dict[str, Any] = {"top_k": self.top_k} if self.zones is None else {
            "zones": {z.name: z.to_record() for z in self.zones}}
        return record(
            "classification",
            source=self.source,
            frame=self.frame.index,
            **extra,
            timestamp=round(self.frame.timestamp, 6),
            **scope,
            latency_ms={k: _ms(v) for k, v in self.latency_ms.items()},
            **({"model": self.model} if self.model is not None else {}),
        )

    def scopes(self) -> list[tuple[str | None, np.ndarray, list[dict[str, Any]]]]:
        """(zone name or None for the whole frame, scores, top_k) of each thing classified in this frame."""
        if self.zones is None:
            return [(None, self.scores, self.top_k)]
        return [(z.name, z.scores, z.top_k) for z in self.zones]


class LatencyStats:
    """Latency samples (ms) for percentiles; a uniform reservoir once there are more than ``capacity``."""

    def __init__(self, capacity: int = 20_000, seed: int = 0) -> None:
        self.capacity = capacity
        self.count = 0
        self.total = 0.0
        self._samples = array("d")
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if len(self._samples) < self.capacity:
            self._samples.append(value)
        else:
            j = self._rng.randrange(self.count)
            if j < self.capacity:
                self._samples[j] = value

    def percentile(self, q: float) -> float | None:
        if not self._samples:
            return None
        return float(np.percentile(np.frombuffer(self._samples, dtype=np.float64), q))

    def to_dict(self) -> dict[str, float | None]:
        if not self.count:
            return {"mean": None, "p50": None, "p90": None}
        return {"mean": _ms(self.total / self.count), "p50": _ms(self.percentile(50)), "p90": _ms(self.percentile(90))}


@dataclass
class Summary:
    """The run as a whole."""

    source: str
    frames: int = 0  # classified
    captured: int = 0  # read from the source
    dropped: int = 0  # live sources: frames replaced by a newer one before inference
    skipped: int = 0  # unreadable images skipped
    reconnects: int = 0
    duration_s: float = 0.0  # first frame available -> last result
    stopped_by: str = "end_of_source"
    latency: dict[str, LatencyStats] = field(default_factory=lambda: {
        "preprocess": LatencyStats(), "inference": LatencyStats(), "end_to_end": LatencyStats()})
    runtime: dict[str, Any] = field(default_factory=dict)
    cameras: dict[str, dict[str, Any]] | None = None  # per camera, for runs with several (or named) cameras

    @property
    def fps(self) -> float:
        return self.frames / self.duration_s if self.duration_s > 0 else 0.0

    def add(self, latency_ms: dict[str, float]) -> None:
        self.frames += 1
        for key, stats in self.latency.items():
            if key in latency_ms:
                stats.add(latency_ms[key])

    def to_record(self) -> dict[str, Any]:
        return record(
            "run_summary",
            source=self.source,
            frames=self.frames,
            captured=self.captured,
            dropped=self.dropped,
            skipped=self.skipped,
            reconnects=self.reconnects,
            duration_s=round(self.duration_s, 3),
            fps_mean=round(self.fps, 2),
            latency_ms={k: v.to_dict() for k, v in self.latency.items()},
            stopped_by=self.stopped_by,
            **({"cameras": self.cameras} if self.cameras is not None else {}),
            **self.runtime,
        )

    def describe(self) -> str:
        """Two human lines."""
        inf, e2e = self.latency["inference"].to_dict(), self.latency["end_to_end"].to_dict()

        def pair(d: dict[str, float | None]) -> str:
            return "-" if d["p50"] is None else f"{d['p50']:.1f}/{d['p90']:.1f}"

        extra = "".join([f", skipped {self.skipped}" if self.skipped else "",
                         f", reconnected {self.reconnects}x" if self.reconnects else ""])
        cams = "".join(f"\ncamera {name}: {c['frames']} frames, dropped {c['dropped']}, {c['state']}"
                       + (f" ({c['error']})" if c.get("error") else "")
                       for name, c in (self.cameras or {}).items()) if self.cameras and len(self.cameras) > 1 else ""
        return (f"{self.frames} frames in {self.duration_s:.1f} s: {self.fps:.1f} FPS mean, dropped {self.dropped}"
                f"{extra} (stopped by {self.stopped_by.replace('_', ' ')})\n"
                f"latency ms p50/p90: inference {pair(inf)}, end-to-end {pair(e2e)}{cams}")
