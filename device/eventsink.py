"""Events in the pipeline: :class:`EventSink` runs the detector on each result and fans events out.

One-way and small::

    Result ──> EventSink ──> EventDetector (pure) ──> event outputs
               (a Sink)                                JSON lines, console, --serve, snapshots/clips,
                                                       MQTT, webhook

:class:`EventSink` is an ordinary pipeline sink. For each result it updates the detector, hands the
frame to the outputs that want every frame (the clip writer's pre-roll ring, MQTT's current-label
sensor), and for each event that started or ended it builds the ``event`` record once and gives it
to every output, in order. Outputs never block the camera loop: the ones that do I/O (clips,
MQTT, webhooks) hand work to their own threads through bounded queues.

Put the EventSink *after* the JSON-lines sinks in the pipeline's list: a frame's ``classification``
line then comes before the ``event`` line it caused, and (the pipeline closes sinks in reverse
order) the events the end of the run closes come before the ``run_summary``.

:func:`event_sink` builds one from ``edgesqz run``'s options.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import cv2
import numpy as np

from edgesqz.device import options
from edgesqz.device.events import (
    DEFAULT_END_S,
    DEFAULT_START_S,
    Event,
    EventDetector,
    EventRule,
    resolve_indices,
    slug,
)
from edgesqz.device.sinks import JsonLinesSink, Sink
from edgesqz.errors import EdgesqzError

if TYPE_CHECKING:
    from edgesqz.device.pipeline import Pipeline
    from edgesqz.device.results import Result, Summary
    from edgesqz.device.serve import ServeSink

log = logging.getLogger("edgesqz.device.events")

THUMB_WIDTH = 320


def default_device_id() -> str:
    """This machine's name as an id for topics and records: the host name, in ``[a-z0-9_]``."""
    return slug(socket.gethostname().split(".")[0] or "edgesqz")


class EventOutput:
    """Where events go. Every method is optional; none may block for long (they run in the camera loop).

    ``open(sink)`` when the run starts (``sink`` has ``device``, ``source``, ``rules``, ``detector``,
    ``fps``); ``frame(result)`` for every classified frame; ``prepare(event, best)`` for every event
    change before its record is built (the snapshot/clip writer sets the paths there);
    ``event(record, event, best)`` with the ``event`` record; ``close()`` at the end (after the
    last event; may wait a little to deliver what is queued).
    """

    camera: str | None = None  # set: this output only gets that camera's frames and events

    def open(self, sink: EventSink) -> None:
        pass

    def frame(self, result: Result) -> None:
        pass

    def prepare(self, event: Event, best: Result | None) -> None:
        pass

    def event(self, record: dict[str, Any], event: Event, best: Result | None) -> None:
        pass

    def close(self) -> None:
        pass


class EventSink(Sink):
    """Detect events in the results and send them to ``outputs`` (see the module docstring).

    ``rules``: :class:`EventRule` objects or ``--event`` strings. ``start_s`` / ``end_s``: the
    detector's timing. ``device``: this device's id in records and topics (default: the host name).
    The labels are resolved when the pipeline opens the sink (or earlier with :meth:`bind`).
    """

    def __init__(self, rules: Sequence[EventRule | str], outputs: Sequence[EventOutput] = (), *,
                 start_s: float = DEFAULT_START_S, end_s: float = DEFAULT_END_S, device: str | None = None) -> None:
        self.rules = [r if isinstance(r, EventRule) else EventRule.parse(r) for r in rules]
        self.outputs = list(outputs)
        self.start_s, self.end_s = start_s, end_s
        self.device = device or default_device_id()
        self.detector: EventDetector | None = None  # the first scope's (a run without zones has one)
        self.detectors: dict[tuple[str | None, str | None], EventDetector] = {}
        self.scopes: list[tuple[str | None, str | None]] = [(None, None)]
        self.cameras: list[Any] = []  # the pipeline's CameraRun objects
        self.source: str | None = None
        self.model_identity: dict[str, Any] | None = None
        self.model: str | None = None
        self.fps: float | None = None
        self.clock = "wall"  # what the frames' timestamps follow: "media" (a video file's own clock) or "wall"
        self.events_started = 0
        self._best: dict[str, Result] = {}
        self._last_timestamp: float | None = None
        self._opened: list[EventOutput] = []
        self._closed = False

    def bind(self, labels: list[str] | None, classes: int,
             scopes: Sequence[tuple[str | None, str | None]] | None = None) -> EventDetector:
        """Resolve the rules against the model's labels (errors name the labels that do not exist) and the
        run's zones: ``scopes`` are (camera, zone) pairs, zone None for a camera's whole frame; default one
        scope, (None, None), for a run of one camera without zones."""
        import itertools
        import secrets

        self.scopes = list(scopes) if scopes else [(None, None)]
        zoned = self.scopes != [(None, None)]
        for rule in self.rules:
            if rule.zone is not None and not any(rule.watches(c, z) for c, z in self.scopes):
                known = sorted({f"{c}/{z}" if z else str(c) for c, z in self.scopes if c} |
                               {z for _, z in self.scopes if z})
                where = f"zones and cameras: {', '.join(known)}" if known else "this run has no zones"
                raise EdgesqzError(f"--event {rule.name}: no zone or camera called {rule.zone!r} ({where})")
        EventDetector(self.rules, labels, classes, start_s=self.start_s, end_s=self.end_s)  # checks every rule
        counter, run_id = itertools.count(1), secrets.token_hex(2)
        self.detectors = {}
        for camera, zone in self.scopes:
            rules = [r for r in self.rules if r.watches(camera, zone)] if zoned else self.rules
            if rules:
                self.detectors[(camera, zone)] = EventDetector(
                    rules, labels, classes, start_s=self.start_s, end_s=self.end_s, run_id=run_id,
                    scope=(camera, zone), counter=counter)
        self.detector = next(iter(self.detectors.values()), None) or EventDetector(
            [], labels, classes, start_s=self.start_s, end_s=self.end_s)
        return self.detector

    def bind_pipeline(self, pipeline: Pipeline) -> None:
        """Bind to the pipeline's cameras and zones now (a rule for a zone that does not exist fails here)."""
        scopes = None
        if getattr(pipeline, "multi", False):
            scopes = [(c.name, z.name) for c in pipeline.cameras for z in c.zones] + \
                     [(c.name, None) for c in pipeline.cameras if not c.zones]
        self.bind(pipeline.classifier.labels, pipeline.classifier.num_classes, scopes)
        self._bound = True

    _bound = False

    def check_labels(self, labels: list[str] | None, classes: int) -> None:
        """Raise when a rule names a label that a new model does not have."""
        for rule in self.rules:
            resolve_indices(rule, labels, classes)

    def relabel(self, labels: list[str] | None, classes: int, identity: dict[str, Any] | None = None) -> None:
        """A new model (hot swap, between two frames): the rules on its labels, the outputs told."""
        for detector in self.detectors.values():
            detector.relabel(labels, classes)
        if identity is not None:
            self.model_identity = identity
        for output in self._opened:
            if hasattr(output, "labels"):
                output.labels = labels
            if identity is not None and hasattr(output, "model_changed"):
                output.model_changed(identity)

    def scope_rules(self, camera: str | None, zone: str | None) -> list[EventRule]:
        det = self.detectors.get((camera, zone))
        return det.rules if det is not None else []

    # -- Sink

    def open(self, pipeline: Pipeline | None = None) -> None:
        if pipeline is not None:
            self.cameras = list(getattr(pipeline, "cameras", []))
            if not self._bound:
                self.bind_pipeline(pipeline)
            self.source = pipeline.source.description
            self.model = pipeline.classifier.name
            self.model_identity = pipeline.classifier.identity
            self.fps = pipeline.source.fps
            self.clock = getattr(pipeline.source, "clock", "wall")
        if self.detector is None:
            raise EdgesqzError("EventSink.bind(labels, classes) must be called when there is no pipeline")
        for output in self.outputs:
            output.open(self)
            self._opened.append(output)

    def write(self, result: Result) -> None:
        assert self.detector is not None
        changed: list[Event] = []
        zoned = self.scopes != [(None, None)]
        for zone, scores, _top in result.scopes():
            scope = (result.camera, zone) if zoned else (None, None)
            detector = self.detectors.get(scope)
            if detector is None:
                continue
            changed += detector.update(result.frame.timestamp, scores, result.frame.index)
            for name, event in detector.tracking.items():
                if event.peak_frame == result.frame.index and event.last_frame == result.frame.index:
                    self._best[(scope, name)] = result
        self._last_timestamp = result.frame.timestamp
        for output in self._opened:
            if output.camera is None or output.camera == result.camera:
                output.frame(result)
        for event in changed:
            self._emit(event)

    def close(self, summary: Summary | None = None) -> None:
        """End the events still going (reason ``run_ended``), then close the outputs."""
        if self._closed:
            return
        self._closed = True
        try:
            for detector in self.detectors.values():
                for event in detector.finish(self._last_timestamp):
                    self._emit(event)
        finally:
            errors = []
            for output in self.outputs:  # all of them: closing one that never opened is harmless
                try:
                    output.close()
                except EdgesqzError as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]

    # -- fan-out

    def _emit(self, event: Event) -> None:
        key = ((event.camera, event.zone), event.name)
        best = self._best.get(key)
        if event.state == "ended":
            self._best.pop(key, None)
        else:
            self.events_started += 1
        outputs = [o for o in self._opened if o.camera is None or o.camera == event.camera]
        for output in outputs:
            output.prepare(event, best)
        source, clock = self.source, self.clock
        cam = next((c for c in self.cameras if c.name == event.camera), None) if event.camera is not None else None
        if cam is not None:  # several cameras: the event's own camera, and the clock its frames follow
            source, clock = cam.source.description, getattr(cam.source, "clock", clock)
        rec = event.to_record(source=source, device=self.device, clock=clock)
        for output in outputs:
            output.event(rec, event, best)


# --------------------------------------------------------------------------- simple outputs


class JsonEventOutput(EventOutput):
    """Event records into JSON-lines sinks (``--json`` / ``--output``), between the frames' lines."""

    def __init__(self, sinks: Sequence[JsonLinesSink]) -> None:
        self.sinks = list(sinks)

    def event(self, record: dict[str, Any], event: Event, best: Result | None) -> None:
        for sink in self.sinks:
            sink.write_record(record)


class ConsoleEventOutput(EventOutput):
    """A human line per event start and end (stderr by default)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream

    def event(self, record: dict[str, Any], event: Event, best: Result | None) -> None:
        stream = self.stream or sys.stderr
        if record["state"] == "start":
            text = (f"event: {event.name} started ({event.peak_label} {event.peak_score:.2f}, "
                    f"frame {event.first_frame}; id {event.id})")
        else:
            files = [p for p in ((event.snapshot or {}).get("annotated"), event.clip) if p]
            why = "" if event.reason == "absent" else ", the run ended"
            text = (f"event: {event.name} ended after {event.duration_s:.1f} s{why} (peak {event.peak_score:.2f} "
                    f"{event.peak_label} at frame {event.peak_frame}, {event.frames} frames"
                    + (f"; {', '.join(files)}" if files else "") + ")")
        with contextlib.suppress(OSError, ValueError):
            stream.write(text + "\n")
            stream.flush()


def thumbnail(image: np.ndarray, width: int = THUMB_WIDTH, quality: int = 80) -> bytes | None:
    """A small JPEG of a frame (for the web page's event list)."""
    h, w = image.shape[:2]
    if w > width:
        image = cv2.resize(image, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes() if ok else None


class ServeEventOutput(EventOutput):
    """Events to ``--serve``: on ``/events`` (the same records) and in the page's list, with a thumbnail."""

    def __init__(self, server: ServeSink) -> None:
        self.server = server

    def event(self, record: dict[str, Any], event: Event, best: Result | None) -> None:
        jpeg = thumbnail(best.frame.image) if best is not None else None
        self.server.publish_event_record(record, jpeg)


# --------------------------------------------------------------------------- from the CLI


def event_sink(events: Sequence[str] | None, *, start_s: float | None = None, end_s: float | None = None,
               snapshot_dir: Path | None = None, clip_dir: Path | None = None, preroll_s: float | None = None,
               keep: int | None = None, max_disk_mb: float | None = None, mqtt: str | None = None,
               mqtt_discovery: str | None = None, mqtt_ca: Path | None = None, webhooks: Sequence[str] | None = None,
               device_id: str | None = None, classifier: Any = None, json_sinks: Sequence[JsonLinesSink] = (),
               server: ServeSink | None = None, console: bool = True,
               info: Any = None, mqtt_password: str | None = None,
               cameras: Sequence[str] | None = None) -> EventSink | None:
    """The ``EventSink`` for ``edgesqz run``'s event options, or None when there are none.

    Checks every option first (a clear error for each mistake), resolves the labels against
    ``classifier``, connects to the MQTT broker (an error when it refuses the credentials; a
    warning and retries in the background when it cannot be reached).
    """
    say = info or (lambda message: print(message, file=sys.stderr))
    rules = [EventRule.parse(e) for e in events or ()]
    needs_rules = {"--event-start": start_s, "--event-end": end_s, "--snapshot-dir": snapshot_dir,
                   "--clip-dir": clip_dir, "--preroll": preroll_s, "--keep": keep, "--max-disk": max_disk_mb,
                   "--webhook": webhooks or None}
    if not rules:
        for option, value in needs_rules.items():
            if value is not None:
                raise EdgesqzError(f"{option} needs at least one --event LABEL (the events it acts on)")
        if mqtt is None:
            for option, value in (("--mqtt-discovery", mqtt_discovery), ("--mqtt-ca", mqtt_ca),
                                  ("--device-id", device_id)):
                if value is not None:
                    raise EdgesqzError(f"{option} needs --mqtt or --event")
            return None
    elif mqtt is None:
        for option, value in (("--mqtt-discovery", mqtt_discovery), ("--mqtt-ca", mqtt_ca)):
            if value is not None:
                raise EdgesqzError(f"{option} needs --mqtt URL")
    device = options.device_id(device_id) if device_id is not None else default_device_id()

    from edgesqz.device.clips import MediaWriter
    from edgesqz.device.mqtt import MqttOutput
    from edgesqz.device.webhook import WebhookOutput

    outputs: list[EventOutput] = []
    media = None
    if snapshot_dir is not None or clip_dir is not None:
        if cameras:  # several cameras: a writer (pre-roll ring, clips, files) per camera, in DIR/CAMERA/
            for camera in cameras:
                writer = MediaWriter(snapshot_dir=snapshot_dir / camera if snapshot_dir is not None else None,
                                     clip_dir=clip_dir / camera if clip_dir is not None else None,
                                     preroll_s=preroll_s, keep=keep, max_disk_mb=max_disk_mb, say=say)
                writer.camera = camera
                media = media or writer
                outputs.append(writer)
        else:
            media = MediaWriter(snapshot_dir=snapshot_dir, clip_dir=clip_dir, preroll_s=preroll_s, keep=keep,
                                max_disk_mb=max_disk_mb, say=say)
            outputs.append(media)
    elif preroll_s is not None or keep is not None or max_disk_mb is not None:
        raise EdgesqzError("--preroll, --keep and --max-disk need --snapshot-dir DIR or --clip-dir DIR")
    if json_sinks:
        outputs.append(JsonEventOutput(json_sinks))
    if console:
        outputs.append(ConsoleEventOutput())
    if server is not None:
        outputs.append(ServeEventOutput(server))
    from edgesqz.device.shutdown import Drain

    drain = Drain(10.0)  # one deadline for all the URLs together, not 10 s each
    hooks = [WebhookOutput(url, drain=drain, say=say) for url in webhooks or ()]
    mqtt_out = MqttOutput(mqtt, device=device, discovery=mqtt_discovery, ca_file=mqtt_ca,
                          password=mqtt_password) if mqtt else None
    sink = EventSink(rules, outputs, start_s=DEFAULT_START_S if start_s is None else start_s,
                     end_s=DEFAULT_END_S if end_s is None else end_s, device=device)
    if classifier is not None and rules and not any(rule.zone for rule in rules):
        sink.bind(classifier.labels, classifier.num_classes)  # zone rules: bind_pipeline, once zones are known
    for rule in rules:
        say(f"event: watching {rule.describe()}; starts after {sink.start_s:g} s, ends after {sink.end_s:g} s absent")
    if media is not None:
        say(f"event: {media.describe()}")
    for hook in hooks:
        say(f"event: webhook {hook.describe()}")
    sink.outputs.extend(hooks)
    if mqtt_out is not None:
        mqtt_out.connect(say)  # a refused login is an error now; an unreachable broker is retried
        sink.outputs.append(mqtt_out)
    return sink
